"""Chargebee: HTTP Basic auth, and its events on the lifecycle."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.chargebee import normalize, routing_key, verify
from tests import chargebee_events as cb
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

NOW = int(time.time())
KEY = Credentials(cb.PASSWORD, username=cb.USERNAME)
CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme", prices={"chargebee": ("basic-USD-Monthly",)}),
        Offering(sku="pro", product="acme", seats=5, prices={"chargebee": ("pro-USD-Monthly",)}),
    ]
)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_basic_auth_is_checked() -> None:
    verify(lower(cb.headers()), b"{}", KEY, NOW)
    for bad in (cb.headers(password="nope"), cb.headers(username="other"), {}):
        with pytest.raises(SignatureError):
            verify(lower(bad), b"{}", KEY, NOW)
    with pytest.raises(SignatureError, match="not base64"):
        verify({"authorization": "Basic !!!"}, b"{}", KEY, NOW)


def test_a_source_without_a_username_is_a_config_error() -> None:
    from services.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="needs username"):
        parse_config("sources: {cb: {provider: chargebee, secret: x}}")


def test_snapshots_are_ordered_by_resource_version_and_non_renewing_schedules_cancel() -> None:
    event = cb.subscription(
        "subscription_changed", "sub_9", "non_renewing", NOW, NOW + MONTH, (NOW + 5) * 1000
    )
    [command] = normalize("cb", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert command.occurred_at == datetime.fromtimestamp(NOW + 5, UTC)
    assert command.fact["status"] == "active"
    assert command.fact["cancel_at"] == datetime.fromtimestamp(NOW + MONTH, UTC)
    assert [line.slot for line in command.lines] == ["plan"]
    assert routing_key(event) == "sub_9"


def test_the_lifecycle_matches_the_stripe_path() -> None:
    """create → renew → payment failure → cancel, then a reactivation."""
    world = World(catalog=CATALOG, provider="chargebee")
    world.deliver(
        cb.invoice_event("subscription_created", "sub_1", "inv_0", ts(0), ts(MONTH), ts(60))
    )
    entitlement = world.only()
    assert entitlement.status is Status.ACTIVE
    assert entitlement.customer_email == "cb@example.com"
    world.at(MONTH).deliver(
        cb.invoice_event(
            "subscription_renewed", "sub_1", "inv_1", ts(MONTH), ts(2 * MONTH), ts(MONTH + 60)
        )
    )
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.at(2 * MONTH + 60).deliver(
        cb.invoice_event(
            "payment_failed",
            "sub_1",
            "inv_2",
            ts(2 * MONTH),
            ts(3 * MONTH),
            ts(2 * MONTH + 60),
            status="payment_due",
        )
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    cancelled = cb.subscription(
        "subscription_cancelled",
        "sub_1",
        "cancelled",
        ts(MONTH),
        ts(2 * MONTH),
        ts(2 * MONTH + DAY) * 1000,
    )
    reactivated = cb.subscription(
        "subscription_reactivated",
        "sub_1",
        "active",
        ts(2 * MONTH),
        ts(3 * MONTH),
        ts(2 * MONTH + 2 * DAY) * 1000,
    )
    world.deliver(reactivated)  # out of order: the newer resource_version still wins
    world.deliver(cancelled)
    assert entitlement.status is Status.ACTIVE
    world.deliver(
        cb.subscription(
            "subscription_cancelled",
            "sub_1",
            "cancelled",
            ts(2 * MONTH),
            ts(3 * MONTH),
            ts(2 * MONTH + 3 * DAY) * 1000,
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "subscription_canceled")


def test_a_full_refund_of_the_current_invoice_cancels() -> None:
    world = World(catalog=CATALOG, provider="chargebee")
    world.deliver(
        cb.invoice_event("subscription_created", "sub_1", "inv_0", ts(0), ts(MONTH), ts(60))
    )
    world.deliver(cb.refunded("sub_1", "inv_0", 300, ts(DAY)))
    assert world.only().status is Status.ACTIVE
    world.deliver(cb.refunded("sub_1", "inv_0", 1000, ts(2 * DAY)))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def renewed_unpaid(world: World) -> None:
    """A term paid, then `subscription_renewed` with the next term's invoice
    still payment_due (its collection failed), as Chargebee sends it."""
    world.deliver(
        cb.invoice_event("subscription_created", "sub_1", "inv_0", ts(0), ts(MONTH), ts(60))
    )
    renewal = cb.subscription(
        "subscription_renewed", "sub_1", "active", ts(MONTH), ts(2 * MONTH), ts(MONTH) * 1000
    )
    unpaid = cb.invoice_event(
        "x", "sub_1", "inv_1", ts(MONTH), ts(2 * MONTH), ts(MONTH), status="payment_due"
    )
    renewal["content"]["invoice"] = unpaid["content"]["invoice"]
    world.at(MONTH + 60).deliver(renewal)


def test_a_renewal_with_an_unpaid_invoice_does_not_extend_the_paid_period() -> None:
    world = World(catalog=CATALOG, provider="chargebee")
    renewed_unpaid(world)
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=MONTH)
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.at(MONTH + 2 * DAY).tick()  # past the period and the 24 h leeway
    assert (entitlement.status, entitlement.reason) == (Status.EXPIRED, "unpaid")
    # Paid after all (dunning succeeded): the term is paid through.
    world.at(MONTH + 3 * DAY).deliver(
        cb.invoice_event(
            "payment_succeeded", "sub_1", "inv_1", ts(MONTH), ts(2 * MONTH), ts(MONTH + 3 * DAY)
        )
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)


def test_a_written_off_invoice_and_a_reactivation_leave_nothing_overdue() -> None:
    world = World(catalog=CATALOG, provider="chargebee")
    renewed_unpaid(world)
    written_off = cb.invoice_event(
        "invoice_updated", "sub_1", "inv_1", ts(MONTH), ts(2 * MONTH), ts(MONTH + DAY)
    )
    written_off["content"]["invoice"].update(amount_paid=0, write_off_amount=1000)
    world.at(MONTH + DAY).deliver(written_off)
    assert world.only().period_end == T0 + timedelta(seconds=MONTH)  # no payment
    reactivated = cb.invoice_event(
        "subscription_reactivated",
        "sub_1",
        "inv_2",
        ts(MONTH + DAY),
        ts(2 * MONTH),
        ts(MONTH + DAY),
    )
    snapshot = cb.subscription(
        "x", "sub_1", "active", ts(MONTH + DAY), ts(2 * MONTH), ts(MONTH + DAY) * 1000
    )
    reactivated["content"]["subscription"] = snapshot["content"]["subscription"]
    world.at(MONTH + DAY + 60).deliver(reactivated)
    entitlement = world.only()
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)


def test_an_item_of_quantity_0_grants_nothing_and_the_plan_still_applies() -> None:
    world = World(catalog=CATALOG, provider="chargebee")
    event = cb.subscription("subscription_changed", "sub_1", "in_trial", ts(0), ts(MONTH), 1000)
    event["content"]["subscription"]["trial_end"] = ts(MONTH)
    event["content"]["subscription"]["subscription_items"].append(
        {"item_price_id": "pro-USD-Monthly", "item_type": "addon", "quantity": 0}
    )
    world.deliver(event)
    assert [e.sku for e in world.entitlements()] == ["basic"]
    assert world.only().status is Status.ACTIVE


# -- refunds, chargebacks, one-time sales, pauses, Product Catalog 1.0 -----------------

FX = cb.FIXTURES


def paid_world() -> World:
    world = World(catalog=FX.catalog, provider="chargebee")
    for event in FX.subscribed("sub_r", "basic", 0, MONTH, 10) + FX.paid(
        "sub_r", "inv_r", "basic", 0, MONTH, 20
    ):
        world.at(20).deliver(event)
    assert world.only().status is Status.ACTIVE
    return world


def test_partial_refunds_of_one_invoice_add_up_to_a_full_one() -> None:
    world = paid_world()
    first = cb.refund_event("sub_r", "inv_r", 9900, 4900, DAY, FX.price["basic"])
    world.at(DAY).deliver(first)
    world.at(DAY).deliver(first)  # redelivered: still one refund of 4900
    assert world.only().status is Status.ACTIVE
    world.at(2 * DAY).deliver(cb.refund_event("sub_r", "inv_r", 9900, 5000, 2 * DAY, "x"))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_failed_refund_refunds_nothing() -> None:
    world = paid_world()
    event = cb.refund_event("sub_r", "inv_r", 9900, 9900, DAY, FX.price["basic"])
    event["content"]["transaction"]["status"] = "failure"
    world.at(DAY).deliver(event)
    assert world.only().status is Status.ACTIVE


def test_a_refund_that_carries_only_its_credit_note_finds_the_subscription() -> None:
    world = paid_world()
    event = cb.refund_event("sub_r", "inv_r", 9900, 9900, DAY, FX.price["basic"])
    del event["content"]["invoice"]
    world.at(DAY).deliver(event)
    # Judged against the payment's amount_paid recorded when it was paid.
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_chargeback_recorded_as_a_refund_suspends_as_disputed() -> None:
    """https://apidocs.chargebee.com/docs/api/transactions#transaction_payment_method:
    `chargeback` is set by Chargebee on the refund of an automated chargeback."""
    world = paid_world()
    event = cb.refund_event(
        "sub_r", "inv_r", 9900, 9900, DAY, FX.price["basic"], payment_method="chargeback"
    )
    world.at(DAY).deliver(event)
    assert (world.only().status, world.only().reason) == (Status.SUSPENDED, "disputed")


def test_a_refund_that_names_no_invoice_is_unmappable() -> None:
    event = cb.refund_event("sub_r", "inv_r", 9900, 9900, DAY, FX.price["basic"])
    for name in ("invoice", "credit_note"):
        del event["content"][name]
    event["content"]["transaction"]["linked_credit_notes"] = []
    with pytest.raises(Unmappable, match="names no invoice"):
        normalize("cb", event, FX.catalog, T0)


def test_a_one_time_invoice_refunded_in_full_cancels_its_license() -> None:
    world = World(catalog=FX.catalog, provider="chargebee")
    for event in FX.sold("inv_once", "pro", 10, amount=4900):
        world.at(10).deliver(event)
    license_ = world.only()
    assert (license_.status, license_.seats) == (Status.ACTIVE, 5)
    assert license_.period_end == T0 + timedelta(seconds=10) + timedelta(days=31)  # P1M
    world.at(DAY).deliver(cb.refund_event(None, "inv_once", 4900, 4900, DAY, "pro-license-USD"))
    assert (license_.status, license_.reason) == (Status.CANCELED, "refunded")


def test_a_one_time_invoice_that_sells_nothing_mapped_is_a_dead_letter() -> None:
    [event] = FX.sold("inv_adhoc", "basic", 10)
    line = event["content"]["invoice"]["line_items"][0]
    line.update(entity_type="adhoc", entity_id=None, description="Consulting")
    with pytest.raises(Unmappable, match="sells no charge"):
        normalize("cb", event, FX.catalog, T0)
    line.update(entity_type="charge_item_price", entity_id="setup-fee-USD")
    with pytest.raises(Unmappable, match="setup-fee-USD"):
        normalize("cb", event, FX.catalog, T0)


def test_an_unpaid_one_time_invoice_grants_nothing() -> None:
    [event] = FX.sold("inv_due", "basic", 10)
    event["content"]["invoice"].update(status="payment_due", amount_paid=0, paid_at=None)
    assert normalize("cb", event, FX.catalog, T0) == []


def test_a_scheduled_pause_keeps_access_until_chargebee_pauses() -> None:
    """`subscription_pause_scheduled` keeps the subscription `active` with a
    `pause_date`; `subscription_resumption_scheduled` keeps it `paused` with a
    `resume_date` (https://apidocs.chargebee.com/docs/api/subscriptions#pause_a_subscription)."""
    world = paid_world()
    item = world.only()
    world.at(2 * DAY).deliver(
        FX._subscription(
            "subscription_pause_scheduled",
            "sub_r",
            "basic",
            "active",
            0,
            MONTH,
            2 * DAY,
            pause_date=ts(MONTH),
        )[0]
    )
    assert world.only().status is Status.ACTIVE
    world.at(MONTH).deliver(FX.paused("sub_r", "basic", 0, MONTH, MONTH)[0])
    assert (item.status, item.reason) == (Status.SUSPENDED, "paused")
    world.at(MONTH + DAY).deliver(
        FX._subscription(
            "subscription_resumption_scheduled",
            "sub_r",
            "basic",
            "paused",
            0,
            MONTH,
            MONTH + DAY,
            pause_date=ts(MONTH),
            resume_date=ts(MONTH + 9 * DAY),
        )[0]
    )
    assert item.status is Status.SUSPENDED


def test_a_corrupt_pause_date_is_unmappable_naming_it() -> None:
    [event] = FX.paused("sub_r", "basic", 0, MONTH, DAY)
    event["content"]["subscription"]["pause_date"] = "2026-01-02"
    with pytest.raises(Unmappable, match="pause_date"):
        normalize("cb", event, FX.catalog, T0)


def pc1_subscription(plan_quantity: int = 2) -> dict[str, Any]:
    """A Product Catalog 1.0 subscription: `plan_id`, `plan_quantity` and
    `addons[]` (https://apidocs.chargebee.com/docs/api/subscriptions?prod_cat_ver=1)."""
    event: dict[str, Any] = FX.subscribed("sub_v1", "basic", 0, MONTH, 10)[0]
    subscription = event["content"]["subscription"]
    del subscription["subscription_items"]
    subscription.update(
        plan_id="basic-monthly",
        plan_quantity=plan_quantity,
        plan_unit_price=900,
        addons=[{"id": "pro-addon", "quantity": 1, "unit_price": 500, "object": "addon"}],
    )
    return event


def slot(world: World, name: str) -> Any:
    [found] = [e for e in world.entitlements() if e.slot == name]
    return found


V1_CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme", prices={"chargebee": ("basic-monthly",)}),
        Offering(sku="pro", product="acme", seats=5, prices={"chargebee": ("pro-addon",)}),
    ]
)


def test_product_catalog_1_plans_and_addons_map_like_items() -> None:
    world = World(catalog=V1_CATALOG, provider="chargebee")
    world.at(10).deliver(pc1_subscription())
    invoice = FX.paid("sub_v1", "inv_v1", "basic", 0, MONTH, 20)[0]
    invoice["content"]["invoice"]["line_items"] = [
        {
            "date_from": ts(0),
            "date_to": ts(MONTH),
            "entity_type": "plan",
            "entity_id": "basic-monthly",
            "quantity": 2,
            "amount": 1800,
        },
        {
            "date_from": ts(0),
            "date_to": ts(MONTH),
            "entity_type": "addon",
            "entity_id": "pro-addon",
            "quantity": 1,
            "amount": 500,
        },
    ]
    world.at(20).deliver(invoice)
    plan, addon = (slot(world, "plan"), slot(world, "pro-addon"))
    assert (plan.sku, plan.seats, plan.status) == ("basic", 2, Status.ACTIVE)
    assert (addon.sku, addon.seats, addon.status) == ("pro", 5, Status.ACTIVE)
    assert plan.period_end == T0 + timedelta(seconds=MONTH)


def test_an_unknown_product_catalog_1_addon_is_unmappable_naming_it() -> None:
    event = pc1_subscription()
    event["content"]["subscription"]["addons"][0]["id"] = "mystery-addon"
    with pytest.raises(Unmappable, match="mystery-addon") as raised:
        normalize("cb", event, V1_CATALOG, T0)
    assert raised.value.commands  # the plan still applies
