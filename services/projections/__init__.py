"""Projections of the event store's notification log, one module each,
all fed by one follower (`follower`):

- `read_model`: the API's tables (exactly once);
- `public_events`: the public Kafka topics (at least once).

A new projection is one module and one line in `projections` below.
"""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from services.projections.follower import (
    PUBLIC_TYPES,
    Change,
    Follower,
    LogBell,
    Projection,
    follow,
    listen,
    project_batch,
)
from services.projections.public_events import PUBLIC_EVENTS, PublicEventsProjection
from services.projections.read_model import READ_MODEL, ReadModelProjection, replay
from services.projections.views import (
    dead_letter_view,
    entitlement_view,
    history_entry,
    receipt_view,
)
from services.readmodel import ReadModel

__all__ = [
    "PUBLIC_EVENTS",
    "PUBLIC_TYPES",
    "READ_MODEL",
    "Change",
    "Follower",
    "LogBell",
    "Projection",
    "PublicEventsProjection",
    "ReadModelProjection",
    "dead_letter_view",
    "entitlement_view",
    "follow",
    "history_entry",
    "listen",
    "project_batch",
    "projections",
    "receipt_view",
    "replay",
]


def projections(read_model: ReadModel, broker: KafkaBroker) -> list[Projection]:
    """Every projection a projector process runs, each following the log."""
    return [
        ReadModelProjection(read_model),
        PublicEventsProjection(read_model, broker),
    ]
