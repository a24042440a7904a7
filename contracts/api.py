"""Bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import CauseV1, EntitlementV1


class EntitlementView(EntitlementV1):
    """An entitlement as the admin API shows it."""

    activation_code: str
    sequence: int
    created_at: datetime
    updated_at: datetime


class EntitlementList(BaseModel):
    items: list[EntitlementView]


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


class DeadLetterView(BaseModel):
    id: UUID
    source: str
    provider: str
    provider_event_id: str
    reason: str
    recorded_at: datetime
    receipt_id: str


class DeadLetterList(BaseModel):
    items: list[DeadLetterView]


class Error(BaseModel):
    """Every error response: a stable code and a sentence for humans."""

    error: str = Field(description="Machine-readable code, e.g. invalid_signature")
    detail: str
    status: int


class Accepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    receipt_id: str
