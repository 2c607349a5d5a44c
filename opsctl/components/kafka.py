"""Apache Kafka in KRaft mode (one combined broker + controller), jars from Maven Central."""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path

from opsctl.components.base import Release, Server
from opsctl.errors import OpsError
from opsctl.net import port_open
from opsctl import artifacts
from opsctl.host import require_binary

# Kafka 4 logs through slf4j 1.x: this binding routes it to log4j2 (and a file).
LOG_BINDING = "org.apache.logging.log4j:log4j-slf4j-impl:2.25.4"

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <RollingFile name="server" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
  </Loggers>
</Configuration>
"""


class Kafka(Server):
    ready_timeout = 90.0

    @property
    def libs(self) -> Path:
        return self.ctx.cache_dir / f"kafka-{self.spec.version}" / "libs"

    def check_installed(self) -> None:
        require_binary("java", "apt-get install -y openjdk-17-jre-headless")
        if not self.libs.exists() and not self.ctx.dry_run:
            artifacts.jars([f"{self.spec.artifact}:{self.spec.version}", LOG_BINDING], self.libs.parent)

    def _settings(self, log_dir: str, host: str, advertised: str) -> dict:
        """One KRaft node, broker and controller: listening on `host`, known as `advertised`."""
        broker, controller = self.port("broker"), self.port("controller")
        return {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.bootstrap.servers": f"{advertised}:{controller}",
            "listeners": f"PLAINTEXT://{host}:{broker},CONTROLLER://{host}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{advertised}:{broker},CONTROLLER://{advertised}:{controller}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": log_dir,
            "num.partitions": 1,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "false",
        }

    def _properties(self, log_dir: str) -> str:
        host = self.ctx.host
        return "".join(f"{k}={v}\n" for k, v in self._settings(str(self.path(log_dir)), host, host).items())

    def release(self) -> Release:
        """On the kubernetes target: the official image, the same KRaft settings as here (as
        the image's KAFKA_* variables), known by its Service's name; no authentication, as
        locally: its NetworkPolicy admits only the services that stream orders."""
        data = "/var/lib/kafka/data"
        advertised = self.ctx.address("kafka").host
        env = {"KAFKA_" + key.upper().replace(".", "_"): str(value)
               for key, value in self._settings(f"{data}/log", "0.0.0.0", advertised).items()}
        return Release("data-service", {
            "image": self.spec.image, "ports": {"broker": self.port("broker"), "controller": self.port("controller")},
            "dataPath": data, "env": env, "podSecurityContext": {"fsGroup": 1000},
            "allowFrom": sorted(n for n, s in self.ctx.spec.services.items() if s.streams)})

    def config_files(self) -> dict[str, str]:
        return {"config/server.properties": self._properties("data"), "config/log4j2.xml": LOG4J2}

    def _java(self, main: str, *args: str) -> list[str]:
        heap = self.spec.memory or "512m"
        return ["java", f"-Xmx{heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.path('config', 'log4j2.xml')}",
                f"-Dkafka.logs.dir={self.path('logs')}",
                "-cp", f"{self.libs}/*", main, *args]

    def initialise(self) -> None:
        """Format the KRaft storage once: into a scratch folder, renamed when complete."""
        data = self.path("data")
        if (data / "meta.properties").exists():
            return
        scratch = self.path("data.formatting")
        shutil.rmtree(scratch, ignore_errors=True)
        props = self.path("config", "format.properties")
        props.write_text(self._properties("data.formatting"))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        result = subprocess.run(
            # "--cluster-id=ID" in one piece: an id may start with "-", which argparse
            # would take for an option.
            self._java("kafka.tools.StorageTool", "format", "--config", str(props),
                       f"--cluster-id={cluster_id}", "--standalone"),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise OpsError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")
        shutil.rmtree(data, ignore_errors=True)
        scratch.rename(data)
        props.unlink()

    def argv(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.path("config", "server.properties")))

    def endpoint(self) -> str:
        return str(self.address("broker"))

    def probe(self) -> bool:
        if not port_open(self.address("broker")):
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.endpoint(), "log_level": 0})
        try:
            admin.list_topics(timeout=2)
        except Exception:
            return False
        return True

    def version(self) -> str:
        jar = next(self.libs.glob("kafka_2.13-*.jar"), None)
        return jar.stem.removeprefix("kafka_2.13-") if jar else ""
