"""The fold against real stores (SQLite and PostgreSQL): batches, tracking,
duplicates, dead letters, and rebuilding the read model."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.domain import Aggregate, event

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain.dead_letter import DeadLetter
from domain.entitlement import Entitlement, Status, entitlement_id
from services.codes import CodeBook
from services.config import Config, parse_config
from services.fold import DomainService
from services.licensing import Held, ValidationIndex
from services.projections import (
    READ_MODEL,
    Follower,
    LogBell,
    ReadModelProjection,
    listen,
    replay,
)
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se

pytestmark = pytest.mark.integration

CONFIG = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
""")
NOW = int(time.time())
CODES = CodeBook("test-code-secret-0123456789")
YEAR = 365 * 86400


@dataclass(frozen=True)
class Record:
    """A Kafka record as the consumer hands it over."""

    topic: str
    partition: int
    offset: int
    value: bytes


def record(offset: int, event: dict[str, object], partition: int = 0) -> Record:
    envelope = RawWebhookV1(
        receipt_id=f"r{partition}-{offset}",
        source="stripe-main",
        provider="stripe",
        routing_key="k",
        received_at=datetime.now(UTC),
        headers={},
        body=se.body(event).decode(),
    )
    return Record(RAW_TOPIC, partition, offset, envelope.model_dump_json().encode())


def paid(
    subscription: str, years: int = 1, event_id: str | None = None, sku: str = "better_annual"
) -> dict[str, object]:
    return se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        event_id=event_id,
        lines=[{"price": "p", "sku": sku, "start": NOW, "end": NOW + years * YEAR}],
    )


@pytest.fixture
def store(database_url: str) -> EntitlementStore:
    return EntitlementStore(database_url)


def service(store: EntitlementStore, config: Config = CONFIG) -> DomainService:
    return DomainService(store, config, CODES)


def test_a_batch_is_saved_with_its_kafka_position(store: EntitlementStore) -> None:
    records = [record(i, paid(f"sub_{i}")) for i in range(50)]
    result = service(store).process(records)
    assert (result.webhooks, result.skipped, result.dead_letters) == (50, 0, 0)
    assert store.position(f"{RAW_TOPIC}/0") == 49
    for i in range(50):
        ent = store.find(
            entitlement_id("stripe-main", f"sub_{i}", se.item_id(f"sub_{i}", "p")), object
        )
        assert ent is not None and ent.status is Status.ACTIVE


def test_redelivered_offsets_are_skipped(store: EntitlementStore) -> None:
    records = [record(i, paid(f"sub_{i}", years=1 + i)) for i in range(10)]
    service(store).process(records[:6])
    events_before = store.process_recorder.max_notification_id()
    # A rebalance or crash redelivers from an older committed offset.
    result = service(store).process(records[3:])
    assert (result.webhooks, result.skipped) == (4, 3)
    assert store.position(f"{RAW_TOPIC}/0") == 9
    # Only the four new webhooks added events.
    assert store.process_recorder.max_notification_id() > events_before
    again = service(store).process(records)
    assert (again.webhooks, again.skipped, again.events) == (0, 10, 0)


def test_partitions_are_tracked_separately(store: EntitlementStore) -> None:
    records = [
        record(0, paid("sub_a"), partition=0),
        record(0, paid("sub_b"), partition=3),
        record(1, paid("sub_c"), partition=3),
    ]
    service(store).process(records)
    assert store.position(f"{RAW_TOPIC}/0") == 0
    assert store.position(f"{RAW_TOPIC}/3") == 1


def test_the_same_provider_event_at_two_offsets_applies_once(store: EntitlementStore) -> None:
    event = paid("sub_dup")
    result = service(store).process([record(0, event), record(1, event)])
    assert result.webhooks == 2
    ent_id = entitlement_id("stripe-main", "sub_dup", se.item_id("sub_dup", "p"))
    assert [type(e).__name__ for e in store.history(ent_id)] == ["Created", "Activated"]
    service(store).process([record(2, event)])
    assert len(store.history(ent_id)) == 2


def test_unmappable_webhooks_become_dead_letters_once(store: EntitlementStore) -> None:
    event = paid("sub_x", sku="nope")
    result = service(store).process(
        [record(0, event), record(1, event), Record(RAW_TOPIC, 0, 2, b"not an envelope")]
    )
    assert result.dead_letters == 2
    letters = [c.dead_letter for c in Follower(store).read(0, 100)[0] if c.dead_letter]
    reasons = sorted(letter.reason for letter in letters if letter)
    assert reasons[0].startswith("offering_sku 'nope' maps to no offering")
    assert reasons[1].startswith("unreadable envelope")
    kept = [letter.webhook["body"] for letter in letters if letter and letter.source == "?"]
    assert kept == ["not an envelope"]  # the raw bytes are kept, not dropped


def test_replay_rebuilds_the_same_read_model(store: EntitlementStore, database_url: str) -> None:
    service(store).process([record(i, paid(f"sub_{i % 7}", years=1 + i)) for i in range(40)])
    read_model = ReadModel(database_url)
    projection = ReadModelProjection(read_model)
    follower = Follower(store)
    changes, last = follower.read(0, 1000)
    assert last is not None
    projection.apply(changes, last)
    before = read_model.entitlements(limit=1000)
    assert len(before) == 7
    assert {e.period_end for e in before if e.order_ref == "sub_6"} == {
        datetime.fromtimestamp(NOW + 35 * YEAR, UTC)  # i = 34, the latest paid period
    }
    assert replay(store, read_model) > 0
    assert read_model.entitlements(limit=1000) == before
    assert read_model.position(READ_MODEL) == last
    read_model.close()


FIXED = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
  - {{sku: gold, product: acme, seats: 10, features: {{sso: true}}}}
""")


def entitlement_states(store: EntitlementStore, subscription: str) -> dict[str, tuple[object, ...]]:
    states = {}
    for price in ("p", "p2"):
        ent = store.find(
            entitlement_id("stripe-main", subscription, se.item_id(subscription, price)),
            Entitlement,
        )
        if ent is not None:
            states[price] = (
                ent.status,
                ent.sku,
                ent.seats,
                ent.features,
                ent.period_start,
                ent.period_end,
                ent.customer_email,
            )
    return states


def test_a_redrive_after_fixing_the_catalog_gives_the_first_time_result(
    store: EntitlementStore, database_url: str
) -> None:
    event = se.invoice_paid(
        subscription="sub_r",
        shape=se.LEGACY,
        lines=[
            {"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR},
            {"price": "p2", "sku": "gold", "start": NOW, "end": NOW + YEAR},
        ],
    )
    hopeless = paid("sub_h", sku="platinum")
    result = service(store).process([record(0, event), record(1, hopeless)])
    assert result.dead_letters == 2
    assert set(entitlement_states(store, "sub_r")) == {"p"}  # the mapped line applied at once

    letters = {c.dead_letter.id for c in Follower(store).read(0, 1000)[0] if c.dead_letter}
    assert service(store, FIXED).redrive(sorted(letters)) == (1, 1)
    redriven = entitlement_states(store, "sub_r")

    # The same webhook, mapped in full the first time, in a fresh store.
    fresh = EntitlementStore(f"sqlite:///{Path(tempfile.mkdtemp()) / 'fresh.db'}")
    service(fresh, FIXED).process([record(0, event)])
    assert redriven == entitlement_states(fresh, "sub_r")
    assert redriven["p2"][:3] == (Status.ACTIVE, "gold", 10)

    # Resolved letters are not re-driven again; the hopeless one stays unresolved.
    by_id = {letter_id: store.find(letter_id, DeadLetter) for letter_id in letters}
    resolved = [letter for letter in by_id.values() if letter and letter.resolved_at]
    assert len(resolved) == 1
    assert service(store, FIXED).redrive(sorted(letters)) == (0, 1)


def test_a_cached_order_changed_by_another_consumer_is_reloaded(
    store: EntitlementStore, database_url: str
) -> None:
    """After a rebalance another consumer may have changed an order this one
    still has in memory: the stale copy must be reloaded (caught by the
    version check, or by the save conflict it would cause), never trusted."""
    catalog = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: basic, product: acme, stripe_price_ids: [price_basic]}}
  - {{sku: addon, product: acme, stripe_price_ids: [price_addon]}}
""")
    first = DomainService(store, catalog, CODES)
    other = DomainService(EntitlementStore(database_url), catalog, CODES)
    basic = {"price": "price_basic", "item": "si_basic"}
    first.process(
        [
            record(
                0,
                se.subscription_event(
                    "customer.subscription.created",
                    subscription="sub_c",
                    items=[basic],
                    start=NOW,
                    end=NOW + YEAR,
                    created=NOW,
                ),
            )
        ]
    )
    other.process(
        [
            record(
                1,
                se.subscription_event(
                    "customer.subscription.updated",
                    subscription="sub_c",
                    items=[basic, {"price": "price_addon", "item": "si_addon"}],
                    start=NOW,
                    end=NOW + YEAR,
                    created=NOW + 60,
                ),
            )
        ]
    )
    first.process(
        [record(2, se.subscription_deleted(subscription="sub_c", items=[basic], created=NOW + 120))]
    )
    statuses = {}
    for slot in ("si_basic", "si_addon"):
        ent = store.find(entitlement_id("stripe-main", "sub_c", slot), Entitlement)
        assert ent is not None
        statuses[slot] = ent.status
    assert statuses == {"si_basic": Status.CANCELED, "si_addon": Status.CANCELED}


def test_the_validation_index_follows_the_read_model(
    store: EntitlementStore, database_url: str
) -> None:
    read_model = ReadModel(database_url)
    follower, projection = Follower(store), ReadModelProjection(read_model)
    index = ValidationIndex(read_model)
    position = 0

    def project(limit: int = 1000) -> None:
        nonlocal position
        changes, last = follower.read(position, limit)
        assert last is not None
        projection.apply(changes, last)
        position = last

    service(store).process([record(0, paid("sub_a")), record(1, paid("sub_b"))])
    project()
    assert index.refresh() == 2
    a = entitlement_id("stripe-main", "sub_a", se.item_id("sub_a", "p"))
    b = entitlement_id("stripe-main", "sub_b", se.item_id("sub_b", "p"))
    first, second = CODES.hash(a, 0), CODES.hash(a, 1)
    assert (found := index.get(first)) is not None and found.status == "ACTIVE"
    assert index.get(second) is None
    assert index.refresh() == 0  # nothing written since

    at = datetime.now(UTC)
    store.change(a, lambda e: e.issue_code(CODES.hash, "ops", "r1", at) and None)
    store.change(a, lambda e: e.revoke_code(0, "ops", "r2", at))
    canceled = store.change(
        a, lambda e: e.administer("cancel", "ops", "fraud", "r3", CONFIG.catalog, CONFIG.policy, at)
    )
    # What this process saved is held at once; the read model, still behind,
    # does not take it back.
    assert canceled is not None
    index.saved(canceled)
    assert index.get(first) is None
    assert (found := index.get(second)) is not None and found.status == "CANCELED"
    project(limit=1)  # the read model learns of the second code only
    assert index.refresh() == 1
    assert index.get(first) is None
    assert (found := index.get(second)) is not None and found.status == "CANCELED"
    project()
    assert index.refresh() == 1
    assert index.get(first) is None  # revoked
    assert (found := index.get(second)) is not None and found.status == "CANCELED"
    assert (other := index.get(CODES.hash(b, 0))) is not None and other.status == "ACTIVE"
    # After a restart, the index starts from the same state.
    again = ValidationIndex(read_model)
    again.refresh()

    def state(held: Held | None) -> tuple[object, ...] | None:
        return None if held is None else tuple(getattr(held, name) for name in Held.__slots__)

    # Paged a row at a time (rows of one batch share a position), the same.
    paged = ValidationIndex(read_model, page=1)
    assert paged.refresh() == 2 and paged.loaded
    for code in (first, second, CODES.hash(b, 0)):
        assert state(again.get(code)) == state(index.get(code)) == state(paged.get(code))
    read_model.close()


def test_followers_are_woken_by_each_write_to_the_postgres_log(postgres_url: str) -> None:
    store = EntitlementStore(postgres_url)
    assert store.notify_channel is not None
    embedded = EntitlementStore(f"sqlite:///{tempfile.mkdtemp()}/e.db")
    assert embedded.notify_channel is None
    embedded.close()

    async def scenario() -> None:
        bell, stop = LogBell(), asyncio.Event()
        listening = asyncio.create_task(
            listen(postgres_url, store.notify_channel or "", bell, stop)
        )
        try:
            # The listener rings once when it starts; the next ring is the write's.
            await asyncio.wait_for(bell.armed().wait(), 10)
            rung = bell.armed()
            await asyncio.sleep(0.2)
            assert not rung.is_set()
            await asyncio.to_thread(service(store).process, [record(0, paid("sub_a"))])
            await asyncio.wait_for(rung.wait(), 10)
        finally:
            stop.set()
            await listening

    asyncio.run(scenario())
    store.close()


def test_processes_starting_together_on_an_empty_database_create_its_tables_once(
    database_url: str,
) -> None:
    """compose.yaml starts every service at once against a fresh database:
    concurrent CREATE TABLE IF NOT EXISTS collide in PostgreSQL's catalog
    (IntegrityError on pg_type), and on SQLite in eventsourcing's record of
    its tables' migration, unless creation is serialised."""
    import multiprocessing

    start = time.time() + 3  # all at once, their imports done
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        errors = pool.map(_open_stores, [(database_url, start)] * 8)
    assert errors == [None] * 8


def _open_stores(args: tuple[str, float]) -> str | None:
    url, start = args
    time.sleep(max(0.0, start - time.time()))
    try:
        EntitlementStore(url).close()
        ReadModel(url).close()
    except Exception as exc:
        return repr(exc)
    return None


def test_entitle_history_names_what_is_no_entitlement(tmp_path: Path) -> None:
    import os
    import subprocess

    from domain.entitlement import order_id
    from tests.harness import ENTITLE

    url = f"sqlite:///{tmp_path / 'entitle.db'}"
    store = EntitlementStore(url)
    service(store).process([record(0, paid("sub_hist"))])
    slot = entitlement_id("stripe-main", "sub_hist", se.item_id("sub_hist", "p"))
    entitlement = store.find(slot, Entitlement)
    assert entitlement is not None
    store.close()

    def history(what: str, *options: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ENTITLE_DATABASE_URL": url}
        return subprocess.run(
            [ENTITLE, "history", what, *options],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )

    shown = history(str(entitlement.id), "--json")
    assert shown.returncode == 0 and '"entitlement.created"' in shown.stdout
    timeline = history(str(entitlement.id))
    assert timeline.returncode == 0 and " v1   entitlement.created " in timeline.stdout
    for what, code in (("not-a-uuid", 2), (str(order_id("stripe-main", "sub_hist")), 1)):
        refused = history(what)
        assert refused.returncode == code, refused.stderr
        assert "Traceback" not in refused.stderr and refused.stdout == ""


@pytest.mark.parametrize(
    ("table", "mode", "opener"),
    [
        # What a projector's write holds until it commits.
        ("entitle_v4_entitlements", "ROW EXCLUSIVE", ReadModel),
        # What the fold's insert into the log holds until it commits.
        ("entitle_events", "EXCLUSIVE", EntitlementStore),
    ],
)
def test_opening_the_store_does_not_wait_for_a_writer(
    postgres_url: str, table: str, mode: str, opener: Any
) -> None:
    """A process starting (an API, a second domain service) while another
    holds a write open: creating what already exists must take no table
    lock, or it waits on the writer (and once deadlocked with it)."""
    ReadModel(postgres_url).close()  # the tables exist
    EntitlementStore(postgres_url).close()
    with psycopg.connect(postgres_url) as writer:
        writer.execute(f"LOCK TABLE {table} IN {mode} MODE")
        opened: list[Any] = []
        thread = threading.Thread(target=lambda: opened.append(opener(postgres_url)))
        thread.start()
        thread.join(5)
        assert opened, f"opening waited for the writer's transaction on {table}"
        writer.rollback()
    thread.join()
    opened[0].close()


def test_postgres_connections_do_not_jit_compile(postgres_url: str) -> None:
    """The fold's bulk reads on a large log were estimated past PostgreSQL's
    JIT threshold and spent more time compiling than running (49 of 87 ms a
    query on 5 million events): the store's and the read model's
    connections turn it off."""
    store, read_model = EntitlementStore(postgres_url), ReadModel(postgres_url)
    try:
        recorder: Any = store.recorder
        for _ in range(3):  # every connection of the pool, not only the first
            with recorder.datastore.get_connection() as conn:
                assert conn.execute("SHOW jit").fetchone() == {"jit": "off"}
        assert read_model._query("SHOW jit") == [("off",)]
    finally:
        store.close()
        read_model.close()


class Tally(Aggregate):
    """A bare aggregate with as many versions as it was bumped, plus one."""

    def __init__(self) -> None:
        self.count = 0

    @event("Bumped")
    def bump(self) -> None:
        self.count += 1


def test_bulk_reads_rebuild_each_aggregate_whole_and_in_order(store: EntitlementStore) -> None:
    """What the fold's cache check and loads and the projections' bulk reads
    return: more ids than one query takes (1,000), in any order, repeated or
    unknown, each aggregate rebuilt from its own events in version order."""
    tallies = [Tally() for _ in range(1100)]
    for n, tally in enumerate(tallies):
        for _ in range(n % 4):
            tally.bump()
    store.record(tallies, None)
    known = [tally.id for tally in tallies]
    asked = [*reversed(known), *known[:5], uuid4()]
    loaded = store.load_many(asked)
    assert set(loaded) == set(known)
    assert all(
        (loaded[t.id].version, getattr(loaded[t.id], "count", None)) == (t.version, t.count)
        for t in tallies
    )
    assert store.versions(asked) == {t.id: t.version for t in tallies}
    first = store.aggregates_at({t.id: 1 for t in tallies})
    assert set(first) == set(known)
    assert all((a.version, getattr(a, "count", None)) == (1, 0) for a in first.values())
