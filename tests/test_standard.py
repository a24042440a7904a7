"""The Standard Webhooks source: signatures made by the `standardwebhooks`
package, and the neutral billing event mapped onto the lifecycle."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from domain.catalog import Catalog, Offering
from domain.commands import OrderEvent, PaymentEvent
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, Unmappable
from services.providers.standard import normalize, routing_key, verify
from tests import standard_events as sw
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

NOW = int(time.time())
KEY = Credentials(sw.SECRET)
CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme"),
        Offering(sku="pro", product="acme", seats=5, prices={"standard": ("price_pro",)}),
    ]
)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_a_signature_made_by_the_standardwebhooks_package_verifies() -> None:
    body = sw.body(sw.payment("sub_1", "pay_1", NOW, NOW + MONTH, NOW))
    verify(lower(sw.signed_headers(body)), body, KEY, time.time())


def test_any_signature_in_the_list_may_match_during_rotation() -> None:
    body = b'{"id": "evt_1"}'
    headers = lower(sw.signed_headers(body))
    headers["webhook-signature"] = "v1,bm90LWl0 " + headers["webhook-signature"] + " v2,xyz"
    verify(headers, body, KEY, time.time())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: ({}, b), "needs webhook-id"),
        (lambda h, b: (h, b + b" "), "no v1 signature"),
        (lambda h, b: ({**h, "webhook-id": "msg_other"}, b), "no v1 signature"),
        (lambda h, b: ({**h, "webhook-timestamp": str(NOW - 301)}, b), "tolerance"),
        (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "not an integer"),
    ],
)
def test_bad_or_replayed_signatures_are_rejected(change: object, message: str) -> None:
    body = b'{"id": "evt_1"}'
    bad_headers, bad_body = change(lower(sw.signed_headers(body, timestamp=NOW)), body)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        verify(bad_headers, bad_body, KEY, NOW)


def test_the_key_is_the_decoded_secret_not_the_literal_string() -> None:
    import base64
    import hashlib
    import hmac

    body = b'{"id": "evt_1"}'
    signed = f"msg_1.{NOW}.".encode() + body
    literal = base64.b64encode(hmac.new(sw.SECRET.encode(), signed, hashlib.sha256).digest())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": "v1," + literal.decode(),
    }
    with pytest.raises(SignatureError):
        verify(headers, body, KEY, NOW)


def test_payment_and_subscription_events_map_to_facts() -> None:
    event = sw.payment("sub_9", "pay_9", NOW, NOW + MONTH, NOW)
    [command] = normalize("std", event, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert (command.order_ref, command.fact["kind"], command.payment_refs) == (
        "sub_9",
        "payment",
        ("pay_9",),
    )
    assert routing_key(event) == "sub_9"
    snapshot = sw.subscription(
        "sub_9",
        "past_due",
        NOW,
        NOW + MONTH,
        NOW,
        sku=None,  # type: ignore[arg-type]
        items=[{"id": "main", "price": "price_pro", "quantity": 2}],
    )
    [command] = normalize("std", snapshot, CATALOG, datetime.now(UTC))
    assert isinstance(command, OrderEvent)
    assert command.fact["status"] == "past_due"
    assert command.fact["lines"]["main"]["sku"] == "pro"
    refund = sw.event("payment.refunded", {"payment": {"id": "pay_9", "refund": "full"}}, NOW)
    [command] = normalize("std", refund, CATALOG, datetime.now(UTC))
    assert isinstance(command, PaymentEvent) and command.fact["full"] is True


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"type": "payment.succeeded"}, "id: Field required"),
        ({"id": "e", "type": "nope", "timestamp": "2026-01-01T00:00:00Z", "data": {}}, "type"),
        (
            {
                "id": "e",
                "type": "payment.succeeded",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": {"payment": {"id": "p"}},
            },
            "needs payment.items",
        ),
        (
            {
                "id": "e",
                "type": "payment.failed",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": {"payment": {"id": "p", "items": [{"sku": "pro"}]}},
            },
            "payment.failed needs payment.subscription_id",
        ),
        (
            {
                "id": "e",
                "type": "subscription.updated",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": {
                    "subscription": {"id": "s", "status": "active", "items": [{"sku": "gold"}]}
                },
            },
            "sku 'gold' maps to no",
        ),
    ],
)
def test_malformed_or_unknown_events_are_unmappable_with_a_reason(
    payload: dict[str, object], message: str
) -> None:
    with pytest.raises(Unmappable, match=message):
        normalize("std", payload, CATALOG, datetime.now(UTC))


def test_the_lifecycle_matches_the_stripe_path() -> None:
    """create → renew → payment failure → cancel, as in tests/test_lifecycle.py."""
    world = World(provider="standard")
    world.deliver(sw.subscription("sub_1", "pending", ts(0), ts(MONTH), ts(10)))
    entitlement = world.only()
    assert entitlement.status is Status.PENDING
    world.deliver(sw.payment("sub_1", "pay_0", ts(0), ts(MONTH), ts(60)))
    assert entitlement.status is Status.ACTIVE
    world.deliver(sw.payment("sub_1", "pay_1", ts(MONTH), ts(2 * MONTH), ts(MONTH + 60)))
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.at(2 * MONTH + 60).deliver(
        sw.payment("sub_1", "pay_2", ts(2 * MONTH), ts(3 * MONTH), ts(2 * MONTH + 60), failed=True)
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.deliver(
        sw.subscription("sub_1", "canceled", ts(2 * MONTH), ts(3 * MONTH), ts(2 * MONTH + DAY))
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "subscription_canceled")


def test_zoneless_times_are_a_dead_letter_naming_each_field_and_the_order_goes_on() -> None:
    """shared/cases/08: times without an offset once passed the adapter and
    broke the fold (a partition redelivered forever). They are refused
    here, naming every such field; the next valid update of the same
    subscription applies."""
    catalog = Catalog([Offering(sku="pro_annual", product="acme", period="P1Y")])
    poison = sw.event(
        "subscription.updated",
        {
            "subscription": {
                "id": "sub_case08",
                "status": "active",
                "items": [{"id": "main", "sku": "pro_annual"}],
                "current_period_start": "2026-11-01T00:00:00",
                "current_period_end": "2027-11-01T00:00:00",
            }
        },
        NOW,
    )
    poison["timestamp"] = "2026-11-29T10:00:00"
    with pytest.raises(Unmappable) as caught:
        normalize("billing", poison, catalog, datetime.now(UTC))
    for field in ("timestamp", "current_period_start", "current_period_end"):
        assert f"{field}: Input should have timezone info" in caught.value.reason
    valid = json.loads(json.dumps(poison).replace(':00:00"', ':00:00Z"'))
    world = World(catalog=catalog, provider="standard").at(ts(0) - T0.timestamp())
    world.at(datetime(2026, 11, 29, 11, tzinfo=UTC).timestamp() - T0.timestamp()).deliver(valid)
    assert (world.only().status, world.only().period_end) == (
        Status.ACTIVE,
        datetime(2027, 11, 1, tzinfo=UTC),
    )


def test_a_payment_without_a_subscription_is_a_one_off_sale() -> None:
    world = World(catalog=CATALOG, provider="standard")
    sale = sw.event(
        "payment.succeeded",
        {"payment": {"id": "pay_once", "items": [{"price": "price_pro", "quantity": 2}]}},
        ts(60),
    )
    world.at(60).deliver(sale)
    item = world.only()
    assert (item.order_ref, item.sku, item.seats, item.status) == (
        "pay_once",
        "pro",
        10,
        Status.ACTIVE,
    )
    # One period of the offering (P1M) from the sale.
    assert item.period_end == datetime(2026, 2, 1, 0, 1, tzinfo=UTC)
    # It states its own end: a year's license.
    yearly = sw.event(
        "payment.succeeded",
        {
            "payment": {
                "id": "pay_year",
                "items": [{"sku": "basic"}],
                "period_start": sw.iso(ts(0)),
                "period_end": sw.iso(ts(365 * DAY)),
            }
        },
        ts(60),
    )
    world.deliver(yearly)
    [license] = [e for e in world.entitlements() if e.order_ref == "pay_year"]
    assert license.period_end == T0 + timedelta(days=365)
    world.at(DAY).deliver(
        sw.event("payment.refunded", {"payment": {"id": "pay_once", "refund": "full"}}, ts(DAY))
    )
    assert (item.status, item.reason) == (Status.CANCELED, "refunded")


def test_a_refund_before_the_payment_of_a_pending_subscription_never_activates_it() -> None:
    """The subscription is known (PENDING) when its payment's refund comes
    first: the payment then finds the refund already there."""
    from tests.lifecycle_world import MONTH, World
    from tests.standard_events import FIXTURES as FX

    w = World(catalog=FX.catalog, provider="standard")
    w.at(10).deliver(
        FX._subscription("subscription.updated", "sub_p", "pending", "basic", 0, MONTH, 10)[0]
    )
    assert w.only().status is Status.PENDING
    for payload in FX.refunded("sub_p", "pay_p", 9900, 9900, 40):
        w.at(40).deliver(payload)
    for payload in FX.paid("sub_p", "pay_p", "basic", 0, MONTH, 20):
        w.at(60).deliver(payload)
    item = w.only()
    assert (item.status, item.reason) == (Status.CANCELED, "refunded")
    assert "Activated" not in w.event_types(item)
