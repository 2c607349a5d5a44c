"""The exported collection, run by newman against in-process stand-ins.

A unit test of the collection's pre-request script: a tiny token endpoint (a stand-in
for Keycloak's, which the platform's integration tests use for real) and a tiny order
API, both on 127.0.0.1 in threads. Needs `npm ci --prefix scripts/newman`.
"""
from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from opsctl import postman

ROOT = Path(__file__).resolve().parents[2]
NEWMAN = ROOT / "scripts" / "newman" / "node_modules" / ".bin" / "newman"
CLIENT_ID = "order-api-client"
CLIENT_SECRET = "s3cr3t-" + secrets.token_hex(8)
TOKEN_PATH = "/realms/order-management-realm/protocol/openid-connect/token"

pytestmark = [
    pytest.mark.skipif(not (ROOT / "scripts" / "newman" / "node_modules").is_dir(),
                       reason="newman is not installed: run `npm ci --prefix scripts/newman`"),
    pytest.mark.timeout(120),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class FakeKeycloak(ThreadingHTTPServer):
    """Issues an opaque token for the right client credentials, 401 otherwise."""

    daemon_threads = True

    def __init__(self, expires_in: int = 300):
        self.expires_in = expires_in
        self.calls: list[dict] = []
        self.issued: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(_Handler):
            def do_POST(self):
                form = dict(urllib.parse.parse_qsl(self._body().decode()))
                with server.lock:
                    server.calls.append({"path": self.path, "form": form,
                                         "content_type": self.headers.get("Content-Type", "")})
                if self.path != TOKEN_PATH:
                    return self._send(404, {"error": "not found"})
                if form.get("grant_type") != "client_credentials":
                    return self._send(400, {"error": "unsupported_grant_type",
                                            "error_description": "Unsupported grant_type"})
                if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                    return self._send(401, {"error": "unauthorized_client",
                                            "error_description": "Invalid client or Invalid client credentials"})
                token = "opaque-" + secrets.token_urlsafe(16)
                with server.lock:
                    server.issued.add(token)
                self._send(200, {"access_token": token, "expires_in": server.expires_in,
                                 "token_type": "Bearer", "scope": "orders"})

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{TOKEN_PATH}"


class FakeOrderApi(ThreadingHTTPServer):
    """The collection's routes; all but /health need a bearer token the fake Keycloak issued."""

    daemon_threads = True

    def __init__(self, keycloak: FakeKeycloak):
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.orders: dict[str, dict] = {}
        server = self

        class Handler(_Handler):
            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                server.seen.append((self.command, self.path, auth))
                if self.path == "/health":
                    return True
                if auth and auth.startswith("Bearer ") and auth[7:] in keycloak.issued:
                    return True
                self._send(401, {"error": "invalid token"})
                return False

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/health":
                    return self._send(200, {"status": "ok"})
                if self.path == "/all-products-by-category":
                    return self._send(200, {"electronics": ["Wireless Mouse"],
                                            "stationery": ["Notebook A5"]})
                if self.path == "/stock/all-categories":
                    return self._send(200, {"categories": ["electronics", "stationery"]})
                if self.path.startswith("/order/"):
                    order = server.orders.get(self.path[len("/order/"):])
                    return self._send(200, order) if order else self._send(404, {"error": "no such order"})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self._body()
                if not self._authorized():
                    return
                try:
                    data = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"error": "not JSON"})
                if self.path == "/orders":
                    if not data.get("items") or "customer" not in data:
                        return self._send(422, {"error": "customer and items are required"})
                    order_id = secrets.token_hex(6)
                    server.orders[order_id] = dict(data, order_id=order_id)
                    return self._send(201, {"order_id": order_id, "status": "queued"})
                if self.path == "/create":
                    n = int(data.get("number_of_orders", 0))
                    return self._send(201, {"created": n})
                self._send(404, {"error": "not found"})

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _serve(server):
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return server


@pytest.fixture
def platform():
    started = []

    def start(expires_in: int = 300):
        kc = _serve(FakeKeycloak(expires_in))
        api = _serve(FakeOrderApi(kc))
        started.extend([kc, api])
        return kc, api

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


def run_newman(tmp_path: Path, kc: FakeKeycloak, api: FakeOrderApi, *,
               client_secret: str = CLIENT_SECRET, access_token: str = ""):
    coll = tmp_path / "coll.json"
    env = tmp_path / "env.json"
    out = tmp_path / "out.json"
    postman.write_collection(coll, postman.collection(api.url, kc.url, CLIENT_ID))
    postman.write_environment(env, postman.environment("test", api.url, kc.url, CLIENT_ID,
                                                       client_secret, access_token))
    proc = subprocess.run(
        [str(NEWMAN), "run", str(coll), "-e", str(env), "--reporters", "cli,json",
         "--reporter-json-export", str(out), "--color", "off", "--disable-unicode",
         "--timeout-request", "10000"],
        capture_output=True, text=True, timeout=90, cwd=tmp_path)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def _explain(proc) -> str:
    return f"newman exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_newman_is_runnable():
    assert shutil.which(str(NEWMAN)), NEWMAN
    proc = subprocess.run([str(NEWMAN), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(".")[0].isdigit()


def test_every_request_passes_and_the_token_is_fetched_once(tmp_path, platform):
    kc, api = platform()
    proc, report = run_newman(tmp_path, kc, api)
    assert proc.returncode == 0, _explain(proc)
    run = report["run"]
    assert run["failures"] == [], _explain(proc)
    stats = run["stats"]
    # newman's JSON report also lists the token request, under the item that made it.
    assert len({e["item"]["id"] for e in run["executions"]}) == 6
    # newman counts the pre-request script's token request too.
    assert stats["requests"]["total"] == 6 + 1 and stats["requests"]["failed"] == 0
    assert stats["assertions"]["total"] >= 6 and stats["assertions"]["failed"] == 0
    assert stats["prerequestScripts"]["failed"] == 0 and stats["testScripts"]["failed"] == 0
    codes = {e["item"]["name"]: e["response"]["code"] for e in run["executions"]}
    assert codes == {"Health": 200, "Place an order": 201, "Generate sample orders": 201,
                     "Get an order": 200, "All products by category": 200, "Stock categories": 200}
    for e in run["executions"]:
        assert all(not a.get("error") for a in e.get("assertions", [])), e["item"]["name"]

    # One client-credentials grant for the whole run, as a urlencoded form.
    assert len(kc.calls) == 1, kc.calls
    call = kc.calls[0]
    assert call["content_type"].startswith("application/x-www-form-urlencoded")
    assert call["form"] == {"grant_type": "client_credentials", "client_id": CLIENT_ID,
                            "client_secret": CLIENT_SECRET}
    # The same token on every authenticated request; none on the open health check.
    (token,) = kc.issued
    auths = {path: auth for _, path, auth in api.seen}
    assert auths["/health"] is None
    assert [a for m, p, a in api.seen if p != "/health"] == [f"Bearer {token}"] * 5
    # "Get an order" fetched the order that "Place an order" created.
    (order_id,) = api.orders
    assert ("GET", f"/order/{order_id}", f"Bearer {token}") in api.seen


def test_a_wrong_client_secret_fails_the_run_with_the_token_endpoint_status(tmp_path, platform):
    kc, api = platform()
    proc, report = run_newman(tmp_path, kc, api, client_secret="wrong-secret")
    assert proc.returncode == 1, _explain(proc)
    expected = (f"token request to {kc.url} failed: HTTP 401 Unauthorized: "
                "Invalid client or Invalid client credentials")
    assert expected in proc.stdout, _explain(proc)  # newman's CLI failure table
    run = report["run"]
    failures = [(f["source"]["name"], f["error"]["message"]) for f in run["failures"]]
    assert failures == [(name, expected) for name in
                        ("Place an order", "Generate sample orders", "Get an order",
                         "All products by category", "Stock categories")], _explain(proc)
    # Each authenticated request tried the grant once and was then skipped, not sent
    # without a token; the open health check still ran.
    assert len(kc.calls) == 5 and kc.issued == set()
    assert [(m, p) for m, p, _ in api.seen] == [("GET", "/health")]
    assert "wrong-secret" not in proc.stdout  # the secret is not echoed


def test_an_unreachable_token_endpoint_fails_the_run_clearly(tmp_path, platform):
    kc, api = platform()
    kc.shutdown()
    kc.server_close()  # nothing listens on its port now
    proc, report = run_newman(tmp_path, kc, api)
    assert proc.returncode == 1, _explain(proc)
    messages = {f["error"]["message"] for f in report["run"]["failures"]}
    assert f"token request to {kc.url} failed: connect ECONNREFUSED 127.0.0.1:{kc.server_address[1]}" \
        in messages, messages


def test_a_token_about_to_expire_is_fetched_again(tmp_path, platform):
    # expires_in below the 30 s margin: every authenticated request needs a fresh token.
    kc, api = platform(expires_in=20)
    proc, report = run_newman(tmp_path, kc, api)
    assert proc.returncode == 0, _explain(proc)
    assert len(kc.calls) == 5  # not for the open health check
    assert len({a for _, p, a in api.seen if p != "/health"}) == 5


def test_a_given_token_without_expiry_is_used_as_it_is(tmp_path, platform):
    kc, api = platform()
    kc.issued.add("given-by-hand")
    proc, report = run_newman(tmp_path, kc, api, access_token="given-by-hand")
    assert proc.returncode == 0, _explain(proc)
    assert kc.calls == []
    assert {a for _, p, a in api.seen if p != "/health"} == {"Bearer given-by-hand"}


def _jwt(exp: float) -> str:
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64({'exp': int(exp), 'sub': 'dev'})}.c2ln"


@pytest.mark.parametrize("exp_in, fetches", [(-60, 1), (+20, 1), (+3600, 0)])
def test_a_given_jwt_is_used_until_30s_before_its_exp(tmp_path, platform, exp_in, fetches):
    kc, api = platform()
    token = _jwt(time.time() + exp_in)
    kc.issued.add(token)
    proc, report = run_newman(tmp_path, kc, api, access_token=token)
    assert proc.returncode == 0, _explain(proc)
    assert len(kc.calls) == fetches
    used = {a for _, p, a in api.seen if p != "/health"}
    assert used == ({f"Bearer {token}"} if fetches == 0 else {f"Bearer {t}" for t in kc.issued - {token}})
