"""The edge (nginx) in front of the order API and the stock service, on the real platform:
orders through it, slow and oversized clients cut off (raw sockets, timed), a stopped
service answered in JSON, a failed POST never sent twice, the keep-alive limits.

What a service receives from the edge is seen by a stand-in on the service's port of a
second working directory where only nginx runs."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid

import httpx
import pytest

from opsctl.components import build, nginx
from tests.integration.conftest import NAMES, Workdir, port_override, reachable_dir, workdir_context
from tests.integration.helpers import process_of, wait_for

pytestmark = pytest.mark.integration

ORDER = {"customer": {"id": "c-edge", "name": "Edge Client"}, "type": "regular",
         "items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]}


# --- the platform and its edge ------------------------------------------------------------


@pytest.fixture(scope="module")
def api(platform):
    """The order API and the stock service behind the edge, and a consumer that stores orders."""
    code, steps = platform.first_install
    assert code == 0, "; ".join(f"{name}: {step['detail']}" for name, step in steps.items()
                                if step["state"] == "failed")
    assert platform.run("queues", "apply").returncode == 0
    started = platform.run("services", "start", "stock-service", "order-creator", "regular-consumer")
    assert started.returncode == 0, started.stdout + started.stderr
    yield platform
    platform.run("services", "stop", "stock-service", "order-creator", "regular-consumer")


@pytest.fixture(scope="module")
def people(platform) -> dict[str, str]:
    result = platform.run("token", "-o", "json", check_json=True)
    assert result.returncode == 0, result.stderr
    return {"Authorization": f"Bearer {result.json['access_token']}"}


def edge(work: Workdir) -> str:
    return nginx.edge_url(workdir_context(work))


def edge_address(work: Workdir) -> tuple[str, int]:
    ctx = workdir_context(work)
    return ctx.host, ctx.spec.components["nginx"].ports["http"]


def access_log(work: Workdir, request_id: str) -> dict:
    """The edge's access-log entry of a request (the log is flushed every second)."""
    path = workdir_context(work).local_dir("nginx") / "logs" / "access.log"

    def entry():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["request_id"] == request_id:
                return record
        return None
    return wait_for(entry, 10, 0.2, what=f"request {request_id} in {path}")


# --- raw sockets for slow clients ----------------------------------------------------------


def drip(sock: socket.socket, data: bytes, every: float = 0.5, limit: float = 30) -> tuple[float, bytes]:
    """Send `data` one byte every `every` s (then nothing) until the server closes the
    connection; returns (seconds from the call until it did, what it answered)."""
    started, sent, answer = time.monotonic(), 0, b""
    while time.monotonic() - started < limit:
        try:
            if sent < len(data):
                sock.send(data[sent:sent + 1])
                sent += 1
            if select.select([sock], [], [], every)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:  # reset: the edge resets a timed-out connection
            break
    else:
        pytest.fail(f"the edge kept the connection open for {limit} s; answered {answer[:200]!r}")
    return time.monotonic() - started, answer


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def read_response(f) -> tuple[int, dict, bytes] | None:
    """One HTTP/1.1 response from a socket file; None when the connection was closed."""
    line = f.readline()
    if not line:
        return None
    headers = {}
    while (header := f.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(line.split()[1]), headers, f.read(int(headers.get("content-length", 0)))


# --- through the edge --------------------------------------------------------------------


def test_an_order_posted_to_the_edge_is_accepted_and_stored(api, people):
    from pymongo import MongoClient

    request_id = f"edge-{uuid.uuid4().hex[:12]}"
    answer = httpx.post(f"{edge(api)}/orders", json=ORDER, timeout=10,
                        headers={**people, "X-Request-ID": request_id})
    assert answer.status_code == 201, answer.text
    assert answer.headers["X-Request-ID"] == request_id
    order = answer.json()
    assert httpx.get(f"{edge(api)}/order/{order['order_id']}", headers=people).json() == order
    with MongoClient(f"mongodb://127.0.0.1:{api.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                     username="opsctl-admin", password=api.admin_secret("mongodb", "admin_password"),
                     authSource="admin") as mongo:
        stored = wait_for(lambda: mongo[NAMES.mongodb.database][NAMES.mongodb.orders].find_one({"_id": order["order_id"]}), 60,
                          what="the order in MongoDB")
    assert stored["total"] == 10.0
    # The edge passed it to its switch, which sent it to the live (blue) colour.
    logged = access_log(api, request_id)
    switch = workdir_context(api).address("nginx", "switch")
    assert (logged["status"], logged["upstream"], logged["upstream_status"]) == (201, str(switch), "201")
    assert answer.headers["X-Colour"] == "blue"


def test_the_edge_routes_stock_to_the_stock_service_and_keeps_internals_in(api, people):
    catalogue = workdir_context(api).spec.catalogue.products
    stock = httpx.get(f"{edge(api)}/stock/all-categories", headers=people, timeout=10)
    assert stock.status_code == 200, stock.text
    assert set(stock.json()["categories"]) >= set(catalogue)
    assert httpx.get(f"{edge(api)}/health").json() == {"status": "ok"}  # the API's, open
    hidden = httpx.get(f"{edge(api)}/metrics")  # scraped on the services' own ports only
    assert hidden.status_code == 404 and hidden.json()["detail"] == "not found"


# --- slow and oversized clients ------------------------------------------------------------


def test_a_client_sending_its_header_slowly_is_cut_off_at_the_header_timeout(platform):
    with socket.create_connection(edge_address(platform)) as sock:
        took, answer = drip(sock, b"POST /orders HTTP/1.1\r\nHost: edge\r\nX-Pad: " + b"a" * 100)
    assert nginx.HEADER_TIMEOUT - 0.5 <= took <= nginx.HEADER_TIMEOUT + 4, took
    assert status_of(answer) is None, answer  # nothing was passed on, nothing answered


def test_a_stalled_half_sent_body_is_given_up_within_the_body_timeout(api):
    # No token: had the edge passed the request on, the API would refuse it at once (401).
    head = (b"POST /orders HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000\r\n\r\n")
    with socket.create_connection(edge_address(api)) as sock:
        sock.sendall(head + b'{"customer": ' + b" " * 990)
        took, answer = drip(sock, b"")
    assert nginx.BODY_TIMEOUT - 0.5 <= took <= nginx.BODY_TIMEOUT + 4, took  # not 12 s and more
    assert status_of(answer) in (None, 408), answer


def test_a_1_mib_header_is_refused(platform):
    answer = b""
    with socket.create_connection(edge_address(platform)) as sock:
        sock.settimeout(10)
        request = b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        sender = threading.Thread(target=lambda: _send_quietly(sock, request), daemon=True)
        started = time.monotonic()
        sender.start()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert time.monotonic() - started < 5
    assert status_of(answer) == 431, answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"] == "request header too large"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the edge closed it after refusing: expected
        pass


def test_a_body_over_64_kib_is_refused_413_by_the_edge_itself(api, people):
    limit = nginx.MAX_BODY_KIB * 1024
    over, at = f"edge-over-{uuid.uuid4().hex[:8]}", f"edge-at-{uuid.uuid4().hex[:8]}"
    refused = httpx.post(f"{edge(api)}/orders", content=b"x" * (limit + 1), timeout=10,
                         headers={**people, "Content-Type": "application/json", "X-Request-ID": over})
    assert refused.status_code == 413
    assert refused.json()["detail"] == f"request body larger than {nginx.MAX_BODY_KIB} KiB"
    assert access_log(api, over)["upstream"] == ""  # the API never saw it
    # Exactly the limit passes the edge: the API has the same limit and judges the JSON.
    passed = httpx.post(f"{edge(api)}/orders", content=b"x" * limit, timeout=10,
                        headers={**people, "Content-Type": "application/json", "X-Request-ID": at})
    assert passed.status_code in (400, 422), passed.text
    assert access_log(api, at)["upstream"] != ""


def test_keep_alive_connections_end_after_their_request_limit(platform):
    with socket.create_connection(edge_address(platform)) as sock:
        sock.settimeout(10)
        f, answered, closing = sock.makefile("rb"), 0, None
        while closing != "close" and answered <= nginx.KEEPALIVE_REQUESTS:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
            response = read_response(f)
            if response is None:
                break
            answered += 1
            closing = response[1].get("connection")
        assert answered == nginx.KEEPALIVE_REQUESTS and closing == "close"
        try:  # and the edge closed its side after that answer
            rest = f.read(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b""


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(platform):
    with socket.create_connection(edge_address(platform)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert read_response(sock.makefile("rb"))[0] == 200
        took, answer = drip(sock, b"")
    assert nginx.KEEPALIVE_TIMEOUT - 0.5 <= took <= nginx.KEEPALIVE_TIMEOUT + 4, took
    assert answer == b""


def test_a_post_to_a_stopped_order_api_is_answered_in_json_with_retry_after(api, people):
    stopped = api.run("services", "stop", "order-creator")  # in both colours
    assert stopped.returncode == 0, stopped.stderr
    try:
        started = time.monotonic()
        answer = wait_for(lambda: (lambda a: a.status_code == 503 and a)(
            httpx.post(f"{edge(api)}/orders", json=ORDER, headers=people, timeout=10)),
            10, what="the mesh to see no order API left")  # its checks run every second
        assert time.monotonic() - started < 3
        assert answer.headers["content-type"] == "application/json"  # not the mesh's plain text
        assert "retry" in answer.json()["detail"] and answer.headers["Retry-After"] == "1"
    finally:
        again = api.run("services", "start", "order-creator")
        assert again.returncode == 0, again.stdout + again.stderr


# --- what a service gets from the edge: a stand-in on its port --------------------------------


class StandIn:
    """A service's stand-in on its port: records each request (when its first line came,
    method, path, headers, body); answers a GET with 200 and keeps the connection open;
    reads a POST and closes the connection without an answer, like a service that died
    in the middle of it."""

    def __init__(self, port: int):
        self.server = socket.create_server(("127.0.0.1", port))
        self.requests: list[dict] = []
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                arrived = time.monotonic()
                headers = {}
                while (header := f.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                method, path, version = line.decode().split()
                body = f.read(int(headers.get("content-length", 0)))
                self.requests.append({"method": method, "path": path, "version": version,
                                      "headers": headers, "body": body, "at": arrived})
                if method == "POST":
                    break
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                             b'Content-Length: 16\r\n\r\n{"status": "ok"}')
        except OSError:
            pass
        finally:
            f.close()
            conn.close()

    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        """Stop listening and close the connections the edge keeps open to this one."""
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        self.server.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def edge_alone():
    """A working directory where only nginx runs (ports free, services not started)."""
    work = Workdir(reachable_dir("opsctl-edge-"), port_override())
    code, steps = work.steps("--only", "nginx")
    assert code == 0 and steps["nginx"]["state"] == "changed", steps
    yield work
    work.remove()


@pytest.fixture
def stand_in(edge_alone):
    service = StandIn(workdir_context(edge_alone).address("mesh", "ingress/order-creator", "blue").port)
    yield service
    service.close()


def test_the_edge_starts_before_the_services_and_answers_503_json_meanwhile(edge_alone):
    answer = httpx.post(f"{edge(edge_alone)}/orders", json=ORDER, timeout=10)
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.headers["Retry-After"] == "1"
    body = answer.json()
    assert "retry" in body["detail"] and body["request_id"] == answer.headers["X-Request-ID"]


def test_a_post_that_failed_in_the_service_is_not_sent_again(edge_alone, stand_in):
    with httpx.Client(base_url=edge(edge_alone), timeout=10) as client:
        assert client.get("/health").status_code == 200  # the edge keeps that connection open
        answer = client.post("/orders", json=ORDER)
    assert answer.status_code == 503 and "retry" in answer.json()["detail"]
    time.sleep(1)  # room for a second try, if there were one
    assert len(stand_in.posts()) == 1


def test_the_service_gets_the_clients_address_and_request_id_on_a_kept_connection(edge_alone, stand_in):
    with httpx.Client(base_url=edge(edge_alone), timeout=10) as client:
        kept = client.get("/health", headers={"X-Forwarded-For": "203.0.113.9",
                                              "X-Request-ID": "client-id-1"})
        made = client.get("/order/1", headers={"X-Request-ID": "not a token; DROP"})
    assert kept.headers["X-Request-ID"] == "client-id-1"
    first, second = stand_in.requests
    assert first["headers"]["x-forwarded-for"] == "127.0.0.1"  # not what the client claimed
    assert first["headers"]["x-request-id"] == "client-id-1"
    generated = second["headers"]["x-request-id"]
    assert len(generated) == 32 and generated == made.headers["X-Request-ID"]
    assert first["version"] == "HTTP/1.1" and "connection" not in first["headers"]  # kept alive


def test_a_slow_body_is_held_at_the_edge_never_at_the_service(edge_alone, stand_in):
    body = json.dumps(ORDER).encode()[:8].ljust(8)
    head = f"POST /orders HTTP/1.1\r\nHost: edge\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(edge_address(edge_alone)) as sock:
        sock.sendall(head)
        for byte in body:  # 8 bytes, 0.4 s apart: under the body timeout between reads
            time.sleep(0.4)
            last_sent = time.monotonic()  # before the send: the edge may pass it on at once
            sock.send(bytes([byte]))
        sock.settimeout(10)
        assert status_of(sock.recv(65536)) == 503  # the stand-in closes on a POST
    (post,) = stand_in.posts()
    assert post["at"] >= last_sent and post["body"] == body  # it came whole, once it was all there


def test_a_moved_ingress_moves_the_switch_onto_the_new_port_without_a_restart(edge_alone):
    from opsctl.errors import UsageError
    from opsctl.spec import MESH_BLOCK
    from tests.integration.conftest import free_ports

    config = edge_alone.config
    while True:  # a free block that crosses no port the configuration already gives out
        config["mesh"]["ports_from"]["blue"] = free_ports(1, block=MESH_BLOCK)[0]
        edge_alone.write_config(config)
        try:
            ctx = workdir_context(edge_alone)
            break
        except UsageError:
            continue
    new_port = ctx.address("mesh", "ingress/order-creator", "blue").port
    edge_server = build("nginx", ctx)
    pids = process_of(edge_server).pid(), process_of(edge_server.switch).pid()
    code, steps = edge_alone.steps("--only", "nginx")
    assert code == 0 and steps["nginx"]["detail"].startswith("switch clusters updated"), steps
    assert (process_of(edge_server).pid(), process_of(edge_server.switch).pid()) == pids
    service = StandIn(new_port)
    try:
        wait_for(lambda: httpx.get(f"{edge(edge_alone)}/health", timeout=10).status_code == 200, 10,
                 what="the switch to send to the new port")
        assert [r["path"] for r in service.requests] == ["/health"]
    finally:
        service.close()
