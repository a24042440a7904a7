"""The public event stream: `entitle.entitlements.events`, keyed by entitlement id.

Delivery is at least once; `event_id` is stable across redeliveries and
replays, so consumers deduplicate on it. Per entitlement, `sequence` grows by
one with each event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

EVENTS_TOPIC = "entitle.entitlements.events"

Status = Literal["PENDING", "ACTIVE", "SUSPENDED", "CANCELED", "EXPIRED"]


EventType = Literal[
    "entitlement.created",
    "entitlement.activated",
    "entitlement.renewed",
    "entitlement.extended",
    "entitlement.overdue",
    "entitlement.recovered",
    "entitlement.suspended",
    "entitlement.reinstated",
    "entitlement.canceled",
    "entitlement.expired",
    "entitlement.cancel_scheduled",
    "entitlement.cancel_unscheduled",
    "entitlement.revised",
    "entitlement.offering_changed",
    "entitlement.seats_changed",
    "entitlement.customer_changed",
    "entitlement.code_issued",
    "entitlement.code_revoked",
    "entitlement.seat_activated",
    "entitlement.seat_released",
    "entitlement.seat_renewed",
    "entitlement.usage_recorded",
]


class CauseV1(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["provider", "schedule", "admin", "client"]
    source: str = Field(
        description="Source name, 'schedule', the admin key's name, or 'activation' (client)"
    )
    event_id: str = Field(
        description="Provider event id (e.g. evt_…), or a schedule/admin reference"
    )


class CustomerV1(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str | None = None
    email: str | None = None


class EntitlementV1(BaseModel):
    """An entitlement's state, as published and as served by the API."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    source: str
    order_ref: str = Field(description="The provider's subscription (or order) id")
    offering: str = Field(description="Offering SKU")
    product: str
    status: Status
    features: dict[str, Any]
    limits: dict[str, int]
    seats: int
    quantity: int = Field(default=1, description="Units bought; seats = offering seats x quantity")
    period_start: datetime | None
    period_end: datetime | None = Field(description="Paid (or trial) through; never moves earlier")
    customer: CustomerV1
    status_reason: str | None = Field(
        default=None,
        description="Why the status is not ACTIVE/PENDING: subscription_deleted, refunded, "
        "disputed, dispute_lost, canceled_at_period_end, removed_from_subscription, paused, "
        "unpaid, incomplete_expired, admin",
    )
    canceled_reason: str | None = Field(
        default=None, description="status_reason while CANCELED (kept for v1 consumers)"
    )
    trial: bool = Field(default=False, description="ACTIVE in a trial, paid through its end")
    overdue: bool = Field(
        default=False, description="ACTIVE, but a payment failed or the period ended unpaid"
    )
    cancel_at: datetime | None = Field(
        default=None, description="Scheduled to become CANCELED at this time"
    )


class EntitlementEventV1(BaseModel):
    """One change to one entitlement."""

    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    event_id: UUID
    type: EventType
    entitlement_id: UUID
    sequence: int = Field(description="The entitlement's version after this event")
    occurred_at: datetime = Field(description="When the provider says it happened")
    recorded_at: datetime = Field(description="When the engine recorded it")
    previous_status: Status | None
    status: Status
    cause: CauseV1
    entitlement: EntitlementV1 = Field(description="State after this event")
