"""Paddle Billing: signatures by Paddle's SDK, and its events on the lifecycle."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from paddle_billing.Notifications import Secret, Verifier

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.paddle import normalize, routing_key, verify
from tests import paddle_events as pe
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

NOW = int(time.time())
KEY = Credentials(pe.SECRET)
CATALOG = Catalog([Offering(sku="basic", product="acme", prices={"paddle": ("pri_basic",)})])


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_our_signed_header_is_accepted_by_paddles_own_verifier() -> None:
    body = pe.body(pe.transaction("sub_1", "txn_1", NOW, NOW + MONTH, NOW))
    headers = pe.signed_headers(body)
    request = SimpleNamespace(headers=headers, body=body)
    assert Verifier().verify(request, Secret(pe.SECRET))
    verify(lower(headers), body, KEY, time.time())


def test_any_h1_may_match_while_the_secret_rotates() -> None:
    body = b'{"event_id": "evt_1"}'
    header = pe.signed_headers(body, timestamp=NOW)["Paddle-Signature"]
    ts_part, h1 = header.split(";")
    verify({"paddle-signature": f"{ts_part};h1={'0' * 64};{h1}"}, body, KEY, NOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: ({}, b), "missing Paddle-Signature"),
        (lambda h, b: ({"paddle-signature": "ts=1"}, b), "needs ts= and at least one h1="),
        (lambda h, b: (h, b + b" "), "no h1 signature"),
        (
            lambda h, b: (lower(pe.signed_headers(b, secret="pdl_other", timestamp=NOW)), b),
            "no h1 signature",
        ),
    ],
)
def test_bad_signatures_are_rejected(change: object, message: str) -> None:
    body = b'{"event_id": "evt_1"}'
    bad, bad_body = change(lower(pe.signed_headers(body, timestamp=NOW)), body)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        verify(bad, bad_body, KEY, NOW)


def test_the_default_tolerance_is_five_seconds_and_configurable() -> None:
    body = b'{"event_id": "evt_1"}'
    replayed = lower(pe.signed_headers(body, timestamp=NOW - 6))
    with pytest.raises(SignatureError, match="5 s tolerance"):
        verify(replayed, body, KEY, NOW)
    verify(replayed, body, Credentials(pe.SECRET, tolerance_seconds=60), NOW)


def test_events_map_onto_facts() -> None:
    event = pe.subscription(
        "subscription.updated", "sub_9", "past_due", NOW, NOW + MONTH, NOW, cancel_at=NOW + MONTH
    )
    [command] = normalize("pd", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert (command.order_ref, command.fact["status"]) == ("sub_9", "past_due")
    assert command.fact["cancel_at"] == datetime.fromtimestamp(NOW + MONTH, UTC)
    assert [line.slot for line in command.lines] == ["pro_01acme"]
    assert routing_key(event) == "sub_9"
    paid = pe.transaction("sub_9", "txn_9", NOW, NOW + MONTH, NOW)
    [command] = normalize("pd", paid, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent) and command.fact["kind"] == "payment"
    assert routing_key(paid) == "sub_9"
    with pytest.raises(Unmappable, match="price 'pri_gold' maps to no offering"):
        normalize(
            "pd",
            pe.transaction("sub_9", "txn_x", NOW, NOW + MONTH, NOW, price="pri_gold"),
            CATALOG,
            datetime.now(UTC),
        )


def test_the_lifecycle_matches_the_stripe_path() -> None:
    """create → renew → payment failure → cancel; Paddle orders by occurred_at."""
    world = World(catalog=CATALOG, provider="paddle")
    world.deliver(
        pe.subscription("subscription.created", "sub_1", "active", ts(0), ts(MONTH), ts(60))
    )
    world.deliver(pe.transaction("sub_1", "txn_0", ts(0), ts(MONTH), ts(50)))
    entitlement = world.only()
    assert entitlement.status is Status.ACTIVE
    world.at(MONTH).deliver(
        pe.transaction("sub_1", "txn_1", ts(MONTH), ts(2 * MONTH), ts(MONTH + 50))
    )
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.at(2 * MONTH + 60).deliver(
        pe.transaction(
            "sub_1", "txn_2", ts(2 * MONTH), ts(3 * MONTH), ts(2 * MONTH + 50), failed=True
        )
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    # An older "active" snapshot delivered late does not undo the cancellation.
    world.deliver(
        pe.subscription(
            "subscription.canceled",
            "sub_1",
            "canceled",
            ts(2 * MONTH),
            ts(3 * MONTH),
            ts(2 * MONTH + DAY),
        )
    )
    world.deliver(
        pe.subscription(
            "subscription.updated", "sub_1", "active", ts(MONTH), ts(2 * MONTH), ts(MONTH + 70)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "subscription_canceled")


def test_price_custom_data_offering_sku_wins_over_the_catalog_list() -> None:
    catalog = Catalog(
        [
            Offering(sku="basic", product="acme", prices={"paddle": ("pri_basic",)}),
            Offering(sku="pro", product="acme", seats=5),
        ]
    )
    event = pe.transaction("sub_9", "txn_9", NOW, NOW + MONTH, NOW)
    event["data"]["items"][0]["price"]["custom_data"] = {"offering_sku": "pro"}
    [command] = normalize("pd", event, catalog, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert [line.offering.sku for line in command.lines] == ["pro"]
