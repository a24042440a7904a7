"""Lemon Squeezy: `X-Signature` (hex HMAC-SHA256 of the raw body with the
webhook's signing secret), JSON:API payloads named by `meta.event_name`.

Lemon Squeezy sends no event id and no timestamp header, so a delivery is
identified by a hash of its content (a retry carries the same bytes'
meaning), and events are ordered by the object's `updated_at`.

One purchase is one Lemon Squeezy *order*: the order and its subscription
arrive as separate events, and both land on the order (subscriptions carry
`order_id`), as one entitlement. Subscription invoices name only their
subscription: they reach the order through the link the subscription's own
events record (`subscription/<id>`), waiting for it if they come first.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from domain import lifecycle
from domain.catalog import Catalog, add_period
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
    parse_time,
    ref,
    same_signature,
)

NAME = "lemonsqueezy"
SLOT = "main"  # one item per Lemon Squeezy order; a variant change keeps it
SUBSCRIPTION_EVENTS = frozenset(
    {
        "subscription_created",
        "subscription_updated",
        "subscription_cancelled",
        "subscription_resumed",
        "subscription_expired",
        "subscription_paused",
        "subscription_unpaused",
    }
)
INVOICE_EVENTS = frozenset(
    {
        "subscription_payment_success",
        "subscription_payment_failed",
        "subscription_payment_recovered",
    }
)
STATUSES = {
    "on_trial": "trialing",
    "active": "active",
    "paused": "paused",
    "past_due": "past_due",
    "unpaid": "unpaid",
    "cancelled": "active",  # canceled, but paid until ends_at (a scheduled cancellation)
    "expired": "expired",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    given = headers.get("x-signature")
    if not given:
        raise SignatureError("missing X-Signature header")
    expected = hmac.new(credentials.secret.encode(), body, hashlib.sha256).hexdigest()
    if not same_signature(expected, given.strip()):
        raise SignatureError("X-Signature does not match the payload")


def _data(payload: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    data = payload.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("attributes"), Mapping):
        raise Unmappable("Lemon Squeezy payload has no data.attributes")
    object_id = ref(data.get("id"), "Lemon Squeezy data.id", numbers=True)
    return object_id or "", data["attributes"]


def _event_name(payload: Mapping[str, Any]) -> str:
    meta = payload.get("meta")
    return str(meta.get("event_name", "")) if isinstance(meta, Mapping) else ""


def routing_key(payload: Mapping[str, Any]) -> str:
    data = payload.get("data")
    attributes = data.get("attributes") if isinstance(data, Mapping) else None
    if isinstance(attributes, Mapping):
        name = _event_name(payload)
        if name in INVOICE_EVENTS:
            return f"subscription/{attributes.get('subscription_id')}"
        if name in SUBSCRIPTION_EVENTS:
            return f"order/{attributes.get('order_id')}"
        if isinstance(data, Mapping) and data.get("type") == "orders":
            return f"order/{data.get('id')}"
    return event_id(payload)


def event_id(payload: Mapping[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "ls_" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _time(value: Any, what: str) -> datetime | None:
    return parse_time(value, f"Lemon Squeezy {what}")


def _offering_line(
    variant_id: Any,
    catalog: Catalog,
    quantity: Any = 1,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Line:
    offering = catalog.for_price(NAME, None if variant_id is None else str(variant_id), None)
    if offering is None:
        raise Unmappable(f"variant {variant_id!r} maps to no offering in the catalog")
    count = quantity if isinstance(quantity, int) and quantity >= 1 else 1
    return Line(SLOT, offering, count, start, end)


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    name = _event_name(payload)
    object_id, attributes = _data(payload)
    cause = Cause.provider(source, event_id(payload))
    occurred_at = _time(attributes.get("updated_at") or attributes.get("created_at"), "updated_at")
    if occurred_at is None:
        raise Unmappable("Lemon Squeezy object has neither updated_at nor created_at")
    customer = Customer(
        id=ref(attributes.get("customer_id"), "Lemon Squeezy customer_id", numbers=True),
        email=ref(attributes.get("user_email"), "Lemon Squeezy user_email") or None,
    )
    if name in SUBSCRIPTION_EVENTS:
        order = ref(attributes.get("order_id"), "Lemon Squeezy order_id", numbers=True)
        if order is None or not object_id:
            raise Unmappable("Lemon Squeezy subscription has no id or order_id")
        item = attributes.get("first_subscription_item")
        quantity = item.get("quantity") if isinstance(item, Mapping) else 1
        line = _offering_line(attributes.get("variant_id"), catalog, quantity)
        status = STATUSES.get(str(attributes.get("status")))
        if status == "expired" and attributes.get("cancelled"):
            status = "canceled"  # the grace period after a cancellation ran out
        if status is None:
            raise Unmappable(f"Lemon Squeezy subscription status {attributes.get('status')!r}")
        trial_end = _time(attributes.get("trial_ends_at"), "trial_ends_at")
        ends_at = _time(attributes.get("ends_at"), "ends_at")
        renews_at = _time(attributes.get("renews_at"), "renews_at")
        end = ends_at if attributes.get("status") == "cancelled" else renews_at
        fact = lifecycle.subscription(
            status,
            [line],
            None,
            trial_end if status == "trialing" else end,
            trial_end=trial_end,
            cancel_at=ends_at if attributes.get("status") == "cancelled" else None,
        )
        return [
            OrderEvent(
                source,
                f"order/{order}",
                fact,
                (line,),
                cause,
                occurred_at,
                customer,
                payment_refs=(f"subscription/{object_id}",),
            )
        ]
    if name in INVOICE_EVENTS:
        subscription = ref(
            attributes.get("subscription_id"), "Lemon Squeezy subscription_id", numbers=True
        )
        if subscription is None or not object_id:
            raise Unmappable("Lemon Squeezy subscription invoice has no id or subscription_id")
        invoice = f"invoice/{object_id}"
        paid = name != "subscription_payment_failed"
        fact = (lifecycle.payment if paid else lifecycle.payment_failed)(invoice, [])
        return [PaymentEvent(source, (f"subscription/{subscription}",), fact, cause, occurred_at)]
    if name in ("order_created", "order_refunded"):
        item = attributes.get("first_order_item")
        if not object_id or not isinstance(item, Mapping):
            raise Unmappable("Lemon Squeezy order has no id or first_order_item")
        if name == "order_refunded":
            total = attributes.get("total") or 0
            refunded = attributes.get("refunded_amount") or 0
            full = bool(attributes.get("refunded")) and (not total or refunded >= total)
            fact = lifecycle.refund(full, f"order/{object_id}")
            return [OrderEvent(source, f"order/{object_id}", fact, (), cause, occurred_at)]
        if attributes.get("status") != "paid":
            return []
        created = _time(attributes.get("created_at"), "created_at") or occurred_at
        line = _offering_line(item.get("variant_id"), catalog, item.get("quantity"))
        # A one-off order is paid for one period of its offering.
        line = Line(
            SLOT, line.offering, line.quantity, created, add_period(created, line.offering.period)
        )
        return [
            OrderEvent(
                source,
                f"order/{object_id}",
                lifecycle.payment(f"order/{object_id}", [line]),
                (line,),
                cause,
                occurred_at,
                customer,
                invoice=f"order/{object_id}",
            )
        ]
    return []


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("x-signature", "x-event-name"),
)
