"""The event store: eventsourcing on PostgreSQL or SQLite, chosen by URL."""

from __future__ import annotations

import contextlib
import fcntl
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import (
    IntegrityError,
    JSONTranscoder,
    Mapper,
    ProcessRecorder,
    StoredEvent,
    Tracking,
)
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresProcessRecorder
from eventsourcing.sqlite import SQLiteProcessRecorder
from psycopg.sql import SQL, Identifier

from domain.dead_letter import DeadLetter
from domain.endpoint import Endpoint
from domain.entitlement import Entitlement, Order, Payment
from domain.receipt import ReceiptResolution
from services.personal import (
    ERASURES,
    KEYS,
    Keyring,
    KeyTable,
    PersonalTranscoding,
    SealingMapper,
    owners,
)

A = TypeVar("A", Entitlement, Order, Payment, DeadLetter, ReceiptResolution, Endpoint)


#: The webhooks as received (their RawWebhookV1 JSON) by receipt id, written
#: in the transaction that folds them. Beside the events rather than in them:
#: carried in every receipt event, the bodies halved the fold's throughput.
WEBHOOKS = "entitle_webhooks"


class DatabaseURLError(ValueError):
    pass


class StillChanging(Exception):
    """Other writers kept saving the entitlement first; the caller may retry later."""


#: The PostgreSQL advisory lock held while tables are created (the store's
#: and the read model's), so processes starting together take turns.
CREATE_LOCK = 0x656E7469746C65  # "entitle"


def no_jit(connect: dict[str, Any]) -> None:
    """Turn PostgreSQL's JIT compiler off for the connections made with these
    psycopg keyword arguments (unless the URL chose `options` itself). The
    planner's row estimate for `originator_id = ANY(1,000 ids)` on a log of
    5 million events was 24 million, over the JIT threshold: compiling took
    49 of the query's 87 ms, on every cache miss of the fold (bench/scale.py,
    a million entitlements). No query here is long enough to gain from it."""
    connect.setdefault("options", "-c jit=off")


class PostgresRecorder(PostgresProcessRecorder):
    """eventsourcing's PostgreSQL process recorder, with two changes:

    - it also records `more_tracking` positions in the same transaction, so
      one consumer batch spanning several Kafka partitions is one transaction;
    - it inserts events as four parallel arrays sent in binary, instead of
      an array of composite values that psycopg escapes as text (a fifth of
      the fold's CPU at volume). The table lock and NOTIFY are kept as they are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._insert_arrays = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[])"
            " RETURNING notification_id"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
            id_type=SQL(self.datastore.originator_id_type),
        )

    def create_table(self) -> None:
        # Processes started together on an empty database would create the
        # same tables at once and collide in the catalog (pg_type): one at a
        # time, under a lock held on a connection of its own.
        with self.datastore.get_connection() as lock:
            lock.execute("SELECT pg_advisory_lock(%s)", (CREATE_LOCK,))
            try:
                if self._created(lock):
                    return
                super().create_table()
                with self.datastore.transaction(commit=True) as curs:
                    curs.execute(
                        SQL(
                            "CREATE TABLE IF NOT EXISTS {schema}.{table}"
                            " (receipt TEXT PRIMARY KEY, webhook BYTEA NOT NULL)"
                        ).format(
                            schema=Identifier(self.datastore.schema), table=Identifier(WEBHOOKS)
                        )
                    )
                    for statement in KeyTable.create_statements(postgres=True):
                        curs.execute(statement)
            finally:
                lock.execute("SELECT pg_advisory_unlock(%s)", (CREATE_LOCK,))
                lock.commit()

    def _created(self, conn: Any) -> bool:
        """Whether every table and index is there already. `CREATE … IF NOT
        EXISTS` locks the table before finding it there, so a process
        starting while the fold holds the events table (its insert's
        EXCLUSIVE lock) would wait for it, or deadlock with a longer one."""
        names = [
            self.events_table_name,
            f"{self.events_table_name}_notification_id_idx",
            self.tracking_table_name,
            WEBHOOKS,
            KEYS,
            ERASURES,
        ]
        schema = self.datastore.schema
        found = conn.execute(
            "SELECT count(to_regclass(%s || '.' || n)) AS found FROM unnest(%s::text[]) n",
            (schema, names),
        ).fetchone()
        conn.commit()
        return found is not None and found["found"] == len(names)

    def _insert_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> Any:
        for tracking in kwargs.get("more_tracking", ()):
            self._insert_tracking(curs, tracking=tracking)
        webhooks = kwargs.get("webhooks")
        if webhooks:
            curs.execute(
                SQL(
                    "INSERT INTO {schema}.{table} (receipt, webhook)"
                    " SELECT * FROM unnest(%b::text[], %b::bytea[]) ON CONFLICT DO NOTHING"
                ).format(schema=Identifier(self.datastore.schema), table=Identifier(WEBHOOKS)),
                ([r for r, _ in webhooks], [w for _, w in webhooks]),
                binary=True,
            )
        return super()._insert_events(curs, stored_events, **kwargs)

    def _insert_stored_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self._insert_arrays,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            binary=True,
        )


class SQLiteRecorder(SQLiteProcessRecorder):
    """As PostgresRecorder, on SQLite."""

    def create_table(self) -> None:
        # As on PostgreSQL, processes started together take turns: a lock
        # on a file beside the database (the tables' tracking of their own
        # migration collides otherwise).
        name = self.datastore.pool.db_name
        memory = ":memory:" in name or "mode=memory" in name
        with contextlib.ExitStack() as held:
            if not memory:
                lock = held.enter_context(open(f"{name}.create-lock", "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
            super().create_table()
            with self.datastore.transaction(commit=True) as c:
                c.execute(
                    f"CREATE TABLE IF NOT EXISTS {WEBHOOKS}"
                    " (receipt TEXT PRIMARY KEY, webhook BLOB NOT NULL)"
                )
                for statement in KeyTable.create_statements(postgres=False):
                    c.execute(statement)

    def _insert_events(self, c: Any, stored_events: Any, **kwargs: Any) -> Any:
        for tracking in kwargs.get("more_tracking", ()):
            self._insert_tracking(c, tracking)
        webhooks = kwargs.get("webhooks")
        if webhooks:
            c.executemany(
                f"INSERT OR IGNORE INTO {WEBHOOKS} (receipt, webhook) VALUES (?, ?)", webhooks
            )
        return super()._insert_events(c, stored_events, **kwargs)


def store_env(database_url: str) -> dict[str, str]:
    """eventsourcing's environment for a `sqlite:///path` or `postgresql://` URL."""
    url = urlsplit(database_url)
    if url.scheme == "sqlite":
        path = unquote(url.path[1:] if url.path.startswith("/") else url.path)
        if not path:
            raise DatabaseURLError("sqlite URL needs a path: sqlite:///relative or sqlite:////abs")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "PROCESS_RECORDER_TOPIC": "services.store:SQLiteRecorder",
            "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "10",
        }
    if url.scheme in ("postgresql", "postgres"):
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "PROCESS_RECORDER_TOPIC": "services.store:PostgresRecorder",
            "POSTGRES_DBNAME": unquote(url.path.lstrip("/")) or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            # Not POSTGRES_ENABLE_DB_FUNCTIONS: in eventsourcing 9.5 that path
            # drops the tracking record and skips the table lock that keeps
            # notification ids committing in order.
            "POSTGRES_POOL_SIZE": "4",
        }
    raise DatabaseURLError(
        f"unsupported database URL scheme {url.scheme!r}: use sqlite:///… or postgresql://…"
    )


class EntitlementStore(Application[UUID]):
    """Entitlements, orders and dead letters, with tracking of the Kafka
    positions they came from."""

    name = "entitle"

    def __init__(self, database_url: str) -> None:
        #: Where it is, for processes that open it too (`projections.parallel`).
        self.database_url = database_url
        super().__init__(env=store_env(database_url))

    def construct_recorder(self) -> ProcessRecorder:
        pool = getattr(getattr(self.factory, "datastore", None), "pool", None)
        connect = getattr(pool, "kwargs", None)  # PostgreSQL's (psycopg's pool)
        if isinstance(connect, dict):
            no_jit(connect)  # before its first connection
        recorder = self.factory.process_recorder()
        datastore: Any = getattr(recorder, "datastore", None)
        self.keyring.table = KeyTable(datastore, isinstance(recorder, PostgresRecorder))
        return recorder

    def construct_mapper(self) -> Mapper[UUID]:
        # Personal data are sealed under a key per customer (services/personal.py);
        # the keyring gets its table once the recorder exists.
        self.keyring = Keyring()
        transcoder = self.construct_transcoder()
        assert isinstance(transcoder, JSONTranscoder)
        transcoder.register(PersonalTranscoding(self.keyring))
        return SealingMapper(transcoder, self.keyring)

    @property
    def process_recorder(self) -> ProcessRecorder:
        recorder = self.recorder
        assert isinstance(recorder, ProcessRecorder)
        return recorder

    @property
    def notify_channel(self) -> str | None:
        """The PostgreSQL channel every insert into the log notifies (None on
        SQLite, which has no such thing)."""
        recorder = self.recorder
        return recorder.channel_name if isinstance(recorder, PostgresRecorder) else None

    def record(
        self,
        aggregates: Iterable[Aggregate],
        tracking: Tracking | Sequence[Tracking] | None,
        webhooks: Sequence[tuple[str, bytes]] = (),
    ) -> int:
        """Save the aggregates' new events, the tracking position(s) and the
        `webhooks` ((receipt id, RawWebhookV1 JSON) each) in one transaction;
        returns the number of events saved."""
        positions = [tracking] if isinstance(tracking, Tracking) else list(tracking or ())
        processing_event: ProcessingEvent[UUID] = ProcessingEvent(
            tracking=positions[0] if positions else None
        )
        # ProcessingEvent.collect_events checks two runtime-checkable
        # protocols per aggregate, a tenth of the fold's time at volume
        # (measured with cProfile); these are all Aggregates, so collect here.
        for aggregate in aggregates:
            if aggregate.pending_events:
                processing_event.events.extend(aggregate.collect_events())
                processing_event.aggregates[aggregate.id] = aggregate
        processing_event.saved_kwargs.update(more_tracking=positions[1:], webhooks=list(webhooks))
        if not processing_event.events and not positions:
            return 0
        # New customers' keys in one transaction before the events' own.
        self.keyring.prepare(e for event in processing_event.events for e in owners(vars(event)))
        self._record(processing_event)
        return len(processing_event.events)

    def change(
        self, entitlement_id: UUID, change: Callable[[Entitlement], None], attempts: int = 5
    ) -> Entitlement | None:
        """Load, change and save one entitlement; if another writer saved it
        first (optimistic concurrency), do it again on the new state. None if
        no entitlement has this id; what `change` raises propagates, nothing saved."""
        return self.update(entitlement_id, Entitlement, change, attempts)

    def update(
        self, aggregate_id: UUID, kind: type[A], change: Callable[[A], None], attempts: int = 5
    ) -> A | None:
        """`change` for any kind of aggregate; None if there is no `kind`
        with this id (also when the id is another kind's)."""
        for _ in range(attempts):
            try:
                aggregate = self.find(aggregate_id, kind)
            except TypeError:
                return None
            if aggregate is None:
                return None
            change(aggregate)
            try:
                self.record([aggregate], None)
            except IntegrityError:
                continue
            return aggregate
        raise StillChanging(f"{kind.__name__} {aggregate_id} kept changing")

    def position(self, name: str) -> int | None:
        return self.process_recorder.max_tracking_id(name)

    def webhook(self, receipt: str) -> bytes | None:
        """The webhook with receipt id `receipt`, as its RawWebhookV1 JSON;
        None also when it was sealed under the key of a customer since erased."""
        stored = self._stored_webhook(receipt)
        return self.keyring.open_bytes(stored) if stored is not None else None

    def _stored_webhook(self, receipt: str) -> bytes | None:
        recorder = self.recorder
        if isinstance(recorder, PostgresRecorder):
            statement = SQL("SELECT webhook FROM {schema}.{table} WHERE receipt = %s").format(
                schema=Identifier(recorder.datastore.schema), table=Identifier(WEBHOOKS)
            )
            with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
                cursor.execute(statement, (receipt,))
                row = cursor.fetchone()
            return bytes(row["webhook"]) if row else None
        assert isinstance(recorder, SQLiteRecorder)
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(f"SELECT webhook FROM {WEBHOOKS} WHERE receipt = ?", (receipt,))
            found = cursor.fetchone()
        return bytes(found[0]) if found else None

    def positions(self, prefix: str) -> dict[str, int]:
        """Every tracking position whose name starts with `prefix`."""
        recorder = self.recorder
        if isinstance(recorder, PostgresRecorder):
            statement = SQL(
                "SELECT application_name, max(notification_id) FROM {schema}.{table}"
                " WHERE starts_with(application_name, %s) GROUP BY application_name"
            ).format(
                schema=Identifier(recorder.datastore.schema),
                table=Identifier(recorder.tracking_table_name),
            )
            with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
                cursor.execute(statement, (prefix,))
                rows = cursor.fetchall()
            return {row["application_name"]: row["max"] for row in rows}
        assert isinstance(recorder, SQLiteRecorder)
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                "SELECT application_name, max(notification_id) FROM tracking"
                " WHERE substr(application_name, 1, ?) = ? GROUP BY application_name",
                (len(prefix), prefix),
            )
            return {row[0]: row[1] for row in cursor.fetchall()}

    def forget_positions(self, names: Sequence[str]) -> None:
        """Delete the tracking positions `names` (of a log that is gone)."""
        recorder = self.recorder
        if isinstance(recorder, PostgresRecorder):
            statement = SQL("DELETE FROM {schema}.{table} WHERE application_name = ANY(%b)").format(
                schema=Identifier(recorder.datastore.schema),
                table=Identifier(recorder.tracking_table_name),
            )
            with recorder.datastore.transaction(commit=True) as cursor:
                cursor.execute(statement, (list(names),))
            return
        assert isinstance(recorder, SQLiteRecorder)
        with recorder.datastore.transaction(commit=True) as cursor:
            cursor.executemany(
                "DELETE FROM tracking WHERE application_name = ?", [(n,) for n in names]
            )

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None:
        try:
            aggregate: Any = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        if not isinstance(aggregate, kind):
            raise TypeError(f"{aggregate_id} is a {type(aggregate).__name__}, not {kind.__name__}")
        return aggregate

    def entitlement(self, aggregate_id: UUID) -> Entitlement | None:
        """The entitlement with this id; None if there is none, also when the
        id is another aggregate's (an order's, from a URL): unlike `find`,
        for ids a client chose."""
        aggregate: Any
        try:
            aggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, Entitlement) else None

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, Aggregate]:
        """Current state of many aggregates in one query (those that exist),
        instead of one repository read each: the fold's main cost otherwise."""
        loaded: dict[UUID, Aggregate] = {}
        aggregate: Any = None
        rows = self._event_rows(aggregate_ids)
        for row in rows:
            stored = StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
            event: Any = self.mapper.to_domain_event(stored)
            if event.originator_version == 1:
                aggregate = None
            aggregate = event.mutate(aggregate)
            loaded[aggregate.id] = aggregate
        return loaded

    def versions(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, int]:
        """The current version of each of these aggregates that exists."""
        rows = self._event_rows(aggregate_ids, latest=True)
        return {row["originator_id"]: row["originator_version"] for row in rows}

    def _event_rows(self, aggregate_ids: Iterable[UUID], latest: bool = False) -> list[Any]:
        """The events of these aggregates, grouped by aggregate in ascending
        version (`originator_id, originator_version, topic, state` rows), or
        given `latest` only each one's last version (`originator_id,
        originator_version`); on either database, 1,000 ids a query; ids come
        back as UUIDs."""
        ids = list(dict.fromkeys(aggregate_ids))
        recorder: Any = self.recorder
        table = recorder.events_table_name
        rows: list[Any] = []
        if isinstance(recorder, PostgresAggregateRecorder):
            # One index probe per id, whatever the planner knows of the table.
            # `originator_id = ANY(ids)` left the plan to the statistics: with
            # none (autovacuum off, or before its first analyze) the fold's
            # cache check was a parallel scan of the whole log on every batch,
            # 26 ms at 120k events and growing with them; probed, 3-7 ms for
            # 1,000 ids either way. Whole histories are then sorted by id and
            # version, a sort of what they hold (tens of ms for 12,000 events).
            inner = (
                "SELECT originator_version FROM {schema}.{table}"
                " WHERE originator_id = wanted.id ORDER BY originator_version DESC LIMIT 1"
                if latest
                else "SELECT originator_version, topic, state FROM {schema}.{table}"
                " WHERE originator_id = wanted.id ORDER BY originator_version"
            )
            # The order the callers fold in, said rather than left to the plan.
            order = "" if latest else " ORDER BY 1, 2"
            statement = SQL(
                f"SELECT wanted.id AS originator_id, e.* FROM unnest(%s::uuid[]) AS wanted(id)"
                f" CROSS JOIN LATERAL ({inner}) AS e{order}"
            ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(table))
        else:
            columns, tail = (
                ("originator_id, max(originator_version) AS originator_version", "GROUP BY 1")
                if latest
                else (
                    "originator_id, originator_version, topic, state",
                    "ORDER BY originator_id, originator_version",
                )
            )
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            if isinstance(recorder, PostgresAggregateRecorder):
                # One array literal: psycopg dumps a list of UUIDs one by one, slowly.
                literal = "{" + ",".join(str(i) for i in chunk) + "}"
                with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
                    cursor.execute(statement, (literal,))
                    rows += cursor.fetchall()
            else:
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {columns} FROM {table} WHERE originator_id IN ({marks}) {tail}"
                with recorder.datastore.transaction(commit=False) as cursor:
                    cursor.execute(query, [i.hex for i in chunk])
                    rows += [
                        {**dict(row), "originator_id": recorder.convert_originator_id(row[0])}
                        for row in cursor.fetchall()
                    ]
        return rows

    def aggregates_at(self, versions: Mapping[UUID, int]) -> dict[UUID, Aggregate]:
        """Each aggregate folded up to the version given for it (`aggregate_at`
        for many, in few queries); those that do not reach it are left out."""
        loaded: dict[UUID, Aggregate] = {}
        aggregate: Any = None
        rows = self._event_rows(versions)
        for row in rows:
            aggregate_id, version = row["originator_id"], row["originator_version"]
            if version > versions[aggregate_id]:
                continue
            stored = StoredEvent(
                originator_id=aggregate_id,
                originator_version=version,
                topic=row["topic"],
                state=bytes(row["state"]),
            )
            event: Any = self.mapper.to_domain_event(stored)
            aggregate = event.mutate(None if version == 1 else aggregate)
            if version == versions[aggregate_id]:
                loaded[aggregate_id] = aggregate
        return loaded

    def history(self, aggregate_id: UUID) -> list[DomainEventProtocol[UUID]]:
        return list(self.events.get(aggregate_id))

    def aggregate_at(self, aggregate_id: UUID, version: int) -> Any:
        return self.repository.get(aggregate_id, version=version)

    def entitlement_as_of(
        self, aggregate_id: UUID, *, at: datetime | None = None, version: int | None = None
    ) -> Entitlement | None:
        """The entitlement as its stored events left it: those recorded at or
        before `at` (a timezone-aware time, compared with each event's
        recorded time), or those up to `version`; the current state when
        neither is given. None if it had no event by then (`at` before its
        creation), has no such version (below 1 or beyond the last), or
        `aggregate_id` is no entitlement's. ValueError for both arguments,
        or a naive `at`.

        One query (events ordered by version, up to `version` if given);
        events after `at` are not decoded. An entitlement's events are
        recorded in version order by one clock each, so the first one
        after `at` ends the fold."""
        if at is not None and version is not None:
            raise ValueError("give a time or a version, not both")
        if at is not None and at.utcoffset() is None:
            raise ValueError("the time needs a UTC offset")
        if version is not None and version < 1:
            return None
        aggregate: Any = None
        event: Any
        for event in self.events.get(aggregate_id, lte=version):
            if aggregate is None and not isinstance(event, Entitlement.Created):
                return None  # an order's, a payment's…: no entitlement
            if at is not None and event.timestamp > at:
                break
            aggregate = event.mutate(aggregate)
        if aggregate is None or (version is not None and aggregate.version != version):
            return None
        assert isinstance(aggregate, Entitlement)
        return aggregate


class AggregateCache:
    """Recently used aggregates, kept between batches (least recently used
    go first). An entry is only a candidate: `Batch.prefetch` checks its
    version against the store before using it, so another writer's change
    (a rebalance, the scheduler, an admin action) is never missed."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._items: OrderedDict[UUID, Aggregate] = OrderedDict()
        self._generation: int | None = None

    def check(self, generation: int) -> None:
        """Empty the cache when the store's erasure count is not the one
        its entries were decrypted under (see services/personal.py)."""
        if generation != self._generation:
            self._items.clear()
            self._generation = generation

    def get(self, aggregate_id: UUID) -> Aggregate | None:
        return self._items.get(aggregate_id)

    def put(self, aggregates: Iterable[Aggregate]) -> None:
        if self.size <= 0:
            return
        for aggregate in aggregates:
            # Orders and entitlements come back with each webhook; a payment
            # record rarely does, and would only push them out.
            if not isinstance(aggregate, (Entitlement, Order)):
                continue
            self._items[aggregate.id] = aggregate
            self._items.move_to_end(aggregate.id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def evict(self, aggregate_ids: Iterable[UUID]) -> None:
        for aggregate_id in aggregate_ids:
            self._items.pop(aggregate_id, None)


class Batch:
    """The aggregates one transaction touches: each is loaded once, changed
    by any number of commands, and saved together with the tracking records.

    With a cache, aggregates come from it when still current; after the
    transaction, call `done(saved)` so the cache gets the new state, or
    loses every aggregate a failed attempt changed in memory."""

    def __init__(self, store: EntitlementStore, cache: AggregateCache | None = None) -> None:
        self._store = store
        self._cache = cache
        self._aggregates: dict[UUID, Aggregate] = {}
        self._absent: set[UUID] = set()

    def prefetch(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, Aggregate]:
        """Load these aggregates in few queries; remember which do not exist,
        so finding them costs nothing. Returns those newly available."""
        wanted = {i for i in aggregate_ids if i not in self._aggregates and i not in self._absent}
        if not wanted:
            return {}
        available: dict[UUID, Aggregate] = {}
        if self._cache is not None:
            # An erasure anywhere: what the cache holds was decrypted before it.
            self._cache.check(self._store.keyring.generation())
            cached = {i: a for i in wanted if (a := self._cache.get(i)) is not None}
            if cached:
                current = self._store.versions(cached)
                for aggregate_id, aggregate in cached.items():
                    if current.get(aggregate_id) == aggregate.version:
                        available[aggregate_id] = aggregate
                self._cache.evict(set(cached) - set(available))
        missing = wanted - set(available)
        if missing:
            available.update(self._store.load_many(missing))
        self._aggregates.update(available)
        self._absent |= wanted - set(available)
        return available

    def done(self, saved: bool) -> None:
        if self._cache is None:
            return
        if saved:
            self._cache.put(self._aggregates.values())
        else:
            self._cache.evict(self._aggregates)

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None:
        found = self._aggregates.get(aggregate_id)
        if found is None and aggregate_id not in self._absent:
            found = self._store.find(aggregate_id, kind)
            if found is not None:
                self._aggregates[aggregate_id] = found
        if found is not None and not isinstance(found, kind):
            raise TypeError(f"{aggregate_id} is a {type(found).__name__}, not {kind.__name__}")
        return found

    def add(self, aggregate: Aggregate) -> None:
        self._aggregates[aggregate.id] = aggregate
        self._absent.discard(aggregate.id)

    def __iter__(self) -> Iterator[Aggregate]:
        return iter(self._aggregates.values())
