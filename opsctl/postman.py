"""Postman collection and environment of the order APIs ("tokens for people").

Pure functions, standard library only: they build the documents and write them
atomically; the CLI that calls them lives elsewhere.

The collection authenticates every request with a bearer ``{{access_token}}``. Its
collection-level pre-request script fetches that token with the OAuth2
client-credentials grant when it is empty or about to expire, and stores it (with its
expiry) in the environment, so a run, or a day of clicking in Postman, asks Keycloak
once per token lifetime. The client secret lives only in the environment, as a
"secret" variable; the environment file is written with mode 0600.
"""
from __future__ import annotations

import json
import os
import uuid

from opsctl.files import write_atomic

SCHEMA_V21 = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
COLLECTION_NAME = "order-management platform"
SECRET_KEYS = ("client_secret", "access_token")
ENV_KEYS = ("base_url", "token_url", "client_id", "client_secret", "access_token")
# Refresh a token this many seconds before it expires.
EXPIRY_MARGIN_S = 30

SAMPLE_ORDER = {
    "customer": {"id": "c-1042", "name": "Ada Lovelace", "email": "ada.lovelace@example.com"},
    "items": [
        {"product": "Wireless Mouse", "category": "electronics", "quantity": 2, "price": 24.99},
        {"product": "Notebook A5", "category": "stationery", "quantity": 5, "price": 3.5},
    ],
    "type": "regular",
}

# The Postman sandbox's JavaScript, one line per array entry as Postman exports it.
PRE_REQUEST_SCRIPT = r"""// Fetches {{access_token}} with the OAuth2 client-credentials grant when it is empty
// or expires within 30 s; stores it and its expiry (epoch ms) in the environment.
(function () {
    var MARGIN_MS = %(margin_ms)d;
    if (pm.request.auth && pm.request.auth.type === 'noauth') {
        return; // an open endpoint (health) needs no token
    }
    var token = pm.variables.get('access_token');
    var expiresAt = Number(pm.environment.get('access_token_expires_at'));
    if (token && !Number.isFinite(expiresAt)) {
        // A token given by hand, with no stored expiry: read exp from a JWT when it is one.
        try {
            var payload = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
            if (payload && payload.exp) { expiresAt = payload.exp * 1000; }
        } catch (e) { /* opaque token: use it as it is */ }
    }
    if (token && (!Number.isFinite(expiresAt) || Date.now() < expiresAt - MARGIN_MS)) {
        return; // still valid
    }
    var tokenUrl = pm.variables.get('token_url');
    var clientId = pm.variables.get('client_id');
    if (!tokenUrl || !clientId) {
        throw new Error('token_url and client_id must be set in the environment to fetch an access token');
    }
    // An error thrown in a pm.sendRequest callback is not counted by newman (nor shown in
    // Postman's test results), so a failure is also recorded as a failed pm.test, and the
    // request is skipped rather than sent without a token.
    function fail(message) {
        var error = new Error(message);
        pm.test('access token from ' + tokenUrl, function () { throw error; });
        if (pm.execution && typeof pm.execution.skipRequest === 'function') {
            pm.execution.skipRequest();
        }
        throw error;
    }
    pm.sendRequest({
        url: tokenUrl,
        method: 'POST',
        header: { 'Content-Type': 'application/x-www-form-urlencoded', 'Accept': 'application/json' },
        body: {
            mode: 'urlencoded',
            urlencoded: [
                { key: 'grant_type', value: 'client_credentials' },
                { key: 'client_id', value: clientId },
                { key: 'client_secret', value: pm.variables.get('client_secret') || '' }
            ]
        }
    }, function (err, res) {
        if (err) {
            // a network error crosses the sandbox as a plain object: {syscall, code, address, port}
            var what = err.message || [err.syscall, err.code || JSON.stringify(err),
                                       err.address && (err.address + (err.port ? ':' + err.port : ''))]
                .filter(Boolean).join(' ');
            fail('token request to ' + tokenUrl + ' failed: ' + what);
        }
        var body = {};
        try { body = res.json(); } catch (e) { body = {}; }
        if (res.code < 200 || res.code > 299) {
            var why = body.error_description || body.error || String(res.text()).slice(0, 200);
            fail('token request to ' + tokenUrl + ' failed: HTTP ' + res.code + ' ' + res.status + ': ' + why);
        }
        if (!body.access_token) {
            fail('token response from ' + tokenUrl + ' (HTTP ' + res.code + ') has no access_token');
        }
        var lifetime = Number(body.expires_in) > 0 ? Number(body.expires_in) : 300;
        pm.environment.set('access_token', body.access_token);
        pm.environment.set('access_token_expires_at', String(Date.now() + lifetime * 1000));
    });
})();
""" % {"margin_ms": EXPIRY_MARGIN_S * 1000}

_STATUS_2XX = """pm.test('status is 2xx', function () {
    pm.expect(pm.response.code, pm.response.status).to.be.within(200, 299);
});"""

_REMEMBER_ORDER_ID = """// Remember the new order's id for "Get an order".
try {
    var body = pm.response.json();
    var id = body && (body.order_id || body.id || body._id || (body.order && (body.order.order_id || body.order.id)));
    if (id) { pm.collectionVariables.set('order_id', String(id)); }
} catch (e) { /* not JSON: nothing to remember */ }"""


def _lines(script: str) -> list[str]:
    return script.rstrip("\n").split("\n")


def _event(listen: str, script: str) -> dict:
    return {"listen": listen,
            "script": {"id": str(uuid.uuid4()), "type": "text/javascript", "exec": _lines(script)}}


def _url(path: list[str], raw_path: str) -> dict:
    return {"raw": "{{base_url}}/" + raw_path, "host": ["{{base_url}}"], "path": path}


def _request(name: str, method: str, path: list[str], *, description: str,
             body: dict | None = None, tests: str = _STATUS_2XX, noauth: bool = False) -> dict:
    request: dict = {"method": method, "header": [], "url": _url(path, "/".join(path)),
                     "description": description}
    if body is not None:
        request["header"] = [{"key": "Content-Type", "value": "application/json", "type": "text"}]
        request["body"] = {"mode": "raw", "raw": json.dumps(body, indent=2),
                           "options": {"raw": {"language": "json"}}}
    if noauth:
        request["auth"] = {"type": "noauth"}
    return {"name": name, "event": [_event("test", tests)], "request": request, "response": []}


def collection(base_url: str, token_url: str, client_id: str) -> dict:
    """A Postman Collection v2.1 of the platform's order APIs.

    base_url is the edge (opsctl.components.nginx.edge_url), which routes each path to its
    service. The URLs and client id are collection variables (defaults); an environment's
    variables of the same name take precedence. The client secret is never in here.
    """
    items = [
        _request("Health", "GET", ["health"], noauth=True,
                 description="Liveness of the order API; open, no token needed."),
        _request("Place an order", "POST", ["orders"], body=SAMPLE_ORDER,
                 tests=_STATUS_2XX + "\n" + _REMEMBER_ORDER_ID,
                 description="Places one real order; routed by its type (regular, priority, digital)."),
        _request("Generate sample orders", "POST", ["create"], body={"number_of_orders": 3},
                 description="Generates and places the given number of random orders."),
        _request("Get an order", "GET", ["order", "{{order_id}}"],
                 description="One order by id; {{order_id}} is remembered from \"Place an order\"."),
        _request("All products by category", "GET", ["all-products-by-category"],
                 description="The stock catalogue, grouped by category."),
        _request("Stock categories", "GET", ["stock", "all-categories"],
                 description="The stock service's categories (the edge routes /stock/ to it)."),
    ]
    return {
        "info": {
            "_postman_id": str(uuid.uuid4()),
            "name": COLLECTION_NAME,
            "description": ("The order APIs of the AI-assisted order-management platform. Every "
                            "request but Health carries a bearer token that the collection's "
                            "pre-request script gets from Keycloak (OAuth2 client credentials) and "
                            "keeps in the environment until 30 s before it expires. Select the "
                            "environment that opsctl exported: it holds client_secret."),
            "schema": SCHEMA_V21,
        },
        "auth": {"type": "bearer",
                 "bearer": [{"key": "token", "value": "{{access_token}}", "type": "string"}]},
        "event": [_event("prerequest", PRE_REQUEST_SCRIPT)],
        "variable": [
            {"key": "base_url", "value": base_url, "type": "string"},
            {"key": "token_url", "value": token_url, "type": "string"},
            {"key": "client_id", "value": client_id, "type": "string"},
            {"key": "order_id", "value": "", "type": "string"},
        ],
        "item": items,
    }


def environment(name: str, base_url: str, token_url: str, client_id: str, client_secret: str,
                access_token: str = "") -> dict:
    """A Postman environment export; client_secret and access_token are "secret"."""
    values = {"base_url": base_url, "token_url": token_url, "client_id": client_id,
              "client_secret": client_secret, "access_token": access_token}
    return {
        "id": str(uuid.uuid4()),
        "name": name,
        "values": [{"key": k, "value": v, "type": "secret" if k in SECRET_KEYS else "default",
                    "enabled": True} for k, v in values.items()],
        "_postman_variable_scope": "environment",
    }


def _check_environment(env, where: str) -> None:
    if not isinstance(env, dict):
        raise ValueError(f"{where}: not a Postman environment: expected a JSON object, "
                         f"got {type(env).__name__}")
    values = env.get("values")
    if not isinstance(values, list):
        raise ValueError(f"{where}: not a Postman environment: no \"values\" list")
    scope = env.get("_postman_variable_scope", "environment")
    if scope != "environment":
        raise ValueError(f"{where}: not a Postman environment: _postman_variable_scope is {scope!r}")
    for i, v in enumerate(values):
        if not isinstance(v, dict) or not isinstance(v.get("key"), str):
            raise ValueError(f"{where}: not a Postman environment: values[{i}] has no \"key\"")


def write_environment(path: str | os.PathLike, env: dict, merge: bool = True) -> dict:
    """Create or update a Postman environment file atomically, mode 0600.

    When the file exists and merge is true, its id, name and other variables are kept
    and only the variables given in env are replaced (or added). A file that is not a
    Postman environment raises ValueError and is left untouched. Returns what was written.
    """
    _check_environment(env, "environment to write")
    path = os.fspath(path)
    result = env
    if merge and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                existing = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a Postman environment: not valid JSON ({e}); "
                             f"fix or remove the file") from None
        try:
            _check_environment(existing, path)
        except ValueError as e:
            raise ValueError(f"{e}; fix or remove the file") from None
        given = {v["key"]: v for v in env["values"]}
        # The stored expiry belongs to the access token being replaced: stale now.
        drop_expiry = "access_token" in given and "access_token_expires_at" not in given
        values = []
        for v in existing["values"]:
            if drop_expiry and v["key"] == "access_token_expires_at":
                continue
            values.append(given.pop(v["key"]) if v["key"] in given else v)
        values.extend(given.values())  # new variables, in the order given
        result = dict(existing)
        result["id"] = existing.get("id") or env.get("id") or str(uuid.uuid4())
        result["name"] = existing.get("name") or env.get("name")
        result["values"] = values
        result["_postman_variable_scope"] = "environment"
    write_atomic(path, json.dumps(result, indent=2) + "\n", 0o600)
    return result


def write_collection(path: str | os.PathLike, collection: dict) -> None:
    """Write a collection file atomically, mode 0644 (it holds no secret)."""
    write_atomic(path, json.dumps(collection, indent=2) + "\n", 0o644)
