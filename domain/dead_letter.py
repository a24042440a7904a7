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
