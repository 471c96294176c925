"""`FastReads`: the hot GET reads (``/v1/predict``, ``/v1/users/{user}/recommendations``,
``/v1/users/{user}``) answered without FastAPI's per-request routing and parameter solving,
which cost about as much CPU as an explained prediction itself.

It sits inside `api.limits.Guard` (after the key check, inside the metrics) and answers a
request only when it can tell, from the raw request, exactly what the FastAPI route would
receive: every parameter plain and valid (`parse_query`, `query_id`, `path_id`,
`bounded_int`). It then calls the same response functions as the routes (``api.app``), so
the answer is the route's, byte for byte; an exception the service raises is answered by the
app's own exception handler for it, as Starlette would. Anything else (a missing, repeated,
empty, percent-encoded or out-of-range parameter, an id FastAPI would refuse, another method,
a ``root_path``) falls through to the FastAPI route untouched, so every error answer (the 422
listing what is wrong where, redirects, 405) stays FastAPI's own.

What a "plain" parameter is, so that the raw bytes *are* the value FastAPI would validate:

- the query string is split on ``&`` into ``name=value`` pairs as `urllib.parse.parse_qsl`
  does; names and values hold only printable ASCII other than ``% + & = ; # /`` (so
  percent-decoding and ``+``-to-space change nothing); names the route does not declare
  are ignored, as FastAPI ignores them;
- an id (query or path) is 1 to `MAX_ID_LENGTH` such characters (a path id, already
  percent-decoded by the server, may also hold ``%``, ``+``, ``&``, ``=``, ``;``, ``#`` and
  spaces): within `api.schemas.ID_PATTERN`;
- an integer is decimal digits without a sign, spaces or leading zeros, within the route's
  bounds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from api.limits import HandlerFor, Receive, Scope, Send, respond_as_route
from api.schemas import MAX_ID_LENGTH

#: the largest ``min_seq`` the routes accept (their ``le``)
MAX_MIN_SEQ = 2**62
#: bytes a plain query name or value may hold: printable ASCII but the ones `parse_qsl`
#: decodes or splits on (``%``, ``+``, ``&``, ``=``, ``;``) and the ones an id may not hold
#: or a query cannot carry (``/``, ``#``)
PLAIN_QUERY_BYTES = bytes(c for c in range(0x21, 0x7F) if chr(c) not in "%+&=;#/")
#: an integer query value falls through when longer than this (2^62 has 19 digits)
MAX_INT_DIGITS = 19
#: `bounded_int`'s answer for a value the route would refuse (or might read otherwise)
NOT_PLAIN = object()

#: the routes' default list length (``k``)
DEFAULT_K = 10

PREDICT_PARAMS = frozenset({"user", "item", "explain", "min_seq"})
RECOMMENDATIONS_PARAMS = frozenset({"k", "explain", "min_seq"})
USER_PARAMS = frozenset({"min_seq"})
USERS_PREFIX = "/v1/users/"
RECOMMENDATIONS_SUFFIX = "/recommendations"

ResponseFor = Callable[..., Awaitable[Response]]


def parse_query(query: bytes, names: frozenset[str]) -> dict[str, bytes] | None:
    """The raw values of the declared ``names`` in ``query`` (absent ones left out); None
    when a pair is not plain (module docstring), a declared name is repeated or has no
    value, or a pair is empty (``a=1&&b=2``)."""
    values: dict[str, bytes] = {}
    if not query:
        return values
    for pair in query.split(b"&"):
        name, equals, value = pair.partition(b"=")
        if not name or pair.translate(None, PLAIN_QUERY_BYTES) != (b"=" if equals else b""):
            return None  # empty, or something parse_qsl would decode, or a second '='
        key = name.decode("ascii")
        if key in names:
            if not value or key in values:
                return None
            values[key] = value
    return values


def query_id(raw: bytes | None) -> str | None:
    """A plain query value as an id (the bytes are plain already), or None when absent or
    too long."""
    if raw is None or len(raw) > MAX_ID_LENGTH:
        return None
    return raw.decode("ascii")


def path_id(segment: str) -> str | None:
    """A path segment (already percent-decoded by the server) as an id when it is plain:
    printable ASCII without ``/``, 1 to `MAX_ID_LENGTH` characters; else None."""
    if not segment or len(segment) > MAX_ID_LENGTH or "/" in segment or not (
            segment.isascii() and segment.isprintable()):
        return None
    return segment


def bounded_int(raw: bytes | None, default: Any, low: int, high: int) -> Any:
    """``default`` when absent; the integer when ``raw`` is plain digits within
    ``low..high``; else `NOT_PLAIN`."""
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > MAX_INT_DIGITS or (raw[0] == 0x30 and len(raw) > 1):
        return NOT_PLAIN
    value = int(raw)
    return value if low <= value <= high else NOT_PLAIN


class FastReads:
    """The fast path (module docstring). ``predict(user, item, explain, min_seq)``,
    ``recommendations(user, k, explain, min_seq)`` and ``user(user, min_seq)`` build the
    routes' responses; ``routes`` maps each route's path template to its route object (set
    as the scope's ``route``, which the metrics label requests by); ``handler_for(exc)`` is
    the app's exception handler for ``exc`` (None: none, the exception propagates)."""

    def __init__(self, *, predict: ResponseFor, recommendations: ResponseFor, user: ResponseFor,
                 routes: dict[str, object], handler_for: HandlerFor, max_explain: int, max_k: int) -> None:
        self.predict = predict
        self.recommendations = recommendations
        self.user = user
        self.predict_route = routes["/v1/predict"]
        self.recommendations_route = routes["/v1/users/{user}/recommendations"]
        self.user_route = routes["/v1/users/{user}"]
        self.handler_for = handler_for
        self.max_explain = max_explain
        self.max_k = max_k
        #: False: every request goes to its FastAPI route (same answers; for comparisons in one process)
        self.enabled = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the request and return True, or return False having changed nothing (the
        FastAPI route answers)."""
        if not self.enabled or scope["method"] != "GET" or scope.get("root_path"):
            return False
        call = self._call(scope["path"], scope["query_string"])
        if call is None:
            return False
        route, path_params, respond = call
        scope["route"] = route
        scope["path_params"] = path_params
        await respond_as_route(scope, receive, send, respond, self.handler_for)
        return True

    def _call(self, path: str, query: bytes) -> tuple[object, dict, Callable[[], Awaitable[Response]]] | None:
        """The route, its path parameters and the call that answers ``path?query``; None
        when the request is not plain."""
        if path == "/v1/predict":
            values = parse_query(query, PREDICT_PARAMS)
            if values is None:
                return None
            user, item = query_id(values.get("user")), query_id(values.get("item"))
            explain = bounded_int(values.get("explain"), 0, 0, self.max_explain)
            min_seq = bounded_int(values.get("min_seq"), None, 0, MAX_MIN_SEQ)
            if user is None or item is None or explain is NOT_PLAIN or min_seq is NOT_PLAIN:
                return None
            return self.predict_route, {}, lambda: self.predict(user, item, explain, min_seq)
        if not path.startswith(USERS_PREFIX):
            return None
        if path.endswith(RECOMMENDATIONS_SUFFIX):
            user = path_id(path[len(USERS_PREFIX):-len(RECOMMENDATIONS_SUFFIX)])
            values = parse_query(query, RECOMMENDATIONS_PARAMS)
            if user is None or values is None:
                return None
            k = bounded_int(values.get("k"), DEFAULT_K, 1, self.max_k)
            explain = bounded_int(values.get("explain"), 0, 0, self.max_explain)
            min_seq = bounded_int(values.get("min_seq"), None, 0, MAX_MIN_SEQ)
            if k is NOT_PLAIN or explain is NOT_PLAIN or min_seq is NOT_PLAIN:
                return None
            return (self.recommendations_route, {"user": user},
                    lambda: self.recommendations(user, k, explain, min_seq))
        user = path_id(path[len(USERS_PREFIX):])
        values = parse_query(query, USER_PARAMS)
        if user is None or values is None:
            return None
        min_seq = bounded_int(values.get("min_seq"), None, 0, MAX_MIN_SEQ)
        if min_seq is NOT_PLAIN:
            return None
        return self.user_route, {"user": user}, lambda: self.user(user, min_seq)
