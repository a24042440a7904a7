"""The one follower every projection shares: it reads the event store's
notification log in order, folds each event onto its aggregate (a
`Change`), and hands batches to a projection, which keeps its own position.

Projections read the log by position: eventsourcing cannot subscribe to an
SQLite store, and one code path for both stores is easier to trust.
PostgreSQL's table lock on insert makes notification ids commit in order,
so reading after a position never skips one. On PostgreSQL a `LogBell` rung
by the NOTIFY that comes with every insert wakes them at once; on SQLite
they poll.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast, get_args
from uuid import UUID

import anyio
import psycopg
from eventsourcing.persistence import Notification
from psycopg.sql import SQL, Identifier

from contracts.api import (
    EntitlementView,
    ProjectionErrorView,
    ReceiptView,
)
from contracts.events import (
    EventType,
)
from domain.dead_letter import DeadLetter
from domain.entitlement import Cause, Entitlement, event_type
from services.health import describe, transient
from services.projections.views import entitlement_view, receipt_view
from services.readmodel import Delivered, ReadModel, Resolution
from services.store import EntitlementStore

log = logging.getLogger("entitle.projector")

ENTITLEMENT_TOPIC = "domain.entitlement:Entitlement"
DEAD_LETTER_TOPIC = "domain.dead_letter:DeadLetter"
RECEIPTS_TOPIC = "domain.receipt:Receipts.Recorded"
RESOLVED_TOPIC = "domain.receipt:ReceiptResolution.Resolved"
OPENED_TOPIC = "domain.receipt:ReceiptResolution.Opened"
DELIVERED_TOPIC = "domain.entitlement:Order.PaymentFactDelivered"
_ENDPOINT_TOPIC = "domain.endpoint:Endpoint"
#: The topics (prefixes) of the events projections read.
PROJECTED = (
    _ENDPOINT_TOPIC + ".",
    ENTITLEMENT_TOPIC + ".",
    DEAD_LETTER_TOPIC + ".",
    RECEIPTS_TOPIC,
    RESOLVED_TOPIC,
    DELIVERED_TOPIC,
    OPENED_TOPIC,
)
#: The events folded onto an earlier state of their aggregate.
_STATEFUL = (
    _ENDPOINT_TOPIC + ".",
    ENTITLEMENT_TOPIC + ".",
    DEAD_LETTER_TOPIC + ".",
    RESOLVED_TOPIC,
)
#: The event types that go on the public topic (the contract's list).
PUBLIC_TYPES = frozenset(get_args(EventType))


def delivered_of(event: Any) -> Delivered:
    """What an `Order.PaymentFactDelivered` tells the read model: a fact
    that waited reached its entitlements."""
    cause = event.cause
    effects: dict[str, list[str]] = getattr(event, "effects", {})
    return Delivered(
        cause["source"],
        cause["event_id"],
        event.timestamp,
        tuple(effects),
        tuple(sorted({name for names in effects.values() for name in names})),
    )


def receipts_of(event: Any) -> tuple[tuple[ReceiptView, tuple[str, ...]], ...]:
    """The receipts a `Receipts.Recorded` records, each with what it waits on."""
    return tuple(
        (receipt_view(item, event.timestamp), tuple(item["waits_on"])) for item in event.items
    )


def resolution_of(opened: Any, event: Any) -> Resolution:
    """A parked webhook's end: `ReceiptResolution.Resolved` (`event`) of the
    resolution `opened`."""
    return Resolution(
        opened.receipt,
        event.outcome,
        event.detail,
        event.entitlement_ids,
        event.event_types,
        event.timestamp,
    )


def state_before(event: Any, kept: Mapping[UUID, Any], missed: Callable[[Any], Any]) -> Any:
    """The state of `event`'s aggregate before it: none for a first event,
    the one `kept` if it is at the version before, else `missed(event)`."""
    version = event.originator_version
    if version == 1:
        return None
    state = kept.get(event.originator_id)
    if state is not None and state.version == version - 1:
        return state
    return missed(event)


def inherited(event: Any) -> tuple[Delivered, ...]:
    """Provider facts a new entitlement took over from its order, where
    they waited for it (and from its siblings, which changes nothing)."""
    if not isinstance(event, Entitlement.Created):
        return ()
    reached, types = (str(event.originator_id),), (event_type(event),)
    causes = (Cause.of_fact(fact) for fact in event.inherited)
    return tuple(
        Delivered(c.source, c.event_id, event.timestamp, reached, types) for c in causes if c
    )


@dataclass(frozen=True)
class Change:
    """One stored event, with the state of its entitlement around it."""

    event: Any
    previous_status: str | None
    position: int = 0
    #: The customer's e-mail address before the event (entitlement events).
    previous_email: str | None = None
    #: The entitlement after the event (entitlement events).
    entitlement: EntitlementView | None = None
    dead_letter: DeadLetter | None = None
    #: The entitlement's active code hashes, for the read model's code index.
    code_hashes: tuple[str, ...] = ()
    #: New receipts, each with what it waits on (if parked).
    receipts: tuple[tuple[ReceiptView, tuple[str, ...]], ...] = ()
    resolution: Resolution | None = None
    #: Provider facts that waited and reached their entitlements with this event.
    delivered: tuple[Delivered, ...] = ()
    #: Why the event could not be read (every projection skips it, saying so).
    error: str | None = None
    aggregate_id: str | None = None
    topic: str = ""
    #: A webhook endpoint after the event (`domain.endpoint`).
    endpoint: Any = None

    @property
    def public(self) -> bool:
        """Whether the change goes on the public topic: a fact that changed
        nothing (`entitlement.noted`) stays in the history only."""
        return event_type(self.event) in PUBLIC_TYPES


class Follower:
    """Reads the notification log and folds each event onto its aggregate,
    keeping recent aggregates in memory so a long log is read once.

    `cache_size` aggregates are kept (least recently used go first; None:
    all). The earlier state of the aggregates a batch needs that are not
    kept is loaded for the whole batch in one query. (`entitle replay` and
    `audit verify` fold the whole log with `parallel.Partition` instead.)

    One follower serves all of a process's projections (from worker
    threads, hence the lock): they read the same log, mostly from the same
    position, so a batch one of them read is handed to the others as it
    is. Each decoded every batch itself before, which was a third of the
    projector's CPU with three projections. A batch's changes are never
    changed afterwards (an aggregate they hold is a copy)."""

    def __init__(
        self,
        store: EntitlementStore,
        cache_size: int | None = 10_000,
        batches: int = 16,
    ) -> None:
        self.store = store
        self._cache: OrderedDict[UUID, Any] = OrderedDict()
        self._cache_size = cache_size
        self._batch: list[Notification] = []
        self._next = 0
        self._prefetched = False
        self._lock = threading.Lock()
        #: The last batches read, by the position they were read after.
        self._batches: OrderedDict[int, tuple[int, list[Change], int]] = OrderedDict()
        self._keep = batches

    def read(self, after: int, limit: int) -> tuple[list[Change], int | None]:
        """The changes after position `after` (at most `limit` events of
        the log) and the position of the last event read, or ([], None)
        when there is none yet."""
        changes, last, _ = self.read_kept(after, limit)
        return changes, last

    def read_kept(self, after: int, limit: int) -> tuple[list[Change], int | None, bool]:
        """`read`, and whether the batch was one read earlier (the log may
        have grown since: its reader should not take it as caught up)."""
        with self._lock:
            kept = self._batches.get(after)
            if kept is not None and kept[0] <= limit:
                return kept[1], kept[2], True
            changes, last = self._read(after, limit)
            if last is not None:
                self._batches[after] = (limit, changes, last)
                if len(self._batches) > self._keep:
                    self._batches.popitem(last=False)
            return changes, last, False

    def _read(self, after: int, limit: int) -> tuple[list[Change], int | None]:
        notifications = self.store.process_recorder.select_notifications(
            start=after + 1, limit=limit
        )
        if not notifications:
            return [], None
        last = notifications[-1].id
        projected = [n for n in notifications if n.topic.startswith(PROJECTED)]
        # What the first aggregate not kept loads the earlier states for.
        self._batch, self._prefetched = projected, False
        changes = []
        for self._next, notification in enumerate(projected):
            if notification.topic == OPENED_TOPIC:
                self._opened(notification)
                continue
            try:
                changes.append(self._change(notification))
            except Exception as exc:
                if transient(exc):
                    raise
                # One event that cannot be read must not stop every projection.
                changes.append(
                    Change(
                        None,
                        None,
                        notification.id,
                        error=describe(exc),
                        aggregate_id=str(notification.originator_id),
                        topic=notification.topic,
                    )
                )
        return changes, last

    def _opened(self, notification: Notification) -> None:
        """Keep a receipt's resolution as it opens (no change to project):
        its `Resolved` needs the receipt it names, and is then not read
        back from the store. One that cannot be read is read there."""
        try:
            event: Any = self.store.mapper.to_domain_event(notification)
            self._remember(event.mutate(None))
        except Exception as exc:
            if transient(exc):
                raise

    def _change(self, notification: Notification) -> Change:
        event: Any = self.store.mapper.to_domain_event(notification)
        topic = notification.topic
        if topic.startswith(ENTITLEMENT_TOPIC + "."):
            # Most events: tested first (measured, bench/replay.py).
            return self._entitlement_change(event, notification.id)
        if topic == DELIVERED_TOPIC:
            return Change(event, None, notification.id, delivered=(delivered_of(event),))
        if topic.startswith(DEAD_LETTER_TOPIC):
            letter = event.mutate(copy.deepcopy(self._state_before(event)))
            self._remember(letter)
            return Change(event, None, notification.id, dead_letter=letter)
        if topic.startswith(_ENDPOINT_TOPIC):
            endpoint = event.mutate(copy.deepcopy(self._state_before(event)))
            self._remember(endpoint)
            return Change(event, None, notification.id, endpoint=endpoint)
        if topic == RECEIPTS_TOPIC:
            return Change(event, None, notification.id, receipts=receipts_of(event))
        if topic == RESOLVED_TOPIC:
            opened = self._state_before(event)
            resolution = resolution_of(opened, event)
            self._remember(event.mutate(opened))  # (no change holds it)
            return Change(event, None, notification.id, resolution=resolution)
        return self._entitlement_change(event, notification.id)

    def _entitlement_change(self, event: Any, position: int) -> Change:
        before = self._state_before(event)
        previous = before.status.value if before is not None else None
        previous_email = before.customer_email if before is not None else None
        after_state = event.mutate(before)  # (`before` itself, changed)
        self._remember(after_state)
        return Change(
            event,
            previous,
            position,
            previous_email=previous_email,
            entitlement=entitlement_view(after_state),
            code_hashes=tuple(after_state.codes),
            delivered=inherited(event),
        )

    def _prefetch(self, notifications: list[Notification]) -> None:
        """Load, in one query, the state before its first event in
        `notifications` (the rest of a batch) of each aggregate that is not
        kept at that version: one query instead of a repository read per
        event, which was most of a replay's time (cost grew with each
        aggregate's length). What cannot be loaded so is loaded per event,
        where an error is that event's."""
        wanted: dict[UUID, int] = {}
        seen: set[UUID] = set()
        for notification in notifications:
            aggregate_id = cast(UUID, notification.originator_id)  # (both recorders make UUIDs)
            if aggregate_id in seen or not notification.topic.startswith(_STATEFUL):
                continue
            seen.add(aggregate_id)
            version = int(notification.originator_version) - 1
            cached = self._cache.get(aggregate_id)
            if version > 0 and (cached is None or cached.version != version):
                wanted[aggregate_id] = version
        if not wanted:
            return
        try:
            loaded = self.store.aggregates_at(wanted)
        except Exception as exc:
            if transient(exc):
                raise
            return
        for aggregate in loaded.values():
            self._remember(aggregate)

    def _state_before(self, event: Any) -> Any:
        return state_before(event, self._cache, self._missed)

    def _missed(self, event: Any) -> Any:
        """The state before `event` of an aggregate not kept: the batch's
        missing states are loaded at the first miss, then one by one."""
        if self._prefetched:
            return self._stored(event)
        self._prefetched = True
        self._prefetch(self._batch[self._next :])
        return state_before(event, self._cache, self._stored)

    def _stored(self, event: Any) -> Any:
        return self.store.aggregate_at(event.originator_id, event.originator_version - 1)

    def _remember(self, aggregate: Any) -> None:
        self._cache[aggregate.id] = aggregate
        if self._cache_size is not None:
            self._cache.move_to_end(aggregate.id)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)


class Projection(Protocol):
    name: str
    read_model: ReadModel

    def position(self) -> int: ...

    async def project(self, changes: list[Change], position: int) -> None: ...


class LogBell:
    """Rung when the event log may have grown, so its followers read it at
    once instead of at their next poll."""

    def __init__(self) -> None:
        self._rung = asyncio.Event()

    def armed(self) -> asyncio.Event:
        """What the next ring sets. A follower takes it before reading, so a
        ring while it reads or projects is not lost."""
        return self._rung

    def ring(self) -> None:
        self._rung.set()
        self._rung = asyncio.Event()


async def listen(
    database_url: str,
    channel: str,
    bell: LogBell,
    stop: asyncio.Event,
    working: Callable[[], None] = lambda: None,
) -> None:
    """Ring `bell` at every NOTIFY on `channel` (one per transaction that
    inserts events) until `stop` is set. A lost connection raises: run it
    under `supervise`, which reconnects with backoff; followers poll
    meanwhile."""
    connection = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    async with connection:
        await connection.execute(SQL("LISTEN {}").format(Identifier(channel)))
        working()
        bell.ring()  # whatever was committed before LISTEN took effect
        while not stop.is_set():
            # Notifications that arrive together wake the followers once.
            rung = False
            async for _ in connection.notifies(timeout=0.5, stop_after=1):
                rung = True
            if rung:
                bell.ring()


async def _idle(stop: asyncio.Event, rung: asyncio.Event | None, timeout: float) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if rung is not None:
        waits.append(asyncio.ensure_future(rung.wait()))
    _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


async def follow(
    store: EntitlementStore,
    projection: Projection,
    stop: asyncio.Event,
    working: Callable[[], None] = lambda: None,
    poll_interval: float = 0.1,
    batch_size: int = 500,
    bell: LogBell | None = None,
    follower: Follower | None = None,
) -> None:
    """Keep `projection` up to date with the log until `stop` is set: when
    caught up, until `bell` rings (or a second passes) if there is one, else
    for `poll_interval`. Calls `working()` after each step that worked.
    `follower` is the one the process's projections share (else its own).

    An event the projection cannot project is recorded as a projection
    error and skipped; an unavailable database or broker raises, and the
    caller (`supervise`) starts again from the projection's saved position."""
    follower = follower or Follower(store)
    position = await anyio.to_thread.run_sync(projection.position)
    # With a bell, the timeout only covers a listener that is reconnecting.
    timeout = 1.0 if bell is not None else poll_interval
    while not stop.is_set():
        rung = bell.armed() if bell is not None else None
        changes, last, kept = await anyio.to_thread.run_sync(
            follower.read_kept, position, batch_size
        )
        working()
        if last is None:
            await _idle(stop, rung, timeout)
            continue
        await project_batch(projection, changes, last)
        working()
        caught_up = last - position < batch_size and not kept
        position = last
        if caught_up:
            # Without a bell, let changes gather: fewer, larger transactions.
            # With one, the writers' own transactions already batch them.
            await _idle(stop, rung, timeout)


async def project_batch(projection: Projection, changes: list[Change], last: int) -> None:
    """Project one batch read from the log (`last` its final position): all
    at once, or, if that fails other than by an unavailable database or
    broker, one change at a time, recording and going past each that fails."""
    try:
        if any(change.error for change in changes):
            raise _Unreadable
        await projection.project(changes, last)
    except Exception as exc:
        if transient(exc):
            raise
        await _one_by_one(projection, changes, last)


class _Unreadable(Exception):
    pass


async def _one_by_one(projection: Projection, changes: list[Change], last: int) -> None:
    """Project a batch that failed one change at a time, recording (and
    going past) each change that fails on its own."""
    for change in changes:
        error = change.error
        if error is None:
            try:
                await projection.project([change], change.position)
                continue
            except Exception as exc:
                if transient(exc):
                    raise
                error = describe(exc)
        event = change.event
        view = ProjectionErrorView(
            projection=projection.name,
            position=change.position,
            aggregate_id=change.aggregate_id or str(getattr(event, "originator_id", "")) or None,
            version=getattr(event, "originator_version", None),
            event_type=event_type(event) if event is not None else change.topic or None,
            error=error,
            recorded_at=datetime.now(UTC),
        )
        log.error(
            "projection %s skips the event at %d (%s %s): %s",
            projection.name,
            change.position,
            view.event_type,
            view.aggregate_id,
            error,
        )
        await anyio.to_thread.run_sync(projection.read_model.skip, projection.name, view)
    await projection.project([], last)
