"""Chargebee: HTTP Basic auth, and its events on the lifecycle."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent
from domain.entitlement import Status
from services.providers import Credentials, SignatureError
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
