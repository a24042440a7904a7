"""The admin HTTP API: entitlements from the read model, history from the store."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, get_args

import anyio
from eventsourcing.persistence import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts.api import (
    ActivationCodeView,
    AdminAction,
    DeadLetterList,
    EntitlementAsOfView,
    EntitlementList,
    EntitlementView,
    ErasureList,
    ErasureRequest,
    ErasureView,
    History,
    HistoryWithState,
    IssuedCode,
    ManualGrant,
    ProjectionErrorList,
    ReceiptList,
    ReceiptView,
    TermsChange,
)
from contracts.events import Status
from contracts.webhooks import RawWebhookV1
from domain import lifecycle
from domain.catalog import Offering, add_period
from domain.commands import Customer, OrderEvent, Rules, apply
from domain.entitlement import Cause, Entitlement, Refused, entitlement_id
from domain.lifecycle import Line
from domain.receipt import OUTCOMES
from services.codes import CodeBook
from services.config import AdminKey, Config
from services.erasure import erase_customer, erasure_page
from services.http import (
    Buckets,
    HTTPError,
    ascii_int,
    authenticate,
    aware_time,
    busy,
    decode_cursor,
    encode_cursor,
    read_json,
)
from services.http import (
    request_id as idempotency,
)
from services.licensing import ValidationIndex
from services.openapi import CURSOR, LIMIT, Answer, Documented, Operation, Query
from services.projections import entitlement_view, history_entry
from services.providers import LATEST, has_control_character
from services.readmodel import FILTERS, RECEIPT_FILTERS, ReadModel
from services.store import Batch, EntitlementStore, StillChanging
from services.timeline import NotThen, NotYet, as_of, with_state

_STATUSES = set(get_args(Status))
#: The source of entitlements granted by hand (POST /v1/entitlements).
MANUAL = "manual"
MAX_LIMIT = 1000


def _entitlement_id(request: Request) -> str:
    raw = request.path_params["id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise HTTPError(422, "invalid_id", f"{raw!r} is not an entitlement id (a UUID)") from None


def _limit(request: Request) -> int:
    value = ascii_int(request.query_params.get("limit", "100"))
    if value is None or not 1 <= value <= MAX_LIMIT:
        raise HTTPError(422, "invalid_query", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return value


def _no_control_characters(request: Request) -> None:
    """A control character (a NUL) in a query or path is no id, e-mail or
    time anyone has: 422, before a database refuses it."""
    values = [*request.query_params.values(), *map(str, request.path_params.values())]
    if any(has_control_character(value) for value in values):
        raise HTTPError(422, "invalid_query", "the query or path holds a control character")


def _time_param(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    value = aware_time(raw)
    if value is None:
        raise HTTPError(
            422,
            "invalid_query",
            f"{name} must be an RFC 3339 time with an offset, e.g. 2026-11-30T00:00:00Z"
            " (a + must be sent as %2B)",
        )
    return value


def _only(request: Request, allowed: set[str]) -> None:
    """422 for a query parameter the route does not take, or one given
    twice (each takes one value: which one would be a guess)."""
    query = request.query_params
    repeated = sorted(k for k in set(query) if len(query.getlist(k)) > 1)
    if repeated:
        raise HTTPError(
            422, "invalid_query", f"query parameter(s) given more than once: {', '.join(repeated)}"
        )
    unknown = set(request.query_params) - allowed
    if unknown:
        raise HTTPError(
            422,
            "invalid_query",
            f"unknown query parameter(s): {', '.join(sorted(unknown))};"
            + (f" this list takes {', '.join(sorted(allowed))}" if allowed else " it takes none"),
        )


def _encode_cursor(after: tuple[str, str]) -> str:
    return encode_cursor(*after)


def _decode_cursor(raw: str | None) -> tuple[str, str] | None:
    parts = decode_cursor(raw, "time", "id")
    return None if parts is None else (parts[0], parts[1])


def _decode_erasure_cursor(raw: str | None) -> tuple[str, str] | None:
    # An erasure's id is a UUID; its time as it was recorded (isoformat).
    parts = decode_cursor(raw, "time", "id")
    return None if parts is None else (parts[0], parts[1])


class API:
    def __init__(
        self,
        store: EntitlementStore,
        read_model: ReadModel,
        keys: list[AdminKey],
        config: Config,
        codes: CodeBook,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        index: ValidationIndex | None = None,
    ) -> None:
        self.index = index
        self.store = store
        self.read_model = read_model
        self.keys = keys
        self.config = config
        self.codes = codes
        self.clock = clock
        # Wrong admin keys per client address (see `authenticate`).
        self.failures = Buckets(*config.rate_limits.admin_failures_per_address)

    def authenticate(self, request: Request) -> AdminKey:
        return authenticate(request, self.keys, self.failures)

    def with_codes(self, view: EntitlementView) -> EntitlementView:
        """The view with its activation codes derived again (never stored)."""
        codes = [
            ActivationCodeView(index=c.index, code=self.codes.code(view.id, c.index))
            for c in view.activation_codes
        ]
        return view.model_copy(
            update={
                "activation_codes": codes,
                "activation_code": codes[0].code if codes else None,
            }
        )

    async def list_entitlements(self, request: Request) -> JSONResponse:
        """Entitlements in id order, filtered, with cursor paging."""
        self.authenticate(request)
        _no_control_characters(request)
        query = request.query_params
        _only(request, {*FILTERS, "updated_since", "q", "limit", "cursor"})
        filters = {key: query.get(key) for key in FILTERS}
        status = filters.get("status")
        if status is not None and status not in _STATUSES:
            raise HTTPError(
                422, "invalid_query", f"status must be one of {', '.join(sorted(_STATUSES))}"
            )
        since = _time_param(query.get("updated_since"), "updated_since")
        q = query.get("q")
        if q is not None and not 1 <= len(q) <= 255:
            raise HTTPError(422, "invalid_query", "q must be 1 to 255 characters")
        cursor = decode_cursor(query.get("cursor"), "id")
        limit = _limit(request)
        items, after = await anyio.to_thread.run_sync(
            lambda: self.read_model.entitlement_page(
                limit, cursor[0] if cursor else None, since, q, filters
            )
        )
        body = EntitlementList(
            items=[self.with_codes(item) for item in items],
            next_cursor=encode_cursor(after) if after else None,
        )
        return JSONResponse(body.model_dump(mode="json"))

    async def get_entitlement(self, request: Request) -> JSONResponse:
        self.authenticate(request)
        entitlement_id = _entitlement_id(request)
        _no_control_characters(request)
        _only(request, {"as_of", "as_of_version"})
        if request.query_params.keys() & {"as_of", "as_of_version"}:
            return await self._entitlement_as_of(request, uuid.UUID(entitlement_id))
        view = await anyio.to_thread.run_sync(self.read_model.entitlement, entitlement_id)
        if view is None:
            raise HTTPError(404, "not_found", f"no entitlement {entitlement_id}")
        return JSONResponse(self.with_codes(view).model_dump(mode="json"))

    async def _entitlement_as_of(self, request: Request, entitlement_id: uuid.UUID) -> JSONResponse:
        """The entitlement folded from its stored events up to a recorded
        time (`as_of`) or a version (`as_of_version`), not from the read model."""
        query = request.query_params
        if "as_of" in query and "as_of_version" in query:
            raise HTTPError(422, "invalid_query", "give as_of or as_of_version, not both")
        at = _time_param(query.get("as_of"), "as_of")
        version: int | None = None
        if at is None:
            raw = query["as_of_version"]
            version = ascii_int(raw) if len(raw) <= 9 else None
            if version is None or version < 1:
                raise HTTPError(
                    422, "invalid_query", "as_of_version must be an entitlement version: 1, 2, …"
                )

        def fold() -> EntitlementAsOfView:
            try:
                return as_of(self.store, entitlement_id, at, version, now=self.clock())
            except NotThen as exc:
                raise HTTPError(404, "not_found", str(exc)) from None
            except NotYet as exc:
                raise HTTPError(422, "invalid_query", str(exc)) from None

        answer = self.with_codes(await anyio.to_thread.run_sync(fold))
        return JSONResponse(answer.model_dump(mode="json"))

    async def get_history(self, request: Request) -> JSONResponse:
        self.authenticate(request)
        entitlement_id = uuid.UUID(_entitlement_id(request))
        _no_control_characters(request)
        _only(request, {"with_state"})
        state = request.query_params.get("with_state", "false")
        if state not in ("true", "false"):
            raise HTTPError(422, "invalid_query", "with_state must be true or false")
        events = await anyio.to_thread.run_sync(self.store.history, entitlement_id)
        if not events or type(events[0]).__qualname__.split(".")[0] != "Entitlement":
            raise HTTPError(404, "not_found", f"no entitlement {entitlement_id}")
        if state == "true":
            entries = await anyio.to_thread.run_sync(
                lambda: with_state(events, self.read_model.receipts_of, self.with_codes)
            )
            body = HistoryWithState(entitlement_id=entitlement_id, events=entries)
            return JSONResponse(body.model_dump(mode="json"))
        history = History(entitlement_id=entitlement_id, events=[history_entry(e) for e in events])
        return JSONResponse(history.model_dump(mode="json"))

    async def list_dead_letters(self, request: Request) -> JSONResponse:
        """Dead letters, newest first, with cursor paging."""
        self.authenticate(request)
        _no_control_characters(request)
        _only(request, {"limit", "cursor"})
        limit = _limit(request)
        cursor = _decode_cursor(request.query_params.get("cursor"))
        items, after = await anyio.to_thread.run_sync(
            lambda: self.read_model.dead_letter_page(limit, cursor)
        )
        body = DeadLetterList(items=items, next_cursor=_encode_cursor(after) if after else None)
        return JSONResponse(body.model_dump(mode="json"))

    async def list_webhooks(self, request: Request) -> JSONResponse:
        """Receipts of accepted webhooks, newest first, with cursor paging."""
        self.authenticate(request)
        _no_control_characters(request)
        query = request.query_params
        _only(request, {*RECEIPT_FILTERS, "since", "limit", "cursor"})
        filters = {key: query.get(key) for key in RECEIPT_FILTERS}
        outcome = filters.get("outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise HTTPError(422, "invalid_query", f"outcome must be one of {', '.join(OUTCOMES)}")
        since = _time_param(query.get("since"), "since")
        cursor = _decode_cursor(query.get("cursor"))
        limit = _limit(request)
        items, after = await anyio.to_thread.run_sync(
            lambda: self.read_model.receipts(limit, cursor, since, **filters)
        )
        body = ReceiptList(items=items, next_cursor=_encode_cursor(after) if after else None)
        return JSONResponse(body.model_dump(mode="json", exclude_none=False))

    async def get_webhook(self, request: Request) -> JSONResponse:
        """One receipt, with the webhook as it was received."""
        self.authenticate(request)
        _no_control_characters(request)
        receipt = request.path_params["receipt_id"]
        view = await anyio.to_thread.run_sync(self.read_model.receipt, receipt)
        if view is None:
            raise HTTPError(
                404, "not_found", f"no webhook receipt {receipt!r} (or it is not folded yet)"
            )
        webhook = await anyio.to_thread.run_sync(self.store.webhook, receipt)
        if webhook is not None:
            view = view.model_copy(update={"webhook": RawWebhookV1.model_validate_json(webhook)})
        return JSONResponse(view.model_dump(mode="json"))

    async def list_projection_errors(self, request: Request) -> JSONResponse:
        self.authenticate(request)
        _only(request, {"limit"})
        limit = _limit(request)
        items = await anyio.to_thread.run_sync(self.read_model.projection_errors, limit)
        return JSONResponse(ProjectionErrorList(items=items).model_dump(mode="json"))

    async def administer(self, request: Request) -> JSONResponse:
        """suspend, reinstate, cancel or extend, recorded with the key's name.

        An `Idempotency-Key` header makes a retried request a no-op."""
        key = self.authenticate(request)
        entitlement_id = uuid.UUID(_entitlement_id(request))
        action = request.path_params["action"]
        if action not in ADMIN_ACTIONS:
            raise HTTPError(
                404, "not_found", f"no action {action!r}; actions are {', '.join(ADMIN_ACTIONS)}"
            )
        body = await read_json(request, AdminAction)
        if (action == "extend") != (body.days is not None):
            raise HTTPError(422, "invalid_body", "'days' is required by extend and only by extend")
        change = self.admin_change(
            action, key.name, idempotency(request), reason=body.reason, days=body.days or 0
        )
        view = await anyio.to_thread.run_sync(self._change, entitlement_id, change)
        return JSONResponse(view.model_dump(mode="json"))

    async def issue_code(self, request: Request) -> JSONResponse:
        """Another activation code for the entitlement (201 with the code)."""
        key = self.authenticate(request)
        entitlement_id = uuid.UUID(_entitlement_id(request))
        change = self.admin_change("issue-code", key.name, idempotency(request))
        view = await anyio.to_thread.run_sync(self._change, entitlement_id, change)
        code = max(view.activation_codes, key=lambda c: c.index)
        assert code.code is not None  # with_codes derived it
        issued = IssuedCode(index=code.index, code=code.code, entitlement=view)
        return JSONResponse(issued.model_dump(mode="json"), status_code=201)

    async def revoke_code(self, request: Request) -> JSONResponse:
        key = self.authenticate(request)
        entitlement_id = uuid.UUID(_entitlement_id(request))
        raw = request.path_params["index"]
        index = ascii_int(raw)
        if index is None:
            raise HTTPError(422, "invalid_index", f"{raw!r} is not a code index")
        change = self.admin_change("revoke-code", key.name, idempotency(request), index=index)
        view = await anyio.to_thread.run_sync(self._change, entitlement_id, change)
        return JSONResponse(view.model_dump(mode="json"))

    async def grant(self, request: Request) -> JSONResponse:
        """A manual grant (source `manual`): made as a provider's paid order
        would be, by the key's name with the reason; 201 with the entitlement
        and its activation code. An `Idempotency-Key` makes a retry answer
        the same entitlement."""
        key = self.authenticate(request)
        body = await read_json(request, ManualGrant)
        view = await self.make_grant(body, key.name, idempotency(request))
        return JSONResponse(view.model_dump(mode="json"), status_code=201)

    def grant_terms(self, body: ManualGrant, now: datetime) -> tuple[Offering, datetime | None]:
        """(the offering, the end of the paid period) a grant made at `now`
        gets; HTTPError 422 saying what is wrong with `body`."""
        offering = self.config.catalog.get(body.offering)
        if offering is None:
            raise HTTPError(422, "invalid_body", f"no offering {body.offering!r} in the catalog")
        if body.period is not None and body.period_end is not None:
            raise HTTPError(422, "invalid_body", "give period or period_end, not both")
        if body.seats is not None and body.seats % offering.seats:
            raise HTTPError(
                422,
                "invalid_body",
                f"seats must be a multiple of offering {offering.sku!r}'s {offering.seats} seats",
            )
        end = body.period_end
        # Always an explicit period (the offering's own by default), so a
        # later change of offering does not change what was granted.
        period = body.period or (offering.period if end is None else None)
        if period is not None:
            try:
                end = add_period(now, period)
            except (ValueError, OverflowError):
                raise HTTPError(
                    422,
                    "invalid_body",
                    "period must be an ISO 8601 duration in years, months, weeks and days,"
                    " such as P1Y or P30D",
                ) from None
        if end is not None and end <= now:
            raise HTTPError(422, "invalid_body", "period_end must be in the future")
        if end is not None and end > LATEST:
            raise HTTPError(422, "invalid_body", "period_end must be before the year 2201")
        return offering, end

    async def make_grant(self, body: ManualGrant, by: str, request_id: str) -> EntitlementView:
        """The entitlement `body` grants, made by `by` (or the one a request
        with the same `request_id` made); HTTPError 422 or 409 if refused."""
        now = self.clock()
        offering, end = self.grant_terms(body, now)
        order_ref = body.order_ref or f"manual-{request_id}"
        line = Line("grant", offering, (body.seats or offering.seats) // offering.seats, now, end)
        fact = {
            **lifecycle.payment(f"grant:{request_id}", [line]),
            "grant": {"by": by, "reason": body.reason},
        }
        command = OrderEvent(
            source=MANUAL,
            order_ref=order_ref,
            fact=fact,
            lines=(line,),
            cause=Cause.admin(by, request_id),
            occurred_at=now,
            customer=Customer(body.customer.id, body.customer.email),
        )
        rules = Rules(self.config.catalog, self.config.policy, self.codes.hash)

        def make() -> Entitlement | None:
            found = self.store.entitlement(entitlement_id(MANUAL, order_ref, "grant"))
            if found is not None and not found.has_applied(command.cause):
                raise HTTPError(409, "refused", f"order_ref {order_ref!r} is another grant's")
            for _ in range(5):
                batch = Batch(self.store)
                apply(command, batch, rules, now)
                try:
                    self.store.record(batch, None)
                except IntegrityError:
                    continue  # the same request raced itself: it is there now
                return self.store.entitlement(entitlement_id(MANUAL, order_ref, "grant"))
            raise busy()

        entitlement = await anyio.to_thread.run_sync(make)
        if entitlement is None or entitlement.sku != offering.sku:
            raise HTTPError(409, "refused", f"order_ref {order_ref!r} is another grant's")
        if self.index is not None:
            self.index.saved(entitlement)
        return self.with_codes(entitlement_view(entitlement))

    async def change_terms(self, request: Request) -> JSONResponse:
        """Another offering and/or seats, with a reason (see Entitlement.change_terms)."""
        key = self.authenticate(request)
        entitlement_id_ = uuid.UUID(_entitlement_id(request))
        body = await read_json(request, TermsChange)
        if body.offering is None and body.seats is None:
            raise HTTPError(422, "invalid_body", "give offering, seats or both")
        change = self.admin_change(
            "change",
            key.name,
            idempotency(request),
            reason=body.reason,
            offering=body.offering,
            seats=body.seats,
        )
        view = await anyio.to_thread.run_sync(self._change, entitlement_id_, change)
        return JSONResponse(view.model_dump(mode="json"))

    async def release_seat(self, request: Request) -> JSONResponse:
        """Free a seat (a lost laptop): recorded with the key's name, reason
        `released_by_admin`; answers the entitlement after it."""
        key = self.authenticate(request)
        entitlement_id = uuid.UUID(_entitlement_id(request))
        _no_control_characters(request)
        seat = request.path_params["seat"]
        change = self.admin_change("release", key.name, idempotency(request), seat=seat)
        view = await anyio.to_thread.run_sync(self._change, entitlement_id, change)
        return JSONResponse(view.model_dump(mode="json"))

    def admin_change(
        self,
        action: str,
        by: str,
        request_id: str,
        *,
        reason: str = "",
        days: int = 0,
        offering: str | None = None,
        seats: int | None = None,
        seat: str | None = None,
        index: int | None = None,
    ) -> Callable[[Entitlement, datetime], None]:
        """The change an admin (key name `by`) asks for, to run on the
        entitlement at a time: one of ADMIN_ACTIONS (with `reason`, and
        `days` for extend), "change" (offering and/or seats, with a
        reason), "release" (`seat`), "issue-code" or "revoke-code" (`index`).
        A retry with the same `request_id` changes nothing again."""

        def change(entitlement: Entitlement, at: datetime) -> None:
            if action in ADMIN_ACTIONS:
                entitlement.administer(
                    action,
                    by,
                    reason,
                    request_id,
                    self.config.catalog,
                    self.config.policy,
                    at,
                    days=days,
                )
            elif action == "change":
                entitlement.change_terms(
                    offering,
                    seats,
                    by,
                    reason,
                    request_id,
                    self.config.catalog,
                    self.config.policy,
                    at,
                )
            elif action == "release":
                assert seat is not None
                if seat not in entitlement.activations:
                    if entitlement.has_applied(Cause.admin(by, request_id)):
                        return  # a retry of a release that was done
                    raise HTTPError(404, "not_found", f"no seat {seat} is in use")
                entitlement.release(seat, "released_by_admin", request_id, at, by=by)
            elif action == "issue-code":
                entitlement.issue_code(self.codes.hash, by, request_id, at)
            elif action == "revoke-code":
                assert index is not None
                entitlement.revoke_code(index, by, request_id, at)
            else:
                raise ValueError(f"no admin change {action!r}")

        return change

    def _change(
        self, entitlement_id: uuid.UUID, change: Callable[[Entitlement, datetime], None]
    ) -> EntitlementView:
        """An admin change, saved; a webhook saving first makes it apply again."""
        try:
            entitlement = self.store.change(entitlement_id, lambda e: change(e, self.clock()))
        except Refused as exc:
            raise HTTPError(409, "refused", str(exc)) from None
        except StillChanging:
            raise busy() from None
        if entitlement is None:
            raise HTTPError(404, "not_found", f"no entitlement {entitlement_id}")
        if self.index is not None:
            self.index.saved(entitlement)
        return self.with_codes(entitlement_view(entitlement))

    async def erase_customer(self, request: Request) -> JSONResponse:
        """Erase a customer's personal data (README: *Erasing a customer*);
        the address is in the body, never in a URL (URLs are logged)."""
        key = self.authenticate(request)
        body = await read_json(request, ErasureRequest)
        if not body.email.strip():
            raise HTTPError(422, "invalid_body", "email must be an e-mail address, not blank")
        if has_control_character(body.email):
            raise HTTPError(422, "invalid_body", "email contains a control character")
        view = await anyio.to_thread.run_sync(
            lambda: erase_customer(self.store, self.read_model, body.email, key.name, self.clock)
        )
        return JSONResponse(view.model_dump(mode="json"))

    async def list_erasures(self, request: Request) -> JSONResponse:
        """Erasures done, newest first, with cursor paging."""
        self.authenticate(request)
        _no_control_characters(request)
        _only(request, {"limit", "cursor"})
        limit = _limit(request)
        after = _decode_erasure_cursor(request.query_params.get("cursor"))
        items, last = await anyio.to_thread.run_sync(erasure_page, self.store, limit, after)
        body = ErasureList(items=items, next_cursor=encode_cursor(*last) if last else None)
        return JSONResponse(body.model_dump(mode="json"))


ADMIN_ACTIONS = ("suspend", "reinstate", "cancel", "extend")


_ENTITLEMENT = {"id": "The entitlement's id (UUID)"}
_NO_ENTITLEMENT = {404: "No entitlement has this id"}
_CHANGE_ERRORS = {
    **_NO_ENTITLEMENT,
    409: "The change is refused in the entitlement's state",
    503: "The entitlement kept changing; retry",
}
_TIME = {"type": "string", "format": "date-time"}
_ENTITLEMENT_QUERY = (
    Query("customer_email", "The buyer's e-mail address, ignoring case"),
    Query("customer_id", "The provider's customer id"),
    Query("product", "The product"),
    Query("offering", "The catalog offering"),
    Query("status", "One status", {"enum": sorted(_STATUSES)}),
    Query("source", "The configured source (manual for grants)"),
    Query("order_ref", "The provider's order or subscription reference"),
    Query("updated_since", "RFC 3339 time: changed at or after", _TIME),
    Query("q", "A prefix of the e-mail address (ignoring case) or of the order reference"),
    CURSOR,
    LIMIT,
)
_AS_OF = (
    Query(
        "as_of",
        "RFC 3339 time with an offset: the entitlement as of then",
        {"type": "string", "format": "date-time"},
    ),
    Query(
        "as_of_version",
        "The entitlement as of this version (1, 2, …)",
        {"type": "integer", "minimum": 1},
    ),
)


def _admin(summary: str, answers: dict[int, Answer], **more: Any) -> Operation:
    return Operation(summary, more.pop("tag", "entitlements"), answers, security="admin", **more)


def routes(api: API) -> list[Route]:
    return [
        Documented(
            "/v1/entitlements",
            api.list_entitlements,
            "GET",
            _admin("Entitlements, newest first", {200: EntitlementList}, query=_ENTITLEMENT_QUERY),
        ),
        Documented(
            "/v1/entitlements",
            api.grant,
            "POST",
            _admin(
                "Grant an entitlement without a provider (source manual)",
                {201: EntitlementView},
                body=ManualGrant,
                errors={409: "order_ref names another grant"},
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/change",
            api.change_terms,
            "POST",
            _admin(
                "Change the offering and/or seats, with a reason",
                {200: EntitlementView},
                body=TermsChange,
                path=_ENTITLEMENT,
                errors=_CHANGE_ERRORS,
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}",
            api.get_entitlement,
            "GET",
            _admin(
                "One entitlement (now, or as of a time or version)",
                {200: (EntitlementView, EntitlementAsOfView)},
                path=_ENTITLEMENT,
                query=_AS_OF,
                errors={404: "No entitlement has this id, or it did not exist yet then"},
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/history",
            api.get_history,
            "GET",
            _admin(
                "Every event of the entitlement (with the state after each: with_state=true)",
                {200: (History, HistoryWithState)},
                path=_ENTITLEMENT,
                query=(
                    Query(
                        "with_state",
                        "true: each event's state and diff",
                        {"enum": ["true", "false"]},
                    ),
                ),
                errors=_NO_ENTITLEMENT,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/codes",
            api.issue_code,
            "POST",
            _admin(
                "Issue another activation code",
                {201: IssuedCode},
                path=_ENTITLEMENT,
                errors=_CHANGE_ERRORS,
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/codes/{index}",
            api.revoke_code,
            "DELETE",
            _admin(
                "Revoke an activation code",
                {200: EntitlementView},
                path={**_ENTITLEMENT, "index": "The code's index (0 is the first)"},
                errors=_CHANGE_ERRORS,
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/seats/{seat}",
            api.release_seat,
            "DELETE",
            _admin(
                "Free a seat (reason released_by_admin, recorded with the key's name)",
                {200: EntitlementView},
                path={**_ENTITLEMENT, "seat": "The seat's id (an activation's `id`)"},
                errors={404: "No entitlement has this id, or the seat is not in use"},
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/entitlements/{id}/{action}",
            api.administer,
            "POST",
            _admin(
                "Suspend, reinstate, cancel or extend, with a reason",
                {200: EntitlementView},
                body=AdminAction,
                path={**_ENTITLEMENT, "action": f"One of {', '.join(ADMIN_ACTIONS)}"},
                errors=_CHANGE_ERRORS,
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/dead-letters",
            api.list_dead_letters,
            "GET",
            _admin(
                "Webhooks that could not be applied, with why",
                {200: DeadLetterList},
                query=(CURSOR, LIMIT),
                tag="operations",
            ),
        ),
        Documented(
            "/v1/webhooks",
            api.list_webhooks,
            "GET",
            _admin(
                "Receipts of accepted webhooks, newest first",
                {200: ReceiptList},
                query=(
                    Query("source", "The configured source's name"),
                    Query("outcome", "What became of the webhook", {"enum": list(OUTCOMES)}),
                    Query("order_ref", "The provider's order or subscription reference"),
                    Query(
                        "since",
                        "RFC 3339 time: received at or after",
                        {"type": "string", "format": "date-time"},
                    ),
                    CURSOR,
                    LIMIT,
                ),
                tag="operations",
            ),
        ),
        Documented(
            "/v1/webhooks/{receipt_id}",
            api.get_webhook,
            "GET",
            _admin(
                "One receipt, with the webhook as received",
                {200: ReceiptView},
                path={"receipt_id": "The receipt id the ingress answered"},
                errors={404: "No receipt has this id (or it is not folded yet)"},
                tag="operations",
            ),
        ),
        Documented(
            "/v1/projection-errors",
            api.list_projection_errors,
            "GET",
            _admin(
                "Stored events a projection went on without",
                {200: ProjectionErrorList},
                query=(LIMIT,),
                tag="operations",
            ),
        ),
        Documented(
            "/v1/customers/erase",
            api.erase_customer,
            "POST",
            _admin(
                "Erase a customer's personal data",
                {200: ErasureView},
                body=ErasureRequest,
                tag="customers",
            ),
        ),
        Documented(
            "/v1/erasures",
            api.list_erasures,
            "GET",
            _admin(
                "Erasures done, newest first",
                {200: ErasureList},
                query=(CURSOR, LIMIT),
                tag="customers",
            ),
        ),
    ]
