"""Zenofy-style checkout webhooks, in the shape services/providers/zenofy.py documents."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

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
    if renews:
        subscription["renewal"] = {"order_id": f"zord_{sub}", "renews": renews}
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
