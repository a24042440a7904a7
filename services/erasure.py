"""Erasing a customer's personal data (crypto-shredding).

`erase_customer` deletes the customer's key (services/personal.py), so every
stored copy sealed under it becomes unreadable without rewriting an event;
then it appends an erasure event to each of the customer's entitlements, so
every projection drops the address through the log (read model, public
topic, webhooks), deletes the raw webhooks that reached them, blanks the
outbox's copies of the address, and records what it did (never the address).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from eventsourcing.utils import get_topic

from contracts.api import ErasureView
from domain.entitlement import Entitlement
from services.personal import SEALED, forget_everywhere, lookup_of, normalise
from services.readmodel import ReadModel
from services.store import EntitlementStore, PostgresRecorder

#: Beyond the caches' lifetime, for clocks and a query in flight.
MARGIN = 0.25
_ENTITLEMENT_TOPIC = get_topic(Entitlement) + "."
_ERASED = "[erased]"


def erase_customer(
    store: EntitlementStore,
    read_model: ReadModel,
    email: str,
    by: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ErasureView:
    """Erase `email`'s personal data; `by` names who asked (an admin key's
    name). Idempotent: an address with nothing left (erased before, or
    never seen) is answered with zero counts, and recorded all the same."""
    table = store.keyring.table
    wanted = normalise(email)
    erasure_id = str(uuid.uuid4())
    now = clock()
    key_ids = [
        str(r[0])
        for r in table.rows("SELECT key_id FROM {keys} WHERE lookup = ?", (lookup_of(wanted),))
    ]
    sealed = _events_holding(store, [k.encode() for k in key_ids])
    plain = _events_holding(store, [wanted.encode()], any_case=True)
    entitlements = {i for i, topic in sealed + plain if topic.startswith(_ENTITLEMENT_TOPIC)}
    entitlements |= {
        uuid.UUID(str(r[0]))
        for r in _rows(
            read_model,
            "SELECT id FROM entitle_v3_entitlements WHERE lower(customer_email) = ?",
            (wanted,),
        )
    }

    # 1. The key, and the erasure's record (whose count every cache checks).
    record = {"requested_at": now.isoformat(), "requested_by": by, "status": "started"}
    with table.cursor(commit=True) as cursor:
        if not table.postgres:
            cursor.execute("PRAGMA secure_delete = ON")  # zero the key's bytes as it goes
        cursor.execute(
            table.sql(
                "INSERT INTO {erasures} (id, requested_at, requested_by, body) VALUES (?, ?, ?, ?)"
            ),
            (erasure_id, now.isoformat(), by, json.dumps(record)),
        )
        for key_id in key_ids:
            cursor.execute(table.sql("DELETE FROM {keys} WHERE key_id = ?"), (key_id,))
    forget_everywhere(key_ids)
    # Other processes trust their caches this long: after it, none decrypts
    # with the key, so nothing decoded after the events below holds the address.
    time.sleep(store.keyring.ttl + MARGIN)

    # 2. An event on each entitlement: projections drop the address. Not
    # where the customer has another address now (an earlier one erased).
    def forget(entitlement: Entitlement) -> None:
        current = entitlement.customer_email
        if current is None or normalise(current) == wanted:
            entitlement.forget_customer(by, erasure_id, clock())

    changed: set[uuid.UUID] = set()
    for entitlement_id in sorted(entitlements):
        saved = store.change(entitlement_id, forget)
        if saved is not None and saved.customer_email is None:
            changed.add(entitlement_id)

    # 3. The raw webhooks that reached them, and those sealed under the key.
    receipts = _receipts_reaching(read_model, changed)
    receipts |= _webhooks_sealed(store, key_ids)
    receipts |= _webhooks_naming(store, wanted)
    webhooks = _delete_webhooks(store, receipts)

    # 4. Copies outside the log: the read model (ahead of its projector) and the outbox.
    _scrub_read_model(read_model, changed)
    jobs = _scrub_outbox(read_model, [wanted])

    view = ErasureView(
        id=erasure_id,
        requested_at=now,
        requested_by=by,
        keys=len(key_ids),
        entitlements=len(changed),
        events=len(sealed),
        plaintext_events=len(plain),
        webhooks=webhooks,
        outbox_jobs=jobs,
    )
    with table.cursor(commit=True) as cursor:
        cursor.execute(
            table.sql("UPDATE {erasures} SET body = ? WHERE id = ?"),
            (view.model_dump_json(), erasure_id),
        )
    _checkpoint(read_model)
    return view


def erasures(store: EntitlementStore, limit: int = 100) -> list[ErasureView]:
    """Erasures done, newest first (started ones that never finished too,
    with zero counts)."""
    table = store.keyring.table
    rows = table.rows(
        f"SELECT id, requested_at, requested_by, body FROM {{erasures}}"
        f" ORDER BY requested_at DESC LIMIT {int(limit)}"
    )
    views = []
    for erasure_id, at, by, body in rows:
        data = json.loads(body)
        if "id" not in data:  # started, never finished
            data = {
                "id": erasure_id,
                "requested_at": at,
                "requested_by": by,
                "keys": 0,
                "entitlements": 0,
                "events": 0,
                "plaintext_events": 0,
                "webhooks": 0,
                "outbox_jobs": 0,
            }
        views.append(ErasureView.model_validate(data))
    return views


def _events_holding(
    store: EntitlementStore, needles: list[bytes], any_case: bool = False
) -> list[tuple[uuid.UUID, str]]:
    """(aggregate id, topic) of every stored event whose state holds one of
    `needles` (a key id; a lower-case address, `any_case`): one pass over
    the events per needle."""
    recorder: Any = store.recorder
    found: list[tuple[uuid.UUID, str]] = []
    for needle in needles:
        if isinstance(recorder, PostgresRecorder):
            from psycopg.sql import SQL, Identifier

            statement = SQL(
                "SELECT originator_id, topic FROM {schema}.{table}"
                + (
                    " WHERE strpos(lower(convert_from(state, 'UTF8')), %s) > 0"
                    if any_case
                    else " WHERE position(%s::bytea IN state) > 0"
                )
            ).format(
                schema=Identifier(recorder.datastore.schema),
                table=Identifier(recorder.events_table_name),
            )
            with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
                cursor.execute(statement, (needle.decode() if any_case else needle,))
                found += [(row["originator_id"], row["topic"]) for row in cursor.fetchall()]
        else:
            with recorder.datastore.transaction(commit=False) as cursor:
                cursor.execute(
                    f"SELECT originator_id, topic FROM {recorder.events_table_name} WHERE "
                    + (
                        "instr(lower(CAST(state AS TEXT)), ?) > 0"
                        if any_case
                        else "instr(state, ?) > 0"
                    ),
                    (needle.decode() if any_case else needle,),
                )
                found += [
                    (recorder.convert_originator_id(row[0]), row[1]) for row in cursor.fetchall()
                ]
    return found


def _rows(read_model: ReadModel, statement: str, params: tuple[Any, ...]) -> list[Any]:
    with read_model.transaction(write=False) as cur:
        cur.execute(read_model.sql(statement), params)
        return list(cur.fetchall())


def _instr(read_model: ReadModel, column: str) -> str:
    return f"strpos({column}, ?) > 0" if read_model.postgres else f"instr({column}, ?) > 0"


def _receipts_reaching(read_model: ReadModel, entitlements: set[uuid.UUID]) -> set[str]:
    receipts: set[str] = set()
    for entitlement_id in entitlements:
        rows = _rows(
            read_model,
            f"SELECT id FROM entitle_v3_receipts WHERE {_instr(read_model, 'body')}",
            (str(entitlement_id),),
        )
        receipts |= {str(r[0]) for r in rows}
    return receipts


def _webhooks_sealed(store: EntitlementStore, key_ids: list[str]) -> set[str]:
    table = store.keyring.table
    webhooks = table.webhooks
    where = "position(? IN webhook) > 0" if table.postgres else "instr(webhook, ?) > 0"
    receipts: set[str] = set()
    for key_id in key_ids:
        prefix = SEALED + key_id.encode()
        rows = table.rows(f"SELECT receipt FROM {webhooks} WHERE {where}", (prefix,))
        receipts |= {str(r[0]) for r in rows}
    return receipts


def _webhooks_naming(store: EntitlementStore, address: str) -> set[str]:
    """Raw webhooks kept in plaintext that hold the address in any case (one
    that changed nothing, `customer.updated` say, was sealed under no key)."""
    table = store.keyring.table
    if table.postgres:
        # Sealed ones are binary, not text: left out before converting.
        where = (
            "position(? IN webhook) <> 1"
            " AND strpos(lower(convert_from(CASE WHEN position(? IN webhook) = 1"
            " THEN ''::bytea ELSE webhook END, 'UTF8')), ?) > 0"
        )
        params: tuple[Any, ...] = (SEALED, SEALED, address)
    else:
        where = "substr(webhook, 1, ?) <> ? AND instr(lower(CAST(webhook AS TEXT)), ?) > 0"
        params = (len(SEALED), SEALED, address)
    rows = table.rows(f"SELECT receipt FROM {table.webhooks} WHERE {where}", params)
    return {str(r[0]) for r in rows}


def _delete_webhooks(store: EntitlementStore, receipts: set[str]) -> int:
    table = store.keyring.table
    webhooks = table.webhooks
    present = [
        r
        for r in sorted(receipts)
        if table.rows(f"SELECT 1 FROM {webhooks} WHERE receipt = ?", (r,))
    ]
    with table.cursor(commit=True) as cursor:
        if not table.postgres:
            cursor.execute("PRAGMA secure_delete = ON")
        for receipt in present:
            cursor.execute(table.sql(f"DELETE FROM {webhooks} WHERE receipt = ?"), (receipt,))
    return len(present)


def _blank(value: Any, addresses: list[str]) -> tuple[Any, bool]:
    """`value` with every string holding one of `addresses` (any case) made
    None, and whether anything was."""
    if isinstance(value, str):
        lowered = value.lower()
        return (None, True) if any(a in lowered for a in addresses) else (value, False)
    if isinstance(value, dict):
        changed = False
        out = {}
        for key, item in value.items():
            out[key], hit = _blank(item, addresses)
            changed = changed or hit
        return out, changed
    if isinstance(value, list):
        pairs = [_blank(item, addresses) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


def _scrub_read_model(read_model: ReadModel, entitlements: set[uuid.UUID]) -> None:
    with read_model.transaction() as cur:
        for entitlement_id in entitlements:
            cur.execute(
                read_model.sql("SELECT body FROM entitle_v3_entitlements WHERE id = ?"),
                (str(entitlement_id),),
            )
            row = cur.fetchone()
            if row is None:
                continue
            body = json.loads(row[0])
            if isinstance(body.get("customer"), dict):
                body["customer"]["email"] = None
            cur.execute(
                read_model.sql(
                    "UPDATE entitle_v3_entitlements SET customer_email = NULL, body = ?"
                    " WHERE id = ?"
                ),
                (json.dumps(body), str(entitlement_id)),
            )


def _table_exists(read_model: ReadModel, name: str) -> bool:
    if read_model.postgres:
        rows = _rows(read_model, "SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(rows[0][0])
    rows = _rows(
        read_model, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    )
    return bool(rows)


def _scrub_outbox(read_model: ReadModel, addresses: list[str]) -> int:
    """Blank the address in outbound jobs' payloads and their attempts'
    answers; a mail to it that was not sent yet is given up."""
    if not _table_exists(read_model, "entitle_outbox_jobs"):
        return 0
    scrubbed = 0
    with read_model.transaction() as cur:
        for address in addresses:
            cur.execute(
                read_model.sql(
                    "SELECT id, kind, status, payload FROM entitle_outbox_jobs"
                    f" WHERE {_instr(read_model, 'lower(payload)')}"
                ),
                (address,),
            )
            for job_id, kind, status, payload in cur.fetchall():
                blanked, _ = _blank(json.loads(payload), addresses)
                gives_up = kind == "mail" and status == "pending"
                cur.execute(
                    read_model.sql(
                        "UPDATE entitle_outbox_jobs SET payload = ?, status = ?,"
                        " last_error = CASE WHEN ? THEN ? ELSE last_error END WHERE id = ?"
                    ),
                    (
                        json.dumps(blanked),
                        "failed" if gives_up else status,
                        gives_up,
                        "its customer's personal data were erased",
                        job_id,
                    ),
                )
                scrubbed += 1
                cur.execute(
                    read_model.sql(
                        "SELECT n, answer, error FROM entitle_outbox_attempts WHERE job_id = ?"
                    ),
                    (job_id,),
                )
                for n, answer, error in cur.fetchall():
                    cur.execute(
                        read_model.sql(
                            "UPDATE entitle_outbox_attempts SET answer = ?, error = ?"
                            " WHERE job_id = ? AND n = ?"
                        ),
                        (_replace(answer, addresses), _replace(error, addresses), job_id, n),
                    )
    return scrubbed


def _replace(text: str | None, addresses: list[str]) -> str | None:
    if text is None:
        return None
    for address in addresses:
        at = text.lower().find(address)
        while at >= 0:
            text = text[:at] + _ERASED + text[at + len(address) :]
            at = text.lower().find(address, at + len(_ERASED))
    return text


def _checkpoint(read_model: ReadModel) -> None:
    """SQLite: copy the WAL into the database and empty it, so the pages
    that held the address before (old versions) leave the files."""
    if read_model.postgres:
        return
    with sqlite3.connect(read_model.sqlite_path, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
