"""Paddle Billing webhook payloads in the documented shapes, signed with the
official `paddle-python-sdk`'s own HMAC."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

from paddle_billing.Notifications.PaddleSignature import PaddleSignature

SECRET = "pdl_ntfset_01hkz0test_secretkey"
_ids = itertools.count(1)


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _event(kind: str, data: dict[str, Any], occurred: int) -> dict[str, Any]:
    n = next(_ids)
    return {
        "event_id": f"evt_01pdl{int(time.time() * 1000):x}{n:06d}",
        "event_type": kind,
        "occurred_at": iso(occurred),
        "notification_id": f"ntf_01pdl{n:06d}",
        "data": data,
    }


def _item(price: str, product: str, quantity: int = 1) -> dict[str, Any]:
    return {
        "status": "active",
        "quantity": quantity,
        "recurring": True,
        "price": {
            "id": price,
            "product_id": product,
            "description": "Monthly",
            "billing_cycle": {"interval": "month", "frequency": 1},
            "custom_data": None,
        },
    }


def subscription(
    kind: str,
    sub: str,
    status: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "pri_basic",
    cancel_at: int | None = None,
) -> dict[str, Any]:
    data = {
        "id": sub,
        "status": status,
        "customer_id": "ctm_01pdl",
        "address_id": "add_01pdl",
        "currency_code": "USD",
        "collection_mode": "automatic",
        "billing_cycle": {"interval": "month", "frequency": 1},
        "current_billing_period": {"starts_at": iso(start), "ends_at": iso(end)},
        "scheduled_change": (
            {"action": "cancel", "effective_at": iso(cancel_at), "resume_at": None}
            if cancel_at
            else None
        ),
        "items": [_item(price, "pro_01acme")],
        "custom_data": None,
    }
    return _event(kind, data, occurred)


def transaction(
    sub: str,
    txn: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "pri_basic",
    failed: bool = False,
) -> dict[str, Any]:
    data = {
        "id": txn,
        "status": "past_due" if failed else "completed",
        "customer_id": "ctm_01pdl",
        "subscription_id": sub,
        "invoice_id": None if failed else f"inv_{txn}",
        "origin": "subscription_recurring",
        "currency_code": "USD",
        "billing_period": {"starts_at": iso(start), "ends_at": iso(end)},
        "items": [_item(price, "pro_01acme")],
        "details": {"totals": {"total": "9900", "currency_code": "USD"}},
    }
    return _event(
        "transaction.payment_failed" if failed else "transaction.completed", data, occurred
    )


def signed_headers(
    body: bytes, secret: str = SECRET, timestamp: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    h1 = PaddleSignature.calculate_hmac(secret, f"{ts}:".encode() + body).hexdigest()
    return {"Paddle-Signature": f"ts={ts};h1={h1}", "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
