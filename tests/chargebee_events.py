"""Chargebee v2 webhook payloads in the documented shapes."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from urllib3.util import make_headers

USERNAME = "entitle"
PASSWORD = "cb-webhook-password"
_ids = itertools.count(1)


def _event(kind: str, content: dict[str, Any], occurred: int) -> dict[str, Any]:
    return {
        "id": f"ev_cb{int(time.time() * 1000):x}{next(_ids):06d}",
        "occurred_at": occurred,
        "source": "scheduled_job",
        "object": "event",
        "api_version": "v2",
        "event_type": kind,
        "webhook_status": "scheduled",
        "content": content,
    }


def _customer() -> dict[str, Any]:
    return {"id": "cust_cb", "email": "cb@example.com", "object": "customer"}


def subscription(
    kind: str,
    sub: str,
    status: str,
    start: int,
    end: int,
    version_ms: int,
    price: str = "basic-USD-Monthly",
) -> dict[str, Any]:
    content = {
        "subscription": {
            "id": sub,
            "customer_id": "cust_cb",
            "status": status,
            "billing_period": 1,
            "billing_period_unit": "month",
            "current_term_start": start,
            "current_term_end": end,
            "cancelled_at": end if status == "cancelled" else None,
            "resource_version": version_ms,
            "object": "subscription",
            "subscription_items": [
                {
                    "item_price_id": price,
                    "item_type": "plan",
                    "quantity": 1,
                    "object": "subscription_item",
                }
            ],
        },
        "customer": _customer(),
    }
    return _event(kind, content, version_ms // 1000)


def invoice_event(
    kind: str,
    sub: str,
    invoice: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "basic-USD-Monthly",
    status: str = "paid",
) -> dict[str, Any]:
    content = {
        "invoice": {
            "id": invoice,
            "customer_id": "cust_cb",
            "subscription_id": sub,
            "status": status,
            "total": 1000,
            "amount_paid": 1000 if status == "paid" else 0,
            "object": "invoice",
            "line_items": [
                {
                    "date_from": start,
                    "date_to": end,
                    "entity_type": "plan_item_price",
                    "entity_id": price,
                    "quantity": 1,
                    "amount": 1000,
                    "object": "line_item",
                }
            ],
        },
        "customer": _customer(),
    }
    return _event(kind, content, occurred)


def refunded(sub: str, invoice: str, amount: int, occurred: int) -> dict[str, Any]:
    event = invoice_event("payment_refunded", sub, invoice, 0, 0, occurred)
    event["content"]["transaction"] = {
        "id": "txn_cb",
        "amount": amount,
        "type": "refund",
        "linked_invoices": [{"invoice_id": invoice}],
    }
    return event


def headers(username: str = USERNAME, password: str = PASSWORD) -> dict[str, str]:
    return {**make_headers(basic_auth=f"{username}:{password}"), "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
