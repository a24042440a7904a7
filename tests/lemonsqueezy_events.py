"""Lemon Squeezy webhook payloads (JSON:API) in the documented shapes.

Where each shape comes from (only ids, amounts and times are changed):

- orders, subscriptions and subscription invoices as webhooks: the test
  fixtures of the Pay gem, pay-rails/pay test/fixtures/files/lemon_squeezy/
  (`order_created.json`, `subscription_created.json`,
  `subscription_updated.json`, `subscription_payment_success.json`,
  `subscription_payment_refunded.json`), which match the example on
  https://docs.lemonsqueezy.com/guides/developer-guide/webhooks;
- the attributes and their values (subscription `status`, `pause.mode`
  `void`/`free` with `resumes_at`, invoice `status`, `billing_reason`,
  `refunded_amount`): the official SDK's types, lmsqueezy/lemonsqueezy.js
  src/subscriptions/types.ts, src/subscriptionInvoices/types.ts and
  src/orders/types.ts;
- the event names: https://docs.lemonsqueezy.com/help/webhooks/event-types
  (and lmsqueezy/lemonsqueezy.js src/webhooks/types.ts).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from services.providers import Credentials
from tests.conformance import NotSupported, catalog
from tests.lifecycle_world import DAY, ts

SECRET = "ls-signing-secret"


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _payload(name: str, kind: str, object_id: str, attributes: dict[str, Any]) -> dict[str, Any]:
    links = {
        rel: {
            "links": {
                "related": f"https://api.lemonsqueezy.com/v1/{kind}/{object_id}/{rel}",
                "self": f"https://api.lemonsqueezy.com/v1/{kind}/{object_id}/relationships/{rel}",
            }
        }
        for rel in RELATIONSHIPS[kind]
    }
    return {
        "meta": {"event_name": name, "test_mode": True, "webhook_id": "wh_ls_1"},
        "data": {
            "type": kind,
            "id": object_id,
            "attributes": {**attributes, "test_mode": True},
            "relationships": links,
            "links": {"self": f"https://api.lemonsqueezy.com/v1/{kind}/{object_id}"},
        },
    }


RELATIONSHIPS = {
    "orders": ("store", "customer", "order-items", "subscriptions", "license-keys"),
    "subscriptions": ("store", "customer", "order", "order-item", "product", "variant"),
    "subscription-invoices": ("store", "subscription", "customer"),
}


def _id(value: str) -> int | str:
    """Lemon Squeezy's ids are integers; the suite's readable ids stay text."""
    return int(value) if value.isdigit() else value


def _money(prefix: str, cents: int) -> dict[str, Any]:
    return {
        prefix: cents,
        f"{prefix}_usd": cents,
        f"{prefix}_formatted": f"${cents // 100}.{cents % 100:02d}",
    }


def order(
    order_id: str,
    created: int,
    variant: int | str = 101,
    refunded: bool = False,
    name: str = "order_created",
    total: int = 999,
    refunded_amount: int | None = None,
    updated: int | None = None,
    quantity: int = 1,
) -> dict[str, Any]:
    """An order (pay-rails/pay test/fixtures/files/lemon_squeezy/order_created.json)."""
    back = (total if refunded else 0) if refunded_amount is None else refunded_amount
    return _payload(
        name,
        "orders",
        order_id,
        {
            "store_id": 1,
            "customer_id": 7,
            "identifier": f"89b36d62-4f5c-4353-853f-{order_id:0>12}",
            "order_number": 1,
            "user_name": "Dan R",
            "user_email": "ls@example.com",
            "currency": "USD",
            "currency_rate": "1.00000000",
            **_money("subtotal", total),
            **_money("discount_total", 0),
            **_money("tax", 0),
            **_money("total", total),
            **_money("refunded_amount", back),
            "tax_name": None,
            "tax_rate": "0.00",
            "status": ("refunded" if back >= total else "paid") if refunded else "paid",
            "status_formatted": "Refunded" if refunded else "Paid",
            "refunded": refunded,
            "refunded_at": iso(updated or created) if refunded else None,
            "first_order_item": {
                "id": 55,
                "order_id": _id(order_id),
                "product_id": 9,
                "variant_id": variant,
                "price_id": 1,
                "product_name": "Product One",
                "variant_name": "Default",
                "quantity": quantity,
                "price": total,
                "created_at": iso(created),
                "updated_at": iso(created),
                "test_mode": True,
            },
            "urls": {"receipt": f"https://app.lemonsqueezy.com/my-orders/{order_id}"},
            "created_at": iso(created),
            "updated_at": iso(updated or created),
        },
    )


def subscription(
    name: str,
    sub_id: str,
    order_id: str,
    status: str,
    renews: int | None,
    updated: int,
    ends: int | None = None,
    variant: int | str = 101,
    cancelled: bool = False,
    pause: dict[str, Any] | None = None,
    trial_ends: int | None = None,
    created: int | None = None,
    quantity: int = 1,
) -> dict[str, Any]:
    """A subscription (pay-rails/pay test/fixtures/files/lemon_squeezy/
    subscription_created.json)."""
    return _payload(
        name,
        "subscriptions",
        sub_id,
        {
            "store_id": 1,
            "customer_id": 7,
            "order_id": _id(order_id),
            "order_item_id": 55,
            "product_id": 9,
            "variant_id": variant,
            "product_name": "Subscription One",
            "variant_name": "Default",
            "user_name": "Dan R",
            "user_email": "ls@example.com",
            "status": status,
            "status_formatted": status.replace("_", " ").capitalize(),
            "card_brand": "visa",
            "card_last_four": "4242",
            "pause": pause,
            "cancelled": cancelled,
            "trial_ends_at": iso(trial_ends) if trial_ends else None,
            "billing_anchor": 1,
            "first_subscription_item": {
                "id": 77,
                "subscription_id": _id(sub_id),
                "price_id": 1,
                "quantity": quantity,
                "is_usage_based": False,
                "created_at": iso(created if created is not None else updated),
                "updated_at": iso(updated),
            },
            "urls": {
                "update_payment_method": f"https://my-store.lemonsqueezy.com/subscription/{sub_id}/payment-details",
                "customer_portal": "https://my-store.lemonsqueezy.com/billing",
            },
            "renews_at": iso(renews) if renews else None,
            "ends_at": iso(ends) if ends else None,
            "created_at": iso(created if created is not None else updated),
            "updated_at": iso(updated),
        },
    )


def invoice(
    name: str,
    invoice_id: str,
    sub_id: str,
    updated: int,
    total: int = 999,
    refunded_amount: int = 0,
    billing_reason: str = "renewal",
    created: int | None = None,
) -> dict[str, Any]:
    """A subscription invoice (pay-rails/pay test/fixtures/files/lemon_squeezy/
    subscription_payment_success.json and subscription_payment_refunded.json)."""
    # `refunded` and `refunded_at` say fully refunded; a part is
    # `partial_refund` (https://docs.lemonsqueezy.com/api/subscription-invoices/the-subscription-invoice-object).
    refunded = name == "subscription_payment_refunded" and refunded_amount >= total
    if name == "subscription_payment_refunded":
        status = "refunded" if refunded else "partial_refund"
    else:
        status = "pending" if name == "subscription_payment_failed" else "paid"
    return _payload(
        name,
        "subscription-invoices",
        invoice_id,
        {
            "store_id": 1,
            "subscription_id": _id(sub_id),
            "customer_id": 7,
            "user_name": "Dan R",
            "user_email": "ls@example.com",
            "billing_reason": billing_reason,
            "card_brand": "visa",
            "card_last_four": "4242",
            "currency": "USD",
            "currency_rate": "1.00000000",
            "status": status,
            "status_formatted": status.replace("_", " ").capitalize(),
            "refunded": refunded,
            "refunded_at": iso(updated) if refunded else None,
            **_money("subtotal", total),
            **_money("discount_total", 0),
            **_money("tax", 0),
            "tax_inclusive": False,
            **_money("total", total),
            **_money("refunded_amount", refunded_amount),
            "urls": {
                "invoice_url": f"https://app.lemonsqueezy.com/my-orders/x/subscription-invoice/{invoice_id}"
            },
            "created_at": iso(created if created is not None else updated),
            "updated_at": iso(updated),
        },
    )


def signed_headers(body: bytes, secret: str = SECRET, name: str = "") -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Signature": mac, "X-Event-Name": name, "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# -- the conformance suite's fixture set (tests/conformance.py) ---------------------


class LemonSqueezyFixtures:
    """Lemon Squeezy's shapes for the conformance suite (the builders above).

    What Lemon Squeezy sends for each happening
    (https://docs.lemonsqueezy.com/help/webhooks/event-types): a purchase is
    `order_created` with `subscription_created`; a payment is
    `subscription_payment_success` with the `subscription_updated` its new
    `renews_at` brings (the invoice names no period); a failure is
    `subscription_payment_failed` with the subscription `past_due`. It
    documents no order among them, and the suite delivers every order.
    """

    provider = "lemonsqueezy"

    def __init__(self) -> None:
        self.price = {"basic": "101", "pro": "102"}
        self.catalog = catalog("lemonsqueezy", {sku: (p,) for sku, p in self.price.items()})

    def _t(self, offset: int) -> int:
        return ts(offset)

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return {k.lower(): v for k, v in signed_headers(body, secret).items()}

    def signature_age_limit(self) -> float:
        raise NotSupported(
            "Lemon Squeezy's X-Signature is an HMAC of the body alone: it carries no time, "
            "so no signature expires (https://docs.lemonsqueezy.com/help/webhooks/signing-requests)"
        )

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        raise NotSupported(
            "Lemon Squeezy signs each delivery with the webhook's one signing secret: "
            "a changed secret applies at once, with no period signed by both"
        )

    def _order(self, sub: str) -> str:
        return f"ord_{sub}"

    def _subscription(
        self, name: str, sub: str, sku: str, status: str, renews: int | None, at: int, **fields: Any
    ) -> dict[str, Any]:
        return subscription(
            name,
            sub,
            self._order(sub),
            status,
            None if renews is None else self._t(renews),
            self._t(at),
            variant=int(self.price[sku]),
            created=self._t(0),
            **fields,
        )

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            order(
                self._order(sub), self._t(start), variant=int(self.price[sku]), updated=self._t(at)
            ),
            self._subscription("subscription_created", sub, sku, "active", end, at),
        ]

    def _invoice(
        self, name: str, sub: str, invoice_id: str, start: int, at: int, amount: int = 9900
    ) -> dict[str, Any]:
        return invoice(
            name,
            invoice_id,
            sub,
            self._t(at),
            total=amount,
            billing_reason="initial" if start == 0 else "renewal",
            created=self._t(start),
        )

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        return [
            self._subscription("subscription_updated", sub, sku, "active", end, at),
            self._invoice("subscription_payment_success", sub, invoice, start, at, amount),
        ]

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        # past_due: `renews_at` is the next attempt to charge (the SDK's
        # subscription types), not a paid-through date.
        return [
            self._subscription("subscription_updated", sub, sku, "past_due", at + 3 * DAY, at),
            self._invoice("subscription_payment_failed", sub, invoice, start, at),
        ]

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            self._subscription(
                "subscription_cancelled",
                sub,
                sku,
                "cancelled",
                None,
                at,
                ends=self._t(end),
                cancelled=True,
            )
        ]

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            self._subscription(
                "subscription_expired",
                sub,
                sku,
                "expired",
                None,
                at,
                ends=self._t(end),
                cancelled=True,
            )
        ]

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # `void`: the service is halted with the collection (`free` keeps it).
        return [
            self._subscription(
                "subscription_paused",
                sub,
                sku,
                "paused",
                end,
                at,
                pause={"mode": "void", "resumes_at": None},
            )
        ]

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [self._subscription("subscription_unpaused", sub, sku, "active", end, at)]

    def refunded(self, sub: str, invoice_id: str, amount: int, refunded: int, at: int) -> list[Any]:
        return [
            invoice(
                "subscription_payment_refunded",
                invoice_id,
                sub,
                self._t(at),
                total=amount,
                refunded_amount=refunded,
                billing_reason="initial",
                created=self._t(0),
            )
        ]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        raise NotSupported(
            "Lemon Squeezy (the merchant of record) handles chargebacks itself and sends no "
            "webhook for them: https://docs.lemonsqueezy.com/help/webhooks/event-types"
        )

    def sold(self, order_id: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        return [order(order_id, self._t(at), variant=int(self.price[sku]), total=amount)]

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        attributes = payload["data"]["attributes"]
        attributes["updated_at"] = attributes["updated_at"].removesuffix("Z")
        return payload

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        # An invoice names no quantity: the subscription sent with it does.
        attributes = payload["data"]["attributes"]
        for key in ("first_subscription_item", "first_order_item"):
            if isinstance(attributes.get(key), dict):
                attributes[key]["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        payload["data"]["attributes"]["variant_id"] = price
        return payload


FIXTURES = LemonSqueezyFixtures()
