"""The order as a client sends it (validated strictly: what no store or person can take is
refused, odd values are left to the AI screening), the document the platform stores, and the
random orders of POST /create."""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from order_services.bodies import storable, visible


class _Strict(BaseModel):
    # strict: "1" is not a quantity, 1.5 is not an int, true is not a number.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _cents(price: float) -> float:
    # 1e-300 would pass "greater than 0" and make a total of 0.00.
    if float(f"{price:.2f}") != price:
        raise PydanticCustomError("price_precision", "a price has at most two decimals (cents), "
                                  "not {price}", {"price": repr(price)})
    return price


# Text a store can hold and a person can read: no control or invisible format characters
# (order_services.bodies); a name or id must show something.
Text = Annotated[str, AfterValidator(storable)]
Name = Annotated[str, AfterValidator(storable), AfterValidator(visible)]
Price = Annotated[float, Field(ge=0.01, le=100_000), AfterValidator(_cents)]


class Customer(_Strict):
    id: Name = Field(min_length=1, max_length=64, pattern=r"\S")
    name: Name = Field(min_length=1, max_length=200, pattern=r"\S")
    email: Text | None = Field(default=None, max_length=254,
                               pattern=r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")


class Item(_Strict):
    # Odd products, categories and prices stay acceptable: the AI screening holds them for
    # a person. Only what no store (or person) can take is refused here.
    product: Name = Field(min_length=1, max_length=100, pattern=r"\S")
    category: Name = Field(min_length=1, max_length=50, pattern=r"\S")
    quantity: int = Field(ge=1, le=1000)
    price: Price


class Order(_Strict):
    customer: Customer
    items: list[Item] = Field(min_length=1, max_length=100)
    type: Literal["priority", "regular", "digital"]


class CreateRequest(_Strict):
    number_of_orders: int = Field(ge=1, le=1000)


def order_document(order: Order, order_id: str) -> dict[str, Any]:
    """The contract's order document (docs/ORDER_FLOW.md)."""
    items = [item.model_dump() for item in order.items]
    return {
        "order_id": order_id,
        "type": order.type,
        "customer": order.customer.model_dump(exclude_none=True),
        "items": items,
        "total": round(sum(i["quantity"] * i["price"] for i in items), 2),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def amqp_priority(total: float) -> int:
    """1..10, growing with the order's value: ~1 per half decade (10 → 3, 100 → 5, 10k → 9)."""
    return max(1, min(10, 1 + int(2 * math.log10(max(total, 1.0)))))


FIRST_NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Margaret", "Linus",
               "Katherine", "Dennis", "Frances", "Ken", "Radia", "Tim", "Hedy", "John"]
LAST_NAMES = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Hamilton",
              "Torvalds", "Johnson", "Ritchie", "Allen", "Thompson", "Perlman", "Berners-Lee"]


def fake_order(products: dict[str, list[dict[str, Any]]], rng: random.Random) -> Order:
    """A random order like the original prototype's: a random customer, 1..3 catalogue items."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    items = []
    for _ in range(rng.randint(1, 3)):
        category = rng.choice(sorted(products))
        product = rng.choice(products[category])
        items.append({"product": product["product"], "category": category,
                      "quantity": rng.randint(1, 3), "price": float(product["price"])})
    return Order.model_validate({
        "customer": {"id": f"c-{rng.randint(1000, 99999)}", "name": f"{first} {last}",
                     "email": f"{first}.{last}@example.org".lower().replace("-", "")},
        "items": items, "type": rng.choice(["priority", "regular", "digital"])})
