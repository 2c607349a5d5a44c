"""The order API's copy of the stock service's catalogue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

log = logging.getLogger("order_creator")

CATALOGUE_REFRESH = 300.0        # seconds between catalogue refreshes
CATALOGUE_RETRY = (2.0, 60.0)    # first and longest delay after a failed refresh


class Catalogue:
    """A copy of the stock service's catalogue, fetched at start and refreshed every 5 min,
    with this service's own client-credentials token (see the stock service's StockAuth)."""

    def __init__(self, stock_url: str, token: Callable[[], str] | None, http=None) -> None:
        self.stock_url, self.token, self.http = stock_url.rstrip("/"), token, http
        self.products: dict[str, list[dict[str, Any]]] = {}
        self.loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            token = await asyncio.to_thread(self.token)
            response = await self.http.get(f"{self.stock_url}/stock/all-products-by-category",
                                           headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                raise RuntimeError(f"stock service answered {response.status_code}: "
                                   f"{response.text[:200]}")
            data = response.json()
            if not isinstance(data, dict) or not all(
                    isinstance(p, list) and all(isinstance(x, dict) and {"product", "price"} <= x.keys()
                                                for x in p) for p in data.values()):
                raise RuntimeError("stock service answered an unexpected catalogue")
            self.products = {c: p for c, p in data.items() if p}
            self.loaded_at = time.monotonic()
            log.info("catalogue loaded: %d categories, %d products", len(self.products),
                     sum(len(p) for p in self.products.values()))

    async def ensure(self) -> dict[str, list[dict[str, Any]]]:
        """The catalogue; fetched now if it never was (the stock service may start later)."""
        if not self.products:
            try:
                await self.refresh()
            except Exception as exc:
                raise HTTPException(503, f"the catalogue is not available yet: the stock service "
                                         f"at {self.stock_url} could not be read ({exc})") from None
        return self.products

    async def run(self) -> None:
        """Forever: refresh every CATALOGUE_REFRESH s; after a failure retry sooner, backing off."""
        delay = CATALOGUE_RETRY[0]
        while True:
            try:
                await self.refresh()
                delay, wait = CATALOGUE_RETRY[0], CATALOGUE_REFRESH
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait, delay = delay, min(delay * 2, CATALOGUE_RETRY[1])
                log.warning("catalogue refresh from %s failed (%s); next try in %g s",
                            self.stock_url, exc, wait)
            await asyncio.sleep(wait)
