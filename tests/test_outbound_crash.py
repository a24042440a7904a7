"""SIGKILL the projector (and with it the dispatcher) mid-burst: after a
restart every webhook is delivered, in order per entitlement, and the only
duplicates are attempts whose 2xx was not yet saved when it died."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from standardwebhooks import Webhook

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from services.kafka import ensure_topics
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.receiver import receiver

pytestmark = pytest.mark.integration

SUBSCRIPTIONS = 300
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOW = int(time.time())


async def produce(bootstrap: str) -> None:
    await ensure_topics(bootstrap, raw_partitions=4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sends = []
        for n in range(SUBSCRIPTIONS):
            sub = f"sub_kill_{n}"
            event = se.invoice_paid(
                subscription=sub,
                lines=[{"price": "price_annual", "start": NOW, "end": NOW + 86400 * 365}],
            )
            envelope = RawWebhookV1(
                receipt_id=f"{sub}-1",
                source="stripe-main",
                provider="stripe",
                routing_key=sub,
                received_at=datetime.now(UTC),
                headers={},
                body=se.body(event).decode(),
            )
            sends.append(
                await producer.send(
                    RAW_TOPIC, envelope.model_dump_json().encode(), key=sub.encode()
                )
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


def _unsettled(postgres_url: str) -> int:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM entitle_outbox_jobs WHERE status <> 'succeeded'"
        ).fetchone()
    return int(row[0]) if row else -1


def test_sigkill_of_the_dispatcher_mid_burst_loses_nothing(
    kafka_bootstrap: str, postgres_url: str, tmp_path: Path
) -> None:
    with receiver() as local:
        local.delay["/crm"] = 0.01  # a burst that lasts a few seconds
        (tmp_path / "entitle.yaml").write_text(
            f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings: [{{sku: annual, product: acme, period: P1Y, stripe_price_ids: [price_annual]}}]
outbound:
  allow_http: true
  allow_private_networks: true
  endpoints:
    crm: {{url: "{local.url}/crm", secret_env: CRM_SECRET, events: [entitlement.*]}}
"""
        )
        env = {
            "ENTITLE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "ENTITLE_DATABASE_URL": postgres_url,
            "ENTITLE_KAFKA_IDEMPOTENCE": "false",
            "CRM_SECRET": SECRET,
        }
        asyncio.run(produce(kafka_bootstrap))
        expected = 2 * SUBSCRIPTIONS  # created and activated
        with Entitle(["domain"], tmp_path, env):
            projector = Entitle(["projector"], tmp_path, env).start()
            eventually(lambda: len(local.at("/crm")) > expected // 4, timeout=60, every=0.005)
            projector.stop(signal.SIGKILL)
            at_kill = len(local.at("/crm"))
            assert at_kill < expected, "the burst ended before the kill; make it longer"
            with Entitle(["projector"], tmp_path, env):
                eventually(
                    lambda: len({r.headers["webhook-id"] for r in local.at("/crm")}) >= expected,
                    timeout=120,
                    every=0.1,
                )
                # Every delivery's outcome saved (the dispatcher saves in
                # batches, after the receiver saw the request), then a
                # moment for anything sent twice more to land.
                eventually(lambda: _unsettled(postgres_url) == 0, timeout=60, every=0.1)
                time.sleep(1.0)

    received = local.at("/crm")
    ids = Counter(r.headers["webhook-id"] for r in received)
    assert len(ids) == expected
    duplicates = sum(count - 1 for count in ids.values())
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM entitle_outbox_attempts WHERE status_code = 200"
        ).fetchone()
    saved = int(row[0]) if row else 0
    # Each duplicate is a 2xx the dead process had not saved: the receiver
    # saw it, the outbox has no attempt for it.
    assert duplicates == len(received) - saved
    assert duplicates <= 2 * 64, duplicates
    print(f"\nSIGKILL after {at_kill} of {expected} deliveries: {duplicates} sent twice")
    # Every message verifies, and per entitlement they came in order.
    sequence: dict[str, list[int]] = {}
    for request in received:
        headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
        message = Webhook(SECRET).verify(request.body, headers)
        data = message["data"]
        seen = sequence.setdefault(data["entitlement_id"], [])
        if data["sequence"] not in seen:
            seen.append(data["sequence"])
    assert all(seen == [1, 2] for seen in sequence.values()), json.dumps(sequence)[:300]
    assert len(sequence) == SUBSCRIPTIONS
