"""The ingress alone, against a real broker: nothing is acknowledged that the
broker has not stored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from services.kafka import EmbeddedBroker
from tests import stripe_events as se
from tests.harness import Entitle

pytestmark = pytest.mark.integration

CONFIG = f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings: [{{sku: better_annual, product: acme}}]
"""


def post(entitle: Entitle, subscription: str) -> httpx.Response:
    body = se.body(se.subscription_deleted(subscription=subscription))
    return httpx.post(
        f"{entitle.url}/webhooks/stripe-main",
        content=body,
        headers=se.signed_headers(body),
        timeout=30,
    )


def stored(bootstrap: str) -> list[RawWebhookV1]:
    async def run() -> list[RawWebhookV1]:
        consumer = AIOKafkaConsumer(
            RAW_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=3000)
        finally:
            await consumer.stop()
        return [RawWebhookV1.model_validate_json(r.value) for p in batch.values() for r in p]

    return asyncio.run(run())


def test_accepted_webhooks_are_on_the_raw_topic_keyed_by_subscription(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    with (
        EmbeddedBroker() as broker,
        Entitle(
            ["ingress"],
            tmp_path,
            {"ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap, "ENTITLE_KAFKA_IDEMPOTENCE": "false"},
        ) as ingress,
    ):
        response = post(ingress, "sub_ok")
        assert response.status_code == 202
        [envelope] = stored(broker.bootstrap)
        assert envelope.receipt_id == response.json()["receipt_id"]
        assert (envelope.source, envelope.provider, envelope.routing_key) == (
            "stripe-main",
            "stripe",
            "sub_ok",
        )
        assert "stripe-signature" in envelope.headers


def test_broker_down_gives_503_so_the_provider_retries(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    broker = EmbeddedBroker().__enter__()
    ingress = Entitle(
        ["ingress"],
        tmp_path,
        {"ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap, "ENTITLE_KAFKA_IDEMPOTENCE": "false"},
    ).start()
    try:
        assert post(ingress, "sub_before").status_code == 202
        broker.stop()
        started = time.monotonic()
        response = post(ingress, "sub_after")
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "broker_unavailable"
        assert response.headers["retry-after"]
        assert time.monotonic() - started < 20
    finally:
        ingress.kill()
        broker.stop()


def test_the_written_out_202_is_the_accepted_contract() -> None:
    import json
    import uuid

    from contracts.api import Accepted
    from services.ingress import accepted

    receipt = str(uuid.uuid4())
    answer = accepted(receipt)
    assert answer.status_code == 202 and answer.media_type == "application/json"
    assert json.loads(answer.body) == Accepted(receipt_id=receipt).model_dump()
