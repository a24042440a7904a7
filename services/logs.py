"""Log lines: text or JSON (`--log-format`, ENTITLE_LOG_FORMAT), and one
line per HTTP request with its request id.

Every line passes `MaskCodes` (activation codes cut to five characters,
seat secrets to their prefix); no secret is ever a field.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.http import MaskCodes, mask

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
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
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
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.getLogger("entitle").setLevel(level.upper())


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
    matched), status, duration in ms and the request id."""

    def __init__(self, app: ASGIApp, routes: Callable[[Scope], str | None]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
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
            if access.isEnabledFor(logging.DEBUG if quiet else logging.INFO):
                shown = route or mask(scope["path"])
                # What the handler noted for this line (the ingress: the
                # stored webhook's source, event and receipt), so a webhook
                # is one line, not two: logging was half of the ingress's
                # CPU per webhook (bench/ingest.py --compare).
                noted: dict[str, str] = scope.get(NOTED) or {}
                access.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "%s %s %d %.1f ms id=%s" + " %s=%s" * len(noted),
                    scope["method"],
                    shown,
                    status,
                    ms,
                    request_id,
                    *(part for item in noted.items() for part in item),
                    extra={
                        "fields": {
                            "method": scope["method"],
                            "route": shown,
                            "status": status,
                            "duration_ms": round(ms, 2),
                            "request_id": request_id,
                            **noted,
                        }
                    },
                )
