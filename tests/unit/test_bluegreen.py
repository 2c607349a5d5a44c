"""The blue/green analysis arithmetic and where the live colour is read from."""

import json

import pytest

from opsctl import spec
from opsctl.app.bluegreen import _delta, _quantile
from opsctl.components import live
from opsctl.context import Context


def test_the_quantile_interpolates_in_its_bucket_like_promql():
    buckets = {1.0: 0, 5.0: 50, 10.0: 90, 50.0: 100, float("inf"): 100}
    assert _quantile(0.5, buckets) == pytest.approx(5.0)
    assert _quantile(0.99, buckets) == pytest.approx(10 + 40 * 9 / 10)
    assert _quantile(0.99, {1.0: 0, float("inf"): 0}) is None  # no requests: no latency


def test_a_window_counts_what_happened_in_it_and_not_before():
    before = {"classes": {"2": 100, "5": 4}, "buckets": {10.0: 100, float("inf"): 104}}
    after = {"classes": {"2": 190, "5": 14}, "buckets": {10.0: 150, float("inf"): 204}}
    requests, errors, p99 = _delta(after, before)
    assert (requests, errors) == (100, 10)
    assert p99 == pytest.approx(10.0)  # half of the window's requests took longer than 10 ms: +Inf bucket


def test_the_newest_record_of_the_live_colour_wins_and_blue_is_live_at_first(tmp_path, monkeypatch):
    ctx = Context(spec.load(None), "local", tmp_path / ".opsctl")
    monkeypatch.setattr(live, "_from_consul", lambda ctx: [])
    assert live.colour(ctx) == "blue" and live.idle(ctx) == "green"
    (tmp_path / ".opsctl").mkdir()
    (tmp_path / ".opsctl" / "live.json").write_text(json.dumps({"colour": "green", "since": 10}))
    assert live.colour(ctx) == "green"
    monkeypatch.setattr(live, "_from_consul", lambda ctx: [{"colour": "blue", "since": 20}])
    assert live.colour(ctx) == "blue"  # Consul's is newer than the mirror
    monkeypatch.setattr(live, "_from_consul", lambda ctx: [{"colour": "purple", "since": 30}])
    assert live.colour(ctx) == "green"  # not a colour of the spec: ignored
