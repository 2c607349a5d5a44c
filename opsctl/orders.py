"""Orders as a client sends them: a generator of realistic orders, with labelled anomalies,
and an open-loop load generator against the order API, through the edge like any client
(opsctl orders simulate)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field

ANOMALY_KINDS = ("price_outlier", "quantity_spike", "category_mismatch", "customer_burst")
TYPES = ("priority", "regular", "digital")


class OrderGenerator:
    """Seeded orders from the catalogue; with probability `anomaly_rate`, one of
    ANOMALY_KINDS, returned as the label beside the order."""

    def __init__(self, catalogue: dict[str, dict[str, float]], anomaly_rate: float = 0.0,
                 seed: int | None = None, customers: int = 500):
        self.rng = random.Random(seed)
        self.products = [(c, p, price) for c, items in catalogue.items() for p, price in items.items()]
        self.anomaly_rate = anomaly_rate
        self.customers = customers
        self._burst: tuple[str, int] | None = None  # (customer, orders left in the burst)

    def _customer(self, index: int) -> dict:
        return {"id": f"c-{index:05d}", "name": f"Customer {index}",
                "email": f"customer{index}@example.org"}

    def next(self) -> tuple[dict, str]:
        rng = self.rng
        if self._burst:
            customer, left = self._burst
            self._burst = (customer, left - 1) if left > 1 else None
            return self._order(self._customer(int(customer)), rng), "customer_burst"
        kind = rng.choice(ANOMALY_KINDS) if rng.random() < self.anomaly_rate else "normal"
        customer = self._customer(rng.randrange(self.customers))
        order = self._order(customer, rng)
        item = order["items"][0]
        if kind == "price_outlier":
            item["price"] = round(item["price"] * rng.uniform(10, 50), 2)
        elif kind == "quantity_spike":
            item["quantity"] = rng.randint(200, 1000)
        elif kind == "category_mismatch":
            other = rng.choice([p for p in self.products if p[0] != item["category"]])
            item["category"] = other[0]  # a product sold under a category it does not belong to
        elif kind == "customer_burst":
            self._burst = (customer["id"][2:], rng.randint(10, 30))
        return order, kind

    def _order(self, customer: dict, rng: random.Random) -> dict:
        items = []
        for category, product, price in rng.sample(self.products, rng.randint(1, 3)):
            items.append({"product": product, "category": category,
                          "quantity": rng.randint(1, 5), "price": price})
        return {"customer": customer, "items": items, "type": rng.choice(TYPES)}


@dataclass
class LoadResult:
    planned: int
    sent: int = 0
    accepted: int = 0
    rejected: dict = field(default_factory=dict)  # status -> count
    errors: dict = field(default_factory=dict)  # error type -> count
    latencies: list = field(default_factory=list)  # seconds, of accepted requests
    elapsed: float = 0.0
    anomalies: dict = field(default_factory=dict)  # kind -> count sent

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        return {
            "planned": self.planned, "sent": self.sent, "accepted": self.accepted,
            "rejected": self.rejected, "errors": self.errors, "anomalies": self.anomalies,
            "elapsed_s": round(self.elapsed, 2),
            "rate_per_s": round(self.sent / self.elapsed, 1) if self.elapsed else 0.0,
            "latency_ms": {"p50": ms(self.percentile(0.50)), "p99": ms(self.percentile(0.99)),
                           "max": ms(max(self.latencies) if self.latencies else None),
                           "mean": ms(statistics.fmean(self.latencies) if self.latencies else None)},
        }


CONNECTIONS_PER_POOL = 16


async def run_load(url: str, token_source, generator: OrderGenerator, rate: float, duration: float,
                   concurrency: int = 256, on_tick=None) -> LoadResult:
    """Send rate × duration orders, one every 1/rate s (open loop: a slow answer does not
    slow the schedule, up to `concurrency` requests in flight), and count what came back."""
    import httpx

    result = LoadResult(planned=int(rate * duration))
    slots = asyncio.Semaphore(concurrency)
    # Several small pools: httpx looks over every connection of its pool on each request.
    pools = -(-concurrency // CONNECTIONS_PER_POOL)
    per_pool = -(-concurrency // pools)
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)

    async def send(client, body: dict) -> None:
        try:
            started = time.perf_counter()
            response = await client.post(url, json=body,
                                         headers={"Authorization": f"Bearer {token_source()}"})
            took = time.perf_counter() - started
            if response.status_code == 201:
                result.accepted += 1
                result.latencies.append(took)
            else:
                result.rejected[response.status_code] = result.rejected.get(response.status_code, 0) + 1
        except httpx.HTTPError as e:
            result.errors[type(e).__name__] = result.errors.get(type(e).__name__, 0) + 1
        finally:
            slots.release()

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(timeout=10, limits=limits))
                   for _ in range(pools)]
        started = time.perf_counter()
        tasks, next_tick = [], started
        for i in range(result.planned):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            body, kind = generator.next()
            if kind != "normal":
                result.anomalies[kind] = result.anomalies.get(kind, 0) + 1
            result.sent += 1
            tasks.append(asyncio.create_task(send(clients[i % pools], body)))
            if on_tick and time.perf_counter() >= next_tick:
                result.elapsed = time.perf_counter() - started
                on_tick(result)
                next_tick += 0.5
        await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - started
    return result


BLOCK = 500  # orders of one stretch of traffic in a generated file


def labelled(catalogue: dict[str, dict[str, float]], count: int, anomaly_rate: float, seed: int,
             rate: float = 20.0, start: float = 1_767_225_600.0) -> list[dict]:
    """`count` orders as the API would store them (order_id, total, created_at at about
    `rate` per second), each with its `label`: "normal" or an anomaly kind. Every
    BLOCK orders the clock moves on to a random hour of the next day, so that a file
    covers the hours of the day as real traffic does."""
    import datetime as dt
    import uuid

    generator = OrderGenerator(catalogue, anomaly_rate, seed)
    rng = random.Random(seed + 1)
    orders, clock = [], start
    for index in range(count):
        order, label = generator.next()
        if index % BLOCK == 0:
            day = index // BLOCK + 1
            clock = start + day * 86400 + rng.uniform(0, 86400)
        clock += rng.expovariate(rate)
        order.update(order_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                     total=round(sum(i["quantity"] * i["price"] for i in order["items"]), 2),
                     created_at=dt.datetime.fromtimestamp(clock, dt.timezone.utc).isoformat(),
                     label=label)
        orders.append(order)
    return orders
