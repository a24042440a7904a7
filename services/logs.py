"""Log lines: text or JSON (`--log-format`, ENTITLE_LOG_FORMAT), and one
line per HTTP request with its request id.

Every line passes `MaskCodes` (activation codes cut to five characters,
seat secrets to their prefix); no secret is ever a field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.http import MASKED, MaskCodes, mask, mask_short

access = logging.getLogger("entitle.access")
#: Routes whose successful answers are logged at DEBUG only: the hot path
#: and the probes, thousands a second or every few seconds (a line each
#: would cost more than the answer). Their errors are logged as any other.
QUIET = frozenset({"/v1/validate", "/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The scope key of the fields a handler adds to its request's line.
NOTED = "entitle.log"


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the
    record's `fields` (structured data a caller passed as extra)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            # As `MaskCodes` masked it, when it did.
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str, level: str = "info") -> None:
    """Send every logger's lines (uvicorn's too) through one handler on
    stderr, in `log_format` ("text" or "json"), masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLines()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(MaskCodes())
    # No line shows the thread or process: spare each record finding them
    # (https://docs.python.org/3/howto/logging.html#optimization). The
    # caller's frame stays: without it `stack_info=True` is lost.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # The server's guard writes a request line for what it refuses, within
    # the lines' budget; uvicorn's own warnings for a request would be more
    # lines, without (anyone can send a bad head or ask for a WebSocket).
    logging.getLogger("uvicorn.error").addFilter(_PerRequest())
    logging.getLogger("entitle").setLevel(level.upper())
    # The stripe library writes two lines a call at info level; its errors
    # reach our own lines (entitle.stripe).
    logging.getLogger("stripe").setLevel(logging.WARNING)


class _PerRequest(logging.Filter):
    """uvicorn's warnings about one request: it is answered (a 400 the guard
    logs, or as plain HTTP) and has its request line."""

    QUIET = (
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "No supported WebSocket library detected.",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.QUIET))


def route_of(shortcuts: frozenset[str] = frozenset()) -> Callable[[Scope], str | None]:
    """The path template a request was routed to (Starlette records the
    route in the scope), or its path if one of `shortcuts` (routes served
    in front of the router); None when nothing matched."""

    def route(scope: Scope) -> str | None:
        found = getattr(scope.get("route"), "path", None)
        if found is not None:
            return str(found)
        return scope["path"] if scope["path"] in shortcuts else None

    return route


class RequestLog:
    """ASGI middleware: answers carry `X-Request-Id` (the client's, when it
    sent a sane one: up to 128 of `A-Za-z0-9._:-`; else a new one), and each
    request is one line on `entitle.access` with method, route (the path
    template, e.g. /v1/entitlements/{id}; the masked path when no route
    matched), status, duration in ms and the request id.

    Lines are written within `budget` (`LineBudget`): the requests beyond it
    are counted by method, route and status, and said in one line at the
    end of that second, or as the server stops. A 5xx the app answers is
    always a line of its own. Under load a line each cost the ingress a
    fifth of its throughput (bench/ingest.py --compare: 0.67 of the bare
    handler with a line each, 0.83 within the budget), for lines nobody
    reads one by one; every webhook's receipt is in the store either way."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Callable[[Scope], str | None],
        budget: LineBudget | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.budget = budget or LineBudget()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._stopping(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        ours = not _REQUEST_ID.fullmatch(given)
        request_id = uuid.uuid4().hex if ours else given
        status = 0

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    *(h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"),
                    (b"x-request-id", request_id.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            route = self.routes(scope)
            ms = (time.perf_counter() - started) * 1000
            quiet = route in QUIET and 200 <= status < 300
            level = logging.DEBUG if quiet else logging.INFO
            if access.isEnabledFor(level) and (
                level != logging.INFO
                or status >= 500
                # Unmatched paths under one name: a scan of many paths would
                # otherwise make the summary line as long as the lines it saves.
                or self.budget.take((scope["method"], route or "(no route)", status))
            ):
                shown = route or mask_short(scope["path"])
                # Masked here, once, and only what a client or provider
                # chose: a request id of ours is hex that looks like a code.
                shown_id = request_id if ours else mask(request_id)
                # What the handler noted for this line (the ingress: the
                # stored webhook's source, event and receipt), so a webhook
                # is one line, not two: logging was half of the ingress's
                # CPU per webhook (bench/ingest.py --compare).
                noted = {k: mask(v) for k, v in (scope.get(NOTED) or {}).items()}
                access.log(
                    level,
                    "%s %s %d %.1f ms id=%s" + " %s=%s" * len(noted),
                    scope["method"],
                    shown,
                    status,
                    ms,
                    shown_id,
                    *(part for item in noted.items() for part in item),
                    extra={
                        "fields": {
                            "method": scope["method"],
                            "route": shown,
                            "status": status,
                            "duration_ms": round(ms, 2),
                            "request_id": shown_id,
                            **noted,
                        },
                        MASKED: True,
                    },
                )

    def _stopping(self, send: Send) -> Send:
        """`send` for the lifespan, saying what is held as the server stops
        (its requests are answered by then), not after a second that would
        never come."""

        async def lifespan(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown"):
                self.budget.say_held()
            await send(message)

        return lifespan


class LineBudget:
    """At most `per_second` request lines a second on `entitle.access` (0:
    no limit), shared by a process's `RequestLog` and its server's guards;
    what is held back is counted by method, route and status and said in
    one line at the end of that second, like journald's rate limit."""

    def __init__(self, per_second: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.clock = clock
        self._second = 0  # the monotonic second being counted
        self._lines = 0  # lines written in it
        self._held: dict[tuple[str, str, int], int] = {}

    def take(self, request: tuple[str, str, int]) -> bool:
        """Whether the line of `request` (method, route, status) fits this
        second's budget; if not, it is counted for the second's summary
        line, which the first one held back arranges."""
        if not self.per_second:
            return True
        now = self.clock()
        second = int(now)
        if second != self._second:
            self._second, self._lines = second, 0
        if self._lines < self.per_second:
            self._lines += 1
            return True
        if not self._held:
            # A little after the second ends: a timer may fire a millisecond
            # early, and requests of the same second would then start a
            # second summary of it.
            asyncio.get_running_loop().call_later(second + 1.05 - now, self.say_held)
        self._held[request] = self._held.get(request, 0) + 1
        return False

    def say_held(self) -> None:
        held, self._held = self._held, {}
        if not held:
            return
        total = sum(held.values())
        parts = sorted(held.items(), key=lambda item: -item[1])
        access.info(
            "%d more %s in the last second, not logged one by one (at most %d %s"
            " a second, ENTITLE_ACCESS_LINES): %s",
            total,
            "request" if total == 1 else "requests",
            self.per_second,
            "line" if self.per_second == 1 else "lines",
            ", ".join(f"{n} {m} {route} {status}" for (m, route, status), n in parts),
            extra={
                "fields": {
                    "not_logged": total,
                    "requests": [
                        {"method": m, "route": route, "status": status, "count": n}
                        for (m, route, status), n in parts
                    ],
                },
                MASKED: True,
            },
        )
