"""The public events projection: publishes `entitle.entitlements.events`,
`entitle.entitlements.state` and dead letters, its position saved after
the broker acknowledged all of them (at least once; `event_id` lets
consumers drop the rare duplicate). `republish` sends a stretch of the log
again, for consumers that lost it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid5

import anyio
from faststream.kafka import KafkaBroker

from contracts.events import (
    CauseV1,
    EntitlementEventV1,
    EntitlementV1,
)
from contracts.state import EntitlementStateV1
from contracts.webhooks import DeadLetterV1, RawWebhookV1
from domain.dead_letter import DeadLetter
from domain.entitlement import NAMESPACE, event_type
from services.projections.follower import Change, Follower
from services.readmodel import ReadModel
from services.topics import declare

PUBLIC_EVENTS = "public-events"
# The public topic carries the entitlement without its activation code.
_PUBLIC_FIELDS = set(EntitlementV1.model_fields)


def _event_id(event: Any) -> UUID:
    """An event's `event_id`: the same however often it is published."""
    return uuid5(NAMESPACE, f"event\x1f{event.originator_id}\x1f{event.originator_version}")


def public_event(change: Change) -> EntitlementEventV1:
    event = change.event
    view = change.entitlement
    assert view is not None
    return EntitlementEventV1(
        event_id=_event_id(event),
        type=event_type(event),  # type: ignore[arg-type]
        entitlement_id=event.originator_id,
        sequence=event.originator_version,
        occurred_at=event.occurred_at,
        recorded_at=event.timestamp,
        previous_status=change.previous_status,  # type: ignore[arg-type]
        status=view.status,
        cause=CauseV1(**event.cause),
        entitlement=EntitlementV1.model_validate(view.model_dump(include=_PUBLIC_FIELDS)),
    )


def dead_letter_message(letter: DeadLetter) -> DeadLetterV1:
    return DeadLetterV1(
        id=str(letter.id),
        source=letter.source,
        provider=letter.provider,
        provider_event_id=letter.provider_event_id,
        reason=letter.reason,
        recorded_at=letter.created_on,
        # A body sealed under the key of a customer since erased reads as None.
        webhook=RawWebhookV1.model_validate(
            {**letter.webhook, "body": letter.webhook["body"] or ""}
        ),
    )


def state_message(change: Change) -> EntitlementStateV1:
    """The state an entitlement change leaves (for `entitlement.noted` too,
    so the state topic ends where the read model does)."""
    event = change.event
    view = change.entitlement
    assert view is not None
    return EntitlementStateV1(
        entitlement_id=event.originator_id,
        sequence=event.originator_version,
        event_id=_event_id(event),
        event_type=event_type(event),  # type: ignore[arg-type]
        updated_at=event.timestamp,
        entitlement=EntitlementV1.model_validate(view.model_dump(include=_PUBLIC_FIELDS)),
    )


@dataclass
class Published:
    """How many messages went to each topic."""

    events: int = 0
    states: int = 0
    dead_letters: int = 0

    def add(self, other: Published) -> None:
        self.events += other.events
        self.states += other.states
        self.dead_letters += other.dead_letters


_JSON = {"content-type": "application/json"}


class PublicEventsProjection:
    name = PUBLIC_EVENTS

    def __init__(self, read_model: ReadModel, broker: KafkaBroker) -> None:
        self.read_model = read_model
        self.broker = broker
        self.topics = declare(broker)

    def position(self) -> int:
        return self.read_model.position(self.name)

    async def project(self, changes: list[Change], position: int) -> None:
        await self.publish(changes)
        await anyio.to_thread.run_sync(self.read_model.set_position, self.name, position)

    async def publish(self, changes: list[Change]) -> Published:
        """Send what `changes` publish and wait until the broker acknowledged
        all of it: each public event, each dead letter as it is first
        stored, and the state of each entitlement they changed. Of several
        changes to one entitlement only the last state is sent: the topic is
        compacted to it anyway, and one per change is what the events are."""
        sends = []
        states: dict[UUID, EntitlementStateV1] = {}
        count = Published()
        for change in changes:
            if change.entitlement is not None:
                state = state_message(change)
                states[state.entitlement_id] = state
                if not change.public:
                    continue
                message = public_event(change)
                count.events += 1
                sends.append(
                    self.topics.events.publish(
                        message.model_dump_json().encode(),
                        key=str(message.entitlement_id).encode(),
                        headers={**_JSON, "ce-type": message.type},
                    )
                )
            elif change.dead_letter is not None and change.event.originator_version == 1:
                letter = dead_letter_message(change.dead_letter)
                count.dead_letters += 1
                sends.append(
                    self.topics.dead_letters.publish(
                        letter.model_dump_json().encode(),
                        key=letter.webhook.routing_key.encode() or None,
                        headers=_JSON,
                    )
                )
        for state in states.values():
            sends.append(
                self.topics.state.publish(
                    state.model_dump_json().encode(),
                    key=str(state.entitlement_id).encode(),
                    headers=_JSON,
                )
            )
        count.states = len(states)
        # Every send must be acknowledged before the position moves past it.
        await asyncio.gather(*sends)
        return count


async def republish(
    follower: Follower,
    broker: KafkaBroker,
    read_model: ReadModel,
    after: int,
    until: int,
    batch_size: int = 500,
    progress: Callable[[int], None] = lambda position: None,
) -> tuple[Published, int]:
    """Send again what the log holds after position `after` up to `until`
    (events, states, dead letters), as the projection sent it (the same
    `event_id`s), without moving the projection's position. Returns the
    counts and how many stored events could not be read (skipped, as the
    projection skipped them). `progress` is called with each position
    reached."""
    projection = PublicEventsProjection(read_model, broker)
    total, unreadable = Published(), 0
    while after < until:
        changes, last = await anyio.to_thread.run_sync(
            follower.read, after, min(batch_size, until - after)
        )
        if last is None:
            break
        changes = [change for change in changes if change.position <= until]
        unreadable += sum(1 for change in changes if change.error is not None)
        total.add(await projection.publish([c for c in changes if c.error is None]))
        after = last
        progress(last)
    return total, unreadable
