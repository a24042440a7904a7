"""Bodies of the licensing API: what the vendor's application calls with a
customer's activation code (no admin key)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import Status
from contracts.text import Text

ValidationCode = Literal[
    "VALID",
    "NOT_FOUND",
    "PENDING",
    "SUSPENDED",
    "CANCELED",
    "EXPIRED",
    "NO_SEAT",
    "FEATURE_NOT_INCLUDED",
    "OVER_LIMIT",
    "WRONG_PRODUCT",
]


class ActivationRequest(BaseModel):
    """POST /v1/activations"""

    model_config = ConfigDict(extra="forbid")

    activation_code: str = Field(min_length=1, max_length=64)
    fingerprint: Text = Field(min_length=1, max_length=256, description="The device's identity")
    label: Text | None = Field(default=None, max_length=200, description="e.g. 'Ada's laptop'")
    product: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The product asking; a code bought for another is refused (WRONG_PRODUCT)",
    )


class Activation(BaseModel):
    """A seat held by one device."""

    id: str
    entitlement_id: UUID
    fingerprint: str
    label: str | None = None
    activated_at: datetime
    lease_until: datetime | None = Field(
        default=None, description="Floating seats: heartbeat before this"
    )
    secret: str | None = Field(
        default=None,
        description="The seat's own credential (es_…), answered once, when the seat is new "
        "(201); null when the device already held the seat (200). Send it as "
        "'Authorization: Bearer <secret>' to the seat's routes; the activation code that "
        "opened the seat works there too. Only its hash is stored",
    )


class SeatLease(BaseModel):
    """POST /v1/activations/{id}/heartbeat: the seat is kept."""

    id: str
    lease_until: datetime | None = Field(
        description="Free after this without another heartbeat; null: not a floating seat"
    )


class ValidationRequest(BaseModel):
    """POST /v1/validate"""

    model_config = ConfigDict(extra="forbid")

    activation_code: str = Field(min_length=1, max_length=64)
    fingerprint: str | None = Field(default=None, min_length=1, max_length=256)
    feature: str | None = Field(default=None, min_length=1, max_length=200)
    product: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The product asking; a code bought for another answers WRONG_PRODUCT",
    )


class UsageRequest(BaseModel):
    """POST /v1/usage"""

    model_config = ConfigDict(extra="forbid")

    activation_code: str = Field(min_length=1, max_length=64)
    metric: str = Field(min_length=1, max_length=100, description="A name in the offering's limits")
    quantity: int = Field(ge=1, le=1_000_000_000)
    idempotency_key: Text = Field(min_length=1, max_length=200)


class UsageMetric(BaseModel):
    used: int
    limit: int


class UsagePeriod(BaseModel):
    period_start: datetime | None
    period_end: datetime | None
    metrics: dict[str, int]


class Usage(BaseModel):
    """POST /v1/usage answers with the current period; GET /v1/usage adds every period."""

    current: dict[str, UsageMetric]
    periods: list[UsagePeriod] = Field(default_factory=list)


class PortalSeat(BaseModel):
    label: str | None
    activated_at: datetime


class Portal(BaseModel):
    """GET /v1/portal?activation_code=…: what the customer may see of the
    entitlement their code opens, and nothing of any other."""

    status: Status
    status_reason: str | None = None
    product: str
    offering: str
    period_end: datetime | None
    cancel_at: datetime | None = None
    seats_total: int
    seats: list[PortalSeat]
    usage: dict[str, UsageMetric] = Field(default_factory=dict, description="This period")


class ValidatedEntitlement(BaseModel):
    offering: str
    features: dict[str, Any]
    limits: dict[str, int]
    period_end: datetime | None
    seats_used: int
    seats_total: int


class ValidationResult(BaseModel):
    """Always 200 for a well-formed request: `code` says why it is (not) valid."""

    valid: bool
    code: ValidationCode
    status: Status | None = Field(description="The entitlement's status, if the code exists")
    entitlement: ValidatedEntitlement | None = None
