"""The read model projection: the API's tables, kept from the log with the
position saved in the same transaction (exactly once); `entitle replay`
rebuilds them from zero."""

from __future__ import annotations

import asyncio
import gc
from uuid import UUID

import anyio

from contracts.api import (
    DeadLetterView,
    EntitlementView,
    ReceiptView,
)
from domain.entitlement import Entitlement
from services.health import transient
from services.projections.follower import Change, Follower, project_batch
from services.projections.views import dead_letter_view
from services.readmodel import Delivered, ReadModel, Resolution
from services.store import EntitlementStore

# Versioned with the read model's tables: a new schema rebuilds from zero.
# v5: seats whose code was revoked before revoking released them are not shown.
READ_MODEL = "read-model-v5"


class Rows:
    """What changes write to the read model: the last view of each
    entitlement and dead letter, and every receipt, resolution and
    delivered fact in log order."""

    def __init__(self) -> None:
        self.latest: dict[UUID, EntitlementView] = {}
        self.codes: dict[UUID, tuple[str, ...]] = {}
        self.letters: dict[UUID, DeadLetterView] = {}
        self.receipts: list[tuple[ReceiptView, tuple[str, ...]]] = []
        self.resolutions: list[Resolution] = []
        self.delivered: list[Delivered] = []
        #: The last change of each entitlement read without its view (from a
        #: follower made with `views=False`), for `Follower.with_views`.
        self.unviewed: dict[UUID, Change] = {}
        #: Whether a change could not be read (or viewed).
        self.unreadable = False

    def add(self, changes: list[Change]) -> None:
        for change in changes:
            self.unreadable = self.unreadable or change.error is not None
            self.receipts += change.receipts
            if change.resolution is not None:
                self.resolutions.append(change.resolution)
            self.delivered += change.delivered
            if change.entitlement is not None:
                self.latest[change.entitlement.id] = change.entitlement
                self.codes[change.entitlement.id] = change.code_hashes
                self.unviewed.pop(change.entitlement.id, None)
            elif isinstance(change.event, Entitlement.Event):
                self.unviewed[change.event.originator_id] = change
            if change.dead_letter is not None:
                self.letters[change.dead_letter.id] = dead_letter_view(change.dead_letter)

    def view(self, follower: Follower) -> None:
        """Give the entitlements in `unviewed` their views (the follower's
        last read must have been the last of these rows)."""
        for change in follower.with_views(list(self.unviewed.values())):
            self.unreadable = self.unreadable or change.error is not None
            if change.entitlement is not None:
                self.latest[change.entitlement.id] = change.entitlement
                self.codes[change.entitlement.id] = change.code_hashes
        self.unviewed.clear()


class ReadModelProjection:
    name = READ_MODEL

    def __init__(self, read_model: ReadModel) -> None:
        self.read_model = read_model

    def position(self) -> int:
        return self.read_model.position(self.name)

    def apply(self, changes: list[Change], position: int) -> None:
        rows = Rows()
        rows.add(changes)
        self.write(rows, position)

    def write(self, rows: Rows, position: int) -> None:
        self.read_model.apply(
            self.name,
            position,
            list(rows.latest.values()),
            list(rows.letters.values()),
            rows.codes,
            rows.receipts,
            rows.delivered,
            rows.resolutions,
        )

    async def project(self, changes: list[Change], position: int) -> None:
        await anyio.to_thread.run_sync(self.apply, changes, position)


def replay(
    store: EntitlementStore, read_model: ReadModel, batch_size: int = 1_000_000, page: int = 2_000
) -> int:
    """Rebuild the read model from the first event; returns the changes
    projected (the events the read model reads: not orders' own, nor a
    receipt resolution's opening).

    Every aggregate is kept in memory while the log is read (none is read
    back from the store). The tables are written once per `batch_size`
    events of the log (read `page` at a time), each time in one transaction
    with the position, with one view per entitlement changed: views and
    per-event writes were most of the cost after the reads (measured with
    bench/replay.py: on a million events, windows of 250,000 made 2.6 times
    as many views and took a fifth more CPU time than one window, which
    peaks at about 3.4 GB resident, 0.9 GB more). A part with an event that
    cannot be read or projected is projected again as the projector does, a
    change at a time where a batch fails, recording each that fails as a
    projection error."""
    read_model.reset(READ_MODEL)
    # Without the cyclic garbage collector, whose passes over the growing
    # heap (every aggregate is kept) took a quarter of the replay's CPU time
    # (measured, bench/replay.py; freezing what was read saved half as much).
    # What is read makes no garbage cycles to speak of.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _replay(store, ReadModelProjection(read_model), batch_size, page)
    finally:
        if enabled:
            gc.enable()


def _replay(
    store: EntitlementStore, projection: ReadModelProjection, batch_size: int, page: int
) -> int:
    follower = Follower(store, cache_size=None, batches=0, views=False)
    position, count = 0, 0
    while True:
        start, rows = position, Rows()
        while position - start < batch_size:
            changes, last = follower.read(position, min(page, start + batch_size - position))
            if last is None:
                break
            rows.add(changes)
            count += len(changes)
            position = last
        if position == start:
            return count
        try:
            if not rows.unreadable:
                rows.view(follower)
            if rows.unreadable:
                raise ValueError("a change could not be read")
            projection.write(rows, position)
        except Exception as exc:
            if transient(exc):
                raise
            asyncio.run(_again(store, projection, start, position))


async def _again(
    store: EntitlementStore, projection: ReadModelProjection, start: int, end: int
) -> None:
    """Project the log from after `start` up to `end` as the projector does."""
    follower = Follower(store)
    position = start
    while position < end:
        changes, last = follower.read(position, 1000)
        if last is None:
            return
        if last > end:
            changes, last = [c for c in changes if c.position <= end], end
        await project_batch(projection, changes, last)
        position = last
