"""PayPal: offline verification against a locally generated CA (injected
trust root and fetcher), and subscription/sale events on the lifecycle."""

from __future__ import annotations

import functools
import time
from datetime import timedelta

import pytest

from domain.catalog import Catalog, Offering, add_period
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, Unmappable, paypal
from services.providers.paypal import Certificates, verify
from tests import paypal_events as pp
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

KEY = Credentials("", webhook_id=pp.WEBHOOK_ID)
CATALOG = Catalog([Offering(sku="basic", product="acme", prices={"paypal": ("P-BASIC",)})])


def fixed(pem: bytes, url: str) -> bytes:
    return pem


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture
def authority(monkeypatch: pytest.MonkeyPatch) -> pp.Authority:
    ca = pp.Authority.make()
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return ca.leaf_pem()

    monkeypatch.setattr(paypal, "CERTIFICATES", Certificates(fetch=fetch, roots=lambda: [ca.root]))
    ca.fetched = fetched  # type: ignore[attr-defined]
    return ca


def test_a_signature_by_the_certificate_verifies_and_the_certificate_is_cached(
    authority: pp.Authority,
) -> None:
    for n in range(3):
        body = pp.body(pp.sale("I-1", f"S{n}", int(time.time())))
        verify(lower(authority.headers(body)), body, KEY, time.time())
    assert authority.fetched == [pp.CERT_URL]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: (h, b + b" "), "does not match"),
        (lambda h, b: ({**h, "paypal-transmission-id": "other"}, b), "does not match"),
        (lambda h, b: ({**h, "paypal-auth-algo": "SHA1withRSA"}, b), "not SHA256withRSA"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "paypal-cert-url"}, b), "needs"),
        (
            lambda h, b: ({**h, "paypal-cert-url": pp.CERT_URL.replace("https", "http")}, b),
            "not an https URL on a PayPal API host",
        ),
        (
            lambda h, b: ({**h, "paypal-cert-url": "https://evil.example/cert.pem"}, b),
            "not an https URL on a PayPal API host",
        ),
        (
            lambda h, b: ({**h, "paypal-cert-url": "https://api.paypal.com.evil.example/c"}, b),
            "not an https URL on a PayPal API host",
        ),
    ],
)
def test_bad_signatures_and_untrusted_urls_are_rejected(
    authority: pp.Authority, change: object, message: str
) -> None:
    body = pp.body(pp.sale("I-1", "S1", int(time.time())))
    headers, bad_body = change(lower(authority.headers(body)), body)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        verify(headers, bad_body, KEY, time.time())
    assert all("evil" not in url for url in authority.fetched)  # type: ignore[attr-defined]


def test_the_signature_covers_the_webhook_id(authority: pp.Authority) -> None:
    body = pp.body(pp.sale("I-1", "S1", int(time.time())))
    headers = lower(authority.headers(body, webhook_id="WH-SOMEONE-ELSE"))
    with pytest.raises(SignatureError, match="does not match"):
        verify(headers, body, KEY, time.time())


def test_an_expired_certificate_or_one_from_another_ca_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trusted = pp.Authority.make()
    expired = pp.Authority.make(expired=True)
    stranger = pp.Authority.make()
    body = pp.body(pp.sale("I-1", "S1", int(time.time())))
    for ca, message in ((expired, "expired"), (stranger, "trusted root")):
        root, pem = (ca.root if ca is expired else trusted.root), ca.leaf_pem()
        monkeypatch.setattr(
            paypal,
            "CERTIFICATES",
            Certificates(
                fetch=functools.partial(fixed, pem), roots=functools.partial(list, [root])
            ),
        )
        with pytest.raises(SignatureError, match=message):
            verify(lower(ca.headers(body)), body, KEY, time.time())
    named = pp.Authority.make(common="paypal.evil.example")
    monkeypatch.setattr(
        paypal,
        "CERTIFICATES",
        Certificates(fetch=lambda url: named.leaf_pem(), roots=lambda: [named.root]),
    )
    with pytest.raises(SignatureError, match=r"paypal\.com name"):
        verify(lower(named.headers(body)), body, KEY, time.time())


def test_the_lifecycle_matches_the_stripe_path() -> None:
    """create → renew → payment failure → cancel; a sale pays one period."""
    world = World(catalog=CATALOG, provider="paypal")
    world.deliver(
        pp.subscription("BILLING.SUBSCRIPTION.CREATED", "I-1", "APPROVAL_PENDING", None, ts(10))
    )
    entitlement = world.only()
    assert world.only().status is Status.PENDING
    world.deliver(pp.sale("I-1", "S0", ts(60)))
    world.deliver(
        pp.subscription("BILLING.SUBSCRIPTION.ACTIVATED", "I-1", "ACTIVE", ts(MONTH), ts(70))
    )
    assert entitlement.status is Status.ACTIVE
    assert entitlement.customer_email == "pp@example.com"
    world.at(MONTH).deliver(pp.sale("I-1", "S1", ts(MONTH + 60)))
    # No period on a sale: one month of the offering from the sale (Jan 31 + 1 month).
    assert entitlement.period_end == add_period(T0 + timedelta(seconds=MONTH + 60), "P1M")
    world.at(58 * DAY).deliver(
        pp.subscription(
            "BILLING.SUBSCRIPTION.PAYMENT.FAILED",
            "I-1",
            "ACTIVE",
            ts(58 * DAY),
            ts(58 * DAY),
        )
    )
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.deliver(pp.sale("I-1", "S2", ts(2 * MONTH + DAY)))  # the retry succeeds
    assert entitlement.overdue is False
    world.deliver(
        pp.subscription(
            "BILLING.SUBSCRIPTION.CANCELLED", "I-1", "CANCELLED", None, ts(2 * MONTH + 2 * DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "subscription_canceled")


def test_a_full_refund_by_amount_cancels_and_a_partial_one_does_not() -> None:
    world = World(catalog=CATALOG, provider="paypal")
    world.deliver(
        pp.subscription("BILLING.SUBSCRIPTION.ACTIVATED", "I-2", "ACTIVE", ts(MONTH), ts(70))
    )
    world.deliver(pp.sale("I-2", "S9", ts(60)))
    world.deliver(pp.refund("S9", ts(DAY), total="-2.00"))
    assert world.only().status is Status.ACTIVE
    world.deliver(pp.refund("S9", ts(2 * DAY), total="-9.99"))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_with_a_tolerance_a_replayed_delivery_is_rejected(authority: pp.Authority) -> None:
    body = pp.body(pp.sale("I-1", "S1", int(time.time())))
    old = pp.iso(int(time.time()) - 3600)
    headers = lower(authority.headers(body, transmission_time=old))
    verify(headers, body, KEY, time.time())  # no tolerance configured: only the signature counts
    strict = Credentials("", webhook_id=pp.WEBHOOK_ID, tolerance_seconds=300)
    with pytest.raises(SignatureError, match="outside the tolerance"):
        verify(headers, body, strict, time.time())


# -- what the conformance suite does not cover ------------------------------------------

FX = pp.FIXTURES


def world() -> World:
    return World(catalog=FX.catalog, provider="paypal")


def paid_subscription(sku: str = "basic") -> World:
    w = world()
    w.at(10).deliver(FX.subscribed("I-S", sku, 0, MONTH, 10)[0])
    w.at(20).deliver(FX.paid("I-S", "S-1", sku, 0, MONTH, 20)[0])
    assert w.only().status is Status.ACTIVE
    return w


def test_suspended_by_the_merchant_withholds_access_at_once() -> None:
    w = paid_subscription()
    w.at(5 * DAY).deliver(FX.paused("I-S", "basic", 0, MONTH, 5 * DAY)[0])
    assert (w.only().status, w.only().reason) == (Status.SUSPENDED, "paused")


def test_suspended_after_failed_payments_is_dunning_not_a_pause() -> None:
    """PayPal suspends a subscription whose failed payments reached the
    plan's threshold: access runs to the paid-through date, overdue, then
    the offering's thresholds decide (here: none, so it expires)."""
    w = paid_subscription()
    at = MONTH + 5 * DAY
    suspended = FX._subscription(
        "BILLING.SUBSCRIPTION.SUSPENDED",
        "I-S",
        "basic",
        "SUSPENDED",
        0,
        MONTH - DAY,
        last_paid=0,
        failed=3,
        outstanding=9900,
    )
    w.at(MONTH - DAY).deliver(suspended)
    item = w.only()
    assert (item.status, item.overdue) == (Status.ACTIVE, True)
    w.at(at).tick()
    assert item.status is Status.EXPIRED


def test_a_cancellation_keeps_the_cycle_last_paid_and_one_never_paid_ends_at_once() -> None:
    w = paid_subscription()
    w.at(3 * DAY).deliver(FX.cancel_at_period_end("I-S", "basic", 0, MONTH, 3 * DAY)[0])
    item = w.only()
    assert (item.status, item.cancel_at) == (Status.ACTIVE, T0 + timedelta(seconds=MONTH))
    w.at(MONTH + 1).tick()
    assert (item.status, item.reason) == (Status.CANCELED, "canceled_at_period_end")
    never = world()
    never.at(5).deliver(FX.subscribed("I-N", "basic", 0, MONTH, 5)[0])
    never.at(10).deliver(
        FX._subscription("BILLING.SUBSCRIPTION.CANCELLED", "I-N", "basic", "CANCELLED", 0, 10)
    )
    assert (never.only().status, never.only().reason) == (
        Status.CANCELED,
        "subscription_canceled",
    )


def test_a_reversed_sale_in_full_cancels() -> None:
    w = paid_subscription()
    reversal = FX.refunded("I-S", "S-1", 9900, 9900, DAY)[0]
    reversal["event_type"] = "PAYMENT.SALE.REVERSED"
    w.at(DAY).deliver(reversal)
    assert (w.only().status, w.only().reason) == (Status.CANCELED, "refunded")


def test_partial_refunds_of_one_sale_add_up_to_a_full_one() -> None:
    w = paid_subscription()
    w.at(DAY).deliver(FX.refunded("I-S", "S-1", 9900, 5000, DAY)[0])
    assert w.only().status is Status.ACTIVE
    w.at(2 * DAY).deliver(FX.refunded("I-S", "S-1", 9900, 4900, 2 * DAY)[0])
    assert (w.only().status, w.only().reason) == (Status.CANCELED, "refunded")


def test_a_pending_refund_waits_and_a_failed_one_refunds_nothing() -> None:
    w = paid_subscription()
    pending = FX.refunded("I-S", "S-1", 9900, 9900, DAY)[0]
    pending["resource"]["state"] = "pending"
    assert paypal.normalize("src", pending, FX.catalog, T0) == []
    failed = FX.refunded("I-S", "S-1", 9900, 9900, DAY)[0]
    failed["resource"]["state"] = "failed"
    w.at(DAY).deliver(failed)
    assert w.only().status is Status.ACTIVE


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        ("CANCELED_BY_BUYER", Status.ACTIVE),
        ("RESOLVED_WITH_PAYOUT", Status.ACTIVE),
        ("DENIED", Status.ACTIVE),
        ("ACCEPTED", Status.CANCELED),
    ],
)
def test_every_dispute_outcome_decides(outcome: str, status: Status) -> None:
    w = paid_subscription()
    w.at(DAY).deliver(pp.dispute_event("PP-D-1", "S-1", "open", ts(DAY)))
    assert (w.only().status, w.only().reason) == (Status.SUSPENDED, "disputed")
    w.at(5 * DAY).deliver(pp.dispute_event("PP-D-1", "S-1", outcome, ts(5 * DAY)))
    assert w.only().status is status


def test_a_dispute_resolved_without_an_outcome_is_unmappable() -> None:
    event = pp.dispute_event("PP-D-2", "S-1", "NONE", ts(DAY))
    with pytest.raises(Unmappable, match="outcome_code 'NONE'"):
        paypal.normalize("src", event, FX.catalog, T0)


# -- one-off sales (Orders v2) ------------------------------------------------------------


def test_a_completed_order_alone_grants_one_period_per_item_and_a_refund_revokes() -> None:
    w = world()
    capture = pp.capture("CAP-1", "O-1", ts(10), amount=4900)
    order = pp.order_event(
        "CHECKOUT.ORDER.COMPLETED", "O-1", "ITEM-PRO", ts(10), captures=[capture], quantity="2"
    )
    w.at(10).deliver(order)
    item = w.only()
    assert (item.status, item.sku, item.seats) == (Status.ACTIVE, "pro", 10)
    assert item.period_end == T0 + timedelta(seconds=10 + MONTH)
    assert item.customer_email == "buyer@example.com"
    w.at(DAY).deliver(pp.capture_refund("PAYMENT.CAPTURE.REFUNDED", "CAP-1", ts(DAY), 1000))
    assert item.status is Status.ACTIVE
    w.at(2 * DAY).deliver(pp.capture_refund("PAYMENT.CAPTURE.REVERSED", "CAP-1", ts(2 * DAY), 3900))
    assert (item.status, item.reason) == (Status.CANCELED, "refunded")


def test_a_capture_before_its_approval_waits_for_the_items() -> None:
    w = world()
    events = FX.sold("O-2", "basic", 10)
    w.at(20).deliver(events[1])  # PAYMENT.CAPTURE.COMPLETED first
    assert not w.entitlements()
    w.deliver(events[0])
    assert w.only().status is Status.ACTIVE


def test_an_approved_order_not_yet_captured_is_pending() -> None:
    w = world()
    w.at(10).deliver(FX.sold("O-3", "basic", 10)[0])
    assert w.only().status is Status.PENDING


def test_a_dispute_on_a_one_off_capture_suspends() -> None:
    w = world()
    for event in FX.sold("O-4", "basic", 10):
        w.at(20).deliver(event)
    w.at(DAY).deliver(pp.dispute_event("PP-D-3", "CAP-O-4", "open", ts(DAY)))
    assert (w.only().status, w.only().reason) == (Status.SUSPENDED, "disputed")


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (pp.order_event("CHECKOUT.ORDER.APPROVED", "O-5", "ITEM-NOBODY", ts(10)), "ITEM-NOBODY"),
        (pp.capture_completed("CAP-X", "O-6", ts(10)), None),
        (pp.sale("", "S-NOSUB", ts(10)), "names no billing_agreement_id"),
    ],
)
def test_a_sale_naming_nothing_mappable_is_unmappable(
    event: dict[str, object], message: str | None
) -> None:
    if message is None:  # a capture that names no order
        del event["resource"]["supplementary_data"]  # type: ignore[attr-defined]
        message = r"supplementary_data\.related_ids\.order_id"
    with pytest.raises(Unmappable, match=message):
        paypal.normalize("src", event, FX.catalog, T0)


# -- times ------------------------------------------------------------------------------


def test_a_local_time_with_its_offset_is_the_same_instant() -> None:
    """PayPal's v2 payments write local times ("-07:00"): the capture's
    time with its offset starts the period at the same instant as UTC."""
    w = world()
    assert pp.local(ts(10)).endswith("-07:00")
    for event in FX.sold("O-7", "basic", 10):
        w.at(20).deliver(event)
    assert w.only().period_start == T0 + timedelta(seconds=15)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (("resource", "update_time"), "update_time"),
        (("resource", "billing_info", "next_billing_time"), "next_billing_time"),
    ],
)
def test_a_subscription_time_without_offset_is_unmappable_naming_it(
    path: tuple[str, ...], name: str
) -> None:
    event = FX.subscribed("I-Z", "basic", 0, MONTH, 10)[0]
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = target[path[-1]].removesuffix("Z")
    with pytest.raises(Unmappable, match=f"{name}.*(offset|zone)"):
        paypal.normalize("src", event, FX.catalog, T0)


def test_a_local_offset_is_read_and_kept_as_utc() -> None:
    """PayPal's v2 payments write local offsets (-07:00); every time the
    engine keeps and shows is UTC."""
    from services.providers import parse_time

    moment = parse_time("2026-12-29T07:44:05-07:00", "create_time")
    assert moment is not None and moment.utcoffset() == timedelta(0)
    assert moment.isoformat() == "2026-12-29T14:44:05+00:00"


def test_a_sale_after_the_cancellation_of_a_subscription_never_seen_makes_it_canceled() -> None:
    """A sale names no plan; the CANCELLED that came first does: the sale
    makes the entitlement of that plan, which ends with the paid cycle."""
    w = world()
    w.at(2 * DAY).deliver(FX.cancel_at_period_end("I-C", "basic", 0, MONTH, 2 * DAY)[0])
    assert w.entitlements() == []
    for payload in FX.paid("I-C", "S-C", "basic", 0, MONTH, 20):
        if payload["event_type"].startswith("PAYMENT."):
            w.at(2 * DAY + 60).deliver(payload)
    item = w.only()
    assert item.cancel_at is not None and item.status is Status.ACTIVE
    w.at(MONTH + DAY).tick()
    assert item.status is Status.CANCELED


def test_a_full_refund_cancels_when_the_next_billing_time_is_hours_after_the_sales_period() -> None:
    """PayPal states `next_billing_time` at its own hour, a few hours past
    the sale's period; refunding that sale in full still ends the license."""
    catalog = Catalog(
        [Offering(sku="basic", product="acme", period="P30D", prices={"paypal": ("P-BASIC",)})]
    )
    world = World(catalog=catalog, provider="paypal")
    world.deliver(
        pp.subscription(
            "BILLING.SUBSCRIPTION.ACTIVATED", "I-H", "ACTIVE", ts(MONTH + 3 * 3600), ts(70)
        )
    )
    world.deliver(pp.sale("I-H", "S-H", ts(300)))
    assert world.only().status is Status.ACTIVE
    world.deliver(pp.refund("S-H", ts(DAY), total="-9.99"))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")
