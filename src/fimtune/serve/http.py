"""HTTP plumbing shared by the routes: JSON errors, bounded body reading, auth, metrics, SSE.

Every error is JSON and names the field at fault. TGI routes answer TGI's shape,
``{"error": str, "error_type": str, "field": str}``; OpenAI and llama.cpp routes answer
OpenAI's, ``{"error": {"message", "type", "param", "code"}}``.

Metrics are Prometheus' text format, written by hand::

    # TYPE fimtune_requests_total counter
    fimtune_requests_total{route="/generate",status="200"} 12
    # TYPE fimtune_request_duration_seconds histogram
    fimtune_request_duration_seconds_bucket{route="/generate",le="0.1"} 3
    ...
    fimtune_request_duration_seconds_bucket{route="/generate",le="+Inf"} 12
    fimtune_request_duration_seconds_sum{route="/generate"} 4.2
    fimtune_request_duration_seconds_count{route="/generate"} 12
"""

from __future__ import annotations

import hmac
import json
import re
import threading
import time
from collections import Counter, defaultdict
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPENAI_STYLE = ("/v1/", "/infill")
OPEN_ROUTES = ("/health",)  # answered without the API key
TYPE_TAGS = {"str", "int", "float", "bool", "none"}
SURROGATE = re.compile("[\ud800-\udfff]")
STATUS_CLIENT_GONE = 499  # nginx's "client closed request": recorded in metrics, never seen by a client

Body = TypeVar("Body", bound=BaseModel)

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        kind: str = "validation",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.kind = kind
        self.headers = headers


def error_body(path: str, err: ApiError) -> dict[str, Any]:
    if path.startswith(OPENAI_STYLE):
        kind = "invalid_request_error" if err.status < 500 else err.kind
        return {"error": {"message": err.message, "type": kind, "param": err.field, "code": err.status}}
    return {"error": err.message, "error_type": err.kind, "field": err.field}


def error_response(path: str, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


async def read_json(request: Request, schema: type[Body], max_bytes: int) -> Body:
    """The request body parsed into ``schema``; 413 past ``max_bytes``, 400 for bad JSON, 422 for bad fields
    (499, which only the metrics see, when the client went away before its body ended)."""
    too_large = ApiError(
        413, f"the body is larger than the server's limit of {max_bytes} bytes (max_body_bytes)", "body", "too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body ended (an editor cancelling): no fault of the server's
        raise ApiError(STATUS_CLIENT_GONE, "the client closed the request", "body", "cancelled") from None
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", "body", "invalid_json") from None
    except RecursionError:  # arrays or objects nested deeper than the parser goes
        raise ApiError(400, "the body is not valid JSON: nested too deeply", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", "body")
    if _lone_surrogate(data):  # JSON escapes them (`\\ud800`); no text is made of them, and no tokenizer takes them
        raise ApiError(
            400, "the body is not valid JSON: a string holds half of a UTF-16 surrogate pair", "body", "invalid_json"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not _is_type_tag(str(p))) or "body"
        raise ApiError(422, f"{where}: {first['msg']}", where) from None


def _lone_surrogate(value: Any) -> bool:
    """Whether a string in ``value`` (parsed JSON) holds a surrogate code point (U+D800-U+DFFF):
    json.loads makes them of escapes not in pairs (pairs become one character). Iterative: any
    depth json.loads parsed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _is_type_tag(part: str) -> bool:
    """Pydantic puts the union member tried in an error's location (`prompt.list[str]`): not a field."""
    return part in TYPE_TAGS or part.startswith(("list[", "dict[", "function-"))


# Line breaks JSON leaves raw (it escapes those below U+0020), which clients that split lines as
# str.splitlines does (httpx's iter_lines, under huggingface_hub's InferenceClient) cut an event at
LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: {json}`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(LINE_BREAKS)
    return f"data: {text}\n\n"


class Gate:
    """ASGI middleware for every HTTP request: the API key, then timing into :class:`Metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, start, status = scope["path"], time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                denied = ApiError(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer KEY`",
                    "authorization",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                )
                await error_response(path, denied)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(path, status, time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        # the scheme's case does not matter (RFC 9110: `bearer KEY` is `Bearer KEY`)
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected or b"")


class _Histogram:
    """A Prometheus histogram with one label (cumulative buckets, as the text format wants them)."""

    def __init__(self, name: str, label: str, help_text: str) -> None:
        self.name, self.label, self.help = name, label, help_text
        self._buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    def observe(self, value: str, seconds: float) -> None:
        buckets = self._buckets[value]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self._sums[value] += seconds
        self._counts[value] += 1

    def render(self) -> list[str]:
        name, label = self.name, self.label
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        for value in sorted(self._counts):
            lines += [
                f'{name}_bucket{{{label}="{value}",le="{bound}"}} {n}'
                for bound, n in zip(LATENCY_BUCKETS, self._buckets[value], strict=True)
            ]
            lines.append(f'{name}_bucket{{{label}="{value}",le="+Inf"}} {self._counts[value]}')
            lines.append(f'{name}_sum{{{label}="{value}"}} {self._sums[value]:.6f}')
            lines.append(f'{name}_count{{{label}="{value}"}} {self._counts[value]}')
        return lines


class Metrics:
    """Request counts by route and status, a latency histogram by route, and one of finished
    generation requests' time by phase (thread-safe)."""

    def __init__(self, routes: set[str]) -> None:
        self.routes = routes  # other paths count as "other", so a scanner cannot grow the label set
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency = _Histogram(
            "fimtune_request_duration_seconds", "route", "Time from request to the end of the response."
        )
        self._phases = _Histogram(
            "fimtune_request_phase_seconds",
            "phase",
            "A finished generation request's time by phase: validation (tokenizing its prompt), queue "
            "(until the engine took it), inference (prefill, decoding and the way back to its handler).",
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in self.routes else "other"
        with self._lock:
            self._requests[route, status] += 1
            self._latency.observe(route, seconds)

    def observe_phases(self, seconds: dict[str, float]) -> None:
        """A finished generation request's phases (`validation`, `queue`, `inference`), in seconds."""
        with self._lock:
            for phase, value in seconds.items():
                self._phases.observe(phase, value)

    def render(self, gauges: dict[str, tuple[str, str, Any]]) -> str:
        """The text format; ``gauges`` maps a metric name to (type, help, value)."""
        lines = [
            "# HELP fimtune_requests_total HTTP requests by route and status.",
            "# TYPE fimtune_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self._requests.items()):
                lines.append(f'fimtune_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += self._latency.render() + self._phases.render()
        for name, (kind, help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
