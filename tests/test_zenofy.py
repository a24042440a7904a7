"""Zenofy-style checkout webhooks: optional shared secret, one-to-one statuses,
renewals under a new subscription id with the same email."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.catalog import Catalog, Offering
from domain.entitlement import Status
from services.providers import Credentials, SignatureError
from services.providers.zenofy import routing_key, verify
from tests import standard_events as sw
from tests import zenofy_events as ze
from tests.harness import Entitle, eventually
from tests.lifecycle_world import DAY, MONTH, T0, World, ts
from tests.test_dev import ADMIN, AUTH, entitlements

NOW = int(time.time())
CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme"),
        Offering(sku="pro", product="acme", prices={"zenofy": ("plan_pro",)}),
    ]
)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_with_a_secret_the_signature_is_required_and_checked() -> None:
    body = ze.body(ze.event("subscription.created", "z1", "PENDING", NOW, NOW, NOW))
    key = Credentials(ze.SECRET)
    verify(lower(ze.signed_headers(body)), body, key, NOW)
    for headers in (
        {},
        lower(ze.signed_headers(body, secret="other")),
        {"x-zenofy-signature": "md5=abc"},
    ):
        with pytest.raises(SignatureError):
            verify(headers, body, key, NOW)


def test_an_unsigned_source_grants_but_cannot_end_anyone_s_license(tmp_path: Path) -> None:
    """`allow_unsigned: true`: the webhook is taken without a signature, so
    anyone who knows the URL could send one naming a customer. It may
    grant; a cancellation, suspension, expiry or period already over is a
    dead letter saying why (also when part of the event maps to nothing, or
    when it comes before the grant), and the license stays as it was."""
    (tmp_path / "entitle.yaml").write_text(
        "sources:\n"
        "  zenofy: {provider: zenofy, allow_unsigned: true}\n"
        "  open: {provider: standard, allow_unsigned: true}\n"
        "offerings: [{sku: basic, product: acme}, {sku: pro, product: acme}]\n"
    )
    with Entitle(["dev"], tmp_path, {"ENTITLE_ADMIN_KEYS": ADMIN}) as stack:

        def send(source: str, event: dict[str, Any]) -> dict[str, Any]:
            response = httpx.post(f"{stack.url}/webhooks/{source}", content=ze.body(event))
            assert response.status_code == 202, response.text
            return event

        def zenofy(kind: str, status: str, start: int, end: int) -> dict[str, Any]:
            event = ze.event(kind, "z1", status, start, end, NOW, email="victim@example.com")
            return send("zenofy", event)

        def unmapped(event: dict[str, Any]) -> dict[str, Any]:
            event["data"]["subscription"]["items"].append({"id": "zzz", "sku": "nope"})
            return send("open", event)

        zenofy("subscription.activated", "ACTIVE", NOW - DAY, NOW + MONTH)
        # Before the grant: it would wait on the order and cancel what comes.
        early = unmapped(sw.subscription("sub_v", "canceled", NOW - DAY, NOW + MONTH, NOW))
        send("open", sw.payment("sub_v", "pay_v", NOW - DAY, NOW + MONTH, NOW + 1))
        attacks = [
            early,
            zenofy("subscription.canceled", "CANCELED", NOW - DAY, NOW + MONTH),
            zenofy("subscription.suspended", "SUSPENDED", NOW - DAY, NOW + MONTH),
            zenofy("subscription.activated", "ACTIVE", NOW - MONTH, NOW - DAY),
            zenofy("subscription.renewed", "ACTIVE", NOW - MONTH, NOW - DAY),
            # Dated years ahead, it would outrank every real update to come.
            send(
                "zenofy",
                ze.event(
                    "subscription.activated",
                    "z1",
                    "ACTIVE",
                    NOW - DAY,
                    NOW + MONTH,
                    NOW + 5 * 365 * DAY,
                    email="victim@example.com",
                ),
            ),
            unmapped(sw.subscription("sub_v", "canceled", NOW - DAY, NOW + MONTH, NOW + 2)),
            *(
                unmapped(sw.subscription("sub_v", status, NOW - DAY, NOW + MONTH, NOW + 3))
                for status in ("paused", "suspended", "expired")
            ),
            # Snapshots that take away without saying so: another plan in
            # place of this one, someone else as the customer.
            send(
                "open", sw.subscription("sub_v", "active", NOW - DAY, NOW + MONTH, NOW + 4, "pro")
            ),
            send(
                "open",
                sw.subscription(
                    "sub_v",
                    "active",
                    NOW - DAY,
                    NOW + MONTH,
                    NOW + 6,
                    customer={"id": "cus_evil", "email": "attacker@evil.example"},
                ),
            ),
        ]

        def letters() -> list[dict[str, Any]] | None:
            items = httpx.get(f"{stack.url}/v1/dead-letters", headers=AUTH).json()["items"]
            return items if len(items) >= len(attacks) else None

        reasons = {d["provider_event_id"]: d["reason"] for d in eventually(letters, timeout=20)}
        assert set(reasons) == {a["id"] for a in attacks}
        assert [r for r in reasons.values() if "unsigned source" not in r] == []
        granted = {e["order_ref"]: e for e in entitlements(stack)}
        assert {ref: (e["status"], e["offering"]) for ref, e in granted.items()} == {
            "victim@example.com/basic": ("ACTIVE", "basic"),
            "sub_v": ("ACTIVE", "basic"),
        }
        assert (granted["sub_v"]["seats"], granted["sub_v"]["customer"]["email"]) == (
            1,
            "std@example.com",
        )
        assert granted["victim@example.com/basic"]["period_end"][:10] == ze.iso(NOW + MONTH)[:10]


def test_a_renewal_with_the_same_email_extends_the_same_entitlement() -> None:
    world = World(catalog=CATALOG, provider="zenofy")
    world.deliver(ze.event("subscription.created", "z1", "PENDING", ts(0), ts(MONTH), ts(10)))
    entitlement = world.only()
    assert entitlement.status is Status.PENDING
    assert entitlement.customer_email == "ada@example.com"
    world.deliver(ze.event("subscription.activated", "z1", "ACTIVE", ts(0), ts(MONTH), ts(60)))
    assert entitlement.status is Status.ACTIVE
    # The checkout opens a new subscription id for the renewal; the email (any case) is the same.
    renewal = ze.event(
        "subscription.renewed",
        "z2",
        "ACTIVE",
        ts(MONTH),
        ts(2 * MONTH),
        ts(MONTH + 60),
        email="ada@example.com",
        renews="z1",
    )
    assert routing_key(renewal) == "ada@example.com/basic"
    world.at(MONTH).deliver(renewal)
    assert world.only() is entitlement
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.deliver(
        ze.event(
            "subscription.suspended", "z2", "SUSPENDED", ts(MONTH), ts(2 * MONTH), ts(MONTH + DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "suspended")
    world.deliver(
        ze.event(
            "subscription.expired", "z2", "EXPIRED", ts(MONTH), ts(2 * MONTH), ts(2 * MONTH + DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.EXPIRED, "expired")
    world.deliver(
        ze.event(
            "subscription.canceled",
            "z2",
            "CANCELED",
            ts(MONTH),
            ts(2 * MONTH),
            ts(2 * MONTH + 2 * DAY),
        )
    )
    assert entitlement.status is Status.CANCELED


def test_plans_map_by_sku_or_by_the_catalogs_zenofy_plan_ids() -> None:
    world = World(catalog=CATALOG, provider="zenofy")
    world.deliver(
        ze.event(
            "subscription.activated", "z9", "ACTIVE", ts(0), ts(MONTH), ts(10), plan="plan_pro"
        )
    )
    assert world.only().sku == "pro"
