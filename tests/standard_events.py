"""Neutral billing events (contracts.billing, schema
contracts/schemas/billing-event.v1.json, the README's example), signed by
the official `standardwebhooks` package as https://www.standardwebhooks.com/
specifies (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`,
space-separated during a key rotation)."""

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

from services.providers import Credentials
from tests.conformance import catalog
from tests.lifecycle_world import ts

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


def whsec(secret: str) -> str:
    """A `whsec_` key whose bytes are `secret` (the suite's secrets are text)."""
    return "whsec_" + base64.b64encode(secret.encode()).decode()


class StandardFixtures:
    """The neutral schema's shapes for the conformance suite: our own
    contract, so every happening has its event."""

    provider = "standard"

    def __init__(self) -> None:
        self.price = {"basic": "price_std_basic", "pro": "price_std_pro"}
        self.catalog = catalog("standard", {sku: (p,) for sku, p in self.price.items()})

    def credentials(self, secret: str) -> Credentials:
        return Credentials(whsec(secret))

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return signed_headers(body, whsec(secret), int(at), msg_id="msg_conformance")

    def signature_age_limit(self) -> float:
        return 300  # standardwebhooks' default tolerance (5 minutes)

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        headers = self.sign(body, old, at)
        newer = self.sign(body, new, at)["webhook-signature"]
        return {**headers, "webhook-signature": f"{headers['webhook-signature']} {newer}"}

    def _items(self, sku: str) -> list[dict[str, Any]]:
        return [{"id": "main", "price": self.price[sku]}]

    def _subscription(
        self, kind: str, sub: str, status: str, sku: str, start: int, end: int, at: int, **kw: Any
    ) -> list[Any]:
        body = {
            "id": sub,
            "status": status,
            "items": self._items(sku),
            "customer": {"id": "cus_std", "email": "std@example.com"},
            "current_period_start": iso(ts(start)),
            "current_period_end": iso(ts(end)),
            **kw,
        }
        return [event(kind, {"subscription": body}, ts(at))]

    def _payment(self, kind: str, at: int, **body: Any) -> list[Any]:
        return [event(kind, {"payment": body}, ts(at))]

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription("subscription.updated", sub, "active", sku, start, end, at)

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        return self._payment(
            "payment.succeeded",
            at,
            id=invoice,
            subscription_id=sub,
            items=self._items(sku),
            period_start=iso(ts(start)),
            period_end=iso(ts(end)),
        )

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        return self._payment(
            "payment.failed",
            at,
            id=invoice,
            subscription_id=sub,
            items=self._items(sku),
            period_start=iso(ts(start)),
            period_end=iso(ts(end)),
        )

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription(
            "subscription.updated", sub, "active", sku, start, end, at, cancel_at=iso(ts(end))
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription("subscription.canceled", sub, "canceled", sku, start, end, at)

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription("subscription.updated", sub, "paused", sku, start, end, at)

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription("subscription.updated", sub, "active", sku, start, end, at)

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        how = "full" if refunded >= amount else "partial"
        return self._payment("payment.refunded", at, id=invoice, refund=how)

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        return self._payment(
            "payment.disputed", at, id=invoice, dispute={"id": dispute, "status": state}
        )

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        # payment.succeeded without a subscription_id: a one-off sale.
        return self._payment(
            "payment.succeeded",
            at,
            id=order,
            items=self._items(sku),
            customer={"id": "cus_std", "email": "std@example.com"},
        )

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        # The case of shared/cases/08: "2026-01-01T00:00:20", no offset.
        payload["timestamp"] = payload["timestamp"].removesuffix("+00:00")
        return payload

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        for body in payload["data"].values():
            for item in body.get("items", []):
                item["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        payload["data"]["payment"]["items"] = [{"id": "main", "price": price}]
        return payload


FIXTURES = StandardFixtures()
