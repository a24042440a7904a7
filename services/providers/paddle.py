"""Paddle Billing: `Paddle-Signature: ts=…;h1=…` and subscription/transaction events.

The signature is hex HMAC-SHA256 of "{ts}:{raw body}" with the notification
destination's secret key; several h1 values appear while a key rotates. The
timestamp may be at most 5 s old (as Paddle's SDK), unless configured.

Paddle subscription items have no id of their own, so an item's slot is its
price's product: a change of price within a product keeps the entitlement.
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
    ref,
    same_signature,
    text_id,
)

NAME = "paddle"
TOLERANCE_SECONDS = 5
SUBSCRIPTION_EVENTS = frozenset(
    {
        "subscription.created",
        "subscription.activated",
        "subscription.updated",
        "subscription.past_due",
        "subscription.paused",
        "subscription.resumed",
        "subscription.trialing",
        "subscription.canceled",
    }
)
# Paddle's subscription statuses, in the lifecycle's words.
STATUSES = {
    "active": "active",
    "trialing": "trialing",
    "past_due": "past_due",
    "paused": "paused",
    "canceled": "canceled",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    header = headers.get("paddle-signature")
    if not header:
        raise SignatureError("missing Paddle-Signature header")
    timestamp: int | None = None
    hashes: list[str] = []
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "ts":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("Paddle-Signature ts is not an integer") from None
        elif key == "h1":
            hashes.append(value)
    if timestamp is None or not hashes:
        raise SignatureError("Paddle-Signature needs ts= and at least one h1=")
    tolerance = credentials.tolerance_seconds or TOLERANCE_SECONDS
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"Paddle-Signature ts is outside the {tolerance:g} s tolerance")
    signed = f"{timestamp}:".encode() + body
    expected = hmac.new(credentials.secret.encode(), signed, hashlib.sha256).hexdigest()
    if not any(same_signature(expected, h) for h in hashes):
        raise SignatureError("no h1 signature in Paddle-Signature matches the payload")


def _data(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise Unmappable("Paddle event has no data object")
    return data


def routing_key(payload: Mapping[str, Any]) -> str:
    data = payload.get("data")
    if isinstance(data, Mapping):
        if str(payload.get("event_type", "")).startswith("subscription."):
            return str(data.get("id") or "")
        return str(data.get("subscription_id") or data.get("id") or "")
    return text_id(payload.get("event_id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("event_id"))


def _time(value: Any, what: str) -> datetime | None:
    return parse_time(value, f"Paddle {what}")


def _period(obj: Any, what: str) -> tuple[datetime | None, datetime | None]:
    if not isinstance(obj, Mapping):
        return None, None
    return _time(obj.get("starts_at"), f"{what}.starts_at"), _time(
        obj.get("ends_at"), f"{what}.ends_at"
    )


def _lines(
    items: Any,
    catalog: Catalog,
    unmapped: list[str],
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[Line]:
    if not isinstance(items, list):
        raise Unmappable("Paddle entity has no items list")
    lines: dict[str, Line] = {}
    for item in items:
        price = item.get("price") if isinstance(item, Mapping) else None
        if not isinstance(price, Mapping):
            continue
        custom = price.get("custom_data")
        sku = custom.get("offering_sku") if isinstance(custom, Mapping) else None
        offering = catalog.for_price(NAME, price.get("id"), sku)
        if offering is None:
            wanted = f"offering_sku {sku!r}" if sku else f"price {price.get('id')!r}"
            unmapped.append(f"{wanted} maps to no offering in the catalog")
            continue
        quantity = item.get("quantity") or 1
        if not isinstance(quantity, int) or quantity < 1:
            raise Unmappable(f"Paddle item has quantity {quantity!r}")
        slot = (
            ref(price.get("product_id"), "Paddle price.product_id")
            or ref(price.get("id"), "Paddle price.id")
            or offering.sku
        )
        lines[slot] = Line(slot, offering, quantity, start, end)
    return list(lines.values())


def _finish(commands: list[Command], unmapped: list[str]) -> list[Command]:
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    return commands


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("event_type")
    if not isinstance(kind, str) or not event_id(payload):
        raise Unmappable("not a Paddle event: it needs event_type and event_id")
    occurred_at = _time(payload.get("occurred_at"), "occurred_at")
    if occurred_at is None:
        raise Unmappable("Paddle event has no occurred_at")
    cause = Cause.provider(source, event_id(payload))
    data = _data(payload)
    unmapped: list[str] = []
    commands: list[Command] = []
    customer = Customer(id=ref(data.get("customer_id"), "Paddle customer_id"), email=None)
    if kind in SUBSCRIPTION_EVENTS:
        subscription_id = ref(data.get("id"), "Paddle subscription id")
        status = STATUSES.get(str(data.get("status")))
        if not subscription_id or status is None:
            raise Unmappable(
                f"Paddle subscription has id {subscription_id!r}, status {data.get('status')!r}"
            )
        lines = _lines(data.get("items"), catalog, unmapped)
        start, end = _period(data.get("current_billing_period"), "current_billing_period")
        change = data.get("scheduled_change")
        cancel_at = None
        if isinstance(change, Mapping) and change.get("action") == "cancel":
            cancel_at = _time(change.get("effective_at"), "scheduled_change.effective_at")
        if status == "canceled":
            fact = lifecycle.ended("subscription_canceled", lines)
        else:
            fact = lifecycle.subscription(
                status,
                lines,
                start,
                end,
                trial_end=end if status == "trialing" else None,
                cancel_at=cancel_at,
            )
        commands.append(
            OrderEvent(source, subscription_id, fact, tuple(lines), cause, occurred_at, customer)
        )
    elif kind in ("transaction.completed", "transaction.paid", "transaction.payment_failed"):
        transaction_id = ref(data.get("id"), "Paddle transaction id")
        subscription_id = ref(data.get("subscription_id"), "Paddle subscription_id")
        if not transaction_id:
            raise Unmappable("Paddle transaction has no id")
        if not subscription_id:
            return []  # a one-off purchase: not a subscription this engine follows
        start, end = _period(data.get("billing_period"), "billing_period")
        lines = _lines(data.get("items"), catalog, unmapped, start, end)
        paid = kind != "transaction.payment_failed"
        if lines:
            commands.append(
                OrderEvent(
                    source,
                    subscription_id,
                    (lifecycle.payment if paid else lifecycle.payment_failed)(
                        transaction_id, lines
                    ),
                    tuple(lines),
                    cause,
                    occurred_at,
                    customer,
                    payment_refs=(transaction_id,) if paid else (),
                    invoice=transaction_id,
                )
            )
    return _finish(commands, unmapped)


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("paddle-signature",),
)
