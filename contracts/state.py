"""The state topic: `entitle.entitlements.state`, compacted, keyed by
entitlement id, carrying each entitlement's current state.

A new consumer reads it from the start and has every entitlement without
replaying events, then follows `entitle.entitlements.events`, ignoring an
event whose `sequence` is not above the state's. An entitlement is never
deleted, so the topic carries no tombstones.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import EntitlementV1, EventType

STATE_TOPIC = "entitle.entitlements.state"

#: Any entitlement event: those published, and `entitlement.noted` (a fact
#: that changed nothing, kept in the history only).
StateEventType = Literal[EventType, "entitlement.noted"]


class EntitlementStateV1(BaseModel):
    """One entitlement as of its latest change (at least once, like the
    events: a consumer keeps the state with the highest `sequence`)."""

    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    entitlement_id: UUID
    sequence: int = Field(
        description="The entitlement's version this state is as of: it includes every event"
        " of entitle.entitlements.events with a sequence up to this one"
    )
    event_id: UUID = Field(
        description="The last event folded in: its event_id on entitle.entitlements.events,"
        " unless it was an entitlement.noted (a fact that changed nothing, not published there)"
    )
    event_type: StateEventType
    updated_at: datetime = Field(description="When the engine recorded that event")
    entitlement: EntitlementV1
