"""The read model projection: the API's tables, kept from the log with the
position saved in the same transaction (exactly once); `entitle replay`
rebuilds them from zero."""

from __future__ import annotations

import asyncio
import gc
import heapq
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import UUID

import anyio

from contracts.api import (
    DeadLetterView,
    EntitlementView,
    ReceiptView,
)
from services.health import transient
from services.projections.follower import Change, Follower, project_batch
from services.projections.parallel import Folding, Part, Progress, folding, workers_for
from services.projections.views import dead_letter_view
from services.readmodel import Delivered, ReadModel, Resolution
from services.store import EntitlementStore

# Versioned with the read model's tables: a new schema rebuilds from zero.
# v5: seats whose code was revoked before revoking released them are not shown.
READ_MODEL = "read-model-v6"


class ReadModelProjection:
    name = READ_MODEL

    def __init__(self, read_model: ReadModel) -> None:
        self.read_model = read_model

    def position(self) -> int:
        return self.read_model.position(self.name)

    def apply(self, changes: list[Change], position: int) -> None:
        """Write a batch: the last view of each entitlement and dead letter
        changed, and every receipt, resolution and delivered fact in log order."""
        latest: dict[UUID, Change] = {}
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
                latest[change.entitlement.id] = change
            if change.dead_letter is not None:
                letters[change.dead_letter.id] = dead_letter_view(change.dead_letter)
        views: list[EntitlementView] = [c.entitlement for c in latest.values() if c.entitlement]
        self.read_model.apply(
            self.name,
            position,
            views,
            list(letters.values()),
            {key: change.code_hashes for key, change in latest.items()},
            receipts,
            delivered,
            resolutions,
        )

    async def project(self, changes: list[Change], position: int) -> None:
        await anyio.to_thread.run_sync(self.apply, changes, position)


def replay(
    store: EntitlementStore,
    read_model: ReadModel,
    batch_size: int = 1_000_000,
    page: int = 2_000,
    workers: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Rebuild the read model from the first event; returns the changes
    projected (the events the read model reads: not orders' own, nor a
    receipt resolution's opening).

    The log is folded in `workers` processes at once (by default one per
    CPU, at most `parallel.MAX_WORKERS`, and one for a log of fewer than
    `parallel.PARALLEL_FROM` events), each keeping the aggregates of its
    partition in memory (none is read back from the store) and making the
    rows of its partition; see `projections.parallel`. The tables are
    written once per `batch_size` positions of the log (read `page` at a
    time), each time in one transaction with the position, with one view
    per entitlement changed: views and per-event writes were most of the
    cost after the reads (measured with bench/replay.py: on a million
    events, windows of 250,000 made 2.6 times as many views and took a
    fifth more CPU time than one window). This process writes its own
    partition's rows while the others finish, and empties the tables (in a
    thread) while it folds. A window with an event that cannot be read or
    projected is projected again as the projector does, a change at a time
    where a batch fails, recording each that fails as a projection error."""
    # Without the cyclic garbage collector, whose passes over the growing
    # heap (every aggregate is kept) took a quarter of the replay's CPU time
    # (measured, bench/replay.py; freezing what was read saved half as much).
    # What is read makes no garbage cycles to speak of.
    enabled = gc.isenabled()
    gc.disable()
    try:
        head = int(store.process_recorder.max_notification_id() or 0)
        count = workers if workers is not None else workers_for(head)
        # The fold's processes start, and this one folds, while the tables
        # are emptied (dropping a large table took seconds on SQLite).
        # (Interrupted: the fold's processes are ended first, then the reset waited for.)
        with ThreadPoolExecutor(1) as pool, folding(store, count, page=page) as fold:
            reset = pool.submit(read_model.reset, READ_MODEL)
            return _replay(
                store, ReadModelProjection(read_model), fold, batch_size, reset, progress
            )
    finally:
        if enabled:
            gc.enable()


def _replay(
    store: EntitlementStore,
    projection: ReadModelProjection,
    fold: Folding,
    batch_size: int,
    reset: Future[None],
    progress: Progress | None = None,
) -> int:
    read_model = projection.read_model
    position, count = 0, 0
    while True:
        # Every partition folds up to the same position, the head as the
        # window starts (writers may go on meanwhile: the next window).
        head = int(store.process_recorder.max_notification_id() or 0)
        if head <= position:
            reset.result()  # (an empty log: the tables are still emptied)
            return count
        start, position = position, min(position + batch_size, head)
        parts = fold.parts(start, position, _toward(progress, head))
        try:
            first = next(parts)
            reset.result()
            resolutions: list[list[tuple[int, Resolution]]] = []
            delivered: list[list[tuple[int, Delivered]]] = []
            part: Part | None = first
            # What a fold process raises is not this window's to project again.
            receiving = unreadable = False
            try:
                with read_model.transaction() as cur:
                    while part is not None:
                        count += part.changes
                        unreadable = unreadable or bool(part.errors)
                        if not unreadable:
                            read_model.write(cur, part.rows, position)
                        resolutions.append(part.resolutions)
                        delivered.append(part.delivered)
                        receiving = True
                        part = next(parts, None)
                        receiving = False
                    if unreadable:
                        raise _Unreadable
                    read_model.settle(
                        cur,
                        [r for _, r in heapq.merge(*resolutions, key=lambda r: r[0])],
                        [d for _, d in heapq.merge(*delivered, key=lambda d: d[0])],
                    )
                    read_model.save_position(cur, READ_MODEL, position)
            except Exception as exc:
                if receiving or transient(exc):
                    raise
                parts.close()
                asyncio.run(_again(store, projection, start, position))
        finally:
            parts.close()


def _toward(progress: Progress | None, head: int) -> Progress | None:
    """`progress` counting toward the log's head, not the window's end."""
    if progress is None:
        return None
    return lambda done, _: progress(done, head)


class _Unreadable(Exception):
    """A change in the window could not be read (or viewed)."""


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
