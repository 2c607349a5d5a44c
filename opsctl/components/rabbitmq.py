"""RabbitMQ (Debian package) with its management and Prometheus plugins.

The Debian wrappers in /usr/sbin switch user and write under /var; opsctl calls the
real scripts in /usr/lib/rabbitmq/bin with every path pointed into the component folder.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from pathlib import Path

from opsctl import httpclient
from opsctl.components.base import Release, Server
from opsctl.errors import OpsError
from opsctl.files import write_atomic
from opsctl.net import port_open
from opsctl.host import require_binary

SCRIPTS = Path("/usr/lib/rabbitmq/bin")
NODE = "opsctl@localhost"


class RabbitMQ(Server):
    stop_timeout = 30.0  # the management plugin takes ~7 s to stop

    def check_installed(self) -> None:
        require_binary("epmd", "apt-get install -y rabbitmq-server")
        if not (SCRIPTS / "rabbitmq-server").exists():
            raise OpsError("RabbitMQ is not installed",
                           "install it with: apt-get install -y rabbitmq-server (or run scripts/setup)")

    @property
    def user_name(self) -> str:
        return "opsctl-admin"

    def release(self) -> Release:
        """On the kubernetes target: the official image with the management and Prometheus
        plugins on their platform.yaml ports, opsctl's admin user made on first boot with a
        password generated into the release's Secret (no guest), reachable only from the
        services whose credentials name RabbitMQ."""
        ports = {key: self.port(key) for key in ("amqp", "management", "prometheus")}
        return Release("data-service", {
            "image": self.spec.image, "ports": ports, "dataPath": "/var/lib/rabbitmq",
            "env": {"RABBITMQ_NODE_PORT": str(ports["amqp"]), "RABBITMQ_DEFAULT_USER": self.user_name,
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                        f"-rabbitmq_management tcp_config [{{port,{ports['management']}}}] "
                        f"-rabbitmq_prometheus tcp_config [{{port,{ports['prometheus']}}}] "
                        "-rabbitmq_prometheus return_per_object_metrics true"},
            "secretEnv": {"RABBITMQ_DEFAULT_PASS": "password"},
            "podSecurityContext": {"fsGroup": 999}, "allowFrom": self.users()},
            secrets=["password"])

    def credentials(self) -> tuple[str, str]:
        return self.user_name, self.ctx.secret("rabbitmq", "admin_password")

    def config_files(self) -> dict[str, str]:
        host = self.ctx.host
        user, password = self.credentials()
        return {
            "etc/rabbitmq.conf": "\n".join([
                f"listeners.tcp.default = {host}:{self.port('amqp')}",
                f"management.tcp.ip = {host}",
                f"management.tcp.port = {self.port('management')}",
                f"prometheus.tcp.ip = {host}",
                f"prometheus.tcp.port = {self.port('prometheus')}",
                # Per-queue depth and rates for Prometheus (the order queues' collector).
                "prometheus.return_per_object_metrics = true",
                # Created on first boot only; guest is never created, so no well-known login.
                f"default_user = {user}",
                f"default_pass = {password}",
                "default_user_tags.administrator = true",
                "default_permissions.configure = .*",
                "default_permissions.read = .*",
                "default_permissions.write = .*",
                "log.console = true",
                "log.console.level = info",
                "log.file = false",
                "",
            ]),
            "etc/enabled_plugins": "[rabbitmq_management,rabbitmq_prometheus].\n",
            "etc/rabbitmq-env.conf": "",
        }

    def env(self) -> dict[str, str]:
        etc, host = self.path("etc"), self.ctx.host
        ip_tuple = "{" + ",".join(host.split(".")) + "}"
        return {
            "HOME": str(self.path("home")),
            "RABBITMQ_CONF_ENV_FILE": f"{etc}/rabbitmq-env.conf",
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_IP_ADDRESS": host,
            "RABBITMQ_NODE_PORT": str(self.port("amqp")),
            "RABBITMQ_DIST_PORT": str(self.port("dist")),
            "ERL_EPMD_PORT": str(self.port("epmd")),
            "ERL_EPMD_ADDRESS": host,
            "RABBITMQ_CONFIG_FILE": f"{etc}/rabbitmq.conf",
            "RABBITMQ_CONFIG_FILES": f"{etc}/conf.d/*.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{etc}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{etc}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": str(self.path("data")),
            "RABBITMQ_LOG_BASE": str(self.path("logs")),
            "RABBITMQ_PID_FILE": str(self.path("data", "rabbit.pid")),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-kernel inet_dist_use_interface {ip_tuple}",
        }

    def initialise(self) -> None:
        cookie = self.path("home", ".erlang.cookie")
        if not cookie.exists():
            write_atomic(cookie, secrets.token_hex(20), mode=0o400)

    def companions(self) -> dict[str, list[str]]:
        # Our own epmd, so it stops with RabbitMQ instead of lingering as a daemon.
        return {"epmd": ["epmd", "-port", str(self.port("epmd")), "-address", self.ctx.host]}

    def argv(self) -> list[str]:
        return [str(SCRIPTS / "rabbitmq-server")]

    def api(self, path: str, method: str = "GET", body=None, timeout: float = 1):
        """The management API as opsctl's admin user (httpclient's errors)."""
        return httpclient.request(method, self.ctx.reach(self.name, "management").url(f"/api/{path}"), body,
                                  auth=self.credentials(), timeout=timeout)[2]

    def connection_parameters(self, **options):
        """pika's parameters for an admin connection to the broker."""
        import pika

        where = self.ctx.reach(self.name, "amqp")
        return pika.ConnectionParameters(host=where.host, port=where.port,
                                         credentials=pika.PlainCredentials(*self.credentials()),
                                         **options)

    def probe(self) -> bool:
        if not port_open(self.address("management")):
            return False
        try:
            self.api("overview")
            return True
        except (httpclient.HTTPError, OSError):
            return False

    def endpoint(self) -> str:
        return self.address("amqp").url(scheme="amqp")

    def version(self) -> str:
        return self.api("overview")["rabbitmq_version"]

    def health_detail(self) -> tuple[bool, str]:
        try:
            self.api("health/checks/alarms")
        except httpclient.HTTPError:
            return False, "resource alarm in effect"
        return True, f"management {self.address('management').url()}"

    # --- service users (see components/credentials.py) ----------------------------
    def permissions(self, service: str | None) -> dict[str, str]:
        """What a service may do on the vhost, as RabbitMQ's regular expressions: only what
        its code does. No service configures anything (the topology is opsctl's; passive
        declares need no permission). The order creator publishes to order-exchange; a
        consumer reads its queue, puts a retry copy back through the default exchange
        (`amq.default` to RabbitMQ's permissions) and publishes dead letters to orders-dlx;
        the screening job publishes held orders to order-exchange (routing key validation)."""
        names = self.ctx.spec.names
        wiring = self.ctx.spec.services.get(service) if service else None

        def only(*resources: str) -> str:
            return "^(" + "|".join(re.escape(r) for r in resources) + ")$"

        nothing = {"configure": "^$", "write": "^$", "read": "^$"}
        if wiring is None:
            return nothing
        writes = [getattr(names.exchanges, wiring.publishes)] if wiring.publishes else []
        if wiring.consumes:
            writes += ["amq.default", names.exchanges.dead_letter]
        return {**nothing, **({"write": only(*writes)} if writes else {}),
                **({"read": only(getattr(names.queues, wiring.consumes))} if wiring.consumes else {})}

    def service_user_ok(self, user: str, password: str, service: str | None = None) -> bool:
        """The user exists with this password (checked against its salted SHA-256 hash:
        service users have no management tag, so they cannot log in to the API) and holds
        exactly its service's permissions."""
        try:
            info = self.api(f"users/{user}")
            granted = self.api(f"permissions/%2F/{user}")
        except httpclient.HTTPError as e:
            if e.status == 404:
                return False
            raise
        raw = base64.b64decode(info.get("password_hash", ""))
        salt, digest = raw[:4], raw[4:]
        wanted = self.permissions(service)
        return info.get("hashing_algorithm") == "rabbit_password_hashing_sha256" and \
            hashlib.sha256(salt + password.encode()).digest() == digest and \
            {k: granted.get(k) for k in wanted} == wanted

    def ensure_service_user(self, user: str, password: str, service: str | None = None) -> None:
        self.api(f"users/{user}", "PUT", {"password": password, "tags": ""})
        self.api(f"permissions/%2F/{user}", "PUT", self.permissions(service))
