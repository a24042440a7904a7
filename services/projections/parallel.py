"""Folding the whole log in several processes at once, for `entitle replay`
and `entitle audit verify`: each process folds the aggregates of one
partition (an aggregate's id's last byte modulo the number of partitions),
keeping them in memory from the first event, and hands back what the read
model needs of them, with the log position of each receipt, resolution and
delivered fact so they can be put back in log order.

Each process reads the log itself in pages of positions, and only its
partition's events (the database filters them: selecting all of them ran
at about 137,000 events/s, a seventh of the fold's time per process). The
calling process folds the first partition itself; the others run in
processes of their own (`Folding`), each with its own `EntitlementStore` on
the same database, so each decodes sealed personal data with its own key
cache. Memory: each process holds only its partition's aggregates.
Partitions are equal: giving the calling process a larger one, to cover
the others' start-up, was slower (measured, 120,000 events in two
processes: 5.8-6.1 s against 5.3-5.4 s for the fold).
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification
from psycopg.sql import SQL, Identifier

from contracts.api import DeadLetterView, EntitlementView, ReceiptView
from domain.entitlement import Entitlement
from services.health import describe, transient
from services.projections.follower import Change, Follower
from services.projections.views import dead_letter_view
from services.readmodel import Delivered, Resolution
from services.store import EntitlementStore, PostgresRecorder

#: Logs shorter than this are folded in the calling process: starting a
#: process (importing the services) took 1.6 s on the 2-core bench
#: machine, as long as folding about 16,000 events.
PARALLEL_FROM = 20_000
#: At most so many partitions (processes), however many CPUs there are.
MAX_WORKERS = 8

#: progress(position read so far, position to read up to)
Progress = Callable[[int, int], None]


def digest(text: str | bytes) -> bytes:
    """A 16-byte digest of a view's JSON (what `verify` keeps of it)."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=16).digest()


def workers_for(events: int) -> int:
    """How many partitions to fold a log of `events` events in."""
    if events < PARALLEL_FROM:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@dataclass
class Part:
    """What the fold of one partition over one window of the log gives:
    the last view (and active code hashes) of each entitlement changed, or
    with `digests` its (sequence, view digest, sorted code hashes) instead;
    each dead letter's last view (or its digest); and the receipts,
    resolutions and delivered facts with their log positions, in log order."""

    latest: dict[UUID, EntitlementView] = field(default_factory=dict)
    codes: dict[UUID, tuple[str, ...]] = field(default_factory=dict)
    letters: dict[UUID, DeadLetterView] = field(default_factory=dict)
    summaries: dict[UUID, tuple[int, bytes, tuple[str, ...]]] = field(default_factory=dict)
    letter_digests: dict[UUID, bytes] = field(default_factory=dict)
    receipts: list[tuple[int, tuple[ReceiptView, tuple[str, ...]]]] = field(default_factory=list)
    resolutions: list[tuple[int, Resolution]] = field(default_factory=list)
    delivered: list[tuple[int, Delivered]] = field(default_factory=list)
    #: (position, aggregate id, topic, why) of each event that could not be
    #: read or viewed.
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: Changes read (the events the read model reads).
    changes: int = 0


class _PartitionFollower(Follower):
    """A `Follower` of the aggregates of partition `index` of `count`: those
    whose id's last byte is `index` modulo `count`, selected by the
    database (the state of other partitions' events is not even fetched).
    It reads by position: `stop` is required."""

    def __init__(self, store: EntitlementStore, index: int, count: int) -> None:
        super().__init__(store, cache_size=None, batches=0, views=False)
        self.index, self.count = index, count

    def _select(
        self, after: int, limit: int, stop: int | None
    ) -> tuple[Sequence[Notification], int | None]:
        assert stop is not None
        if self.count == 1:
            return super()._select(after, limit, stop)
        upper = min(after + limit, stop)
        if upper <= after:
            return [], None
        return _partition_rows(self.store, after, upper, self.index, self.count), upper


_HEX = "'0123456789abcdef'"
#: An id's last byte on SQLite, which keeps ids as 32 lower-case hex digits.
_SQLITE_BYTE = (
    f"((instr({_HEX}, substr(originator_id, 31, 1)) - 1) * 16"
    f" + instr({_HEX}, substr(originator_id, 32, 1)) - 1)"
)


def _partition_rows(
    store: EntitlementStore, after: int, upper: int, index: int, count: int
) -> list[Notification]:
    """The events at positions (after, upper] of partition `index` of `count`."""
    recorder: Any = store.recorder
    if isinstance(recorder, PostgresRecorder):
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {schema}.{table} WHERE notification_id > %s AND notification_id <= %s"
            " AND get_byte(uuid_send(originator_id), 15) %% %s = %s ORDER BY notification_id"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
            cursor.execute(statement, (after, upper, count, index), prepare=True)
            rows = [tuple(row.values()) for row in cursor.fetchall()]
    else:
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                "SELECT rowid, originator_id, originator_version, topic, state"
                f" FROM {recorder.events_table_name} WHERE rowid > ? AND rowid <= ?"
                f" AND {_SQLITE_BYTE} % ? = ? ORDER BY rowid",
                (after, upper, count, index),
            )
            rows = [(r[0], UUID(r[1]), r[2], r[3], r[4]) for r in cursor.fetchall()]
    return [
        Notification(
            id=nid,
            originator_id=aggregate_id,
            originator_version=version,
            topic=topic,
            state=bytes(state),
        )
        for nid, aggregate_id, version, topic, state in rows
    ]


class Partition:
    """Folds the aggregates of partition `index` of `count` (all if
    `count` is 1), a window of the log at a time, keeping them in memory."""

    def __init__(
        self, store: EntitlementStore, index: int, count: int, digests: bool, page: int
    ) -> None:
        self.follower = _PartitionFollower(store, index, count)
        self.digests = digests
        self.page = page

    def fold(self, start: int, end: int, progress: Progress | None = None) -> Part:
        """The part of the log after position `start` up to `end`."""
        part = Part()
        unviewed: dict[UUID, Change] = {}
        position = start
        while position < end:
            changes, last = self.follower.read(position, min(self.page, end - position), end)
            if last is None:
                break
            for change in changes:
                at = change.position
                if change.error is not None:
                    part.errors.append((at, change.aggregate_id or "?", change.topic, change.error))
                    continue
                part.receipts += [(at, receipt) for receipt in change.receipts]
                if change.resolution is not None:
                    part.resolutions.append((at, change.resolution))
                part.delivered += [(at, fact) for fact in change.delivered]
                if change.dead_letter is not None:
                    part.letters[change.dead_letter.id] = dead_letter_view(change.dead_letter)
                if isinstance(change.event, Entitlement.Event):
                    unviewed[change.event.originator_id] = change
            part.changes += len(changes)
            position = last
            if progress is not None:
                progress(position, end)
        # One view per entitlement changed in the window: the last change
        # read was this window's last (as `Rows.view` needs).
        for change in self.follower.with_views(list(unviewed.values())):
            if change.error is not None or change.entitlement is None:
                part.errors.append(
                    (change.position, change.aggregate_id or "?", change.topic, change.error or "")
                )
                continue
            part.latest[change.entitlement.id] = change.entitlement
            part.codes[change.entitlement.id] = change.code_hashes
        if self.digests:
            part.summaries = {
                key: (view.sequence, digest(view.model_dump_json()), tuple(sorted(part.codes[key])))
                for key, view in part.latest.items()
            }
            part.letter_digests = {
                key: digest(view.model_dump_json()) for key, view in part.letters.items()
            }
            part.latest, part.codes, part.letters = {}, {}, {}
        return part


def merged(parts: list[Part]) -> Part:
    """The parts of one window as one, receipts, resolutions, delivered
    facts and errors in log order (a change is in one part only, so those
    of one position keep their order)."""
    whole = Part()
    for part in parts:
        whole.latest.update(part.latest)
        whole.codes.update(part.codes)
        whole.letters.update(part.letters)
        whole.summaries.update(part.summaries)
        whole.letter_digests.update(part.letter_digests)
        whole.changes += part.changes
    whole.receipts = list(heapq.merge(*(p.receipts for p in parts), key=lambda r: r[0]))
    whole.resolutions = list(heapq.merge(*(p.resolutions for p in parts), key=lambda r: r[0]))
    whole.delivered = list(heapq.merge(*(p.delivered for p in parts), key=lambda r: r[0]))
    whole.errors = sorted(error for part in parts for error in part.errors)
    return whole


class Folding:
    """`count` partitions folding the log together: the first in this
    process, the others each in a process of its own. Use as a context
    manager (`folding`), which ends the processes."""

    def __init__(self, store: EntitlementStore, count: int, digests: bool, page: int) -> None:
        self.local = Partition(store, 0, count, digests, page)
        self.children: list[subprocess.Popen[bytes]] = []
        # A process of its own (`python -c`, calling `_work`), not multiprocessing's
        # spawn, which runs the caller's main module again in each child
        # (an unguarded script would start its work there), and not a fork
        # of this process's connections and threads. It imports what this
        # process can import, and talks pickles on its stdin and stdout.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        for index in range(1, count):
            call = f"_work({store.database_url!r}, {index}, {count}, {digests}, {page})"
            command = [sys.executable, "-c", f"from {__name__} import _work; {call}"]
            self.children.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            )

    def window(self, start: int, end: int, progress: Progress | None = None) -> Part:
        """Every partition's fold of the log after `start` up to `end`, merged."""
        for child in self.children:
            assert child.stdin is not None
            pickle.dump((start, end), child.stdin)
            child.stdin.flush()
        parts = [self.local.fold(start, end, progress)]
        for child in self.children:
            assert child.stdout is not None
            try:
                reply = pickle.load(child.stdout)
            except EOFError:
                raise RuntimeError(f"a fold process ended (exit status {child.wait()})") from None
            if isinstance(reply, BaseException):
                raise reply
            parts.append(reply)
        return merged(parts)

    def close(self) -> None:
        for child in self.children:
            with suppress(OSError):  # (it ended already)
                assert child.stdin is not None
                child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        self.children = []


@contextmanager
def folding(
    store: EntitlementStore, count: int, *, digests: bool = False, page: int = 2_000
) -> Iterator[Folding]:
    """`Folding` in `count` partitions (1 where the store is an in-memory
    database, which other processes cannot open)."""
    if ":memory:" in store.database_url or "mode=memory" in store.database_url:
        count = 1
    fold = Folding(store, count, digests, page)
    try:
        yield fold
    finally:
        fold.close()


def _work(database_url: str, index: int, count: int, digests: bool, page: int) -> None:
    """A partition's process: folds each window read from stdin, writing
    the part to stdout; ends when stdin does."""
    # The protocol's stdout; anything printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    source = sys.stdin.buffer
    # As in `replay`: what is read makes no garbage cycles to speak of.
    gc.disable()
    store = EntitlementStore(database_url)
    try:
        partition = Partition(store, index, count, digests, page)
        while True:
            try:
                start, end = pickle.load(source)
            except EOFError:
                return  # the caller is done (or went away)
            try:
                reply: Any = partition.fold(start, end)
            except Exception as exc:
                reply = exc if transient(exc) else RuntimeError(describe(exc))
            try:
                data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # (an exception that does not pickle)
                data = pickle.dumps(RuntimeError(describe(exc)))
            out.write(data)
            out.flush()
    finally:
        store.close()
