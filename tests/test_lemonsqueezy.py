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
from services.providers import Credentials, SignatureError
from services.providers.lemonsqueezy import event_id, routing_key, verify
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
