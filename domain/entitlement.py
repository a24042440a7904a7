"""The Entitlement aggregate, the Order that groups one purchase's
entitlements, and the Payment that ties a provider payment to its order.

Every change is a domain event; an aggregate's state is the fold of its
events. Methods take the recording time (`at`) and the provider's time
(`occurred_at`) as arguments, because domain code has no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain import lifecycle
from domain.catalog import Catalog, Offering
from domain.lifecycle import Fact, Facts, Policy, Standing, Status, Terms

__all__ = ["Cause", "Entitlement", "Order", "Payment", "Refused", "Status", "event_type"]

# Ids are derived from what the provider tells us, so the same purchase always
# lands on the same aggregate, whichever process or replay computes it.
NAMESPACE = uuid5(NAMESPACE_URL, "https://entitle.dev/ids")


@lru_cache(maxsize=16_384)
def order_id(source: str, order_ref: str) -> UUID:
    return uuid5(NAMESPACE, f"order\x1f{source}\x1f{order_ref}")


@lru_cache(maxsize=16_384)
def entitlement_id(source: str, order_ref: str, slot: str) -> UUID:
    return uuid5(NAMESPACE, f"entitlement\x1f{source}\x1f{order_ref}\x1f{slot}")


def normalize_code(code: str) -> str:
    """An activation code as typed by a person: any case, with or without
    hyphens and spaces, O for 0 and I or L for 1 (Crockford base32)."""
    # str.replace, not str.translate: this runs on every validation, and a
    # translation table costs ten times as much.
    plain = "".join(code.split()).replace("-", "").upper()
    return plain.replace("O", "0").replace("I", "1").replace("L", "1")


def code_hash(code: str) -> str:
    """What is stored of an activation code. The codes carry 125 random bits,
    so a plain SHA-256 cannot be reversed by guessing."""
    return hashlib.sha256(b"entitle-code\x1f" + normalize_code(code).encode()).hexdigest()


def seat_secret_hash(secret: str) -> str:
    """What is stored of a seat's secret. Secrets carry 256 random bits, so a
    plain SHA-256 cannot be reversed by guessing."""
    return hashlib.sha256(b"entitle-seat\x1f" + secret.encode()).hexdigest()


def event_type(event: Any) -> str:
    """`entitlement.activated` for Entitlement.Activated, and so on."""
    return _event_type(event.__class__)


@lru_cache(maxsize=256)
def _event_type(cls: Any) -> str:
    return f"{_snake(cls.__qualname__.split('.')[0])}.{_snake(cls.__name__)}"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@lru_cache(maxsize=16_384)
def payment_id(source: str, ref: str) -> UUID:
    return uuid5(NAMESPACE, f"payment\x1f{source}\x1f{ref}")


class Refused(ValueError):
    """An admin command that makes no sense in the entitlement's state."""


class NotActive(Refused):
    """Activation needs an ACTIVE entitlement."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"the entitlement is {status.value}")
        self.status = status


class UnknownMetric(Refused):
    pass


class OverLimit(Refused):
    def __init__(self, metric: str, used: int, limit: int) -> None:
        super().__init__(f"{metric}: {used} of {limit} used this period")
        self.metric, self.used, self.limit = metric, used, limit


class TooManySeats(Refused):
    def __init__(self, seats: int) -> None:
        super().__init__(f"all {seats} seat(s) are in use")
        self.seats = seats


@dataclass(frozen=True)
class Cause:
    """Why something changed: a provider event, the schedule, or an admin."""

    kind: str
    source: str
    event_id: str

    @classmethod
    def provider(cls, source: str, event_id: str) -> Cause:
        return cls("provider", source, event_id)

    @classmethod
    def schedule(cls, due_at: datetime) -> Cause:
        return cls("schedule", "schedule", f"due@{due_at.isoformat()}")

    @classmethod
    def admin(cls, key_name: str, request_id: str) -> Cause:
        return cls("admin", key_name, request_id)

    @classmethod
    def client(cls, request_id: str) -> Cause:
        """The vendor's application, acting with a customer's activation code."""
        return cls("client", "activation", request_id)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.source}:{self.event_id}"

    @classmethod
    def of_fact(cls, fact: Mapping[str, Any]) -> Cause | None:
        """The provider event behind a fact, from its `key`; None for a
        fact no provider event caused (an admin's, the schedule's)."""
        kind, _, rest = str(fact.get("key", "")).partition(":")
        source, _, event_id = rest.partition(":")
        return cls(kind, source, event_id) if kind == "provider" else None

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "event_id": self.event_id}


def _cause_key(cause: dict[str, str]) -> str:
    return f"{cause['kind']}:{cause['source']}:{cause['event_id']}"


_STANDING_FIELDS = (
    "status",
    "reason",
    "period_start",
    "period_end",
    "trial",
    "overdue",
    "cancel_at",
    "due_at",
)


class Entitlement(Aggregate):
    """One purchased item: what it grants and where it stands.

    State is derived (see `domain.lifecycle`) from the facts the entitlement
    has been given; each event carries the fact that caused it, if any, and
    the resulting values, so the history reads on its own.
    """

    class Event(Aggregate.Event):
        cause: dict[str, str]
        occurred_at: datetime
        fact: dict[str, Any] | None

        def apply(self, aggregate: Any) -> None:
            aggregate.applied.add(_cause_key(self.cause))
            if self.fact is not None:
                aggregate.facts.add(self.fact)
            self.change(aggregate)

        def change(self, aggregate: Any) -> None:
            """The event's effect on state, beyond remembering its cause."""

    class Created(Event, Aggregate.Created):
        source: str
        order_ref: str
        slot: str
        sku: str
        product: str
        features: dict[str, Any]
        limits: dict[str, int]
        seats: int
        quantity: int
        customer_id: str | None
        customer_email: str | None
        code_hash: str
        inherited: list[dict[str, Any]]

        # Version 1 stored the activation code itself; now only its hash.
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["code_hash"] = code_hash(state.pop("activation_code"))

        def apply(self, aggregate: Any) -> None:
            # __init__ has built the state; nothing more to fold.
            pass

    def __init__(
        self,
        source: str,
        order_ref: str,
        slot: str,
        sku: str,
        product: str,
        features: dict[str, Any],
        limits: dict[str, int],
        seats: int,
        quantity: int,
        customer_id: str | None,
        customer_email: str | None,
        code_hash: str,
        inherited: list[dict[str, Any]],
        cause: dict[str, str],
        occurred_at: datetime,
        fact: dict[str, Any] | None,
    ) -> None:
        self.source = source
        self.order_ref = order_ref
        self.slot = slot
        self.sku = sku
        self.product = product
        self.features = features
        self.limits = limits
        self.seats = seats
        self.quantity = quantity
        self.customer_id = customer_id
        self.customer_email = customer_email
        # Activation codes by the hash of each (never the code itself), with
        # the index the code was derived from; revoked ones are removed.
        self.codes: dict[str, int] = {code_hash: 0}
        self.codes_issued = 1
        # Seats in use: seat id -> fingerprint, label, activation time, code hash.
        self.activations: dict[str, dict[str, Any]] = {}
        # Usage per paid period (keyed by its start) and metric.
        self.usage: dict[str, dict[str, Any]] = {}
        self.status = Status.PENDING
        self.reason: str | None = None
        self.period_start: datetime | None = None
        self.period_end: datetime | None = None
        self.trial = False
        self.overdue = False
        self.cancel_at: datetime | None = None
        self.due_at: datetime | None = None
        # Every fact given (also those inherited from the order's other
        # entitlements), and every cause applied, so redelivery changes nothing:
        # an inherited fact's event is applied, here too. Except the event
        # that creates this one, which `settle` applies next: re-driven, it
        # may now map this item where the inherited copy did not.
        self.facts = Facts(inherited)
        creating = _cause_key(cause)
        self.applied: set[str] = {f["key"] for f in inherited if f["key"] != creating}
        if fact is not None:
            self.facts.add(fact)

    @classmethod
    def create(
        cls,
        *,
        source: str,
        order_ref: str,
        slot: str,
        terms: Terms,
        code_hash: str,
        inherited: list[Fact],
        cause: Cause,
        occurred_at: datetime,
        at: datetime,
    ) -> Entitlement:
        """A PENDING entitlement; `settle` then brings it up to date."""
        return cls._create(
            cls.Created,
            id=entitlement_id(source, order_ref, slot),
            timestamp=at,
            source=source,
            order_ref=order_ref,
            slot=slot,
            sku=terms.sku,
            product=terms.product,
            features=dict(terms.features),
            limits=dict(terms.limits),
            seats=terms.seats,
            quantity=terms.quantity,
            customer_id=terms.customer_id,
            customer_email=terms.customer_email,
            code_hash=code_hash,
            inherited=list(inherited),
            cause=cause.as_dict(),
            occurred_at=occurred_at,
            fact=None,
        )

    @property
    def terms(self) -> Terms:
        return Terms(
            sku=self.sku,
            product=self.product,
            features=self.features,
            limits=self.limits,
            seats=self.seats,
            quantity=self.quantity,
            customer_id=self.customer_id,
            customer_email=self.customer_email,
        )

    @property
    def standing(self) -> Standing:
        return Standing(**{name: getattr(self, name) for name in _STANDING_FIELDS})

    def has_applied(self, cause: Cause) -> bool:
        return cause.key in self.applied

    # -- the events ------------------------------------------------------

    class Noted(Event):
        """A fact that changed nothing (stale, partial, or already implied)."""

    class TermsChanged(Event):
        sku: str
        product: str
        features: dict[str, Any]
        limits: dict[str, int]
        seats: int
        quantity: int

        def change(self, aggregate: Any) -> None:
            for name in ("sku", "product", "features", "limits", "seats", "quantity"):
                setattr(aggregate, name, getattr(self, name))

    class OfferingChanged(TermsChanged):
        pass

    class SeatsChanged(TermsChanged):
        pass

    class CustomerChanged(Event):
        customer_id: str | None
        customer_email: str | None

        def change(self, aggregate: Any) -> None:
            aggregate.customer_id = self.customer_id
            aggregate.customer_email = self.customer_email

    def forget_customer(self, key_name: str, erasure_id: str, at: datetime) -> None:
        """The customer's personal data were erased (their key deleted):
        recorded as a change of customer to no e-mail address, caused by the
        admin `key_name` with event id `erasure:<erasure_id>`, so every
        projection drops the address through the log. Always recorded, also
        when the address already reads as None (its key is gone)."""
        self._record(
            self.CustomerChanged,
            Cause.admin(key_name, f"erasure:{erasure_id}"),
            at,
            customer_id=self.customer_id,
            customer_email=None,
        )

    class StandingChanged(Event):
        status: str
        reason: str | None
        period_start: datetime | None
        period_end: datetime | None
        trial: bool
        overdue: bool
        cancel_at: datetime | None
        due_at: datetime | None

        def change(self, aggregate: Any) -> None:
            for name in _STANDING_FIELDS:
                setattr(aggregate, name, getattr(self, name))
            aggregate.status = Status(self.status)

    class Activated(StandingChanged):
        pass

    class Renewed(StandingChanged):
        pass

    class Extended(StandingChanged):
        pass

    class Overdue(StandingChanged):
        pass

    class Recovered(StandingChanged):
        pass

    class Suspended(StandingChanged):
        pass

    class Reinstated(StandingChanged):
        pass

    class Canceled(StandingChanged):
        pass

    class Expired(StandingChanged):
        pass

    class CancelScheduled(StandingChanged):
        pass

    class CancelUnscheduled(StandingChanged):
        pass

    class Revised(StandingChanged):
        """The standing changed in a detail no other event names (a reason,
        the next due time)."""

    # -- the one way state changes ----------------------------------------

    def settle(
        self,
        fact: Fact | None,
        cause: Cause,
        occurred_at: datetime,
        catalog: Catalog,
        policy: Policy,
        at: datetime,
    ) -> bool:
        """Record `fact` (if any) and bring terms and standing up to date as
        of `at`. Returns whether anything was recorded."""
        if self.has_applied(cause):
            return False
        if fact is not None:
            fact = {**fact, "key": cause.key, "at": occurred_at}
            # Added now so the derivation sees it; the event that carries it
            # adds it again on replay (adding is idempotent).
            self.facts.add(fact)
        carried = fact
        emitted = False

        def emit(event_class: Any, **fields: Any) -> None:
            nonlocal carried, emitted
            self.trigger_event(
                event_class,
                timestamp=at,
                cause=cause.as_dict(),
                occurred_at=occurred_at,
                fact=carried,
                **fields,
            )
            carried = None
            emitted = True

        terms = self.facts.terms(self.slot, self.terms, catalog)
        current = self.terms
        grants = ("sku", "product", "features", "limits")
        if any(getattr(terms, n) != getattr(current, n) for n in grants):
            emit(self.OfferingChanged, **_terms_fields(terms))
        elif (terms.seats, terms.quantity) != (current.seats, current.quantity):
            emit(self.SeatsChanged, **_terms_fields(terms))
        if len(self.activations) > self.seats:
            self._release_beyond(self.seats, cause, occurred_at, at)
            emitted = True
        if (terms.customer_id, terms.customer_email) != (self.customer_id, self.customer_email):
            emit(
                self.CustomerChanged,
                customer_id=terms.customer_id,
                customer_email=terms.customer_email,
            )
        standing = self.facts.standing(self.slot, catalog.get(self.sku), policy, at)
        event_class = self._standing_event(standing, cause)
        if event_class is not None:
            fields = {name: getattr(standing, name) for name in _STANDING_FIELDS}
            fields["status"] = standing.status.value
            emit(event_class, **fields)
        if carried is not None:
            emit(self.Noted)
        return emitted

    def _standing_event(self, new: Standing, cause: Cause) -> type[StandingChanged] | None:
        old = self.standing
        if new == old:
            return None
        if new.status is not old.status:
            return {
                Status.ACTIVE: self.Activated if old.status is Status.PENDING else self.Reinstated,
                Status.PENDING: self.Reinstated,
                Status.SUSPENDED: self.Suspended,
                Status.CANCELED: self.Canceled,
                Status.EXPIRED: self.Expired,
            }[new.status]
        if (
            new.period_end is not None
            and (old.period_end is None or new.period_end > old.period_end)
            and new.status is not Status.CANCELED  # a later end renews nothing ended
        ):
            return self.Extended if cause.kind == "admin" else self.Renewed
        if new.overdue != old.overdue:
            return self.Overdue if new.overdue else self.Recovered
        if new.cancel_at != old.cancel_at:
            return self.CancelScheduled if new.cancel_at is not None else self.CancelUnscheduled
        return self.Revised

    def _record(
        self,
        event_class: Any,
        cause: Cause,
        at: datetime,
        occurred_at: datetime | None = None,
        **fields: Any,
    ) -> None:
        """An event that carries no provider fact: an admin's, a client's or
        the schedule's doing, which happened when it was recorded unless said."""
        self.trigger_event(
            event_class,
            timestamp=at,
            cause=cause.as_dict(),
            occurred_at=occurred_at or at,
            fact=None,
            **fields,
        )

    # -- activation codes ------------------------------------------------

    class CodeIssued(Event):
        code_hash: str
        index: int

        def change(self, aggregate: Any) -> None:
            aggregate.codes[self.code_hash] = self.index
            aggregate.codes_issued = max(aggregate.codes_issued, self.index + 1)

    class CodeRevoked(Event):
        code_hash: str
        index: int

        def change(self, aggregate: Any) -> None:
            aggregate.codes.pop(self.code_hash, None)

    def issue_code(
        self, code_hash_for: Callable[[UUID, int], str], by: str, request_id: str, at: datetime
    ) -> int:
        """Another activation code (e.g. for a second department); returns
        its index, from which the code is derived again for display."""
        cause = Cause.admin(by, request_id)
        if self.has_applied(cause):
            return self.codes_issued - 1
        index = self.codes_issued
        self._record(
            self.CodeIssued,
            cause,
            at,
            code_hash=code_hash_for(self.id, index),
            index=index,
        )
        return index

    def revoke_code(self, index: int, by: str, request_id: str, at: datetime) -> None:
        cause = Cause.admin(by, request_id)
        if self.has_applied(cause):
            return
        hashes = [h for h, i in self.codes.items() if i == index]
        if not hashes:
            raise Refused(f"no active activation code with index {index}")
        self._record(
            self.CodeRevoked,
            cause,
            at,
            code_hash=hashes[0],
            index=index,
        )
        self._release_revoked(cause, at)

    def _release_revoked(self, cause: Cause, at: datetime) -> None:
        """Release the seats whose activation code is no longer active: a
        revoked code takes its devices with it (and the history says so)."""
        for seat_id in [s for s, seat in self.activations.items() if not self._code_active(seat)]:
            self._record(
                self.SeatReleased,
                cause,
                at,
                seat_id=seat_id,
                reason="code_revoked",
            )

    def _code_active(self, seat: dict[str, Any]) -> bool:
        return seat.get("code_hash") in self.codes

    def held_seats(self) -> dict[str, dict[str, Any]]:
        """Seats by id, without those whose code was revoked while they were
        held (before revoking released seats): what the entitlement shows.
        Lapsed leases are included; whether one counts depends on the time."""
        return {s: seat for s, seat in self.activations.items() if self._code_active(seat)}

    # -- seats ---------------------------------------------------------------

    class SeatActivated(Event):
        seat_id: str
        fingerprint: str
        label: str | None
        code_hash: str  # the activation code that opened the seat
        lease_until: datetime | None  # floating seats only
        secret_hash: str | None  # the seat's own secret; None before seats had one

        # Version 1 had no seat secret: such a seat opens with its code only.
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["secret_hash"] = None

        def change(self, aggregate: Any) -> None:
            aggregate.activations[self.seat_id] = {
                "fingerprint": self.fingerprint,
                "label": self.label,
                "activated_at": self.timestamp,
                "code_hash": self.code_hash,
                "lease_until": self.lease_until,
                "secret_hash": self.secret_hash,
            }

    class SeatRenewed(Event):
        seat_id: str
        lease_until: datetime

        def change(self, aggregate: Any) -> None:
            aggregate.activations[self.seat_id]["lease_until"] = self.lease_until

    class SeatReleased(Event):
        seat_id: str
        reason: str

        def change(self, aggregate: Any) -> None:
            aggregate.activations.pop(self.seat_id, None)

    def holds_seat(self, fingerprint: str, now: datetime) -> bool:
        seat_id = self.seat_for(fingerprint)
        return seat_id is not None and self.seat_in_force(seat_id, now) is not None

    def seat_in_force(self, seat_id: str, now: datetime) -> dict[str, Any] | None:
        """The seat, if it counts at `now`: its lease (if any) has not lapsed
        and the code that opened it is still active. A seat held when its
        code was revoked, before revoking released seats, does not count."""
        seat = self.activations.get(seat_id)
        if seat is None or _lapsed(seat, now) or not self._code_active(seat):
            return None
        return seat

    def opens_seat(self, seat_id: str, code_hash: str, secret_hash: str) -> bool:
        """Whether a credential, given as both of its possible hashes, opens
        seat `seat_id`: the seat's own secret, or the activation code that
        opened the seat (another code of the entitlement does not)."""
        seat = self.activations.get(seat_id)
        if seat is None:
            return False
        own = seat.get("secret_hash")
        if own is not None and hmac.compare_digest(own, secret_hash):
            return True
        return hmac.compare_digest(seat["code_hash"], code_hash)

    def heartbeat(
        self, seat_id: str, lease: timedelta | None, request_id: str, at: datetime
    ) -> datetime | None:
        """Keep a floating seat's lease; returns when it now ends (None for a
        seat that is not leased). Recorded only when less than half of the
        lease is left, so heartbeats do not flood the history. Refused for a
        seat not in force (`seat_in_force`)."""
        seat = self.seat_in_force(seat_id, at)
        if seat is None:
            raise Refused(f"no seat {seat_id} is in use (a lapsed lease must activate again)")
        if (
            lease is not None
            and seat["lease_until"] is not None
            and (seat["lease_until"] - at < lease / 2)
        ):
            cause = Cause.client(request_id)
            self._record(
                self.SeatRenewed,
                cause,
                at,
                seat_id=seat_id,
                lease_until=at + lease,
            )
        lease_until: datetime | None = seat["lease_until"]  # renewed in place
        return lease_until

    def seat_for(self, fingerprint: str) -> str | None:
        for seat_id, seat in self.activations.items():
            if seat["fingerprint"] == fingerprint:
                return seat_id
        return None

    def activate(
        self,
        code_hash: str,
        fingerprint: str,
        label: str | None,
        seat_id: str,
        request_id: str,
        at: datetime,
        lease: timedelta | None = None,
        secret_hash: str | None = None,
    ) -> tuple[str, bool]:
        """Take a seat for a device; returns (seat id, whether it is new). The
        same fingerprint again gets its existing seat (and keeps its secret:
        `secret_hash` is only recorded for a new seat). Seats of revoked
        codes and, with a `lease` (floating seats), lapsed leases are freed first."""
        if code_hash not in self.codes:
            raise Refused("the activation code is not active")
        self._release_revoked(Cause.client(request_id), at)
        for lapsed_id in [s for s, seat in self.activations.items() if _lapsed(seat, at)]:
            self._record(
                self.SeatReleased,
                Cause.client(request_id),
                at,
                seat_id=lapsed_id,
                reason="lease_expired",
            )
        existing = self.seat_for(fingerprint)
        if existing is not None:
            if lease is not None:
                self.heartbeat(existing, lease, request_id, at)
            return existing, False
        if self.status is not Status.ACTIVE:
            raise NotActive(self.status)
        if len(self.activations) >= self.seats:
            raise TooManySeats(self.seats)
        cause = Cause.client(request_id)
        self._record(
            self.SeatActivated,
            cause,
            at,
            seat_id=seat_id,
            fingerprint=fingerprint,
            label=label,
            code_hash=code_hash,
            lease_until=at + lease if lease is not None else None,
            secret_hash=secret_hash,
        )
        return seat_id, True

    def release(
        self, seat_id: str, reason: str, request_id: str, at: datetime, by: str | None = None
    ) -> None:
        """Free a seat: by the device (its credential), or by admin `by`."""
        if seat_id not in self.activations:
            raise Refused(f"no seat {seat_id} in use")
        cause = Cause.client(request_id) if by is None else Cause.admin(by, request_id)
        if self.has_applied(cause):
            return
        self._record(
            self.SeatReleased,
            cause,
            at,
            seat_id=seat_id,
            reason=reason,
        )

    def _release_beyond(
        self, seats: int, cause: Cause, occurred_at: datetime, at: datetime
    ) -> None:
        """Fewer seats (a downgrade): the newest activations go, the oldest stay."""
        newest_first = sorted(
            self.activations.items(), key=lambda item: item[1]["activated_at"], reverse=True
        )
        for seat_id, _ in newest_first[: max(0, len(self.activations) - seats)]:
            self._record(
                self.SeatReleased,
                cause,
                at,
                seat_id=seat_id,
                reason="seats_reduced",
                occurred_at=occurred_at,
            )

    # -- usage ---------------------------------------------------------------

    class UsageRecorded(Event):
        metric: str
        quantity: int
        period_start: datetime | None
        period_end: datetime | None

        def change(self, aggregate: Any) -> None:
            key = _period_key(self.period_start)
            period = aggregate.usage.setdefault(
                key,
                {"period_start": self.period_start, "period_end": self.period_end, "metrics": {}},
            )
            period["period_end"] = self.period_end
            period["metrics"][self.metric] = period["metrics"].get(self.metric, 0) + self.quantity

    def used(self, metric: str) -> int:
        period = self.usage.get(_period_key(self.period_start))
        return int(period["metrics"].get(metric, 0)) if period else 0

    def record_usage(self, metric: str, quantity: int, idempotency_key: str, at: datetime) -> bool:
        """Count `quantity` of `metric` against this period's limit; False if
        this idempotency key was already counted."""
        cause = Cause("client", "usage", idempotency_key)
        if self.has_applied(cause):
            return False
        if self.status is not Status.ACTIVE:
            raise NotActive(self.status)
        if metric not in self.limits:
            raise UnknownMetric(f"the offering has no limit named {metric!r}")
        if quantity < 1:
            raise Refused("quantity must be at least 1")
        used, limit = self.used(metric), int(self.limits[metric])
        if used + quantity > limit:
            raise OverLimit(metric, used, limit)
        self._record(
            self.UsageRecorded,
            cause,
            at,
            metric=metric,
            quantity=quantity,
            period_start=self.period_start,
            period_end=self.period_end,
        )
        return True

    # -- admin commands ----------------------------------------------------

    def change_terms(
        self,
        sku: str | None,
        seats: int | None,
        by: str,
        reason: str,
        request_id: str,
        catalog: Catalog,
        policy: Policy,
        at: datetime,
    ) -> bool:
        """Set the offering (`sku`) and/or the seats, as admin `by`: seats
        beyond the new count are released, newest first. A provider's later
        statement of the item wins (`lifecycle.Facts.terms`). Refused for an
        unknown offering, seats that are no multiple of its seats, or no change."""
        cause = Cause.admin(by, request_id)
        if self.has_applied(cause):
            return False
        if not reason.strip():
            raise Refused("a change needs a reason")
        offering = catalog.get(sku or self.sku)
        if offering is None:
            raise Refused(f"no offering {sku or self.sku!r} in the catalog")
        quantity = _quantity(offering, seats, self.quantity if sku in (None, self.sku) else 1)
        if (offering.sku, quantity) == (self.sku, self.quantity):
            raise Refused("the entitlement already has this offering and these seats")
        fact = lifecycle.change(self.slot, offering.sku, quantity, by, reason)
        return self.settle(fact, cause, at, catalog, policy, at)

    def administer(
        self,
        action: str,
        by: str,
        reason: str,
        request_id: str,
        catalog: Catalog,
        policy: Policy,
        at: datetime,
        days: int = 0,
    ) -> bool:
        """suspend, reinstate, cancel or extend (by `days`), as admin `by`."""
        cause = Cause.admin(by, request_id)
        if self.has_applied(cause):
            return False
        if not reason.strip():
            raise Refused("an admin action needs a reason")
        waived: list[str] = []
        if action == "suspend":
            if self.status in (Status.CANCELED, Status.SUSPENDED):
                raise Refused(f"the entitlement is {self.status.value}; it cannot be suspended")
        elif action == "cancel":
            if self.status is Status.CANCELED:
                raise Refused("the entitlement is already CANCELED")
        elif action == "reinstate":
            blocking = self.facts.blocking(self.slot, at, catalog.get(self.sku))
            if not blocking:
                raise Refused(
                    f"the entitlement is {self.status.value} and nothing holds it back; "
                    "to give more time, extend it"
                )
            waived = [key for _, _, key in blocking if key is not None]
        elif action == "extend":
            if days < 1:
                raise Refused("extend needs days of at least 1")
        else:
            raise Refused(f"unknown action {action!r}")
        return self.settle(
            lifecycle.admin(action, by, reason, days, waived), cause, at, catalog, policy, at
        )


def _quantity(offering: Offering, seats: int | None, current: int) -> int:
    """The quantity giving `seats` of `offering` (its seats x quantity)."""
    if seats is None:
        return current
    if seats < 1 or seats % offering.seats:
        raise Refused(
            f"seats must be a multiple of offering {offering.sku!r}'s {offering.seats} seats"
        )
    return seats // offering.seats


def _lapsed(seat: dict[str, Any], now: datetime) -> bool:
    lease_until = seat.get("lease_until")
    return lease_until is not None and bool(lease_until <= now)


def _period_key(start: datetime | None) -> str:
    return start.isoformat() if start is not None else "-"


def _terms_fields(terms: Terms) -> dict[str, Any]:
    return {
        "sku": terms.sku,
        "product": terms.product,
        "features": dict(terms.features),
        "limits": dict(terms.limits),
        "seats": terms.seats,
        "quantity": terms.quantity,
    }


class Order(Aggregate):
    """One provider subscription or order: which entitlements it holds, and
    facts that arrived before any entitlement existed to take them."""

    class Opened(Aggregate.Created):
        source: str
        order_ref: str

    def __init__(self, source: str, order_ref: str) -> None:
        self.source = source
        self.order_ref = order_ref
        self.entitlements: dict[str, UUID] = {}
        self.parked: list[Fact] = []

    @classmethod
    def open(cls, source: str, order_ref: str, at: datetime) -> Order:
        return cls._create(
            cls.Opened,
            id=order_id(source, order_ref),
            timestamp=at,
            source=source,
            order_ref=order_ref,
        )

    class EntitlementAdded(Aggregate.Event):
        slot: str
        entitlement_id: UUID

        def apply(self, aggregate: Any) -> None:
            aggregate.entitlements[self.slot] = self.entitlement_id

    def add_entitlement(self, slot: str, entitlement_id: UUID, at: datetime) -> None:
        if slot not in self.entitlements:
            self.trigger_event(
                self.EntitlementAdded, timestamp=at, slot=slot, entitlement_id=entitlement_id
            )

    class FactParked(Aggregate.Event):
        fact: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            aggregate.parked.append(self.fact)

    class PaymentFactDelivered(Aggregate.Event):
        """A refund or dispute reached this order's entitlements. Recorded so
        that a concurrent change to the order (a new item copying what its
        siblings know) conflicts with it and is retried, instead of missing it."""

        fact: dict[str, Any]
        cause: dict[str, str]
        #: Entitlement id -> the events the fact gave it (not in events
        #: stored before 2026-11-30: read with getattr).
        effects: dict[str, list[str]]

    def payment_fact_delivered(
        self, fact: Fact, cause: Cause, effects: dict[UUID, list[str]], at: datetime
    ) -> None:
        self.trigger_event(
            self.PaymentFactDelivered,
            timestamp=at,
            fact=fact,
            cause=cause.as_dict(),
            effects={str(key): names for key, names in effects.items()},
        )

    def park(self, fact: Fact, at: datetime) -> bool:
        """Keep `fact` for the order's first entitlement; False if it is
        kept already."""
        if any(parked["key"] == fact["key"] for parked in self.parked):
            return False
        self.trigger_event(self.FactParked, timestamp=at, fact=fact)
        return True


class Payment(Aggregate):
    """A provider payment (invoice or payment intent) and the order it paid.

    Refunds and disputes name a payment, not an order; one that arrives
    before the payment itself is parked here until the payment is seen.
    """

    class Opened(Aggregate.Created):
        source: str
        ref: str
        order_ref: str | None
        invoice: str | None

    def __init__(self, source: str, ref: str, order_ref: str | None, invoice: str | None) -> None:
        self.source = source
        self.ref = ref
        self.order_ref = order_ref
        self.invoice = invoice
        self.parked: list[dict[str, Any]] = []

    @classmethod
    def open(
        cls,
        source: str,
        ref: str,
        at: datetime,
        order_ref: str | None = None,
        invoice: str | None = None,
    ) -> Payment:
        """A payment seen for the first time: from its own event (linked to
        its order at once) or from a refund or dispute (not yet linked)."""
        return cls._create(
            cls.Opened,
            id=payment_id(source, ref),
            timestamp=at,
            source=source,
            ref=ref,
            order_ref=order_ref,
            invoice=invoice,
        )

    class Linked(Aggregate.Event):
        order_ref: str
        invoice: str

        def apply(self, aggregate: Any) -> None:
            aggregate.order_ref = self.order_ref
            aggregate.invoice = self.invoice

    def link(self, order_ref: str, invoice: str, at: datetime) -> bool:
        """Returns True the first time the payment learns its order."""
        if self.order_ref is not None:
            return False
        self.trigger_event(self.Linked, timestamp=at, order_ref=order_ref, invoice=invoice)
        return True

    class FactParked(Aggregate.Event):
        fact: dict[str, Any]
        cause: dict[str, str]
        occurred_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.parked.append(
                {"fact": self.fact, "cause": self.cause, "occurred_at": self.occurred_at}
            )

    def park(self, fact: Fact, cause: Cause, occurred_at: datetime, at: datetime) -> bool:
        """Keep `fact` until this payment's order is known; False if it is
        kept already."""
        if any(_cause_key(p["cause"]) == cause.key for p in self.parked):
            return False
        self.trigger_event(
            self.FactParked,
            timestamp=at,
            fact=fact,
            cause=cause.as_dict(),
            occurred_at=occurred_at,
        )
        return True
