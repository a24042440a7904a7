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
from services.health import transient
from services.projections.follower import Change, Follower, project_batch
from services.projections.parallel import Folding, folding, workers_for
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
            if change.dead_letter is not None:
                self.letters[change.dead_letter.id] = dead_letter_view(change.dead_letter)


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
    store: EntitlementStore,
    read_model: ReadModel,
    batch_size: int = 1_000_000,
    page: int = 2_000,
    workers: int | None = None,
) -> int:
    """Rebuild the read model from the first event; returns the changes
    projected (the events the read model reads: not orders' own, nor a
    receipt resolution's opening).

    The log is folded in `workers` processes at once (by default one per
    CPU, at most `parallel.MAX_WORKERS`, and one for a log of fewer than
    `parallel.PARALLEL_FROM` events), each keeping the aggregates of its
    partition in memory (none is read back from the store); see
    `projections.parallel`. The tables are written once per `batch_size`
    positions of the log (read `page` at a time), each time in one
    transaction with the position, with one view per entitlement changed:
    views and per-event writes were most of the cost after the reads
    (measured with bench/replay.py: on a million events, windows of 250,000
    made 2.6 times as many views and took a fifth more CPU time than one
    window). A window with an event that cannot be read or projected is
    projected again as the projector does, a change at a time where a batch
    fails, recording each that fails as a projection error."""
    # Without the cyclic garbage collector, whose passes over the growing
    # heap (every aggregate is kept) took a quarter of the replay's CPU time
    # (measured, bench/replay.py; freezing what was read saved half as much).
    # What is read makes no garbage cycles to speak of.
    enabled = gc.isenabled()
    gc.disable()
    try:
        head = int(store.process_recorder.max_notification_id() or 0)
        count = workers if workers is not None else workers_for(head)
        # The fold's processes start while the tables are emptied.
        with folding(store, count, page=page) as fold:
            read_model.reset(READ_MODEL)
            return _replay(store, ReadModelProjection(read_model), fold, batch_size)
    finally:
        if enabled:
            gc.enable()


def _replay(
    store: EntitlementStore, projection: ReadModelProjection, fold: Folding, batch_size: int
) -> int:
    position, count = 0, 0
    while True:
        # Every partition folds up to the same position, the head as the
        # window starts (writers may go on meanwhile: the next window).
        head = int(store.process_recorder.max_notification_id() or 0)
        if head <= position:
            return count
        start, position = position, min(position + batch_size, head)
        part = fold.window(start, position)
        count += part.changes
        try:
            if part.errors:
                raise ValueError("a change could not be read")
            rows = Rows()
            rows.latest, rows.codes, rows.letters = part.latest, part.codes, part.letters
            rows.receipts = [receipt for _, receipt in part.receipts]
            rows.resolutions = [resolution for _, resolution in part.resolutions]
            rows.delivered = [fact for _, fact in part.delivered]
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
