"""Spark on the local target: not a server but a library (pyspark, local mode) and the
Kafka source jars from Maven Central. The streaming job itself is the order-screening
service (`opsctl jobs stream start`); this step makes sure it can run."""

from __future__ import annotations

from pathlib import Path

from opsctl.components.base import Component, Context, Health, Outcome
from opsctl.errors import OpsError
from opsctl.targets.local import artifacts
from opsctl.targets.local.process import require_binary


def kafka_jars(ctx: Context) -> Path:
    spec = ctx.spec.components["spark"]
    return ctx.cache_dir / f"spark-kafka-{spec.version}" / "libs"


def model_dir(ctx: Context) -> Path:
    """Where `opsctl jobs train-vae` puts the model the streaming job loads."""
    return ctx.state_dir / "models" / "vae"


class Spark(Component):
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
        fresh = not kafka_jars(self.ctx).exists()
        if self.ctx.dry_run:
            return Outcome("planned" if fresh else "unchanged", "fetch the Kafka source jars" if fresh else "")
        self.check_installed()
        return Outcome("changed" if fresh else "unchanged", self._summary())

    def _summary(self) -> str:
        jars = len(list(kafka_jars(self.ctx).glob("*.jar")))
        return f"pyspark {self.spec.version}, local mode, Kafka source ({jars} jars)"

    def health(self) -> Health:
        """Reads only: a status never downloads."""
        try:
            self._check_runtime()
        except OpsError as e:
            return self._health("unhealthy", detail=e.message)
        if not kafka_jars(self.ctx).exists():
            return self._health("unhealthy", detail="the Kafka source jars are not fetched: run opsctl fetch")
        model = "model trained" if (model_dir(self.ctx) / "model.json").exists() else "no model yet"
        return self._health("healthy", version=self.spec.version, detail=f"{self._summary()}; {model}")


def job_jars(ctx: Context) -> list[Path]:
    """The Kafka source jars that pyspark does not already ship (its Scala, Hadoop and
    logging jars must not appear twice on the class path)."""
    import importlib.util
    import re

    def artifact(jar: Path) -> str:
        return re.sub(r"-\d[\w.]*\.jar$", "", jar.name)

    spec = importlib.util.find_spec("pyspark")
    bundled = {artifact(j) for j in Path(list(spec.submodule_search_locations)[0], "jars").glob("*.jar")} if spec else set()
    return sorted(j for j in kafka_jars(ctx).glob("*.jar") if artifact(j) not in bundled)
