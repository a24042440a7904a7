"""Zenofy-style SaaS checkouts: a checkout that POSTs `subscription.*` JSON
to the vendor. This adapter defines the exact shape it accepts:

    POST /webhooks/<source>
    X-Zenofy-Signature: sha256=<hex HMAC-SHA256 of the raw body>   (if the source has a secret)

    {"id": "zev_1", "event": "subscription.renewed", "created_at": "2026-02-01T00:00:00Z",
     "subscription": {"id": "zsub_2", "status": "ACTIVE", "plan": "pro", "quantity": 1,
                      "customer_email": "ada@example.com",
                      "current_period_start": "2026-02-01T00:00:00Z",
                      "current_period_end": "2026-03-01T00:00:00Z",
                      "renewal": {"order_id": "zord_2", "renews": "zsub_1"}}}

Events: subscription.created, .activated, .renewed, .suspended, .canceled,
.expired. Statuses PENDING, ACTIVE, SUSPENDED, CANCELED and EXPIRED map one
to one. Such checkouts often open a new subscription id for each renewal, so
an order is the customer's email and plan: a renewal paid with the same
email extends the same entitlement.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from domain import lifecycle
from domain.catalog import Catalog
from domain.commands import Command, Customer, OrderEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
    parse_time,
    same_signature,
    text_id,
)

NAME = "zenofy"
EVENTS = frozenset(
    {
        "subscription.created",
        "subscription.activated",
        "subscription.renewed",
        "subscription.suspended",
        "subscription.canceled",
        "subscription.expired",
    }
)
STATUSES = {
    "PENDING": "pending",
    "ACTIVE": "active",
    "SUSPENDED": "suspended",
    "CANCELED": "canceled",
    "EXPIRED": "expired",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    header = headers.get("x-zenofy-signature", "")
    scheme, _, given = header.partition("=")
    if scheme != "sha256" or not given:
        raise SignatureError("needs 'X-Zenofy-Signature: sha256=<hex>'")
    expected = hmac.new(credentials.secret.encode(), body, hashlib.sha256).hexdigest()
    if not same_signature(expected, given.strip()):
        raise SignatureError("X-Zenofy-Signature does not match the payload")


def _subscription(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    subscription = payload.get("subscription")
    if not isinstance(subscription, Mapping):
        raise Unmappable("Zenofy event has no subscription object")
    return subscription


def order_ref(email: str, plan: str) -> str:
    return f"{email.strip().lower()}/{plan}"


def routing_key(payload: Mapping[str, Any]) -> str:
    subscription = payload.get("subscription")
    if isinstance(subscription, Mapping):
        email, plan = subscription.get("customer_email"), subscription.get("plan")
        if isinstance(email, str) and plan:
            return order_ref(email, str(plan))
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _time(value: Any, what: str) -> datetime | None:
    return parse_time(value, f"Zenofy {what}")


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("event")
    if not isinstance(kind, str) or kind not in EVENTS or not event_id(payload):
        raise Unmappable(
            f"not a Zenofy subscription event: event {kind!r}, id {payload.get('id')!r}"
        )
    occurred_at = _time(payload.get("created_at"), "created_at")
    if occurred_at is None:
        raise Unmappable("Zenofy event has no created_at")
    subscription = _subscription(payload)
    email, plan = subscription.get("customer_email"), subscription.get("plan")
    status = STATUSES.get(str(subscription.get("status")))
    if not isinstance(email, str) or "@" not in email or not plan or status is None:
        raise Unmappable(
            f"Zenofy subscription needs customer_email, plan and a status of {', '.join(STATUSES)}"
        )
    offering = catalog.for_price(NAME, str(plan), None) or catalog.get(str(plan))
    if offering is None:
        raise Unmappable(f"plan {plan!r} maps to no offering in the catalog")
    quantity = subscription.get("quantity") or 1
    if not isinstance(quantity, int) or quantity < 1:
        raise Unmappable(f"Zenofy subscription has quantity {quantity!r}")
    start = _time(subscription.get("current_period_start"), "current_period_start")
    end = _time(subscription.get("current_period_end"), "current_period_end")
    line = Line(offering.sku, offering, quantity, start, end)
    if kind == "subscription.renewed":
        renewal = subscription.get("renewal")
        paid_for = (
            (renewal.get("order_id") if isinstance(renewal, Mapping) else None)
            or subscription.get("id")
            or event_id(payload)
        )
        fact = lifecycle.payment(str(paid_for), [line])
    else:
        fact = lifecycle.subscription(status, [line], start, end)
    return [
        OrderEvent(
            source,
            order_ref(email, str(plan)),
            fact,
            (line,),
            Cause.provider(source, event_id(payload)),
            occurred_at,
            Customer(id=None, email=email.strip().lower()),
        )
    ]


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("x-zenofy-signature",),
)
