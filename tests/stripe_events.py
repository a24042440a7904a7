"""Realistic Stripe webhook payloads (both invoice shapes), signed by the
official `stripe` package exactly as Stripe signs them."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import stripe

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
    header = stripe.WebhookSignature.generate_signature_header(
        secret=secret, payload=body.decode(), timestamp=ts
    )
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def invoice_paid(
    *,
    subscription: str,
    lines: list[dict[str, Any]],
    customer: str = "cus_test",
    email: str = "buyer@example.com",
    shape: str = BASIL,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """`lines`: dicts with price (id), sku (price metadata, legacy shape only),
    quantity, start, end."""
    invoice: dict[str, Any] = {
        "id": _next("in"),
        "object": "invoice",
        "customer": customer,
        "customer_email": email,
        "status": "paid",
        "billing_reason": "subscription_create",
        "currency": "usd",
        "livemode": False,
    }
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
                    "subscription_item": _next("si"),
                    "proration": line.get("proration", False),
                    "invoice_item": None,
                },
                "invoice_item_details": None,
            }
        else:
            item["type"] = "subscription"
            item["subscription"] = subscription
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
    if shape == BASIL:
        invoice["parent"] = {
            "type": "subscription_details",
            "subscription_details": {"subscription": subscription, "metadata": {}},
            "quote_details": None,
        }
    else:
        invoice["subscription"] = subscription
    return _event("invoice.paid", invoice, shape, event_id, created)


def subscription_deleted(
    *,
    subscription: str,
    customer: str = "cus_test",
    shape: str = BASIL,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    obj = {
        "id": subscription,
        "object": "subscription",
        "customer": customer,
        "status": "canceled",
        "canceled_at": int(time.time()),
    }
    return _event("customer.subscription.deleted", obj, shape, event_id, created)


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
