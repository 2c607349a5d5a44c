"""Features of an order for the anomaly model, and their versioned schema.

An order is the document of docs/ORDER_FLOW.md (`created_at` an ISO string or a datetime).
The features that need more than the order itself come from two places: reference
statistics learned from the training orders (each product's usual price, how often a
product is sold under each category), kept in the schema; and the customer's recent
orders, which the caller supplies as a CustomerClock: the whole file offline, the store
online.

One pass of Python reads the documents into flat arrays; everything else is numpy, so a
batch of orders costs a few microseconds each.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

SCHEMA_VERSION = 3
RECENT_WINDOW_S = 60.0  # "recent": the customer's orders in the minute before


class BadOrder(ValueError):
    """An order the features cannot be computed from; the message says what is wrong."""


@dataclass
class Schema:
    """What a feature vector means; saved with the model so scoring computes the same."""

    categories: list[str]
    usual_price: dict[str, float]  # product → median unit price in the training orders
    pair_share: dict[str, float]  # "category/product" → share of the product's sales under it
    product_share: dict[str, float]  # product → share of all items sold (a frequency encoding)
    version: int = SCHEMA_VERSION
    recent_window_s: float = RECENT_WINDOW_S
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = ["log_total", "log_quantity", "items", "max_log_price_ratio", "min_log_price_ratio",
                      "max_log_item_quantity", "min_log_pair_share", "min_log_product_share", "hour_sin", "hour_cos",
                      "log_customer_recent_orders", "log_seconds_since_customer_order",
                      *(f"share_{c}" for c in self.categories)]
        # Dense lookups for the vectorised features (not saved: derived from the fields above).
        self._products = sorted(self.usual_price)
        self._prices = np.array([self.usual_price[p] for p in self._products] + [np.nan])
        self._product_shares = np.array([self.product_share.get(p, 0.0) for p in self._products] + [0.0])
        shares = np.zeros((len(self.categories) + 1, len(self._products) + 1))
        for key, share in self.pair_share.items():
            category, _, product = key.partition("/")
            if category in self.categories and product in self.usual_price:
                shares[self.categories.index(category), self._products.index(product)] = share
        self._shares = shares  # the last row and column: a category or product never seen

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Schema":
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(f"feature schema version {data.get('version')} is not {SCHEMA_VERSION}: "
                             "retrain the model (opsctl jobs train-vae)")
        return cls(categories=data["categories"], usual_price=data["usual_price"],
                   pair_share=data["pair_share"], product_share=data["product_share"],
                   recent_window_s=data["recent_window_s"])

    @classmethod
    def learn(cls, orders: Iterable[dict]) -> "Schema":
        prices: dict[str, list[float]] = defaultdict(list)
        pairs: Counter = Counter()
        for order in orders:
            try:
                items = _items(order)
            except BadOrder:
                continue  # counted as unusable by matrix()
            for product, category, _, price in items:
                prices[product].append(price)
                pairs[(category, product)] += 1
        if not prices:
            raise BadOrder("no orders to learn the feature schema from")
        by_product = Counter()
        for (_, product), n in pairs.items():
            by_product[product] += n
        return cls(categories=sorted({c for c, _ in pairs}),
                   usual_price={p: float(np.median(v)) for p, v in prices.items()},
                   pair_share={f"{c}/{p}": n / by_product[p] for (c, p), n in pairs.items()},
                   product_share={p: n / sum(by_product.values()) for p, n in by_product.items()})


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


def _items(order: dict) -> list[tuple[str, str, float, float]]:
    """(product, category, quantity, price) of each item."""
    items = order.get("items") if isinstance(order, dict) else None
    if not isinstance(items, list) or not items:
        raise BadOrder("items is missing or empty")
    out = []
    for item in items:
        try:
            product, category, quantity, price = item["product"], item["category"], item["quantity"], item["price"]
        except (TypeError, KeyError):
            raise BadOrder("an item lacks product, category, quantity or price") from None
        try:
            quantity, price = float(quantity), float(price)
        except (TypeError, ValueError):
            raise BadOrder("an item's price or quantity is not a number") from None
        if not (price > 0 and quantity > 0):
            raise BadOrder("an item has a price or quantity that is not positive")
        out.append((str(product), str(category), quantity, price))
    return out


def _customer(order: dict) -> str:
    customer = order.get("customer")
    if not isinstance(customer, dict) or not customer.get("id"):
        raise BadOrder("customer.id is missing")
    return str(customer["id"])


class CustomerClock:
    """When each customer ordered: how many orders a customer placed in the window before a
    time, and how long before it the last one was."""

    def __init__(self, customers: list[str], times: list[float]):
        self.customers, self.times = customers, times

    @classmethod
    def from_orders(cls, orders: Iterable[dict]) -> "CustomerClock":
        customers, times = [], []
        for order in orders:
            try:
                customer, when = _customer(order), created_at(order)
            except BadOrder:
                continue  # scored (and refused) on its own; it just does not count here
            customers.append(customer)
            times.append(when)
        return cls(customers, times)

    @classmethod
    def from_times(cls, times: dict[str, list[float]]) -> "CustomerClock":
        """A clock from customer → created_at timestamps (the streaming job reads them from the store)."""
        return cls([c for c, stamps in times.items() for _ in stamps], [t for stamps in times.values() for t in stamps])

    def before(self, customers: list[str], times: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
        """For each (customer, time): the customer's orders in (time - window, time), and the
        seconds since the customer's last order before `time` (`window` if none in it)."""
        import pandas as pd

        if not self.times:
            return np.zeros(len(times), dtype=np.int64), np.full(len(times), window)
        codes = pd.factorize(np.asarray(self.customers + customers, dtype=object))[0].astype(np.int64)
        known, asked = codes[:len(self.customers)], codes[len(self.customers):]
        # One sorted integer key per order, customer-major (customer code × the number of
        # distinct instants + the instant's rank), so that one searchsorted answers every
        # customer at once and a key never crosses into the next customer's.
        history_times = np.asarray(self.times, dtype=np.float64)
        instants = np.unique(np.concatenate([history_times, times, times - window]))

        def key(code, when):
            return code * len(instants) + np.searchsorted(instants, when)

        order = np.argsort(key(known, history_times), kind="stable")
        history, history_times = key(known, history_times)[order], history_times[order]
        earlier = np.searchsorted(history, key(asked, times), side="left")  # orders strictly before
        recent = earlier - np.searchsorted(history, key(asked, times - window), side="right")
        previous = np.maximum(earlier - 1, 0)
        same_customer = (earlier > 0) & (history[previous] >= asked * len(instants))
        gap = np.where(same_customer, times - history_times[previous], window)
        return recent, np.minimum(gap, window)


def matrix(orders: list[dict], schema: Schema, clock: CustomerClock | None = None
           ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Feature rows of the orders that have them, and (index, reason) of those that do not."""
    import pandas as pd

    bad, customers, times, owner, products, categories, quantities, prices = [], [], [], [], [], [], [], []
    for index, order in enumerate(orders):
        try:
            items, customer, when = _items(order), _customer(order), created_at(order)
        except BadOrder as e:
            bad.append((index, str(e)))
            continue
        row = len(customers)
        customers.append(customer)
        times.append(when)
        for product, category, quantity, price in items:
            owner.append(row)
            products.append(product)
            categories.append(category)
            quantities.append(quantity)
            prices.append(price)
    n = len(customers)
    if not n:
        return np.zeros((0, len(schema.names)), dtype=np.float32), bad
    owner, quantities, prices = np.asarray(owner), np.asarray(quantities), np.asarray(prices)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # each order's first item
    product = pd.Index(schema._products).get_indexer(np.asarray(products, dtype=object))
    category = pd.Index(schema.categories).get_indexer(np.asarray(categories, dtype=object))
    usual = schema._prices[product]  # index -1: the NaN of a product never seen
    ratio = np.log(prices / np.where(np.isnan(usual), prices, usual))
    share = schema._shares[category, product]
    count = np.bincount(owner, minlength=n)
    by_category = np.zeros((n, len(schema.categories) + 1))
    np.add.at(by_category, (owner, category), 1)  # column -1 (the last): categories never seen
    when = np.asarray(times)
    hour = (when % 86400) / 3600
    clock = clock or CustomerClock(customers, times)  # by default the orders are their own history
    recent, gap = clock.before(customers, when, schema.recent_window_s)
    x = np.column_stack([
        np.log1p(np.bincount(owner, weights=prices * quantities, minlength=n)),
        np.log1p(np.bincount(owner, weights=quantities, minlength=n)),
        count, np.maximum.reduceat(ratio, starts), np.minimum.reduceat(ratio, starts),
        np.log1p(np.maximum.reduceat(quantities, starts)), np.log(np.minimum.reduceat(share, starts) + 1e-3),
        np.log(np.minimum.reduceat(schema._product_shares[product], starts) + 1e-4),
        np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
        np.log1p(recent), np.log1p(gap),
        by_category[:, :-1] / count[:, None]])
    return x.astype(np.float32), bad
