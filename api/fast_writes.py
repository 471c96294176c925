"""`FastRatings`: ``POST /v1/ratings`` answered without FastAPI's routing, dependency solving
and its two-pass body handling (``json.loads`` into dicts and lists, then pydantic over those
objects), which cost the event loop about as much CPU per rating as the route's own work.

It sits inside `api.limits.Guard`, after the key check and the body limit (the body it gets
is the whole body, within ``max_body_bytes``), inside the metrics. It answers only a request
whose body the route's own model (`api.schemas.RatingsIn`, bounded as the app declares it)
accepts in one pass over the raw bytes (``model_validate_json``), sent as
``Content-Type: application/json`` exactly; it then calls the route's own function with the
validated ratings, so the answer (200, or the app's exception handler's answer for what the
service raises: 404 unknown item, 422 off scale, 409 event id conflict, 503 not ready) is
the route's, byte for byte. Anything else falls through to the FastAPI route untouched:
another content type (FastAPI then reads the body as bytes, or as ``+json``), any body the
model refuses (so every 422 listing what is wrong where is FastAPI's own), a ``root_path``.

Why a body the model accepts from bytes is the body FastAPI would hand the route: pydantic's
JSON parser and ``json.loads`` read the same values from UTF-8 JSON (the last of repeated
keys wins in both; numbers are correctly rounded in both); what only one of them accepts
(``NaN``, ``Infinity``, a byte-order mark, UTF-16, lone surrogates) is a NaN, a non-string or
an error that the model refuses, or an error of the parser: it falls through. The tests send
the same bodies, valid and invalid, to an app with this path and one without.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from api.limits import HandlerFor, Receive, Scope, Send, respond_as_route

#: the only content type answered here; any other (with parameters, ``+json``, none) goes to FastAPI
JSON_CONTENT_TYPE = b"application/json"

def content_type(scope: Scope) -> bytes | None:
    """The first ``content-type`` header's raw value (as Starlette's ``headers.get``), None without one."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value
    return None


class FastRatings:
    """The fast path (module docstring). ``model`` is the route's body model (the app's
    bounded `RatingsIn`), ``respond(body)`` the route's function (it runs in the thread
    pool, as FastAPI runs the route's plain ``def``), ``route`` the route object (set as the
    scope's ``route``: the metrics label requests by it), ``handler_for(exc)`` the app's
    exception handler for ``exc`` (None: the exception propagates)."""

    def __init__(self, *, model: type[BaseModel], respond: Callable[[Any], Response], route: object,
                 handler_for: HandlerFor) -> None:
        self.model = model
        self.respond = respond
        self.route = route
        self.handler_for = handler_for
        #: False: every request goes to the FastAPI route (same answers; for comparisons in one process)
        self.enabled = True

    async def __call__(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Answer the POST whose whole ``body`` has been read and return True, or return
        False having changed nothing (the FastAPI route answers)."""
        if (not self.enabled or scope["method"] != "POST" or scope["path"] != "/v1/ratings"
                or scope.get("root_path") or content_type(scope) != JSON_CONTENT_TYPE):
            return False
        try:
            parsed = self.model.model_validate_json(body)
        except ValidationError:
            return False
        scope["route"] = self.route
        await respond_as_route(scope, receive, send, lambda: run_in_threadpool(self.respond, parsed),
                               self.handler_for)
        return True
