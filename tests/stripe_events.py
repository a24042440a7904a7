"""Realistic Stripe webhook payloads (both invoice shapes), signed by the
official `stripe` package exactly as Stripe signs them."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any

import stripe

from services.providers import Credentials
from tests.conformance import NotSupported, catalog
from tests.lifecycle_world import ts

SECRET = "whsec_test_secret"
_ids = itertools.count(1)

BASIL = "2025-03-31.basil"
LEGACY = "2024-06-20"


def _next(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):x}{next(_ids):06d}"


def signed_headers(
    body: bytes, secret: str = SECRET, timestamp: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    try:
        header = stripe.WebhookSignature.generate_signature_header(
            secret=secret, payload=body.decode(), timestamp=ts
        )
    except UnicodeDecodeError:
        # The SDK signs text only; Stripe's rule on bytes: HMAC-SHA256 of "<t>.<body>".
        mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        header = f"t={ts},v1={mac}"
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def item_id(subscription: str, price: str) -> str:
    """A stable subscription item id per (subscription, first price), as
    Stripe keeps the item when only its price changes."""
    return "si_" + hashlib.sha1(f"{subscription}/{price}".encode()).hexdigest()[:14]


def invoice_paid(
    *,
    subscription: str,
    lines: list[dict[str, Any]],
    customer: str = "cus_test",
    email: str = "buyer@example.com",
    shape: str = BASIL,
    event_id: str | None = None,
    created: int | None = None,
    kind: str = "invoice.paid",
    invoice_id: str | None = None,
    payment_intent: str | None = None,
) -> dict[str, Any]:
    """`lines`: dicts with price (id), sku (price metadata, legacy shape only),
    quantity, start, end, and optionally item (the subscription item id)."""
    invoice: dict[str, Any] = {
        "id": invoice_id or _next("in"),
        "object": "invoice",
        "customer": customer,
        "customer_email": email,
        "status": "paid" if kind != "invoice.payment_failed" else "open",
        "billing_reason": "subscription_cycle",
        "currency": "usd",
        "livemode": False,
    }
    if shape != BASIL:
        invoice["payment_intent"] = payment_intent
    data = []
    for line in lines:
        item: dict[str, Any] = {
            "id": _next("il"),
            "object": "line_item",
            "amount": 9900,
            "currency": "usd",
            "quantity": line.get("quantity", 1),
            "period": {"start": line["start"], "end": line["end"]},
        }
        if shape == BASIL:
            item["pricing"] = {
                "type": "price_details",
                "price_details": {"price": line["price"], "product": "prod_acme"},
                "unit_amount_decimal": "9900",
            }
            item["parent"] = {
                "type": "subscription_item_details",
                "subscription_item_details": {
                    "subscription": subscription,
                    "subscription_item": line.get("item") or item_id(subscription, line["price"]),
                    "proration": line.get("proration", False),
                    "invoice_item": None,
                },
                "invoice_item_details": None,
            }
        else:
            item["type"] = "subscription"
            item["subscription"] = subscription
            item["subscription_item"] = line.get("item") or item_id(subscription, line["price"])
            item["proration"] = line.get("proration", False)
            item["price"] = {
                "id": line["price"],
                "object": "price",
                "product": "prod_acme",
                "metadata": {"offering_sku": line["sku"]} if line.get("sku") else {},
                "recurring": {"interval": "year", "interval_count": 1},
            }
        data.append(item)
    invoice["lines"] = {"object": "list", "data": data, "has_more": False}
    if invoice["status"] == "paid":
        invoice["amount_paid"] = sum(item["amount"] for item in data)
    if shape == BASIL:
        invoice["parent"] = {
            "type": "subscription_details",
            "subscription_details": {"subscription": subscription, "metadata": {}},
            "quote_details": None,
        }
    else:
        invoice["subscription"] = subscription
    event = _event(kind, invoice, shape, event_id, created)
    if shape == BASIL and payment_intent and kind != "invoice.payment_failed":
        # Since basil only `invoice_payment.paid` says which payment intent
        # paid the invoice; Stripe sends it with the invoice (`World.deliver`
        # sends what `_then` lists after the event).
        event["_then"] = [invoice_payment_paid(invoice["id"], payment_intent, event["created"])]
    return event


def invoice_payment_paid(
    invoice: str, payment_intent: str, created: int | None = None
) -> dict[str, Any]:
    obj = {
        "id": _next("inpay"),
        "object": "invoice_payment",
        "amount_paid": 9900,
        "amount_requested": 9900,
        "currency": "usd",
        "invoice": invoice,
        "is_default": True,
        "payment": {"type": "payment_intent", "payment_intent": payment_intent},
        "status": "paid",
    }
    return _event("invoice_payment.paid", obj, BASIL, None, created)


def refund_event(
    kind: str,
    *,
    payment_intent: str,
    amount: int = 9900,
    status: str = "succeeded",
    refund_id: str = "re_1",
    created: int | None = None,
) -> dict[str, Any]:
    """refund.created / refund.updated, as 2025-03-31.basil reports refunds."""
    obj = {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "charge": "ch_" + payment_intent,
        "payment_intent": payment_intent,
        "currency": "usd",
        "status": status,
    }
    return _event(kind, obj, BASIL, None, created)


def subscription_event(
    kind: str,
    *,
    subscription: str,
    items: list[dict[str, Any]],
    status: str = "active",
    start: int | None = None,
    end: int | None = None,
    trial_end: int | None = None,
    cancel_at_period_end: bool = False,
    customer: str = "cus_test",
    shape: str = BASIL,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """customer.subscription.*; `items`: dicts with price, sku (metadata),
    quantity, and optionally item (defaults to the item first made for the price)."""
    data = []
    for item in items:
        entry: dict[str, Any] = {
            "id": item.get("item") or item_id(subscription, item["price"]),
            "object": "subscription_item",
            "quantity": item.get("quantity", 1),
            "price": {
                "id": item["price"],
                "object": "price",
                "product": "prod_acme",
                "metadata": {"offering_sku": item["sku"]} if item.get("sku") else {},
                "recurring": {"interval": "month", "interval_count": 1},
            },
        }
        if shape == BASIL:
            entry["current_period_start"] = start
            entry["current_period_end"] = end
        data.append(entry)
    obj: dict[str, Any] = {
        "id": subscription,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": end if cancel_at_period_end else None,
        "trial_end": trial_end,
        "items": {"object": "list", "data": data, "has_more": False},
    }
    if shape != BASIL:
        obj["current_period_start"] = start
        obj["current_period_end"] = end
    return _event(kind, obj, shape, event_id, created)


def subscription_deleted(
    *,
    subscription: str,
    customer: str = "cus_test",
    items: list[dict[str, Any]] | None = None,
    shape: str = BASIL,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    event = subscription_event(
        "customer.subscription.deleted",
        subscription=subscription,
        items=items or [],
        status="canceled",
        customer=customer,
        shape=shape,
        event_id=event_id,
        created=created,
    )
    event["data"]["object"]["canceled_at"] = event["created"]
    return event


def charge_refunded(
    *,
    payment_intent: str,
    invoice: str | None = None,
    amount: int = 9900,
    refunded: int = 9900,
    event_id: str | None = None,
    created: int | None = None,
    shape: str = LEGACY,
) -> dict[str, Any]:
    charge: dict[str, Any] = {
        "id": _next("ch"),
        "object": "charge",
        "amount": amount,
        "amount_refunded": refunded,
        "refunded": refunded >= amount,
        "payment_intent": payment_intent,
        "invoice": invoice,
        "currency": "usd",
    }
    if shape == BASIL:
        del charge["invoice"]  # basil charges name no invoice
    return _event("charge.refunded", charge, shape, event_id, created)


def dispute(
    kind: str,
    *,
    dispute_id: str,
    payment_intent: str,
    status: str = "needs_response",
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    obj = {
        "id": dispute_id,
        "object": "dispute",
        "amount": 9900,
        "charge": "ch_" + payment_intent,
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": status,
    }
    return _event(kind, obj, LEGACY, event_id, created)


def _event(
    kind: str, obj: dict[str, Any], shape: str, event_id: str | None, created: int | None
) -> dict[str, Any]:
    return {
        "id": event_id or _next("evt"),
        "object": "event",
        "api_version": shape,
        "created": int(time.time()) if created is None else created,
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": obj},
    }


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def one_off(event: dict[str, Any]) -> dict[str, Any]:
    """An invoice event made a one-off purchase: no subscription anywhere."""
    invoice = event["data"]["object"]
    invoice.pop("subscription", None)
    invoice.pop("parent", None)
    for line in invoice["lines"]["data"]:
        for key in ("parent", "subscription", "subscription_item"):
            line.pop(key, None)
    return event


def prorated(line: dict[str, Any]) -> dict[str, Any]:
    """An invoice line (either shape) made a proration: the difference a
    mid-period change costs, which pays for no period."""
    if "parent" in line:
        details = {**line["parent"]["subscription_item_details"], "proration": True}
        return {**line, "parent": {**line["parent"], "subscription_item_details": details}}
    return {**line, "proration": True}


# -- the conformance suite's fixture set (tests/conformance.py) ---------------------


class StripeFixtures:
    """Stripe's shapes for the conformance suite: the `2025-03-31.basil`
    objects of https://docs.stripe.com/api/invoices/object,
    /api/subscriptions/object, /api/charges/object and /api/disputes/object
    (as in stripe-python's test fixtures), signed by the `stripe` package."""

    provider = "stripe"

    def __init__(self) -> None:
        self.price = {"basic": "price_basic", "pro": "price_pro"}
        self.catalog = catalog("stripe", {sku: (p,) for sku, p in self.price.items()})

    def _t(self, offset: int) -> int:
        return ts(offset)

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return {k.lower(): v for k, v in signed_headers(body, secret, int(at)).items()}

    def signature_age_limit(self) -> float:
        return 300  # stripe.Webhook.DEFAULT_TOLERANCE

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        # While a secret rolls, Stripe signs with both: one v1 per secret.
        headers = self.sign(body, old, at)
        newer = self.sign(body, new, at)["stripe-signature"].split(",v1=")[1]
        return {**headers, "stripe-signature": f"{headers['stripe-signature']},v1={newer}"}

    def _items(self, sku: str) -> list[dict[str, Any]]:
        return [{"price": self.price[sku]}]

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            subscription_event(
                "customer.subscription.created",
                subscription=sub,
                items=self._items(sku),
                start=self._t(start),
                end=self._t(end),
                created=self._t(at),
            )
        ]

    def _invoice(
        self, kind: str, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        event = invoice_paid(
            subscription=sub,
            lines=[{"price": self.price[sku], "start": self._t(start), "end": self._t(end)}],
            invoice_id=invoice,
            created=self._t(at),
            kind=kind,
            payment_intent=f"pi_{invoice}",
        )
        return [event, *event.pop("_then", [])]

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        return self._invoice("invoice.paid", sub, invoice, sku, start, end, at)

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        return self._invoice("invoice.payment_failed", sub, invoice, sku, start, end, at)

    def _snapshot(
        self, kind: str, sub: str, sku: str, start: int, end: int, at: int, **fields: Any
    ) -> list[Any]:
        return [
            subscription_event(
                kind,
                subscription=sub,
                items=self._items(sku),
                start=self._t(start),
                end=self._t(end),
                created=self._t(at),
                **fields,
            )
        ]

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot(
            "customer.subscription.updated", sub, sku, start, end, at, cancel_at_period_end=True
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        event = subscription_deleted(subscription=sub, items=self._items(sku), created=self._t(at))
        return [event]

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # https://docs.stripe.com/billing/subscriptions/pause (a trial that
        # ended without a payment method): status `paused`.
        return self._snapshot(
            "customer.subscription.paused", sub, sku, start, end, at, status="paused"
        )

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot("customer.subscription.resumed", sub, sku, start, end, at)

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        return [
            charge_refunded(
                payment_intent=f"pi_{invoice}",
                amount=amount,
                refunded=refunded,
                created=self._t(at),
                shape=BASIL,
            )
        ]

    def disputed(self, sub: str, invoice: str, dispute_id: str, state: str, at: int) -> list[Any]:
        kind = "charge.dispute.created" if state == "open" else "charge.dispute.closed"
        status = {"open": "needs_response", "won": "won", "lost": "lost"}[state]
        return [
            dispute(
                kind,
                dispute_id=dispute_id,
                payment_intent=f"pi_{invoice}",
                status=status,
                created=self._t(at),
            )
        ]

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        # An invoice without a subscription: https://docs.stripe.com/invoicing/one-off
        event = invoice_paid(
            subscription="",
            lines=[{"price": self.price[sku], "start": self._t(at), "end": self._t(at)}],
            invoice_id=order,
            created=self._t(at),
            payment_intent=f"pi_{order}",
        )
        return [one_off(event), *event.pop("_then", [])]

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotSupported("Stripe's times are unix seconds: none lacks a zone")

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        obj = payload["data"]["object"]
        for item in obj.get("lines", obj.get("items", {})).get("data", []):
            item["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        for line in payload["data"]["object"]["lines"]["data"]:
            line["pricing"]["price_details"]["price"] = price
        return payload


FIXTURES = StripeFixtures()
