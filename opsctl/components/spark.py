"""Spark on the local target: not a server but a library (pyspark, local mode) and the
Kafka source jars from Maven Central. The streaming job itself is the order-screening
service (`opsctl jobs stream start`); this step makes sure it can run.

The job's driver is always that local service; with `opsctl jobs stream start --master
spark://…` (or k8s://…) its executors run on a Spark cluster instead of in local mode
(client mode), and the job ships the model to them itself. The master and the extra Spark
properties are kept in the service's folder, so that a restart opsctl makes on its own
(`jobs train-vae`, `services start`) keeps the job where it was started.

On the kubernetes target the step is a release (SparkJobRelease), and `jobs stream start
--target kubernetes` submits the job to that cluster in cluster mode (app/jobs_kubernetes.py)."""

from __future__ import annotations

import re
from pathlib import Path

from opsctl.components.base import Component, Health, Outcome, Release, Server
from opsctl.context import Context
from opsctl.errors import OpsError, UsageError
from opsctl.files import read_json, write_json_atomic
from opsctl import artifacts
from opsctl.host import require_binary


def kafka_jars(ctx: Context) -> Path:
    spec = ctx.spec.components["spark"]
    return ctx.cache_dir / f"spark-kafka-{spec.version}" / "libs"


def model_dir(ctx: Context) -> Path:
    """Where `opsctl jobs train-vae` puts the model the streaming job loads."""
    return ctx.state_dir / "models" / "vae"


def has_model(ctx: Context) -> bool:
    return (model_dir(ctx) / "model.json").exists()


def driver_pod(ctx: Context) -> str:
    """The streaming job's driver pod on the kubernetes target (one at a time)."""
    return f"{ctx.spec.stream_job}-driver"


class SparkJobRelease(Server):
    """On the kubernetes target, step spark is the release `spark` of the spark-job chart:
    the driver's ServiceAccount, the Role to run its executors, and the job's credentials
    Secret. `opsctl jobs stream start --target kubernetes` submits the job itself."""

    def __init__(self, ctx: Context):
        super().__init__("spark", ctx)

    def endpoint(self) -> str:
        return ""

    def release(self) -> Release:
        return Release("spark-job", {"job": self.ctx.spec.stream_job}, secrets=["client-secret"])


class Spark(Component):
    on_kubernetes = True  # there: SparkJobRelease

    def servers(self) -> list[Server]:
        return [SparkJobRelease(self.ctx)] if self.ctx.target == "kubernetes" else []

    def stop(self) -> bool:
        """On kubernetes: the job's driver (its executors go with it), then the release."""
        if not self.servers():
            return False
        driver = self.ctx.runtime.cluster_exists() and self.ctx.runtime.delete_pod(
            self.ctx.spec.kubernetes.namespace(self.name), driver_pod(self.ctx))
        return super().stop() or bool(driver)

    def _pyspark_version(self) -> str | None:
        from importlib import metadata

        try:
            return metadata.version("pyspark")
        except metadata.PackageNotFoundError:
            return None

    def _check_runtime(self) -> None:
        require_binary("java", "apt-get install -y openjdk-17-jre-headless")
        found, wanted = self._pyspark_version(), self.spec.version
        if found != wanted:
            raise OpsError(f"pyspark {wanted} is needed (the Kafka source jars are {wanted}), "
                           f"found {found or 'none'}",
                           "run scripts/setup (installs the services with their screening extra)")

    def check_installed(self) -> None:
        """The runtime is there; the Kafka source jars are fetched if they are not."""
        self._check_runtime()
        if not kafka_jars(self.ctx).exists() and not self.ctx.dry_run:
            artifacts.jars([f"{self.spec.artifact}:{self.spec.version}"], kafka_jars(self.ctx).parent)

    def reconcile(self) -> Outcome:
        if self.servers():
            return self.servers()[0].reconcile()
        fresh = not kafka_jars(self.ctx).exists()
        if self.ctx.dry_run:
            return Outcome("planned" if fresh else "unchanged", "fetch the Kafka source jars" if fresh else "")
        self.check_installed()
        return Outcome("changed" if fresh else "unchanged", self._summary())

    def _summary(self) -> str:
        jars = len(list(kafka_jars(self.ctx).glob("*.jar")))
        master = stream_placement(self.ctx)["master"]
        where = "local mode" if master.startswith("local") else f"the job's executors on {master}"
        return f"pyspark {self.spec.version}, {where}, Kafka source ({jars} jars)"

    def health(self) -> Health:
        """Reads only: a status never downloads."""
        if self.servers():
            return self.servers()[0].health()
        try:
            self._check_runtime()
        except OpsError as e:
            return self._health("unhealthy", detail=e.message)
        if not kafka_jars(self.ctx).exists():
            return self._health("unhealthy", detail="the Kafka source jars are not fetched: run opsctl fetch")
        model = "model trained" if has_model(self.ctx) else "no model yet"
        return self._health("healthy", version=self.spec.version, detail=f"{self._summary()}; {model}")


def job_jars(ctx: Context) -> list[Path]:
    """The Kafka source jars that pyspark does not already ship (its Scala, Hadoop and
    logging jars must not appear twice on the class path)."""
    import importlib.util

    def artifact(jar: Path) -> str:
        return re.sub(r"-\d[\w.]*\.jar$", "", jar.name)

    spec = importlib.util.find_spec("pyspark")
    bundled = {artifact(j) for j in Path(list(spec.submodule_search_locations)[0], "jars").glob("*.jar")} if spec else set()
    return sorted(j for j in kafka_jars(ctx).glob("*.jar") if artifact(j) not in bundled)


# --- where the streaming job runs ------------------------------------------------------
LOCAL_MASTER = "local[*]"
MASTER_FORMS = "local[*] (or local, local[N]), spark://HOST:PORT[,HOST:PORT…] or k8s://[https://]HOST[:PORT]"
_MASTER = re.compile(r"local(\[(\d+|\*)(,\d+)?\])?"
                     r"|spark://[\w.-]+:\d+(,[\w.-]+:\d+)*"
                     r"|k8s://(https?://)?[\w.-]+(:\d+)?/?")
# Set by opsctl itself: the master has its own option, the jars are the Kafka source's.
_OWN_CONF = {"spark.master": "give the master with --master", "spark.submit.deployMode":
             "the driver is the local order-screening service (client mode)",
             "spark.jars": "opsctl passes the Kafka source jars (SPARK_JARS)"}


def check_master(master: str) -> str:
    """A Spark master URL the job can use, or a UsageError that lists the forms."""
    if not _MASTER.fullmatch(master.strip()):
        raise UsageError(f"{master!r} is not a Spark master URL the streaming job can use",
                         f"give one of: {MASTER_FORMS}")
    return master.strip()


def check_conf(items: list[str]) -> dict[str, str]:
    """--conf KEY=VALUE items as a dict; the keys must be Spark properties (spark.*)."""
    conf: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("spark.") or not value:
            raise UsageError(f"--conf {item!r}: expected KEY=VALUE with a Spark property as KEY",
                             "e.g. --conf spark.driver.host=10.0.0.5 --conf spark.executor.memory=2g")
        if key in _OWN_CONF:
            raise UsageError(f"--conf {key}: not settable here", _OWN_CONF[key])
        conf[key] = value
    return conf


def check_reachable(master: str) -> None:
    """A spark:// master answers on its port (one of them, for a standby set); other kinds
    are left to Spark."""
    from opsctl.net import Address, port_open

    if not master.startswith("spark://"):
        return
    addresses = [a.rpartition(":") for a in master[len("spark://"):].split(",")]
    if not any(port_open(Address(host, int(port)), timeout=3) for host, _, port in addresses):
        raise OpsError(f"no Spark master answers at {master}",
                       "start the cluster's master, or check the URL (the master's web UI shows it)")


def _placement_file(ctx: Context) -> Path:
    return ctx.local_dir(ctx.spec.stream_job) / "spark.json"


def stream_placement(ctx: Context) -> dict:
    """Where the streaming job runs: {"master": URL, "conf": {property: value}}, as the last
    `opsctl jobs stream start` asked (local mode until one asks otherwise)."""
    found = read_json(_placement_file(ctx), None) or {}
    return {"master": found.get("master") or LOCAL_MASTER, "conf": dict(found.get("conf") or {})}


def set_stream_placement(ctx: Context, master: str, conf: dict[str, str]) -> None:
    write_json_atomic(_placement_file(ctx), {"master": master, "conf": conf}, mode=0o600)


def driver_env(ctx: Context) -> dict[str, str]:
    """The Spark part of the streaming job's environment: master, jars, extra properties."""
    import shlex

    placement = stream_placement(ctx)
    env = {"SPARK_MASTER": placement["master"], "SPARK_JARS": ",".join(str(j) for j in job_jars(ctx))}
    if placement["master"].startswith("local"):
        # Nothing outside this machine talks to a local-mode driver: Spark takes its host,
        # and so spark.driver.bindAddress (RPC, block manager), from SPARK_LOCAL_IP.
        env["SPARK_LOCAL_IP"] = ctx.host
    if "spark.pyspark.python" in placement["conf"]:  # the executors' Python: pyspark reads it from here
        env["PYSPARK_PYTHON"] = placement["conf"]["spark.pyspark.python"]
    if placement["conf"]:  # read by pyspark when it starts the driver's JVM
        env["PYSPARK_SUBMIT_ARGS"] = " ".join(
            [*(f"--conf {shlex.quote(f'{k}={v}')}" for k, v in sorted(placement["conf"].items())), "pyspark-shell"])
    return env
