"""Zenofy checkout webhooks: the SaaS subscription events in the shape
services/providers/zenofy.py documents (Zenofy's page,
https://zenofy.io/doc/saas-subscription-webhooks, names the events and what
they carry, not the field names), and the order webhooks of *Integrations →
Webhook* in the shape of https://zenofy.io/doc/order-webhooks (its field
list and its `order_paid` sample: a 24-hex `orderId`, decimal amounts, the
buyer under `customer`, line items), changed only in ids, prices and times."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

from services.providers import Credentials
from tests.conformance import NotSupported, catalog
from tests.lifecycle_world import ts

SECRET = "zenofy-shared-secret"
_ids = itertools.count(1)


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def event(
    kind: str,
    sub: str,
    status: str,
    start: int,
    end: int,
    created: int,
    email: str = "Ada@Example.com",
    plan: str = "basic",
    renews: str | None = None,
    order_id: str | None = None,
    renewal_order: str | None = None,
) -> dict[str, Any]:
    subscription: dict[str, Any] = {
        "id": sub,
        "status": status,
        "plan": plan,
        "quantity": 1,
        "customer_email": email,
        "current_period_start": iso(start),
        "current_period_end": iso(end),
    }
    if order_id:
        subscription["order_id"] = order_id
    if renews:
        subscription["renewal"] = {"order_id": renewal_order or f"zord_{sub}", "renews": renews}
    return {
        "id": f"zev_{int(time.time() * 1000):x}{next(_ids):06d}",
        "event": kind,
        "created_at": iso(created),
        "subscription": subscription,
    }


def signed_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Zenofy-Signature": f"sha256={mac}", "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def order(
    kind: str,
    order_id: str,
    items: list[tuple[str, int]],
    created: int,
    paid: int | None,
    email: str = "Ada@Example.com",
    amount: float = 49.0,
) -> dict[str, Any]:
    """An order webhook (https://zenofy.io/doc/order-webhooks): `items` are
    (productId, quantity); `paid` None while the order is unpaid."""
    status = {"order_paid": "PAID", "order_refunded": "REFUNDED", "order_cancelled": "CANCELLED"}
    return {
        "event": kind,
        "orderId": order_id,
        "status": status[kind],
        "totalAmount": amount,
        "currency": "MZN",
        "paymentGateway": "EMIS_GPO",
        "paymentReference": f"PC{order_id[-6:].upper()}_1A",
        "createdAt": iso(created),
        "paidAt": None if paid is None else iso(paid),
        "affiliateId": None,
        "customer": {"name": "Ada Lovelace", "email": email, "phoneNumber": "+258840000000"},
        "items": [
            {
                "productId": product,
                "productName": f"Acme {product}",
                "quantity": quantity,
                "unitPrice": amount,
                "totalPrice": amount * quantity,
                "currency": "MZN",
                "isBumpProduct": False,
            }
            for product, quantity in items
        ],
    }


def secret_headers(secret: str = SECRET) -> dict[str, str]:
    """What Zenofy itself sends: the webhook secret as it is."""
    return {"X-Webhook-Secret": secret, "Content-Type": "application/json"}


class ZenofyFixtures:
    """Zenofy's shapes for the conformance suite. Renewals are paid by the
    buyer at the checkout, each under a new subscription id with the same
    email (https://zenofy.io/doc/saas-subscriptions); refunds and
    cancellations come as order webhooks naming the order that paid."""

    provider = "zenofy"

    def __init__(self) -> None:
        self.price = {"basic": "prod_basic", "pro": "prod_pro"}
        self.catalog = catalog("zenofy", {sku: (p,) for sku, p in self.price.items()})

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        # The HMAC form the adapter accepts beside X-Webhook-Secret (which
        # does not bind the body, so a changed body could not be told).
        return {k.lower(): v for k, v in signed_headers(body, secret).items()}

    def signature_age_limit(self) -> float:
        raise NotSupported("Zenofy's secret header and HMAC carry no time: none expires")

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        raise NotSupported("a Zenofy product has one webhook secret, sent alone: no rotation")

    def _event(
        self, kind: str, sub: str, status: str, sku: str, start: int, end: int, at: int, **kw: Any
    ) -> dict[str, Any]:
        # One buyer per subscription: a renewal (`<sub>_<order>`) keeps the email.
        buyer = sub.split("_inv")[0]
        return event(
            kind,
            sub,
            status,
            ts(start),
            ts(end),
            ts(at),
            email=f"{buyer}@example.com",
            plan=self.price[sku],
            **kw,
        )

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # Zenofy creates the subscription with its order, before payment.
        return [self._event("subscription.created", sub, "PENDING", sku, start, end, at)]

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        if start == 0:  # the first period: the subscription is activated
            return [
                self._event(
                    "subscription.activated", sub, "ACTIVE", sku, start, end, at, order_id=invoice
                )
            ]
        # A renewal: a new subscription id, the same email.
        renewal = self._event(
            "subscription.renewed",
            f"{sub}_{invoice}",  # e.g. sub_1_inv_2
            "ACTIVE",
            sku,
            start,
            end,
            at,
            renews=sub,
            renewal_order=invoice,
        )
        return [renewal]

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        raise NotSupported(
            "Zenofy charges no renewal itself (the buyer pays again at the checkout): no "
            "payment fails; an unpaid period is reported later as subscription.suspended"
        )

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        raise NotSupported(
            "Zenofy schedules no cancellation: a period nobody renews lapses (subscription.expired)"
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [self._event("subscription.canceled", sub, "CANCELED", sku, start, end, at)]

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        raise NotSupported(
            "Zenofy has no pause: SUSPENDED is its dunning state (unpaid past the period end)"
        )

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        raise NotSupported("Zenofy has no pause to resume from")

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        if refunded < amount:
            raise NotSupported(
                "Zenofy marks an order refunded as a whole: its order webhook names no "
                "refunded amount"
            )
        # The order as Zenofy sends it once refunded: paid earlier, no refund time.
        return [order("order_refunded", invoice, [], ts(0), ts(20), amount=amount / 100)]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        raise NotSupported(
            "Zenofy's order and SaaS webhooks report no chargebacks (only its API-gateway "
            "webhooks have payment.chargeback)"
        )

    def sold(self, order_id: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        return [
            order(
                "order_paid",
                order_id,
                [(self.price[sku], 1)],
                ts(at) - 60,
                ts(at),
                amount=amount / 100,
            )
        ]

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["created_at"] = payload["created_at"].replace("Z", "")
        return payload

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        if isinstance(payload.get("subscription"), dict):
            payload["subscription"]["quantity"] = quantity
        for line in (payload.get("order") or {}).get("items") or []:
            line["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        payload["subscription"]["plan"] = price
        return payload


FIXTURES = ZenofyFixtures()
