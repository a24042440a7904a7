"""Bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contracts.events import CauseV1, EntitlementV1
from contracts.text import Moment, Text
from contracts.webhooks import RawWebhookV1


class ActivationCodeView(BaseModel):
    index: int = Field(description="Which of the entitlement's codes (0 is the first)")
    code: str | None = Field(
        default=None, description="The code, e.g. 7K3QD-…; shown by the admin API only"
    )


class SeatView(BaseModel):
    """A device holding one of the entitlement's seats."""

    id: str
    fingerprint: str
    label: str | None = None
    activated_at: datetime
    lease_until: datetime | None = Field(
        default=None, description="Floating seats: free after this without a heartbeat"
    )


class UsagePeriodView(BaseModel):
    period_start: datetime | None
    period_end: datetime | None
    metrics: dict[str, int]


class EntitlementView(EntitlementV1):
    """An entitlement as the admin API shows it."""

    activation_code: str | None = Field(
        default=None, description="The first active activation code (admin API only)"
    )
    activation_codes: list[ActivationCodeView] = Field(
        default_factory=list, description="Every active code; revoked ones are gone"
    )
    activations: list[SeatView] = Field(
        default_factory=list, description="Devices holding seats, oldest first"
    )
    usage: list[UsagePeriodView] = Field(
        default_factory=list, description="Usage per paid period, the current one last"
    )
    sequence: int
    due_at: datetime | None = Field(
        default=None, description="When time alone next changes this entitlement"
    )
    created_at: datetime
    updated_at: datetime


class AsOfV1(BaseModel):
    """Which moment of its history a historical answer shows."""

    at: datetime | None = Field(
        description="The time asked for (`as_of`); null when asked by version"
    )
    version: int = Field(description="The last event folded: the answer's `sequence`")
    latest_version: int = Field(description="The entitlement's version now")


class EntitlementAsOfView(EntitlementView):
    """`GET /v1/entitlements/{id}?as_of=…` (or `as_of_version=…`): the
    entitlement as the engine saw it then, folded from its stored events,
    in the shape of the current one, with `as_of` saying when that was."""

    as_of: AsOfV1


class AdminAction(BaseModel):
    """Body of POST /v1/entitlements/{id}/{suspend|reinstate|cancel|extend}."""

    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(min_length=1, max_length=500, description="Recorded in the history")
    days: int | None = Field(default=None, ge=1, le=3650, description="extend only: days to add")


def _address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not (at and local and "." in domain and not any(c.isspace() for c in value)):
        raise ValueError("must be an e-mail address, e.g. ada@example.com")
    return value


class GrantCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Annotated[Text, AfterValidator(_address)] = Field(
        min_length=3, max_length=320, description="Where the license mail goes"
    )
    id: Text | None = Field(default=None, max_length=255, description="Your own customer id")


class ManualGrant(BaseModel):
    """POST /v1/entitlements: an entitlement without a billing provider
    (source `manual`): comps, resellers, offline deals."""

    model_config = ConfigDict(extra="forbid")

    offering: Text = Field(min_length=1, max_length=200, description="A catalog offering's SKU")
    customer: GrantCustomer
    seats: int | None = Field(
        default=None, ge=1, le=1_000_000, description="A multiple of the offering's seats"
    )
    period_end: Moment | None = Field(
        default=None, description="Granted through (RFC 3339); give this or `period`"
    )
    period: Text | None = Field(
        default=None,
        max_length=40,
        description="ISO 8601 duration from now, e.g. P1Y; default the offering's own period"
        " (none: no end)",
    )
    order_ref: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Your reference for the deal (default manual-<request id>)",
    )
    reason: Text = Field(min_length=1, max_length=500, description="Recorded in the history")


class TermsChange(BaseModel):
    """POST /v1/entitlements/{id}/change: another offering and/or seats."""

    model_config = ConfigDict(extra="forbid")

    offering: Text | None = Field(default=None, min_length=1, max_length=200)
    seats: int | None = Field(
        default=None, ge=1, le=1_000_000, description="A multiple of the offering's seats"
    )
    reason: Text = Field(min_length=1, max_length=500, description="Recorded in the history")


class EntitlementList(BaseModel):
    items: list[EntitlementView]
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for the next page; null on the last page"
    )


class IssuedCode(BaseModel):
    """POST /v1/entitlements/{id}/codes: the new code and the entitlement."""

    index: int
    code: str
    entitlement: EntitlementView


class Liveness(BaseModel):
    """GET /healthz: the process answers; which roles it runs."""

    status: Literal["ok"] = "ok"
    roles: list[str]


class HistoryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int
    type: str
    recorded_at: datetime
    occurred_at: datetime | None
    cause: CauseV1 | None
    data: dict[str, Any] = Field(description="The event's own fields")


class History(BaseModel):
    entitlement_id: UUID
    events: list[HistoryEntry]


class FieldChange(BaseModel):
    before: Any = Field(description="The field before the event; null before creation")
    after: Any


class ReceiptLink(BaseModel):
    """A webhook receipt (`GET /v1/webhooks/{id}`) of the provider event
    that caused a change."""

    id: str
    event_type: str = Field(description="The provider's event type, e.g. invoice.paid")
    outcome: str
    received_at: datetime
    via: str


class CausedBy(BaseModel):
    kind: Literal["provider", "schedule", "admin", "client"]
    summary: str = Field(
        description="In words: the webhook and its receipts, the schedule, the admin key, "
        "or the vendor's application"
    )
    provider_event_id: str | None = Field(
        default=None, description="The provider's event id (provider causes only)"
    )
    receipts: list[ReceiptLink] = Field(
        default_factory=list,
        description="Every receipt of that provider event from that source (a redelivery "
        "is a receipt of its own, outcome duplicate); empty for other causes",
    )


class HistoryStateEntry(HistoryEntry):
    state: EntitlementView = Field(description="The entitlement after this event")
    changes: dict[str, FieldChange] = Field(
        description="The fields of `state` this event changed (all those set, for the "
        "first); `sequence` and `updated_at`, which every event moves, are left out"
    )
    caused_by: CausedBy | None


class HistoryWithState(BaseModel):
    """`GET /v1/entitlements/{id}/history?with_state=true`."""

    entitlement_id: UUID
    events: list[HistoryStateEntry]


class DeadLetterView(BaseModel):
    id: UUID
    source: str
    provider: str
    provider_event_id: str
    reason: str
    recorded_at: datetime
    receipt_id: str
    resolved_at: datetime | None = Field(
        default=None, description="When a re-drive applied it in full; null while unresolved"
    )


class DeadLetterList(BaseModel):
    items: list[DeadLetterView]
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for older ones; null on the last page"
    )


class ReceiptView(BaseModel):
    """What became of one webhook the ingress accepted (`GET /v1/webhooks`)."""

    id: str = Field(description="The receipt id the ingress answered in its 202")
    source: str
    provider: str
    provider_event_id: str = Field(description="The provider's event id (or a content hash)")
    event_type: str = Field(description="The provider's event type, e.g. invoice.paid")
    order_ref: str = Field(description="The order (subscription) reference it was routed by")
    received_at: datetime
    via: Literal["webhook", "backfill"] = Field(
        default="webhook", description="A webhook, or fetched from the provider's API"
    )
    recorded_at: datetime = Field(description="When the domain service folded it")
    outcome: Literal["applied", "duplicate", "ignored", "parked", "dead_letter"]
    detail: str | None = Field(
        default=None,
        description="Why: the dead letter's reason, what was ignored, what it duplicates",
    )
    waits_for: str | None = Field(
        default=None, description="parked: what it waits for, e.g. 'payment pi_123'"
    )
    entitlement_ids: list[str] = Field(description="The entitlements it changed")
    event_types: list[str] = Field(description="The events it produced on them")
    resolved_at: datetime | None = Field(
        default=None, description="When a parked webhook was applied or gave up waiting"
    )
    webhook: RawWebhookV1 | None = Field(
        default=None, description="The webhook as received (headers and raw body); one only"
    )


class ReceiptList(BaseModel):
    items: list[ReceiptView]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last"
    )


class ProjectionErrorView(BaseModel):
    """A stored event a projection could not project; it went on without it."""

    projection: str = Field(description="e.g. read-model-v4, public-events")
    position: int = Field(description="The event's position in the notification log")
    aggregate_id: str | None = None
    version: int | None = None
    event_type: str | None = Field(default=None, description="e.g. entitlement.activated")
    error: str = Field(description="The exception's class and message")
    recorded_at: datetime


class ProjectionErrorList(BaseModel):
    items: list[ProjectionErrorView]


class Readiness(BaseModel):
    """`GET /readyz`: whether every part of this process works."""

    ready: bool
    roles: list[str]
    parts: dict[str, str] = Field(
        description="Each part (broker, database, fold, projection:…, scheduler, index) and its "
        "state: ok, starting, or failing/stopped with the reason"
    )
    projection_errors: int | None = Field(
        default=None, description="Stored events the projections went on without"
    )


class Error(BaseModel):
    """Every error response: a stable code and a sentence for humans."""

    error: str = Field(description="Machine-readable code, e.g. invalid_signature")
    detail: str
    status: int
    entitlement_status: str | None = Field(
        default=None, description="On 403 NOT_ACTIVE: the entitlement's status"
    )


class Accepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    receipt_id: str


class ErasureRequest(BaseModel):
    """POST /v1/customers/erase: whose personal data to erase."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(
        min_length=3,
        max_length=1000,
        description="The customer's e-mail address (as long as an adapter keeps one: 1000)",
    )


class ErasureView(BaseModel):
    """What one erasure did. It never holds the address it erased."""

    id: str = Field(description="Also the event id of the events it appended: `erasure:<id>`")
    requested_at: datetime
    requested_by: str = Field(description="The admin key's name (`cli` from the command line)")
    keys: int = Field(description="Customer keys deleted (0: nothing was sealed for this address)")
    entitlements: int = Field(description="Entitlements that got an erasure event")
    events: int = Field(description="Stored events whose personal data are now unreadable")
    plaintext_events: int = Field(
        description="Stored events written before personal data were sealed that still hold"
        " the address in plaintext (they are not rewritten)"
    )
    webhooks: int = Field(description="Raw webhooks deleted (those that reached the entitlements)")
    outbox_jobs: int = Field(description="Outbound jobs whose copy of the address was blanked")


class ErasureList(BaseModel):
    items: list[ErasureView]
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for older ones; null on the last page"
    )
