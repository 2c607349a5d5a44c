"""opsctl bluegreen: which colour is live, and the switch of the edge from one to the other
behind a gate and under watch, like Argo Rollouts' blue-green strategy:

1. gate (changes nothing): every service of the target colour passing in Consul; a smoke order
   through the target's own ingress, answered 201 and found in its store; an analysis of the
   target under synthetic read-only traffic (error rate and p99 of what its ingress answered,
   from Prometheus, against the thresholds of platform.yaml `bluegreen`);
2. the switch: the live colour is written to both datacenters' KV, the switch behind the
   edge sends new requests to the target's ingress (those in flight finish on the old one;
   no connection is closed: edge_switch.py), and the workers move to the target (registered
   in its datacenter; restarted only when the target's build differs);
3. a watch of live traffic through the target for the same time: past a threshold, the edge
   goes back by itself and the command exits 1.
The old colour keeps running (its copy is the instant rollback). Ctrl-C during the gate
changes nothing; during the switch it lets the switch finish; during the watch it switches
back. The edge is always on one colour, and `bluegreen status` says which.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from dataclasses import dataclass

from opsctl import httpclient
from opsctl.app import Result, in_parallel
from opsctl.components import build, builds, live
from opsctl.components.mesh import INGRESS, agent, deregister, per_colour
from opsctl.components.edge_switch import COLOUR_HEADER, EdgeSwitch
from opsctl.components.nginx import edge_url
from opsctl.components.prometheus import INGRESS_JOB
from opsctl.components.services import BundledService, instances
from opsctl.context import Context
from opsctl.errors import FAILED, INTERRUPTED, UNHEALTHY, OpsError, UsageError

SCRAPE_WAIT = 2.5  # seconds: one scrape of the ingress (every 2 s) after a window ends
EDGE_TIMEOUT = 10.0  # seconds for the edge to answer from the new colour


def colours(ctx: Context, to: str | None = None) -> tuple[str, str]:
    """(the live colour, the one a switch `to` would make live)."""
    return live.colour(ctx), _colour(ctx, to)


def _colour(ctx: Context, colour: str | None) -> str:
    if colour is None:
        return live.idle(ctx)
    if colour not in ctx.spec.mesh.datacenters:
        raise UsageError(f"unknown colour {colour!r}", f"colours are: {', '.join(ctx.spec.mesh.datacenters)}")
    return colour


# --- status ---------------------------------------------------------------------------
def edge_colour(ctx: Context) -> str:
    """The colour the running edge sends clients to (its X-Colour), or why it is unknown."""
    try:
        headers = httpclient.request("GET", f"{edge_url(ctx)}/healthz", timeout=2)[1]
        return headers.get(COLOUR_HEADER) or "unknown"
    except (httpclient.HTTPError, OSError):
        return "not answering"


def source_version() -> str:
    """The build both colours run: the services' package and, in a checkout, its commit."""
    import importlib.metadata
    import importlib.util
    import subprocess
    from pathlib import Path

    version = importlib.metadata.version("order-services")
    found = importlib.util.find_spec("order_services")
    if found and found.origin:
        try:
            commit = subprocess.run(["git", "-C", str(Path(found.origin).parent), "describe", "--always",
                                     "--dirty"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            version += f" ({commit})"
    return version


def _mesh_view(ctx: Context, colour: str) -> dict[str, str]:
    """instance -> its health in the colour's datacenter (worst check), as Consul sees it."""
    worst: dict[str, str] = {}
    for check in agent(ctx, colour).api("GET", "health/state/any") or []:
        if check["ServiceID"]:
            seen = worst.get(check["ServiceID"], "passing")
            worst[check["ServiceID"]] = check["Status"] if seen == "passing" else seen
    return worst


def status(ctx: Context) -> Result:
    """The live colour and since when, where the edge sends clients, each colour's build and
    the health of its services, the last switches. Exit 3 if the edge is not on the live
    colour or a service of the live colour is not healthy."""
    if ctx.target == "kubernetes":
        return _way(ctx).status(ctx)
    record, working_tree = live.record(ctx), source_version()
    colours = []
    for colour, datacenter in ctx.spec.mesh.datacenters.items():
        built = builds.record(ctx, colour)
        version = f"{built['commit']} ({built['ref']})" if built else f"{working_tree} (as installed)"
        servers = [i for name in per_colour(ctx) for i in instances(ctx, name, colour=colour)]
        healths = in_parallel(servers, lambda s: s.health())
        colours.append({"colour": colour, "datacenter": datacenter, "live": colour == record["colour"],
                        "version": version, "healthy": all(h.health == "healthy" for h in healths),
                        "services": [{"service": h.component, "health": h.health, "detail": h.detail}
                                     for h in healths]})
    edge = edge_colour(ctx)
    live_ok = next(c for c in colours if c["live"])["healthy"]
    data = {"live": record["colour"], "since": record.get("since") or None, "edge": edge,
            "colours": colours, "history": record.get("history", [])}
    return Result(data, 0 if edge == record["colour"] and live_ok else UNHEALTHY)


# --- the gate -----------------------------------------------------------------------------
@dataclass
class Check:
    check: str
    ok: bool
    detail: str

    def row(self) -> dict:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


def _health_check(ctx: Context, colour: str) -> Check:
    wanted = [INGRESS] + [n for name in per_colour(ctx) for n in (name, f"{name}-sidecar-proxy")]
    try:
        seen = _mesh_view(ctx, colour)
    except (httpclient.HTTPError, OSError) as e:
        return Check("health", False, f"Consul {ctx.spec.mesh.datacenters[colour]} does not answer: {e}")
    bad = [f"{n} {seen.get(n, 'not registered')}" for n in wanted if seen.get(n) != "passing"]
    return Check("health", not bad, "; ".join(bad) or f"{len(wanted)} instances passing in Consul")


class People:
    """The people client's token (what a user of the order API holds)."""

    def __init__(self, ctx: Context):
        from opsctl.app.orders import TokenSource

        self.token = TokenSource(ctx)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token()}"}


def _ingress(ctx: Context, colour: str, service: str) -> str:
    return ctx.address("mesh", f"ingress/{service}", colour).url()


def _smoke(ctx: Context, colour: str, people: People) -> tuple[Check, str | None]:
    """A regular order through the colour's ingress: 201, then in its MongoDB collection."""
    order = {"customer": {"id": "opsctl-smoke", "name": "opsctl bluegreen smoke order"}, "type": "regular",
             "items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]}
    try:
        status, _, body = httpclient.request(
            "POST", f"{_ingress(ctx, colour, 'order-creator')}/orders", body=order, timeout=10,
            headers={**people.headers(), "Idempotency-Key": f"opsctl-smoke-{uuid.uuid4()}"})
    except httpclient.HTTPError as e:
        return Check("smoke order", False, f"the order API of {colour} answered {e.status}: {e.body[:200]}"), None
    except OSError as e:
        return Check("smoke order", False, f"the ingress of {colour} does not answer: {e}"), None
    order_id = body["order_id"]
    names = ctx.spec.names.mongodb
    deadline = time.monotonic() + ctx.spec.bluegreen.smoke_timeout
    with build("mongodb", ctx).client() as client:
        while client[names.database][names.orders].find_one({"_id": order_id}, {"_id": 1}) is None:
            if time.monotonic() > deadline:
                return Check("smoke order", False, f"order {order_id} was answered {status} but did not reach "
                                                   f"MongoDB within {ctx.spec.bluegreen.smoke_timeout:g} s"), None
            time.sleep(0.2)
    return Check("smoke order", True, f"order {order_id} answered {status} and stored"), order_id


# --- analysis -------------------------------------------------------------------------------
def _query(ctx: Context, expr: str) -> list[dict]:
    from urllib.parse import quote

    url = ctx.address("prometheus-grafana", "http").url(f"/api/v1/query?query={quote(expr)}")
    return httpclient.get(url, timeout=5)["data"]["result"]


def _snapshot(ctx: Context, colour: str) -> dict:
    """What the colour's ingress listeners (not its admin or readiness) answered so far:
    answers by class and the latency histogram (ms buckets), summed over listeners."""
    match = f'job="{INGRESS_JOB}",colour="{colour}",envoy_http_conn_manager_prefix=~"ingress_upstream_.+"'
    classes = {r["metric"]["envoy_response_code_class"]: float(r["value"][1]) for r in _query(
        ctx, f"sum by (envoy_response_code_class) (envoy_http_downstream_rq_xx{{{match}}})")}
    buckets = {float(r["metric"]["le"]): float(r["value"][1]) for r in _query(
        ctx, f"sum by (le) (envoy_http_downstream_rq_time_bucket{{{match}}})")}
    return {"classes": classes, "buckets": buckets}


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like PromQL's histogram_quantile over cumulative buckets (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9)
        lower, below = bound, buckets[bound]
    return lower


def _delta(after: dict, before: dict) -> tuple[float, float, float | None]:
    """(requests, 5xx, p99 ms) between two snapshots."""
    classes = {k: max(v - before["classes"].get(k, 0.0), 0.0) for k, v in after["classes"].items()}
    buckets = {k: max(v - before["buckets"].get(k, 0.0), 0.0) for k, v in after["buckets"].items()}
    return sum(classes.values()), classes.get("5", 0.0), _quantile(0.99, buckets)


SYNTHETIC_CLIENTS = 4  # the analysis rate comes from this many clients: one slow answer (a busy machine) does not hold it


def _synthetic(ctx: Context, colour: str, people: People, order_id: str | None, seconds: float,
               cancel: threading.Event) -> None:
    """Read-only traffic to the colour's ingress at analysis_rate: the smoke order and the
    stock catalogue, in turn. What it gets is counted by the ingress (the analysis reads it)."""
    import httpx

    paths = [f"{_ingress(ctx, colour, 'stock-service')}/stock/all-categories"]
    if order_id:
        paths.append(f"{_ingress(ctx, colour, 'order-creator')}/order/{order_id}")
    interval = SYNTHETIC_CLIENTS / ctx.spec.bluegreen.analysis_rate
    start = time.monotonic()

    def send(client_number: int) -> None:
        sent = 0
        with httpx.Client(timeout=5) as client:
            while time.monotonic() - start < seconds and not cancel.is_set():
                try:
                    client.get(paths[(sent + client_number) % len(paths)], headers=people.headers())
                except httpx.HTTPError:
                    pass  # a failure counted by the ingress, or (no answer at all) by nobody: see _analyse
                sent += 1
                time.sleep(max(0.0, start + (sent + client_number / SYNTHETIC_CLIENTS) * interval - time.monotonic()))

    in_parallel(list(range(SYNTHETIC_CLIENTS)), send)


def _analyse(ctx: Context, colour: str, name: str, seconds: float, traffic=None) -> Check:
    settings = ctx.spec.bluegreen
    try:
        before = _snapshot(ctx, colour)
        if traffic:
            traffic(seconds)
        else:
            pause(ctx, seconds)
        pause(ctx, SCRAPE_WAIT)
        requests, errors, p99 = _delta(_snapshot(ctx, colour), before)
    except (httpclient.HTTPError, OSError, KeyError, ValueError) as e:
        return Check(name, False, f"Prometheus could not be read: {e}")
    if requests < settings.min_requests:
        if traffic:  # synthetic traffic that did not arrive: the target does not answer
            return Check(name, False, f"only {requests:.0f} requests reached {colour}'s ingress in {seconds:g} s")
        return Check(name, True, f"inconclusive: {requests:.0f} live requests in {seconds:g} s "
                                 f"(fewer than {settings.min_requests})")
    rate = errors / requests
    shown = f"{requests:.0f} requests, {rate:.1%} 5xx, p99 {p99:.0f} ms" if p99 is not None else \
        f"{requests:.0f} requests, {rate:.1%} 5xx"
    failed = [f"5xx {rate:.1%} > {settings.max_error_rate:.1%}"] if rate > settings.max_error_rate else []
    if p99 is not None and p99 > settings.max_p99_ms:
        failed.append(f"p99 {p99:.0f} ms > {settings.max_p99_ms:g} ms")
    return Check(name, not failed, shown + (f": {'; '.join(failed)}" if failed else ""))


def pause(ctx: Context, seconds: float) -> None:
    ctx.cancel.wait(seconds)
    if ctx.cancel.is_set():
        raise KeyboardInterrupt


def gate(ctx: Context, colour: str, seconds: float) -> list[Check]:
    """The checks before a switch to `colour`, in order; the first that fails ends it."""
    checks = [_health_check(ctx, colour)]
    if not checks[-1].ok:
        return checks
    people = People(ctx)
    smoke, order_id = _smoke(ctx, colour, people)
    checks.append(smoke)
    if not smoke.ok:
        return checks
    traffic = lambda s: _synthetic(ctx, colour, people, order_id, s, ctx.cancel)  # noqa: E731
    checks.append(_analyse(ctx, colour, "pre-switch analysis", seconds, traffic))
    return checks


# --- the switch ------------------------------------------------------------------------------
@contextlib.contextmanager
def uninterruptible():
    """Ctrl-C waits until the block is done (the edge and the record move together)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_edge(ctx: Context, colour: str) -> None:
    deadline = time.monotonic() + EDGE_TIMEOUT
    while edge_colour(ctx) != colour:
        if time.monotonic() > deadline:
            raise OpsError(f"the edge did not answer from {colour} within {EDGE_TIMEOUT:g} s after the switch",
                           f"see the logs: {ctx.runtime.logfile(build('nginx', ctx))} and "
                           f"{ctx.runtime.logfile(EdgeSwitch(ctx))}")
        time.sleep(0.05)


def move(ctx: Context, to: str, reason: str) -> tuple[float, bool]:
    """Make `to` live: the record, the edge, then the workers (a worker whose description is
    the same on both colours stays up and only registers in `to`'s datacenter). (seconds
    until the edge answered from `to`, whether Ctrl-C was pressed meanwhile)."""
    from opsctl.components import keycloak_realm, vault

    old = live.colour(ctx)
    with uninterruptible() as pressed:
        started = time.monotonic()
        live.write(ctx, to, previous=old, reason=reason)
        EdgeSwitch(ctx).send_to(to)
        _wait_edge(ctx, to)
        took = time.monotonic() - started
        client = vault.admin(ctx)
        for name, service in ctx.spec.services.items():
            if service.per_colour or not ctx.runtime.running(BundledService(name, ctx, colour=old)):
                continue
            BundledService(name, ctx, keycloak_realm.client_secret(ctx, name, client), colour=to).reconcile()
            if old != to:
                deregister(ctx, name, old)
        return took, pressed()


def watch(ctx: Context, colour: str, seconds: float) -> Check:
    return _analyse(ctx, colour, "post-switch analysis", seconds)


def _way(ctx: Context):
    """The target's gate, move and watch: this module's on the local target."""
    if ctx.target == "kubernetes":
        from opsctl.app import bluegreen_kubernetes

        return bluegreen_kubernetes
    import sys

    return sys.modules[__name__]


def switch(ctx: Context, to: str | None = None, analysis_seconds: float | None = None) -> Result:
    way = _way(ctx)
    old = live.colour(ctx)
    target = _colour(ctx, to)
    if target == old:
        raise UsageError(f"{target} is live already", f"to switch to the other colour: --to {live.idle(ctx)}")
    seconds = analysis_seconds or ctx.spec.bluegreen.analysis_seconds
    data = {"from": old, "to": target, "switched": False, "rolled_back": False, "checks": []}
    started = time.monotonic()
    try:
        checks = way.gate(ctx, target, seconds)
    except KeyboardInterrupt:
        raise OpsError(f"interrupted during the gate: nothing changed, {old} is live", code=INTERRUPTED)
    data["checks"] = [c.row() for c in checks]
    data["gate_seconds"] = round(time.monotonic() - started, 2)
    failed = next((c for c in checks if not c.ok), None)
    if failed:
        data["failed"] = failed.check
        return Result(data, FAILED)
    took, pressed = way.move(ctx, target, f"switch from {old}")
    data.update(switched=True, switch_seconds=round(took, 3))
    try:
        if pressed:
            raise KeyboardInterrupt
        watched = way.watch(ctx, target, seconds)
    except KeyboardInterrupt:
        way.move(ctx, old, "interrupted during the post-switch analysis")
        raise OpsError(f"interrupted during the post-switch analysis: switched back, {old} is live",
                       code=INTERRUPTED)
    data["checks"].append(watched.row())
    if not watched.ok:
        way.move(ctx, old, f"rolled back: {watched.detail}")
        data.update(rolled_back=True, failed=watched.check)
        return Result(data, FAILED)
    return Result(data)


def deploy(ctx: Context, colour: str | None = None, ref: str | None = None, source: str | None = None,
           image: str | None = None) -> Result:
    """A build of the services (the working tree, or `ref`) into the idle colour (or `colour`,
    never the live one), and that colour's HTTP services restarted on it; on the kubernetes
    target, `image` on that colour's Deployments."""
    from pathlib import Path

    from opsctl.components import keycloak_realm, vault

    target, current = _colour(ctx, colour), live.colour(ctx)
    if target == current:
        raise UsageError(f"{target} is live: a deploy never touches the live colour",
                         f"deploy to {live.idle(ctx)}, then switch to it: opsctl bluegreen switch")
    if ctx.target == "kubernetes":
        if ref or source or not image:
            raise UsageError("on the kubernetes target a colour runs an image: --ref and --source build locally",
                             "pass --image REPOSITORY:TAG (built and pushed where the cluster pulls from)")
        return _way(ctx).deploy(ctx, target, image)
    if image:
        raise UsageError("--image is for the kubernetes target", "add --target kubernetes, or build with --ref/--source")
    built = builds.make(ctx, target, Path(source) if source else None, ref)
    client, rows, code = vault.admin(ctx), [], 0
    for name in per_colour(ctx):
        (instance,) = instances(ctx, name, keycloak_realm.client_secret(ctx, name, client), target)
        try:
            outcome = instance.reconcile()
            rows.append({"service": instance.name, "state": outcome.state, "detail": outcome.detail})
        except OpsError as e:
            code = FAILED
            rows.append({"service": instance.name, "state": "failed", "detail": e.message})
    return Result({"colour": target, "build": built, "services": rows}, code)


def rollback(ctx: Context, analysis_seconds: float | None = None) -> Result:
    """Back to the colour that was live before the last switch, through the same gate."""
    history = live.record(ctx).get("history", [])
    previous = history[0].get("previous") if history else None
    if not previous:
        raise UsageError("there is no switch to roll back", "see the switches: opsctl bluegreen status")
    return switch(ctx, previous, analysis_seconds)
