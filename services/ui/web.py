"""What the browser pages share: jinja2 templates, signed session cookies
that carry a CSRF token, form bodies, HTML error pages, plain-word
statuses and usage charts drawn as SVG on the server (so they need no
JavaScript)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from contracts.api import EntitlementView, UsagePeriodView
from services.http import HTTPError
from services.readmodel import ReadModel

log = logging.getLogger("entitle.ui")

#: A form is a few fields: a larger body is no form of ours.
MAX_FORM = 64 * 1024

TEMPLATES = Environment(
    loader=PackageLoader("services.ui", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def when(value: datetime | None, with_time: bool = True) -> str:
    """A time as people read it: 2026-12-01 14:05 UTC (or the date alone)."""
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M UTC" if with_time else "%Y-%m-%d")


TEMPLATES.filters["when"] = when


def brief(value: Any, width: int = 160) -> str:
    """A value of a state change as JSON, cut to `width` characters; a
    list of seats or codes as how many, with their labels."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        names = [str(v.get("label") or v.get("fingerprint") or v.get("index", "")) for v in value]
        return f"{len(value)}: " + ", ".join(names)[:width]
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


TEMPLATES.filters["brief"] = brief


class Page:
    """Renders templates with the context every page has."""

    def __init__(self, env: Environment = TEMPLATES) -> None:
        self.env = env

    def __call__(
        self,
        request: Request,
        template: str,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(request=request, **context)
        response = HTMLResponse(html, status_code=status, headers=dict(headers or {}))
        # Pages hold codes and customers' data: never cached, never framed.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
            " frame-ancestors 'none'; form-action 'self'"
        )
        response.headers["Referrer-Policy"] = "same-origin"
        return response


render = Page()


@dataclass(frozen=True)
class Session:
    """What a session cookie holds: `subject` (an admin key's name, or the
    hash of the activation code a customer entered), a `check` that ties it
    to the credential (a key removed from ENTITLE_ADMIN_KEYS ends its
    sessions) and the CSRF token every form of the session carries."""

    subject: str
    check: str
    csrf: str


class Sessions:
    """Session cookies signed (HMAC-SHA1 by itsdangerous) with a key derived
    from ENTITLE_CODE_SECRET, so every API process reads the others'; they
    are Secure, HttpOnly and SameSite=Strict, scoped to `path`, and last
    `max_age` seconds."""

    def __init__(
        self,
        secret: str,
        name: str,
        path: str,
        max_age: int,
        ended: EndedSessions | None = None,
    ) -> None:
        """`ended`: where sessions ended by logging out are kept until they
        would have expired, so a copied cookie does not outlive its logout."""
        key = hmac.new(secret.encode(), f"entitle ui session {name}".encode(), "sha256").digest()
        self._serializer = URLSafeTimedSerializer(key, salt=name)
        self.name = name
        self.path = path
        self.max_age = max_age
        self.ended = ended

    def start(self, response: Response, subject: str, check: str) -> Session:
        """A new session, its cookie set on `response`."""
        session = self.new(subject, check)
        self.put(response, session)
        return session

    @staticmethod
    def new(subject: str, check: str) -> Session:
        """A new session, its cookie not set yet (`put`): a page can show
        its CSRF token, then carry its cookie."""
        return Session(subject, check, secrets.token_urlsafe(24))

    def put(self, response: Response, session: Session) -> None:
        value = self._serializer.dumps([session.subject, session.check, session.csrf])
        response.set_cookie(
            self.name,
            value,
            max_age=self.max_age,
            path=self.path,
            secure=True,
            httponly=True,
            samesite="strict",
        )

    def read(self, request: Request) -> Session | None:
        raw = request.cookies.get(self.name)
        if not raw or len(raw) > 4096:
            return None
        try:
            subject, check, csrf = self._serializer.loads(raw, max_age=self.max_age)
        except (BadSignature, ValueError, TypeError):
            return None
        if not all(isinstance(part, str) for part in (subject, check, csrf)):
            return None
        session = Session(subject, check, csrf)
        if self.ended is not None and self.ended.has(session.csrf):
            return None
        return session

    def log_out(self, response: Response, session: Session | None) -> None:
        """End `session` for good (the cookie too)."""
        if session is not None and self.ended is not None:
            self.ended.add(session.csrf, self.max_age)
        self.end(response)

    def end(self, response: Response) -> None:
        response.delete_cookie(
            self.name, path=self.path, secure=True, httponly=True, samesite="strict"
        )


class EndedSessions:
    """Sessions ended by logging out, by a hash of their id (the CSRF
    token), in the read model's database so every API process knows; each
    kept until it would have expired anyway."""

    def __init__(self, read_model: ReadModel) -> None:
        self._read_model = read_model
        with read_model.transaction() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS entitle_ended_sessions"
                " (id TEXT PRIMARY KEY, until TEXT NOT NULL)"
            )

    def add(self, session_id: str, seconds: int) -> None:
        now = datetime.now(UTC)
        sql = self._read_model.sql
        with self._read_model.transaction() as cur:
            cur.execute(
                sql("DELETE FROM entitle_ended_sessions WHERE until < ?"), (now.isoformat(),)
            )
            cur.execute(
                sql(
                    "INSERT INTO entitle_ended_sessions (id, until) VALUES (?, ?)"
                    " ON CONFLICT (id) DO NOTHING"
                ),
                (fingerprint(session_id), (now + timedelta(seconds=seconds)).isoformat()),
            )

    def has(self, session_id: str) -> bool:
        with self._read_model.transaction(write=False) as cur:
            cur.execute(
                self._read_model.sql("SELECT 1 FROM entitle_ended_sessions WHERE id = ?"),
                (fingerprint(session_id),),
            )
            return cur.fetchone() is not None


def fingerprint(secret: str) -> str:
    """A short hash of a credential, to tie a session to it (never the credential)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


class Form:
    """A url-encoded form body: `get` the last value of a field, `all` its values."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = list(pairs)

    def get(self, name: str, default: str = "") -> str:
        values = self.all(name)
        return values[-1] if values else default

    def pairs(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self._pairs if key == name]


async def read_form(request: Request, session: Session | None) -> Form:
    """The request's form, after its CSRF token was checked against the
    session's: 400 for a body that is no form, 403 for a missing or wrong token."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPError(415, "unsupported_media_type", "send the page's form")
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                raise HTTPError(413, "too_large", "the form is too large")
    except ClientDisconnect:
        raise HTTPError(400, "invalid_body", "the form was not sent whole") from None
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=200
        )
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "invalid_body", "the form could not be read") from None
    form = Form(pairs)
    token = form.get("csrf")
    if session is None or not token or not hmac.compare_digest(token, session.csrf):
        raise HTTPError(
            403, "csrf", "the form is stale or came from another site: reload the page and retry"
        )
    return form


Handler = Callable[[Request], Awaitable[Response]]


class SignInFirst(Exception):
    """No session, or one that ended (a key removed, a code revoked): a page
    answers with `entry`, where one signs in; a form post with a 401 page
    saying `message`."""

    def __init__(self, entry: str, message: str, come_back: bool = False) -> None:
        super().__init__(message)
        self.entry = entry
        self.message = message
        self.come_back = come_back


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """`text` fit to show on a page: control characters replaced."""
    return _CONTROL.sub("\ufffd", text)


def _home(request: Request) -> str:
    """Where an error page links back to: the portal or the console."""
    return "/portal" if request.url.path.startswith("/portal") else "/admin"


def pages(handler: Handler) -> Handler:
    """A page handler whose HTTPError is an HTML page with its status (and
    headers, e.g. Retry-After), not the API's JSON, and whose SignInFirst
    sends the browser to sign in."""

    @functools.wraps(handler)
    async def page(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as exc:
            return render(
                request,
                "error.html",
                status=exc.status,
                headers=exc.headers,
                code=exc.status,
                detail=shown(exc.detail),
                home=_home(request),
            )
        except SignInFirst as exc:
            if request.method == "GET":
                target = exc.entry
                if exc.come_back:
                    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    target += "?" + urlencode({"next": here})
                return RedirectResponse(target, status_code=303)
            return render(request, "error.html", 401, code=401, detail=exc.message, home=exc.entry)

    return page


# -- plain words ---------------------------------------------------------------


#: Reasons as a customer reads them (else the reason, its _ as spaces).
CUSTOMER_REASONS = {
    "admin": "by the vendor",
    "payment_failed": "a payment failed",
    "chargeback": "a payment was disputed",
    "refunded": "refunded",
}


def plain_status(view: EntitlementView, customer: bool = False) -> str:
    """The entitlement's status as a support person (or, `customer`, the
    buyer) says it."""
    reason = view.status_reason
    if reason and customer:
        reason = CUSTOMER_REASONS.get(reason, reason)
    reason = f" ({reason.replace('_', ' ')})" if reason else ""
    paid = when(view.period_end, with_time=False)
    match view.status:
        case "ACTIVE" if view.trial:
            text = f"Active: free trial until {paid}"
        case "ACTIVE" if view.overdue:
            text = "Active, but the last payment is overdue"
        case "ACTIVE":
            text = "Active" + (f", paid through {paid}" if view.period_end else "")
        case "PENDING":
            text = "Waiting for the first payment"
        case "SUSPENDED":
            text = f"Suspended{reason}"
        case "CANCELED":
            text = f"Canceled{reason}"
        case "EXPIRED":
            text = f"Expired on {paid}" if view.period_end else "Expired"
        case _:
            text = str(view.status)
    if view.cancel_at is not None and view.status == "ACTIVE":
        text += f"; ends {when(view.cancel_at, with_time=False)}"
    return text


# -- charts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """One metric's usage per period: an SVG bar chart and the same figures
    as rows for a table (what a screen reader reads)."""

    metric: str
    limit: int | None
    rows: list[tuple[str, int]]

    def svg(self, width: int = 320, height: int = 120) -> Markup:
        top = max([n for _, n in self.rows] + [self.limit or 0, 1])
        gap, base = 4, height - 18
        slot = min(width / max(len(self.rows), 1), 48)
        bars = []
        for i, (label, n) in enumerate(self.rows):
            h = round(n / top * (base - 4))
            x = round(i * slot + gap / 2, 1)
            bars.append(
                f'<rect x="{x}" y="{base - h}" width="{round(slot - gap, 1)}" height="{h}"'
                f' class="bar"><title>{escape(label)}: {n}</title></rect>'
                f'<text x="{round(x + (slot - gap) / 2, 1)}" y="{height - 4}"'
                f' text-anchor="middle" class="tick">{escape(label[-5:])}</text>'
            )
        limit = ""
        if self.limit:
            y = base - round(self.limit / top * (base - 4))
            limit = (
                f'<line x1="0" x2="{width}" y1="{y}" y2="{y}" class="limit"/>'
                f'<text x="{width - 2}" y="{max(y - 3, 10)}" text-anchor="end"'
                f' class="tick">limit {self.limit}</text>'
            )
        label = f"{self.metric} per period" + (f", limit {self.limit}" if self.limit else "")
        return Markup(
            f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}"'
            f' class="chart">{"".join(bars)}{limit}</svg>'
        )


def usage_charts(limits: Mapping[str, int], periods: Sequence[UsagePeriodView]) -> list[Chart]:
    """A chart per metric that has a limit or was ever used, oldest period first."""
    ordered = sorted(periods, key=lambda p: p.period_start.timestamp() if p.period_start else 0.0)
    if not ordered:
        return []  # nothing recorded yet: the page says so
    metrics = sorted({*limits, *(m for p in ordered for m in p.metrics)})
    return [
        Chart(
            metric,
            limits.get(metric),
            [(when(p.period_start, with_time=False), p.metrics.get(metric, 0)) for p in ordered],
        )
        for metric in metrics
    ]


def page_routes(spec: Sequence[tuple[str, str, Handler]]) -> list[Any]:
    """A route per path for `spec` (path, method, handler): each method
    to its handler, any other a 405 page naming the allowed ones (not the
    API's JSON)."""
    from services.openapi import PageRoute

    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in spec:
        by_path.setdefault(path, {})[method] = pages(handler)
    routes = []
    for path, handlers in by_path.items():

        async def endpoint(request: Request, handlers: dict[str, Handler] = handlers) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            handler = handlers.get(method)
            if handler is None:
                allowed = ", ".join(sorted(handlers))
                return render(
                    request,
                    "error.html",
                    405,
                    headers={"Allow": allowed},
                    code=405,
                    detail=f"this page takes {allowed}",
                    home=_home(request),
                )
            return await handler(request)

        routes.append(PageRoute(path, endpoint, methods=list(METHODS)))
    return routes


#: Every method a page route takes (answering those it has no handler for with a 405 page).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


#: The confirmations a page shows after a change (`?done=<key>`): fixed
#: words, so a link cannot make a page say anything else.
DONE = {
    "suspend": "Suspended.",
    "reinstate": "Reinstated.",
    "cancel": "Canceled.",
    "extend": "Extended.",
    "change": "Offering or seats changed.",
    "release": "Seat freed.",
    "issue-code": "Another code issued.",
    "revoke-code": "Code revoked.",
    "grant": "Granted.",
    "resent": "Sent again.",
    "recovered": "What failed is being sent again.",
    "redriven": "Re-driven.",
    "seat-freed": "The seat is free: another device can take it.",
}


def done(request: Request) -> str | None:
    """The confirmation `?done=` names, or None."""
    return DONE.get(request.query_params.get("done", ""))
