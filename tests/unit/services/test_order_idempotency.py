"""The order API's answers when the broker fails or a client retries, seen from a client:
an Idempotency-Key never makes a second order, an uncertain publish keeps its order_id
(the app as in test_order_models, over in-memory fakes)."""

from __future__ import annotations

import pytest

from tests.unit.services.test_order_models import ORDER, api, post, with_change  # noqa: F401 (fixture)


def test_a_failed_publish_is_a_503_and_nothing_is_cached(api):
    api.publisher.fail = "the broker is unreachable (ConnectionError)"
    response = post(api, ORDER)
    assert response.status_code == 503
    assert "retry" in response.json()["detail"] and "unreachable" in response.json()["detail"]
    assert api.redis.data == {}


def test_a_retry_with_the_same_idempotency_key_publishes_nothing_more(api):
    first = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    again = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(api.publisher.published) == 1
    assert api.redis.data["idempotency:order-42"] == first.json()["order_id"].encode()
    assert api.redis.ttl["idempotency:order-42"] == 86400
    other = post(api, ORDER, **{"Idempotency-Key": "order-43"})
    assert other.json()["order_id"] != first.json()["order_id"]
    assert len(api.publisher.published) == 2


def test_an_idempotency_key_reused_for_another_order_is_refused(api):
    post(api, ORDER, **{"Idempotency-Key": "order-42"})
    response = post(api, with_change("type", "regular"), **{"Idempotency-Key": "order-42"})
    assert response.status_code == 422
    assert "different order" in response.json()["detail"]
    assert len(api.publisher.published) == 1


def test_a_repeat_while_the_first_is_in_flight_is_a_409(api):
    api.redis.data["idempotency:order-42"] = b"f" * 36  # claimed, not yet confirmed
    response = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert response.status_code == 409
    assert "in flight" in response.json()["detail"]
    assert api.publisher.published == []


def test_a_failed_publish_releases_the_key_so_that_a_retry_succeeds(api):
    api.publisher.fail = "the broker could not route a priority order"  # certain: not taken
    assert post(api, ORDER, **{"Idempotency-Key": "order-42"}).status_code == 503
    assert "idempotency:order-42" not in api.redis.data
    api.publisher.fail = None
    retry = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert len(api.publisher.published) == 1


@pytest.mark.parametrize("failure", ["the broker did not confirm the order within 10 s",
                                     "the connection to the broker was lost (ConnectionError)"])
def test_an_uncertain_publish_keeps_the_key_and_a_retry_sends_the_same_order(api, failure):
    api.publisher.fail = failure
    first = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert first.status_code == 503 and first.headers["Retry-After"]
    order_id = first.json()["order_id"]
    assert "same Idempotency-Key" in first.json()["detail"]
    assert api.redis.data["idempotency:order-42"] == order_id.encode()  # still bound
    # Still uncertain on the next try: the same order again, still bound.
    second = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert second.status_code == 503 and second.json()["order_id"] == order_id
    api.publisher.fail = None
    retry = post(api, ORDER, **{"Idempotency-Key": "order-42"})
    assert retry.status_code == 201, retry.text
    assert retry.json()["order_id"] == order_id
    assert [d["order_id"] for d in api.publisher.published] == [order_id]
    assert api.get(f"/order/{order_id}").json() == retry.json()
    assert f"unconfirmed:{order_id}" not in api.redis.data
    # From then on, a plain replay; another order with the key is refused.
    assert post(api, ORDER, **{"Idempotency-Key": "order-42"}).headers["Idempotent-Replayed"] == "true"
    assert post(api, with_change("type", "regular"),
                **{"Idempotency-Key": "order-42"}).status_code == 422
    assert len(api.publisher.published) == 1


def test_an_unconfirmed_order_is_not_resent_for_a_different_body(api):
    api.publisher.fail = "the broker did not confirm the order within 10 s"
    assert post(api, ORDER, **{"Idempotency-Key": "order-42"}).status_code == 503
    api.publisher.fail = None
    other = post(api, with_change("type", "digital"), **{"Idempotency-Key": "order-42"})
    assert other.status_code == 422 and "different order" in other.json()["detail"]
    assert api.publisher.published == []


def test_an_uncertain_publish_without_a_key_is_a_plain_503(api):
    api.publisher.fail = "the broker did not confirm the order within 10 s"
    response = post(api, ORDER)
    assert response.status_code == 503 and "order_id" not in response.json()
    assert api.redis.data == {}
