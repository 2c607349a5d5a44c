"""opsctl bluegreen on the kubernetes target: each HTTP service runs a blue and a green
Deployment behind one Service whose selector names the live colour (the order-service chart).

- gate: every HTTP service's Deployment of the target colour available on its current
  template, with as many ready pods behind that colour's own Service. (The local target's
  smoke order and Prometheus analysis need running containers and the Prometheus add-on:
  not on this target yet.)
- move: the live record (ConfigMap opsctl-live), then each service's release upgraded with
  the new live colour (helm: a revision in its history, --wait, rolled back on failure): the
  HTTP services at once, then the workers (restarted only if the target's image differs). A
  failed upgrade puts every release back on the old colour.
- watch: the target colour checked every second for the analysis time; the first time it is
  not available, the Services go back.
The old colour's Deployments keep running: a rollback is one selector away.
"""

from __future__ import annotations

import re
import time

from opsctl.app import Result, in_parallel
from opsctl.app.bluegreen import Check, pause, uninterruptible
from opsctl.components import live
from opsctl.components.mesh import per_colour
from opsctl.components.service_releases import deployed_images, image, releases
from opsctl.context import Context
from opsctl.errors import UNHEALTHY, OpsError, UsageError
from opsctl.spec import IMAGE_REFERENCE

POLL = 1.0  # seconds between two checks of the watch


def _healths(servers: list) -> list:
    return in_parallel(servers, lambda s: s.health())


def _available(servers: list, colour: str, name: str) -> Check:
    """`servers`: releases(ctx, colour), made once (the records they are made from are read then)."""
    healths = _healths(servers)
    bad = [f"{h.component}-{colour} {h.detail}" for h in healths if h.health != "healthy"]
    return Check(name, not bad, "; ".join(bad) or f"the {colour} Deployments of {len(healths)} services "
                                                  f"available, every pod behind its Service")


def status(ctx: Context) -> Result:
    """As the local target's: the Services' selectors stand for the edge."""
    record, images = live.record(ctx), deployed_images(ctx)
    colours = []
    for colour, datacenter in ctx.spec.mesh.datacenters.items():
        healths = _healths(releases(ctx, colour))
        deployed = images.get(colour)
        colours.append({"colour": colour, "datacenter": datacenter, "live": colour == record["colour"],
                        "version": f"{deployed['image']} (deployed)" if deployed else f"{image(ctx)} (as installed)",
                        "healthy": all(h.health == "healthy" for h in healths),
                        "services": [{"service": f"{h.component}-{colour}", "health": h.health, "detail": h.detail}
                                     for h in healths]})
    selected = {name: ctx.runtime.selected_colour(ctx.spec, name) for name in per_colour(ctx)}
    seen = set(selected.values())
    edge = (seen.pop() or "not installed") if len(seen) == 1 else \
        "split: " + ", ".join(f"{name} on {c or 'none'}" for name, c in selected.items())
    live_ok = next(c for c in colours if c["live"])["healthy"]
    data = {"live": record["colour"], "since": record.get("since") or None, "edge": edge,
            "colours": colours, "history": record.get("history", [])}
    return Result(data, 0 if edge == record["colour"] and live_ok else UNHEALTHY)


def gate(ctx: Context, colour: str, seconds: float) -> list[Check]:
    return [_available(releases(ctx, colour), colour, "health")]


def watch(ctx: Context, colour: str, seconds: float) -> Check:
    """The target colour, every POLL seconds for `seconds`: the first failure ends it."""
    deadline, checks, servers = time.monotonic() + seconds, 0, releases(ctx, colour)
    while True:
        check = _available(servers, colour, "post-switch watch")
        checks += 1
        left = deadline - time.monotonic()
        if not check.ok or left <= 0:
            return check if not check.ok else Check(check.check, True, f"{colour} stayed available for "
                                                                        f"{seconds:g} s ({checks} checks)")
        pause(ctx, min(POLL, left))


def _upgrade(ctx: Context, names: list[str]) -> dict:
    """The releases of `names` made again from the records (the live colour, the images), all
    at once: name -> its Outcome. An OpsError names every one that failed."""
    wanted = [r for r in releases(ctx) if r.name in names]
    done = dict(zip([r.name for r in wanted], in_parallel(wanted, _reconcile)))
    failed = [f"{name}: {e.message}" for name, e in done.items() if isinstance(e, OpsError)]
    if failed:
        raise OpsError("; ".join(failed), "see `helm history <service> -n "
                                          f"{ctx.spec.kubernetes.namespace('services')}` and that namespace's events")
    return done


def _reconcile(server):
    try:
        return server.reconcile()
    except OpsError as e:
        return e


def move(ctx: Context, to: str, reason: str) -> tuple[float, bool]:
    """Make `to` live: the record, the HTTP services' releases (their Services' selectors),
    then the workers'. (seconds until every Service selected `to`, whether Ctrl-C was pressed)."""
    old = live.colour(ctx)
    http = per_colour(ctx)
    workers = [n for n, s in ctx.spec.services.items() if n not in http]
    with uninterruptible() as pressed:
        started = time.monotonic()
        live.write(ctx, to, previous=old, reason=reason)
        try:
            _upgrade(ctx, http)
            took = time.monotonic() - started
            _upgrade(ctx, workers)
        except OpsError as e:
            if old != to:
                live.write(ctx, old, previous=to, reason=f"the switch to {to} failed")
                _upgrade(ctx, http + workers)
            raise OpsError(f"the switch to {to} failed, {old} is live again: {e.message}", e.hint) from None
        return took, pressed()


def deploy(ctx: Context, colour: str, new_image: str) -> Result:
    """`new_image` on `colour` (never the live one): the record of images, then the HTTP
    services' releases (helm --wait: the new pods ready); a failed upgrade puts the colour
    back on the image it had."""
    if not re.fullmatch(IMAGE_REFERENCE, new_image):
        raise UsageError(f"{new_image!r} is not an image reference with a tag or digest",
                         "name it as REPOSITORY:TAG or REPOSITORY@sha256:DIGEST, "
                         "e.g. registry.example.com/order-services:1.4.0")
    missing = [r.name for r in releases(ctx) if r.name in per_colour(ctx) and not ctx.runtime.running(r)]
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed on {ctx.runtime.where()}",
                         "install the services first: opsctl install --target kubernetes --only services")
    images = deployed_images(ctx)
    ctx.runtime.keep_record(ctx.spec, "images", {**images, colour: {"image": new_image, "since": time.time()}})
    names = per_colour(ctx)
    try:
        done = _upgrade(ctx, names)
    except OpsError as e:
        ctx.runtime.keep_record(ctx.spec, "images", images)
        _upgrade(ctx, names)
        raise OpsError(f"the deploy of {new_image} to {colour} failed, {colour} is back on its last image: "
                       f"{e.message}", e.hint) from None
    rows = [{"service": f"{name}-{colour}", "state": outcome.state, "detail": outcome.detail}
            for name, outcome in done.items()]
    return Result({"colour": colour, "build": {"image": new_image}, "services": rows})
