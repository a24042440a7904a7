"""The read model's views of stored state: what the admin and licensing
APIs show of an entitlement, a dead letter, a receipt, a history entry."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from contracts.api import (
    ActivationCodeView,
    DeadLetterView,
    EntitlementView,
    HistoryEntry,
    ReceiptView,
    SeatView,
    UsagePeriodView,
)
from contracts.events import CauseV1, CustomerV1
from domain.dead_letter import DeadLetter
from domain.entitlement import Entitlement, Status, event_type

_BASE_FIELDS = {
    "originator_id",
    "originator_version",
    "timestamp",
    "originator_topic",
    "cause",
    "occurred_at",
}


def history_entry(event: Any) -> HistoryEntry:
    data = {k: v for k, v in vars(event).items() if k not in _BASE_FIELDS}
    cause = getattr(event, "cause", None)
    return HistoryEntry(
        version=event.originator_version,
        type=event_type(event),
        recorded_at=event.timestamp,
        occurred_at=getattr(event, "occurred_at", None),
        cause=CauseV1(**cause) if cause else None,
        data={k: (str(v) if isinstance(v, UUID) else v) for k, v in data.items()},
    )


def entitlement_view(entitlement: Entitlement) -> EntitlementView:
    return EntitlementView(
        id=entitlement.id,
        source=entitlement.source,
        order_ref=entitlement.order_ref,
        offering=entitlement.sku,
        product=entitlement.product,
        status=entitlement.status.value,
        features=entitlement.features,
        limits=entitlement.limits,
        seats=entitlement.seats,
        quantity=entitlement.quantity,
        period_start=entitlement.period_start,
        period_end=entitlement.period_end,
        customer=CustomerV1(id=entitlement.customer_id, email=entitlement.customer_email),
        status_reason=entitlement.reason,
        canceled_reason=entitlement.reason if entitlement.status is Status.CANCELED else None,
        trial=entitlement.trial,
        overdue=entitlement.overdue,
        cancel_at=entitlement.cancel_at,
        # Only which codes exist: the codes themselves are never stored.
        activation_codes=[ActivationCodeView(index=i) for i in sorted(entitlement.codes.values())],
        usage=sorted(
            (
                UsagePeriodView(
                    period_start=period["period_start"],
                    period_end=period["period_end"],
                    metrics=dict(period["metrics"]),
                )
                for period in entitlement.usage.values()
            ),
            key=lambda p: (p.period_start is not None, p.period_start),
        ),
        activations=sorted(
            (
                SeatView(
                    id=seat_id,
                    fingerprint=seat["fingerprint"],
                    label=seat["label"],
                    activated_at=seat["activated_at"],
                    lease_until=seat.get("lease_until"),
                )
                for seat_id, seat in entitlement.held_seats().items()
            ),
            key=lambda seat: seat.activated_at,
        ),
        sequence=entitlement.version,
        due_at=entitlement.due_at,
        created_at=entitlement.created_on,
        updated_at=entitlement.modified_on,
    )


def dead_letter_view(letter: DeadLetter) -> DeadLetterView:
    return DeadLetterView(
        id=letter.id,
        source=letter.source,
        provider=letter.provider,
        provider_event_id=letter.provider_event_id,
        reason=letter.reason,
        recorded_at=letter.created_on,
        receipt_id=str(letter.webhook.get("receipt_id", "")),
        resolved_at=letter.resolved_at,
    )


def receipt_view(item: dict[str, Any], recorded_at: datetime) -> ReceiptView:
    """A receipt as `domain.receipt.receipt()` made it, for the API."""
    return ReceiptView(
        id=item["receipt"],
        recorded_at=recorded_at,
        **{k: v for k, v in item.items() if k not in ("receipt", "waits_on")},
    )
