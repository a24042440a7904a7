"""Folding the whole log in several processes at once, for `entitle replay`
and `entitle audit verify`: each process folds the aggregates of one
partition (an aggregate's id's last byte modulo the number of partitions),
keeping them in memory from the first event, and hands back the read
model's rows of them (`readmodel.Rows`: plain tuples, cheap to pickle), with
the log position of each receipt, resolution and delivered fact so they can
be put back in log order.

Each process reads the log itself in pages of positions, and only its
partition's events that the read model reads (the database filters them:
selecting all of them ran at about 137,000 events/s, a seventh of the
fold's time per process). The calling process folds the first partition
itself; the others run in processes of their own (`Folding`), each with its
own `EntitlementStore` on the same database, so each decodes sealed
personal data with its own key cache. Memory: each process holds only its partition's aggregates.
Partitions are equal: giving the calling process a larger one, to cover
the others' start-up, was slower (measured, 120,000 events in two
processes: 5.8-6.1 s against 5.3-5.4 s for the fold).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import heapq
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast
from uuid import UUID

from eventsourcing.persistence import Notification
from psycopg.sql import SQL, Identifier

from domain.entitlement import Entitlement
from services.health import describe, transient
from services.projections.follower import (
    DEAD_LETTER_TOPIC,
    DELIVERED_TOPIC,
    ENTITLEMENT_TOPIC,
    OPENED_TOPIC,
    PROJECTED,
    RECEIPTS_TOPIC,
    RESOLVED_TOPIC,
    delivered_of,
    inherited,
    receipts_of,
    resolution_of,
    state_before,
)
from services.projections.views import dead_letter_view, entitlement_view
from services.readmodel import (
    Delivered,
    Resolution,
    Rows,
    entitlement_row,
    letter_row,
    receipt_row,
)
from services.store import EntitlementStore, PostgresRecorder

#: Logs shorter than this are folded in the calling process: starting a
#: process (importing what a fold needs) takes 0.8 s on the 2-core bench
#: machine, about as long as folding 10,000 events.
PARALLEL_FROM = 10_000
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
    the read model's rows (`Rows`: the last state of each entitlement and
    dead letter changed, and the new receipts) or, with `digests`, per
    entitlement its (sequence, body digest, sorted code hashes) and per
    dead letter its body digest instead; and the receipts, resolutions and
    delivered facts with their log positions, in log order."""

    rows: Rows = field(default_factory=Rows)
    summaries: dict[str, tuple[int, bytes, tuple[str, ...]]] = field(default_factory=dict)
    letter_digests: dict[str, bytes] = field(default_factory=dict)
    #: (position, `receipt_row`) of each new receipt.
    receipts: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    resolutions: list[tuple[int, Resolution]] = field(default_factory=list)
    delivered: list[tuple[int, Delivered]] = field(default_factory=list)
    #: (position, aggregate id, topic, why) of each event that could not be
    #: read or viewed.
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: Changes read (the events the read model reads).
    changes: int = 0


_HEX = "'0123456789abcdef'"
#: An id's last byte on SQLite, which keeps ids as 32 lower-case hex digits.
_SQLITE_BYTE = (
    f"((instr({_HEX}, substr(originator_id, 31, 1)) - 1) * 16"
    f" + instr({_HEX}, substr(originator_id, 32, 1)) - 1)"
)


class _Stored(NamedTuple):
    """A stored event as `Partition` and the mapper read it (a `Notification`
    without the dataclass: making those was a twentieth of the fold's time)."""

    id: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


def _partition_rows(
    store: EntitlementStore, after: int, upper: int, index: int, count: int, ids: dict[str, UUID]
) -> list[Notification]:
    """The events at positions (after, upper] of partition `index` of
    `count` that a projection reads (`follower.PROJECTED`)."""
    recorder: Any = store.recorder
    make = _Stored._make
    if isinstance(recorder, PostgresRecorder):
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {schema}.{table} WHERE notification_id > %s AND notification_id <= %s"
            " AND get_byte(uuid_send(originator_id), 15) %% %s = %s AND ({projected})"
            " ORDER BY notification_id"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
            projected=SQL(_projected("left(topic, {})", "%s")),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
            cursor.execute(statement, (after, upper, count, index, *PROJECTED), prepare=True)
            stored = [
                make(
                    (
                        r["notification_id"],
                        r["originator_id"],
                        r["originator_version"],
                        r["topic"],
                        bytes(r["state"]),
                    )
                )
                for r in cursor.fetchall()
            ]
    else:
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                "SELECT rowid, originator_id, originator_version, topic, state"
                f" FROM {recorder.events_table_name} WHERE rowid > ? AND rowid <= ?"
                f" AND {_SQLITE_BYTE} % ? = ? AND ({_projected('substr(topic, 1, {})', '?')})"
                " ORDER BY rowid",
                (after, upper, count, index, *PROJECTED),
            )
            rows = cursor.fetchall()
        known = ids.get
        stored = [
            make((r[0], known(r[1]) or ids.setdefault(r[1], UUID(r[1])), r[2], r[3], r[4]))
            for r in rows
        ]
    return cast(list[Notification], stored)


def _projected(prefix: str, placeholder: str) -> str:
    """A condition that a stored event's topic starts with one of
    `PROJECTED` (as many parameters), `prefix` taking each one's length."""
    return " OR ".join(f"{prefix.format(len(topic))} = {placeholder}" for topic in PROJECTED)


class Partition:
    """Folds the aggregates of partition `index` of `count` (all if
    `count` is 1), a window of the log at a time, keeping them in memory.

    Its own loop over the stored events, not `Follower`'s (which makes a
    `Change`, with the state before, per event, for projections that act
    on each): it keeps only each aggregate's state and makes the read
    model's rows of the last one in the window, with the same helpers for
    receipts, resolutions and delivered facts. It took 17 s of CPU time for
    half of a million events where following took 22-24 s (measured with
    bench/replay.py's store).
    """

    def __init__(
        self, store: EntitlementStore, index: int, count: int, digests: bool, page: int
    ) -> None:
        self.store = store
        self.index, self.count = index, count
        self.digests = digests
        self.page = page
        #: Every aggregate of the partition, as of the last window.
        self.states: dict[UUID, Any] = {}
        #: Each aggregate's id, made once (SQLite keeps them as text).
        self.ids: dict[str, UUID] = {}

    def fold(self, start: int, end: int, progress: Progress | None = None) -> Part:
        """The part of the log after position `start` up to `end`."""
        part = Part()
        # The entitlements and dead letters changed in the window, each
        # with the position of its last event.
        changed: dict[UUID, int] = {}
        letters: dict[UUID, int] = {}
        position = start
        while position < end:
            upper = min(position + self.page, end)
            stored = _partition_rows(self.store, position, upper, self.index, self.count, self.ids)
            for notification in stored:
                try:
                    self._fold(notification, part, changed, letters)
                except Exception as exc:
                    if transient(exc):
                        raise
                    # One event that cannot be read is reported, not a stop.
                    part.errors.append(
                        (
                            notification.id,
                            str(notification.originator_id),
                            notification.topic,
                            describe(exc),
                        )
                    )
            position = upper
            if progress is not None:
                progress(position, end)
        self._rows(part, changed, letters)
        return part

    def _fold(
        self,
        notification: Notification,
        part: Part,
        changed: dict[UUID, int],
        letters: dict[UUID, int],
    ) -> None:
        """Fold one stored event onto its aggregate (as `Follower._change`)."""
        topic = notification.topic
        event: Any
        if topic == OPENED_TOPIC:
            # (Not a change. One that cannot be read is read from the store
            # when its `Resolved` needs it.)
            try:
                event = self.store.mapper.to_domain_event(notification)
                self.states[event.originator_id] = event.mutate(None)
            except Exception as exc:
                if transient(exc):
                    raise
            return
        part.changes += 1
        event = self.store.mapper.to_domain_event(notification)
        at = notification.id
        if topic.startswith(ENTITLEMENT_TOPIC + "."):  # most events
            aggregate_id = event.originator_id
            self.states[aggregate_id] = event.mutate(self._before(event))
            changed[aggregate_id] = at
            if isinstance(event, Entitlement.Created) and event.inherited:
                part.delivered += [(at, fact) for fact in inherited(event)]
        elif topic == RECEIPTS_TOPIC:
            part.receipts += [(at, receipt_row(*receipt)) for receipt in receipts_of(event)]
        elif topic == DELIVERED_TOPIC:
            part.delivered.append((at, delivered_of(event)))
        elif topic == RESOLVED_TOPIC:
            opened = self._before(event)
            part.resolutions.append((at, resolution_of(opened, event)))
            self.states[event.originator_id] = event.mutate(opened)
        elif topic.startswith(DEAD_LETTER_TOPIC + "."):
            self.states[event.originator_id] = event.mutate(self._before(event))
            letters[event.originator_id] = at
        # (Webhook endpoints: nothing of them is in the read model.)

    def _before(self, event: Any) -> Any:
        """The aggregate's state before `event`: kept, or read from the store
        (an aggregate whose earlier events this partition did not fold)."""
        return state_before(event, self.states, self._stored)

    def _stored(self, event: Any) -> Any:
        return self.store.aggregate_at(event.originator_id, event.originator_version - 1)

    def _rows(self, part: Part, changed: dict[UUID, int], letters: dict[UUID, int]) -> None:
        """The read model's rows (or digests) of what the window changed."""
        rows = part.rows
        for letter_id, at in letters.items():
            try:
                rows.letters.append(letter_row(dead_letter_view(self.states[letter_id])))
            except Exception as exc:
                if transient(exc):
                    raise
                part.errors.append((at, str(letter_id), DEAD_LETTER_TOPIC, describe(exc)))
        for entitlement_id, at in changed.items():
            try:
                state = self.states[entitlement_id]
                row = entitlement_row(entitlement_view(state))
                codes = tuple(state.codes)
            except Exception as exc:
                if transient(exc):
                    raise
                part.errors.append((at, str(entitlement_id), ENTITLEMENT_TOPIC, describe(exc)))
                continue
            rows.entitlements.append(row)
            rows.codes += [(code, row[0]) for code in codes]
            if self.digests:
                part.summaries[row[0]] = (state.version, digest(row[-1]), tuple(sorted(codes)))
        part.errors.sort()
        if self.digests:
            part.letter_digests = {row[0]: digest(row[-1]) for row in rows.letters}
            part.rows = Rows()
        else:
            rows.receipts = [row for _, row in part.receipts]


def merged(parts: Iterable[Part]) -> Part:
    """The parts of one window as one, receipts, resolutions, delivered
    facts and errors in log order (a change is in one part only, so those
    of one position keep their order)."""
    whole = Part()
    parts = list(parts)
    for part in parts:
        whole.rows.entitlements += part.rows.entitlements
        whole.rows.codes += part.rows.codes
        whole.rows.letters += part.rows.letters
        whole.summaries.update(part.summaries)
        whole.letter_digests.update(part.letter_digests)
        whole.changes += part.changes
    whole.receipts = list(heapq.merge(*(p.receipts for p in parts), key=lambda r: r[0]))
    whole.rows.receipts = [row for _, row in whole.receipts]
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
            call = (
                f"_work({store.database_url!r}, {index}, {count}, {digests}, {page}, {os.getpid()})"
            )
            # Bound to this process's life before the imports (a second or
            # two): killed meanwhile, the child would otherwise live on.
            code = f"{_DIE_WITH_PARENT}from {__name__} import _work; {call}"
            command = [sys.executable, "-c", code, str(os.getpid())]
            self.children.append(
                # In a process group of its own: a Ctrl-C at the terminal
                # reaches the caller only, which ends this process.
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                    process_group=0,
                )
            )

    def window(self, start: int, end: int, progress: Progress | None = None) -> Part:
        """Every partition's fold of the log after `start` up to `end`, merged."""
        return merged(self.parts(start, end, progress))

    def parts(
        self, start: int, end: int, progress: Progress | None = None
    ) -> Generator[Part, None, None]:
        """Each partition's fold of the log after `start` up to `end`, this
        process's first, each as soon as it is there (a caller can write
        one while the others are still folding). A caller that stops early
        must close it: the other partitions' parts are then read and dropped."""
        for child in self.children:
            assert child.stdin is not None
            pickle.dump((start, end), child.stdin)
            child.stdin.flush()
        unread = list(self.children)
        try:
            yield self.local.fold(start, end, progress)
            while unread:
                yield self._receive(unread.pop(0))
        except GeneratorExit:
            # Stopped early: the others' parts are read, so that the next
            # window's replies line up. (On an error or Ctrl-C, `folding`
            # ends the processes instead.)
            for child in unread:
                with suppress(Exception):
                    self._receive(child)
            raise

    @staticmethod
    def _receive(child: subprocess.Popen[bytes]) -> Part:
        assert child.stdout is not None
        try:
            reply = pickle.load(child.stdout)
        except EOFError:
            raise RuntimeError(f"a fold process ended (exit status {child.wait()})") from None
        if isinstance(reply, BaseException):
            raise reply
        return cast(Part, reply)

    def close(self, kill: bool = False) -> None:
        """End the processes: each once it has read that no window comes,
        or at once (`kill`: the caller was interrupted, nothing is wanted)."""
        for child in self.children:
            if kill:
                child.kill()
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
    except BaseException:  # (Ctrl-C, an error): the other partitions are not wanted
        fold.close(kill=True)
        raise
    fold.close()


#: Linux: the child is killed with its parent (PR_SET_PDEATHSIG), then
#: checks the parent is still there; the first statement of its command.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
    if sys.platform == "linux"
    else ""
)


def _work(database_url: str, index: int, count: int, digests: bool, page: int, parent: int) -> None:
    """A partition's process: folds each window read from stdin, writing
    the part to stdout; ends when stdin does, or quietly when the caller
    (process `parent`) goes away."""
    # The caller killed: end too, at once (Linux), not after folding a
    # window nobody reads.
    if sys.platform == "linux":
        with suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
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
            except EOFError:  # the caller is done (or went away)
                store.close()
                out.close()
                # Without freeing every aggregate one by one (a second and
                # more for a million events' worth): nothing else is held.
                os._exit(0)
            try:
                reply: Any = partition.fold(start, end)
            except Exception as exc:
                reply = exc if transient(exc) else RuntimeError(describe(exc))
            try:
                data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # (an exception that does not pickle)
                data = pickle.dumps(RuntimeError(describe(exc)))
            try:
                out.write(data)
                out.flush()
            except BrokenPipeError:  # the caller went away
                os._exit(1)
    finally:
        store.close()
