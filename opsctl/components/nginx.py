"""nginx (Debian package): the edge, and later the blue/green traffic switch."""

from __future__ import annotations

from opsctl import httpclient
from opsctl.components.base import LocalServer
from opsctl.targets.local.process import require_binary


class Nginx(LocalServer):
    def check_installed(self) -> None:
        require_binary("nginx", "apt-get install -y nginx-light")

    def config_files(self) -> dict[str, str]:
        home = self.home
        temp = "\n".join(f"  {kind}_temp_path {home}/tmp/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return {"nginx.conf": f"""worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log {home}/logs/access.log;
{temp}
  server {{
    listen {self.ctx.host}:{self.port('http')};
    location = /healthz {{ default_type text/plain; return 200 "ok\\n"; }}
    location / {{ return 404; }}
  }}
}}
"""}

    def initialise(self) -> None:
        self.path("tmp").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return ["nginx", "-p", f"{self.home}/", "-e", str(self.path("logs", "error.log")),
                "-c", str(self.path("nginx.conf")), "-g", "daemon off;"]

    def _healthz(self) -> str:
        return f"http://{self.endpoint()}/healthz"

    def probe(self) -> bool:
        return httpclient.answers(self._healthz(), timeout=1)

    def version(self) -> str:
        server = httpclient.request("GET", self._healthz(), timeout=1)[1].get("Server", "")
        return server.removeprefix("nginx/")
