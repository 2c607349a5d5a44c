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
