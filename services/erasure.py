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
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from eventsourcing.utils import get_topic

from contracts.api import ErasureView
from domain.entitlement import Entitlement
from services.personal import (
    SEALED,
    forget_everywhere,
    lookups_of,
    normalise,
    owners,
    plain_run,
    spelling_pattern,
)
from services.readmodel import ReadModel
from services.store import EntitlementStore, PostgresRecorder

#: Beyond the caches' lifetime, for clocks and a query in flight.
MARGIN = 0.25
_ENTITLEMENT_TOPIC = get_topic(Entitlement) + "."
_ERASED = "[erased]"

log = logging.getLogger("entitle.erasure")


def erase_customer(
    store: EntitlementStore,
    read_model: ReadModel,
    email: str,
    by: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ErasureView:
    """Erase `email`'s personal data; `by` names who asked (an admin key's
    name). Every address the customer's entitlements held before (a change
    of customer's e-mail) is erased with it; an address a customer has
    left is erased alone (they keep the new one). Idempotent and safe to
    run twice at once: only the erasure that deleted a key counts it and
    the events sealed under it, and appends the erasure events; an
    address with nothing left (erased before, or never seen) is answered
    with zero counts, and recorded all the same."""
    table = store.keyring.table
    erasure_id = str(uuid.uuid4())
    now = clock()
    wanted, entitlements = _person(store, read_model, normalise(email))
    lookups = sorted({lk for address in wanted for lk in lookups_of(address)})
    candidates = [
        str(r[0])
        for start in range(0, len(lookups), 500)
        for r in table.rows(
            "SELECT key_id FROM {keys} WHERE lookup IN ("
            + ",".join("?" * len(lookups[start : start + 500]))
            + ")",
            lookups[start : start + 500],
        )
    ]

    # 1. The keys, and the erasure's record (whose count every cache checks).
    # A key counts for the erasure whose DELETE removed it (another one at
    # the same moment finds it gone).
    record = {"requested_at": now.isoformat(), "requested_by": by, "status": "started"}
    key_ids: list[str] = []
    with table.cursor(commit=True) as cursor:
        if not table.postgres:
            cursor.execute("PRAGMA secure_delete = ON")  # zero the key's bytes as it goes
        cursor.execute(
            table.sql(
                "INSERT INTO {erasures} (id, requested_at, requested_by, body) VALUES (?, ?, ?, ?)"
            ),
            (erasure_id, now.isoformat(), by, json.dumps(record)),
        )
        for key_id in candidates:
            cursor.execute(table.sql("DELETE FROM {keys} WHERE key_id = ?"), (key_id,))
            if _rowcount(cursor) == 1:
                key_ids.append(key_id)
    forget_everywhere(key_ids)
    if candidates:
        # Other processes trust their caches this long: after it, none decrypts
        # with the key, so nothing decoded after the events below holds the address.
        time.sleep(store.keyring.ttl + MARGIN)
    sealed = _events_holding(store, [k.encode() for k in key_ids])
    owned = {i for i, topic in sealed if topic.startswith(_ENTITLEMENT_TOPIC)}
    plain = _events_naming(store, wanted)

    # 2. An event on each entitlement: projections drop the address. Not
    # where the customer has another address now (an earlier one erased),
    # nor where another erasure did it (the address reads None, its key
    # deleted by that one).
    forgot: dict[uuid.UUID, bool] = {}

    def forget(entitlement: Entitlement) -> None:
        current = entitlement.customer_email
        # Decided on the state it is saved over (a retry after a conflict
        # decides again): of two erasures at once, one appends.
        forgot[entitlement.id] = (current is None and entitlement.id in owned) or (
            current is not None and normalise(current) in wanted
        )
        if forgot[entitlement.id]:
            entitlement.forget_customer(by, erasure_id, clock())

    plain_ones = {i for i, topic in plain if topic.startswith(_ENTITLEMENT_TOPIC)}
    changed: set[uuid.UUID] = set()
    for entitlement_id in sorted(entitlements | owned | plain_ones):
        if store.change(entitlement_id, forget) is not None and forgot.get(entitlement_id):
            changed.add(entitlement_id)

    # 3. The raw webhooks that reached them, and those sealed under the keys.
    receipts = _receipts_reaching(read_model, changed)
    receipts |= _webhooks_sealed(store, key_ids)
    receipts |= _webhooks_naming(store, wanted)
    webhooks = _delete_webhooks(store, receipts)

    # 4. Copies outside the log: the read model (ahead of its projector) and the outbox.
    _scrub_read_model(read_model, changed)
    jobs = _scrub_outbox(read_model, wanted)

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


def _person(
    store: EntitlementStore, read_model: ReadModel, address: str
) -> tuple[set[str], set[uuid.UUID]]:
    """The addresses to erase for `address` (normalised): it, and every
    address the entitlements it holds now held before (their history),
    and so on; with every entitlement that holds or held one of them. Read
    before the keys go (the earlier addresses are sealed under theirs)."""
    wanted = {address}
    entitlements: set[uuid.UUID] = set()
    seen: set[uuid.UUID] = set()
    todo = [address]
    while todo and len(wanted) <= 1000:
        found = _entitlements_of(store, read_model, todo)
        entitlements |= found
        todo = []
        for entitlement_id in sorted(found - seen):
            seen.add(entitlement_id)
            current = store.find(entitlement_id, Entitlement)
            if current is None or current.customer_email is None:
                continue
            if normalise(current.customer_email) not in wanted:
                continue  # they moved on: the new address is not this person's to erase
            for event in store.history(entitlement_id):
                for held in owners(vars(event)):
                    if normalise(held) not in wanted:
                        wanted.add(normalise(held))
                        todo.append(normalise(held))
    return wanted, entitlements


def _entitlements_of(
    store: EntitlementStore, read_model: ReadModel, addresses: list[str]
) -> set[uuid.UUID]:
    """Entitlements whose events hold one of `addresses` (sealed under its
    key, or in plaintext), or whose read model row names it."""
    lookups = sorted({lk for a in addresses for lk in lookups_of(a)})
    key_ids = [
        str(r[0])
        for lk in lookups
        for r in store.keyring.table.rows("SELECT key_id FROM {keys} WHERE lookup = ?", (lk,))
    ]
    found = _events_holding(store, [k.encode() for k in key_ids])
    found += _events_naming(store, set(addresses))
    ids = {i for i, topic in found if topic.startswith(_ENTITLEMENT_TOPIC)}
    wanted = set(addresses)
    for needle in sorted({plain_run(a) for a in addresses}):
        for entitlement_id, held in _rows(
            read_model,
            "SELECT id, customer_email FROM entitle_v4_entitlements"
            f" WHERE customer_email IS NOT NULL AND {_instr(read_model, 'lower(customer_email)')}",
            (needle,),
        ):
            if normalise(str(held)) in wanted:
                ids.add(uuid.UUID(str(entitlement_id)))
    return ids


def erasures(store: EntitlementStore, limit: int = 100) -> list[ErasureView]:
    """Erasures done, newest first (started ones that never finished too,
    with zero counts)."""
    return erasure_page(store, limit)[0]


def erasure_page(
    store: EntitlementStore, limit: int = 100, after: tuple[str, str] | None = None
) -> tuple[list[ErasureView], tuple[str, str] | None]:
    """Up to `limit` erasures, newest first, older than `after` (the
    (requested_at, id) the page before ended with); and what this page
    ends with when there are more."""
    table = store.keyring.table
    where: str = ""
    params: tuple[str, ...] = ()
    if after is not None:
        where = " WHERE requested_at < ? OR (requested_at = ? AND id < ?)"
        params = (after[0], after[0], after[1])
    rows = table.rows(
        f"SELECT id, requested_at, requested_by, body FROM {{erasures}}{where}"
        f" ORDER BY requested_at DESC, id DESC LIMIT {int(limit) + 1}",
        params,
    )
    more = len(rows) > limit
    rows = rows[:limit]
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
    return views, ((str(rows[-1][1]), str(rows[-1][0])) if more else None)


def _events_holding(store: EntitlementStore, needles: list[bytes]) -> list[tuple[uuid.UUID, str]]:
    """(aggregate id, topic) of every stored event whose state holds one of
    `needles` (a key id): one pass over the events per needle."""
    found = {(i, v): topic for i, v, topic, _ in _events_with(store, needles, lower=False)}
    return [(i, topic) for (i, _), topic in found.items()]


def _events_naming(store: EntitlementStore, addresses: set[str]) -> list[tuple[uuid.UUID, str]]:
    """(aggregate id, topic) of every stored event whose state holds one of
    `addresses` in plaintext, however it is spelt there (any case, NFC or
    NFD, JSON-escaped): found by the part spelt the same everywhere, then
    checked with the whole pattern."""
    if not addresses:
        return []
    pattern = spelling_pattern(addresses)
    needles = sorted({plain_run(a).encode() for a in addresses})
    found: dict[tuple[uuid.UUID, int], str] = {}
    for aggregate_id, version, topic, state in _events_with(store, needles, lower=True):
        if pattern.search(state.decode("utf-8", "replace")):
            found[(aggregate_id, version)] = topic
    return [(i, topic) for (i, _), topic in found.items()]


def _events_with(
    store: EntitlementStore, needles: list[bytes], lower: bool
) -> list[tuple[uuid.UUID, int, str, bytes]]:
    """(aggregate id, version, topic, state) of the stored events whose state holds
    a needle (`lower`: its lower case does, the needle being lower case ASCII)."""
    recorder: Any = store.recorder
    found: list[tuple[uuid.UUID, int, str, bytes]] = []
    for needle in needles:
        if isinstance(recorder, PostgresRecorder):
            from psycopg.sql import SQL, Identifier

            statement = SQL(
                "SELECT originator_id, originator_version, topic, state FROM {schema}.{table}"
                + (
                    " WHERE strpos(lower(convert_from(state, 'UTF8')), %s) > 0"
                    if lower
                    else " WHERE position(%s::bytea IN state) > 0"
                )
            ).format(
                schema=Identifier(recorder.datastore.schema),
                table=Identifier(recorder.events_table_name),
            )
            with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
                cursor.execute(statement, (needle.decode() if lower else needle,))
                found += [
                    (
                        row["originator_id"],
                        row["originator_version"],
                        row["topic"],
                        bytes(row["state"]),
                    )
                    for row in cursor.fetchall()
                ]
        else:
            with recorder.datastore.transaction(commit=False) as cursor:
                cursor.execute(
                    f"SELECT originator_id, originator_version, topic, state"
                    f" FROM {recorder.events_table_name} WHERE "
                    + (
                        "instr(lower(CAST(state AS TEXT)), ?) > 0"
                        if lower
                        else "instr(state, ?) > 0"
                    ),
                    (needle.decode() if lower else needle,),
                )
                found += [
                    (recorder.convert_originator_id(row[0]), row[1], row[2], bytes(row[3]))
                    for row in cursor.fetchall()
                ]
    return found


def _rowcount(cursor: Any) -> int:
    """Rows the last statement changed (eventsourcing wraps SQLite's cursor)."""
    return int(getattr(cursor, "sqlite_cursor", cursor).rowcount)


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
            f"SELECT id FROM entitle_v4_receipts WHERE {_instr(read_model, 'body')}",
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


def _webhooks_naming(store: EntitlementStore, addresses: set[str]) -> set[str]:
    """Raw webhooks kept in plaintext that hold one of the addresses however
    spelt (one that changed nothing, `customer.updated` say, was sealed
    under no key; the provider's body is JSON inside JSON, escaped)."""
    table = store.keyring.table
    pattern = spelling_pattern(addresses)
    receipts: set[str] = set()
    for needle in sorted({plain_run(a) for a in addresses}):
        if table.postgres:
            # Sealed ones are binary, not text: left out before converting.
            where = (
                "position(? IN webhook) <> 1"
                " AND strpos(lower(convert_from(CASE WHEN position(? IN webhook) = 1"
                " THEN ''::bytea ELSE webhook END, 'UTF8')), ?) > 0"
            )
            params: tuple[Any, ...] = (SEALED, SEALED, needle)
        else:
            where = "substr(webhook, 1, ?) <> ? AND instr(lower(CAST(webhook AS TEXT)), ?) > 0"
            params = (len(SEALED), SEALED, needle)
        rows = table.rows(f"SELECT receipt, webhook FROM {table.webhooks} WHERE {where}", params)
        receipts |= {
            str(r[0]) for r in rows if pattern.search(bytes(r[1]).decode("utf-8", "replace"))
        }
    return receipts


def _delete_webhooks(store: EntitlementStore, receipts: set[str]) -> int:
    """Delete them; how many this call deleted (not another erasure at once)."""
    table = store.keyring.table
    deleted = 0
    with table.cursor(commit=True) as cursor:
        if not table.postgres:
            cursor.execute("PRAGMA secure_delete = ON")
        for receipt in sorted(receipts):
            cursor.execute(table.sql(f"DELETE FROM {table.webhooks} WHERE receipt = ?"), (receipt,))
            deleted += max(_rowcount(cursor), 0)
    return deleted


def _blank(value: Any, pattern: re.Pattern[str]) -> tuple[Any, bool]:
    """`value` (decoded JSON) with every string holding an address however
    spelt (`pattern`) made None, and whether anything was."""
    if isinstance(value, str):
        return (None, True) if pattern.search(value) else (value, False)
    if isinstance(value, dict):
        changed = False
        out = {}
        for key, item in value.items():
            out[key], hit = _blank(item, pattern)
            changed = changed or hit
        return out, changed
    if isinstance(value, list):
        pairs = [_blank(item, pattern) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


#: Anything shaped like an e-mail address, in text that is no JSON.
_ADDRESS = re.compile(r"[^\s\"'<>,;:{}\[\]]+@[^\s\"'<>,;:{}\[\]]+")


def _scrub_read_model(read_model: ReadModel, entitlements: set[uuid.UUID]) -> None:
    with read_model.transaction() as cur:
        for entitlement_id in entitlements:
            cur.execute(
                read_model.sql("SELECT body FROM entitle_v4_entitlements WHERE id = ?"),
                (str(entitlement_id),),
            )
            row = cur.fetchone()
            if row is None:
                continue
            try:
                body = json.loads(row[0])
            except ValueError:
                body = None
            if isinstance(body, dict):
                if isinstance(body.get("customer"), dict):
                    body["customer"]["email"] = None
                text = json.dumps(body)
            else:
                # A row that does not parse (changed by hand): every address
                # in it goes; `entitle replay` rebuilds the row from the log.
                log.warning(
                    "erasure: entitlement %s's read-model row is unreadable", entitlement_id
                )
                text = _ADDRESS.sub("", row[0])
            cur.execute(
                read_model.sql(
                    "UPDATE entitle_v4_entitlements SET customer_email = NULL, body = ?"
                    " WHERE id = ?"
                ),
                (text, str(entitlement_id)),
            )


def _table_exists(read_model: ReadModel, name: str) -> bool:
    if read_model.postgres:
        rows = _rows(read_model, "SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(rows[0][0])
    rows = _rows(
        read_model, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    )
    return bool(rows)


def _scrub_outbox(read_model: ReadModel, addresses: set[str]) -> int:
    """Blank the addresses (however spelt: a payload escapes non-ASCII and
    quotes) in outbound jobs' payloads and their attempts' answers; a mail
    to one that was not sent yet is given up. How many jobs this call
    changed (not another erasure at once)."""
    if not addresses or not _table_exists(read_model, "entitle_outbox_jobs"):
        return 0
    pattern = spelling_pattern(addresses)
    scrubbed = 0
    with read_model.transaction() as cur:
        for needle in sorted({plain_run(a) for a in addresses}):
            cur.execute(
                read_model.sql(
                    "SELECT id, kind, status, payload FROM entitle_outbox_jobs"
                    f" WHERE {_instr(read_model, 'lower(payload)')}"
                ),
                (needle,),
            )
            for job_id, kind, status, payload in cur.fetchall():
                blanked, hit = _blank(json.loads(payload), pattern)
                if not hit:
                    continue
                gives_up = kind == "mail" and status == "pending"
                cur.execute(
                    read_model.sql(
                        "UPDATE entitle_outbox_jobs SET payload = ?, status = ?,"
                        " last_error = CASE WHEN ? THEN ? ELSE last_error END"
                        " WHERE id = ? AND payload = ?"
                    ),
                    (
                        json.dumps(blanked),
                        "failed" if gives_up else status,
                        gives_up,
                        "its customer's personal data were erased",
                        job_id,
                        payload,
                    ),
                )
                if _rowcount(cur) != 1:
                    continue
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
                        (_replace(answer, pattern), _replace(error, pattern), job_id, n),
                    )
    return scrubbed


def _replace(text: str | None, pattern: re.Pattern[str]) -> str | None:
    return None if text is None else pattern.sub(_ERASED, text)


def _checkpoint(read_model: ReadModel) -> None:
    """SQLite: copy the WAL into the database and empty it, so the pages
    that held the address before (old versions) leave the files."""
    if read_model.postgres:
        return
    with sqlite3.connect(read_model.sqlite_path, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
