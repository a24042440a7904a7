"""A vendor's webhook endpoint: where the engine sends signed notifications.

Every change is an event (who, when, what), so the endpoint's history is
its audit trail. The signing secret is not stored: it is derived from the
server's secret, the endpoint's id and the secret's `generation`
(`services.outbound.webhooks.endpoint_secret`); rotating makes a new
generation, and the previous one keeps signing beside it for
`ROTATION_OVERLAP`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

CHANGEABLE = ("url", "events", "description", "include_codes", "ordered")
#: After a rotation, the previous secret signs too for this long.
ROTATION_OVERLAP = timedelta(hours=24)


class Endpoint(Aggregate):
    """`events` empty means every message type; a type ending in `.*`
    (``entitlement.*``) means every type with that prefix."""

    class Registered(Aggregate.Created):
        url: str
        events: list[str]
        description: str | None
        include_codes: bool
        ordered: bool
        by: str

    def __init__(
        self,
        url: str,
        events: list[str],
        description: str | None,
        include_codes: bool,
        ordered: bool,
        by: str,
    ) -> None:
        self.url = url
        self.events = list(events)
        self.description = description
        self.include_codes = include_codes
        self.ordered = ordered
        self.created_by = by
        self.disabled = False
        self.disabled_reason: str | None = None
        self.deleted = False
        self.generation = 1
        self.rotated_at: datetime | None = None

    @classmethod
    def register(
        cls,
        endpoint_id: UUID,
        *,
        url: str,
        events: list[str],
        description: str | None,
        include_codes: bool,
        ordered: bool,
        by: str,
        at: datetime,
    ) -> Endpoint:
        return cls._create(
            cls.Registered,
            id=endpoint_id,
            timestamp=at,
            url=url,
            events=events,
            description=description,
            include_codes=include_codes,
            ordered=ordered,
            by=by,
        )

    class Event(Aggregate.Event):
        by: str

    class Changed(Event):
        changes: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            for name, value in self.changes.items():
                setattr(aggregate, name, value)

    class Disabled(Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.disabled = True
            aggregate.disabled_reason = self.reason

    class Enabled(Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.disabled = False
            aggregate.disabled_reason = None

    class SecretRotated(Event):
        generation: int

        def apply(self, aggregate: Any) -> None:
            aggregate.generation = self.generation
            aggregate.rotated_at = self.timestamp

    class Deleted(Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.deleted = True

    def change(self, changes: dict[str, Any], by: str, at: datetime) -> None:
        """Set any of `CHANGEABLE`; an unknown field is a ValueError."""
        unknown = set(changes) - set(CHANGEABLE)
        if unknown:
            raise ValueError(f"an endpoint has no changeable field {sorted(unknown)[0]!r}")
        if any(getattr(self, name) != value for name, value in changes.items()):
            self.trigger_event(self.Changed, timestamp=at, changes=changes, by=by)

    def disable(self, reason: str, by: str, at: datetime) -> None:
        if not self.disabled:
            self.trigger_event(self.Disabled, timestamp=at, reason=reason, by=by)

    def enable(self, by: str, at: datetime) -> None:
        if self.disabled:
            self.trigger_event(self.Enabled, timestamp=at, by=by)

    def rotate_secret(self, by: str, at: datetime) -> None:
        self.trigger_event(self.SecretRotated, timestamp=at, generation=self.generation + 1, by=by)

    def delete(self, by: str, at: datetime) -> None:
        if not self.deleted:
            self.trigger_event(self.Deleted, timestamp=at, by=by)


def subscribed(events: list[str], message_type: str) -> bool:
    """Whether a subscription to `events` (empty: all) takes `message_type`."""
    if not events:
        return True
    for pattern in events:
        if pattern == message_type or pattern == "*":
            return True
        if pattern.endswith(".*") and message_type.startswith(pattern[:-1]):
            return True
    return False
