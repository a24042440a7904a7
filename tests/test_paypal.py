"""PayPal: offline verification against a locally generated CA (injected
trust root and fetcher), and subscription/sale events on the lifecycle."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from domain.catalog import Catalog, Offering, add_period
from domain.entitlement import Status
from services.providers import Credentials, SignatureError, paypal
from services.providers.paypal import Certificates, verify
from tests import paypal_events as pp
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

KEY = Credentials("", webhook_id=pp.WEBHOOK_ID)
CATALOG = Catalog([Offering(sku="basic", product="acme", prices={"paypal": ("P-BASIC",)})])


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
        monkeypatch.setattr(
            paypal,
            "CERTIFICATES",
            Certificates(
                fetch=lambda url, ca=ca: ca.leaf_pem(),
                roots=lambda ca=ca: [ca.root] if ca is expired else [trusted.root],
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
    assert entitlement.status is Status.PENDING
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
