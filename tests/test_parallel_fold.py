"""`entitle replay` and `entitle audit verify` fold the log in parallel
processes (services/projections/parallel.py), forced here on a small store
of each database: the read model they rebuild is the one the projector
built, a customer's erasure included, verify still catches what was
tampered with, and an event that cannot be projected is recorded as the
projector records it."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID

import pytest

from domain.entitlement import entitlement_id
from services.audit import verify
from services.erasure import erase_customer
from services.projections import READ_MODEL, Follower, ReadModelProjection, project_batch, replay
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests.test_audit import ent, fill
from tests.test_poison import store_unchecked

pytestmark = pytest.mark.integration


def project(store: EntitlementStore, read_model: ReadModel) -> None:
    """What the live projector does: the log in batches of 500 changes."""
    follower, projection = Follower(store), ReadModelProjection(read_model)
    position = read_model.position(READ_MODEL)
    while True:
        changes, last = follower.read(position, 500)
        if last is None:
            return
        asyncio.run(project_batch(projection, changes, last))
        position = last


def tables(read_model: ReadModel) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the read model's tables hold, and the projection errors."""
    queries = {
        "entitlements": "SELECT id, status, customer_email, sequence, body"
        " FROM entitle_v4_entitlements ORDER BY id",
        "codes": "SELECT code_hash, entitlement_id FROM entitle_v4_codes ORDER BY code_hash",
        "dead letters": "SELECT id, resolved, body FROM entitle_v4_dead_letters ORDER BY id",
        "receipts": "SELECT id, outcome, waiting, waits_on, body FROM entitle_v4_receipts"
        " ORDER BY id",
        "errors": "SELECT position, aggregate_id, event_type FROM entitle_projection_errors"
        " ORDER BY position",
    }
    seen = {}
    with read_model.transaction(write=False) as cur:
        for name, statement in queries.items():
            cur.execute(statement)
            seen[name] = [tuple(row) for row in cur.fetchall()]
    return seen


def test_two_processes_rebuild_and_verify_what_the_projector_built(database_url: str) -> None:
    store, read_model = EntitlementStore(database_url), ReadModel(database_url)
    fill(store)
    store_unchecked(store, "sub_gone", "gone@example.com")
    project(store, read_model)
    erase_customer(store, read_model, "gone@example.com", "test")
    project(store, read_model)
    built = tables(read_model)
    gone = str(entitlement_id("stripe-main", "sub_gone", "item"))
    assert [row[2] for row in built["entitlements"] if row[0] == gone] == [None]
    assert len(built["entitlements"]) == 8 and built["dead letters"] and built["receipts"]

    # Both processes have entitlements to fold (an id's last byte modulo 2).
    assert {UUID(row[0]).bytes[15] % 2 for row in built["entitlements"]} == {0, 1}

    replayed = replay(store, read_model, workers=2)
    assert tables(read_model) == built
    assert replayed == replay(store, read_model, workers=1)
    head = store.process_recorder.max_notification_id()
    assert read_model.position(READ_MODEL) == head

    report = verify(store, read_model, workers=2)
    assert report.ok and report.entitlements == 8 and report.position == head, report.lines()
    one = verify(store, read_model, workers=1)
    assert (one.entitlements, one.codes, one.dead_letters, one.receipts) == (
        report.entitlements,
        report.codes,
        report.dead_letters,
        report.receipts,
    )
    tampered = str(ent("sub_3"))
    body = json.loads(next(row[4] for row in built["entitlements"] if row[0] == tampered))
    body["seats"] = 99
    with read_model.transaction() as cur:
        cur.execute(
            read_model.sql("UPDATE entitle_v4_entitlements SET body = ? WHERE id = ?"),
            (json.dumps(body), tampered),
        )
        cur.execute(
            read_model.sql("UPDATE entitle_v4_receipts SET outcome = 'duplicate' WHERE id = ?"),
            ("r0-0",),
        )
    found = {(m.kind, m.subject, m.field) for m in verify(store, read_model, workers=2).mismatches}
    assert found == {
        ("entitlement", tampered, "seats"),
        ("receipt", "*", "settled receipts' (id, outcome, body): count and checksum"),
        ("receipt", "r0-0", "column outcome"),  # the column differs from its row's body too
    }

    # An event the read model cannot project (an e-mail that is no string):
    # recorded as the projector records it, and reported by verify.
    replay(store, read_model, workers=1)  # (the rows tampered with, rebuilt)
    store_unchecked(store, "sub_bad", {"address": "x@example.com"})
    project(store, read_model)
    projected = tables(read_model)
    bad = str(entitlement_id("stripe-main", "sub_bad", "item"))
    assert {e[1] for e in projected["errors"]} == {bad}
    replay(store, read_model, workers=2)
    assert tables(read_model) == projected
    broken = verify(store, read_model, workers=2)
    assert ("log", bad) in {(m.kind, m.subject) for m in broken.mismatches}
    read_model.close()
    store.close()
