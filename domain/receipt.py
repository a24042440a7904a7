"""The receipts of the webhooks the ingress accepted: what became of each.

Every accepted webhook gets exactly one receipt, written in the transaction
that folds it, so no outcome exists without its effect and no effect without
its outcome. One fold transaction's receipts are one event (`Receipts`): an
event per webhook cost the fold a fifth of its speed. A parked webhook's end
(applied at last, or a dead letter after waiting too long) is recorded later,
on a `ReceiptResolution` of its own. The webhooks themselves are kept beside
the events (`services.store.WEBHOOKS`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Effect
from domain.entitlement import NAMESPACE

Outcome = Literal["applied", "duplicate", "ignored", "parked", "dead_letter"]
OUTCOMES: tuple[Outcome, ...] = ("applied", "duplicate", "ignored", "parked", "dead_letter")


def receipt(
    *,
    receipt: str,
    source: str,
    provider: str,
    provider_event_id: str,
    event_type: str,
    order_ref: str,
    received_at: datetime,
    outcome: Outcome,
    detail: str | None,
    effect: Effect,
    via: str = "webhook",
) -> dict[str, Any]:
    """One webhook's receipt, as `Receipts` keeps it. `receipt` is the id
    the ingress answered with; `effect` what folding it did."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    parked = outcome == "parked"
    return {
        "receipt": receipt,
        "source": source,
        "provider": provider,
        "provider_event_id": provider_event_id,
        "event_type": event_type,
        "order_ref": order_ref,
        "received_at": received_at,
        "via": via,
        "outcome": outcome,
        "detail": detail,
        "entitlement_ids": [str(i) for i in effect.events],
        "event_types": sorted({name for names in effect.events.values() for name in names}),
        "waits_for": effect.waits_for if parked else None,
        "waits_on": [str(i) for i in effect.waits_on] if parked else [],
    }


class Receipts(Aggregate):
    """The receipts of one fold transaction's webhooks (`receipt()` each)."""

    class Recorded(Aggregate.Created):
        items: list[dict[str, Any]]

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    @classmethod
    def record(cls, items: list[dict[str, Any]], where: str, at: datetime) -> Receipts:
        """`where`: the log position of the first webhook (topic, incarnation,
        partition, offset), which no other transaction can fold."""
        return cls._create(
            cls.Recorded, id=uuid5(NAMESPACE, f"receipts\x1f{where}"), timestamp=at, items=items
        )


def resolution_id(receipt: str) -> UUID:
    return uuid5(NAMESPACE, f"receipt-resolution\x1f{receipt}")


class ReceiptResolution(Aggregate):
    """How a parked webhook ended: applied at last (re-driven), or a dead
    letter after waiting too long (still applied if what it waits for
    arrives after all: the read model then says applied)."""

    class Opened(Aggregate.Created):
        receipt: str

    def __init__(self, receipt: str) -> None:
        self.receipt = receipt
        self.outcome: str | None = None

    @classmethod
    def open(cls, receipt: str, at: datetime) -> ReceiptResolution:
        return cls._create(cls.Opened, id=resolution_id(receipt), timestamp=at, receipt=receipt)

    class Resolved(Aggregate.Event):
        outcome: str
        detail: str | None
        entitlement_ids: list[str]
        event_types: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.outcome = self.outcome

    def resolve(
        self,
        outcome: Outcome,
        detail: str | None,
        at: datetime,
        entitlement_ids: list[str] | None = None,
        event_types: list[str] | None = None,
    ) -> None:
        self.trigger_event(
            self.Resolved,
            timestamp=at,
            outcome=outcome,
            detail=detail,
            entitlement_ids=entitlement_ids or [],
            event_types=event_types or [],
        )


def classify(
    reason: str | None, commands: int, effect: Effect, event_type: str
) -> tuple[Outcome, str | None]:
    """The outcome of a folded webhook, and a sentence on it: `reason` is
    why (part of) it could not be mapped, `commands` how many commands it
    gave, `effect` what applying them did."""
    if reason is not None:
        return "dead_letter", reason
    if effect.events:
        return "applied", None
    if effect.linked:
        what = ", ".join(effect.linked)
        if effect.newly_linked:
            return "applied", f"linked {what} to its order"
        return "duplicate", f"{what} already linked to its order"
    if effect.waits_for is not None:
        if effect.newly_parked:
            return "parked", None
        return "duplicate", f"already waiting for {effect.waits_for}"
    if effect.duplicate:
        return "duplicate", "already applied (the same provider event)"
    if not commands:
        return "ignored", f"{event_type or 'the event'} means nothing for entitlements"
    return "ignored", "it names no entitlement"
