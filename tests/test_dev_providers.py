"""Every billing source end to end through `entitle dev` (Kafka, store,
projector, API): the same lifecycle, create → renew → payment failure →
cancel, reaches the same entitlement states as on the Stripe path; bad and
expired signatures are refused with 401 and nothing is written."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import chargebee_events as cb
from tests import fastspring_events as fs
from tests import lemonsqueezy_events as ls
from tests import paddle_events as pe
from tests import paypal_events as pp
from tests import standard_events as sw
from tests import stripe_events as se
from tests import zenofy_events as ze
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, AUTH, entitlements

pytestmark = pytest.mark.e2e

DAY = 86400
CONFIG = f"""
sources:
  stripe: {{provider: stripe, secret: {se.SECRET}}}
  paddle: {{provider: paddle, secret: {pe.SECRET}}}
  lemonsqueezy: {{provider: lemonsqueezy, secret: {ls.SECRET}}}
  chargebee: {{provider: chargebee, username: {cb.USERNAME}, secret: {cb.PASSWORD}}}
  zenofy: {{provider: zenofy, secret: {ze.SECRET}}}
  standard: {{provider: standard, secret: "{sw.SECRET}"}}
  paypal: {{provider: paypal, webhook_id: {pp.WEBHOOK_ID}}}
  fastspring: {{provider: fastspring, secret: {fs.SECRET}}}
offerings:
  - sku: basic
    product: acme
    stripe_price_ids: [price_basic]
    prices: {{paddle: [pri_basic], lemonsqueezy: [101], chargebee: [basic-USD-Monthly],
             paypal: [P-BASIC], fastspring: [acme-basic-monthly]}}
"""

Sign = Callable[[bytes], dict[str, str]]
SIGN: dict[str, Sign] = {
    "stripe": se.signed_headers,
    "paddle": pe.signed_headers,
    "lemonsqueezy": ls.signed_headers,
    "chargebee": lambda body: cb.headers(),
    "zenofy": ze.signed_headers,
    "standard": sw.signed_headers,
    "paypal": lambda body: AUTHORITY.headers(body),
}
# PayPal's certificate comes from a local CA: the dev process trusts its root
# (ENTITLE_PAYPAL_TRUST_ROOTS) and finds the certificate in its cache.
AUTHORITY = pp.Authority.make()


def lifecycle(provider: str, now: int) -> tuple[str, list[list[dict[str, Any]]]]:
    """(order ref, the events of each step): create and pay, renew, a payment
    failure, cancel. Periods: [now-10d, now+20d], then [now+20d, now+50d]."""
    p0, p1, p2 = now - 10 * DAY, now + 20 * DAY, now + 50 * DAY
    sub = f"sub_{provider}_{now}"
    if provider == "stripe":

        def inv(k: int, start: int, end: int, kind: str = "invoice.paid") -> dict[str, Any]:
            return se.invoice_paid(
                subscription=sub,
                kind=kind,
                invoice_id=f"in_{sub}_{k}",
                lines=[{"price": "price_basic", "start": start, "end": end}],
                created=now + k,
            )

        return sub, [
            [inv(0, p0, p1)],
            [inv(1, p1, p2)],
            [inv(2, p2, p2 + 30 * DAY, kind="invoice.payment_failed")],
            [se.subscription_deleted(subscription=sub, created=now + 10)],
        ]
    if provider == "paddle":
        return sub, [
            [
                pe.subscription("subscription.created", sub, "active", p0, p1, now),
                pe.transaction(sub, f"txn_{sub}_0", p0, p1, now),
            ],
            [pe.transaction(sub, f"txn_{sub}_1", p1, p2, now + 1)],
            [pe.transaction(sub, f"txn_{sub}_2", p2, p2 + 30 * DAY, now + 2, failed=True)],
            [pe.subscription("subscription.canceled", sub, "canceled", p1, p2, now + 10)],
        ]
    if provider == "lemonsqueezy":
        order, subscription_id = str(now % 10**8), str(now % 10**8 + 1)
        return f"order/{order}", [
            [
                ls.order(order, p0),
                ls.subscription("subscription_created", subscription_id, order, "active", p1, now),
            ],
            [
                ls.invoice("subscription_payment_success", f"{order}1", subscription_id, now + 1),
                ls.subscription(
                    "subscription_updated", subscription_id, order, "active", p2, now + 2
                ),
            ],
            [ls.invoice("subscription_payment_failed", f"{order}2", subscription_id, now + 3)],
            [
                ls.subscription(
                    "subscription_expired",
                    subscription_id,
                    order,
                    "expired",
                    None,
                    now + 10,
                    cancelled=True,
                )
            ],
        ]
    if provider == "chargebee":
        return sub, [
            [cb.invoice_event("subscription_created", sub, f"inv_{sub}_0", p0, p1, now)],
            [cb.invoice_event("subscription_renewed", sub, f"inv_{sub}_1", p1, p2, now + 1)],
            [
                cb.invoice_event(
                    "payment_failed",
                    sub,
                    f"inv_{sub}_2",
                    p2,
                    p2 + 30 * DAY,
                    now + 2,
                    status="payment_due",
                )
            ],
            [
                cb.subscription(
                    "subscription_cancelled", sub, "cancelled", p1, p2, (now + 10) * 1000
                )
            ],
        ]
    if provider == "zenofy":
        email = f"z{now}@example.com"
        return f"{email}/basic", [
            [ze.event("subscription.activated", sub, "ACTIVE", p0, p1, now, email=email)],
            [
                ze.event(
                    "subscription.renewed",
                    f"{sub}_2",
                    "ACTIVE",
                    p1,
                    p2,
                    now + 1,
                    email=email,
                    renews=sub,
                )
            ],
            # Zenofy states a failed renewal as SUSPENDED, one to one.
            [
                ze.event(
                    "subscription.suspended", f"{sub}_2", "SUSPENDED", p1, p2, now + 2, email=email
                )
            ],
            [
                ze.event(
                    "subscription.canceled", f"{sub}_2", "CANCELED", p1, p2, now + 10, email=email
                )
            ],
        ]
    if provider == "paypal":
        return sub, [
            [pp.subscription("BILLING.SUBSCRIPTION.ACTIVATED", sub, "ACTIVE", p1, now)],
            [
                pp.sale(sub, f"S{now}1", now + 1),
                pp.subscription("BILLING.SUBSCRIPTION.UPDATED", sub, "ACTIVE", p2, now + 1),
            ],
            [pp.subscription("BILLING.SUBSCRIPTION.PAYMENT.FAILED", sub, "ACTIVE", p2, now + 2)],
            [pp.subscription("BILLING.SUBSCRIPTION.CANCELLED", sub, "CANCELLED", None, now + 10)],
        ]
    assert provider == "standard"
    return sub, [
        [sw.payment(sub, f"pay_{sub}_0", p0, p1, now)],
        [sw.payment(sub, f"pay_{sub}_1", p1, p2, now + 1)],
        [sw.payment(sub, f"pay_{sub}_2", p2, p2 + 30 * DAY, now + 2, failed=True)],
        [sw.subscription(sub, "canceled", p1, p2, now + 10)],
    ]


@contextlib.contextmanager
def every_source(
    workdir: Path, config: str = CONFIG, env: dict[str, str] | None = None
) -> Iterator[Entitle]:
    """`entitle dev` in `workdir` with a source of every provider (`config`),
    PayPal's certificates trusted."""
    (workdir / "entitle.yaml").write_text(config)
    (workdir / "paypal-root.pem").write_bytes(AUTHORITY.root_pem())
    AUTHORITY.seed(workdir / "paypal-certs")
    env = {
        "ENTITLE_ADMIN_KEYS": ADMIN,
        "ENTITLE_PAYPAL_TRUST_ROOTS": str(workdir / "paypal-root.pem"),
        "ENTITLE_PAYPAL_CERT_CACHE": str(workdir / "paypal-certs"),
        **(env or {}),
    }
    with Entitle(["dev"], workdir, env) as entitle:
        yield entitle


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Entitle]:
    with every_source(tmp_path_factory.mktemp("providers")) as entitle:
        yield entitle


def post(
    entitle: Entitle, source: str, event: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    body = (se if source == "stripe" else sw).body(event)
    return httpx.post(
        f"{entitle.url}/webhooks/{source}",
        content=body,
        headers=headers if headers is not None else SIGN[source](body),
    )


@pytest.mark.parametrize(
    "provider",
    ["stripe", "paddle", "lemonsqueezy", "chargebee", "paypal", "zenofy", "standard"],
)
def test_the_lifecycle_reaches_the_same_states_as_stripe(stack: Entitle, provider: str) -> None:
    now = int(time.time())
    order_ref, steps = lifecycle(provider, now)
    failure = ("SUSPENDED", False) if provider == "zenofy" else ("ACTIVE", True)
    expected = [
        ("ACTIVE", False, 20),
        ("ACTIVE", False, 50),
        (*failure, 50),
        ("CANCELED", False, 50),
    ]
    for events, (status, overdue, days) in zip(steps, expected, strict=True):
        for event in events:
            response = post(stack, provider, event)
            assert response.status_code == 202, response.text

        end = time.strftime("%Y-%m-%d", time.gmtime(now + days * DAY))

        def reached(s: str = status, o: bool = overdue, e: str = end) -> dict[str, Any] | None:
            items = entitlements(stack, order_ref=order_ref)
            if (
                len(items) == 1
                and (items[0]["status"], items[0]["overdue"]) == (s, o)
                and (items[0]["period_end"] or "").startswith(e)
            ):
                return items[0]
            return None

        item = eventually(reached, timeout=10)
        assert item["offering"] == "basic"


@pytest.mark.parametrize(
    ("provider", "stale"),
    [
        ("stripe", True),
        ("paddle", True),
        ("standard", True),
        ("lemonsqueezy", False),
        ("chargebee", False),
        ("paypal", False),
        ("zenofy", False),
    ],
)
def test_bad_and_expired_signatures_get_401_and_nothing_is_written(
    stack: Entitle, provider: str, stale: bool
) -> None:
    now = int(time.time())
    order_ref, steps = lifecycle(provider, now + 7)
    event = steps[0][0]
    body = (se if provider == "stripe" else sw).body(event)
    wrong: dict[str, dict[str, str]] = {
        "stripe": se.signed_headers(body, secret="whsec_wrong"),
        "paddle": pe.signed_headers(body, secret="pdl_wrong"),
        "standard": sw.signed_headers(body, secret="whsec_" + "QUJD" * 8),
        "lemonsqueezy": ls.signed_headers(body, secret="wrong"),
        "chargebee": cb.headers(password="wrong"),
        "zenofy": ze.signed_headers(body, secret="wrong"),
        "paypal": pp.Authority.make().headers(body),  # a certificate from an untrusted CA
    }
    attempts = [wrong[provider], {"Content-Type": "application/json"}]
    if stale:  # a replay of a once-valid delivery, after the tolerance
        old = now - 3600
        attempts.append(
            {
                "stripe": se.signed_headers(body, timestamp=old),
                "paddle": pe.signed_headers(body, timestamp=old),
                "standard": sw.signed_headers(body, timestamp=old),
            }[provider]
        )
    for headers in attempts:
        response = post(stack, provider, event, headers)
        assert response.status_code == 401, (provider, response.text)
        assert response.json()["error"] == "invalid_signature"
    time.sleep(1.0)
    assert entitlements(stack, order_ref=order_ref) == []
    letters = httpx.get(f"{stack.url}/v1/dead-letters", headers=AUTH).json()["items"]
    assert not [d for d in letters if d["source"] == provider]


def test_a_fastspring_batch_is_applied_event_by_event(stack: Entitle) -> None:
    """One FastSpring request carrying three events, through the real
    ingress and fold: each event has its own receipt; the one whose product
    maps to nothing is the only dead letter and holds back neither other;
    the whole batch delivered again is duplicates, and no second letter."""
    now = int(time.time())
    sub = f"sub_fs_{now}"
    subscription = fs.subscription(
        sub,
        "acme-basic-monthly",
        "active",
        fs.ms(now + 20 * DAY),
        fs.ms(now),
        fs.ms(now - 10 * DAY),
    )
    activated = fs.event("subscription.activated", subscription, fs.ms(now))
    stray = fs.order_completed(f"ord_x_{now}", [fs.item("mystery-box")], fs.ms(now))
    paid = fs.order_completed(
        f"ord_{now}", [fs.item("acme-basic-monthly", 1, subscription)], fs.ms(now)
    )
    body = fs.body(fs.batch(activated, stray, paid))
    url = f"{stack.url}/webhooks/fastspring"

    def receipts(count: int) -> list[dict[str, Any]] | None:
        query = {"order_ref": sub}
        items = httpx.get(f"{stack.url}/v1/webhooks", params=query, headers=AUTH).json()["items"]
        return list(items) if len(items) == count else None

    def letters() -> list[dict[str, Any]]:
        items = httpx.get(f"{stack.url}/v1/dead-letters", headers=AUTH).json()["items"]
        return [d for d in items if d["source"] == "fastspring"]

    response = httpx.post(url, content=body, headers=fs.signed_headers(body))
    assert response.status_code == 202, response.text
    assert response.text.split("\n") == [activated["id"], stray["id"], paid["id"]]
    end = time.strftime("%Y-%m-%d", time.gmtime(now + 20 * DAY))
    [item] = eventually(
        lambda: [
            e
            for e in entitlements(stack, order_ref=sub)
            if e["status"] == "ACTIVE" and e["period_end"].startswith(end)
        ]
    )
    assert item["offering"] == "basic"
    first = eventually(lambda: receipts(2))
    assert sorted(r["provider_event_id"] for r in first) == sorted([activated["id"], paid["id"]])
    assert "dead_letter" not in {r["outcome"] for r in first}
    [letter] = eventually(letters)
    assert letter["provider_event_id"] == stray["id"]
    assert "mystery-box" in letter["reason"]

    again = httpx.post(url, content=body, headers=fs.signed_headers(body))
    assert again.status_code == 202, again.text
    later = eventually(lambda: receipts(4))
    fresh = [r for r in later if r["id"] not in {f["id"] for f in first}]
    assert [r["outcome"] for r in fresh] == ["duplicate", "duplicate"]
    time.sleep(0.5)
    assert [d["provider_event_id"] for d in letters()] == [stray["id"]]
