"""The Postman collection and environment documents, and how they are written."""
from __future__ import annotations

import json
import os
import stat

import pytest

from opsctl import postman

API = "http://127.0.0.1:8081"
TOKEN = "http://127.0.0.1:8080/realms/order-management-realm/protocol/openid-connect/token"


@pytest.fixture
def coll():
    return postman.collection(API, TOKEN, "order-api-client")


def _walk(items):
    for item in items:
        if "item" in item:  # a folder
            yield from _walk(item["item"])
        else:
            yield item


def _script(events, listen):
    (event,) = [e for e in events if e["listen"] == listen]
    assert event["script"]["type"] == "text/javascript"
    assert isinstance(event["script"]["exec"], list)
    return "\n".join(event["script"]["exec"])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _values(env) -> dict:
    return {v["key"]: v for v in env["values"]}


# --- the collection ---------------------------------------------------------------

def test_collection_is_v21_and_named(coll):
    assert coll["info"]["schema"] == "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
    assert coll["info"]["name"] == "order-management platform"
    assert coll["info"]["_postman_id"]
    json.dumps(coll)  # plain JSON


def test_every_request_has_a_name_a_method_and_a_url(coll):
    requests = list(_walk(coll["item"]))
    assert requests
    for item in requests:
        assert item["name"]
        req = item["request"]
        assert req["method"] in {"GET", "POST", "PUT", "PATCH", "DELETE"}
        assert req["url"]["raw"].startswith("{{base_url}}/")
        assert req["url"]["host"] == ["{{base_url}}"]
        assert req["url"]["raw"] == "{{base_url}}/" + "/".join(req["url"]["path"])


def test_collection_has_the_order_api_routes(coll):
    routes = {(i["request"]["method"], i["request"]["url"]["raw"]) for i in _walk(coll["item"])}
    assert routes == {
        ("POST", "{{base_url}}/orders"),
        ("POST", "{{base_url}}/create"),
        ("GET", "{{base_url}}/order/{{order_id}}"),
        ("GET", "{{base_url}}/all-products-by-category"),
        ("GET", "{{base_url}}/stock/all-categories"),
        ("GET", "{{base_url}}/health"),
    }


def test_request_bodies_are_json(coll):
    by_route = {i["request"]["url"]["raw"]: i["request"] for i in _walk(coll["item"])}
    order = json.loads(by_route["{{base_url}}/orders"]["body"]["raw"])
    assert order["type"] == "regular" and order["customer"]
    assert order["items"]
    for item in order["items"]:
        assert set(item) >= {"product", "category", "quantity", "price"}
    assert json.loads(by_route["{{base_url}}/create"]["body"]["raw"]) == {"number_of_orders": 3}
    for req in by_route.values():
        if "body" in req:
            assert {"key": "Content-Type", "value": "application/json", "type": "text"} in req["header"]


def test_bearer_auth_everywhere_but_health(coll):
    assert coll["auth"] == {"type": "bearer",
                            "bearer": [{"key": "token", "value": "{{access_token}}", "type": "string"}]}
    for item in _walk(coll["item"]):
        if item["request"]["url"]["raw"] == "{{base_url}}/health":
            assert item["request"]["auth"] == {"type": "noauth"}
        else:
            assert "auth" not in item["request"]  # inherits the collection's bearer


def test_pre_request_script_gets_a_client_credentials_token(coll):
    script = _script(coll["event"], "prerequest")
    assert "client_credentials" in script
    assert "pm.sendRequest" in script
    for needle in ("token_url", "client_id", "client_secret", "urlencoded",
                   "pm.environment.set('access_token'", "pm.environment.set('access_token_expires_at'",
                   "error_description", "throw", "30000"):
        assert needle in script, needle
    assert script.count("{") == script.count("}") and script.count("(") == script.count(")")


def test_every_request_tests_its_status_family(coll):
    for item in _walk(coll["item"]):
        tests = _script(item["event"], "test")
        assert "pm.test(" in tests and "within(200, 299)" in tests, item["name"]


def test_collection_variables_hold_no_secret(coll):
    variables = {v["key"]: v["value"] for v in coll["variable"]}
    assert variables["base_url"] == API and variables["token_url"] == TOKEN
    assert variables["client_id"] == "order-api-client"
    assert "client_secret" not in variables and "access_token" not in variables


# --- the environment --------------------------------------------------------------

def test_environment_variables_and_types():
    env = postman.environment("local", API, TOKEN, "order-api-client", "s3cret", "tok")
    assert env["name"] == "local" and env["id"]
    assert env["_postman_variable_scope"] == "environment"
    values = _values(env)
    assert list(values) == ["base_url", "token_url", "client_id", "client_secret", "access_token"]
    assert {k: v["value"] for k, v in values.items()} == {
        "base_url": API, "token_url": TOKEN, "client_id": "order-api-client",
        "client_secret": "s3cret", "access_token": "tok"}
    assert {k: v["type"] for k, v in values.items()} == {
        "base_url": "default", "token_url": "default", "client_id": "default",
        "client_secret": "secret", "access_token": "secret"}
    assert all(v["enabled"] is True for v in values.values())


def test_environment_access_token_defaults_to_empty():
    env = postman.environment("local", API, TOKEN, "c", "s")
    assert _values(env)["access_token"]["value"] == ""


# --- writing files ----------------------------------------------------------------

def _env(secret="s1", **kw):
    return postman.environment("local", API, TOKEN, "order-api-client", secret, **kw)


def test_write_environment_creates_a_0600_file(tmp_path):
    path = tmp_path / "sub" / "local.postman_environment.json"
    env = _env()
    postman.write_environment(path, env)
    assert _mode(path) == 0o600
    assert json.loads(path.read_text()) == env
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind


def test_write_environment_tightens_an_existing_files_mode(tmp_path):
    path = tmp_path / "env.json"
    path.write_text(json.dumps(_env()))
    path.chmod(0o644)
    postman.write_environment(path, _env("s2"))
    assert _mode(path) == 0o600


def test_write_environment_merges_keeping_the_users_variables_id_and_name(tmp_path):
    path = tmp_path / "env.json"
    first = _env("old-secret")
    first["name"] = "my local"
    first["values"].append({"key": "my_var", "value": "mine", "type": "default", "enabled": True})
    first["values"].append({"key": "access_token_expires_at", "value": "123", "type": "default",
                            "enabled": True})
    path.write_text(json.dumps(first))

    second = _env("new-secret")
    written = postman.write_environment(path, second)
    on_disk = json.loads(path.read_text())
    assert on_disk == written
    assert on_disk["id"] == first["id"] != second["id"]
    assert on_disk["name"] == "my local"
    values = _values(on_disk)
    assert values["my_var"] == {"key": "my_var", "value": "mine", "type": "default", "enabled": True}
    assert values["client_secret"]["value"] == "new-secret"
    assert values["client_secret"]["type"] == "secret"
    # The expiry belonged to the access token that was just replaced.
    assert "access_token_expires_at" not in values
    assert [v["key"] for v in on_disk["values"]] == [
        "base_url", "token_url", "client_id", "client_secret", "access_token", "my_var"]
    assert _mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["env.json"]


def test_write_environment_merge_adds_new_variables_and_replaces_only_the_given(tmp_path):
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"id": "abc", "name": "mine", "_postman_variable_scope": "environment",
                                "values": [{"key": "base_url", "value": "http://old", "type": "default",
                                            "enabled": True},
                                           {"key": "access_token_expires_at", "value": "9",
                                            "type": "default", "enabled": True}]}))
    partial = {"id": "new", "name": "new", "_postman_variable_scope": "environment",
               "values": [{"key": "client_secret", "value": "x", "type": "secret", "enabled": True}]}
    postman.write_environment(path, partial)
    on_disk = json.loads(path.read_text())
    assert (on_disk["id"], on_disk["name"]) == ("abc", "mine")
    assert [(v["key"], v["value"]) for v in on_disk["values"]] == [
        ("base_url", "http://old"), ("access_token_expires_at", "9"), ("client_secret", "x")]


def test_write_environment_without_merge_replaces_the_file(tmp_path):
    path = tmp_path / "env.json"
    first = _env()
    first["values"].append({"key": "my_var", "value": "mine", "type": "default", "enabled": True})
    path.write_text(json.dumps(first))
    second = _env("s2")
    postman.write_environment(path, second, merge=False)
    assert json.loads(path.read_text()) == second


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"info": {"name": "a collection"}, "item": []}', 'no "values" list'),
    ('{"values": [], "_postman_variable_scope": "globals"}', "_postman_variable_scope"),
    ('{"values": [{"value": "no key"}]}', 'values[0] has no "key"'),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_write_environment_refuses_a_bad_existing_file_and_leaves_it_untouched(tmp_path, content, why):
    path = tmp_path / "env.json"
    raw = content if isinstance(content, bytes) else content.encode()
    path.write_bytes(raw)
    path.chmod(0o640)
    with pytest.raises(ValueError) as info:
        postman.write_environment(path, _env())
    message = str(info.value)
    assert str(path) in message and why in message, message
    assert "not a Postman environment" in message
    assert path.read_bytes() == raw
    assert _mode(path) == 0o640
    assert os.listdir(tmp_path) == ["env.json"]  # no temp file left behind


def test_write_environment_rejects_a_bad_document_to_write(tmp_path):
    path = tmp_path / "env.json"
    with pytest.raises(ValueError, match="not a Postman environment"):
        postman.write_environment(path, {"name": "x"})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    postman.write_environment(path, _env("s1"))
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(postman.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        postman.write_environment(path, _env("s2"))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["env.json"]


def test_temp_file_is_0600_from_creation(tmp_path, monkeypatch):
    """The secret is never in a file that others may read, not even before the rename."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(_mode(src))
        real_replace(src, dst)

    monkeypatch.setattr(postman.os, "replace", spy)
    postman.write_environment(tmp_path / "env.json", _env())
    assert seen == [0o600]


def test_write_collection_is_0644_and_atomic(tmp_path, coll):
    path = tmp_path / "order-management.postman_collection.json"
    postman.write_collection(path, coll)
    assert _mode(path) == 0o644
    assert json.loads(path.read_text()) == coll
    postman.write_collection(path, coll)  # overwrite
    assert os.listdir(tmp_path) == [path.name]
