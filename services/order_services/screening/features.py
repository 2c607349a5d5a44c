"""Features of an order for the anomaly model, and their versioned schema.

An order is the document of docs/ORDER_FLOW.md (`created_at` an ISO string or a datetime).
The features that need more than the order itself come from two places: reference
statistics learned from the training orders (each product's usual price, how often a
product is sold under each category), kept in the schema; and the customer's recent
orders (`history`), which the caller supplies: the whole file offline, the store online.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

SCHEMA_VERSION = 1
BURST_WINDOW_S = 60.0  # "recent": orders of the same customer in the minute before


class BadOrder(ValueError):
    """An order the features cannot be computed from; the message says what is wrong."""


@dataclass
class Schema:
    """What a feature vector means; saved with the model so scoring computes the same."""

    categories: list[str]
    usual_price: dict[str, float]  # product → median unit price in the training orders
    pair_share: dict[str, float]  # "category/product" → share of the product's sales under it
    version: int = SCHEMA_VERSION
    burst_window_s: float = BURST_WINDOW_S
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = ["log_total", "log_quantity", "items", "max_log_price_ratio", "min_log_price_ratio",
                      "max_log_item_quantity", "min_log_pair_share", "hour_sin", "hour_cos",
                      "log_customer_recent_orders", *(f"share_{c}" for c in self.categories)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Schema":
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(f"feature schema version {data.get('version')} is not {SCHEMA_VERSION}: "
                             "retrain the model (opsctl jobs train-vae)")
        return cls(categories=data["categories"], usual_price=data["usual_price"],
                   pair_share=data["pair_share"], burst_window_s=data["burst_window_s"])

    @classmethod
    def learn(cls, orders: Iterable[dict]) -> "Schema":
        prices: dict[str, list[float]] = defaultdict(list)
        pairs: Counter = Counter()
        for order in orders:
            try:
                items = _items(order)
            except BadOrder:
                continue  # counted as unusable by matrix()
            for item in items:
                prices[item["product"]].append(float(item["price"]))
                pairs[(item["category"], item["product"])] += 1
        if not prices:
            raise BadOrder("no orders to learn the feature schema from")
        by_product = Counter()
        for (_, product), n in pairs.items():
            by_product[product] += n
        return cls(categories=sorted({c for c, _ in pairs}),
                   usual_price={p: float(np.median(v)) for p, v in prices.items()},
                   pair_share={f"{c}/{p}": n / by_product[p] for (c, p), n in pairs.items()})


def created_at(order: dict) -> float:
    value = order.get("created_at")
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadOrder(f"created_at is not an ISO date: {value!r}") from None
    else:
        raise BadOrder("created_at is missing")
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def created_at_or_none(order: dict) -> float | None:
    try:
        return created_at(order)
    except BadOrder:
        return None


def _items(order: dict) -> list[dict]:
    items = order.get("items") if isinstance(order, dict) else None
    if not isinstance(items, list) or not items:
        raise BadOrder("items is missing or empty")
    for item in items:
        if not isinstance(item, dict) or not {"product", "category", "quantity", "price"} <= item.keys():
            raise BadOrder("an item lacks product, category, quantity or price")
        try:
            price, quantity = float(item["price"]), float(item["quantity"])
        except (TypeError, ValueError):
            raise BadOrder("an item's price or quantity is not a number") from None
        if price <= 0 or quantity <= 0:
            raise BadOrder("an item has a price or quantity that is not positive")
    return items


def _customer(order: dict) -> str:
    customer = order.get("customer")
    if not isinstance(customer, dict) or not customer.get("id"):
        raise BadOrder("customer.id is missing")
    return str(customer["id"])


class CustomerClock:
    """When each customer ordered: counts a customer's orders in the window before a time."""

    def __init__(self, orders: Iterable[dict] = ()):
        self._times: dict[str, list[float]] = defaultdict(list)
        self._seen: set = set()
        self.add(orders)

    @classmethod
    def from_times(cls, times: dict[str, list[float]]) -> "CustomerClock":
        """A clock from customer → created_at timestamps (the streaming job reads them from the store)."""
        clock = cls()
        clock._times.update({customer: sorted(stamps) for customer, stamps in times.items()})
        return clock

    def add(self, orders: Iterable[dict]) -> None:
        for order in orders:
            key = order.get("order_id") or order.get("_id") or id(order)
            if key in self._seen:
                continue
            self._seen.add(key)
            try:
                bisect.insort(self._times[_customer(order)], created_at(order))
            except BadOrder:
                continue  # scored (and refused) on its own; it just does not count here

    def recent(self, customer: str, at: float, window: float) -> int:
        """Orders of `customer` in (at - window, at): the order at `at` itself excluded."""
        times = self._times.get(customer, [])
        return bisect.bisect_left(times, at) - bisect.bisect_right(times, at - window)


def vector(order: dict, schema: Schema, clock: CustomerClock) -> list[float]:
    """The feature vector of one order (raises BadOrder saying what is wrong)."""
    items = _items(order)
    customer, when = _customer(order), created_at(order)
    quantities = [float(i["quantity"]) for i in items]
    total = sum(float(i["price"]) * q for i, q in zip(items, quantities))
    ratios = [math.log(float(i["price"]) / schema.usual_price.get(i["product"], float(i["price"])))
              for i in items]
    shares = [schema.pair_share.get(f"{i['category']}/{i['product']}", 0.0) for i in items]
    hour = (when % 86400) / 3600
    by_category = Counter(i["category"] for i in items)
    return [math.log1p(total), math.log1p(sum(quantities)), float(len(items)), max(ratios), min(ratios),
            math.log1p(max(quantities)), math.log(min(shares) + 1e-3),
            math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24),
            math.log1p(clock.recent(customer, when, schema.burst_window_s)),
            *(by_category.get(c, 0) / len(items) for c in schema.categories)]


def matrix(orders: list[dict], schema: Schema, clock: CustomerClock | None = None
           ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Feature rows of the orders that have them, and (index, reason) of those that do not."""
    clock = clock or CustomerClock(orders)
    rows, bad = [], []
    for index, order in enumerate(orders):
        try:
            rows.append(vector(order, schema, clock))
        except BadOrder as e:
            bad.append((index, str(e)))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(schema.names)), bad
