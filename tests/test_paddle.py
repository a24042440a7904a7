"""Paddle Billing: signatures by Paddle's SDK, and its events on the lifecycle."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from paddle_billing.Notifications import Secret, Verifier

from domain import lifecycle
from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent
from domain.entitlement import Status
from domain.lifecycle import Facts, Line, Policy
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


# -- money back, one-off sales and scheduled changes (issue 15) --------------------
# Built from the shapes in tests/paddle_events.py (paddle-python-sdk's fixtures).

FX = pe.FIXTURES


def paid_world(sub: str = "sub_m", txn: str = "txn_m", amount: int = 9900) -> World:
    world = World(catalog=FX.catalog, provider="paddle")
    for payload in FX.subscribed(sub, "basic", 0, MONTH, 10) + FX.paid(
        sub, txn, "basic", 0, MONTH, 20, amount=amount
    ):
        world.at(20).deliver(payload)
    assert world.only().status is Status.ACTIVE
    return world


def test_a_refund_without_a_type_is_judged_by_its_amount_against_the_grand_total() -> None:
    # The SDK's adjustment fixture has `type: null`: the amount decides.
    world = paid_world()
    world.at(DAY).deliver(pe.adjustment("txn_m", "refund", 4000, ts(DAY), sub="sub_m"))
    assert world.only().status is Status.ACTIVE
    world.at(2 * DAY).deliver(pe.adjustment("txn_m", "refund", 5900, ts(2 * DAY), sub="sub_m"))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_refund_waiting_for_approval_does_nothing_and_a_reversed_one_is_undone() -> None:
    world = paid_world()
    pending = pe.adjustment(
        "txn_m",
        "refund",
        9900,
        ts(DAY),
        sub="sub_m",
        status="pending_approval",
        adjustment_id="adj_1",
    )
    assert normalize("pd", pending, FX.catalog, T0) == []
    approved = pe.adjustment(
        "txn_m",
        "refund",
        9900,
        ts(DAY),
        sub="sub_m",
        adjustment_id="adj_1",
        kind="adjustment.updated",
    )
    reversed_ = pe.adjustment(
        "txn_m",
        "refund",
        9900,
        ts(2 * DAY),
        sub="sub_m",
        status="reversed",
        adjustment_id="adj_1",
        kind="adjustment.updated",
    )
    # In either order: the reversal names the refund it undoes.
    for first, second in ((approved, reversed_), (reversed_, approved)):
        w = paid_world()
        w.at(2 * DAY).deliver(first)
        w.deliver(second)
        assert w.only().status is Status.ACTIVE
    world.at(DAY).deliver(approved)
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_pre_chargeback_alert_is_paddles_own_refund_and_its_reversal_undoes_it() -> None:
    world = paid_world()
    world.at(DAY).deliver(pe.adjustment("txn_m", "chargeback_warning", 9900, ts(DAY), sub="sub_m"))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")
    world.at(2 * DAY).deliver(
        pe.adjustment("txn_m", "chargeback_warning_reverse", 9900, ts(2 * DAY), sub="sub_m")
    )
    assert world.only().status is Status.ACTIVE


def test_a_chargeback_stays_suspended_until_paddle_reverses_it() -> None:
    world = paid_world()
    world.at(DAY).deliver(pe.adjustment("txn_m", "chargeback", 9900, ts(DAY), sub="sub_m"))
    world.at(20 * DAY).tick()
    assert (world.only().status, world.only().reason) == (Status.SUSPENDED, "disputed")
    world.deliver(pe.adjustment("txn_m", "chargeback_reverse", 9900, ts(20 * DAY), sub="sub_m"))
    assert world.only().status is Status.ACTIVE


def test_credits_carry_no_entitlement_meaning_and_an_unknown_action_is_a_dead_letter() -> None:
    credit = pe.adjustment("txn_m", "credit", 100, NOW)
    assert normalize("pd", credit, FX.catalog, T0) == []
    with pytest.raises(Unmappable, match="action 'gift' is not known"):
        normalize("pd", pe.adjustment("txn_m", "gift", 100, NOW), FX.catalog, T0)


def test_a_one_off_purchase_grants_one_period_per_seat_bought_and_its_refund_cancels() -> None:
    sold = FX.sold("txn_once", "pro", 10)[0]
    sold["data"]["items"][0]["quantity"] = 3
    assert routing_key(sold) == "txn_once"
    world = World(catalog=FX.catalog, provider="paddle").at(10)
    world.deliver(sold)
    item = world.only()
    assert (item.status, item.sku, item.seats) == (Status.ACTIVE, "pro", 15)
    # One period of the offering (P1M) from when the transaction was billed.
    assert (item.period_start, item.period_end) == (
        T0 + timedelta(seconds=10),
        datetime(2026, 2, 1, 0, 0, 10, tzinfo=UTC),
    )
    refund = pe.adjustment("txn_once", "refund", 4900, ts(DAY), full=True)
    assert routing_key(refund) == "txn_once"
    world.at(DAY).deliver(refund)
    assert (item.status, item.reason) == (Status.CANCELED, "refunded")


def test_a_one_off_purchase_of_nothing_in_the_catalog_is_a_dead_letter() -> None:
    sold = FX.with_price(FX.sold("txn_x", "basic", 10)[0], "pri_unknown")
    with pytest.raises(Unmappable, match="price 'pri_unknown' maps to no offering"):
        normalize("pd", sold, FX.catalog, T0)
    sold["data"]["items"] = []
    with pytest.raises(Unmappable, match="no item that grants anything"):
        normalize("pd", sold, FX.catalog, T0)


def test_a_scheduled_pause_suspends_at_its_date_even_before_the_paused_webhook() -> None:
    world = paid_world("sub_s", "txn_s")
    world.at(DAY).deliver(
        pe.subscription(
            "subscription.updated",
            "sub_s",
            "active",
            ts(0),
            ts(MONTH),
            ts(DAY),
            price=FX.price["basic"],
            product="pro_01basic",
            pause_at=ts(MONTH),
        )
    )
    item = world.only()
    assert (item.status, item.due_at) == (Status.ACTIVE, T0 + timedelta(seconds=MONTH))
    world.at(MONTH).tick()
    assert (item.status, item.reason) == (Status.SUSPENDED, "paused")
    for payload in FX.paused("sub_s", "basic", 0, MONTH, MONTH + 60) + FX.resumed(
        "sub_s", "basic", 2 * MONTH, 3 * MONTH, 2 * MONTH
    ):
        world.at(2 * MONTH).deliver(payload)
    assert item.status is Status.ACTIVE


@pytest.mark.parametrize(
    ("field", "change"),
    [
        (
            "scheduled_change.effective_at",
            lambda d: d["scheduled_change"].update(effective_at="2026-02-01T00:00:00"),
        ),
        ("billed_at", lambda d: d.update(billed_at="2026-02-01T00:00:00", subscription_id=None)),
        (
            "billing_period.ends_at",
            lambda d: d["billing_period"].update(ends_at="2026-02-01T00:00:00"),
        ),
    ],
)
def test_a_time_without_offset_is_a_dead_letter_naming_its_field(field: str, change: Any) -> None:
    if field.startswith("scheduled"):
        event = FX.cancel_at_period_end("sub_z", "basic", 0, MONTH, 10)[0]
    else:
        event = FX.paid("sub_z", "txn_z", "basic", 0, MONTH, 10)[0]
    change(event["data"])
    with pytest.raises(Unmappable, match=f"{field}.*no UTC offset"):
        normalize("pd", event, FX.catalog, T0)


def test_domain_a_scheduled_pause_suspends_from_its_date_only() -> None:
    """The fold's side of `pause_at` (domain/lifecycle.py), without Paddle."""
    offering = FX.catalog.get("basic")
    assert offering is not None
    line = Line("slot", offering, 1, T0, T0 + timedelta(days=30))
    snapshot = lifecycle.subscription(
        "active", [line], T0, T0 + timedelta(days=30), pause_at=T0 + timedelta(days=30)
    )
    facts = Facts([{**snapshot, "key": "k1", "at": T0}])
    before = facts.standing("slot", offering, Policy(), T0 + timedelta(days=29))
    assert (before.status, before.due_at) == (Status.ACTIVE, T0 + timedelta(days=30))
    after = facts.standing("slot", offering, Policy(), T0 + timedelta(days=30))
    assert (after.status, after.reason) == (Status.SUSPENDED, "paused")
    without = lifecycle.subscription("active", [line], T0, T0 + timedelta(days=30))
    assert "pause_at" not in without  # facts stored before it stay as they were
