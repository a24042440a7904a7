"""The admin console (`/admin`): the admin API as pages, for support and
renewals staff. A login with an admin key starts a session (a signed
cookie: Secure, HttpOnly, SameSite=Strict, 8 hours) whose CSRF token every
form carries; each change is recorded under the key's name, as through the
API.

Every change goes through a preview: the change is made on a copy of the
entitlement folded from the store, never saved, and the page shows each
field it would change (or why it is refused) before the admin confirms.
The preview mints the request id, so a confirmation sent twice is applied
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from urllib.parse import urlencode

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute

from contracts.api import AdminAction, EntitlementView, GrantCustomer, ManualGrant, TermsChange
from contracts.events import Status
from contracts.webhooks import RAW_TOPIC
from domain.entitlement import Refused, code_hash
from domain.receipt import OUTCOMES
from services.api import ADMIN_ACTIONS, API, MANUAL
from services.config import AdminKey
from services.fold import CONSUMER_GROUP
from services.health import describe
from services.http import (
    HTTPError,
    ascii_int,
    aware_time,
    client_address,
    decode_cursor,
    encode_cursor,
    rate_limited,
)
from services.kafka import group_lag
from services.outbound.webhooks import KIND as WEBHOOK_KIND
from services.outbound_api import (
    OutboundAPI,
    delivery_view,
    job_endpoint,
    recover,
    unsendable_job,
)
from services.projections import entitlement_view
from services.readmodel import UnreadableRow
from services.timeline import NotThen, NotYet, as_of, changes, with_state
from services.ui.web import (
    Chart,
    EndedSessions,
    Form,
    Session,
    Sessions,
    SignInFirst,
    done,
    fingerprint,
    page_routes,
    plain_status,
    read_form,
    render,
    usage_charts,
)

log = logging.getLogger("entitle.ui.admin")

STATUSES = sorted(get_args(Status))
#: What a preview can be asked for, and how the confirm button says it.
CHANGES = {
    "suspend": "Suspend",
    "reinstate": "Reinstate",
    "cancel": "Cancel",
    "extend": "Extend",
    "change": "Change offering or seats",
    "release": "Free the seat",
    "issue-code": "Issue another code",
    "revoke-code": "Revoke the code",
}
PAGE = 25


class Console:
    """The admin console's pages over the admin API's objects."""

    def __init__(
        self,
        api: API,
        outbound: OutboundAPI,
        secret: str,
        redrive: Callable[[list[uuid.UUID]], tuple[int, int]],
        kafka_bootstrap: str | None,
        head: Callable[[], int],
    ) -> None:
        self.api = api
        self.outbound = outbound
        self.sessions = Sessions(
            secret, "entitle_admin", "/admin", 8 * 3600, EndedSessions(api.read_model)
        )
        # The login form's own token, before there is a session.
        self.login_sessions = Sessions(secret, "entitle_login", "/admin", 3600)
        self.redrive_letters = redrive
        self.kafka_bootstrap = kafka_bootstrap
        self.head = head

    # -- sessions --------------------------------------------------------------

    def _session(self, request: Request) -> tuple[AdminKey, Session]:
        session = self.sessions.read(request)
        if session is not None:
            for key in self.api.keys:
                if key.name == session.subject and hmac.compare_digest(
                    fingerprint(key.secret), session.check
                ):
                    return key, session
        raise SignInFirst("/admin/login", "Your session ended: log in again.", come_back=True)

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request)

    def _login_page(
        self, request: Request, error: str | None = None, status: int = 200
    ) -> Response:
        session = self.login_sessions.new("login", "")
        page = render(request, "admin/login.html", status, csrf=session.csrf, error=error)
        self.login_sessions.put(page, session)
        return page

    async def login(self, request: Request) -> Response:
        form = await read_form(request, self.login_sessions.read(request))
        address, now = client_address(request.scope), time.monotonic()
        failures = self.api.failures
        if (wait := failures.wait(address, now)) > 0:
            raise rate_limited(wait, "too many wrong admin keys from this address; retry later")
        given = form.get("key")
        for key in self.api.keys:
            if hmac.compare_digest(key.secret.encode(), given.encode()):
                response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
                self.sessions.start(response, key.name, fingerprint(key.secret))
                self.login_sessions.end(response)
                log.info("admin console login by %s", key.name)
                return response
        if given:
            failures.take(address, now)
        return self._login_page(request, "That is not an admin key.", 401)

    async def logout(self, request: Request) -> Response:
        _, session = self._session(request)
        await read_form(request, session)
        response = RedirectResponse("/admin/login", status_code=303)
        await anyio.to_thread.run_sync(self.sessions.log_out, response, session)
        return response

    def _page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        key, session = self._session(request)
        return render(request, template, status, csrf=session.csrf, admin=key.name, **context)

    # -- dashboard -------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        self._session(request)
        read_model = self.api.read_model
        now = self.api.clock()
        hour = now.replace(minute=0, second=0, microsecond=0)
        since = hour - timedelta(hours=23)

        def read() -> dict[str, Any]:
            head = self.head()
            return {
                "counts": read_model.status_counts(),
                "hours": read_model.webhooks_per_hour(since),
                "parked": read_model.parked(),
                "projector_lag": {
                    name: max(0, head - position)
                    for name, position in sorted(read_model.positions().items())
                    if not name.startswith("entitle.webhooks")
                },
                "dead_letters": read_model.unresolved_letter_count(),
            }

        figures = await anyio.to_thread.run_sync(read)
        consumer_lag: dict[int, int] | None = None
        if self.kafka_bootstrap is not None:
            try:
                consumer_lag = await asyncio.wait_for(
                    group_lag(self.kafka_bootstrap, RAW_TOPIC, CONSUMER_GROUP), 4
                )
            except Exception as exc:
                log.info("consumer lag unavailable: %s", describe(exc))
        hours = [((hour - timedelta(hours=23 - i)).strftime("%Y-%m-%dT%H"), 0) for i in range(24)]
        per_hour = Chart(
            "webhooks",
            None,
            [(label[-2:] + "h", figures["hours"].get(label, 0)) for label, _ in hours],
        )
        return self._page(
            request,
            "admin/dashboard.html",
            counts={s: figures["counts"].get(s, 0) for s in STATUSES},
            total=sum(figures["counts"].values()),
            per_hour=per_hour,
            webhooks_24h=sum(figures["hours"].values()),
            parked=figures["parked"],
            dead_letters=figures["dead_letters"],
            projector_lag=figures["projector_lag"],
            consumer_lag=consumer_lag,
        )

    # -- entitlements ------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        self._session(request)
        query = request.query_params
        fields = {
            name: query.get(name, "").strip()[:255]
            for name in ("customer_email", "order_ref", "customer_id", "code", "status", "offering")
        }
        if fields["status"] and fields["status"] not in STATUSES:
            raise HTTPError(422, "invalid_query", f"status must be one of {', '.join(STATUSES)}")
        cursor = decode_cursor(query.get("cursor"), "id") if query.get("cursor") else None
        read_model = self.api.read_model

        def find() -> tuple[list[EntitlementView], str | None]:
            if fields["code"]:
                try:
                    view = read_model.by_code(code_hash(fields["code"]))
                except UnreadableRow as exc:
                    raise HTTPError(500, "unreadable", str(exc)) from None
                return ([view] if view is not None else []), None
            filters = {k: v or None for k, v in fields.items() if k != "code"}
            return read_model.entitlement_page(PAGE, cursor[0] if cursor else None, filters=filters)

        items, after = await anyio.to_thread.run_sync(find)
        more = None
        if after is not None:
            more = "?" + urlencode(
                {**{k: v for k, v in fields.items() if v}, "cursor": encode_cursor(after)}
            )
        return self._page(
            request,
            "admin/search.html",
            fields=fields,
            statuses=STATUSES,
            offerings=sorted(o.sku for o in self.api.config.catalog),
            items=items,
            more=more,
            plain_status=plain_status,
        )

    async def entitlement(self, request: Request) -> Response:
        self._session(request)
        entitlement_id = _id(request)
        query = request.query_params
        raw_at = query.get("as_of", "").strip()
        at = None
        if raw_at:
            at = _moment(raw_at)
            if at is None:
                raise HTTPError(422, "invalid_query", "as_of must be a date and time (UTC)")
        raw_version = query.get("as_of_version", "").strip()
        version = ascii_int(raw_version) if raw_version and len(raw_version) <= 9 else None
        if raw_version and (version is None or version < 1):
            raise HTTPError(422, "invalid_query", "as_of_version must be a version: 1, 2, …")
        if at is not None and version is not None:
            raise HTTPError(422, "invalid_query", "give as_of or as_of_version, not both")
        api = self.api

        def read() -> tuple[EntitlementView | None, list[Any], str | None]:
            """(the view then, or now; the history with each event's state; a note)."""
            view: EntitlementView | None = None
            note = None
            if at is not None or version is not None:
                try:
                    view = api.with_codes(
                        as_of(api.store, entitlement_id, at, version, now=api.clock())
                    )
                except NotThen as exc:
                    note = str(exc)
                except NotYet as exc:
                    raise HTTPError(422, "invalid_query", str(exc)) from None
            events = api.store.history(entitlement_id)
            if not events or type(events[0]).__qualname__.split(".")[0] != "Entitlement":
                raise HTTPError(404, "not_found", f"no entitlement {entitlement_id}")
            entries = with_state(events, api.read_model.receipts_of, api.with_codes)
            if at is None and version is None:
                # Folded from the store, not the read model: a change made a
                # moment ago shows at once.
                view = entries[-1].state
            return view, entries, note

        view, entries, note = await anyio.to_thread.run_sync(read)
        # An action's reason is in its fact, on one of the events it made:
        # every event of the same request shows it.
        by_request = {
            (e.cause.kind, e.cause.event_id): reason
            for e in entries
            if e.cause is not None and (reason := reason_of(e.data))
        }
        reasons = {
            e.version: reason_of(e.data)
            or (by_request.get((e.cause.kind, e.cause.event_id)) if e.cause else None)
            for e in entries
        }
        offerings = sorted(o.sku for o in api.config.catalog if not view or o.sku != view.offering)
        # A floating seat's lease is renewed by heartbeats, recorded once
        # half of it has passed: the last recorded one is a lease before its end.
        offering = api.config.catalog.get(view.offering) if view else None
        heartbeats = {
            seat.id: seat.lease_until - timedelta(seconds=offering.lease_seconds)
            for seat in (view.activations if view else [])
            if seat.lease_until is not None and offering is not None and offering.floating
        }
        return self._page(
            request,
            "admin/entitlement.html",
            view=view,
            note=note,
            as_of=raw_at or (f"version {version}" if version else ""),
            as_of_input=raw_at,
            reasons=reasons,
            status_note=next(
                (
                    reasons[e.version]
                    for e in reversed(entries)
                    if "status" in e.changes and reasons[e.version]
                ),
                None,
            ),
            entries=list(reversed(entries)),
            charts=usage_charts(view.limits, view.usage) if view else [],
            plain_status=plain_status,
            offerings=offerings,
            heartbeats=heartbeats,
            done=done(request),
            actions=list(ADMIN_ACTIONS),
        )

    # -- changes -----------------------------------------------------------------

    async def preview(self, request: Request) -> Response:
        key, session = self._session(request)
        form = await read_form(request, session)
        entitlement_id = _id(request)
        action, args = _change_args(form)
        request_id = f"console-{secrets.token_hex(12)}"
        api = self.api
        change = api.admin_change(action, key.name, request_id, **args)

        def try_it() -> tuple[EntitlementView, EntitlementView | None, str | None]:
            entitlement = api.store.entitlement(entitlement_id)
            if entitlement is None:
                raise HTTPError(404, "not_found", f"no entitlement {entitlement_id}")
            before = entitlement_view(entitlement)
            try:
                change(entitlement, api.clock())  # on this copy only: never saved
            except Refused as exc:
                return before, None, str(exc)
            except HTTPError as exc:
                return before, None, exc.detail
            return before, entitlement_view(entitlement), None

        before, after, refused = await anyio.to_thread.run_sync(try_it)
        diff = {}
        if after is not None:
            diff = changes(before.model_dump(mode="json"), after.model_dump(mode="json"))
            for name in ("sequence", "updated_at"):
                diff.pop(name, None)
        fields = [(name, value) for name, value in form.pairs() if name != "csrf"]
        return self._page(
            request,
            "admin/preview.html",
            status=409 if refused else 200,
            view=before,
            action=action,
            label=CHANGES[action],
            diff=diff,
            refused=refused,
            fields=fields,
            request_id=request_id,
            plain_status=plain_status,
            reason=args.get("reason"),
        )

    async def apply(self, request: Request) -> Response:
        key, session = self._session(request)
        form = await read_form(request, session)
        entitlement_id = _id(request)
        action, args = _change_args(form)
        request_id = form.get("request_id")
        if not request_id.startswith("console-") or len(request_id) > 64:
            raise HTTPError(422, "invalid_body", "confirm the change from its preview")
        change = self.api.admin_change(action, key.name, request_id, **args)
        await anyio.to_thread.run_sync(self.api._change, entitlement_id, change)
        log.info("admin console: %s of %s by %s", action, entitlement_id, key.name)
        return RedirectResponse(
            f"/admin/entitlements/{entitlement_id}?done={action}", status_code=303
        )

    # -- manual grants -------------------------------------------------------------

    async def grant_form(self, request: Request) -> Response:
        return self._grant_page(request, {}, None)

    def _grant_page(
        self, request: Request, values: dict[str, str], error: str | None, status: int = 200
    ) -> Response:
        return self._page(
            request,
            "admin/grant.html",
            status,
            values=values,
            error=error,
            offerings=sorted(o.sku for o in self.api.config.catalog),
        )

    async def grant(self, request: Request) -> Response:
        key, session = self._session(request)
        form = await read_form(request, session)
        names = ("offering", "email", "customer_id", "seats", "period", "period_end", "order_ref")
        values = {name: form.get(name).strip() for name in (*names, "reason")}
        try:
            body = ManualGrant(
                offering=values["offering"],
                customer=GrantCustomer(email=values["email"], id=values["customer_id"] or None),
                seats=_count(values["seats"]),
                period=values["period"] or None,
                period_end=_date_end(values["period_end"]),  # type: ignore[arg-type]
                order_ref=values["order_ref"] or None,
                reason=values["reason"],
            )
        except (ValidationError, ValueError) as exc:
            return self._grant_page(request, values, _first_error(exc), 422)
        try:
            offering, end = self.api.grant_terms(body, self.api.clock())
        except HTTPError as exc:
            return self._grant_page(request, values, exc.detail, exc.status)
        if form.get("confirm") != "yes":
            return self._page(
                request,
                "admin/grant_preview.html",
                body=body,
                values=values,
                end=end,
                seats=body.seats or offering.seats,
                request_id=f"console-{secrets.token_hex(12)}",
            )
        request_id = form.get("request_id")
        if not request_id.startswith("console-") or len(request_id) > 64:
            raise HTTPError(422, "invalid_body", "confirm the grant from its preview")
        try:
            view = await self.api.make_grant(body, key.name, request_id)
        except HTTPError as exc:
            return self._grant_page(request, values, exc.detail, exc.status)
        return RedirectResponse(f"/admin/entitlements/{view.id}?done=grant", status_code=303)

    # -- operations ------------------------------------------------------------------

    async def webhooks(self, request: Request) -> Response:
        self._session(request)
        query = request.query_params
        fields = {
            name: query.get(name, "").strip()[:255] for name in ("source", "outcome", "order_ref")
        }
        if fields["outcome"] and fields["outcome"] not in OUTCOMES:
            raise HTTPError(422, "invalid_query", f"outcome must be one of {', '.join(OUTCOMES)}")
        sources = sorted([*self.api.config.sources, MANUAL])
        if fields["source"] and fields["source"] not in sources:
            raise HTTPError(422, "invalid_query", f"source must be one of {', '.join(sources)}")
        raw = query.get("cursor")
        parts = decode_cursor(raw, "time", "id") if raw else None
        cursor = (parts[0], parts[1]) if parts else None
        filters = {k: v or None for k, v in fields.items()}
        items, after = await anyio.to_thread.run_sync(
            lambda: self.api.read_model.receipts(PAGE, cursor, None, **filters)
        )
        more = None
        if after is not None:
            more = "?" + urlencode(
                {**{k: v for k, v in fields.items() if v}, "cursor": encode_cursor(*after)}
            )
        return self._page(
            request,
            "admin/webhooks.html",
            fields=fields,
            outcomes=list(OUTCOMES),
            sources=sources,
            items=items,
            more=more,
        )

    async def webhook(self, request: Request) -> Response:
        self._session(request)
        receipt_id = request.path_params["receipt_id"][:200]
        view = await anyio.to_thread.run_sync(self.api.read_model.receipt, receipt_id)
        if view is None:
            raise HTTPError(
                404, "not_found", f"no webhook receipt {receipt_id!r} (or not folded yet)"
            )
        raw = await anyio.to_thread.run_sync(self.api.store.webhook, receipt_id)
        headers: dict[str, str] = {}
        body = None
        if raw is not None:
            webhook = json.loads(raw)
            headers = {
                k: v
                for k, v in webhook.get("headers", {}).items()
                if "signature" not in k and k not in ("authorization", "cookie")
            }
            body = webhook.get("body")
            with contextlib.suppress(TypeError, ValueError):
                body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        return self._page(request, "admin/webhook.html", view=view, sent_headers=headers, body=body)

    async def dead_letters(self, request: Request) -> Response:
        self._session(request)
        return await self._dead_letters_page(request, None)

    async def _dead_letters_page(
        self, request: Request, redriven: tuple[int, int] | None
    ) -> Response:
        raw = request.query_params.get("cursor")
        parts = decode_cursor(raw, "time", "id") if raw else None
        cursor = (parts[0], parts[1]) if parts else None
        unresolved = request.query_params.get("unresolved") == "1"
        items, after = await anyio.to_thread.run_sync(
            lambda: self.api.read_model.dead_letter_page(PAGE, cursor, unresolved)
        )
        more = None
        if after:
            more = "?" + urlencode(
                {**({"unresolved": "1"} if unresolved else {}), "cursor": encode_cursor(*after)}
            )
        return self._page(
            request,
            "admin/dead_letters.html",
            items=items,
            more=more,
            unresolved=unresolved,
            redriven=redriven,
        )

    async def redrive(self, request: Request) -> Response:
        key, session = self._session(request)
        form = await read_form(request, session)
        try:
            ids = [uuid.UUID(raw) for raw in form.all("id")][:100]
        except ValueError:
            raise HTTPError(422, "invalid_body", "pick dead letters from the list") from None
        if not ids:
            raise HTTPError(422, "invalid_body", "pick at least one dead letter")
        ids = list(dict.fromkeys(ids))  # each once

        def known() -> list[uuid.UUID]:
            unresolved = set(self.api.read_model.unresolved_letters([str(i) for i in ids]))
            return [i for i in ids if str(i) in unresolved]

        ids = await anyio.to_thread.run_sync(known)
        if not ids:
            raise HTTPError(422, "invalid_body", "none of those is an unresolved dead letter")
        resolved, failed = await anyio.to_thread.run_sync(self.redrive_letters, ids)
        log.info("admin console: %s re-drove %d dead letter(s)", key.name, len(ids))
        # The page itself, not a redirect: its figures are this re-drive's,
        # never ones a link could carry. Sending the form again re-drives
        # only what is still unresolved.
        return await self._dead_letters_page(request, (resolved, failed))

    async def endpoints(self, request: Request) -> Response:
        self._session(request)
        outbound = self.outbound
        found = await anyio.to_thread.run_sync(outbound.endpoints.load)
        views = await anyio.to_thread.run_sync(
            lambda: [outbound._view(e) for e in found.values() if not e.deleted]
        )
        return self._page(request, "admin/endpoints.html", items=views)

    async def deliveries(self, request: Request) -> Response:
        self._session(request)
        endpoint_id = _id(request)
        info = await self.outbound._info(endpoint_id, deleted=True)
        status = request.query_params.get("status") or None
        records = await anyio.to_thread.run_sync(
            lambda: self.outbound.outbox.jobs(
                status=status, after=None, limit=PAGE * 4, channel=str(info.id), kind=WEBHOOK_KIND
            )
        )
        return self._page(
            request,
            "admin/deliveries.html",
            endpoint=info,
            items=[delivery_view(r) for r in records],
            done=done(request),
            now=self.api.clock(),
        )

    async def resend(self, request: Request) -> Response:
        _, session = self._session(request)
        form = await read_form(request, session)
        job_id = form.get("job")[:200]
        outbound = self.outbound
        record = await anyio.to_thread.run_sync(outbound.outbox.job, job_id)
        if record is None:
            raise HTTPError(404, "not_found", f"no delivery {job_id!r}")
        endpoint_id = job_endpoint(record)
        endpoint = await outbound._info(endpoint_id, deleted=True) if endpoint_id else None
        refusal = await anyio.to_thread.run_sync(unsendable_job, record, outbound.outbox, endpoint)
        if refusal is not None:
            raise HTTPError(409, *refusal)
        await anyio.to_thread.run_sync(outbound.outbox.resend, [job_id])
        return RedirectResponse(f"/admin/endpoints/{endpoint_id}?done=resent", status_code=303)

    async def recover(self, request: Request) -> Response:
        _, session = self._session(request)
        form = await read_form(request, session)
        endpoint_id = _id(request)
        info = await self.outbound._info(endpoint_id)
        since = _moment(form.get("since"))
        if since is None or since > self.api.clock():
            raise HTTPError(422, "invalid_body", "since must be a past date and time (UTC)")
        await self.outbound._refuse_unsendable(info)
        await anyio.to_thread.run_sync(recover, self.outbound.outbox, str(info.id), since)
        return RedirectResponse(f"/admin/endpoints/{endpoint_id}?done=recovered", status_code=303)


def _id(request: Request) -> uuid.UUID:
    raw = request.path_params["id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise HTTPError(404, "not_found", f"{raw[:80]!r} is not an id") from None


def _safe_next(raw: str) -> str:
    """Where to go after login: a console path only (no open redirect)."""
    if raw.startswith("/admin") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/admin"


def _moment(raw: str) -> datetime | None:
    raw = raw.strip()
    if not raw:
        return None
    return aware_time(raw) or aware_time(raw + ":00Z") or aware_time(raw + "Z")


def _date_end(raw: str) -> str | None:
    """A period end given as a date (the end of that day, UTC) or a time, as
    RFC 3339 text (what ManualGrant takes)."""
    raw = raw.strip()
    if not raw:
        return None
    found = _moment(raw) or _moment(raw + "T23:59:59")
    if found is None:
        raise ValueError("paid through must be a date (YYYY-MM-DD)")
    return found.astimezone(UTC).isoformat()


def _count(raw: str) -> int | None:
    """A whole number typed in ASCII digits (None for nothing typed)."""
    if not raw:
        return None
    found = ascii_int(raw) if len(raw) <= 9 else None
    if found is None:
        raise ValueError("seats must be a whole number, in the digits 0-9")
    return found


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}"
    return str(exc)


def _change_args(form: Form) -> tuple[str, dict[str, Any]]:
    """(action, its arguments for API.admin_change) from a change form,
    checked as the API checks its bodies (AdminAction, TermsChange); 422
    saying what is wrong."""
    action = form.get("action")
    if action not in CHANGES:
        raise HTTPError(422, "invalid_body", f"no change {action!r}")
    args: dict[str, Any] = {}
    try:
        if action in ADMIN_ACTIONS:
            days = form.get("days").strip()
            if action == "extend" and not days:
                raise HTTPError(422, "invalid_body", "extend needs a number of days")
            number = ascii_int(days) if days and len(days) <= 9 else None
            if days and number is None:
                raise HTTPError(422, "invalid_body", "days must be a whole number from 1 to 3650")
            body = AdminAction(reason=form.get("reason").strip(), days=number)
            args.update(reason=body.reason, days=body.days or 0)
        elif action == "change":
            seats = form.get("seats").strip()
            count = ascii_int(seats) if seats and len(seats) <= 9 else None
            if seats and count is None:
                raise HTTPError(422, "invalid_body", "seats must be a whole number")
            terms = TermsChange(
                offering=form.get("offering").strip() or None,
                seats=count,
                reason=form.get("reason").strip(),
            )
            if terms.offering is None and terms.seats is None:
                raise HTTPError(422, "invalid_body", "give an offering, seats or both")
            args.update(offering=terms.offering, seats=terms.seats, reason=terms.reason)
    except ValidationError as exc:
        raise HTTPError(422, "invalid_body", _first_error(exc)) from None
    if action == "release":
        seat = form.get("seat")
        if not seat or len(seat) > 200:
            raise HTTPError(422, "invalid_body", "name the seat to free")
        args["seat"] = seat
    if action == "revoke-code":
        index = ascii_int(form.get("index")[:6])
        if index is None:
            raise HTTPError(422, "invalid_body", "name the code to revoke")
        args["index"] = index
    return action, args


def reason_of(data: dict[str, Any]) -> str | None:
    """The reason an admin gave for an event (its fact's, or a grant's)."""
    fact = data.get("fact")
    if isinstance(fact, dict):
        for holder in (fact, fact.get("grant"), fact.get("change")):
            if isinstance(holder, dict) and isinstance(holder.get("reason"), str):
                return str(holder["reason"])
    reason = data.get("reason")
    return reason if isinstance(reason, str) and data.get("by") else None


def routes(console: Console) -> list[BaseRoute]:
    return page_routes(
        [
            ("/admin/login", "GET", console.login_form),
            ("/admin/login", "POST", console.login),
            ("/admin/logout", "POST", console.logout),
            ("/admin", "GET", console.dashboard),
            ("/admin/entitlements", "GET", console.search),
            ("/admin/entitlements/{id}", "GET", console.entitlement),
            ("/admin/entitlements/{id}/preview", "POST", console.preview),
            ("/admin/entitlements/{id}/apply", "POST", console.apply),
            ("/admin/grant", "GET", console.grant_form),
            ("/admin/grant", "POST", console.grant),
            ("/admin/webhooks", "GET", console.webhooks),
            ("/admin/webhooks/{receipt_id}", "GET", console.webhook),
            ("/admin/dead-letters", "GET", console.dead_letters),
            ("/admin/dead-letters/redrive", "POST", console.redrive),
            ("/admin/endpoints", "GET", console.endpoints),
            ("/admin/endpoints/{id}", "GET", console.deliveries),
            ("/admin/endpoints/{id}/recover", "POST", console.recover),
            ("/admin/deliveries/resend", "POST", console.resend),
        ]
    )
