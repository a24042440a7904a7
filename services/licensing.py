"""The licensing API: what the vendor's application calls with a customer's
activation code. No admin key: the code is the credential, and it reaches
only its own entitlement. A seat's own routes (release, heartbeat, license
file) take the seat's secret, given once at activation, or the code that
opened the seat.

Lookups go to the read model (indexed by code hash); seat changes are
domain events saved to the store, with optimistic concurrency, so two
devices racing for the last seat cannot both get it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import gc
import hashlib
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from contracts.api import EntitlementView
from contracts.events import Status as StatusName
from contracts.license_file import (
    KeysV1,
    LicenseFileV1,
    LicenseV1,
    PublicKeyV1,
    b64url,
    canonical,
    sign_token,
)
from contracts.licensing import (
    Activation,
    ActivationRequest,
    Portal,
    PortalSeat,
    SeatLease,
    Usage,
    UsageMetric,
    UsagePeriod,
    UsageRequest,
    ValidatedEntitlement,
    ValidationCode,
    ValidationRequest,
    ValidationResult,
)
from domain.catalog import Catalog
from domain.entitlement import (
    Entitlement,
    NotActive,
    OverLimit,
    Refused,
    Status,
    TooManySeats,
    UnknownMetric,
    code_hash,
    seat_secret_hash,
)
from services.codes import new_seat_secret
from services.config import RateLimits
from services.health import describe, sleep_unless
from services.http import (
    Buckets,
    HTTPError,
    bearer_token,
    busy,
    client_address,
    http_error_response,
    internal_error_response,
    parse_json,
    rate_limited,
    read_body,
    read_json,
    send_json,
)
from services.http import (
    request_id as idempotency,
)
from services.metrics import VALIDATION_SECONDS, VALIDATIONS
from services.openapi import Documented, Operation, Query
from services.projections import entitlement_view
from services.readmodel import ReadModel, UnreadableRow
from services.store import EntitlementStore, StillChanging

log = logging.getLogger("entitle.licensing")


class Signer:
    """Signs offline license files with the Ed25519 key from ENTITLE_LICENSE_KEY."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        key_id = hashlib.sha256(raw).hexdigest()[:16]
        self.public = PublicKeyV1(
            id=key_id,
            public_key=base64.b64encode(raw).decode(),
            jwk={"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": key_id, "use": "sig"},
        )

    @classmethod
    def from_secret(cls, secret: str) -> Signer:
        try:
            seed = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise ValueError("ENTITLE_LICENSE_KEY must be base64 of 32 random bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, license: LicenseV1) -> LicenseFileV1:
        """The license as a token (the file to ship), and in the deprecated
        first format for clients that still read it."""
        signature = self._key.sign(canonical(license))
        return LicenseFileV1(
            license=license,
            signature=base64.b64encode(signature).decode(),
            token=sign_token(license, self._key.sign),
        )


@dataclass
class Limits:
    per_code: Buckets
    per_address: Buckets
    seat_per_address: Buckets

    @classmethod
    def from_config(cls, limits: RateLimits) -> Limits:
        return cls(
            Buckets(*limits.per_code),
            Buckets(*limits.per_address),
            Buckets(*limits.seat_per_address),
        )

    def check(self, address: str, code: str | None, now: float) -> None:
        wait = self.per_address.take(address, now)
        if code is not None:
            wait = max(wait, self.per_code.take(code, now))
        if wait > 0:
            raise rate_limited(wait)

    def check_seat(self, address: str, now: float) -> None:
        """A seat route (release, heartbeat, license file): its own bucket,
        so a fleet's heartbeats do not crowd out its validations."""
        wait = self.seat_per_address.take(address, now)
        if wait > 0:
            raise rate_limited(wait)


class Licensing:
    def __init__(
        self,
        store: EntitlementStore,
        read_model: ReadModel,
        signer: Signer | None = None,
        license_ttl: timedelta = timedelta(days=7),
        limits: Limits | None = None,
        catalog: Catalog | None = None,
        index: ValidationIndex | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.read_model = read_model
        self.catalog = catalog or Catalog()
        self.index = index
        self.signer = signer
        self.license_ttl = license_ttl
        self.limits = limits or Limits.from_config(RateLimits())
        self.clock = clock

    # -- the customer's view ---------------------------------------------------

    async def _opened_by(self, request: Request, code: str) -> tuple[str, EntitlementView]:
        """(code hash, the entitlement the code opens), after the rate limits; 404 if none."""
        hashed = code_hash(code)
        self.limits.check(client_address(request.scope), hashed, time.monotonic())
        view = self._latest(await anyio.to_thread.run_sync(self._by_code, hashed), hashed)
        if view is None:
            raise HTTPError(404, "NOT_FOUND", "no entitlement has this activation code")
        return hashed, view

    async def portal(self, request: Request) -> JSONResponse:
        _, view = await self._opened_by(request, _code_param(request))
        portal = Portal(
            status=view.status,
            status_reason=view.status_reason,
            product=view.product,
            offering=view.offering,
            period_end=view.period_end,
            cancel_at=view.cancel_at,
            seats_total=view.seats,
            seats=[
                PortalSeat(label=s.label, activated_at=s.activated_at) for s in view.activations
            ],
            usage=_usage(view.limits, _current(view)).current,
        )
        return JSONResponse(portal.model_dump(mode="json"))

    # -- offline license files -----------------------------------------------

    async def keys(self, _: Request) -> JSONResponse:
        keys = [self.signer.public] if self.signer else []
        return JSONResponse(KeysV1(keys=keys).model_dump(mode="json"))

    async def license_file(self, request: Request) -> JSONResponse:
        seat_id, credential = self._seat_request(request)
        signed = await self.issue_license_file(seat_id, credential)
        return JSONResponse(signed.model_dump(mode="json"))

    async def issue_license_file(
        self, seat_id: str, credential: tuple[str, str] | None, owner: uuid.UUID | None = None
    ) -> LicenseFileV1:
        """A signed offline license file for a seat in force: opened by
        `credential` (code hash, secret hash), or, with none, any seat of
        entitlement `owner` (the customer portal). HTTPError 404 for no such
        seat, 403 NOT_ACTIVE, 503 without ENTITLE_LICENSE_KEY."""
        if self.signer is None:
            raise HTTPError(503, "not_configured", "license files need ENTITLE_LICENSE_KEY")
        entitlement_id = _seat_owner(seat_id)
        if credential is None and entitlement_id != owner:
            raise _no_seat(seat_id)
        entitlement = await anyio.to_thread.run_sync(self.store.entitlement, entitlement_id)
        now = self.clock()
        if (
            entitlement is None
            or seat_id not in entitlement.activations
            or (credential is not None and not entitlement.opens_seat(seat_id, *credential))
            or entitlement.seat_in_force(seat_id, now) is None  # a lapsed lease, a revoked code
        ):
            raise _no_seat(seat_id)
        if entitlement.status is not Status.ACTIVE:
            raise HTTPError(
                403,
                "NOT_ACTIVE",
                f"the entitlement is {entitlement.status.value}",
                entitlement_status=entitlement.status.value,
            )
        expires = now + self.license_ttl
        if entitlement.period_end is not None and now < entitlement.period_end < expires:
            expires = entitlement.period_end  # no further than what is paid for
        lease_until = entitlement.activations[seat_id].get("lease_until")
        if lease_until is not None and now < lease_until < expires:
            expires = lease_until  # a floating seat is only lent
        license = LicenseV1(
            key_id=self.signer.public.id,
            entitlement_id=entitlement.id,
            activation_id=seat_id,
            fingerprint=entitlement.activations[seat_id]["fingerprint"],
            offering=entitlement.sku,
            product=entitlement.product,
            features=dict(entitlement.features),
            limits=dict(entitlement.limits),
            status=entitlement.status.value,
            period_end=entitlement.period_end,
            issued_at=now,
            expires_at=expires,
        )
        return self.signer.sign(license)

    # -- activations -------------------------------------------------------

    async def activate(self, request: Request) -> JSONResponse:
        body = await read_json(request, ActivationRequest)
        hashed, view = await self._opened_by(request, body.activation_code)
        if body.product is not None and body.product != view.product:
            raise HTTPError(403, "WRONG_PRODUCT", "the activation code is for another product")
        request_id = idempotency(request)
        seat: dict[str, Any] = {}
        secret = new_seat_secret()  # only its hash is kept, and only for a new seat

        def change(entitlement: Entitlement, at: datetime) -> None:
            seat_id, new = entitlement.activate(
                hashed,
                body.fingerprint,
                body.label,
                new_seat_id(entitlement.id),
                request_id,
                at,
                self._lease(entitlement),
                seat_secret_hash(secret),
            )
            seat.update(id=seat_id, new=new)

        entitlement = await anyio.to_thread.run_sync(self._change, view.id, change)
        held = entitlement.activations[seat["id"]]
        activation = Activation(
            id=seat["id"],
            entitlement_id=entitlement.id,
            fingerprint=held["fingerprint"],
            label=held["label"],
            activated_at=held["activated_at"],
            lease_until=held.get("lease_until"),
            secret=secret if seat["new"] else None,
        )
        return JSONResponse(
            activation.model_dump(mode="json"), status_code=201 if seat["new"] else 200
        )

    def _lease(self, entitlement: Entitlement) -> timedelta | None:
        offering = self.catalog.get(entitlement.sku)
        if offering is None or not offering.floating:
            return None
        return timedelta(seconds=offering.lease_seconds)

    async def heartbeat(self, request: Request) -> JSONResponse:
        """Keep a floating seat: 200 {id, lease_until}; 404 once it lapsed."""
        seat_id, credential = self._seat_request(request)
        entitlement_id = _seat_owner(seat_id)
        request_id = idempotency(request)
        until: list[datetime | None] = []

        def change(entitlement: Entitlement, at: datetime) -> None:
            if not entitlement.opens_seat(seat_id, *credential):
                raise _no_seat(seat_id)
            until.append(entitlement.heartbeat(seat_id, self._lease(entitlement), request_id, at))

        await anyio.to_thread.run_sync(self._change, entitlement_id, change, _no_seat(seat_id))
        return JSONResponse(SeatLease(id=seat_id, lease_until=until[-1]).model_dump(mode="json"))

    async def deactivate(self, request: Request) -> Response:
        seat_id, credential = self._seat_request(request)
        entitlement_id = _seat_owner(seat_id)
        request_id = idempotency(request)

        def change(entitlement: Entitlement, at: datetime) -> None:
            if not entitlement.opens_seat(seat_id, *credential):
                raise _no_seat(seat_id)
            entitlement.release(seat_id, "released", request_id, at)

        await anyio.to_thread.run_sync(self._change, entitlement_id, change, _no_seat(seat_id))
        return Response(status_code=204)

    def _seat_request(self, request: Request) -> tuple[str, tuple[str, str]]:
        """(seat id, the credential as (code hash, secret hash)) of a request
        to a seat's route, after its rate limit; 401 without a credential.
        Which of the two the credential is, `Entitlement.opens_seat` finds."""
        self.limits.check_seat(client_address(request.scope), time.monotonic())
        token = bearer_token(request)
        if token is None:
            raise HTTPError(
                401,
                "unauthorized",
                "a seat's routes need 'Authorization: Bearer <seat secret>' (the secret "
                "its activation answered) or the activation code that opened the seat",
                {"WWW-Authenticate": "Bearer"},
            )
        return request.path_params["id"], (code_hash(token), seat_secret_hash(token))

    def _change(
        self,
        entitlement_id: uuid.UUID,
        change: Callable[[Entitlement, datetime], None],
        missing: HTTPError | None = None,
    ) -> Entitlement:
        """A seat or usage change, saved; another device or a webhook saving
        first makes it decide again on the new state. `missing` is the error
        when no entitlement has the id (default: a 404 about the code)."""
        try:
            entitlement = self.store.change(entitlement_id, lambda e: change(e, self.clock()))
        except NotActive as exc:
            raise HTTPError(
                403, "NOT_ACTIVE", str(exc), entitlement_status=exc.status.value
            ) from None
        except TooManySeats as exc:
            raise HTTPError(409, "TOO_MANY_SEATS", str(exc)) from None
        except OverLimit as exc:
            raise HTTPError(409, "OVER_LIMIT", str(exc)) from None
        except UnknownMetric as exc:
            raise HTTPError(422, "unknown_metric", str(exc)) from None
        except Refused as exc:
            raise HTTPError(404, "NOT_FOUND", str(exc)) from None
        except StillChanging:
            raise busy() from None
        if entitlement is None:
            raise missing or HTTPError(404, "NOT_FOUND", "no entitlement has this activation code")
        if self.index is not None:
            self.index.saved(entitlement)
        return entitlement

    # -- usage ----------------------------------------------------------------

    async def record_usage(self, request: Request) -> JSONResponse:
        body = await read_json(request, UsageRequest)
        hashed, view = await self._opened_by(request, body.activation_code)
        recorded: list[bool] = []

        def change(entitlement: Entitlement, at: datetime) -> None:
            if hashed not in entitlement.codes:
                raise Refused("the activation code is not active")
            recorded.append(
                entitlement.record_usage(body.metric, body.quantity, body.idempotency_key, at)
            )

        entitlement = await anyio.to_thread.run_sync(self._change, view.id, change)
        usage = _usage(entitlement.limits, _current(entitlement_view(entitlement)))
        return JSONResponse(usage.model_dump(mode="json"), status_code=201 if recorded[-1] else 200)

    async def usage(self, request: Request) -> JSONResponse:
        _, view = await self._opened_by(request, _code_param(request))
        usage = _usage(view.limits, _current(view))
        usage.periods = [
            UsagePeriod(period_start=p.period_start, period_end=p.period_end, metrics=p.metrics)
            for p in view.usage
        ]
        return JSONResponse(usage.model_dump(mode="json"))

    # -- validation --------------------------------------------------------

    async def validate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/validate. The hot path, so a bare ASGI app: app.py puts it
        in front of Starlette's middleware and router, and a well-formed
        request for an indexed code is answered from memory with bytes
        serialised once per entitlement state."""
        started = time.perf_counter()
        try:
            body = parse_json(await read_body(receive), ValidationRequest)
            hashed = code_hash(body.activation_code)
            self.limits.check(client_address(scope), hashed, time.monotonic())
            answered = self._answer(body, hashed)
            if answered is None:
                answered = await anyio.to_thread.run_sync(self._answer_from_store, body)
        except HTTPError as exc:
            VALIDATIONS.labels(exc.code).inc()
            await http_error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            VALIDATIONS.labels("internal_error").inc()
            await internal_error_response(exc)(scope, receive, send)
            return
        payload, code = answered
        await send_json(send, 200, payload)
        VALIDATIONS.labels(code).inc()
        VALIDATION_SECONDS.observe(time.perf_counter() - started)

    def _answer(self, body: ValidationRequest, hashed: str) -> tuple[bytes, str] | None:
        """The answer from the index alone, or None when it cannot decide: a
        code it does not know may be minutes old, and a device it does not
        list as holding a seat may have activated a moment ago."""
        held = self.index.get(hashed) if self.index is not None else None
        if held is None:
            return None
        if (
            body.fingerprint is not None
            and held.status == "ACTIVE"
            and not self._seat_listed(held, body.fingerprint)
        ):
            return None
        code = self.outcome(body, held)
        return _answer(held, code), code

    def _answer_from_store(self, body: ValidationRequest) -> tuple[bytes, str]:
        result = self.check(body)
        return result.model_dump_json().encode(), result.code

    def _by_code(self, hashed: str) -> EntitlementView | None:
        """The read model's entitlement of a code hash; its state from the
        store when the row cannot be read (`entitle audit verify` names it)."""
        try:
            return self.read_model.by_code(hashed)
        except UnreadableRow as exc:
            log.error("%s: answering from the store", exc)
            return self._from_store(uuid.UUID(exc.entitlement_id), hashed)

    def _from_store(self, entitlement_id: uuid.UUID, hashed: str) -> EntitlementView | None:
        entitlement = self.store.entitlement(entitlement_id)
        if entitlement is None or hashed not in entitlement.codes:
            return None
        return entitlement_view(entitlement)

    def _latest(self, view: EntitlementView | None, hashed: str) -> EntitlementView | None:
        """`view` from the read model, or the later state this process saved
        (read from the store: the index keeps only what validation needs): a
        code issued a moment ago opens its entitlement at once, and one
        revoked a moment ago (None) no longer does."""
        if self.index is None:
            return view
        if view is None:
            held = self.index.get(hashed)
            return self._from_store(held.id, hashed) if held is not None else None
        later = self.index.later(view.id, view.sequence)
        if later is None:
            return view
        return self._from_store(view.id, hashed) if hashed in later.codes else None

    def check(self, body: ValidationRequest) -> ValidationResult:
        """The answer from the read model (or this process's later save), and
        the store where a seat is in question."""
        hashed = code_hash(body.activation_code)
        view = self._latest(self._by_code(hashed), hashed)
        if view is None:
            return ValidationResult(valid=False, code="NOT_FOUND", status=None)
        held = Held.of(view)
        return validation_result(held, self.outcome(body, held))

    def outcome(self, body: ValidationRequest, held: Held) -> ValidationCode:
        if body.product is not None and body.product != held.product:
            return "WRONG_PRODUCT"
        if held.status != "ACTIVE":
            return held.status
        if body.fingerprint is not None and not self._holds_seat(held, body.fingerprint):
            return "NO_SEAT"
        if body.feature is not None and body.feature in held.limits:
            if held.current.get(body.feature, 0) >= held.limits[body.feature]:
                return "OVER_LIMIT"
        elif body.feature is not None and not held.features.get(body.feature):
            return "FEATURE_NOT_INCLUDED"
        return "VALID"

    def _seat_listed(self, held: Held, fingerprint: str) -> bool:
        now = self.clock()
        return any(
            listed == fingerprint and (lease_until is None or lease_until > now)
            for listed, lease_until in held.activations
        )

    def _holds_seat(self, held: Held, fingerprint: str) -> bool:
        if self._seat_listed(held, fingerprint):
            return True
        # The read model may not have the activation (or renewal) yet: the
        # store decides. This is the rare path, so it may cost a read.
        entitlement = self.store.find(held.id, Entitlement)
        return entitlement is not None and entitlement.holds_seat(fingerprint, self.clock())


def validation_result(held: Held, code: ValidationCode) -> ValidationResult:
    if code == "WRONG_PRODUCT":  # nothing of another product's entitlement
        return ValidationResult(valid=False, code=code, status=None)
    return ValidationResult(
        valid=code == "VALID",
        code=code,
        status=held.status,
        entitlement=ValidatedEntitlement(
            offering=held.offering,
            features=held.features,
            limits=held.limits,
            period_end=held.period_end,
            seats_used=len(held.activations),
            seats_total=held.seats,
        ),
    )


class _Shared:
    """One copy of each distinct mapping held by many entitlements (an
    offering's features and limits): the index holds references, not a copy
    per entitlement. Names (status, product, offering) are `sys.intern`ed."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __call__(self, value: Any) -> Any:
        if not value:
            return _EMPTY
        key = json.dumps(value, sort_keys=True, default=str)
        return self._values.setdefault(key, value)


_EMPTY: dict[str, Any] = {}


class Held:
    """What validation needs of one entitlement state, and nothing else: the
    index holds a million of these in under 1 KB each (`bench/scale.py`
    prints the figure), where a whole EntitlementView took about 6 KB.

    `activations` is ((fingerprint, lease_until or None), ...), oldest
    first; `current` this period's usage per metric; `codes` the state's
    active code hashes. Read-only once made: a new state is a new Held."""

    __slots__ = (
        "activations",
        "codes",
        "current",
        "features",
        "id",
        "limits",
        "offering",
        "period_end",
        "product",
        "seats",
        "sequence",
        "status",
    )

    def __init__(
        self, view: EntitlementView | _IndexRow, codes: tuple[str, ...], shared: _Shared
    ) -> None:
        self.id = view.id
        self.sequence = view.sequence
        self.codes = codes
        self.status: StatusName = sys.intern(view.status)  # type: ignore[assignment]
        self.product = sys.intern(view.product)
        self.offering = sys.intern(view.offering)
        self.features: dict[str, Any] = shared(view.features)
        self.limits: dict[str, int] = shared(view.limits)
        self.period_end = view.period_end
        self.seats = view.seats
        self.activations = tuple((s.fingerprint, s.lease_until) for s in view.activations)
        self.current = _current(view) or _EMPTY

    @classmethod
    def of(cls, view: EntitlementView, codes: tuple[str, ...] = ()) -> Held:
        return cls(view, codes, _Shared())


class _IndexSeat(BaseModel):
    fingerprint: str
    lease_until: datetime | None = None


class _IndexUsage(BaseModel):
    period_start: datetime | None
    metrics: dict[str, int]


class _IndexRow(BaseModel):
    """The fields of a read-model row (an EntitlementView's JSON) the index
    reads; parsing only these took 3.2 µs a row against the whole view's
    5.5-5.9 µs (200 rows of bench/scale.py, timeit)."""

    id: uuid.UUID
    sequence: int
    status: StatusName
    product: str
    offering: str
    features: dict[str, Any]
    limits: dict[str, int]
    period_start: datetime | None
    period_end: datetime | None
    seats: int
    activations: list[_IndexSeat] = []
    usage: list[_IndexUsage] = []


@functools.lru_cache(maxsize=1 << 16)
def _answer(held: Held, code: ValidationCode) -> bytes:
    """The serialised answer for a state: the most used states' answers are
    kept (a bounded cache, so a million entitlements do not hold one each)."""
    return validation_result(held, code).model_dump_json().encode()


class ValidationIndex:
    """Activation code hash -> entitlement, in the API process's memory, so
    validation needs no database round trip. It copies the read model's
    entitlements a page at a time, then fetches only those written since
    (`ReadModel.changed`) ten times a second: the projector has already
    folded them. What this process saves itself (activations, usage, admin
    actions) it holds at once, so a client sees its own change in the next
    validation."""

    def __init__(self, read_model: ReadModel, page: int = 2000) -> None:
        self.read_model = read_model
        self.page = page
        self._entries: dict[str, Held] = {}
        self._held: dict[uuid.UUID, Held] = {}
        self._shared = _Shared()
        self._after: tuple[int, str] = (0, "")
        self.loaded = False  # caught up with the read model once
        self.unreadable = 0  # rows skipped as unreadable (logged)
        self._lock = threading.Lock()  # writers only: refresh and saves run in threads

    def get(self, code_hash: str) -> Held | None:
        return self._entries.get(code_hash)

    def __len__(self) -> int:
        """Code hashes held (`entitle audit verify` checks there is no other)."""
        return len(self._entries)

    def refresh(self) -> int:
        """Fetch and hold everything changed; returns how many entitlements did."""
        count = 0
        while True:
            after, rows = self.read_model.changed(self._after, self.page)
            for _ in self._holding(after, rows):
                pass
            count += len(rows)
            if len(rows) < self.page:
                self.loaded = True
                return count

    def _holding(
        self, after: tuple[int, str], changed: list[tuple[str, list[str]]]
    ) -> Iterator[None]:
        """Hold fetched rows, pausing (yielding) every few, then advance."""
        for n, (body, codes) in enumerate(changed, 1):
            try:
                row = _IndexRow.model_validate_json(body)
            except ValidationError as exc:
                # One unreadable row (written by hand, a bad restore) must not
                # keep the API from starting: its codes validate from the
                # store instead, and `entitle audit verify` names the row.
                self.unreadable += 1
                log.error("validation index: an entitlement row is unreadable (%s)", describe(exc))
                continue
            self._hold(Held(row, tuple(codes), self._shared))
            if n % 8 == 0:
                yield
        self._after = after

    def saved(self, entitlement: Entitlement) -> None:
        """This process saved `entitlement`: hold its new state now."""
        self.hold(entitlement_view(entitlement), list(entitlement.codes))

    def hold(self, view: EntitlementView, codes: list[str]) -> None:
        """Hold `view` unless a later state of the entitlement is held: the
        read model may still be behind a state this process saved."""
        self._hold(Held(view, tuple(codes), self._shared))

    def _hold(self, held: Held) -> None:
        with self._lock:
            before = self._held.get(held.id)
            if before is not None and held.sequence < before.sequence:
                return
            # New codes first, then drop revoked ones: a code that stays never misses.
            for code in held.codes:
                self._entries[code] = held
            if before is not None:
                for code in set(before.codes) - set(held.codes):
                    self._entries.pop(code, None)
            self._held[held.id] = held

    def later(self, entitlement_id: uuid.UUID, sequence: int) -> Held | None:
        """The state held of this entitlement if it is later than `sequence`
        (what this process saved before the read model has it), else None."""
        held = self._held.get(entitlement_id)
        return held if held is not None and held.sequence > sequence else None

    async def follow(
        self, stop: asyncio.Event, working: Callable[[], None], interval: float = 0.1
    ) -> None:
        """Refresh every `interval` seconds until `stop` is set: a tenth of a
        second's changes in one query costs the hot path far less than
        chasing each change as it lands. The rows are parsed here on the
        event loop, a few at a time between requests: in a worker thread the
        parsing would hold the GIL for up to 5 ms while requests wait. The
        first load pages through the read model without waiting in between;
        until it is done, codes not held yet are answered from the read model."""
        working()
        while not stop.is_set():
            after, rows = await anyio.to_thread.run_sync(
                self.read_model.changed, self._after, self.page
            )
            for _ in self._holding(after, rows):
                await asyncio.sleep(0)
            working()
            if len(rows) == self.page:
                continue  # more to fetch at once
            if not self.loaded:
                self.loaded = True
                # What the first load made lives as long as the process: out
                # of the collector's sight, a full collection no longer walks
                # a million entries while validations wait (a p99 spike).
                # Replaced entries are still freed by their reference counts.
                gc.freeze()
            await sleep_unless(stop, interval)


def _code_param(request: Request) -> str:
    code = request.query_params.get("activation_code", "")
    if not code or len(code) > 64:
        raise HTTPError(422, "invalid_query", "activation_code is required")
    return code


def new_seat_id(entitlement_id: uuid.UUID) -> str:
    """<entitlement id>.<64 random bits>: a seat's routes reach the store
    directly, without waiting for the read model to learn of the seat."""
    return f"{entitlement_id}.{secrets.token_hex(8)}"


def _seat_owner(seat_id: str) -> uuid.UUID:
    owner, _, tail = seat_id.partition(".")
    try:
        if len(tail) != 16:
            raise ValueError
        return uuid.UUID(owner)
    except ValueError:
        raise _no_seat(seat_id) from None


def _no_seat(seat_id: str) -> HTTPError:
    """The one answer for a seat that is not there, not in use, or not
    opened by the credential given: which of them, a client cannot tell."""
    return HTTPError(404, "NOT_FOUND", f"no seat {seat_id} is in use")


def _current(view: EntitlementView | _IndexRow) -> dict[str, int]:
    """This period's usage per metric."""
    for period in view.usage:
        if period.period_start == view.period_start:
            return period.metrics
    return {}


def _usage(limits: dict[str, int], current: dict[str, int]) -> Usage:
    return Usage(
        current={m: UsageMetric(used=current.get(m, 0), limit=limit) for m, limit in limits.items()}
    )


_CODE = Query(
    "activation_code",
    "The customer's activation code",
    {"type": "string", "minLength": 1, "maxLength": 64},
    required=True,
)
_SEAT = {"id": "The seat's id (the activation's `id`)"}
_BY_CODE = {
    404: "No entitlement has this activation code",
    429: "Too many requests for this code or from this address",
}
_SEAT_ERRORS = {
    404: "No such seat is in use, or not opened by this credential",
    503: "The entitlement kept changing; retry",
}
_ACTIVE = {403: "The entitlement is not active (`entitlement_status` says what it is)"}
TAG = "licensing"

VALIDATE = Operation(
    "Is this activation code good (for this device, feature or product)?",
    TAG,
    {200: ValidationResult},
    body=ValidationRequest,
    errors={429: "Too many requests for this code or from this address"},
    description="Answers 200 with `valid` and a `code` saying why for every code, known or not.",
)


def routes(licensing: Licensing) -> list[Route]:
    return [
        Documented(
            "/v1/activations",
            licensing.activate,
            "POST",
            Operation(
                "Take a seat for a device (201 new, 200 the device already held one)",
                TAG,
                {200: Activation, 201: Activation},
                body=ActivationRequest,
                errors={
                    **_BY_CODE,
                    403: "The entitlement is not active, or the code is for another product"
                    " (WRONG_PRODUCT)",
                    409: "Every seat is taken",
                },
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/activations/{id}",
            licensing.deactivate,
            "DELETE",
            Operation(
                "Free the seat",
                TAG,
                {204: None},
                path=_SEAT,
                security="seat",
                errors=_SEAT_ERRORS,
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/activations/{id}/heartbeat",
            licensing.heartbeat,
            "POST",
            Operation(
                "Keep a floating seat",
                TAG,
                {200: SeatLease},
                path=_SEAT,
                security="seat",
                errors={**_SEAT_ERRORS, **_ACTIVE},
                idempotency_key=True,
            ),
        ),
        Documented(
            "/v1/activations/{id}/license-file",
            licensing.license_file,
            "POST",
            Operation(
                "A signed offline license file for the seat",
                TAG,
                {200: LicenseFileV1},
                path=_SEAT,
                security="seat",
                errors={**_SEAT_ERRORS, **_ACTIVE, 503: "No signing key is configured"},
            ),
        ),
        Documented(
            "/v1/keys",
            licensing.keys,
            "GET",
            Operation("The public keys that sign license files", TAG, {200: KeysV1}),
        ),
        Documented(
            "/v1/portal",
            licensing.portal,
            "GET",
            Operation(
                "What the customer may see of their entitlement",
                TAG,
                {200: Portal},
                query=(_CODE,),
                errors=_BY_CODE,
            ),
        ),
        Documented(
            "/v1/usage",
            licensing.record_usage,
            "POST",
            Operation(
                "Record usage of a metered feature (201 recorded, 200 a repeated idempotency key)",
                TAG,
                {200: Usage, 201: Usage},
                body=UsageRequest,
                errors={**_BY_CODE, **_ACTIVE, 409: "Over the offering's limit"},
            ),
        ),
        Documented(
            "/v1/usage",
            licensing.usage,
            "GET",
            Operation(
                "Usage this period and in every period",
                TAG,
                {200: Usage},
                query=(_CODE,),
                errors=_BY_CODE,
            ),
        ),
    ]
