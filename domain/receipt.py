"""The receipt of one webhook the ingress accepted: what became of it.
(The webhook itself is kept beside the events: `services.store.WEBHOOKS`.)

Every accepted webhook gets exactly one receipt, written in the transaction
that folds it, so no outcome exists without its effect and no effect without
its outcome. A parked webhook's receipt changes once more when what it waited
for arrives, or when it has waited too long (it then becomes a dead letter).
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any, Literal
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Effect
from domain.entitlement import NAMESPACE

Outcome = Literal["applied", "duplicate", "ignored", "parked", "dead_letter"]
OUTCOMES: tuple[Outcome, ...] = ("applied", "duplicate", "ignored", "parked", "dead_letter")


@lru_cache(maxsize=4096)
def receipt_id(receipt: str) -> UUID:
    """The aggregate id of the receipt the ingress numbered `receipt`."""
    return uuid5(NAMESPACE, f"receipt\x1f{receipt}")


class Receipt(Aggregate):
    class Recorded(Aggregate.Created):
        receipt: str
        source: str
        provider: str
        provider_event_id: str
        event_type: str
        order_ref: str
        received_at: datetime
        outcome: str
        entitlement_ids: list[str]
        event_types: list[str]
        detail: str | None
        waits_for: str | None

    def __init__(
        self,
        receipt: str,
        source: str,
        provider: str,
        provider_event_id: str,
        event_type: str,
        order_ref: str,
        received_at: datetime,
        outcome: str,
        entitlement_ids: list[str],
        event_types: list[str],
        detail: str | None,
        waits_for: str | None,
    ) -> None:
        self.receipt = receipt
        self.source = source
        self.provider = provider
        self.provider_event_id = provider_event_id
        self.event_type = event_type
        self.order_ref = order_ref
        self.received_at = received_at
        self.outcome = outcome
        self.entitlement_ids = entitlement_ids
        self.event_types = event_types
        self.detail = detail
        self.waits_for = waits_for
        self.resolved_at: datetime | None = None

    @classmethod
    def record(cls, *, at: datetime, **fields: Any) -> Receipt:
        """`fields`: those of `Recorded` (`outcome` one of OUTCOMES)."""
        if fields["outcome"] not in OUTCOMES:
            raise ValueError(f"unknown outcome {fields['outcome']!r}")
        return cls._create(cls.Recorded, id=receipt_id(fields["receipt"]), timestamp=at, **fields)

    class Resolved(Aggregate.Event):
        """A parked webhook's end: applied at last, or dead-lettered."""

        outcome: str
        detail: str | None
        entitlement_ids: list[str]
        event_types: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.outcome = self.outcome
            aggregate.detail = self.detail
            aggregate.entitlement_ids = self.entitlement_ids or aggregate.entitlement_ids
            aggregate.event_types = self.event_types or aggregate.event_types
            if self.outcome == "applied":
                # A dead letter for waiting too long still waits: if what it
                # names arrives after all, it is applied then.
                aggregate.waits_for = None
            aggregate.resolved_at = self.timestamp

    def resolve(
        self,
        outcome: Outcome,
        detail: str | None,
        at: datetime,
        entitlement_ids: list[str] | None = None,
        event_types: list[str] | None = None,
    ) -> None:
        if self.outcome != "parked" and self.outcome != "dead_letter":
            return
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
    if effect.waits_for is not None:
        if effect.newly_parked:
            return "parked", None
        return "duplicate", f"already waiting for {effect.waits_for}"
    if effect.duplicate:
        return "duplicate", "already applied (the same provider event)"
    if not commands:
        return "ignored", f"{event_type or 'the event'} means nothing for entitlements"
    return "ignored", "it names no entitlement"
