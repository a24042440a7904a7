"""The lifecycle end to end through `entitle dev`: shuffled and duplicated
webhooks through Kafka, admin commands over HTTP, and a re-drive."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.events import EVENTS_TOPIC, EntitlementEventV1
from tests import stripe_events as se
from tests.harness import ENTITLE, Entitle, eventually
from tests.test_dev import ADMIN, AUTH, consume, entitlements, post

pytestmark = pytest.mark.e2e

DAY = 86400
CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - {{sku: basic, product: acme, seats: 1, limits: {{projects: 5}},
      stripe_price_ids: [price_basic]}}
  - {{sku: pro, product: acme, seats: 5, features: {{export: true}}, limits: {{projects: 50}},
      suspend_after_days: 3, expire_after_days: 14, stripe_price_ids: [price_pro]}}
"""


def story(sub: str, now: int) -> list[dict[str, Any]]:
    """One subscription's real-life history, in order: signed up 40 days
    ago, paid, renewed 10 days ago on an upgraded plan, a partial refund, a
    dispute that was won, then cancel-at-period-end requested."""
    p0, p1 = now - 40 * DAY, now - 10 * DAY
    item = "si_" + sub

    def invoice(k: int, start: int, price: str, kind: str = "invoice.paid") -> dict[str, Any]:
        return se.invoice_paid(
            subscription=sub,
            shape=se.LEGACY,
            kind=kind,
            lines=[{"price": price, "item": item, "start": start, "end": start + 30 * DAY}],
            invoice_id=f"in_{sub}_{k}",
            payment_intent=f"pi_{sub}_{k}",
            created=start + 60,
        )

    def snapshot(status: str, start: int, price: str, at: int, **kw: Any) -> dict[str, Any]:
        return se.subscription_event(
            kw.pop("kind", "customer.subscription.updated"),
            subscription=sub,
            items=[{"price": price, "item": item}],
            status=status,
            start=start,
            end=start + 30 * DAY,
            created=at,
            shape=se.LEGACY,
            **kw,
        )

    return [
        snapshot("incomplete", p0, "price_basic", p0 + 10, kind="customer.subscription.created"),
        invoice(0, p0, "price_basic"),
        snapshot("active", p0, "price_basic", p0 + 120),
        se.charge_refunded(
            payment_intent=f"pi_{sub}_0", invoice=f"in_{sub}_0", refunded=100, created=p0 + DAY
        ),
        se.dispute(
            "charge.dispute.created",
            dispute_id=f"dp_{sub}",
            payment_intent=f"pi_{sub}_0",
            created=p0 + 2 * DAY,
        ),
        se.dispute(
            "charge.dispute.closed",
            dispute_id=f"dp_{sub}",
            status="won",
            payment_intent=f"pi_{sub}_0",
            created=p0 + 9 * DAY,
        ),
        invoice(1, p1, "price_pro", kind="invoice.payment_failed"),
        snapshot("past_due", p1, "price_pro", p1 + 120),
        invoice(1, p1, "price_pro"),
        snapshot("active", p1, "price_pro", p1 + 300),
        snapshot("active", p1, "price_pro", p1 + DAY, cancel_at_period_end=True),
    ]


VISIBLE = (
    "status",
    "status_reason",
    "offering",
    "features",
    "limits",
    "seats",
    "period_start",
    "period_end",
    "trial",
    "overdue",
    "cancel_at",
    "customer",
)


def settled(entitle: Entitle, sub: str, sent: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entitlement once every distinct event sent is in its history."""
    items = entitlements(entitle, order_ref=sub)
    if len(items) != 1:
        return None
    history = httpx.get(f"{entitle.url}/v1/entitlements/{items[0]['id']}/history", headers=AUTH)
    events = history.json()["events"]
    seen = {e["cause"]["event_id"] for e in events if e["cause"]}
    if seen != {event["id"] for event in sent}:
        return None
    # The history is read from the store, the entitlement from the read
    # model, which the projector brings up to it a moment later.
    current = httpx.get(f"{entitle.url}/v1/entitlements/{items[0]['id']}", headers=AUTH).json()
    if current["sequence"] != max(e["version"] for e in events):
        return None
    return {key: current[key] for key in VISIBLE}


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_shuffled_and_duplicated_webhooks_end_where_in_order_ones_do(
    database: str, tmp_path: Path, request: Any
) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    if database == "postgres":
        env["ENTITLE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    now = int(time.time())
    with Entitle(["dev"], tmp_path, env) as entitle:
        runs: dict[str, list[dict[str, Any]]] = {}
        for seed in range(4):
            events = story(f"sub_shuffle_{seed}", now)
            if seed:  # seed 0 is delivered in order
                rng = random.Random(seed)
                events = events + rng.sample(events, 4)
                rng.shuffle(events)
            runs[f"sub_shuffle_{seed}"] = events
        for events in runs.values():
            for event in events:
                assert post(entitle, event).status_code == 202
        results = {
            sub: eventually(lambda s=sub, e=events: settled(entitle, s, e), timeout=20)
            for sub, events in runs.items()
        }
    expected = results.pop("sub_shuffle_0")
    assert expected["status"] == "ACTIVE"
    assert (expected["offering"], expected["seats"], expected["overdue"]) == ("pro", 5, False)
    assert expected["cancel_at"] == expected["period_end"]
    for sub, result in results.items():
        assert result == expected, sub


def test_admin_commands_over_http_are_recorded_and_published(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    now = int(time.time())
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        paid = se.invoice_paid(
            subscription="sub_admin",
            lines=[{"price": "price_basic", "start": now, "end": now + 30 * DAY}],
        )
        assert post(entitle, paid).status_code == 202
        [item] = eventually(lambda: entitlements(entitle, order_ref="sub_admin"), timeout=20)
        url = f"{entitle.url}/v1/entitlements/{item['id']}"

        def act(action: str, body: Any, key: str | None = None, auth: Any = AUTH) -> httpx.Response:
            headers = {**(auth or {}), **({"Idempotency-Key": key} if key else {})}
            return httpx.post(f"{url}/{action}", json=body, headers=headers)

        suspended = act("suspend", {"reason": "chargeback review"}, key="req-1")
        assert suspended.status_code == 200, suspended.text
        assert (suspended.json()["status"], suspended.json()["status_reason"]) == (
            "SUSPENDED",
            "admin",
        )
        assert act("suspend", {"reason": "again"}).status_code == 409
        assert act("suspend", {"reason": "chargeback review"}, key="req-1").status_code == 200
        assert act("suspend", {}).json()["error"] == "invalid_body"
        assert act("extend", {"reason": "x"}).status_code == 422  # days missing
        assert act("promote", {"reason": "x"}).status_code == 404
        assert act("suspend", {"reason": "x"}, auth=None).status_code == 401
        assert (
            httpx.post(
                f"{entitle.url}/v1/entitlements/00000000-0000-0000-0000-000000000000/cancel",
                json={"reason": "x"},
                headers=AUTH,
            ).status_code
            == 404
        )

        assert act("reinstate", {"reason": "cleared"}).json()["status"] == "ACTIVE"
        extended = act("extend", {"reason": "good lead", "days": 10}).json()
        assert extended["period_end"] > item["period_end"]
        assert act("cancel", {"reason": "asked by customer"}).json()["status"] == "CANCELED"

        history = httpx.get(f"{url}/history", headers=AUTH).json()["events"]
        admin = [e for e in history if e["cause"] and e["cause"]["kind"] == "admin"]
        assert [(e["type"], e["cause"]["source"]) for e in admin] == [
            ("entitlement.suspended", "ops"),
            ("entitlement.reinstated", "ops"),
            ("entitlement.extended", "ops"),
            ("entitlement.canceled", "ops"),
        ]
        assert admin[0]["cause"]["event_id"] == "req-1"
        assert admin[0]["data"]["fact"]["reason"] == "chargeback review"

        records = consume(entitle.printed(r"broker:\s+(\S+)"), EVENTS_TOPIC, 6)
        published = [EntitlementEventV1.model_validate_json(r.value) for r in records]
        assert [(p.type, p.previous_status, p.status) for p in published][-4:] == [
            ("entitlement.suspended", "ACTIVE", "SUSPENDED"),
            ("entitlement.reinstated", "SUSPENDED", "ACTIVE"),
            ("entitlement.extended", "ACTIVE", "ACTIVE"),
            ("entitlement.canceled", "ACTIVE", "CANCELED"),
        ]


def test_redrive_applies_dead_letters_once_the_catalog_knows_the_price(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    now = int(time.time())
    env = {"ENTITLE_ADMIN_KEYS": ADMIN}
    with Entitle(["dev"], tmp_path, env) as entitle:
        paid = se.invoice_paid(
            subscription="sub_gold",
            lines=[{"price": "price_gold", "start": now, "end": now + 30 * DAY}],
        )
        assert post(entitle, paid).status_code == 202
        eventually(
            lambda: httpx.get(f"{entitle.url}/v1/dead-letters", headers=AUTH).json()["items"],
            timeout=5,
        )
        # The vendor adds the missing offering, then re-drives.
        fixed = tmp_path / "fixed.yaml"
        fixed.write_text(
            CONFIG + "  - {sku: gold, product: acme, seats: 20, stripe_price_ids: [price_gold]}\n"
        )
        done = subprocess.run(
            [ENTITLE, "redrive", "--config", str(fixed)],
            cwd=tmp_path,
            env={**os.environ, **env},  # the secret is the one dev keeps in .entitle/
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "1 applied, 0 still unmappable" in done.stdout
        [item] = eventually(lambda: entitlements(entitle, order_ref="sub_gold"), timeout=20)
        assert (item["offering"], item["seats"], item["status"]) == ("gold", 20, "ACTIVE")
        [letter] = httpx.get(f"{entitle.url}/v1/dead-letters", headers=AUTH).json()["items"]
        assert letter["resolved_at"] is not None

        # The re-driven receipt, as the read model holds it, is what the log says.
        def verified() -> subprocess.CompletedProcess[str] | None:
            ran = subprocess.run(
                [ENTITLE, "audit", "verify"],
                cwd=tmp_path,
                env=entitle.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            return ran if ran.returncode == 0 else None

        assert eventually(verified, timeout=30) is not None


def test_admins_issue_and_revoke_activation_codes_which_are_never_stored(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    now = int(time.time())
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        paid = se.invoice_paid(
            subscription="sub_codes",
            lines=[{"price": "price_basic", "start": now, "end": now + 30 * DAY}],
        )
        assert post(entitle, paid).status_code == 202
        [item] = eventually(lambda: entitlements(entitle, order_ref="sub_codes"), timeout=20)
        first = item["activation_code"]
        assert [c["code"] for c in item["activation_codes"]] == [first]
        url = f"{entitle.url}/v1/entitlements/{item['id']}"
        issued = httpx.post(f"{url}/codes", headers=AUTH)
        assert issued.status_code == 201, issued.text
        second = issued.json()["code"]
        assert issued.json()["index"] == 1 and second != first
        revoked = httpx.delete(f"{url}/codes/0", headers=AUTH)
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["activation_code"] == second
        assert httpx.delete(f"{url}/codes/0", headers=AUTH).status_code == 409
        assert httpx.delete(f"{url}/codes/x", headers=AUTH).status_code == 422
        assert httpx.post(f"{url}/codes").status_code == 401
        shown = eventually(
            lambda: (
                (v := httpx.get(url, headers=AUTH).json())["activation_codes"][0]["index"] == 1
                and v
            ),
            timeout=5,
        )
        assert [c["code"] for c in shown["activation_codes"]] == [second]
        types = [e["type"] for e in httpx.get(f"{url}/history", headers=AUTH).json()["events"]]
        assert types[-2:] == ["entitlement.code_issued", "entitlement.code_revoked"]
    stored = b"".join(p.read_bytes() for p in (tmp_path / ".entitle").glob("entitle.db*"))
    for code in (first, second):
        assert code.encode() not in stored and code.replace("-", "").encode() not in stored
