"""The read model projection: the API's tables, kept from the log with the
position saved in the same transaction (exactly once); `entitle replay`
rebuilds them from zero."""

from __future__ import annotations

import asyncio
from uuid import UUID

import anyio

from contracts.api import (
    DeadLetterView,
    EntitlementView,
    ReceiptView,
)
from services.projections.follower import Change, Follower, project_batch
from services.projections.views import dead_letter_view
from services.readmodel import Delivered, ReadModel, Resolution
from services.store import EntitlementStore

# Versioned with the read model's tables: a new schema rebuilds from zero.
# v5: seats whose code was revoked before revoking released them are not shown.
READ_MODEL = "read-model-v5"


class ReadModelProjection:
    name = READ_MODEL

    def __init__(self, read_model: ReadModel) -> None:
        self.read_model = read_model

    def position(self) -> int:
        return self.read_model.position(self.name)

    def apply(self, changes: list[Change], position: int) -> None:
        latest: dict[UUID, EntitlementView] = {}
        codes: dict[UUID, tuple[str, ...]] = {}
        letters: dict[UUID, DeadLetterView] = {}
        receipts: list[tuple[ReceiptView, tuple[str, ...]]] = []
        resolutions: list[Resolution] = []
        delivered: list[Delivered] = []
        for change in changes:
            receipts += change.receipts
            if change.resolution is not None:
                resolutions.append(change.resolution)
            delivered += change.delivered
            if change.entitlement is not None:
                latest[change.entitlement.id] = change.entitlement
                codes[change.entitlement.id] = change.code_hashes
            if change.dead_letter is not None:
                letters[change.dead_letter.id] = dead_letter_view(change.dead_letter)
        self.read_model.apply(
            self.name,
            position,
            list(latest.values()),
            list(letters.values()),
            codes,
            receipts,
            delivered,
            resolutions,
        )

    async def project(self, changes: list[Change], position: int) -> None:
        await anyio.to_thread.run_sync(self.apply, changes, position)


def replay(store: EntitlementStore, read_model: ReadModel, batch_size: int = 1000) -> int:
    """Rebuild the read model from the first event; returns events read."""
    read_model.reset(READ_MODEL)
    projection = ReadModelProjection(read_model)
    follower = Follower(store)

    async def run() -> int:
        position, count = 0, 0
        while True:
            changes, last = follower.read(position, batch_size)
            if last is None:
                return count
            await project_batch(projection, changes, last)
            count += len(changes)
            position = last

    return asyncio.run(run())
