"""What the HTTP services (the order API, the stock service) share about request bodies:
text a store can hold, strict JSON (no duplicate keys), and the body size limit.

    Name = Annotated[str, Field(min_length=1), AfterValidator(storable), AfterValidator(visible)]
    order = parse_body(Order, await request.body())   # RequestValidationError → 422
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # 413 past the limit, before parsing
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024

# What a store cannot hold, or holds only to mislead a person reading it: PostgreSQL's jsonb
# refuses \u0000 and lone surrogates; bidi overrides and zero-width characters make a name
# read as something else.
_REFUSED = {"Cc": "a control character", "Cf": "an invisible format character",
            "Cs": "a lone surrogate"}
# Letters and symbols that draw nothing (Hangul fillers, the blank braille pattern).
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def storable(value: str) -> str:
    """value, unless it holds a control, format (Cf) or surrogate character."""
    if value.isprintable():  # the fast path (C): none of those is printable
        return value
    for position, char in enumerate(value):
        kind = unicodedata.category(char)
        if kind in _REFUSED:
            raise PydanticCustomError(
                "text_unstorable",
                "must not contain {what} (U+{code} at position {position}): remove it",
                {"what": _REFUSED[kind], "code": f"{ord(char):04X}", "position": position})
    return value


def visible(value: str) -> str:
    """value, unless nothing in it can be seen (only spaces, marks or blank characters)."""
    for char in value:
        if unicodedata.category(char)[0] not in "ZMC" and char not in _BLANK:
            return value
    raise PydanticCustomError("text_invisible",
                              "must contain a visible character, not only blank or invisible ones")


# -- strict JSON ---------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


class _Object(list):
    """A JSON object as its (key, value) pairs, duplicates kept (to find where one is)."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _DuplicateKey()
    return found


def _duplicate_at(node: Any, path: tuple = ()) -> tuple | None:
    """The path of the first key an object repeats, depth first in document order."""
    if isinstance(node, _Object):
        seen = set()
        for key, value in node:
            if key in seen:
                return (*path, key)
            seen.add(key)
            found = _duplicate_at(value, (*path, key))
            if found:
                return found
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found = _duplicate_at(value, (*path, index))
            if found:
                return found
    return None


def duplicate_key(body: bytes) -> tuple | None:
    """The path of a key some object of the JSON body repeats (the last one would silently
    win otherwise), or None; None too for a body that is not JSON (the model says why)."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
        return None
    except _DuplicateKey:
        return _duplicate_at(json.loads(body, object_pairs_hook=_Object))
    except (ValueError, RecursionError):
        return None


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """The body validated as `model`, or FastAPI's RequestValidationError (rendered as 422,
    the same shape as FastAPI's own: each error's loc starts with "body")."""
    path = duplicate_key(body)
    if path is not None:
        raise RequestValidationError([{
            "type": "json_duplicate_key", "loc": ("body", *path), "input": None,
            "msg": f"duplicate key {path[-1]!r}: each field may appear once in a JSON object"}])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            error = {**error, "loc": ("body", *error["loc"])}
            ctx = error.get("ctx")
            if error["type"] == "json_invalid":
                error["msg"] = f"malformed JSON: {(ctx or {}).get('error', error['msg'])}"
                error["input"] = None  # the broken text is not echoed back
            else:
                error["input"] = json_safe(error.get("input"))
                if ctx:  # plain values (limits, patterns); anything else is shown as text
                    error["ctx"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                    for k, v in ctx.items()}
            errors.append(error)
        raise RequestValidationError(errors) from None


def json_safe(value: Any) -> Any:
    """The input echoed in an error, renderable as JSON: the parser takes NaN and Infinity
    (which a model then refuses), but a JSON answer cannot carry them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# -- the body limit ---------------------------------------------------------------------------


class BodyLimit:
    """413 for a request body over `limit` bytes, before anything parses it: at once from
    Content-Length, or while a chunked body streams in. `refused` is called for each 413
    (a metric)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES,
                 refused: Callable[[], None] | None = None) -> None:
        self.app, self.limit, self.refused = app, limit, refused or (lambda: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    return await self._refuse(send, 400, "invalid Content-Length")
                if int(value) > self.limit:
                    self.refused()
                    return await self._refuse(send, 413, self._message())
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    self.refused()
                    # An HTTPException: FastAPI lets it through its body reading, and its
                    # exception handler renders the 413 before any route code runs.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit // 1024} KiB"

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# -- serving -----------------------------------------------------------------------------------


def server_limits(env: dict[str, str] | None = None) -> dict[str, int]:
    """uvicorn's bounds on what one direct client can hold (also when nginx is bypassed):
    connections and requests in flight per process (HTTP_LIMIT_CONCURRENCY, default 1000:
    above it new requests get a 503) and seconds an idle keep-alive connection is kept
    (HTTP_KEEPALIVE_SECONDS, default 5)."""
    from order_services.settings import Env

    settings = Env(env)
    return {"limit_concurrency": settings.number("HTTP_LIMIT_CONCURRENCY", 1, 100_000, default=1000),
            "timeout_keep_alive": settings.number("HTTP_KEEPALIVE_SECONDS", 1, 3600, default=5)}


def _idle_bounded_protocol():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class IdleBoundedHttp(HttpToolsProtocol):
        """uvicorn's httptools protocol, except that a connection that sends nothing at all
        is closed after the keep-alive timeout too (uvicorn times out only the idle time
        between requests): idle connections cannot fill limit_concurrency."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    return IdleBoundedHttp


def __getattr__(name: str):
    # uvicorn loads its protocol class by import path ("order_services.bodies:IdleBoundedHttp");
    # built on first use so that importing this module does not import uvicorn.
    if name == "IdleBoundedHttp":
        globals()[name] = cls = _idle_bounded_protocol()
        return cls
    raise AttributeError(name)
