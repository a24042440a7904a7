"""What every HTTP endpoint shares: JSON errors and admin authentication."""

from __future__ import annotations

import hmac
import logging
import re
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts import describe
from contracts.api import Error
from services.config import AdminKey
from services.health import transient

log = logging.getLogger("entitle.http")
M = TypeVar("M", bound=BaseModel)
_CODE_IN_QUERY = re.compile(r"(activation_code=)([^&\s]{0,5})[^&\s]*", re.IGNORECASE)


class MaskCodes(logging.Filter):
    """Access logs show a request's query string: keep only the first five
    characters of an activation code there, never the whole code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _CODE_IN_QUERY.sub(r"\1\2…", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _CODE_IN_QUERY.sub(r"\1\2…", record.msg)
        return True


class HTTPError(Exception):
    """Raised by a handler; rendered as an `Error` JSON body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        entitlement_status: str | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.entitlement_status = entitlement_status


def aware_time(raw: str) -> datetime | None:
    """An RFC 3339 time with its UTC offset ("Z" allowed), or None if `raw`
    is not one (a time without offset included)."""
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


#: The most an API request's JSON body may take (a code, a fingerprint, a
#: label, a reason: a few hundred bytes), so no client makes us hold more.
MAX_JSON_BYTES = 64 * 1024


def too_large(limit: int) -> HTTPError:
    return HTTPError(413, "payload_too_large", f"the body exceeds {limit} bytes")


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it exceeds `limit` bytes (by
    its Content-Length or as it arrives); a 400 if the client went away."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(
            400, "client_disconnected", "the request body was not fully received"
        ) from None
    return b"".join(chunks)


async def read_json(request: Request, model: type[M], limit: int = MAX_JSON_BYTES) -> M:
    """The request's JSON body as `model`, or a 422 saying what is wrong
    (a 413 past `limit` bytes)."""
    return parse_json(await read_limited(request, limit), model)


def parse_json(body: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPError(422, "invalid_body", describe(exc)) from None


async def read_body(receive: Receive, limit: int = MAX_JSON_BYTES) -> bytes:
    """A bare ASGI app's request body; a 413 past `limit` bytes, a 400 if
    the client went away."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "client_disconnected", "the request body was not fully received")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Send, status: int, payload: bytes) -> None:
    """A bare ASGI app's JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class Shortcut:
    """`app`, except that requests for `path` go straight to `endpoint`,
    without `app`'s middleware and routing (a few tens of microseconds a
    request). Other methods on `path` get a 405."""

    def __init__(self, app: Starlette, method: str, path: str, endpoint: ASGIApp) -> None:
        self.app, self.method, self.path, self.endpoint = app, method, path, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
        elif scope["method"] == self.method:
            await self.endpoint(scope, receive, send)
        else:
            response = error_response(405, "method_not_allowed", "Method Not Allowed")
            response.headers["Allow"] = self.method
            await response(scope, receive, send)


def busy() -> HTTPError:
    return HTTPError(503, "busy", "the entitlement kept changing; retry", {"Retry-After": "1"})


def error_response(
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    entitlement_status: str | None = None,
) -> JSONResponse:
    body = Error(error=code, detail=detail, status=status, entitlement_status=entitlement_status)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


async def handle_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    return http_error_response(exc)


def http_error_response(exc: HTTPError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.detail, exc.headers, exc.entitlement_status)


async def handle_starlette_error(_: Request, exc: Exception) -> JSONResponse:
    status = int(getattr(exc, "status_code", 500))
    detail = str(getattr(exc, "detail", "")) or "error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return error_response(status, code, detail)


async def handle_internal_error(_: Request, exc: Exception) -> JSONResponse:
    return internal_error_response(exc)


def internal_error_response(exc: Exception) -> JSONResponse:
    if transient(exc):
        log.warning("unavailable: %s: %s", type(exc).__name__, exc)
        return error_response(
            503, "unavailable", "the database is unavailable; retry", {"Retry-After": "5"}
        )
    log.error("unhandled error: %r", exc, exc_info=exc)
    return error_response(500, "internal_error", "the server failed; the error is logged")


def authenticate(request: Request, keys: list[AdminKey]) -> AdminKey:
    """The admin key named by `Authorization: Bearer <key>`, or a 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(
            401,
            "unauthorized",
            "this route needs 'Authorization: Bearer <admin key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    token = token.strip()
    for key in keys:
        if hmac.compare_digest(key.secret.encode(), token.encode()):
            return key
    raise HTTPError(
        401,
        "unauthorized",
        "the bearer token is not a valid admin key",
        {"WWW-Authenticate": "Bearer"},
    )
