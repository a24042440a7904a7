"""Lemon Squeezy webhook payloads (JSON:API) in the documented shapes."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

SECRET = "ls-signing-secret"


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _payload(name: str, kind: str, object_id: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": {"event_name": name, "test_mode": True, "webhook_id": "wh_ls_1"},
        "data": {
            "type": kind,
            "id": object_id,
            "attributes": attributes,
            "links": {"self": f"https://api.lemonsqueezy.com/v1/{kind}/{object_id}"},
        },
    }


def order(
    order_id: str,
    created: int,
    variant: int = 101,
    refunded: bool = False,
    name: str = "order_created",
) -> dict[str, Any]:
    return _payload(
        name,
        "orders",
        order_id,
        {
            "store_id": 1,
            "customer_id": 7,
            "identifier": f"id-{order_id}",
            "order_number": 1,
            "user_email": "ls@example.com",
            "status": "refunded" if refunded else "paid",
            "total": 999,
            "refunded": refunded,
            "refunded_amount": 999 if refunded else 0,
            "first_order_item": {
                "id": 55,
                "order_id": int(order_id),
                "variant_id": variant,
                "quantity": 1,
                "price": 999,
            },
            "created_at": iso(created),
            "updated_at": iso(created),
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
    variant: int = 101,
    cancelled: bool = False,
) -> dict[str, Any]:
    return _payload(
        name,
        "subscriptions",
        sub_id,
        {
            "store_id": 1,
            "customer_id": 7,
            "order_id": int(order_id),
            "product_id": 9,
            "variant_id": variant,
            "user_email": "ls@example.com",
            "status": status,
            "cancelled": cancelled,
            "pause": None,
            "first_subscription_item": {"id": 77, "subscription_id": int(sub_id), "quantity": 1},
            "renews_at": iso(renews) if renews else None,
            "ends_at": iso(ends) if ends else None,
            "trial_ends_at": None,
            "created_at": iso(updated),
            "updated_at": iso(updated),
        },
    )


def invoice(name: str, invoice_id: str, sub_id: str, updated: int) -> dict[str, Any]:
    return _payload(
        name,
        "subscription-invoices",
        invoice_id,
        {
            "store_id": 1,
            "subscription_id": int(sub_id),
            "customer_id": 7,
            "user_email": "ls@example.com",
            "billing_reason": "renewal",
            "status": "paid" if name != "subscription_payment_failed" else "pending",
            "total": 999,
            "refunded": False,
            "created_at": iso(updated),
            "updated_at": iso(updated),
        },
    )


def signed_headers(body: bytes, secret: str = SECRET, name: str = "") -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Signature": mac, "X-Event-Name": name, "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
