"""The stock catalogue in PostgreSQL, seeded from the spec's `catalogue` (see
docs/ORDER_FLOW.md for the table). Products are added and prices kept in line; the
quantities belong to the stock service once seeded, and are never reset.
"""

from __future__ import annotations

from typing import Iterator

from opsctl.components import build
from opsctl.components.base import Change, ConfigStep
from opsctl.components.credentials import username

TABLE = """CREATE TABLE IF NOT EXISTS stock (
  product text PRIMARY KEY,
  category text NOT NULL,
  price numeric(10, 2) NOT NULL CHECK (price > 0),
  quantity integer NOT NULL CHECK (quantity >= 0)
)"""


class StockCatalogue(ConfigStep):
    after = ("postgres", "service-credentials")
    on_kubernetes = True  # through a port-forward to PostgreSQL's pod (ctx.reach)

    def plan(self) -> Iterator[Change]:
        from psycopg import sql

        postgres = build("postgres", self.ctx)
        database = self.ctx.spec.names.postgres.database
        catalogue = self.ctx.spec.catalogue
        # The services whose role is the catalogue (the stock service) read and update it.
        keepers = [username(name) for name, s in self.ctx.spec.services.items() if s.role == "catalogue"]
        with postgres.connect(database, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('public.stock')").fetchone()[0]
            current = dict(conn.execute("SELECT product, price FROM stock").fetchall()) if exists else {}
            if not exists:
                yield Change("create", "table stock", apply=lambda: conn.execute(TABLE))
            for keeper in keepers:
                granted = conn.execute(
                    "SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'stock' "
                    "AND grantee = %s AND privilege_type IN ('SELECT', 'UPDATE')",
                    [keeper]).fetchone()[0] if exists else 0
                if granted < 2:
                    yield Change("update", "table stock", f"{keeper} may read and update it",
                                 apply=lambda k=keeper: conn.execute(sql.SQL(
                                     "GRANT SELECT, UPDATE ON stock TO {}").format(sql.Identifier(k))))
            for category, products in catalogue.products.items():
                for product, price in products.items():
                    if product not in current:
                        yield Change("create", f"product {product}", f"{category}, {price:.2f}",
                                     apply=lambda p=product, c=category, pr=price: conn.execute(
                                         "INSERT INTO stock (product, category, price, quantity) "
                                         "VALUES (%s, %s, %s, %s) ON CONFLICT (product) DO NOTHING",
                                         [p, c, pr, catalogue.initial_stock]))
                    elif float(current[product]) != round(price, 2):
                        yield Change("update", f"product {product}",
                                     f"price {current[product]} → {price:.2f}",
                                     apply=lambda p=product, pr=price: conn.execute(
                                         "UPDATE stock SET price = %s WHERE product = %s", [pr, p]))
