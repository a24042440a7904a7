"""The public events projection: publishes `entitle.entitlements.events`
and dead letters, its position saved after the broker acknowledged (at
least once; `event_id` lets consumers drop the rare duplicate)."""

from __future__ import annotations

import asyncio
from uuid import uuid5

import anyio
from faststream.kafka import KafkaBroker

from contracts.events import (
    EVENTS_TOPIC,
    CauseV1,
    EntitlementEventV1,
    EntitlementV1,
)
from contracts.webhooks import DEAD_LETTER_TOPIC, DeadLetterV1, RawWebhookV1
from domain.dead_letter import DeadLetter
from domain.entitlement import NAMESPACE, event_type
from services.projections.follower import Change
from services.readmodel import ReadModel

PUBLIC_EVENTS = "public-events"
# The public topic carries the entitlement without its activation code.
_PUBLIC_FIELDS = set(EntitlementV1.model_fields)


def public_event(change: Change) -> EntitlementEventV1:
    event = change.event
    view = change.entitlement
    assert view is not None
    return EntitlementEventV1(
        event_id=uuid5(NAMESPACE, f"event\x1f{event.originator_id}\x1f{event.originator_version}"),
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


class PublicEventsProjection:
    name = PUBLIC_EVENTS

    def __init__(self, read_model: ReadModel, broker: KafkaBroker) -> None:
        self.read_model = read_model
        self.broker = broker

    def position(self) -> int:
        return self.read_model.position(self.name)

    async def project(self, changes: list[Change], position: int) -> None:
        sends = []
        for change in changes:
            if change.entitlement is not None and not change.public:
                continue
            if change.entitlement is not None:
                message = public_event(change)
                sends.append(
                    self.broker.publish(
                        message.model_dump_json().encode(),
                        EVENTS_TOPIC,
                        key=str(message.entitlement_id).encode(),
                        headers={"content-type": "application/json", "ce-type": message.type},
                    )
                )
            elif change.dead_letter is not None and change.event.originator_version == 1:
                letter = dead_letter_message(change.dead_letter)
                sends.append(
                    self.broker.publish(
                        letter.model_dump_json().encode(),
                        DEAD_LETTER_TOPIC,
                        key=letter.webhook.routing_key.encode() or None,
                        headers={"content-type": "application/json"},
                    )
                )
        # Every send must be acknowledged before the position moves past it.
        await asyncio.gather(*sends)
        await anyio.to_thread.run_sync(self.read_model.set_position, self.name, position)
