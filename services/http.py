"""What every HTTP endpoint shares: JSON errors, admin authentication,
rate limits per client, and access logs without credentials."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import math
import re
import threading
import time
import uuid
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote_plus

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts import describe
from contracts.api import Error
from contracts.text import rfc3339_time
from services.codes import SEAT_SECRET
from services.config import AdminKey
from services.health import transient

log = logging.getLogger("entitle.http")
M = TypeVar("M", bound=BaseModel)
_QUERY = re.compile(r"\?([^\s\"#]*)")
# A path segment, query parameter name or value: what a secret could hide in.
_PART = re.compile(r"[^\s\"/?&=#]+")


class MaskCodes(logging.Filter):
    """Every line, whatever logged it (ours, uvicorn's, the stripe
    library's): activation codes cut to their first five characters and
    seat secrets to their prefix, however either is written or
    percent-encoded, in the message, its structured `fields` and a
    traceback. The message is formatted here, once, and kept as text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, MASKED, False):
            return True  # its maker masked what a client could put in it
        try:
            message = record.getMessage()
        except Exception:  # a bad call (e.g. too few arguments) is no crash of its caller
            message = f"{record.msg} (arguments it could not take: {record.args!r})"
        record.msg, record.args = mask(message), ()
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = _masked(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True


def _masked(value: Any) -> Any:
    """`value` (a line's fields) with every text in it masked: what JSON
    writes as it is (numbers, booleans, null) is kept, anything else
    (bytes, sets, objects) becomes its text, masked, as the line would show it."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {mask(str(key)): _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask(str(value))


#: A log record's attribute (pass it in `extra`): its arguments and fields
#: are masked already, the filter leaves it as it is.
MASKED = "entitle_masked"


def mask(text: str) -> str:
    """`text` (a path, a query string, a log line) with activation codes cut
    to five characters and seat secrets to their prefix: in every form
    validation accepts (any case, O for 0, I or L for 1, groups apart by a
    hyphen or a space or not at all), percent-encoded once or more."""
    if len(text) < _SHORTEST_SECRET:
        return text  # percent-encoding only lengthens a secret
    if not text.isascii():
        # Letters that validation's upper-casing makes two ("ß" is "SS",
        # "ﬁ" is "FI"), written as validation reads them.
        text = "".join(c.upper() if len(c.upper()) > 1 else c for c in text)
    # Nothing to decode and no query: a secret would show as itself. Two
    # searches instead of a callback per path segment: masking was two
    # thirds of an access line's cost (40 of 59 µs, timeit).
    if not _ENCODED_OR_QUERY.search(text) and not (
        _CODE.search(text) or _ANY_SEAT_SECRET.search(text)
    ):
        return text
    # Segment by segment (each decoded), then across segments: a code typed
    # with spaces is several segments.
    return _mask_codes(_PART.sub(_mask_secret, _QUERY.sub(_mask_query, text)))


#: Letters, digits, "_", hyphens, whitespace, "%" and "\\": what the start of
#: a code or secret (written any way masking reads) is made of.
_RUN_AT_END = re.compile(r"[0-9A-Za-z_\s%\\-]+$")


def mask_short(text: str, limit: int = 512) -> str:
    """`mask(text)`, cut to about `limit` characters: a path a client chose
    may be 32 KB, which took masking 24 ms (linear, but not for every
    request). Where it is cut, the run of characters a code or secret could
    begin with is left out too, so no part of one shows."""
    if len(text) <= limit:
        return mask(text)
    head = _RUN_AT_END.sub("", text[:limit])
    return f"{mask(head)}…({len(text) - len(head)} more characters)"


def _decodings(raw: str) -> list[str]:
    """`raw` and each round of percent-decoding it until it no longer
    changes (a few rounds at most): a secret may show in any of them (the
    last round can turn "%04J91" into a control character and "J91")."""
    forms = [raw]
    for _ in range(3):
        decoded = unquote_plus(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _decoded(raw: str) -> str:
    """`raw` percent-decoded until it no longer changes, so a
    double-encoded name is recognised too."""
    return _decodings(raw)[-1]


def _mask_query(match: re.Match[str]) -> str:
    parts = []
    for part in match.group(1).split("&"):
        name, equals, value = part.partition("=")
        # However the name is written (activation%5Fcode, ACTIVATION_CODE,
        # activation+code), the value may be a code: over-masking costs nothing.
        if equals and re.sub(r"[^a-z]", "", _decoded(name).lower()) == "activationcode":
            part = f"{name}={quote(_decoded(value)[:5], safe='')}…"
        parts.append(part)
    return "?" + "&".join(parts)


#: An activation code anywhere (a path segment, any parameter): 25
#: characters of Crockford's base32 as validation reads them (any case; O,
#: I and L too, read as 0 and 1; `domain.entitlement.normalize_code`), in
#: five groups of five; hyphens anywhere, hyphens and spaces between groups
#: (either percent-encoded too). Spaces only between groups: anywhere, they
#: would make a code of any 25 letters of a sentence.
_S = "[0-9A-TV-Z]"
#: Between groups: a hyphen or whitespace, percent-encoded, or escaped as
#: `repr` writes whitespace ("\\t", "\\u3000") in a line that shows a repr.
_GAP = r"(?:[-\s]|%2[0D]|\\(?:[tnrfv]|x[0-9a-f]{2}|u[0-9a-f]{4}))"
_GROUP = rf"{_S}(?:(?:-|%2D)*{_S}){{4}}"
_CODE = re.compile(rf"{_GROUP}(?:{_GAP}*{_GROUP}){{4}}", re.I)
#: The form codes are shown in (and a person copies): masked whatever adjoins it.
_SHOWN = re.compile(rf"{_S}{{5}}(?:{_GAP}+{_S}{{5}}){{4}}", re.I)
_GAPS = re.compile(rf"{_GAP}*", re.I)
_GAPS_BEFORE = re.compile(rf"{_GAP}*$", re.I)
_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ANY_SEAT_SECRET = re.compile(SEAT_SECRET.pattern, re.IGNORECASE)
_SHORTEST_SECRET = 19  # "es_" and 16 characters; a code takes 25
_ENCODED_OR_QUERY = re.compile(r"[%+?]")


def _cut(match: re.Match[str]) -> str:
    return match.group(0)[:5] + "…"


def _cut_alone(match: re.Match[str]) -> str:
    """A match in any other form is a code only when it stands alone (no
    letter or digit next to it, past hyphens and spaces): 25 of a longer
    run, such as a hex id, a UUID or a ULID (Paddle's event ids), is not,
    and cutting it would hide ids people look for."""
    text = match.string
    # Only the few characters before it: the whole text before each match
    # made masking quadratic (a 32 KB path of letters took seconds). Gaps
    # longer than that count as standing alone.
    before = text[max(0, match.start() - 64) : match.start()]
    before = before[: len(before) - len(_GAPS_BEFORE.search(before).group(0))]  # type: ignore[union-attr]
    after_gap = _GAPS.match(text, match.end())
    after = after_gap.end() if after_gap else match.end()
    if (before and before[-1] in _ALNUM) or (after < len(text) and text[after] in _ALNUM):
        return match.group(0)
    return _cut(match)


def _mask_codes(text: str) -> str:
    return _CODE.sub(_cut_alone, _SHOWN.sub(_cut, text))


def _mask_secret(match: re.Match[str]) -> str:
    part = match.group(0)
    forms = _decodings(part)
    if any(_ANY_SEAT_SECRET.search(form) for form in forms):
        return "es_…"
    for form in forms:
        masked = _mask_codes(form)
        if masked != form:
            return masked
    return part


class Buckets:
    """Token buckets by key (a code hash, a client address): `rate` tokens a
    second up to `burst`. Idle keys are forgotten oldest first."""

    def __init__(self, rate: float, burst: int, keys: int = 100_000) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        # A plain dict keeps insertion order: re-inserting a key on each take
        # makes the first key the least recently used.
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1 - tokens) / self.rate
            if len(self._buckets) > self.keys:
                del self._buckets[next(iter(self._buckets))]
            return wait

    def wait(self, key: str, now: float) -> float:
        """What `take` would answer, without taking a token."""
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def rate_limited(wait: float, detail: str = "too many requests; slow down") -> HTTPError:
    """429 with `Retry-After`: the whole seconds until `wait` has passed."""
    return HTTPError(429, "rate_limited", detail, {"Retry-After": str(max(1, math.ceil(wait)))})


def client_address(scope: Scope) -> str:
    """Who the client is, as the rate limits count it: its address (behind
    a trusted proxy, the one it forwarded) written one way ("2001:DB8::7",
    "2001:db8:0:0:0:0:0:7" and "::ffff:6.6.6.9" are not new clients), and
    for IPv6 its /64, the least a site is given (RFC 6177): a client
    choosing addresses in its own network is still one client."""
    client = scope.get("client")
    if not client:
        return "?"
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return str(client[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
    """An RFC 3339 date-time with its UTC offset ("Z" allowed), in UTC, or
    None if `raw` is not exactly one: no offset, an ISO week or ordinal
    date, a "," fraction, non-ASCII digits or any other ISO 8601 form
    that `datetime.fromisoformat` would take are refused. The same parser
    as request bodies' times (`contracts.text.Moment`)."""
    return rfc3339_time(raw)


def ascii_int(raw: str) -> int | None:
    """A whole number written in ASCII digits (not fullwidth or superscript
    ones, which `str.isdigit` takes), or None."""
    return int(raw) if raw.isascii() and raw.isdigit() else None


#: What a part of a paging cursor is: a log position (a 64-bit integer, not
#: a bool), an id (a UUID as the API writes it), or an RFC 3339 time.
CursorPart = Literal["position", "id", "time"]


def _cursor_part(kind: CursorPart, value: Any) -> bool:
    if kind == "position":
        return type(value) is int and 0 <= value < 2**63
    if not isinstance(value, str) or not value.isprintable():
        return False
    if kind == "id":
        try:
            return str(uuid.UUID(value)) == value
        except ValueError:
            return False
    return aware_time(value) is not None


def encode_cursor(*parts: int | str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode()


def decode_cursor(raw: str | None, *kinds: CursorPart) -> tuple[Any, ...] | None:
    """The parts of a cursor `encode_cursor` made, each of its kind; a 422
    for anything else, before a database sees it (a number past 64 bits, a
    NUL, half a surrogate pair)."""
    if raw is None:
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (ValueError, TypeError, RecursionError):
        parts = None
    if (
        isinstance(parts, list)
        and len(parts) == len(kinds)
        and all(_cursor_part(k, v) for k, v in zip(kinds, parts, strict=True))
    ):
        return tuple(parts)
    raise HTTPError(422, "invalid_query", "cursor is not one this API gave (next_cursor)")


#: The most an API request's JSON body may take (a code, a fingerprint, a
#: label, a reason: a few hundred bytes), so no client makes us hold more.
MAX_JSON_BYTES = 64 * 1024


def too_large(limit: int) -> HTTPError:
    # The rest of the body is not read: the connection cannot carry another request.
    return HTTPError(
        413, "payload_too_large", f"the body exceeds {limit} bytes", {"Connection": "close"}
    )


class BodyBudget:
    """The request body bytes all of a process's requests may hold at once
    while they are read (ENTITLE_HTTP_MAX_BODY_BUFFER): a thousand clients
    each sending 1 MiB slowly would otherwise hold a gigabyte."""

    def __init__(self, limit: int = 64 * 1024 * 1024) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise HTTPError(
                503,
                "busy",
                "the server holds as many request bodies as it may; retry",
                {"Retry-After": "1", "Connection": "close"},
            )
        self.held += size


BODIES = BodyBudget()


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it exceeds `limit` bytes (by
    its Content-Length or as it arrives); a 400 if the client went away; a
    503 while the process holds its most body bytes (`BODIES`)."""
    return await read_limited_body(request.scope, request.receive, limit)


async def read_json(request: Request, model: type[M], limit: int = MAX_JSON_BYTES) -> M:
    """The request's JSON body as `model`, or a 422 saying what is wrong
    (a 413 past `limit` bytes)."""
    return parse_json(await read_limited(request, limit), model)


def parse_json(body: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPError(422, "invalid_body", describe(exc)) from None


async def read_limited_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """`read_limited` for a bare ASGI app (the ingress's hot path)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(
                    400, "client_disconnected", "the request body was not fully received"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            BODIES.take(len(chunk))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        BODIES.held -= sum(map(len, chunks))


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
    request). Other methods on `path` get a 405. With `prefix`, `path` ends
    in "/" and matches any one more non-empty path segment (`/webhooks/x`)."""

    def __init__(
        self, app: ASGIApp, method: str, path: str, endpoint: ASGIApp, prefix: bool = False
    ) -> None:
        self.app, self.method, self.path, self.endpoint = app, method, path, endpoint
        self.prefix = prefix

    def _matches(self, path: str) -> bool:
        if not self.prefix:
            return path == self.path
        rest = path[len(self.path) :]
        return path.startswith(self.path) and bool(rest) and "/" not in rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._matches(scope["path"]):
            await self.app(scope, receive, send)
        elif scope["method"] == self.method:
            await self.endpoint(scope, receive, send)
        else:
            response = error_response(405, "method_not_allowed", "Method Not Allowed")
            response.headers["Allow"] = self.method
            await response(scope, receive, send)


def request_id(request: Request) -> str:
    """The request's `Idempotency-Key` (a retry with the same one changes
    nothing again), else a new id; 422 for one over 255 characters or with
    anything but printable ASCII (it is stored as the cause's id)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return str(uuid.uuid4())
    if not 1 <= len(key) <= 255 or not all(" " < c < "\x7f" for c in key):
        raise HTTPError(
            422, "invalid_header", "Idempotency-Key must be 1 to 255 printable ASCII characters"
        )
    return key


def busy(what: str = "the entitlement") -> HTTPError:
    return HTTPError(503, "busy", f"{what} kept changing; retry", {"Retry-After": "1"})


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


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(
    request: Request, keys: list[AdminKey], failures: Buckets | None = None
) -> AdminKey:
    """The admin key named by `Authorization: Bearer <key>`, or a 401.

    With `failures`, each wrong key takes a token from the client address's
    bucket; while it is empty every admin request from that address is a 429
    with Retry-After, the right key included, so that guessing learns nothing.
    A request without a key is not counted."""
    address, now = client_address(request.scope), time.monotonic()
    if failures is not None and (wait := failures.wait(address, now)) > 0:
        raise rate_limited(wait, "too many wrong admin keys from this address; retry later")
    token = bearer_token(request)
    if token is None:
        raise HTTPError(
            401,
            "unauthorized",
            "this route needs 'Authorization: Bearer <admin key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    for key in keys:
        if hmac.compare_digest(key.secret.encode(), token.encode()):
            return key
    if failures is not None:
        failures.take(address, now)
    raise HTTPError(
        401,
        "unauthorized",
        "the bearer token is not a valid admin key",
        {"WWW-Authenticate": "Bearer"},
    )
