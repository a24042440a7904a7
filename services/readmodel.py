"""The read model behind the API: tables projected from the event store.

The same SQL runs on SQLite and PostgreSQL; each write commits together with
the projection's position, so the tables are always exactly the fold of the
event log up to that position, and can be dropped and rebuilt at any time.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import ValidationError

from contracts.api import DeadLetterView, EntitlementView, ProjectionErrorView, ReceiptView
from services.store import CREATE_LOCK, no_jit

_TABLES = [
    """CREATE TABLE IF NOT EXISTS entitle_v4_entitlements (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        order_ref TEXT NOT NULL,
        offering TEXT NOT NULL,
        status TEXT NOT NULL,
        customer_email TEXT,
        sequence INTEGER NOT NULL,
        due_at TEXT,
        product TEXT NOT NULL,
        customer_id TEXT,
        updated_at TEXT NOT NULL,
        body TEXT NOT NULL,
        -- The log position of the batch that last wrote the row: readers that
        -- keep a copy (the validation index) fetch only what changed.
        position BIGINT NOT NULL
    )""",
    # (position, id): the validation index pages through the table by both
    # (`changed`); on position alone, each page scanned from the start.
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_position_id"
    " ON entitle_v4_entitlements (position, id)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_due ON entitle_v4_entitlements (due_at)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_order ON entitle_v4_entitlements (order_ref)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_email ON entitle_v4_entitlements (customer_email)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_status ON entitle_v4_entitlements (status)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_customer ON entitle_v4_entitlements (customer_id)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_ent_updated ON entitle_v4_entitlements (updated_at)",
    """CREATE TABLE IF NOT EXISTS entitle_v4_dead_letters (
        id TEXT PRIMARY KEY,
        recorded_at TEXT NOT NULL,
        resolved INTEGER NOT NULL DEFAULT 0,
        body TEXT NOT NULL
    )""",
    # Activation code hash -> entitlement: the licensing API's lookup.
    """CREATE TABLE IF NOT EXISTS entitle_v4_codes (
        code_hash TEXT PRIMARY KEY,
        entitlement_id TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entitle_v4_codes_ent ON entitle_v4_codes (entitlement_id)",
    # One row per accepted webhook: its outcome (the body is its ReceiptView
    # without the webhook itself, which the event store keeps).
    """CREATE TABLE IF NOT EXISTS entitle_v4_receipts (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        provider_event_id TEXT NOT NULL,
        order_ref TEXT NOT NULL,
        outcome TEXT NOT NULL,
        received_at TEXT NOT NULL,
        waiting INTEGER NOT NULL DEFAULT 0,
        waits_on TEXT,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entitle_v4_rec_received ON entitle_v4_receipts (received_at, id)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_rec_event"
    " ON entitle_v4_receipts (source, provider_event_id)",
    "CREATE INDEX IF NOT EXISTS entitle_v4_rec_waiting"
    " ON entitle_v4_receipts (waiting, received_at)",
    # Stored events a projection could not project (it went on without them).
    """CREATE TABLE IF NOT EXISTS entitle_projection_errors (
        projection TEXT NOT NULL,
        position BIGINT NOT NULL,
        aggregate_id TEXT,
        version INTEGER,
        event_type TEXT,
        error TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (projection, position)
    )""",
    """CREATE TABLE IF NOT EXISTS entitle_read_positions (
        name TEXT PRIMARY KEY,
        position BIGINT NOT NULL
    )""",
]


def _created(statement: str) -> str:
    """The name of the table or index a `CREATE … IF NOT EXISTS name` makes."""
    return statement.split("IF NOT EXISTS", 1)[1].split()[0]


_DROP = [
    # Earlier versions' tables (a new version is rebuilt by the projector).
    "DROP TABLE IF EXISTS entitle_v3_receipts",
    "DROP TABLE IF EXISTS entitle_v3_entitlements",
    "DROP TABLE IF EXISTS entitle_v3_dead_letters",
    "DROP TABLE IF EXISTS entitle_v3_codes",
    "DROP TABLE IF EXISTS entitle_v4_receipts",
    "DROP TABLE IF EXISTS entitle_v4_entitlements",
    "DROP TABLE IF EXISTS entitle_v4_dead_letters",
    "DROP TABLE IF EXISTS entitle_v4_codes",
]

#: The list's filters that match a column exactly (customer_email ignoring case).
FILTERS = ("order_ref", "customer_email", "customer_id", "product", "offering", "status", "source")
RECEIPT_FILTERS = ("source", "outcome", "order_ref")


@dataclass(frozen=True)
class Resolution:
    """A parked webhook's end (`ReceiptResolution.Resolved`)."""

    receipt: str
    outcome: str
    detail: str | None
    entitlement_ids: list[str]
    event_types: list[str]
    at: datetime


@dataclass(frozen=True)
class Delivered:
    """A provider fact that waited, delivered to its entitlements at `at`."""

    source: str
    event_id: str
    at: datetime
    #: The entitlements it reached, and the events it gave them.
    entitlement_ids: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()


def _equal(
    filters: Mapping[str, str | None], allowed: Sequence[str]
) -> tuple[list[str], list[str | None]]:
    """`column = ?` clauses and their parameters for the filters given."""
    clauses: list[str] = []
    params: list[str | None] = []
    for key, value in filters.items():
        if key not in allowed:
            raise ValueError(f"unknown filter {key!r}")
        if value is not None:
            clauses.append(f"{key} = ?")
            params.append(value)
    return clauses, params


def moment(value: datetime | None) -> str | None:
    """A fixed-width UTC timestamp, so text comparison is time comparison on
    both databases."""
    if value is None:
        return None
    # isoformat, not strftime: a third of the time, on every receipt and
    # entitlement written (measured, bench/replay.py); the same text for
    # years 1000-9999.
    return value.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"


#: The columns of entitle_v4_entitlements besides id, body and position,
#: in the order `entitlement_columns` gives them: what its filters and the
#: scheduler query, so `entitle audit verify` compares each with the fold.
ENTITLEMENT_COLUMNS = (
    "source",
    "order_ref",
    "offering",
    "status",
    "customer_email",
    "sequence",
    "due_at",
    "product",
    "customer_id",
    "updated_at",
)


def entitlement_columns(view: EntitlementView) -> tuple[Any, ...]:
    """The values of ENTITLEMENT_COLUMNS for `view`, as they are stored."""
    return (
        view.source,
        view.order_ref,
        view.offering,
        view.status,
        # Lower-case: the list's customer_email filter ignores case.
        view.customer.email.lower() if view.customer.email else None,
        view.sequence,
        moment(view.due_at),
        view.product,
        view.customer.id,
        moment(view.updated_at),
    )


@dataclass
class Rows:
    """Rows as `ReadModel.write` stores them: plain tuples, which a fold
    process makes and hands over cheaply (pickling the views was a fifth of
    a replay's CPU time, measured with bench/replay.py)."""

    #: (id, *ENTITLEMENT_COLUMNS, body) of each entitlement (`entitlement_row`).
    entitlements: list[tuple[Any, ...]] = field(default_factory=list)
    #: (code hash, entitlement id) of the active codes of those entitlements.
    codes: list[tuple[str, str]] = field(default_factory=list)
    #: `letter_row` of each dead letter.
    letters: list[tuple[Any, ...]] = field(default_factory=list)
    #: `receipt_row` of each new receipt, in log order.
    receipts: list[tuple[Any, ...]] = field(default_factory=list)


def entitlement_row(view: EntitlementView) -> tuple[Any, ...]:
    """(id, *ENTITLEMENT_COLUMNS, body JSON) of an entitlement."""
    return (str(view.id), *entitlement_columns(view), view.model_dump_json())


def letter_row(letter: DeadLetterView) -> tuple[Any, ...]:
    """(id, recorded at, resolved 0/1, body JSON) of a dead letter."""
    return (
        str(letter.id),
        letter.recorded_at.isoformat(),
        int(letter.resolved_at is not None),
        letter.model_dump_json(),
    )


def receipt_row(view: ReceiptView, waits_on: Sequence[str]) -> tuple[Any, ...]:
    """(id, source, provider event id, order ref, outcome, received at,
    waiting 0/1, what it waits on or None, body JSON without the webhook)
    of a new receipt that waits on `waits_on` (if parked)."""
    return (
        view.id,
        view.source,
        view.provider_event_id,
        view.order_ref,
        view.outcome,
        moment(view.received_at),
        int(view.waits_for is not None),
        ",".join(waits_on) or None,
        view.model_dump_json(exclude={"webhook"}),
    )


def resolved(view: ReceiptView, resolution: Resolution) -> tuple[ReceiptView, bool]:
    """A parked receipt after what resolved it, and whether it still waits
    (a dead letter for waiting too long does: see `delivered`)."""
    view = view.model_copy()
    view.outcome = resolution.outcome  # type: ignore[assignment]
    view.detail, view.resolved_at = resolution.detail, resolution.at
    view.entitlement_ids = resolution.entitlement_ids or view.entitlement_ids
    view.event_types = resolution.event_types or view.event_types
    waiting = resolution.outcome == "dead_letter" and view.waits_for is not None
    if not waiting:
        view.waits_for = None
    return view, waiting


def delivered(view: ReceiptView, fact: Delivered) -> ReceiptView:
    """A waiting receipt once the fact it waited for reached its entitlements."""
    view = view.model_copy()
    view.outcome, view.waits_for, view.resolved_at = "applied", None, fact.at
    view.detail = "applied when what it waited for arrived"
    view.entitlement_ids = list(fact.entitlement_ids)
    view.event_types = list(fact.event_types)
    return view


class UnreadableRow(Exception):
    """A read-model row that does not parse (changed by hand, a bad
    restore): the caller reads the entitlement from the store instead."""

    def __init__(self, entitlement_id: str) -> None:
        super().__init__(f"the read model's row of entitlement {entitlement_id} is unreadable")
        self.entitlement_id = entitlement_id


class ReadModel:
    def __init__(self, database_url: str) -> None:
        url = urlsplit(database_url)
        self._postgres = url.scheme in ("postgresql", "postgres")
        self._url = database_url
        self._local = threading.local()
        if not self._postgres:
            path = url.path[1:] if url.path.startswith("/") else url.path
            self._sqlite_path = path
        else:
            from psycopg.conninfo import conninfo_to_dict
            from psycopg_pool import ConnectionPool

            # A request waits at most 5 s for a connection: during a database
            # outage the API answers 503 soon rather than hanging for 30 s.
            connect: dict[str, Any] = {}
            if "options" not in conninfo_to_dict(database_url):
                no_jit(connect)  # as the store's (services/store.py)
            self._pool = ConnectionPool(
                database_url, kwargs=connect, min_size=1, max_size=8, open=True, timeout=5
            )
        self.create()

    def close(self) -> None:
        if self._postgres:
            self._pool.close()

    # -- plumbing ----------------------------------------------------------

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self._postgres else statement

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        if self._postgres:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
            return
        local: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if local is None:
            local = sqlite3.connect(self._sqlite_path, timeout=30, isolation_level=None)
            local.execute("PRAGMA journal_mode=WAL")
            local.execute("PRAGMA busy_timeout=30000")
            # Personal data change in place here (an erasure): zero what is
            # deleted or overwritten, so it does not linger in free pages.
            local.execute("PRAGMA secure_delete=ON")
            self._local.conn = local
        # Readers must not take SQLite's write lock; writers take it up front.
        local.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield local.cursor()
        except BaseException:
            local.execute("ROLLBACK")
            raise
        local.execute("COMMIT")

    # Other tables in the same database (the outbox) share the plumbing.
    def sql(self, statement: str) -> str:
        """`statement` with `?` placeholders turned into the database's."""
        return self._sql(statement)

    def transaction(self, write: bool = True) -> Any:
        """A cursor in one transaction (a context manager)."""
        return self._transaction(write)

    @property
    def postgres(self) -> bool:
        return self._postgres

    @property
    def url(self) -> str:
        return self._url

    @property
    def sqlite_path(self) -> str:
        """The SQLite database's file (SQLite only)."""
        return self._sqlite_path

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql(statement), params)
            return list(cur.fetchall())

    def create(self) -> None:
        with self._transaction() as cur:
            statements = _TABLES
            if self._postgres:  # as the store's tables: one process at a time
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
                # Only what is missing: `CREATE INDEX IF NOT EXISTS` locks its
                # table before it finds the index there, and a process starting
                # beside a projector writing those tables deadlocked with it.
                names = [_created(s) for s in _TABLES]
                cur.execute("SELECT n, to_regclass(n) IS NULL FROM unnest(%s::text[]) n", (names,))
                missing = {name for name, absent in cur.fetchall() if absent}
                statements = [s for s in _TABLES if _created(s) in missing]
            for statement in statements:
                cur.execute(statement)

    def reset(self, name: str) -> None:
        """Drop the projected tables and projection `name`'s position, so the
        projector rebuilds them from zero. Other positions (the public event
        publisher's) are kept: a rebuild must not re-publish history."""
        with self._transaction() as cur:
            for statement in _DROP:
                cur.execute(statement)
            for statement in _TABLES:
                cur.execute(statement)
            cur.execute(self._sql("DELETE FROM entitle_read_positions WHERE name = ?"), (name,))
            cur.execute(
                self._sql("DELETE FROM entitle_projection_errors WHERE projection = ?"), (name,)
            )

    # -- writes --------------------------------------------------------------

    def rewind(self, name: str) -> None:
        """Send projection `name` back to the first event (its tables kept)."""
        with self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM entitle_read_positions WHERE name = ?"), (name,))

    def position(self, name: str) -> int:
        with self._transaction(write=False) as cur:
            return self.read_position(cur, name)

    def read_position(self, cur: Any, name: str) -> int:
        """Projection `name`'s saved position, in the transaction of `cur`
        (0 if it has none)."""
        statement = "SELECT position FROM entitle_read_positions WHERE name = ?"
        cur.execute(self._sql(statement), (name,))
        row = cur.fetchone()
        return int(row[0]) if row else 0

    def save_position(self, cur: Any, name: str, position: int) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO entitle_read_positions (name, position) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
            ),
            (name, position),
        )

    def apply(
        self,
        name: str,
        position: int,
        entitlements: Sequence[EntitlementView],
        dead_letters: Sequence[DeadLetterView],
        codes: Mapping[UUID, Sequence[str]] | None = None,
        receipts: Sequence[tuple[ReceiptView, Sequence[str]]] = (),
        delivered: Sequence[Delivered] = (),
        resolutions: Sequence[Resolution] = (),
    ) -> None:
        """Upsert rows and advance the projection's position, atomically.
        `receipts`: new receipts, each with what it waits on (if parked);
        `delivered`: facts that waited and reached their entitlements now;
        `resolutions`: parked webhooks' ends."""
        codes = codes or {}
        rows = Rows(
            [entitlement_row(view) for view in entitlements],
            [(code, str(view.id)) for view in entitlements for code in codes.get(view.id, ())],
            [letter_row(letter) for letter in dead_letters],
            [receipt_row(view, waits_on) for view, waits_on in receipts],
        )
        with self._transaction() as cur:
            self.write(cur, rows, position)
            self.settle(cur, resolutions, delivered)
            self.save_position(cur, name, position)

    def write(self, cur: Any, rows: Rows, position: int) -> None:
        """Insert new receipts and upsert entitlements (with their codes)
        and dead letters, in the transaction of `cur`; `position` is the
        log position the entitlements are written at."""
        if rows.receipts:
            # The first receipt of a webhook stands: a log read again
            # (once, after an upgrade) must not turn "applied" into
            # "duplicate".
            cur.executemany(
                self._sql(
                    "INSERT INTO entitle_v4_receipts (id, source, provider_event_id,"
                    " order_ref, outcome, received_at, waiting, waits_on, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                ),
                rows.receipts,
            )
        # One statement for many rows (executemany): per-row statements
        # were most of a replay's writing time (measured, bench/replay.py).
        if rows.entitlements:
            # Codes are few per entitlement: replace them outright.
            cur.executemany(
                self._sql("DELETE FROM entitle_v4_codes WHERE entitlement_id = ?"),
                [(row[0],) for row in rows.entitlements],
            )
            if rows.codes:
                cur.executemany(
                    self._sql(
                        "INSERT INTO entitle_v4_codes (code_hash, entitlement_id) VALUES (?, ?)"
                    ),
                    rows.codes,
                )
            cur.executemany(
                self._sql(
                    "INSERT INTO entitle_v4_entitlements "
                    "(id, source, order_ref, offering, status, customer_email, sequence, "
                    "due_at, product, customer_id, updated_at, body, position)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET "
                    "status = excluded.status, customer_email = excluded.customer_email, "
                    "offering = excluded.offering, sequence = excluded.sequence, "
                    "due_at = excluded.due_at, product = excluded.product, "
                    "customer_id = excluded.customer_id, updated_at = excluded.updated_at, "
                    "body = excluded.body, position = excluded.position"
                ),
                [(*row, position) for row in rows.entitlements],
            )
        if rows.letters:
            cur.executemany(
                self._sql(
                    "INSERT INTO entitle_v4_dead_letters (id, recorded_at, resolved, body) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "resolved = excluded.resolved, body = excluded.body"
                ),
                rows.letters,
            )

    def settle(
        self, cur: Any, resolutions: Sequence[Resolution], delivered: Sequence[Delivered]
    ) -> None:
        """Apply parked webhooks' ends, then the facts delivered, to the
        receipts written (in the transaction of `cur`)."""
        for resolution in resolutions:
            self._resolve(cur, resolution)
        for fact in delivered:
            self._deliver(cur, fact)

    def _resolve(self, cur: Any, resolution: Resolution) -> None:
        cur.execute(
            self._sql("SELECT body FROM entitle_v4_receipts WHERE id = ?"), (resolution.receipt,)
        )
        row = cur.fetchone()
        if row is None:
            return
        view, waiting = resolved(ReceiptView.model_validate_json(row[0]), resolution)
        cur.execute(
            self._sql(
                "UPDATE entitle_v4_receipts SET outcome = ?, waiting = ?, body = ? WHERE id = ?"
            ),
            (view.outcome, int(waiting), view.model_dump_json(exclude={"webhook"}), view.id),
        )

    def _deliver(self, cur: Any, fact: Delivered) -> None:
        """Receipts of a fact that waited (parked, or dead-lettered after
        waiting too long) become applied once it reaches its entitlements."""
        cur.execute(
            self._sql(
                "SELECT id, body FROM entitle_v4_receipts"
                " WHERE source = ? AND provider_event_id = ? AND waiting = 1"
            ),
            (fact.source, fact.event_id),
        )
        for receipt_id, body in cur.fetchall():
            view = delivered(ReceiptView.model_validate_json(body), fact)
            cur.execute(
                self._sql(
                    "UPDATE entitle_v4_receipts SET outcome = 'applied', waiting = 0, body = ?"
                    " WHERE id = ?"
                ),
                (view.model_dump_json(exclude={"webhook"}), receipt_id),
            )

    def set_position(self, name: str, position: int) -> None:
        with self._transaction() as cur:
            self.save_position(cur, name, position)

    def skip(self, name: str, error: ProjectionErrorView) -> None:
        """Record that projection `name` could not project the event at
        `error.position`, and move its position there, atomically."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO entitle_projection_errors (projection, position, aggregate_id,"
                    " version, event_type, error, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (projection, position) DO UPDATE SET error = excluded.error"
                ),
                (
                    name,
                    error.position,
                    error.aggregate_id,
                    error.version,
                    error.event_type,
                    error.error,
                    moment(error.recorded_at),
                ),
            )
            self.save_position(cur, name, error.position)

    def projection_errors(self, limit: int = 100) -> list[ProjectionErrorView]:
        rows = self._query(
            "SELECT projection, position, aggregate_id, version, event_type, error, recorded_at"
            f" FROM entitle_projection_errors ORDER BY recorded_at DESC LIMIT {int(limit)}"
        )
        return [
            ProjectionErrorView(
                projection=row[0],
                position=row[1],
                aggregate_id=row[2],
                version=row[3],
                event_type=row[4],
                error=row[5],
                recorded_at=datetime.fromisoformat(row[6].replace("Z", "+00:00")),
            )
            for row in rows
        ]

    def count_projection_errors(self) -> int:
        return int(self._query("SELECT count(*) FROM entitle_projection_errors")[0][0])

    def receipts(
        self,
        limit: int = 100,
        cursor: tuple[str, str] | None = None,
        since: datetime | None = None,
        **filters: str | None,
    ) -> tuple[list[ReceiptView], tuple[str, str] | None]:
        """Receipts, newest first, filtered by `source`, `outcome` and
        `order_ref`, received at or after `since`; and the cursor (received
        time, id) after the last one when there may be more."""
        clauses, params = _equal(filters, RECEIPT_FILTERS)
        if since is not None:
            clauses.append("received_at >= ?")
            params.append(moment(since))
        if cursor is not None:
            clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
            params += [cursor[0], cursor[0], cursor[1]]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(
            f"SELECT received_at, id, body FROM entitle_v4_receipts{where}"
            f" ORDER BY received_at DESC, id DESC LIMIT {int(limit) + 1}",
            params,
        )
        views = [ReceiptView.model_validate_json(row[2]) for row in rows[:limit]]
        more = len(rows) > limit
        return views, ((rows[limit - 1][0], rows[limit - 1][1]) if more and limit else None)

    def seen_events(self, source: str, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` (a few hundred at most) have a receipt from `source`."""
        if not event_ids:
            return set()
        marks = ", ".join("?" for _ in event_ids)
        rows = self._query(
            "SELECT provider_event_id FROM entitle_v4_receipts"
            f" WHERE source = ? AND provider_event_id IN ({marks})",
            [source, *event_ids],
        )
        return {row[0] for row in rows}

    def receipts_of(self, source: str, event_ids: Sequence[str]) -> list[ReceiptView]:
        """Every receipt from `source` of these provider events, oldest first
        (a redelivered event has several)."""
        found: list[tuple[Any, ...]] = []
        ids = list(dict.fromkeys(event_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            found += self._query(
                "SELECT received_at, id, body FROM entitle_v4_receipts"
                f" WHERE source = ? AND provider_event_id IN ({marks})",
                [source, *chunk],
            )
        return [ReceiptView.model_validate_json(body) for _, _, body in sorted(found)]

    def receipt(self, receipt_id: str) -> ReceiptView | None:
        rows = self._query("SELECT body FROM entitle_v4_receipts WHERE id = ?", (receipt_id,))
        return ReceiptView.model_validate_json(rows[0][0]) if rows else None

    def waiting_since(
        self, before: datetime, limit: int = 500
    ) -> list[tuple[ReceiptView, list[str]]]:
        """Parked receipts received before `before`, oldest first, each with
        what it waits on."""
        rows = self._query(
            "SELECT body, waits_on FROM entitle_v4_receipts WHERE waiting = 1"
            " AND outcome = 'parked'"
            f" AND received_at < ? ORDER BY received_at LIMIT {int(limit)}",
            (moment(before),),
        )
        return [
            (ReceiptView.model_validate_json(body), waits_on.split(",") if waits_on else [])
            for body, waits_on in rows
        ]

    def parked(self) -> int:
        """Webhooks parked now (each waits for something named in its receipt)."""
        rows = self._query(
            "SELECT count(*) FROM entitle_v4_receipts WHERE waiting = 1 AND outcome = 'parked'"
        )
        return int(rows[0][0])

    def status_counts(self) -> dict[str, int]:
        """How many entitlements are in each status now."""
        rows = self._query("SELECT status, count(*) FROM entitle_v4_entitlements GROUP BY status")
        return {str(status): int(n) for status, n in rows}

    def unresolved_letters(self, ids: Sequence[str]) -> list[str]:
        """Those of `ids` that are dead letters not resolved yet."""
        if not ids:
            return []
        rows = self._query(
            "SELECT id FROM entitle_v4_dead_letters WHERE resolved = 0"
            f" AND id IN ({', '.join('?' * len(ids))})",
            list(ids),
        )
        return [str(row[0]) for row in rows]

    def unresolved_letter_count(self) -> int:
        """Dead letters not resolved yet."""
        rows = self._query("SELECT count(*) FROM entitle_v4_dead_letters WHERE resolved = 0")
        return int(rows[0][0])

    def webhooks_per_hour(self, since: datetime) -> dict[str, int]:
        """Receipts received at or after `since`, counted per UTC hour
        ("YYYY-MM-DDTHH", received_at's first 13 characters: see `moment`)."""
        rows = self._query(
            "SELECT substr(received_at, 1, 13) AS hour, count(*) FROM entitle_v4_receipts"
            " WHERE received_at >= ? GROUP BY substr(received_at, 1, 13)",
            (moment(since),),
        )
        return {str(hour): int(n) for hour, n in rows}

    def positions(self) -> dict[str, int]:
        """Each projection's position in the notification log."""
        return {
            name: int(p)
            for name, p in self._query("SELECT name, position FROM entitle_read_positions")
        }

    def ping(self) -> None:
        """Raises unless the database answers."""
        self._query("SELECT 1")

    # -- reads ---------------------------------------------------------------

    def entitlements(self, limit: int = 100, **filters: str | None) -> list[EntitlementView]:
        return self.entitlement_page(limit, filters=filters)[0]

    def entitlement_page(
        self,
        limit: int = 100,
        after: str | None = None,
        updated_since: datetime | None = None,
        q: str | None = None,
        filters: Mapping[str, str | None] | None = None,
    ) -> tuple[list[EntitlementView], str | None]:
        """Entitlements in id order after id `after`, matching every filter
        (FILTERS exactly, `customer_email` ignoring case; updated at or after
        `updated_since`; `q` a prefix of the e-mail address, ignoring case, or
        of the order reference), and the id to page on after the last when
        there may be more. Paging by id is stable under writes: an
        entitlement there throughout is listed once, on one page."""
        filters = dict(filters or {})
        if filters.get("customer_email") is not None:
            filters["customer_email"] = str(filters["customer_email"]).lower()
        clauses, found = _equal(filters, FILTERS)
        params: list[Any] = list(found)
        if updated_since is not None:
            clauses.append("updated_at >= ?")
            params.append(moment(updated_since))
        if q:
            # substr, not LIKE: the same exact-prefix match on both databases
            # (SQLite's LIKE ignores case, PostgreSQL's does not). It scans
            # the table: fine for a console's search box, not for a hot path.
            clauses.append("(substr(customer_email, 1, ?) = ? OR substr(order_ref, 1, ?) = ?)")
            params += [len(q), q.lower(), len(q), q]
        if after is not None:
            clauses.append("id > ?")
            params.append(after)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(
            f"SELECT id, body FROM entitle_v4_entitlements{where}"
            f" ORDER BY id LIMIT {int(limit) + 1}",
            params,
        )
        views = [EntitlementView.model_validate_json(row[1]) for row in rows[:limit]]
        return views, (rows[limit - 1][0] if len(rows) > limit and limit else None)

    def entitlement(self, entitlement_id: str) -> EntitlementView | None:
        rows = self._query(
            "SELECT body FROM entitle_v4_entitlements WHERE id = ?", (entitlement_id,)
        )
        return EntitlementView.model_validate_json(rows[0][0]) if rows else None

    def by_code(self, code_hash: str) -> EntitlementView | None:
        """The entitlement an activation code (by its hash) belongs to;
        UnreadableRow (naming it) when its row cannot be read."""
        rows = self._query(
            "SELECT e.id, e.body FROM entitle_v4_codes c JOIN entitle_v4_entitlements e"
            " ON e.id = c.entitlement_id WHERE c.code_hash = ?",
            (code_hash,),
        )
        if not rows:
            return None
        try:
            return EntitlementView.model_validate_json(rows[0][1])
        except ValidationError:
            raise UnreadableRow(rows[0][0]) from None

    def changed(
        self, after: tuple[int, str] = (0, ""), limit: int = 2000
    ) -> tuple[tuple[int, str], list[tuple[str, list[str]]]]:
        """Up to `limit` entitlements written after `after` (a (log position,
        id) cursor; rows of one projection batch share a position), as
        their JSON bodies each with its code hashes, and the cursor to ask
        after next time. A projection batch commits all its rows at once and
        batches commit in log order, so asking again from there misses
        nothing; fewer than `limit` rows means caught up."""
        position, last = after
        rows = self._query(
            "SELECT e.position, e.id, e.body, c.code_hash FROM ("
            " SELECT position, id, body FROM entitle_v4_entitlements"
            " WHERE (position, id) > (?, ?) ORDER BY position, id LIMIT ?"
            ") e LEFT JOIN entitle_v4_codes c ON c.entitlement_id = e.id"
            " ORDER BY e.position, e.id",
            (position, last, int(limit)),
        )
        changed: dict[str, tuple[str, list[str]]] = {}
        for row_position, entitlement_id, body, code in rows:
            after = (int(row_position), entitlement_id)
            _, codes = changed.setdefault(entitlement_id, (body, []))
            if code is not None:
                codes.append(code)
        return after, list(changed.values())

    def due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of entitlements whose due time has come, soonest first."""
        rows = self._query(
            "SELECT id FROM entitle_v4_entitlements WHERE due_at <= ?"
            f" ORDER BY due_at LIMIT {int(limit)}",
            (moment(now),),
        )
        return [row[0] for row in rows]

    def dead_letters(self, limit: int = 100, unresolved: bool = False) -> list[DeadLetterView]:
        return self.dead_letter_page(limit, unresolved=unresolved)[0]

    def dead_letter_page(
        self, limit: int = 100, cursor: tuple[str, str] | None = None, unresolved: bool = False
    ) -> tuple[list[DeadLetterView], tuple[str, str] | None]:
        """Dead letters, newest first, after `cursor` (recorded time, id);
        and the cursor after the last one when there may be more."""
        clauses: list[str] = ["resolved = 0"] if unresolved else []
        params: list[str] = []
        if cursor is not None:
            clauses.append("(recorded_at < ? OR (recorded_at = ? AND id < ?))")
            params += [cursor[0], cursor[0], cursor[1]]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(
            f"SELECT recorded_at, id, body FROM entitle_v4_dead_letters{where}"
            f" ORDER BY recorded_at DESC, id DESC LIMIT {int(limit) + 1}",
            params,
        )
        views = [DeadLetterView.model_validate_json(row[2]) for row in rows[:limit]]
        more = len(rows) > limit and limit
        return views, ((rows[limit - 1][0], rows[limit - 1][1]) if more else None)
