"""Webhooks we could not map onto the catalog, kept until they are re-driven."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.entitlement import NAMESPACE


def dead_letter_id(source: str, provider_event_id: str) -> UUID:
    return uuid5(NAMESPACE, f"dead-letter\x1f{source}\x1f{provider_event_id}")


class DeadLetter(Aggregate):
    """One unmappable provider event, with the reason and the raw webhook
    (so it can be re-processed unchanged once the catalog is fixed)."""

    class Recorded(Aggregate.Created):
        source: str
        provider: str
        provider_event_id: str
        reason: str
        webhook: dict[str, Any]

    def __init__(
        self,
        source: str,
        provider: str,
        provider_event_id: str,
        reason: str,
        webhook: dict[str, Any],
    ) -> None:
        self.source = source
        self.provider = provider
        self.provider_event_id = provider_event_id
        self.reason = reason
        self.webhook = webhook
        self.resolved_at: datetime | None = None

    @classmethod
    def record(
        cls,
        *,
        source: str,
        provider: str,
        provider_event_id: str,
        reason: str,
        webhook: dict[str, Any],
        at: datetime,
    ) -> DeadLetter:
        return cls._create(
            cls.Recorded,
            id=dead_letter_id(source, provider_event_id),
            timestamp=at,
            source=source,
            provider=provider,
            provider_event_id=provider_event_id,
            reason=reason,
            webhook=webhook,
        )

    class Redriven(Aggregate.Event):
        """Re-processed with the catalog of the day: `resolved` if it mapped
        in full this time, else the reason it still does not."""

        resolved: bool
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.reason = self.reason
            if self.resolved:
                aggregate.resolved_at = self.timestamp

    class Resolved(Aggregate.Event):
        """What it waited for arrived after all, and it was applied then."""

        detail: str

        def apply(self, aggregate: Any) -> None:
            aggregate.resolved_at = self.timestamp

    def resolved(self, detail: str, at: datetime) -> None:
        if self.resolved_at is None:
            self.trigger_event(self.Resolved, timestamp=at, detail=detail)

    def redriven(self, reason: str | None, at: datetime) -> None:
        if self.resolved_at is not None:
            return
        if reason is None:
            self.trigger_event(self.Redriven, timestamp=at, resolved=True, reason=self.reason)
        elif reason != self.reason:
            self.trigger_event(self.Redriven, timestamp=at, resolved=False, reason=reason)
