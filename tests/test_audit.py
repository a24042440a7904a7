"""`entitle audit verify` and `entitle audit export` against real stores
(SQLite and PostgreSQL): a healthy store verifies, a tampered read model or
code index does not, and the export is the log, line for line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from contracts.licensing import ValidationRequest
from domain.entitlement import Entitlement, entitlement_id, order_id
from services.audit import verify
from services.cli import main
from services.erasure import erase_customer
from services.licensing import Licensing, ValidationIndex
from services.progress import Bar
from services.projections import READ_MODEL, replay
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.harness import ENTITLE
from tests.test_store import CODES, NOW, YEAR, paid, record, service

pytestmark = pytest.mark.integration


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def entitle(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """`entitle ARGS` in this process (its output captured; stderr is no
    terminal, so no progress bar); a fresh process costs seconds."""

    # (faulthandler needs a real file; pytest's capture is none)
    monkeypatch.setattr("faulthandler.enable", lambda *_, **__: None)

    def run(url: str, *args: str, cwd: Path) -> Ran:
        monkeypatch.setenv("ENTITLE_DATABASE_URL", url)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def ent(subscription: str) -> Any:
    return entitlement_id("stripe-main", subscription, se.item_id(subscription, "p"))


def fill(store: EntitlementStore) -> None:
    """Entitlements renewed and changed by an admin, a dead letter, a refund
    that waits for its payment (parked, then applied), one that never gets it."""
    records = [record(i, paid(f"sub_{i % 5}", years=1 + i)) for i in range(12)]
    records += [
        record(12, paid("sub_x", sku="nope")),
        record(13, se.charge_refunded(payment_intent="pi_late")),
        record(14, se.charge_refunded(payment_intent="pi_never")),
    ]
    service(store).process(records)

    def payment(subscription: str) -> dict[str, Any]:
        return se.invoice_paid(
            subscription=subscription,
            shape=se.LEGACY,
            payment_intent=f"pi_{subscription}",
            lines=[{"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR}],
        )

    # The late payment, and a refund folded in one transaction with its payment.
    service(store).process(
        [
            record(15, payment("late")),
            record(16, se.charge_refunded(payment_intent="pi_same")),
            record(17, payment("same")),
        ]
    )
    at = datetime.now(UTC)
    store.change(ent("sub_1"), lambda e: e.issue_code(CODES.hash, "ops", "r1", at) and None)
    store.change(ent("sub_2"), lambda e: e.revoke_code(0, "ops", "r2", at))


def test_verify_passes_on_a_healthy_store_and_names_what_was_tampered_with(
    database_url: str, tmp_path: Path, entitle: Callable[..., Ran]
) -> None:
    store = EntitlementStore(database_url)
    fill(store)
    read_model = ReadModel(database_url)
    replay(store, read_model)
    report = verify(store, read_model)
    assert report.ok, report.lines()
    head = store.process_recorder.max_notification_id()
    assert report.position == report.head == head == read_model.position(READ_MODEL)
    assert report.entitlements == 7  # sub_0..4, late, same, and nothing for sub_x
    assert report.dead_letters >= 1 and report.receipts == 18
    # sub_1 has two codes, sub_2 none (revoked), the others one each.
    assert report.codes == 7
    # The refund parked and applied in one transaction is applied in both.
    same = read_model.receipt("r0-16")
    assert same is not None and same.outcome == "applied" and same.resolved_at is not None
    shown = entitle(database_url, "audit", "verify", cwd=tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "the read model is at the head" in shown.stdout
    assert shown.stderr.strip().startswith("OK: 0 mismatches")  # no bar without a terminal

    # The read model behind the log, and no projector to catch it up (an
    # interrupted replay, a position set back): verified up to its
    # position, and stale, so not OK.
    service(store).process([record(18, paid("sub_new"))])
    behind = verify(store, read_model, catch_up=0.5)
    assert behind.behind > 0 and behind.position == head and behind.stale and not behind.ok
    assert [(m.kind, m.stored, m.folded) for m in behind.mismatches] == [
        ("position", head, behind.head)
    ]
    assert "did not catch up" in behind.lines()[0]
    stale = entitle(database_url, "audit", "verify", "--wait", "0", cwd=tmp_path)
    assert stale.returncode == 1 and "did not catch up" in stale.stdout, stale.stdout
    replay(store, read_model)  # caught up
    assert verify(store, read_model).ok

    # A row changed behind the projector's back.
    tampered = str(ent("sub_3"))
    with read_model.transaction() as cur:
        cur.execute(
            read_model.sql("SELECT body FROM entitle_v4_entitlements WHERE id = ?"), (tampered,)
        )
        body = json.loads(cur.fetchone()[0])
        body["status"], body["seats"] = "CANCELED", 99
        cur.execute(
            read_model.sql(
                "UPDATE entitle_v4_entitlements SET body = ?, status = 'CANCELED' WHERE id = ?"
            ),
            (json.dumps(body), tampered),
        )
    # A code removed from the index, and one added that no entitlement has.
    with read_model.transaction() as cur:
        cur.execute(
            read_model.sql("DELETE FROM entitle_v4_codes WHERE entitlement_id = ?"),
            (str(ent("sub_4")),),
        )
        cur.execute(
            read_model.sql(
                "INSERT INTO entitle_v4_codes (code_hash, entitlement_id) VALUES (?, ?)"
            ),
            ("f" * 64, str(ent("sub_0"))),
        )
    report = verify(store, read_model)
    found = {(m.kind, m.subject, m.field.split(" ")[0]) for m in report.mismatches}
    assert ("entitlement", tampered, "status") in found
    assert ("entitlement", tampered, "seats") in found
    # Its indexed status column too (the list's ?status= reads it).
    assert ("entitlement", tampered, "column") in found
    for kind in ("code index", "validation index"):
        assert (kind, str(ent("sub_4")), "code") in found
        assert (kind, str(ent("sub_0")), "code") in found
    assert not report.ok and report.mismatch_count == len(report.mismatches) == 7
    failed = entitle(database_url, "audit", "verify", "--limit", "2", cwd=tmp_path)
    assert failed.returncode == 1
    assert f'MISMATCH entitlement {tampered} status: stored "CANCELED", folded "ACTIVE"' in (
        failed.stdout
    )
    assert "… and 5 more mismatches" in failed.stdout
    assert failed.stderr.strip().startswith("FAILED: 7 mismatches")

    # Only the indexed columns changed, every body left as it was: what the
    # API's filters and the scheduler read, so each is compared, by name.
    replay(store, read_model)
    assert verify(store, read_model).ok
    changed = {
        "status": ("sub_0", "'CANCELED'"),
        "customer_email": ("sub_1", "'evil@example.com'"),
        "due_at": ("sub_2", "NULL"),
        "sequence": ("sub_3", "1"),
        "offering": ("sub_4", "'nope'"),
        "order_ref": ("late", "'sub_other'"),
        "source": ("same", "'elsewhere'"),
    }
    with read_model.transaction() as cur:
        for column, (subscription, value) in changed.items():
            cur.execute(
                read_model.sql(
                    f"UPDATE entitle_v4_entitlements SET {column} = {value} WHERE id = ?"
                ),
                (str(ent(subscription)),),
            )
        cur.execute("UPDATE entitle_v4_receipts SET order_ref = 'sub_other' WHERE id = 'r0-3'")
        cur.execute("UPDATE entitle_v4_dead_letters SET resolved = 1")
    report = verify(store, read_model)
    found = {(m.kind, m.subject, m.field) for m in report.mismatches}
    for column, (subscription, _) in changed.items():
        assert ("entitlement", str(ent(subscription)), f"column {column}") in found, column
    assert ("receipt", "r0-3", "column order_ref") in found
    assert any(m.kind == "dead letter" and m.field == "column resolved" for m in report.mismatches)
    assert report.mismatch_count == len(found) == len(changed) + 1 + report.dead_letters
    shown = entitle(database_url, "audit", "verify", cwd=tmp_path)
    assert shown.returncode == 1
    assert (
        f'MISMATCH entitlement {ent("sub_0")} column status: stored "CANCELED", folded "ACTIVE"'
        in shown.stdout
    )
    read_model.close()
    store.close()


def test_verify_reports_unreadable_rows_and_any_change_to_a_receipt(
    database_url: str, tmp_path: Path, entitle: Callable[..., Ran]
) -> None:
    """A row whose body is no JSON (or not the shape) is a mismatch, and the
    rest is still verified; a receipt's body is compared as a whole."""
    store = EntitlementStore(database_url)
    fill(store)
    read_model = ReadModel(database_url)
    replay(store, read_model)
    broken, swapped = str(ent("sub_1")), str(ent("sub_2"))
    other = str(ent("sub_3"))
    with read_model.transaction() as cur:
        sql = read_model.sql
        cur.execute(
            sql("UPDATE entitle_v4_entitlements SET body = '{not json' WHERE id = ?"), (broken,)
        )
        cur.execute(sql("SELECT body FROM entitle_v4_entitlements WHERE id = ?"), (other,))
        cur.execute(
            sql("UPDATE entitle_v4_entitlements SET body = ? WHERE id = ?"),
            (cur.fetchone()[0], swapped),
        )
        cur.execute(sql("UPDATE entitle_v4_receipts SET body = '{bad' WHERE id = 'r0-3'"))
        cur.execute(sql("SELECT body FROM entitle_v4_receipts WHERE id = 'r0-4'"))
        receipt = json.loads(cur.fetchone()[0])
        receipt["entitlement_ids"] = [other]
        cur.execute(
            sql("UPDATE entitle_v4_receipts SET body = ? WHERE id = 'r0-4'"), (json.dumps(receipt),)
        )
        # A parked receipt (the refund that never gets its payment) is
        # compared whole: its body's fields and its waits_on column.
        cur.execute(sql("SELECT body FROM entitle_v4_receipts WHERE id = 'r0-14'"))
        parked = json.loads(cur.fetchone()[0])
        assert parked["outcome"] == "parked"
        parked["entitlement_ids"], parked["detail"] = [other], "tampered"
        cur.execute(
            sql(
                "UPDATE entitle_v4_receipts SET body = ?, waits_on = 'payment pi_x'"
                " WHERE id = 'r0-14'"
            ),
            (json.dumps(parked),),
        )
    report = verify(store, read_model)
    found = {(m.kind, m.subject, m.field) for m in report.mismatches}
    assert found == {
        ("entitlement", broken, "body"),
        ("entitlement", swapped, "body id"),  # named by its row, not the id it holds
        ("receipt", "r0-3", "body"),
        ("receipt", "*", "settled receipts' (id, outcome, body): count and checksum"),
        ("receipt", "r0-14", "entitlement_ids"),
        ("receipt", "r0-14", "detail"),
        ("receipt", "r0-14", "column waits_on"),
    }, report.lines()
    assert not report.ok
    shown = entitle(database_url, "audit", "verify", cwd=tmp_path)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert f'MISMATCH entitlement {broken} body: stored "unreadable:' in shown.stdout
    # The API starts, and the broken entitlement's code still validates, from the store.
    index = ValidationIndex(read_model)
    index.refresh()
    assert index.unreadable == 1
    licensing = Licensing(store, read_model, index=index)
    answer = licensing.check(ValidationRequest(activation_code=CODES.code(UUID(broken), 0)))
    assert answer.code == "VALID"
    # An erasure goes through the unreadable row too, leaving no address in it.
    erase_customer(store, read_model, "buyer@example.com", "ops", lambda: datetime.now(UTC))
    with read_model.transaction() as cur:
        cur.execute(
            read_model.sql("SELECT customer_email, body FROM entitle_v4_entitlements WHERE id = ?"),
            (broken,),
        )
        email, text = cur.fetchone()
    assert email is None and "@" not in text


def test_rolled_back_inserts_leave_unused_ids_only_on_postgres(database_url: str) -> None:
    """Two writers saving the same entitlement: the loser's transaction
    rolls back. PostgreSQL's sequence has handed out its id anyway (an id
    hole that is no lost event); SQLite's ids never skip."""
    store, other = EntitlementStore(database_url), EntitlementStore(database_url)
    service(store).process([record(0, paid("sub_a"))])
    first = store.find(ent("sub_a"), Entitlement)
    second = other.find(ent("sub_a"), Entitlement)
    assert first is not None and second is not None
    at = datetime.now(UTC)
    first.issue_code(CODES.hash, "ops", "r1", at)
    second.issue_code(CODES.hash, "ops", "r2", at)
    store.record([first], None)
    from eventsourcing.persistence import IntegrityError

    with pytest.raises(IntegrityError):
        other.record([second], None)
    service(store).process([record(1, paid("sub_b"))])
    read_model = ReadModel(database_url)
    replay(store, read_model)
    report = verify(store, read_model)
    assert report.ok, report.lines()
    postgres = database_url.startswith("postgres")
    assert (report.unused_ids > 0) is postgres
    assert report.position - report.events == report.unused_ids

    # An event taken out of the log: the order's versions no longer start at 1.
    order = order_id("stripe-main", "sub_b")
    recorder: Any = store.recorder
    with recorder.datastore.transaction(commit=True) as cursor:
        cursor.execute(
            f"DELETE FROM {recorder.events_table_name} WHERE originator_id = "
            + ("%s AND originator_version = 1" if postgres else "? AND originator_version = 1"),
            (order if postgres else order.hex,),
        )
    holed = verify(store, read_model)
    # What an unused id means, said as it is on this database.
    [said] = [line for line in holed.lines() if "notification ids unused" in line]
    if postgres:
        assert said.endswith("(rolled-back inserts: normal on PostgreSQL)"), said
    else:
        assert said.endswith("(events missing from the log: SQLite never skips an id)"), said
    found = {(m.kind, m.subject, m.field, m.stored) for m in holed.mismatches}
    assert ("log", str(order), "version", 2) in found
    # On SQLite an id is never skipped: the missing one is reported too.
    assert (("log", "notification ids", "count", holed.events) in found) is not postgres
    read_model.close()
    other.close()
    store.close()


def test_export_is_the_log_line_for_line(
    database_url: str, tmp_path: Path, entitle: Callable[..., Ran]
) -> None:
    store = EntitlementStore(database_url)
    fill(store)
    total = store.process_recorder.max_notification_id()
    whole = entitle(database_url, "audit", "export", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    lines = [json.loads(line) for line in whole.stdout.splitlines()]
    stored = store.process_recorder.select_notifications(start=1, limit=10_000)
    assert [(x["position"], x["aggregate_id"], x["version"]) for x in lines] == [
        (n.id, str(n.originator_id), n.originator_version) for n in stored
    ]
    assert len(lines) == len(stored) and lines[-1]["position"] == total
    assert whole.stderr.strip() == f"exported {len(lines)} events"
    renewed = next(x for x in lines if x["type"] == "entitlement.renewed")
    assert renewed["aggregate_kind"] == "Entitlement"
    assert renewed["cause"]["kind"] == "provider" and renewed["cause"]["source"] == "stripe-main"
    assert renewed["occurred_at"] is not None and "period_end" in json.dumps(renewed["body"])
    letter = next(x for x in lines if x["aggregate_kind"] == "DeadLetter")
    assert letter["type"].startswith("domain.dead_letter:DeadLetter.")
    assert "nope" in json.dumps(letter["body"])

    # --since: exactly the events recorded at or after the time, in order.
    # (A fold transaction's events share one time: take the second batch's.)
    since = next(x["recorded_at"] for x in lines if x["recorded_at"] > lines[0]["recorded_at"])
    later = entitle(database_url, "audit", "export", "--since", since, cwd=tmp_path)
    want = [x for x in lines if datetime.fromisoformat(x["recorded_at"]) >= _at(since)]
    assert [json.loads(line) for line in later.stdout.splitlines()] == want
    assert 0 < len(want) < len(lines)
    until = entitle(
        database_url,
        "audit",
        "export",
        "--until",
        since,
        "--since",
        lines[0]["recorded_at"],
        cwd=tmp_path,
    )
    assert len(until.stdout.splitlines()) == len(lines) - len(want)
    # The first and last times there are: every event, no overflow.
    for edge in (["--since", "0001-01-01T00:00:00Z"], ["--until", "9999-12-31T23:59:59Z"]):
        everything = entitle(database_url, "audit", "export", *edge, cwd=tmp_path)
        assert everything.returncode == 0, everything.stderr
        assert [json.loads(line) for line in everything.stdout.splitlines()] == lines

    # --entitlement: its own events, versions 1..n.
    one = str(ent("sub_1"))
    mine = entitle(database_url, "audit", "export", "--entitlement", one, cwd=tmp_path)
    got = [json.loads(line) for line in mine.stdout.splitlines()]
    assert got == [x for x in lines if x["aggregate_id"] == one]
    assert [x["version"] for x in got] == list(range(1, len(got) + 1))

    for bad in (
        ["--since", "yesterday"],
        ["--entitlement", "nope"],
        ["--entitlement", str(ent("x"))],
    ):
        refused = entitle(database_url, "audit", "export", *bad, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    store.close()


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_export_ends_quietly_when_the_reader_goes_away(
    tmp_path: Path, entitle: Callable[..., Ran]
) -> None:
    url = f"sqlite:///{tmp_path / 'entitle.db'}"
    store = EntitlementStore(url)
    service(store).process([record(i, paid(f"sub_{i}")) for i in range(300)])
    store.close()
    env = {**os.environ, "ENTITLE_DATABASE_URL": url}
    piped = subprocess.run(
        f"'{ENTITLE}' audit export | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert len(piped.stdout.splitlines()) == 1 and json.loads(piped.stdout)["position"] == 1
    assert piped.stderr == "", piped.stderr
    # Every command that prints: here a reader gone before it writes at all.
    for args in (f"history {ent('sub_7')}", f"history {ent('sub_7')} --json"):
        gone = subprocess.run(
            f"'{ENTITLE}' {args} | head -n 0",
            shell=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert gone.stderr == "", gone.stderr
    refused = entitle("postgresql://nobody@127.0.0.1:1/none", "audit", "verify", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("entitle: the database cannot be read: ")
    assert len(refused.stderr.strip().splitlines()) == 1


def test_commands_that_read_a_store_refuse_one_that_is_not_there(
    tmp_path: Path, entitle: Callable[..., Ran], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening an SQLite file that is not there would make an empty store
    (and its directories) and report on it: each says so and makes nothing."""
    missing = tmp_path / "none" / "x.db"
    some = str(ent("sub_1"))
    for args in (
        ["audit", "verify"],
        ["audit", "export"],
        ["history", some],
        ["show", some],
        ["show", some, "--as-of-version", "1"],
        ["erase-customer", "x@example.com"],
        ["publish", "--all"],
        ["replay"],
        ["webhooks"],
        ["webhooks", "r1"],
        ["dead-letters"],
        ["outbound", "endpoints"],
    ):
        refused = entitle(f"sqlite:///{missing}", *args, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stdout == "", args
        assert refused.stderr == (
            f"entitle: no event store at {missing} (set ENTITLE_DATABASE_URL"
            " or run from the directory of .entitle)\n"
        ), args
    assert not (tmp_path / "none").exists()
    # A file that is there but no event store: said so, and left as it was.
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    text, empty, foreign = files_dir / "text.db", files_dir / "empty.db", files_dir / "other.db"
    text.write_text("hello\n")
    empty.write_bytes(b"")
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE x (a)")
        db.commit()
    files = {path: path.read_bytes() for path in (text, empty, foreign)}
    for path, why in (
        (text, "cannot be read as a database: file is not a database"),
        (empty, "holds no event store (none of entitle's tables)"),
        (foreign, "holds no event store (none of entitle's tables)"),
    ):
        for args in (
            ["replay"],
            ["audit", "verify"],
            ["history", some],
            ["erase-customer", "a@b.c"],
        ):
            refused = entitle(f"sqlite:///{path}", *args, cwd=tmp_path)
            assert (refused.returncode, refused.stderr) == (2, f"entitle: {path} {why}\n"), args
    assert {path: path.read_bytes() for path in files} == files
    assert sorted(p.name for p in files_dir.iterdir()) == ["empty.db", "other.db", "text.db"]
    shutil.rmtree(files_dir)
    # Without ENTITLE_DATABASE_URL: .entitle/entitle.db here, not made either.
    monkeypatch.delenv("ENTITLE_DATABASE_URL")
    monkeypatch.chdir(tmp_path)
    assert main(["erase-customer", "x@example.com"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_database_that_cannot_be_used_is_one_line_without_its_password(
    tmp_path: Path, entitle: Callable[..., Ran]
) -> None:
    for url, says in (
        ("mysql://root:hunter2@db/x", "ENTITLE_DATABASE_URL: must be sqlite:///PATH"),
        ("postgresql://u:hunter2@127.0.0.1:1/x", "cannot reach the database at postgresql://"),
    ):
        ran = entitle(url, "webhooks", cwd=tmp_path)
        assert ran.returncode == 2 and ran.stdout == "", ran
        [line] = ran.stderr.splitlines()
        assert says in line and "hunter2" not in line, line


def test_the_progress_bar_is_drawn_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown, piped = Terminal(), io.StringIO()
    for stream in (shown, piped):
        bar = Bar("verify", stream)
        bar(500, 1000)
        bar(1000, 1000)
        bar.end()
        counted = Bar("export", stream)  # no total known: a count and a rate
        counted(250)
        counted.end()
    assert piped.getvalue() == ""
    drawn = shown.getvalue()
    assert "verify: 100%" in drawn and "1000/1000" in drawn
    assert "export: 250 events" in drawn
