"""`Guard`: the pure ASGI middleware in front of every route. In this order, before any route
code runs and before a byte of the body is read:

1. **authentication**: a write (`WRITE_ROUTES`), or any ``/v1/`` route when reads need the
   key, without ``Authorization: Bearer <key>`` is a 401 (403 for a wrong key, or for writes
   when no key is configured);
2. **body size**: a declared ``Content-Length`` over the limit is a 413 at once; otherwise the
   body is read chunk by chunk (chunked transfer included), counting bytes as they arrive,
   and the 413 is sent as soon as the count passes the limit, the rest unread. Only a body
   within the limit is handed to the route (so parsing never sees more than
   ``max_body_bytes``);
3. **metrics**: requests by route template and status, and latency.

Between 2 and the route, optional fast paths may answer a request themselves: a plain GET
read (`api.fast_reads.FastReads`), or, once its whole body is read, a ``POST /v1/ratings``
whose body the route's model accepts (`api.fast_writes.FastRatings`); whatever they do not
answer goes to the route.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: the app's exception handler for an exception (None: none; the exception propagates)
HandlerFor = Callable[[Exception], Callable[[Any, Exception], Awaitable[Any]] | None]

#: (method, path) of the routes that change state: they always need the key
WRITE_ROUTES = frozenset({("POST", "/v1/ratings"), ("POST", "/v1/users"), ("POST", "/v1/admin/reload")})
#: methods whose body the guard reads (and bounds) before the route
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(Exception):
    """The body passed the limit while arriving."""


class Guard:
    """Auth, then the body limit, then the route; metrics around it (module docstring).

    ``key`` returns the configured API key (None: writes are disabled); ``observe(route,
    status, seconds)`` records one request; ``fast(scope, receive, send)``, when given, is
    offered every GET first and returns whether it answered it (it sets the scope's
    ``route`` when it does); ``fast_body(scope, body, receive, send)`` likewise every request
    with a body, once the body is read within the limit."""

    def __init__(self, app: ASGIApp, *, key: Callable[[], str | None], read_auth: bool, max_body_bytes: int,
                 observe: Callable[[str, int, float], None],
                 fast: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None,
                 fast_body: Callable[[Scope, bytes, Receive, Send], Awaitable[bool]] | None = None) -> None:
        self.app = app
        self.fast = fast
        self.fast_body = fast_body
        self.key = key
        self.read_auth = read_auth
        self.max_body_bytes = max_body_bytes
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refused = self._refuse_auth(scope)
            if refused is not None:
                await refused(send_recording)
                return
            if self.fast is not None and scope["method"] == "GET" and await self.fast(scope, receive, send_recording):
                return
            if scope["method"] in BODY_METHODS:
                try:
                    body = await self._read_body(scope, receive)
                except BodyTooLarge:
                    await _problem(413, f"request body over {self.max_body_bytes} bytes")(send_recording)
                    return
                receive = _replay(body, receive)
                if self.fast_body is not None and await self.fast_body(scope, body, receive, send_recording):
                    return
            await self.app(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            self.observe(getattr(route, "path", "unmatched"), status[0], time.perf_counter() - start)

    def _refuse_auth(self, scope: Scope) -> Callable[[Send], Awaitable[None]] | None:
        path = scope["path"]
        if (scope["method"], path) not in WRITE_ROUTES and not (self.read_auth and path.startswith("/v1/")):
            return None
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if not header.startswith(b"Bearer "):
            return _problem(401, "missing 'Authorization: Bearer <key>' header",
                            [(b"www-authenticate", b"Bearer")])
        key = self.key()
        if key is None:
            return _problem(403, "writes are disabled: no API key is configured (set RECSYS_API_KEY)")
        if not hmac.compare_digest(header[7:], key.encode()):
            return _problem(403, "wrong API key")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    raise BodyTooLarge
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the route the body read already, then the client's own
    messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _problem(status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> Callable[[Send], Awaitable[None]]:
    """An ASGI JSON response ``{"detail": ...}``."""
    body = json.dumps({"detail": detail}).encode()

    async def respond(send: Send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    return respond


async def respond_as_route(scope: Scope, receive: Receive, send: Send, call: Callable[[], Awaitable[Any]],
                           handler_for: HandlerFor) -> None:
    """Send the response ``call()`` builds, or, when it raises, the app's own exception
    handler's answer for the exception (as Starlette's exception middleware would): how the
    fast paths (`api.fast_reads`, `api.fast_writes`) answer exactly as their routes do."""
    try:
        response = await call()
    except Exception as exc:
        handler = handler_for(exc)
        if handler is None:
            raise
        response = await handler(Request(scope, receive), exc)
    await response(scope, receive, send)
