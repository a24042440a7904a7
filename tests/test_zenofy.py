"""Zenofy-style checkout webhooks: optional shared secret, one-to-one statuses,
renewals under a new subscription id with the same email."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.zenofy import PROVIDER, event_id, normalize, routing_key, verify
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


# -- what Zenofy itself sends: X-Webhook-Secret and order webhooks ----------------
# https://zenofy.io/doc/order-webhooks


ORDERS = Catalog(
    [
        Offering(sku="basic", product="acme", period="P1Y"),
        Offering(sku="pro", product="acme", seats=5, prices={"zenofy": ("673f9prodpro",)}),
    ]
)


def test_zenofy_s_own_secret_header_verifies_and_is_never_kept() -> None:
    body = ze.body(ze.order("order_paid", "673f92b2c3d94a0012abcd01", [("basic", 1)], NOW, NOW))
    key = Credentials(ze.SECRET)
    verify(lower(ze.secret_headers()), body, key, NOW)
    with pytest.raises(SignatureError, match="X-Webhook-Secret"):
        verify(lower(ze.secret_headers("another")), body, key, NOW)
    # The header is the secret itself: a stored webhook must not carry it.
    assert "x-webhook-secret" not in PROVIDER.headers


def test_a_paid_order_grants_each_line_one_period_from_its_payment() -> None:
    world = World(catalog=ORDERS, provider="zenofy")
    paid = ze.order(
        "order_paid",
        "673f92b2c3d94a0012abcd01",
        [("basic", 1), ("673f9prodpro", 2)],
        ts(0),
        ts(60),
        email="Buyer@Example.com",
    )
    world.deliver(paid)
    pro, basic = world.entitlements()  # by slot: the product id
    assert (basic.sku, basic.status, basic.period_end) == (
        "basic",
        Status.ACTIVE,
        T0 + timedelta(seconds=60) + timedelta(days=365),
    )
    assert (pro.sku, pro.seats, pro.status) == ("pro", 10, Status.ACTIVE)
    assert pro.period_end == T0 + timedelta(seconds=60) + timedelta(days=31)
    assert basic.customer_email == "buyer@example.com"
    assert basic.order_ref == "order/673f92b2c3d94a0012abcd01"
    # A retry of the same webhook is the same event; the refund is another.
    assert event_id(paid) == event_id(json.loads(ze.body(paid)))
    refunded = ze.order("order_refunded", "673f92b2c3d94a0012abcd01", [], ts(0), ts(60))
    assert event_id(refunded) != event_id(paid)


@pytest.mark.parametrize("kind", ["order_refunded", "order_cancelled"])
@pytest.mark.parametrize("refund_first", [False, True])
def test_a_refunded_or_cancelled_order_revokes_its_licenses_in_any_order(
    kind: str, refund_first: bool
) -> None:
    world = World(catalog=ORDERS, provider="zenofy")
    paid = ze.order("order_paid", "ord_a", [("basic", 1)], ts(0), ts(60))
    revoked = ze.order(kind, "ord_a", [("basic", 1)], ts(0), ts(60))
    for payload in [revoked, paid] if refund_first else [paid, revoked]:
        world.at(DAY).deliver(payload)
        if payload is revoked and refund_first:
            # Nothing was paid yet: no license is minted for it.
            assert world.entitlements() == []
    reason = "refunded" if kind == "order_refunded" else "order_cancelled"
    assert (world.only().status, world.only().reason) == (Status.CANCELED, reason)


def test_an_order_cancelled_before_it_was_paid_is_ignored() -> None:
    unpaid = ze.order("order_cancelled", "ord_u", [("basic", 1)], NOW, None)
    assert normalize("z", unpaid, ORDERS, T0) == []


def test_a_refund_of_the_order_that_paid_a_subscription_period_cancels_it() -> None:
    world = World(catalog=ORDERS, provider="zenofy")
    world.deliver(
        ze.event(
            "subscription.activated", "z1", "ACTIVE", ts(0), ts(MONTH), ts(10), order_id="ord_1"
        )
    )
    renewal = ze.event(
        "subscription.renewed",
        "z2",
        "ACTIVE",
        ts(MONTH),
        ts(2 * MONTH),
        ts(MONTH + 10),
        renews="z1",
        renewal_order="ord_2",
    )
    world.at(MONTH + 10).deliver(renewal)
    assert world.only().period_end == T0 + timedelta(seconds=2 * MONTH)
    world.deliver(ze.order("order_refunded", "ord_2", [("basic", 1)], ts(MONTH), ts(MONTH + 10)))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_renewal_after_a_suspension_reinstates_the_subscription() -> None:
    """Zenofy suspends a subscription left unpaid past its period end; the
    buyer then pays at the checkout (subscription.renewed): active again."""
    world = World(catalog=ORDERS, provider="zenofy")
    world.deliver(ze.event("subscription.activated", "z1", "ACTIVE", ts(0), ts(MONTH), ts(10)))
    world.at(MONTH + 3 * DAY).deliver(
        ze.event("subscription.suspended", "z1", "SUSPENDED", ts(0), ts(MONTH), ts(MONTH + 3 * DAY))
    )
    assert (world.only().status, world.only().reason) == (Status.SUSPENDED, "suspended")
    world.at(MONTH + 4 * DAY).deliver(
        ze.event(
            "subscription.renewed",
            "z2",
            "ACTIVE",
            ts(MONTH + 4 * DAY),
            ts(2 * MONTH + 4 * DAY),
            ts(MONTH + 4 * DAY),
            renews="z1",
        )
    )
    assert (world.only().status, world.only().period_end) == (
        Status.ACTIVE,
        T0 + timedelta(seconds=2 * MONTH + 4 * DAY),
    )


def test_an_order_line_of_an_unknown_product_is_a_dead_letter_naming_it() -> None:
    paid = ze.order("order_paid", "ord_x", [("basic", 1), ("ebook-bump", 1)], NOW, NOW)
    with pytest.raises(Unmappable, match="product 'ebook-bump' maps to no offering") as caught:
        normalize("z", paid, ORDERS, T0)
    # What did map is kept, for the dead letter's partial application.
    [command] = caught.value.commands
    assert isinstance(command, OrderEvent) and [ln.slot for ln in command.lines] == ["basic"]


def test_an_order_paid_at_a_time_without_offset_is_a_dead_letter_naming_the_field() -> None:
    paid = ze.order("order_paid", "ord_n", [("basic", 1)], NOW, NOW)
    paid["paidAt"] = "2026-01-15T10:30:00"
    with pytest.raises(Unmappable, match=r"paidAt .* has no UTC offset"):
        normalize("z", paid, ORDERS, T0)


@pytest.mark.parametrize("kind", ["order_paid", "order_refunded", "order_cancelled"])
def test_any_order_field_of_the_wrong_type_is_unmappable_never_a_crash(kind: str) -> None:
    from services.providers import check
    from tests.test_poison import _paths, _replaced

    order = ze.order(kind, "ord_1", [("basic", 1), ("673f9prodpro", 2)], NOW, NOW + 60)
    crashes = []
    for path in _paths(order):
        for value in ([], {}, 12345, None, "x", True, 1.5, "2026-01-15T10:30:00"):
            mutated = _replaced(order, path, value)
            if not isinstance(mutated, dict):
                continue
            try:
                check(normalize("z", mutated, ORDERS, T0))
                routing_key(mutated)
                event_id(mutated)
            except Unmappable:
                pass
            except Exception as exc:
                crashes.append(f"{'.'.join(map(str, path))} = {value!r}: {exc!r}")
    assert not crashes, "\n".join(crashes[:30])
