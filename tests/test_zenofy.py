"""Zenofy-style checkout webhooks: optional shared secret, one-to-one statuses,
renewals under a new subscription id with the same email."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from domain.catalog import Catalog, Offering
from domain.entitlement import Status
from services.providers import Credentials, SignatureError
from services.providers.zenofy import routing_key, verify
from tests import zenofy_events as ze
from tests.lifecycle_world import DAY, MONTH, T0, World, ts

NOW = int(time.time())
CATALOG = Catalog(
    [
        Offering(sku="basic", product="acme"),
        Offering(sku="pro", product="acme", prices={"zenofy": ("plan_pro",)}),
    ]
)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_with_a_secret_the_signature_is_required_and_checked() -> None:
    body = ze.body(ze.event("subscription.created", "z1", "PENDING", NOW, NOW, NOW))
    key = Credentials(ze.SECRET)
    verify(lower(ze.signed_headers(body)), body, key, NOW)
    for headers in (
        {},
        lower(ze.signed_headers(body, secret="other")),
        {"x-zenofy-signature": "md5=abc"},
    ):
        with pytest.raises(SignatureError):
            verify(headers, body, key, NOW)


def test_without_a_secret_unsigned_webhooks_are_accepted() -> None:
    verify({}, b"{}", Credentials(""), NOW)


def test_a_renewal_with_the_same_email_extends_the_same_entitlement() -> None:
    world = World(catalog=CATALOG, provider="zenofy")
    world.deliver(ze.event("subscription.created", "z1", "PENDING", ts(0), ts(MONTH), ts(10)))
    entitlement = world.only()
    assert entitlement.status is Status.PENDING
    assert entitlement.customer_email == "ada@example.com"
    world.deliver(ze.event("subscription.activated", "z1", "ACTIVE", ts(0), ts(MONTH), ts(60)))
    assert entitlement.status is Status.ACTIVE
    # The checkout opens a new subscription id for the renewal; the email (any case) is the same.
    renewal = ze.event(
        "subscription.renewed",
        "z2",
        "ACTIVE",
        ts(MONTH),
        ts(2 * MONTH),
        ts(MONTH + 60),
        email="ada@example.com",
        renews="z1",
    )
    assert routing_key(renewal) == "ada@example.com/basic"
    world.at(MONTH).deliver(renewal)
    assert world.only() is entitlement
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    world.deliver(
        ze.event(
            "subscription.suspended", "z2", "SUSPENDED", ts(MONTH), ts(2 * MONTH), ts(MONTH + DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "suspended")
    world.deliver(
        ze.event(
            "subscription.expired", "z2", "EXPIRED", ts(MONTH), ts(2 * MONTH), ts(2 * MONTH + DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.EXPIRED, "expired")
    world.deliver(
        ze.event(
            "subscription.canceled",
            "z2",
            "CANCELED",
            ts(MONTH),
            ts(2 * MONTH),
            ts(2 * MONTH + 2 * DAY),
        )
    )
    assert entitlement.status is Status.CANCELED


def test_plans_map_by_sku_or_by_the_catalogs_zenofy_plan_ids() -> None:
    world = World(catalog=CATALOG, provider="zenofy")
    world.deliver(
        ze.event(
            "subscription.activated", "z9", "ACTIVE", ts(0), ts(MONTH), ts(10), plan="plan_pro"
        )
    )
    assert world.only().sku == "pro"
