"""Audit the event store: `verify` folds every aggregate from its stored
events and compares the result with what was projected from them (the read
model, its code index, the validation index built from it) and checks the
notification log itself; `export` writes stored events as JSON lines.

`export` reads the log in pages, so its memory does not grow with its
length. `verify` folds it as `entitle replay` does (`projections.parallel`:
in parallel processes, each keeping its partition's aggregates in memory)
and keeps a 16-byte digest and the code hashes per entitlement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any, TypeVar
from uuid import UUID

from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg.sql import SQL, Identifier
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json, to_jsonable_python

from contracts.api import DeadLetterView, EntitlementView, ReceiptView
from domain.entitlement import event_type
from services import readmodel
from services.licensing import ValidationIndex
from services.projections.parallel import Part, digest, folding, workers_for
from services.projections.read_model import READ_MODEL
from services.projections.views import entitlement_view
from services.readmodel import Delivered, ReadModel, Resolution
from services.store import EntitlementStore

#: progress(events read so far, events to read)
Progress = Callable[[int, int], None]

_PAGE = 500
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Mismatch:
    """One difference between the fold of the log and what is stored.
    `kind`: entitlement, code index, validation index, dead letter,
    receipt, log or position; `subject`: the id it concerns."""

    kind: str
    subject: str
    field: str
    stored: Any
    folded: Any
    #: What `folded` is: the fold of the log, or (for an indexed column)
    #: the row's own body, which is compared with the fold on its own.
    against: str = "folded"

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.subject} {self.field}: "
            f"stored {_short(self.stored)}, {self.against} {_short(self.folded)}"
        )


def _short(value: Any, width: int = 160) -> str:
    text = json.dumps(to_jsonable_python(value), sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class VerifyReport:
    """What `verify` compared, up to log position `position` (the read
    model's), and every difference found (at most `limit` kept in
    `mismatches`; `mismatch_count` counts them all)."""

    position: int = 0
    head: int = 0
    #: Events in the log up to `position`.
    events: int = 0
    #: Notification ids up to `position` that no committed event has: on
    #: PostgreSQL a rolled-back insert burns its sequence values (normal);
    #: on SQLite ids are never skipped, so any is reported as a mismatch.
    unused_ids: int = 0
    #: The store is PostgreSQL (else SQLite): what an unused id means.
    postgres: bool = False
    aggregates: int = 0
    entitlements: int = 0
    codes: int = 0
    dead_letters: int = 0
    receipts: int = 0
    positions: dict[str, int] = field(default_factory=dict)
    projection_errors: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_count: int = 0
    limit: int = 50
    seconds: float = 0.0
    #: The read model did not reach the head in time (no projector runs).
    stale: bool = False

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0

    @property
    def behind(self) -> int:
        """Events the read model has not projected yet (not verified)."""
        return max(0, self.head - self.position)

    def add(self, mismatch: Mismatch) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < self.limit:
            self.mismatches.append(mismatch)

    def lines(self) -> list[str]:
        """The report for a person: what was checked, then each mismatch."""
        lag = (
            "the read model is at the head"
            if not self.behind
            else f"the read model is {self.behind} events behind the head {self.head} and"
            " did not catch up: no projector is running, or a replay was interrupted"
            " (`entitle replay` rebuilds it)"
            if self.stale
            else f"the read model was {self.behind} events behind the head {self.head}:"
            " those are not verified (the projector has projected them since)"
        )
        rate = self.events / self.seconds if self.seconds else 0.0
        out = [
            f"log: {self.events} events up to position {self.position} ({lag})",
            f"log: {self.aggregates} aggregates, each with versions 1..n in log order",
            f"log: {self.unused_ids} notification ids unused"
            + (
                ""
                if not self.unused_ids
                else " (rolled-back inserts: normal on PostgreSQL)"
                if self.postgres
                else " (events missing from the log: SQLite never skips an id)"
            ),
            "positions: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.positions.items())) or "none")
            + f" (each at most the head {self.head})",
            f"read model: {self.entitlements} entitlements, {self.codes} indexed code hashes,"
            f" {self.dead_letters} dead letters, {self.receipts} receipts compared with the fold",
            "validation index: built from the read model as an API process builds it;"
            " each active code finds its entitlement, no other code finds one",
        ]
        if self.projection_errors:
            out.append(f"projection errors recorded: {self.projection_errors}")
        out += [f"MISMATCH {m}" for m in self.mismatches]
        if self.mismatch_count > len(self.mismatches):
            out.append(f"… and {self.mismatch_count - len(self.mismatches)} more mismatches")
        out.append(
            f"{'OK' if self.ok else 'FAILED'}: {self.mismatch_count}"
            f" mismatch{'' if self.mismatch_count == 1 else 'es'},"
            f" {self.events} events in {self.seconds:.1f} s ({rate:,.0f} events/s)"
        )
        return out


def _int(value: Any) -> Any:
    """`value` as an integer where it is one (a column changed by hand may not be)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _digest(text: str | bytes) -> bytes:
    return digest(text)


def _id_sum(ids: Iterator[tuple[str, str, str]]) -> tuple[int, int]:
    """(count, an order-independent checksum) of (id, outcome, body JSON)."""
    count = total = 0
    for receipt_id, outcome, body in ids:
        count += 1
        one = _digest(f"{receipt_id}\x1f{outcome}\x1f{body}")[:8]
        total = (total + int.from_bytes(one)) % 2**64
    return count, total


def _parse_row(
    model: type[M], body: str | bytes, report: VerifyReport, kind: str, subject: str
) -> M | None:
    """The row's body as `model`, or None with a mismatch saying it is unreadable."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        error = f"{errors[0]['msg']} at {errors[0]['loc']}" if errors else type(exc).__name__
        report.add(Mismatch(kind, subject, "body", f"unreadable: {error}", "a row"))
        return None


@dataclass
class _Fold:
    """What verify remembers of the fold: per entitlement its sequence,
    the digest of its view's JSON and its active code hashes."""

    entitlements: dict[str, tuple[int, bytes, tuple[str, ...]]] = field(default_factory=dict)
    letters: dict[str, bytes] = field(default_factory=dict)
    #: Receipts that were parked or dead-lettered: id -> [the receipt as the
    #: read model should hold it now, still waiting, its waits_on column].
    pending: dict[str, list[Any]] = field(default_factory=dict)
    settled: tuple[int, int] = (0, 0)

    def settle(self, receipt_id: str, outcome: str, body: str) -> None:
        count, total = self.settled
        _, one = _id_sum(iter([(receipt_id, outcome, body)]))
        self.settled = (count + 1, (total + one) % 2**64)

    def take(self, part: Part, report: VerifyReport, batch_size: int) -> None:
        """Take the fold of the log up to the verified position (`part`,
        with digests), its receipts, resolutions and delivered facts in
        windows of `batch_size` positions as a projector's batches."""
        for _, aggregate_id, topic, error in part.errors:
            report.add(Mismatch("log", aggregate_id, "event", topic, error))
        self.entitlements.update(part.summaries)
        self.letters.update(part.letter_digests)
        windows: dict[int, tuple[list[Any], list[Resolution], list[Delivered]]] = {}

        def window(position: int) -> tuple[list[Any], list[Resolution], list[Delivered]]:
            return windows.setdefault((position - 1) // batch_size, ([], [], []))

        for position, row in part.receipts:
            window(position)[0].append(row)
        for position, resolution in part.resolutions:
            window(position)[1].append(resolution)
        for position, fact in part.delivered:
            window(position)[2].append(fact)
        for key in sorted(windows):
            self._take(*windows[key])

    def _take(
        self, receipts: list[Any], resolutions: list[Resolution], delivered: list[Delivered]
    ) -> None:
        # As the read model applies a batch: its new receipts, then the
        # resolutions, then the facts delivered (a parked webhook and what
        # it waited for can be folded in one transaction, in either order).
        for receipt_id, _, _, _, outcome, _, waiting, waits_on, body in receipts:
            # Kept whole: those still waiting, and dead letters (a re-drive
            # resolves them later); the others never change.
            if not waiting and outcome != "dead_letter":
                self.settle(receipt_id, outcome, body)
            else:
                view = ReceiptView.model_validate_json(body)
                self.pending[receipt_id] = [view, bool(waiting), waits_on]
        # As ReadModel.settle does, with the same functions.
        for resolution in resolutions:
            found = self.pending.get(resolution.receipt)
            if found is not None:
                found[0], still = readmodel.resolved(found[0], resolution)
                found[1] = found[1] and still
        for fact in delivered:
            for found in self.pending.values():
                view = found[0]
                if found[1] and (view.source, view.provider_event_id) == (
                    fact.source,
                    fact.event_id,
                ):
                    found[0], found[1] = readmodel.delivered(view, fact), False


def verify(
    store: EntitlementStore,
    read_model: ReadModel,
    *,
    limit: int = 50,
    batch_size: int = 1000,
    progress: Progress | None = None,
    workers: int | None = None,
    catch_up: float = 10.0,
) -> VerifyReport:
    """Fold every aggregate from the log (as `entitle replay` does, in
    `workers` processes: see `projections.parallel`) up to
    the read model's position, and compare with the read model as of that
    position (one consistent snapshot of its tables, read in one
    transaction while the projector may go on): each entitlement's view
    field by field, its indexed code hashes, a `ValidationIndex` built from
    those rows, the dead letters, and the receipts' outcomes. Also checks
    the log: versions 1..n per aggregate in log order, unused notification
    ids, every projection's position at most the head, and that the read
    model reaches the head within `catch_up` seconds (else it is stale: a
    mismatch; see `_caught_up`).

    Raises what the databases raise when they cannot be reached."""
    started = time.monotonic()
    report = VerifyReport(limit=limit)
    with read_model.transaction(write=False) as cur:
        if read_model.postgres:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur.execute("SELECT name, position FROM entitle_read_positions")
        report.positions = {}
        for name, position in cur.fetchall():
            number = _int(position)
            if not isinstance(number, int) or number < 0:
                report.add(Mismatch("position", name, "position", position, "a log position"))
                continue
            report.positions[name] = number
        report.position = report.positions.get(READ_MODEL, 0)
        # After the snapshot: every position in it is at most this head.
        report.head = int(store.process_recorder.max_notification_id() or 0)
        for name, position in sorted(report.positions.items()):
            if position > report.head:
                report.add(Mismatch("position", name, "position", position, report.head))
        cur.execute(
            read_model.sql("SELECT count(*) FROM entitle_projection_errors WHERE projection = ?"),
            (READ_MODEL,),
        )
        report.projection_errors = int(cur.fetchone()[0])
        _check_log(store, report)
        fold = _fold(store, report, batch_size, progress, workers)
        _compare_entitlements(store, read_model, cur, fold, report)
        _compare_dead_letters(read_model, cur, fold, report)
        _compare_receipts(read_model, cur, fold, report)
    if report.behind:
        _caught_up(read_model, report, catch_up)
    report.seconds = time.monotonic() - started
    return report


def _caught_up(read_model: ReadModel, report: VerifyReport, wait: float) -> None:
    """The read model's position reaches the head of the snapshot within
    `wait` seconds: a running projector projects what is behind in
    moments; a read model left behind (no projector, an interrupted
    replay, a position set back) never would, and is a mismatch, since its
    tables are not what the log says."""
    deadline = time.monotonic() + wait
    while (position := read_model.position(READ_MODEL)) < report.head:
        if time.monotonic() >= deadline:
            report.stale = True
            report.add(Mismatch("position", READ_MODEL, "position", position, report.head))
            return
        time.sleep(0.2)


def _fold(
    store: EntitlementStore,
    report: VerifyReport,
    batch_size: int,
    progress: Progress | None,
    workers: int | None = None,
) -> _Fold:
    """Fold the log up to the verified position as `entitle replay` does
    (in parallel processes, every aggregate kept in memory, one view per
    entitlement), keeping digests."""
    fold = _Fold()
    upto = report.position
    count = workers if workers is not None else workers_for(upto)
    with folding(store, count, digests=True) as parts:
        part = parts.window(0, upto, progress)
    fold.take(part, report, batch_size)
    if progress is not None:
        progress(upto, upto)
    return fold


def _events_table(store: EntitlementStore) -> tuple[Any, bool]:
    recorder: Any = store.recorder
    return recorder, isinstance(recorder, PostgresAggregateRecorder)


def _log_query(store: EntitlementStore, sqlite: str, params: tuple[Any, ...]) -> list[Any]:
    """Run `sqlite` (with `{table}` for the events table, `rowid` for the
    notification id, `?` placeholders) on either store."""
    recorder, postgres = _events_table(store)
    if postgres:
        statement = SQL(
            sqlite.replace("{table}", "{schema}.{table}")
            .replace("rowid", "notification_id")
            .replace("?", "%s")
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
            cursor.execute(statement, params)
            return [tuple(row.values()) for row in cursor.fetchall()]
    with recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute(sqlite.format(table=recorder.events_table_name), params)
        return [tuple(row) for row in cursor.fetchall()]


def _check_log(store: EntitlementStore, report: VerifyReport) -> None:
    """Gaps: ids unused up to the position, and aggregates whose versions
    are not 1..n or not in log order (the table's key keeps each version
    unique, so holes and a wrong start are all there can be)."""
    _, postgres = _events_table(store)
    report.postgres = postgres
    [(count, aggregates)] = _log_query(
        store,
        "SELECT count(*) AS events, count(DISTINCT originator_id) AS aggregates FROM {table}"
        " WHERE rowid <= ?",
        (report.position,),
    )
    report.events, report.aggregates = int(count), int(aggregates)
    report.unused_ids = report.position - report.events
    if report.unused_ids and not postgres:
        report.add(Mismatch("log", "notification ids", "count", report.events, report.position))
    rows = _log_query(
        store,
        "SELECT originator_id, originator_version, previous, nid, previous_nid FROM ("
        " SELECT originator_id, originator_version, rowid AS nid,"
        " lag(originator_version) OVER w AS previous, lag(rowid) OVER w AS previous_nid"
        " FROM {table} WINDOW w AS (PARTITION BY originator_id ORDER BY originator_version)"
        ") AS x WHERE (previous IS NULL AND originator_version <> 1)"
        " OR originator_version <> previous + 1 OR nid < previous_nid"
        f" LIMIT {report.limit + 1}",
        (),
    )
    for raw_id, version, previous, nid, previous_nid in rows:
        aggregate_id = UUID(str(raw_id))  # SQLite keeps it as hex
        if previous is not None and version == previous + 1:
            report.add(
                Mismatch("log", str(aggregate_id), f"version {version} position", nid, previous_nid)
            )
        else:
            report.add(Mismatch("log", str(aggregate_id), "version", version, (previous or 0) + 1))


def _pages(
    read_model: ReadModel, cur: Any, columns: str, table: str, key: str = "id"
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of `table` in pages, by `key`, within the snapshot `cur`."""
    after = ""
    while True:
        cur.execute(
            read_model.sql(
                f"SELECT {columns} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT {_PAGE}"
            ),
            (after,),
        )
        rows = list(cur.fetchall())
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def _compare_entitlements(
    store: EntitlementStore, read_model: ReadModel, cur: Any, fold: _Fold, report: VerifyReport
) -> None:
    folded = fold.entitlements
    report.entitlements = len(folded)
    columns = ", ".join(readmodel.ENTITLEMENT_COLUMNS)
    for rows in _pages(read_model, cur, f"id, body, {columns}", "entitle_v4_entitlements"):
        first, last = rows[0][0], rows[-1][0]
        cur.execute(
            read_model.sql(
                "SELECT entitlement_id, code_hash FROM entitle_v4_codes"
                " WHERE entitlement_id >= ? AND entitlement_id <= ?"
            ),
            (first, last),
        )
        indexed: dict[str, list[str]] = {}
        for entitlement_id, code in cur.fetchall():
            indexed.setdefault(entitlement_id, []).append(code)
            report.codes += 1
        index = ValidationIndex(read_model)
        expected: dict[str, str] = {}
        held: list[str] = []
        for raw_id, body, *stored_columns in rows:
            known = folded.pop(raw_id, None)
            if known is None:
                report.add(Mismatch("entitlement", raw_id, "row", "present", "no such entitlement"))
                continue
            sequence, digest, codes = known
            view = _parse_row(EntitlementView, body, report, "entitlement", raw_id)
            if view is None:
                continue
            if str(view.id) != raw_id:
                report.add(Mismatch("entitlement", raw_id, "body id", str(view.id), raw_id))
                continue
            # As the view dumps itself: how the row was written does not matter.
            truth = view
            if _digest(view.model_dump_json()) != digest:
                truth = _field_diffs(store, view, sequence, report)
            # The indexed columns, which the API's filters read, not the body.
            for name, stored, want in zip(
                readmodel.ENTITLEMENT_COLUMNS,
                stored_columns,
                readmodel.entitlement_columns(truth),
                strict=True,
            ):
                if stored != want:
                    report.add(Mismatch("entitlement", raw_id, f"column {name}", stored, want))
            stored_codes = tuple(sorted(indexed.get(raw_id, [])))
            if stored_codes != codes:
                for code in sorted(set(stored_codes) - set(codes)):
                    report.add(Mismatch("code index", raw_id, "code " + code[:12], "indexed", None))
                for code in sorted(set(codes) - set(stored_codes)):
                    report.add(Mismatch("code index", raw_id, "code " + code[:12], None, "active"))
            index.hold(view, list(stored_codes))
            held += stored_codes
            expected.update((code, raw_id) for code in codes)
        _check_index(index, expected, held, report)
    for entitlement_id in sorted(folded):
        report.add(Mismatch("entitlement", str(entitlement_id), "row", None, "present"))
    # Code hashes indexed to an entitlement the read model does not have.
    cur.execute(
        "SELECT c.entitlement_id, c.code_hash FROM entitle_v4_codes c"
        " LEFT JOIN entitle_v4_entitlements e ON e.id = c.entitlement_id WHERE e.id IS NULL"
        f" LIMIT {report.limit + 1}"
    )
    for entitlement_id, code in cur.fetchall():
        report.codes += 1
        report.add(Mismatch("code index", entitlement_id, "code " + code[:12], "indexed", None))


def _check_index(
    index: ValidationIndex, expected: dict[str, str], held: list[str], report: VerifyReport
) -> None:
    """Every active code finds its entitlement, and no other code finds one."""
    for code, entitlement_id in expected.items():
        entry = index.get(code)
        found = str(entry.id) if entry is not None else None
        if found != entitlement_id:
            report.add(
                Mismatch("validation index", entitlement_id, "code " + code[:12], found, "active")
            )
    for code in held:
        entry = index.get(code)
        if code not in expected and entry is not None:
            report.add(
                Mismatch("validation index", str(entry.id), "code " + code[:12], "found", None)
            )
    if len(index) > len(set(expected) | set(held)):
        report.add(Mismatch("validation index", "*", "codes held", len(index), len(expected)))


def _field_diffs(
    store: EntitlementStore, stored: EntitlementView, sequence: int, report: VerifyReport
) -> EntitlementView:
    """The fields in which the stored view differs from the fold (at the
    version folded up to the verified position); returns the folded view."""
    view = entitlement_view(store.aggregate_at(stored.id, sequence))
    folded = view.model_dump(mode="json")
    row = stored.model_dump(mode="json")
    for name in folded:
        if row.get(name) != folded[name]:
            report.add(Mismatch("entitlement", str(stored.id), name, row.get(name), folded[name]))
    return view


def _compare_dead_letters(
    read_model: ReadModel, cur: Any, fold: _Fold, report: VerifyReport
) -> None:
    report.dead_letters = len(fold.letters)
    for rows in _pages(
        read_model, cur, "id, body, recorded_at, resolved", "entitle_v4_dead_letters"
    ):
        for raw_id, body, recorded_at, resolved in rows:
            digest = fold.letters.pop(raw_id, None)
            if digest is None:
                report.add(Mismatch("dead letter", raw_id, "row", "present", None))
                continue
            view = _parse_row(DeadLetterView, body, report, "dead letter", raw_id)
            if view is None:
                continue
            if str(view.id) != raw_id:
                report.add(Mismatch("dead letter", raw_id, "body id", str(view.id), raw_id))
                continue
            if _digest(view.model_dump_json()) != digest:
                # The fold keeps a digest only (flat memory): which field, it cannot say.
                report.add(
                    Mismatch("dead letter", raw_id, "body", "differs from the fold", "(digest)")
                )
            # The indexed columns as the body (compared above) gives them.
            wanted = (view.recorded_at.isoformat(), int(view.resolved_at is not None))
            for name, stored, expected in zip(
                ("recorded_at", "resolved"), (recorded_at, _int(resolved)), wanted, strict=True
            ):
                if stored != expected:
                    report.add(
                        Mismatch(
                            "dead letter", raw_id, f"column {name}", stored, expected, "its body"
                        )
                    )
    for letter_id in sorted(fold.letters):
        report.add(Mismatch("dead letter", str(letter_id), "row", None, "present"))


def _compare_receipts(read_model: ReadModel, cur: Any, fold: _Fold, report: VerifyReport) -> None:
    """Receipts: each one that was parked or dead-lettered whole (outcome,
    every field of its body, its waiting and waits_on columns, as the read
    model settles it);
    all the others by count and a checksum of (id, outcome, body), which
    keeps memory flat; and each row's indexed columns with its own body."""
    count, total = 0, 0
    names = ("source", "provider_event_id", "order_ref", "outcome", "received_at", "waiting")
    columns = f"id, body, {', '.join(names)}, waits_on"
    for rows in _pages(read_model, cur, columns, "entitle_v4_receipts"):
        settled = []
        report.receipts += len(rows)
        for receipt_id, body, *stored, stored_waits_on in rows:
            outcome = stored[3]
            # The indexed columns (the list's filters) as the body gives
            # them; the outcome is compared with the fold below.
            view = _parse_row(ReceiptView, body, report, "receipt", receipt_id)
            if view is None:
                fold.pending.pop(receipt_id, None)
                settled.append((receipt_id, outcome, body))
                continue
            wanted = (
                view.source,
                view.provider_event_id,
                view.order_ref,
                view.outcome,
                readmodel.moment(view.received_at),
                int(view.waits_for is not None),
            )
            for name, value, expected in zip(names, stored, wanted, strict=True):
                if value != expected:
                    report.add(
                        Mismatch(
                            "receipt", receipt_id, f"column {name}", value, expected, "its body"
                        )
                    )
            if view.id != receipt_id:
                report.add(Mismatch("receipt", receipt_id, "body id", view.id, receipt_id))
            pending = fold.pending.pop(receipt_id, None)
            if pending is None:
                settled.append((receipt_id, outcome, body))
                continue
            # A receipt that was parked or dead-lettered: compared whole.
            want, waiting, waits_on = pending
            if want.outcome != outcome:
                report.add(Mismatch("receipt", receipt_id, "outcome", outcome, want.outcome))
            if stored_waits_on != waits_on:
                report.add(
                    Mismatch("receipt", receipt_id, "column waits_on", stored_waits_on, waits_on)
                )
            if int(stored[5]) != int(waiting):
                report.add(
                    Mismatch("receipt", receipt_id, "column waiting", stored[5], int(waiting))
                )
            expected = json.loads(want.model_dump_json(exclude={"webhook"}))
            got = json.loads(view.model_dump_json(exclude={"webhook"}))
            for name in sorted(expected.keys() | got.keys()):
                if name != "outcome" and got.get(name) != expected.get(name):
                    report.add(
                        Mismatch("receipt", receipt_id, name, got.get(name), expected.get(name))
                    )
        n, t = _id_sum(iter(settled))
        count, total = count + n, (total + t) % 2**64
    for receipt_id in sorted(fold.pending):
        report.add(Mismatch("receipt", receipt_id, "row", None, "present"))
    if (count, total) != fold.settled:
        # Which one, a checksum cannot say (`entitle replay` rewrites them all).
        report.add(
            Mismatch(
                "receipt",
                "*",
                "settled receipts' (id, outcome, body): count and checksum",
                f"{count} receipts, checksum {total:016x}",
                f"{fold.settled[0]} receipts, checksum {fold.settled[1]:016x}",
            )
        )


# -- export ------------------------------------------------------------------

#: Recorded times are taken before the transaction commits, so two writers
#: can commit slightly out of time order: `--since` starts this far before
#: the first event at its time, and filters each event exactly.
SKEW = timedelta(minutes=5)

_NOT_BODY = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic", "cause"}
)


def _shift(moment: datetime, delta: timedelta) -> datetime:
    """`moment + delta`, held at the first or last representable time
    (`--since 0001-01-01T00:00:00Z` starts at the first event)."""
    try:
        return moment + delta
    except OverflowError:
        edge = datetime.min if delta < timedelta(0) else datetime.max
        return edge.replace(tzinfo=moment.tzinfo)


def first_position(store: EntitlementStore, since: datetime) -> int:
    """The log position from which every event recorded at or after `since`
    lies (binary search on positions, decoding one event per step)."""
    recorder = store.process_recorder
    low, high = 1, int(recorder.max_notification_id() or 0) + 1
    while low < high:
        middle = (low + high) // 2
        found = recorder.select_notifications(start=middle, limit=1)
        if not found:
            high = middle
            continue
        event: Any = store.mapper.to_domain_event(found[0])
        if event.timestamp >= since:
            high = middle
        else:
            low = found[0].id + 1
    return low


def _line(store: EntitlementStore, notification: Notification) -> dict[str, Any]:
    event: Any = store.mapper.to_domain_event(notification)
    kind = notification.topic.partition(":")[2].split(".")[0]
    cause = getattr(event, "cause", None)
    return {
        "position": notification.id,
        "aggregate_id": str(notification.originator_id),
        "aggregate_kind": kind,
        "version": notification.originator_version,
        # The names the history and public topic use for entitlements'
        # events; the stored topic for the rest.
        "type": event_type(event) if kind == "Entitlement" else notification.topic,
        "recorded_at": event.timestamp,
        "occurred_at": getattr(event, "occurred_at", None),
        "cause": cause if isinstance(cause, dict) else None,
        "body": {k: v for k, v in vars(event).items() if k not in _NOT_BODY},
    }


def export(
    store: EntitlementStore,
    out: IO[str],
    since: datetime | None = None,
    until: datetime | None = None,
    aggregate_id: UUID | None = None,
    batch_size: int = 1000,
    progress: Callable[[int, int | None], None] | None = None,
) -> int:
    """Write the stored events recorded in [since, until) (all by default),
    of one aggregate if `aggregate_id`, as JSON lines in log order to
    `out`, a page at a time, flushing each page; returns events written.
    An event that cannot be decoded is a line with its `error`."""
    written = 0
    if aggregate_id is not None:
        pages: Iterator[list[Notification]] = iter([_aggregate_notifications(store, aggregate_id)])
    else:
        pages = _log_pages(
            store, first_position(store, _shift(since, -SKEW)) if since else 1, batch_size
        )
    for page in pages:
        lines = []
        done = False
        for notification in page:
            try:
                line = _line(store, notification)
            except Exception as exc:  # one undecodable event must not end the export
                line = {
                    "position": notification.id,
                    "aggregate_id": str(notification.originator_id),
                    "version": notification.originator_version,
                    "type": notification.topic,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            else:
                recorded = line["recorded_at"]
                if since is not None and recorded < since:
                    continue
                if until is not None and recorded >= until:
                    if aggregate_id is None and recorded >= _shift(until, SKEW):
                        done = True
                        break
                    continue
            lines.append(to_json(line, fallback=str).decode())
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()
            written += len(lines)
            if progress is not None:
                progress(written, None)
        if done:
            break
    return written


def _log_pages(
    store: EntitlementStore, start: int, batch_size: int
) -> Iterator[list[Notification]]:
    recorder = store.process_recorder
    while True:
        page = list(recorder.select_notifications(start=start, limit=batch_size))
        if not page:
            return
        yield page
        start = page[-1].id + 1


def _aggregate_notifications(store: EntitlementStore, aggregate_id: UUID) -> list[Notification]:
    """One aggregate's events (with their positions), by version."""
    _, postgres = _events_table(store)
    rows = _log_query(
        store,
        "SELECT rowid AS nid, originator_version, topic, state FROM {table}"
        " WHERE originator_id = ? ORDER BY originator_version",
        (aggregate_id if postgres else aggregate_id.hex,),
    )
    return [
        Notification(
            id=int(nid),
            originator_id=aggregate_id,
            originator_version=int(version),
            topic=topic,
            state=bytes(state),
        )
        for nid, version, topic, state in rows
    ]
