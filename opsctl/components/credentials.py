"""Each bundled service's credentials for the stores it uses: generated, kept in Vault at
<kv_mount>/<service>, and made real as a user in each server.

Vault is the source of truth: a credential missing there is generated; a user missing in
a server, or whose password no longer works there, is (re)created from Vault.
"""

from __future__ import annotations

import secrets
from typing import Iterator

from opsctl.components import build, vault
from opsctl.components.base import Change, ConfigStep


def username(service: str) -> str:
    return service.replace("-", "_")  # valid as-is in every store, PostgreSQL included


class ServiceCredentials(ConfigStep):
    after = ("vault", "rabbitmq", "postgres", "redis", "mongodb")
    on_kubernetes = True  # through port-forwards to the servers' pods (ctx.reach)

    def plan(self) -> Iterator[Change]:
        client = vault.admin(self.ctx)
        servers = {}
        for service, spec in self.ctx.spec.services.items():
            stored = vault.kv_read(self.ctx, client, service) or {}
            wanted = dict(stored)
            for kind in spec.credentials:
                wanted.setdefault(f"{kind}_username", username(service))
                wanted.setdefault(f"{kind}_password", secrets.token_urlsafe(24))
            for name in spec.shared_secrets:
                wanted.setdefault(name, secrets.token_urlsafe(32))
            if wanted != stored:
                missing = sorted({k if k in spec.shared_secrets else k.split("_")[0]
                                  for k in wanted.keys() - stored.keys()})
                yield Change("create" if not stored else "update",
                             f"credentials of {service} in Vault", ", ".join(missing),
                             apply=lambda s=service, w=wanted: vault.kv_write(self.ctx, client, s, w))
            for kind in spec.credentials:
                server = servers.setdefault(kind, build(kind, self.ctx))
                user, password = wanted[f"{kind}_username"], wanted[f"{kind}_password"]
                if not server.service_user_ok(user, password, service):
                    yield Change("update", f"{kind} user {user}",
                                 "created, password reset or permissions set",
                                 apply=lambda srv=server, u=user, p=password, s=service:
                                 srv.ensure_service_user(u, p, s))
