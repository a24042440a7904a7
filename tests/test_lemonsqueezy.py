"""Lemon Squeezy: X-Signature, content-hash deduplication, and one purchase
(order plus subscription) as one entitlement."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from domain import lifecycle
from domain.catalog import Catalog, Offering
from domain.entitlement import Status
from domain.lifecycle import Facts, Line, Policy
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.lemonsqueezy import event_id, normalize, routing_key, verify
from tests import lemonsqueezy_events as ls
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

NOW = int(time.time())
CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme", prices={"lemonsqueezy": ("101",)}),
        Offering(sku="lifetime", product="acme", period="P100Y", prices={"lemonsqueezy": ("202",)}),
    ]
)


def test_the_signature_is_an_hmac_of_the_raw_body() -> None:
    body = ls.body(ls.order("1", NOW))
    key = Credentials(ls.SECRET)
    verify({"x-signature": ls.signed_headers(body)["X-Signature"]}, body, key, NOW)
    for headers in ({}, {"x-signature": ls.signed_headers(body, secret="x")["X-Signature"]}):
        with pytest.raises(SignatureError):
            verify(headers, body, key, NOW)
    with pytest.raises(SignatureError):
        verify({"x-signature": ls.signed_headers(body)["X-Signature"]}, body + b" ", key, NOW)


def test_without_an_event_id_deliveries_are_identified_by_their_content() -> None:
    event = ls.order("1", NOW)
    again = ls.order("1", NOW)
    assert event_id(event) == event_id(again)
    assert event_id(event) != event_id(ls.order("1", NOW, refunded=True, name="order_refunded"))
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(ls.order("5", ts(0)))
    version = world.only().version
    world.deliver(ls.order("5", ts(0)))
    assert world.only().version == version


def test_an_order_and_its_subscription_are_one_entitlement_through_its_lifecycle() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    created = ls.subscription("subscription_created", "31", "5", "active", ts(MONTH), ts(60))
    assert routing_key(created) == "order/5"
    world.deliver(created)
    world.deliver(ls.order("5", ts(0)))
    entitlement = world.only()
    assert (entitlement.status, entitlement.customer_email) == (Status.ACTIVE, "ls@example.com")
    # Renewal: the invoice (which names only the subscription), then the new renews_at.
    paid = ls.invoice("subscription_payment_success", "401", "31", ts(MONTH + 60))
    assert routing_key(paid) == "subscription/31"
    world.at(MONTH).deliver(paid)
    world.deliver(
        ls.subscription("subscription_updated", "31", "5", "active", ts(2 * MONTH), ts(MONTH + 120))
    )
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.at(2 * MONTH + 60).deliver(
        ls.invoice("subscription_payment_failed", "402", "31", ts(2 * MONTH + 60))
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.deliver(
        ls.subscription(
            "subscription_cancelled",
            "31",
            "5",
            "cancelled",
            None,
            ts(2 * MONTH + DAY),
            ends=ts(2 * MONTH + 2 * DAY),
            cancelled=True,
        )
    )
    assert entitlement.cancel_at == T0 + timedelta(seconds=2 * MONTH + 2 * DAY)
    world.at(2 * MONTH + 2 * DAY).tick()
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "canceled_at_period_end")
    world.deliver(
        ls.subscription(
            "subscription_expired",
            "31",
            "5",
            "expired",
            None,
            ts(2 * MONTH + 2 * DAY),
            cancelled=True,
        )
    )
    assert entitlement.status is Status.CANCELED


def test_an_invoice_before_its_subscription_waits_for_it() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(ls.invoice("subscription_payment_failed", "402", "31", ts(MONTH + 60)))
    assert world.entitlements() == []
    world.at(MONTH + 120).deliver(
        ls.subscription("subscription_created", "31", "5", "active", ts(2 * MONTH), ts(60))
    )
    assert world.only().overdue


def test_a_one_off_order_lasts_its_offering_period_and_a_refund_cancels_it() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(ls.order("8", ts(0), variant=202))
    entitlement = world.only()
    assert (entitlement.sku, entitlement.status) == ("lifetime", Status.ACTIVE)
    assert entitlement.period_end is not None and entitlement.period_end.year == T0.year + 100
    world.deliver(ls.order("8", ts(DAY), variant=202, refunded=True, name="order_refunded"))
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")


# -- the fold's rule for payments of the subscription's period (pure) -------------


def _keyed(fact: dict[str, Any], key: str, at: int) -> dict[str, Any]:
    return {**fact, "key": key, "at": T0 + timedelta(seconds=at)}


def test_a_payment_of_the_subscription_period_yields_to_it_and_is_the_current_one() -> None:
    offering = Offering(sku="basic", product="acme")
    slot, now, policy = "main", T0 + timedelta(seconds=60), Policy()
    month = Line(slot, offering, 1, T0, T0 + timedelta(days=31))
    facts = Facts(
        [_keyed(lifecycle.payment("order/1", [month], subscription_period=True), "k1", 0)]
    )
    # Alone (a one-off order) it pays its own period.
    assert facts.standing(slot, offering, policy, now).period_end == T0 + timedelta(days=31)
    # With a subscription on a trial, it is the subscription's first order:
    # the period is the trial the subscription states, not a month.
    trial_end = T0 + timedelta(days=7)
    trial = lifecycle.subscription(
        "trialing", [Line(slot, offering)], None, trial_end, trial_end=trial_end
    )
    facts.add(_keyed(trial, "k2", 1))
    assert facts.standing(slot, offering, policy, now).period_end == trial_end
    # An invoice naming no period pays the one the subscription then states.
    renewed = T0 + timedelta(days=37)
    facts.add(_keyed(lifecycle.payment("invoice/1", [], subscription_period=True), "k3", 7 * DAY))
    facts.add(
        _keyed(
            lifecycle.subscription("active", [Line(slot, offering)], None, renewed),
            "k4",
            7 * DAY + 1,
        )
    )
    assert facts.standing(slot, offering, policy, now).period_end == renewed
    # The newest such payment is the current period's: refunded in full, it
    # cancels; the older order's full refund does not.
    older = Facts([*facts.log, _keyed(lifecycle.refund(True, "order/1"), "k5", 8 * DAY)])
    assert older.blocking(slot, now, offering) == []
    current = Facts([*facts.log, _keyed(lifecycle.refund(True, "invoice/1"), "k6", 8 * DAY)])
    assert current.blocking(slot, now, offering) == [(Status.CANCELED, "refunded", "k6")]


# -- provider behaviour the conformance suite does not cover -------------------------


def subscribed(world: World, sub: str = "31", order: str = "5", renews: int = MONTH) -> None:
    """A purchase paid for [0, renews): the order, its subscription, the
    initial invoice."""
    world.at(60).deliver(ls.order(order, ts(0), updated=ts(60)))
    world.deliver(ls.subscription("subscription_created", sub, order, "active", ts(renews), ts(60)))
    world.deliver(
        ls.invoice(
            "subscription_payment_success",
            "400",
            sub,
            ts(60),
            billing_reason="initial",
            created=ts(0),
        )
    )


def paused(mode: str, resumes: int | None, at: int) -> dict[str, Any]:
    pause = {"mode": mode, "resumes_at": ls.iso(ts(resumes)) if resumes else None}
    return ls.subscription(
        "subscription_paused", "31", "5", "paused", ts(MONTH), ts(at), pause=pause
    )


def test_a_free_pause_keeps_access_until_it_resumes_and_a_void_pause_suspends() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    entitlement = world.only()
    # `free`: the service goes on without payment collection, through resumes_at.
    world.at(5 * DAY).deliver(paused("free", 2 * MONTH, 5 * DAY))
    assert (entitlement.status, entitlement.period_end) == (
        Status.ACTIVE,
        T0 + timedelta(seconds=2 * MONTH),
    )
    world.at(MONTH + 5 * DAY).tick()
    assert entitlement.status is Status.ACTIVE  # past renews_at, still in the free pause
    # `void`: the service is halted.
    world.at(MONTH + 6 * DAY).deliver(paused("void", None, MONTH + 6 * DAY))
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "paused")
    world.at(MONTH + 9 * DAY).deliver(
        ls.subscription(
            "subscription_unpaused",
            "31",
            "5",
            "active",
            ts(2 * MONTH + 9 * DAY),
            ts(MONTH + 9 * DAY),
        )
    )
    assert entitlement.status is Status.ACTIVE


def test_a_pause_without_a_mode_is_unmappable_naming_the_field() -> None:
    event = paused("free", None, DAY)
    event["data"]["attributes"]["pause"] = {"resumes_at": None}
    with pytest.raises(Unmappable, match=r"pause\.mode"):
        normalize("src", event, CATALOG, T0)


@pytest.mark.parametrize(("refunded", "status"), [(999, Status.CANCELED), (300, Status.ACTIVE)])
def test_a_subscription_payment_refunded_in_full_cancels_and_in_part_is_recorded(
    refunded: int, status: Status
) -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    world.at(DAY).deliver(
        ls.invoice(
            "subscription_payment_refunded",
            "400",
            "31",
            ts(DAY),
            refunded_amount=refunded,
            billing_reason="initial",
            created=ts(0),
        )
    )
    assert world.only().status is status
    if status is Status.CANCELED:
        assert world.only().reason == "refunded"


def test_refunding_an_earlier_period_or_a_proration_leaves_the_current_one() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    world.at(MONTH + 60).deliver(
        ls.invoice("subscription_payment_success", "401", "31", ts(MONTH + 60), created=ts(MONTH))
    )
    world.deliver(
        ls.subscription("subscription_updated", "31", "5", "active", ts(2 * MONTH), ts(MONTH + 61))
    )
    # A plan change charged at once: a proration, which pays for no period.
    world.at(MONTH + DAY).deliver(
        ls.invoice(
            "subscription_payment_success",
            "402",
            "31",
            ts(MONTH + DAY),
            total=120,
            billing_reason="updated",
        )
    )
    for invoice_id, total in (("400", 999), ("402", 120)):
        world.at(MONTH + 2 * DAY).deliver(
            ls.invoice(
                "subscription_payment_refunded",
                invoice_id,
                "31",
                ts(MONTH + 2 * DAY),
                total=total,
                refunded_amount=total,
            )
        )
    entitlement = world.only()
    assert (entitlement.status, entitlement.period_end) == (
        Status.ACTIVE,
        T0 + timedelta(seconds=2 * MONTH),
    )
    world.deliver(
        ls.invoice(
            "subscription_payment_refunded", "401", "31", ts(MONTH + 3 * DAY), refunded_amount=999
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")


def test_a_one_off_order_refunded_in_part_keeps_its_license() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(ls.order("8", ts(0), variant=202))
    world.deliver(
        ls.order(
            "8",
            ts(0),
            variant=202,
            refunded=True,
            refunded_amount=400,
            name="order_refunded",
            updated=ts(DAY),
        )
    )
    assert world.only().status is Status.ACTIVE


def test_a_subscriptions_first_order_does_not_outlast_its_trial() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(ls.order("5", ts(0), total=0))
    world.deliver(
        ls.subscription(
            "subscription_created",
            "31",
            "5",
            "on_trial",
            ts(7 * DAY),
            ts(1),
            trial_ends=ts(7 * DAY),
        )
    )
    entitlement = world.only()
    assert (entitlement.status, entitlement.trial) == (Status.ACTIVE, True)
    assert entitlement.period_end == T0 + timedelta(days=7)


def test_a_recovered_payment_settles_the_failed_one() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    world.at(MONTH + 60).deliver(
        ls.invoice("subscription_payment_failed", "401", "31", ts(MONTH + 60), created=ts(MONTH))
    )
    assert world.only().overdue
    # Lemon Squeezy sends `_recovered` with `_success`; either settles it.
    world.at(MONTH + 3 * DAY).deliver(
        ls.invoice("subscription_payment_recovered", "401", "31", ts(MONTH + 3 * DAY))
    )
    world.deliver(
        ls.subscription(
            "subscription_updated", "31", "5", "active", ts(2 * MONTH), ts(MONTH + 3 * DAY)
        )
    )
    entitlement = world.only()
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)


def test_a_cancellation_ends_access_at_ends_at_unless_resumed() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    cancelled = ls.subscription(
        "subscription_cancelled",
        "31",
        "5",
        "cancelled",
        ts(MONTH),
        ts(DAY),
        ends=ts(MONTH),
        cancelled=True,
    )
    world.at(DAY).deliver(cancelled)
    entitlement = world.only()
    assert (entitlement.status, entitlement.cancel_at) == (
        Status.ACTIVE,
        T0 + timedelta(seconds=MONTH),
    )
    world.at(2 * DAY).deliver(
        ls.subscription("subscription_resumed", "31", "5", "active", ts(MONTH), ts(2 * DAY))
    )
    assert entitlement.cancel_at is None
    world.deliver(cancelled)  # a late retry of the cancellation changes nothing
    assert entitlement.cancel_at is None


def test_times_are_read_with_their_offset_and_one_without_is_unmappable() -> None:
    event = ls.subscription("subscription_updated", "31", "5", "active", ts(MONTH), ts(DAY))
    event["data"]["attributes"]["renews_at"] = "2026-02-01T02:00:00.000000+02:00"
    (command,) = normalize("src", event, CATALOG, T0)
    assert command.fact["end"] == T0 + timedelta(days=31)
    event["data"]["attributes"]["renews_at"] = "2026-02-01T00:00:00.000000"
    with pytest.raises(Unmappable, match=r"renews_at .* offset"):
        normalize("src", event, CATALOG, T0)


def test_an_expired_subscription_never_seen_mints_no_license() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    world.deliver(
        ls.subscription(
            "subscription_expired",
            "31",
            "5",
            "expired",
            None,
            ts(MONTH),
            ends=ts(MONTH),
            cancelled=True,
        )
    )
    assert world.entitlements() == []
    world.deliver(ls.order("5", ts(0)))  # its order, late: created already over
    assert world.only().status is Status.CANCELED


def test_unknown_events_are_dead_letters_and_license_keys_are_ignored() -> None:
    event = ls.order("5", ts(0), name="order_exploded")
    with pytest.raises(Unmappable, match="order_exploded"):
        normalize("src", event, CATALOG, T0)
    assert normalize("src", ls.order("5", ts(0), name="license_key_created"), CATALOG, T0) == []


def test_a_subscriptions_order_refunded_in_full_in_its_first_period_cancels() -> None:
    world = World(catalog=CATALOG, provider="lemonsqueezy")
    subscribed(world)
    world.at(DAY).deliver(
        ls.order("5", ts(0), refunded=True, name="order_refunded", updated=ts(DAY))
    )
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")
