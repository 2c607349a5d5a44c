"""Small HTTP calls with the standard library (fast to import, no extra dependency)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request


class HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


def request(method: str, url: str, body=None, auth: tuple[str, str] | None = None,
            headers: dict | None = None, timeout: float = 2.0, raw: bytes | None = None):
    """Returns (status, headers, parsed JSON or text). Raises HTTPError for 4xx/5xx.

    `body` is sent as JSON; `raw` as it is (with the caller's Content-Type)."""
    headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, _decode(resp.read(), resp.headers)
    except urllib.error.HTTPError as e:
        raise HTTPError(e.code, e.read().decode(errors="replace")) from None


def _decode(raw: bytes, headers):
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(raw or b"null")
    return raw.decode(errors="replace")


def get(url: str, **kw):
    return request("GET", url, **kw)[2]


def answers(url: str, **kw) -> bool:
    """True when the URL answers 2xx."""
    try:
        request("GET", url, **kw)
        return True
    except (HTTPError, OSError):
        return False
