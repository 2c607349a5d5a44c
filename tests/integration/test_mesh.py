"""The Consul mesh on the local target: a real server agent per colour's datacenter, peered,
with ACLs that refuse anyone without a token."""

import stat

import httpx
import pytest

from tests.integration.conftest import workdir_context
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration


def consul(platform):
    from opsctl.components import build

    return build("consul", workdir_context(platform))


def test_each_colour_has_its_datacenter_and_they_are_peered(platform):
    result = platform.run("consul", "status", "-o", "json", check_json=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["colour"]: r for r in result.json["datacenters"]}
    assert {c: r["datacenter"] for c, r in rows.items()} == {"blue": "dc1", "green": "dc2"}
    for colour, row in rows.items():
        other = rows["green" if colour == "blue" else "blue"]["datacenter"]
        assert (row["health"], row["version"], row["peering"], row["peer"]) == ("healthy", "1.14.11", "ACTIVE", other)
    code, comps = platform.status()
    assert comps["consul"]["health"] == "healthy"
    assert comps["consul"]["detail"] == "peering dc1 ACTIVE, dc2 ACTIVE"


def test_consul_peer_does_nothing_when_peered_and_makes_a_lost_peering_again(platform):
    again = platform.run("consul", "peer")
    assert again.returncode == 0 and "already peered" in again.stderr, again.stdout + again.stderr
    green = consul(platform).agent("green")
    green.api("DELETE", "peering/dc1")  # green forgets blue: the peering is broken on both sides
    wait_for(lambda: platform.run("consul", "status").returncode == 3, timeout=30,
             what="status to see the broken peering")
    repaired = platform.run("consul", "peer", "-o", "json", check_json=True)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert repaired.json["changed"] == "peered dc1 and dc2"
    assert {r["peering"] for r in repaired.json["datacenters"]} == {"ACTIVE"}


def test_an_agent_refuses_callers_without_a_token_and_keeps_its_files_private(platform):
    agent = consul(platform).agent("blue")
    anonymous = httpx.get(f"{agent.endpoint()}/v1/agent/self", timeout=5)
    assert anonymous.status_code == 403, anonymous.text
    assert httpx.put(f"{agent.endpoint()}/v1/kv/live", content=b"green", timeout=5).status_code == 403
    assert agent.version() == "1.14.11"  # with the management token
    for path in (agent.path("agent.json"), agent.path("data")):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    from opsctl.components.consul import management_token

    token = management_token(workdir_context(platform))
    shown = platform.run("consul", "status", "-o", "json")
    assert token not in shown.stdout + shown.stderr


# --- the services in the mesh ------------------------------------------------------------

@pytest.fixture(scope="module")
def meshed(platform):
    """The platform with its services running in both colours (stopped afterwards)."""
    code, steps = platform.steps("--only", "services")
    assert code == 0, steps
    yield platform
    platform.run("services", "stop")


def people(platform) -> dict:
    token = platform.run("token", "-o", "json", check_json=True).json["access_token"]
    return {"Authorization": f"Bearer {token}"}


def ingress(platform, colour: str, service: str) -> str:
    return workdir_context(platform).address("mesh", f"ingress/{service}", colour).url()


def served(platform, server: str, path: str) -> int:
    """How many requests for `path` the service instance `server` logged."""
    log = workdir_context(platform).local_dir(server) / "logs" / f"{server}.log"
    return sum(f'"GET {path} ' in line for line in log.read_text(errors="replace").splitlines())


def test_each_colour_registers_its_services_with_health_checks_and_sidecars(meshed):
    result = meshed.run("consul", "status", "-o", "json", check_json=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(r["datacenter"], r["instance"]): r for r in result.json["services"]}
    for dc in ("dc1", "dc2"):
        for name in ("order-creator", "stock-service"):
            assert rows[(dc, name)]["health"] == "passing" and rows[(dc, name)]["checks"] == f"{name} /health"
            assert rows[(dc, f"{name}-sidecar-proxy")]["health"] == "passing"
        assert rows[(dc, "ingress-gateway")]["health"] == rows[(dc, "mesh-gateway")]["health"] == "passing"
    # The workers run once, on the live colour (blue): registered in its datacenter only.
    assert rows[("dc1", "regular-consumer")]["checks"] == "regular-consumer /metrics"
    assert ("dc2", "regular-consumer") not in rows
    code, comps = meshed.status()
    assert code == 0 and {"order-creator-green", "stock-service-green"} <= set(comps)


def test_the_order_api_reaches_the_stock_service_through_its_sidecar(meshed):
    from opsctl.components.services import environment

    ctx = workdir_context(meshed)
    upstream = ctx.address("mesh", "order-creator/upstream/stock-service", "green")
    assert environment(ctx, "order-creator", "x", "green")["STOCK_URL"] == upstream.url()
    # The stock service, reached through the sidecar's upstream: mTLS to the stock service's
    # sidecar, which lets the order creator in (the stock service itself then wants a token).
    assert httpx.get(upstream.url("/stock/all-categories"), timeout=10).status_code == 401
    order = {"customer": {"id": "mesh-1", "name": "Mesh"}, "type": "regular",
             "items": [{"product": "Laptop", "category": "electronics", "quantity": 1, "price": 420.0}]}
    for colour in ("blue", "green"):  # each colour's ingress takes orders
        answer = httpx.post(f"{ingress(meshed, colour, 'order-creator')}/orders", json=order,
                            headers=people(meshed), timeout=10)
        assert answer.status_code == 201, answer.text


def test_a_call_the_spec_does_not_allow_is_refused_by_the_mesh(meshed, monkeypatch):
    """An intruder in the mesh, with a valid identity and certificate of its own and an upstream
    to the stock service: the spec has no intention for it, so the stock service's sidecar
    refuses it; the order creator, which the spec lets call, gets through."""
    import subprocess

    from opsctl.components.consul import binary, management_token
    from opsctl.components.mesh import envoy_binary
    from tests.integration.conftest import cache_dir, free_ports

    monkeypatch.setenv("OPSCTL_CACHE_DIR", cache_dir())  # where the built consul is
    ctx = workdir_context(meshed)
    blue = consul(meshed).agent("blue")
    check = blue.api("GET", "connect/intentions/check?source=intruder&destination=stock-service")
    assert check == {"Allowed": False}
    assert blue.api("GET", "connect/intentions/check?source=order-creator&destination=stock-service") == {"Allowed": True}
    own, public, upstream, admin = free_ports(4)
    blue.api("PUT", "agent/service/register", {"ID": "intruder", "Name": "intruder", "Port": own, "Connect": {
        "SidecarService": {"Port": public, "Proxy": {"Upstreams": [
            {"DestinationName": "stock-service", "LocalBindPort": upstream}]}}}})
    envoy = subprocess.Popen(
        [str(binary(ctx)), "connect", "envoy", "-sidecar-for", "intruder", "-admin-bind", f"127.0.0.1:{admin}",
         "-token", management_token(ctx), "-http-addr", blue.endpoint(),
         "-grpc-addr", blue.address("grpc").url(), "-envoy-binary", envoy_binary(), "--", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def upstream_ready():
            try:
                return httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).text.strip() == "LIVE"
            except httpx.HTTPError:
                return False

        wait_for(upstream_ready, 30, interval=0.2, what="the intruder's sidecar")
        try:
            answer = httpx.get(f"http://127.0.0.1:{upstream}/stock/all-categories", timeout=10)
            refused = answer.status_code == 403 and "RBAC" in answer.text
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
            refused = True  # the connection reset: refused before any HTTP
        assert refused, (answer.status_code, answer.text)
        allowed = ctx.address("mesh", "order-creator/upstream/stock-service", "blue")
        assert httpx.get(allowed.url("/stock/all-categories"), timeout=10).status_code == 401
    finally:
        envoy.kill()
        envoy.wait()
        blue.api("PUT", "agent/service/deregister/intruder")


def test_a_sidecar_token_has_its_service_identity_only(meshed):
    from opsctl.components.mesh import proxy_token

    blue = consul(meshed).agent("blue")
    token = proxy_token(workdir_context(meshed), blue, "stock-service")
    headers = {"X-Consul-Token": token}
    assert httpx.get(f"{blue.endpoint()}/v1/kv/opsctl/live", headers=headers, timeout=5).status_code == 403
    assert httpx.put(f"{blue.endpoint()}/v1/config", headers=headers, timeout=5,
                     json={"Kind": "service-intentions", "Name": "stock-service",
                           "Sources": [{"Name": "*", "Action": "allow"}]}).status_code == 403
    for server in ("stock-service-blue-sidecar", "ingress-gateway-green"):
        path = workdir_context(meshed).local_dir(server) / "token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_green_fails_over_to_blue_when_its_stock_service_dies_and_comes_back(meshed):
    """Green's stock service stops (its sidecar stays): green's ingress takes it out at its
    first few gateway errors (retrying the reads meanwhile) and sends the stock routes to
    blue's stock service through the mesh gateways within a second, long before its check
    (every second) fails; when it starts again, traffic comes home."""
    import time

    from opsctl.components.services import BundledService

    ctx = workdir_context(meshed)
    url = f"{ingress(meshed, 'green', 'stock-service')}/stock/all-categories"
    headers = people(meshed)
    green = BundledService("stock-service", ctx, colour="green")
    assert httpx.get(url, headers=headers, timeout=10).status_code == 200
    before_blue = served(meshed, "stock-service-blue", "/stock/all-categories")
    ctx.runtime.stop(green)  # the service alone: its sidecar stays up and reports it gone
    stopped_at, failed = time.monotonic(), []
    with httpx.Client(timeout=5) as client:
        while time.monotonic() - stopped_at < 8:
            try:
                ok = client.get(url, headers=headers).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                failed.append(round(time.monotonic() - stopped_at, 2))
            time.sleep(0.02)
    print(f"failover: failed requests at {failed} s after the stop")
    assert served(meshed, "stock-service-blue", "/stock/all-categories") > before_blue + 50
    # Reads are retried through the failover: at most a request or two (a busy machine's
    # Envoy applies the ejection a moment late), and none a second after the stop.
    assert len(failed) <= 3 and all(at < 1.0 for at in failed), failed
    restarted = meshed.run("services", "start", "stock-service", "--colour", "green")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    before_green = served(meshed, "stock-service-green", "/stock/all-categories")
    wait_for(lambda: httpx.get(url, headers=headers, timeout=5).status_code == 200 and
             served(meshed, "stock-service-green", "/stock/all-categories") > before_green + 3,
             30, interval=0.2, what="traffic back on green's stock service")
