"""The Entitlement aggregate and the Order that groups one purchase's entitlements.

Every change is a domain event; an aggregate's state is the fold of its
events. Methods take the recording time (`at`) and the provider's time
(`occurred_at`) as arguments, because domain code has no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

# Ids are derived from what the provider tells us, so the same purchase always
# lands on the same aggregate, whichever process or replay computes it.
NAMESPACE = uuid5(NAMESPACE_URL, "https://entitle.dev/ids")


def order_id(source: str, order_ref: str) -> UUID:
    return uuid5(NAMESPACE, f"order\x1f{source}\x1f{order_ref}")


def entitlement_id(source: str, order_ref: str, sku: str) -> UUID:
    return uuid5(NAMESPACE, f"entitlement\x1f{source}\x1f{order_ref}\x1f{sku}")


class Status(StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class Cause:
    """Why something changed: a provider event, the schedule, or an admin."""

    kind: str
    source: str
    event_id: str

    @classmethod
    def provider(cls, source: str, event_id: str) -> Cause:
        return cls("provider", source, event_id)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.source}:{self.event_id}"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "event_id": self.event_id}


def _cause_key(cause: dict[str, str]) -> str:
    return f"{cause['kind']}:{cause['source']}:{cause['event_id']}"


class Entitlement(Aggregate):
    """One purchased offering: what it grants and where it stands."""

    class Event(Aggregate.Event):
        cause: dict[str, str]
        occurred_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.applied.add(_cause_key(self.cause))
            self.change(aggregate)

        def change(self, aggregate: Any) -> None:
            """The event's effect on state, beyond remembering its cause."""

    class Created(Event, Aggregate.Created):
        source: str
        order_ref: str
        sku: str
        product: str
        features: dict[str, Any]
        limits: dict[str, int]
        seats: int
        quantity: int
        customer_id: str | None
        customer_email: str | None
        activation_code: str

        def apply(self, aggregate: Any) -> None:
            # Creation alone applies nothing: the command that created the
            # entitlement goes on to fold in the same provider event.
            pass

    def __init__(
        self,
        source: str,
        order_ref: str,
        sku: str,
        product: str,
        features: dict[str, Any],
        limits: dict[str, int],
        seats: int,
        quantity: int,
        customer_id: str | None,
        customer_email: str | None,
        activation_code: str,
        cause: dict[str, str],
        occurred_at: datetime,
    ) -> None:
        self.source = source
        self.order_ref = order_ref
        self.sku = sku
        self.product = product
        self.features = features
        self.limits = limits
        self.seats = seats
        self.quantity = quantity
        self.customer_id = customer_id
        self.customer_email = customer_email
        self.activation_code = activation_code
        self.status = Status.PENDING
        self.period_start: datetime | None = None
        self.period_end: datetime | None = None
        self.canceled_reason: str | None = None
        # Provider events already folded in, so a redelivery changes nothing.
        self.applied: set[str] = set()

    @classmethod
    def create(
        cls,
        *,
        source: str,
        order_ref: str,
        sku: str,
        product: str,
        features: dict[str, Any],
        limits: dict[str, int],
        seats: int,
        quantity: int,
        customer_id: str | None,
        customer_email: str | None,
        activation_code: str,
        cause: Cause,
        occurred_at: datetime,
        at: datetime,
    ) -> Entitlement:
        return cls._create(
            cls.Created,
            id=entitlement_id(source, order_ref, sku),
            timestamp=at,
            source=source,
            order_ref=order_ref,
            sku=sku,
            product=product,
            features=dict(features),
            limits=dict(limits),
            seats=seats,
            quantity=quantity,
            customer_id=customer_id,
            customer_email=customer_email,
            activation_code=activation_code,
            cause=cause.as_dict(),
            occurred_at=occurred_at,
        )

    def has_applied(self, cause: Cause) -> bool:
        return cause.key in self.applied

    # -- payments ---------------------------------------------------------

    class Activated(Event):
        period_start: datetime
        period_end: datetime

        def change(self, aggregate: Any) -> None:
            aggregate.status = Status.ACTIVE
            aggregate.period_start = self.period_start
            aggregate.period_end = self.period_end

    class Renewed(Event):
        period_end: datetime

        def change(self, aggregate: Any) -> None:
            aggregate.period_end = self.period_end

    def record_payment(
        self,
        period_start: datetime,
        period_end: datetime,
        cause: Cause,
        occurred_at: datetime,
        at: datetime,
    ) -> None:
        """A paid period: activates a pending entitlement, and extends an
        active one's period (never shortening it)."""
        if self.has_applied(cause) or self.status is Status.CANCELED:
            return
        if self.status is Status.PENDING:
            self.trigger_event(
                self.Activated,
                timestamp=at,
                period_start=period_start,
                period_end=period_end,
                cause=cause.as_dict(),
                occurred_at=occurred_at,
            )
        elif self.period_end is None or period_end > self.period_end:
            self.trigger_event(
                self.Renewed,
                timestamp=at,
                period_end=period_end,
                cause=cause.as_dict(),
                occurred_at=occurred_at,
            )

    # -- cancellation -----------------------------------------------------

    class Canceled(Event):
        reason: str

        def change(self, aggregate: Any) -> None:
            aggregate.status = Status.CANCELED
            aggregate.canceled_reason = self.reason

    def cancel(self, reason: str, cause: Cause, occurred_at: datetime, at: datetime) -> None:
        if self.has_applied(cause) or self.status is Status.CANCELED:
            return
        self.trigger_event(
            self.Canceled,
            timestamp=at,
            reason=reason,
            cause=cause.as_dict(),
            occurred_at=occurred_at,
        )


class Order(Aggregate):
    """One provider subscription or order: which entitlements it holds, and
    whether the provider has canceled it (possibly before we saw a payment)."""

    class Opened(Aggregate.Created):
        source: str
        order_ref: str

    def __init__(self, source: str, order_ref: str) -> None:
        self.source = source
        self.order_ref = order_ref
        self.entitlements: dict[str, UUID] = {}
        self.cancellation: tuple[str, Cause, datetime] | None = None

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
        sku: str
        entitlement_id: UUID

        def apply(self, aggregate: Any) -> None:
            aggregate.entitlements[self.sku] = self.entitlement_id

    def add_entitlement(self, sku: str, entitlement_id: UUID, at: datetime) -> None:
        if sku not in self.entitlements:
            self.trigger_event(
                self.EntitlementAdded, timestamp=at, sku=sku, entitlement_id=entitlement_id
            )

    class Canceled(Aggregate.Event):
        reason: str
        cause: dict[str, str]
        occurred_at: datetime

        def apply(self, aggregate: Any) -> None:
            cause = Cause(**self.cause)
            aggregate.cancellation = (self.reason, cause, self.occurred_at)

    def cancel(self, reason: str, cause: Cause, occurred_at: datetime, at: datetime) -> None:
        if self.cancellation is None:
            self.trigger_event(
                self.Canceled,
                timestamp=at,
                reason=reason,
                cause=cause.as_dict(),
                occurred_at=occurred_at,
            )
