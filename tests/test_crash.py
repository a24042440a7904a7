"""Kill the domain service with SIGKILL mid-stream; after a restart every
webhook has been applied exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain.entitlement import Entitlement, entitlement_id
from services.kafka import ensure_topics
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.harness import Entitle, eventually

pytestmark = pytest.mark.integration

SUBSCRIPTIONS = 200
RENEWALS = 15
NOW = int(time.time())
YEAR = 365 * 86400
CONFIG = f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings: [{{sku: better_annual, product: acme, period: P1Y, seats: 3}}]
"""


def webhooks() -> list[tuple[bytes, bytes]]:
    """Each subscription's first payment and renewals, each a distinct
    Stripe event that extends the period by one more year."""
    out = []
    for year in range(1, RENEWALS + 2):
        for n in range(SUBSCRIPTIONS):
            sub = f"sub_crash_{n}"
            event = se.invoice_paid(
                subscription=sub,
                shape=se.LEGACY,
                lines=[
                    {"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + year * YEAR}
                ],
            )
            envelope = RawWebhookV1(
                receipt_id=f"{sub}-{year}",
                source="stripe-main",
                provider="stripe",
                routing_key=sub,
                received_at=datetime.now(UTC),
                headers={},
                body=se.body(event).decode(),
            )
            out.append((sub.encode(), envelope.model_dump_json().encode()))
    return out


async def produce(bootstrap: str, messages: list[tuple[bytes, bytes]]) -> None:
    await ensure_topics(bootstrap, raw_partitions=4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(RAW_TOPIC, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_sigkill_mid_stream_then_restart_applies_every_webhook_once(
    kafka_bootstrap: str, postgres_url: str, tmp_path: Path
) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    messages = webhooks()
    asyncio.run(produce(kafka_bootstrap, messages))
    store = EntitlementStore(postgres_url)
    env = {
        "ENTITLE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "ENTITLE_DATABASE_URL": postgres_url,
        "ENTITLE_KAFKA_IDEMPOTENCE": "false",
        "ENTITLE_DOMAIN_BATCH": "40",
    }
    domain = Entitle(["domain"], tmp_path, env).start()
    # Per subscription: order opened + entitlement added, entitlement created +
    # activated + one renewal each, and one payment record per invoice.
    total_events = SUBSCRIPTIONS * (2 + 2 + RENEWALS + (1 + RENEWALS))

    def folded() -> int:
        """Events stored, but for receipts (one event per fold transaction)."""
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM entitle_events WHERE topic NOT LIKE 'domain.receipt:%'"
            ).fetchone()
        return int(row[0]) if row else 0

    eventually(lambda: folded() > total_events // 5, timeout=60, every=0.005)
    domain.stop(signal.SIGKILL)
    at_kill = folded()
    assert at_kill < total_events, "the stream finished before the kill; make it longer"

    with Entitle(["domain"], tmp_path, env):
        eventually(lambda: folded() >= total_events, timeout=120, every=0.1)
        time.sleep(1.0)  # anything applied twice would land now

    assert folded() == total_events
    for n in range(SUBSCRIPTIONS):
        ent = store.find(
            entitlement_id("stripe-main", f"sub_crash_{n}", se.item_id(f"sub_crash_{n}", "p")),
            Entitlement,
        )
        assert ent is not None
        assert ent.version == 2 + RENEWALS
        assert ent.period_end == datetime.fromtimestamp(NOW, UTC) + timedelta(
            seconds=(RENEWALS + 1) * YEAR
        )
    # Every webhook has exactly one receipt: none lost, none twice.
    receipts = [
        item["receipt"]
        for event in store.process_recorder.select_notifications(start=1, limit=10**6)
        if event.topic == "domain.receipt:Receipts.Recorded"
        for item in store.mapper.to_domain_event(event).items
    ]
    assert sorted(receipts) == sorted(json.loads(value)["receipt_id"] for _, value in messages)
    positions = store.positions(RAW_TOPIC)
    assert len(positions) == 4  # one per partition, all of one incarnation of the topic
    assert sum(offset + 1 for offset in positions.values()) == len(messages)
    store.close()


_MEMBER = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer

async def main() -> None:
    consumer = AIOKafkaConsumer(
        "crash-topic", bootstrap_servers=sys.argv[1], group_id="crash-group",
        client_id=sys.argv[2], session_timeout_ms=30000, heartbeat_interval_ms=10000,
    )
    await consumer.start()
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    print("joined", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_restarted_process_takes_its_killed_predecessor_out_of_the_group(
    kafka_bootstrap: str,
) -> None:
    """A SIGKILLed member sends no LeaveGroup and would hold its partitions
    for its whole session (30 s here). Its successor, with the same client
    id, sends it away at start; another process's member is left alone."""
    import subprocess
    import sys

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from services.kafka import evict_predecessor

    async def members() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            [described] = await admin.describe_consumer_groups(["crash-group"])
            groups = described.to_object()["groups"]
            return [m["member_id"] for g in groups for m in g["members"]]
        finally:
            await admin.close()

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic("crash-topic", 2, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    member = subprocess.Popen(
        [sys.executable, "-c", _MEMBER, kafka_bootstrap, "entitle-domain@host-a"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdout is not None and member.stdout.readline().strip() == "joined"
    finally:
        member.kill()
        member.wait()
    [dead] = asyncio.run(members())
    assert dead.startswith("entitle-domain@host-a-")

    other = asyncio.run(evict_predecessor(kafka_bootstrap, "crash-group", "entitle-domain@host-b"))
    assert other == [] and asyncio.run(members()) == [dead]
    gone = asyncio.run(evict_predecessor(kafka_bootstrap, "crash-group", "entitle-domain@host-a"))
    assert gone == [dead]
    assert asyncio.run(members()) == []
