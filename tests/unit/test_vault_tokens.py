"""Revoking the root tokens walks Vault's token accessors; one whose token ends between the
list and its lookup (expired, revoked) is skipped, not a crash of the command."""

from opsctl import httpclient
from opsctl.components import vault


def test_a_token_gone_between_the_list_and_its_lookup_is_skipped(monkeypatch):
    tokens = {"a-root": ["root"], "a-service": ["vault-reader-scope"], "a-gone": None}
    revoked = []

    def api(ctx, method, path, body=None, token=None):
        if path.startswith("auth/token/accessors"):
            return {"data": {"keys": list(tokens)}}
        if path == "auth/token/lookup-accessor":
            policies = tokens[body["accessor"]]
            if policies is None:
                raise httpclient.HTTPError(400, '{"errors":["1 error occurred:\\n\\t* invalid accessor\\n\\n"]}')
            return {"data": {"policies": policies}}
        assert path == "auth/token/revoke-accessor"
        revoked.append(body["accessor"])
        return {}

    monkeypatch.setattr(vault, "_api", api)
    assert vault.revoke_root_tokens(None, "admin") == 1
    assert revoked == ["a-root"]
