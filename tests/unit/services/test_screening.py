"""The screening model offline: features, deterministic training, the artifact, the jobs."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from opsctl import spec
from opsctl.orders import labelled
from order_services.screening import features, model

CATALOGUE = spec.load(None).catalogue.products


@pytest.fixture(scope="module")
def orders():
    return labelled(CATALOGUE, 3000, 0.05, seed=5)


@pytest.fixture(scope="module")
def normal(orders):
    return [o for o in orders if o["label"] == "normal"]


def test_pyspark_pinned_by_the_services_is_the_spark_version_of_the_spec():
    pyproject = (Path(__file__).resolve().parents[3] / "services" / "pyproject.toml").read_text()
    assert f'"pyspark=={spec.load(None).components["spark"].version}"' in pyproject


def test_features_see_the_anomalies_the_generator_injects(orders, normal):
    schema = features.Schema.learn(normal)
    x, bad = features.matrix(orders, schema)
    assert not bad and x.shape == (len(orders), len(schema.names))
    column = {name: i for i, name in enumerate(schema.names)}
    labels = np.array([o["label"] for o in orders])

    def typical(kind: str, name: str) -> float:
        return float(np.median(x[labels == kind, column[name]]))

    assert typical("price_outlier", "max_log_price_ratio") > typical("normal", "max_log_price_ratio") + 2
    assert typical("quantity_spike", "max_log_item_quantity") > typical("normal", "max_log_item_quantity") + 3
    assert typical("category_mismatch", "min_log_pair_share") < typical("normal", "min_log_pair_share") - 3
    assert typical("customer_burst", "log_customer_recent_orders") > typical("normal", "log_customer_recent_orders") + 1
    assert typical("customer_burst", "log_seconds_since_customer_order") < typical("normal", "log_seconds_since_customer_order") - 2
    unseen = {**normal[0], "items": [{**normal[0]["items"][0], "product": "never sold before"}]}
    rare = features.matrix([unseen], schema, features.CustomerClock.from_orders(orders))[0][0]
    assert rare[column["min_log_product_share"]] < typical("normal", "min_log_product_share") - 3


def test_a_customers_recent_orders_and_last_order_count_only_what_came_before():
    at = lambda seconds: {"created_at": f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}+00:00"}  # noqa: E731
    clock = features.CustomerClock.from_orders([{"customer": {"id": c}, **at(s)} for c, s in
                                    [("a", 0), ("a", 30), ("a", 59), ("b", 58), ("a", 200)]])
    when = [features.created_at(at(s)) for s in (59, 60, 100, 59, 59)]
    recent, gap = clock.before(["a", "a", "a", "b", "new"], np.array(when), 60.0)
    # a at 59 s: 0 and 30 before it (59 itself is not "before"); at 60 s, 0 has left the window.
    assert recent.tolist() == [2, 2, 1, 1, 0]
    assert gap.tolist() == [29.0, 1.0, 41.0, 1.0, 60.0]  # none before: the window


@pytest.mark.parametrize("broken,reason", [
    ({"items": []}, "items is missing or empty"),
    ({"customer": {}}, "customer.id is missing"),
    ({"created_at": "yesterday"}, "created_at is not an ISO date"),
    ({"items": [{"product": "Tea", "category": "grocery", "quantity": -1, "price": 10.0}]}, "not positive"),
    ({"items": [{"product": "Tea"}]}, "lacks product, category, quantity or price"),
])
def test_an_order_without_what_the_features_need_is_refused_with_the_reason(normal, broken, reason):
    schema = features.Schema.learn(normal)
    rows, bad = features.matrix([normal[0], {**normal[1], **broken}], schema)
    assert len(rows) == 1 and bad[0][0] == 1 and reason in bad[0][1]


def test_training_is_deterministic_and_the_threshold_meets_the_target_rate(normal):
    first = model.train(normal, epochs=3, seed=11, target_fpr=0.05)
    second = model.train(normal, epochs=3, seed=11, target_fpr=0.05)
    other = model.train(normal, epochs=3, seed=12, target_fpr=0.05)
    x, _ = features.matrix(normal, first.schema)
    assert np.array_equal(first.scores(x), second.scores(x)) and first.threshold == second.threshold
    assert not np.array_equal(first.scores(x), other.scores(x))
    assert first.info["metrics"]["held_out_fpr"] == pytest.approx(0.05, abs=0.02)


def test_the_artifact_round_trips_and_is_replaced_whole(normal, tmp_path):
    screen = model.train(normal, epochs=2, seed=1)
    where = screen.save(tmp_path / "vae")
    model.train(normal, epochs=2, seed=2).save(where)  # replaces, never merges
    loaded = model.Screen.load(where)
    assert sorted(p.name for p in where.iterdir()) == ["model.json", "model.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no temporary left behind
    assert loaded.info["training"]["seed"] == 2
    meta = json.loads((where / "model.json").read_text())
    assert meta["schema"]["version"] == features.SCHEMA_VERSION and meta["training"]["from"]


def test_a_model_of_another_schema_version_is_refused_with_what_to_do(normal, tmp_path):
    where = model.train(normal, epochs=1).save(tmp_path / "vae")
    meta = json.loads((where / "model.json").read_text())
    meta["schema"]["version"] = 99
    (where / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="retrain"):
        model.Screen.load(where)


def run(*args: str) -> tuple[int, list[dict]]:
    result = subprocess.run([sys.executable, "-m", "order_services.screening", *args],
                            capture_output=True, text=True)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_score_job_writes_a_line_per_order_and_says_why_one_was_not_scored(orders, tmp_path):
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(json.dumps(o) + "\n" for o in orders[:200]) + json.dumps({"order_id": "x"}) + "\n")
    assert run("train", "--data", str(data), "--model", str(tmp_path / "vae"), "--epochs", "2")[0] == 0
    code, events = run("score", "--data", str(data), "--model", str(tmp_path / "vae"), "--out", str(tmp_path / "s"))
    assert code == 0 and events[-1]["scored"] == 200 and events[-1]["unusable"] == 1
    lines = [json.loads(line) for line in (tmp_path / "s").read_text().splitlines()]
    assert len(lines) == 201 and lines[-1] == {"order_id": "x", "flagged": None, "error": "items is missing or empty"}


@pytest.mark.parametrize("content,message", [
    ("{nope\n", r"orders.jsonl:1: not JSON"),
    ("[1, 2]\n", r"expected an order object"),
    ("\n", r"holds no orders"),
])
def test_bad_files_are_refused_with_the_line_and_exit_2(tmp_path, content, message):
    data = tmp_path / "orders.jsonl"
    data.write_text(content)
    code, events = run("train", "--data", str(data), "--model", str(tmp_path / "vae"))
    assert code == 2 and events[-1]["event"] == "error" and re.search(message, events[-1]["message"])
    assert not (tmp_path / "vae").exists()


def test_evaluate_needs_labels(normal, tmp_path):
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in o.items() if k != "label"}) + "\n" for o in normal[:100]))
    code, events = run("evaluate", "--data", str(data), "--epochs", "1")
    assert code == 2 and "labelled" in events[-1]["message"]


def test_the_vae_beats_the_isolation_forest_on_the_generated_anomalies(tmp_path):
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(json.dumps(o) + "\n" for o in labelled(CATALOGUE, 6000, 0.05, seed=9)))
    code, events = run("evaluate", "--data", str(data), "--epochs", "10")
    overall = events[-1]["table"][0]
    assert code == 0 and overall["kind"] == "all"
    assert overall["vae"]["roc_auc"] > overall["isolation_forest"]["roc_auc"]
    assert overall["vae"]["pr_auc"] > overall["isolation_forest"]["pr_auc"]


def test_the_stream_refuses_a_model_of_another_version_and_says_to_retrain(normal, tmp_path):
    where = model.train(normal, epochs=1).save(tmp_path / "vae")
    meta = json.loads((where / "model.json").read_text())
    (where / "model.json").write_text(json.dumps({**meta, "artifact_version": 1}))
    settings = {"KAFKA_BOOTSTRAP": "127.0.0.1:9", "KAFKA_TOPIC": "orders-topic", "MODEL_DIR": str(where),
                "STATE_DIR": str(tmp_path), "MONGODB_URL": "mongodb://127.0.0.1:9", "MONGODB_DB": "ecommerce",
                "MONGODB_COLLECTION": "orders", "RABBITMQ_HOST": "127.0.0.1", "RABBITMQ_PORT": "9",
                "ORDER_EXCHANGE": "order-exchange", "METRICS_PORT": "9"}
    result = subprocess.run([sys.executable, "-m", "order_services.screening.stream"], env={**os.environ, **settings},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "configuration error: model artifact version 1" in result.stderr and "retrain it" in result.stderr


def test_torch_uses_the_threads_omp_num_threads_allows(monkeypatch):
    """The streaming job sets OMP_NUM_THREADS=1 (a Python worker per core already); a job
    alone takes up to 2."""
    from order_services.screening import model

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert model._torch().get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert model._torch().get_num_threads() == max(1, min(2, os.cpu_count() or 1))


def test_a_stop_waits_for_the_batch_in_hand_and_refuses_the_next_one():
    import threading

    from order_services.screening.stream import StopGate

    gate, finished, in_batch = StopGate(), threading.Event(), threading.Event()
    closed_after: list[bool] = []

    def batch():
        with gate.batch(1):
            in_batch.set()
            time.sleep(0.3)
            finished.set()

    worker = threading.Thread(target=batch)
    worker.start()
    in_batch.wait(5)
    closer = threading.Thread(target=lambda: (gate.close(), closed_after.append(finished.is_set())))
    closer.start()
    closer.join(5)
    worker.join(5)
    assert closed_after == [True]  # close() returned only once the batch in hand was done
    with pytest.raises(RuntimeError, match="left for the next start"):
        with gate.batch(2):
            pass


class _Builder:
    def __init__(self):
        self.conf = {}

    def config(self, key, value):
        self.conf[key] = value
        return self


class _Secrets:
    def __init__(self, data):
        self.data = data

    def read(self):
        return self.data


@pytest.mark.parametrize("master, expected", [
    ("local[*]", {}),
    ("spark://10.0.0.5:7077", {"spark.authenticate": "true", "spark.authenticate.secret": "s3cret"}),
    ("k8s://https://api:6443", {"spark.authenticate": "true"}),  # Spark makes one per application
])
def test_a_cluster_authenticates_the_job_with_the_secret_from_vault(master, expected):
    from order_services.screening.stream import authenticated

    assert authenticated(_Builder(), master, _Secrets({"spark_auth_secret": "s3cret"})).conf == expected


def test_a_standalone_cluster_without_the_secret_in_vault_says_what_to_run():
    from order_services.screening.stream import authenticated
    from order_services.settings import ConfigError

    with pytest.raises(ConfigError, match="cluster-conf"):
        authenticated(_Builder(), "spark://10.0.0.5:7077", _Secrets({}))
