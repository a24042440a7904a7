"""Activation codes: derived from the secret, stored only as hashes, read the
way people type them; events from before hashing still load."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from domain.entitlement import Entitlement, Refused, code_hash, normalize_code
from services.codes import CROCKFORD, CodeBook
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.test_store import CODES, record, service

ID = uuid4()


def test_codes_are_25_crockford_characters_in_five_groups_and_deterministic() -> None:
    code = CODES.code(ID, 0)
    assert re.fullmatch(rf"([{CROCKFORD}]{{5}}-){{4}}[{CROCKFORD}]{{5}}", code)
    assert CODES.code(ID, 0) == code
    others = {
        CODES.code(ID, 1),
        CODES.code(uuid4(), 0),
        CodeBook("another-secret-0123456789").code(ID, 0),
    }
    assert code not in others and len(others) == 3


def test_a_code_is_recognised_however_it_is_typed() -> None:
    code = CODES.code(ID, 0)
    typed = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert normalize_code(typed) == code.replace("-", "")
    assert code_hash(typed) == code_hash(code) == CODES.hash(ID, 0)
    assert code not in CODES.hash(ID, 0)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        CodeBook("short")


def test_admins_issue_and_revoke_codes_and_only_hashes_are_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'codes.db'}"
    store = EntitlementStore(url)
    event = se.invoice_paid(
        subscription="sub_c",
        shape=se.LEGACY,
        lines=[
            {"price": "p", "sku": "better_annual", "start": 1_800_000_000, "end": 1_830_000_000}
        ],
    )
    service(store).process([record(0, event)])
    [entitlement] = [
        a
        for a in store.load_many(
            [e.originator_id for e in store.process_recorder.select_notifications(1, 100)]
        ).values()
        if isinstance(a, Entitlement)
    ]
    assert entitlement.codes == {CODES.hash(entitlement.id, 0): 0}
    index = entitlement.issue_code(CODES.hash, "ops", "req-1", entitlement.modified_on)
    assert index == 1
    entitlement.revoke_code(0, "ops", "req-2", entitlement.modified_on)
    with pytest.raises(Refused):
        entitlement.revoke_code(0, "ops", "req-3", entitlement.modified_on)
    store.record([entitlement], None)
    again = store.find(entitlement.id, Entitlement)
    assert again is not None and again.codes == {CODES.hash(entitlement.id, 1): 1}
    raw = (tmp_path / "codes.db").read_bytes()
    for n in (0, 1):
        code = CODES.code(entitlement.id, n)
        assert code.encode() not in raw and code.replace("-", "").encode() not in raw


def test_an_entitlement_stored_with_a_plain_code_loads_with_its_hash(tmp_path: Path) -> None:
    """Events written before codes were hashed carried the code itself."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = EntitlementStore(url)
    event = se.invoice_paid(
        subscription="sub_old",
        shape=se.LEGACY,
        lines=[
            {"price": "p", "sku": "better_annual", "start": 1_800_000_000, "end": 1_830_000_000}
        ],
    )
    service(store).process([record(0, event)])
    store.close()
    with sqlite3.connect(tmp_path / "old.db") as db:
        rows = db.execute(
            "SELECT rowid, state FROM stored_events WHERE topic LIKE "
            "'domain.entitlement:Entitlement.Created'"
        ).fetchall()
        for rowid, state in rows:
            data = json.loads(state)
            del data["code_hash"]
            data.pop("class_version", None)
            data["activation_code"] = "7K3QD-ABCDE-FGHJK-MNPQR-STVWX"
            db.execute(
                "UPDATE stored_events SET state = ? WHERE rowid = ?",
                (json.dumps(data).encode(), rowid),
            )
    store = EntitlementStore(url)
    [entitlement_id] = [
        n.originator_id
        for n in store.process_recorder.select_notifications(1, 100)
        if n.topic.endswith("Entitlement.Created")
    ]
    entitlement = store.find(entitlement_id, Entitlement)
    assert entitlement is not None
    assert entitlement.codes == {code_hash("7k3qd abcde fghjk mnpqr stvwx"): 0}
