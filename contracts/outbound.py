"""Outbound webhooks: the messages the engine sends to a vendor's endpoints
(Standard Webhooks, https://www.standardwebhooks.com/) and the admin API's
bodies for endpoints and deliveries.

Every message is a JSON object ``{"type", "timestamp", "data"}`` sent with
the headers ``webhook-id`` (the message id: the same on every retry, and
for the same event to every endpoint), ``webhook-timestamp`` (Unix seconds
of the attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>``, one
per live secret, space-separated). ``data`` is, by type:

- ``entitlement.*``: an `EntitlementEventV1` (`contracts.events`), plus
  ``activation_codes`` (a list of codes) for endpoints with `include_codes`;
- ``order.created``: an `OrderCreatedV1`;
- ``ping``: a `PingV1` (``POST /v1/webhook-endpoints/{id}/test``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from contracts.api import HistoryEntry
from contracts.events import CustomerV1
from contracts.text import Moment, Text

MESSAGE_SCHEMA_VERSION = 1


class OutboundMessageV1(BaseModel):
    """The body of every outbound webhook."""

    type: str = Field(description="entitlement.created, …, order.created, ping")
    timestamp: datetime = Field(description="When the event was recorded")
    data: dict[str, Any]


class OrderCreatedV1(BaseModel):
    """An order's first entitlements exist: for vendors that send their own
    mail (the Zentitle seed's `entitlement.group.created`)."""

    source: str
    order_ref: str = Field(description="The provider's subscription (or order) id")
    customer: CustomerV1
    entitlement_ids: list[UUID]
    activation_codes: dict[str, list[str]] | None = Field(
        default=None, description="Per entitlement id; only to endpoints with include_codes"
    )


class PingV1(BaseModel):
    endpoint_id: UUID
    message: str = "ping from entitle"


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000)
    events: list[str] | None = Field(
        default=None, description="Message types, or a prefix like entitlement.*; none: all"
    )
    description: Text | None = Field(default=None, max_length=500)
    include_codes: StrictBool = False
    ordered: StrictBool = True


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2000)
    events: list[str] | None = None
    description: Text | None = Field(default=None, max_length=500)
    include_codes: StrictBool | None = None
    ordered: StrictBool | None = None
    disabled: StrictBool | None = None


class EndpointView(BaseModel):
    id: UUID
    url: str
    events: list[str]
    description: str | None
    include_codes: bool
    ordered: bool
    disabled: bool
    disabled_reason: str | None
    declared_in_config: bool = False
    created_at: datetime | None = None
    secret_rotated_at: datetime | None = None
    #: Shown once: on creation and rotation.
    secret: str | None = None
    #: Deliveries by status.
    deliveries: dict[str, int] = Field(default_factory=dict)


class EndpointList(BaseModel):
    items: list[EndpointView]


class AttemptView(BaseModel):
    n: int
    at: datetime
    status_code: int | None
    latency_ms: float
    answer: str = Field(description="The first 1 KB of the endpoint's answer")
    error: str | None


class DeliveryView(BaseModel):
    id: str
    endpoint_id: str
    message_id: str
    type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[AttemptView]
    next_attempt_at: datetime | None
    created_at: datetime | None
    last_error: str | None = Field(
        default=None, description="Why the last attempt failed, or why the job was given up"
    )


class DeliveryList(BaseModel):
    items: list[DeliveryView]
    next_cursor: str | None = None


class Recover(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: Moment = Field(description="RFC 3339 with an offset; not in the future")


class Resent(BaseModel):
    resent: int


class TestSent(BaseModel):
    """POST /v1/webhook-endpoints/{id}/test: the ping queued for delivery."""

    delivery_id: str
    message_id: str


class EndpointHistory(BaseModel):
    """GET /v1/webhook-endpoints/{id}/history: every change to the endpoint."""

    endpoint_id: UUID
    events: list[HistoryEntry]
