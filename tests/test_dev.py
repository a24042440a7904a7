"""End to end: `entitle dev` as a subprocess, driven over HTTP with webhooks
signed by the official `stripe` package."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from contracts.events import EVENTS_TOPIC, EntitlementEventV1
from contracts.webhooks import DEAD_LETTER_TOPIC, DeadLetterV1
from tests import stripe_events as se
from tests.harness import ENTITLE, Entitle, eventually

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "ops:ek_test_admin_key"
AUTH = {"Authorization": "Bearer ek_test_admin_key"}
CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - sku: better_annual
    product: acme-studio
    period: P1Y
    seats: 3
    features: {{export: true, cloud_sync: true}}
    limits: {{projects: 50}}
  - sku: basic_monthly
    product: acme-studio
    stripe_price_ids: [price_basic]
"""
YEAR = 365 * 86400


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: Any, tmp_path: Path) -> Any:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    if request.param == "postgres":
        env["ENTITLE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    with Entitle(["dev"], tmp_path, env) as entitle:
        yield entitle


def post(
    entitle: Entitle, event: dict[str, Any], source: str = "stripe-main", **sign: Any
) -> httpx.Response:
    body = se.body(event)
    return httpx.post(
        f"{entitle.url}/webhooks/{source}", content=body, headers=se.signed_headers(body, **sign)
    )


def entitlements(entitle: Entitle, **query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{entitle.url}/v1/entitlements", params=query, headers=AUTH)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def consume(bootstrap: str, topic: str, count: int, timeout: float = 10.0) -> list[Any]:
    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        records: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            while len(records) < count and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
        finally:
            await consumer.stop()
        return records

    return asyncio.run(run())


def test_a_paid_invoice_becomes_active_entitlements_then_deletion_cancels(stack: Entitle) -> None:
    now = int(time.time())
    paid = se.invoice_paid(
        subscription="sub_e2e",
        customer="cus_e2e",
        email="ada@example.com",
        shape=se.LEGACY,
        lines=[
            {
                "price": "price_annual",
                "sku": "better_annual",
                "quantity": 2,
                "start": now,
                "end": now + YEAR,
            },
            {"price": "price_basic", "start": now, "end": now + YEAR // 12},
        ],
    )
    response = post(stack, paid)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"

    items = eventually(
        lambda: len(e := entitlements(stack, order_ref="sub_e2e")) == 2 and e, timeout=5
    )
    annual = next(i for i in items if i["offering"] == "better_annual")
    assert annual["status"] == "ACTIVE"
    assert annual["product"] == "acme-studio"
    assert annual["features"] == {"export": True, "cloud_sync": True}
    assert annual["limits"] == {"projects": 50}
    assert annual["seats"] == 6
    assert annual["customer"] == {"id": "cus_e2e", "email": "ada@example.com"}
    assert annual["order_ref"] == "sub_e2e"
    assert annual["period_end"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(now + YEAR)))
    assert len(annual["activation_code"]) == 29

    one = httpx.get(f"{stack.url}/v1/entitlements/{annual['id']}", headers=AUTH).json()
    assert one == annual
    assert (
        entitlements(stack, customer_email="ada@example.com", offering="basic_monthly")[0]["seats"]
        == 1
    )

    # The same Stripe event again (a retry) changes nothing.
    assert post(stack, paid).status_code == 202
    deleted = se.subscription_deleted(subscription="sub_e2e")
    assert post(stack, deleted).status_code == 202
    eventually(
        lambda: {i["status"] for i in entitlements(stack, order_ref="sub_e2e")} == {"CANCELED"},
        timeout=5,
    )

    history = httpx.get(f"{stack.url}/v1/entitlements/{annual['id']}/history", headers=AUTH)
    assert history.status_code == 200
    events = history.json()["events"]
    assert [(e["version"], e["type"]) for e in events] == [
        (1, "entitlement.created"),
        (2, "entitlement.activated"),
        (3, "entitlement.canceled"),
    ]
    assert events[1]["cause"] == {
        "kind": "provider",
        "source": "stripe-main",
        "event_id": paid["id"],
    }
    assert events[2]["cause"]["event_id"] == deleted["id"]
    assert all(e["recorded_at"] for e in events)

    # Every domain event is on the public topic, valid against the contract.
    bootstrap = stack.printed(r"broker:\s+(\S+)")
    records = consume(bootstrap, EVENTS_TOPIC, 6)
    published = [EntitlementEventV1.model_validate_json(r.value) for r in records]
    mine = [
        p
        for p in published
        if p.entitlement_id == annual["id"] or str(p.entitlement_id) == annual["id"]
    ]
    assert [
        (p.type, p.previous_status, p.status) for p in sorted(mine, key=lambda p: p.sequence)
    ] == [
        ("entitlement.created", None, "PENDING"),
        ("entitlement.activated", "PENDING", "ACTIVE"),
        ("entitlement.canceled", "ACTIVE", "CANCELED"),
    ]
    assert all(
        r.key == annual["id"].encode()
        for r in records
        if r.value and json.loads(r.value)["entitlement_id"] == annual["id"]
    )
    assert len(published) == 6


def test_current_api_invoice_shape_maps_by_catalog_price_id(stack: Entitle) -> None:
    now = int(time.time())
    paid = se.invoice_paid(
        subscription="sub_basil",
        shape=se.BASIL,
        lines=[{"price": "price_basic", "quantity": 3, "start": now, "end": now + YEAR // 12}],
    )
    assert post(stack, paid).status_code == 202
    [item] = eventually(lambda: entitlements(stack, order_ref="sub_basil"), timeout=5)
    assert (item["offering"], item["status"], item["seats"]) == ("basic_monthly", "ACTIVE", 3)


def test_an_unmappable_price_is_dead_lettered_not_dropped(stack: Entitle) -> None:
    now = int(time.time())
    paid = se.invoice_paid(
        subscription="sub_dl",
        shape=se.BASIL,
        lines=[{"price": "price_unknown", "start": now, "end": now + YEAR}],
    )
    assert post(stack, paid).status_code == 202

    def listed() -> list[dict[str, Any]]:
        r = httpx.get(f"{stack.url}/v1/dead-letters", headers=AUTH)
        return [d for d in r.json()["items"] if d["provider_event_id"] == paid["id"]]

    [letter] = eventually(listed, timeout=5)
    assert "price 'price_unknown' maps to no offering" in letter["reason"]
    assert entitlements(stack, order_ref="sub_dl") == []
    [record] = consume(stack.printed(r"broker:\s+(\S+)"), DEAD_LETTER_TOPIC, 1)
    message = DeadLetterV1.model_validate_json(record.value)
    assert message.provider_event_id == paid["id"]
    assert json.loads(message.webhook.body) == paid  # the raw webhook, for a re-drive


def test_ingress_rejects_bad_requests_with_json_errors(stack: Entitle) -> None:
    event = se.subscription_deleted(subscription="sub_x")
    body = se.body(event)
    url = f"{stack.url}/webhooks/stripe-main"

    def check(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.json()["error"] == code and response.json()["detail"]

    check(
        httpx.post(f"{stack.url}/webhooks/nope", content=body, headers=se.signed_headers(body)),
        404,
        "unknown_source",
    )
    check(httpx.post(url, content=body), 401, "invalid_signature")
    check(
        httpx.post(url, content=body, headers=se.signed_headers(body, secret="whsec_no")),
        401,
        "invalid_signature",
    )
    check(
        httpx.post(
            url, content=body, headers=se.signed_headers(body, timestamp=int(time.time()) - 600)
        ),
        401,
        "invalid_signature",
    )
    check(httpx.post(url, content=b"", headers=se.signed_headers(b"")), 400, "empty_body")
    check(
        httpx.post(url, content=b"not json", headers=se.signed_headers(b"not json")),
        400,
        "invalid_json",
    )
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    check(httpx.post(url, content=big, headers=se.signed_headers(big)), 413, "payload_too_large")
    check(httpx.get(f"{stack.url}/v1/entitlements"), 401, "unauthorized")
    check(
        httpx.get(f"{stack.url}/v1/entitlements", headers={"Authorization": "Bearer nope"}),
        401,
        "unauthorized",
    )
    check(
        httpx.get(f"{stack.url}/v1/entitlements", params={"status": "HAPPY"}, headers=AUTH),
        422,
        "invalid_query",
    )
    check(httpx.get(f"{stack.url}/v1/entitlements/not-a-uuid", headers=AUTH), 422, "invalid_id")
    check(
        httpx.get(
            f"{stack.url}/v1/entitlements/00000000-0000-0000-0000-000000000000", headers=AUTH
        ),
        404,
        "not_found",
    )
    # Nothing rejected was written: no entitlement or dead letter appeared.
    time.sleep(0.5)
    assert httpx.get(f"{stack.url}/v1/dead-letters", headers=AUTH).json()["items"] == []
    assert se.SECRET not in stack.text and "ek_test_admin_key" not in stack.text


def test_dev_prints_its_urls_and_a_generated_admin_key(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "entitle.yaml", tmp_path / "entitle.yaml")
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ""}) as entitle:
        key = entitle.printed(r"admin key[^:]*: (ek_\S+)")
        assert f"{entitle.url}/webhooks/stripe-main" in entitle.text
        assert f"{entitle.url}/v1/entitlements" in entitle.text
        ok = httpx.get(f"{entitle.url}/v1/entitlements", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        docs = httpx.get(entitle.printed(r"docs:\s+(\S+)"))
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert entitle.process is not None and entitle.process.returncode == 0
    # Kept with the other secrets: the same key after a restart, readable by its owner only.
    kept = tmp_path / ".entitle" / "admin-key"
    assert kept.read_text().strip() == key and kept.stat().st_mode & 0o077 == 0
    # So is the directory with the database (buyers' addresses) and the mails.
    assert (tmp_path / ".entitle" / "entitle.db").exists()
    assert (tmp_path / ".entitle").stat().st_mode & 0o077 == 0
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ""}) as again:
        assert again.printed(r"admin key[^:]*: (ek_\S+)") == key


def test_operating_commands_default_to_the_running_dev_stacks_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    shutil.copy(ROOT / "examples" / "entitle.yaml", tmp_path / "conf" / "shop.yaml")
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    with Entitle(["dev", "--config", "conf/shop.yaml"], tmp_path, env) as stack:
        ran = subprocess.run(
            [str(ENTITLE), "redrive"],
            cwd=tmp_path,
            env={**stack.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    # Not "cannot read configuration entitle.yaml": the stack's own file and store.
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("re-drove 0 dead letter(s)")


def test_a_wrong_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "entitle.yaml", tmp_path / "entitle.yaml")
    for variable, value, says in (
        ("ENTITLE_RAW_PARTITIONS", "abc", "valid integer"),
        ("ENTITLE_DATABASE_URL", "mysql://db/entitle", "must be sqlite:///PATH or postgresql://"),
        ("ENTITLE_ADMIN_KEYS", "ops:short", "entry 1 has a key of 5 characters"),
        ("ENTITLE_LOG_FORMAT", "xml", "'text' or 'json'"),
    ):
        run = subprocess.run(
            [str(ENTITLE), "dev", "--config", "entitle.yaml"],
            cwd=tmp_path,
            env={**os.environ, variable: value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, (variable, run.stdout, run.stderr)
        [line] = run.stderr.splitlines()
        assert line.startswith(f"entitle: {variable}: ") and says in line, line
        assert "Traceback" not in run.stdout + run.stderr
    assert not (tmp_path / ".entitle" / "entitle.db").exists()  # nothing started


def test_a_restart_keeps_every_entitlement_and_replay_rebuilds_the_same(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    now = int(time.time())
    entitle = Entitle(["dev"], tmp_path, env).start()
    try:
        for n in range(5):
            event = se.invoice_paid(
                subscription=f"sub_r{n}",
                shape=se.LEGACY,
                lines=[{"price": "p", "sku": "better_annual", "start": now, "end": now + YEAR}],
            )
            assert post(entitle, event).status_code == 202
        assert post(entitle, se.subscription_deleted(subscription="sub_r0")).status_code == 202
        # Wait for the final state: "4 ACTIVE" alone also holds before the
        # deletion of sub_r0 is folded, if sub_r4 is not folded yet either.
        eventually(
            lambda: (
                len(entitlements(entitle, status="ACTIVE")) == 4
                and len(entitlements(entitle, status="CANCELED")) == 1
            ),
            timeout=10,
        )
        before = entitlements(entitle)
    finally:
        assert entitle.stop(signal.SIGINT) == 0
    assert len(before) == 5

    done = subprocess.run(
        [ENTITLE, "replay"],
        cwd=tmp_path,
        env={**os.environ, **env},
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilt from" in done.stdout

    with Entitle(["dev"], tmp_path, env) as again:
        assert entitlements(again) == before
