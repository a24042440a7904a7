"""Neutral billing events (contracts.billing), signed by the official
`standardwebhooks` package."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"entitle-standard-test-key-32byte").decode()
_ids = itertools.count(1)


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def event(
    kind: str, data: dict[str, Any], created: int, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_std_{int(time.time() * 1000):x}{next(_ids):06d}",
        "type": kind,
        "timestamp": iso(created),
        "data": data,
    }


def subscription(
    sub: str, status: str, start: int, end: int, created: int, sku: str = "basic", **kw: Any
) -> dict[str, Any]:
    body = {
        "id": sub,
        "status": status,
        "items": [{"id": "main", "sku": sku, "quantity": kw.pop("quantity", 1)}],
        "customer": {"id": "cus_std", "email": "std@example.com"},
        "current_period_start": iso(start),
        "current_period_end": iso(end),
        **kw,
    }
    kind = "subscription.canceled" if status == "canceled" else "subscription.updated"
    return event(kind, {"subscription": body}, created)


def payment(
    sub: str,
    payment_id: str,
    start: int,
    end: int,
    created: int,
    sku: str = "basic",
    failed: bool = False,
) -> dict[str, Any]:
    body = {
        "id": payment_id,
        "subscription_id": sub,
        "items": [{"id": "main", "sku": sku}],
        "period_start": iso(start),
        "period_end": iso(end),
        "customer": {"id": "cus_std", "email": "std@example.com"},
    }
    return event("payment.failed" if failed else "payment.succeeded", {"payment": body}, created)


def signed_headers(
    body: bytes, secret: str = SECRET, timestamp: int | None = None, msg_id: str | None = None
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    msg = msg_id or f"msg_{next(_ids)}"
    try:
        text = body.decode()
    except UnicodeDecodeError:
        # The SDK signs text only; a body that is not UTF-8 is signed by the
        # spec's rule itself: HMAC-SHA256 of "<id>.<timestamp>.<body bytes>".
        key = base64.b64decode(secret.removeprefix("whsec_"))
        mac = hmac.new(key, f"{msg}.{ts}.".encode() + body, hashlib.sha256).digest()
        signature = "v1," + base64.b64encode(mac).decode()
    else:
        signature = Webhook(secret).sign(msg, datetime.fromtimestamp(ts, UTC), text)
    return {
        "webhook-id": msg,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
