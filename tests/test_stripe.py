"""Stripe signature verification and event parsing, on both invoice shapes."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent, PaymentEvent
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.stripe import normalize, routing_key, verify
from tests import stripe_events as se

NOW = int(time.time())
KEY = Credentials(se.SECRET)
CATALOG = Catalog(
    [
        Offering(sku="better_annual", product="acme", period="P1Y", seats=3),
        Offering(sku="basic_monthly", product="acme", stripe_price_ids=("price_basic",)),
    ]
)
YEAR = {"start": NOW, "end": NOW + 365 * 86400}


def headers(body: bytes, **kwargs: int) -> dict[str, str]:
    return {k.lower(): v for k, v in se.signed_headers(body, **kwargs).items()}


def test_a_signature_made_by_the_stripe_sdk_verifies() -> None:
    body = se.body(se.subscription_deleted(subscription="sub_1"))
    verify(headers(body), body, KEY, time.time())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h, b: ({}, b), "missing"),
        (lambda h, b: ({"stripe-signature": "garbage"}, b), "t= and at least one v1="),
        (lambda h, b: (h, b + b" "), "no v1 signature"),
        (
            lambda h, b: ({"stripe-signature": h["stripe-signature"].replace("v1=", "v1=00")}, b),
            "no v1 signature",
        ),
    ],
)
def test_bad_signatures_are_rejected(mutate: object, message: str) -> None:
    body = se.body(se.subscription_deleted(subscription="sub_1"))
    bad_headers, bad_body = mutate(headers(body), body)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        verify(bad_headers, bad_body, KEY, time.time())


def test_a_signature_outside_the_tolerance_is_rejected() -> None:
    body = se.body(se.subscription_deleted(subscription="sub_1"))
    old = headers(body, timestamp=NOW - 301)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(old, body, KEY, NOW)
    verify(headers(body, timestamp=NOW - 299), body, KEY, NOW)


def test_any_one_of_several_v1_signatures_may_match() -> None:
    body = se.body(se.subscription_deleted(subscription="sub_1"))
    good = headers(body)["stripe-signature"]
    t, v1 = good.split(",")
    rotated = {"stripe-signature": f"{t},v1={'0' * 64},{v1},v0=legacy"}
    verify(rotated, body, KEY, time.time())


def test_the_secret_is_the_literal_whsec_string() -> None:
    body = se.body(se.subscription_deleted(subscription="sub_1"))
    with pytest.raises(SignatureError):
        verify(headers(body), body, Credentials("whsec_other"), time.time())


@pytest.mark.parametrize("shape", [se.BASIL, se.LEGACY])
def test_invoice_paid_maps_lines_onto_offerings(shape: str) -> None:
    event = se.invoice_paid(
        subscription="sub_42",
        shape=shape,
        customer="cus_9",
        email="x@example.com",
        lines=[
            {"price": "price_annual", "sku": "better_annual", "quantity": 2, **YEAR},
            {"price": "price_basic", **YEAR},
        ],
    )
    if shape == se.BASIL:  # the current API carries no price metadata: map by price id
        CATALOG_BY_ID = Catalog(
            [
                Offering(
                    sku="better_annual", product="acme", seats=3, stripe_price_ids=("price_annual",)
                ),
                Offering(sku="basic_monthly", product="acme", stripe_price_ids=("price_basic",)),
            ]
        )
        catalog = CATALOG_BY_ID
    else:
        catalog = CATALOG
    [command] = normalize("stripe-main", event, catalog, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert command.order_ref == "sub_42"
    assert command.customer.id == "cus_9" and command.customer.email == "x@example.com"
    assert command.cause.event_id == event["id"]
    lines = {line.offering.sku: line for line in command.lines}
    assert lines["better_annual"].quantity == 2
    assert lines["better_annual"].period_start == datetime.fromtimestamp(YEAR["start"], UTC)
    assert lines["better_annual"].period_end == datetime.fromtimestamp(YEAR["end"], UTC)
    assert lines["basic_monthly"].quantity == 1
    assert routing_key(event) == "sub_42"


def test_price_metadata_wins_over_the_catalog_price_list() -> None:
    event = se.invoice_paid(
        subscription="sub_1",
        shape=se.LEGACY,
        lines=[{"price": "price_basic", "sku": "better_annual", **YEAR}],
    )
    [command] = normalize("s", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert [line.offering.sku for line in command.lines] == ["better_annual"]


def test_proration_lines_grant_nothing() -> None:
    event = se.invoice_paid(
        subscription="sub_1",
        lines=[
            {"price": "price_basic", **YEAR},
            {"price": "price_unknown", "proration": True, **YEAR},
        ],
    )
    [command] = normalize("s", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert [line.offering.sku for line in command.lines] == ["basic_monthly"]


def test_an_unknown_price_is_unmappable_but_keeps_the_mapped_lines() -> None:
    event = se.invoice_paid(
        subscription="sub_1",
        lines=[{"price": "price_basic", **YEAR}, {"price": "price_nope", **YEAR}],
    )
    with pytest.raises(Unmappable, match="price 'price_nope' maps to no offering") as info:
        normalize("s", event, CATALOG, datetime.now(UTC))
    [partial] = info.value.commands
    assert isinstance(partial, OrderEvent)
    assert [line.offering.sku for line in partial.lines] == ["basic_monthly"]


def test_an_unknown_offering_sku_in_metadata_is_unmappable() -> None:
    event = se.invoice_paid(
        subscription="sub_1", shape=se.LEGACY, lines=[{"price": "price_x", "sku": "gold", **YEAR}]
    )
    with pytest.raises(Unmappable, match="offering_sku 'gold'"):
        normalize("s", event, CATALOG, datetime.now(UTC))


@pytest.mark.parametrize(
    ("price", "message"),
    [
        (["price_basic"], r"Stripe price \['price_basic'\] is not a string"),
        (None, "an item names no price"),
        ({"id": None}, "Stripe price .* is an object without an id"),
    ],
)
def test_a_line_price_that_is_no_id_is_named_as_such(price: object, message: str) -> None:
    event = se.invoice_paid(subscription="sub_1", lines=[{"price": price, **YEAR}])
    with pytest.raises(Unmappable, match=message):
        normalize("s", event, CATALOG, datetime.now(UTC))


def test_an_invoice_without_lines_is_unmappable() -> None:
    event = se.invoice_paid(subscription="sub_1", lines=[])
    with pytest.raises(Unmappable, match="no lines"):
        normalize("s", event, CATALOG, datetime.now(UTC))


@pytest.mark.parametrize("shape", [se.BASIL, se.LEGACY])
def test_subscription_deleted_cancels_the_order(shape: str) -> None:
    event = se.subscription_deleted(subscription="sub_7", shape=shape)
    [command] = normalize("stripe-main", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert command.order_ref == "sub_7"
    assert command.fact["kind"] == "ended"
    assert command.fact["reason"] == "subscription_deleted"
    assert routing_key(event) == "sub_7"


@pytest.mark.parametrize("shape", [se.BASIL, se.LEGACY])
def test_a_subscription_snapshot_keeps_status_period_items_and_cancel_at(shape: str) -> None:
    event = se.subscription_event(
        "customer.subscription.updated",
        subscription="sub_8",
        items=[{"price": "price_basic", "quantity": 3}],
        status="trialing",
        start=NOW,
        end=NOW + 14 * 86400,
        trial_end=NOW + 14 * 86400,
        cancel_at_period_end=True,
        shape=shape,
    )
    [command] = normalize("stripe-main", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    fact = command.fact
    end = datetime.fromtimestamp(NOW + 14 * 86400, UTC)
    assert (fact["kind"], fact["status"]) == ("subscription", "trialing")
    assert fact["end"] == end and fact["trial_end"] == end and fact["cancel_at"] == end
    slot = se.item_id("sub_8", "price_basic")
    assert fact["lines"] == {
        slot: {"sku": "basic_monthly", "quantity": 3, "start": None, "end": None}
    }
    assert [line.slot for line in command.lines] == [slot]


def test_invoice_lines_name_their_subscription_item_as_the_slot() -> None:
    event = se.invoice_paid(subscription="sub_3", lines=[{"price": "price_basic", **YEAR}])
    [command] = normalize("s", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert [line.slot for line in command.lines] == [se.item_id("sub_3", "price_basic")]


def test_a_refund_and_a_dispute_name_the_payment_not_the_order() -> None:
    refund = se.charge_refunded(payment_intent="pi_1", invoice="in_1", refunded=100)
    [command] = normalize("s", refund, CATALOG, datetime.now(UTC))
    assert isinstance(command, PaymentEvent)
    assert command.payment_refs == ("pi_1", "in_1")
    assert command.fact == {"kind": "refund", "full": False, "invoice": "in_1", "amount": None}
    assert routing_key(refund) == "in_1"
    opened = se.dispute("charge.dispute.created", dispute_id="dp_1", payment_intent="pi_1")
    lost = se.dispute(
        "charge.dispute.closed", dispute_id="dp_1", payment_intent="pi_1", status="lost"
    )
    [first] = normalize("s", opened, CATALOG, datetime.now(UTC))
    [second] = normalize("s", lost, CATALOG, datetime.now(UTC))
    assert isinstance(first, PaymentEvent) and isinstance(second, PaymentEvent)
    assert (first.fact["state"], second.fact["state"]) == ("open", "lost")
    assert routing_key(opened) == "pi_1"


def test_events_without_entitlement_meaning_are_ignored() -> None:
    event = {
        "id": "evt_1",
        "type": "customer.created",
        "created": NOW,
        "data": {"object": {"id": "cus_1", "object": "customer"}},
    }
    assert normalize("s", event, CATALOG, datetime.now(UTC)) == []


def test_a_payload_that_is_not_a_stripe_event_is_unmappable() -> None:
    with pytest.raises(Unmappable, match="not a Stripe event"):
        normalize("s", {"hello": "world"}, CATALOG, datetime.now(UTC))
