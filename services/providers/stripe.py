"""Stripe: `Stripe-Signature` verification and invoice/subscription events.

Both invoice shapes are understood: the current API (2025-03-31.basil and
later: `parent.subscription_details.subscription`, line prices at
`pricing.price_details.price`) and the older one (`subscription`, and
`lines.data[].price` as an object with `metadata`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from domain.catalog import Catalog
from domain.commands import CancelOrder, Command, Customer, PaidLine, RecordPayment
from domain.entitlement import Cause
from services.providers import Provider, SignatureError, Unmappable

TOLERANCE_SECONDS = 300
PAYMENT_EVENTS = frozenset({"invoice.paid", "invoice.payment_succeeded"})


def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float) -> None:
    header = headers.get("stripe-signature")
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("Stripe-Signature timestamp is not an integer") from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("Stripe-Signature needs t= and at least one v1=")
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise SignatureError("Stripe-Signature timestamp is outside the 300 s tolerance")
    # Stripe keys the HMAC with the literal `whsec_…` string, not its decoding.
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureError("no v1 signature in Stripe-Signature matches the payload")


def _object(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        raise Unmappable("Stripe event has no data.object")
    return obj


def _id(value: Any) -> str | None:
    """A Stripe reference, whether left as an id or expanded into an object."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent")
    if isinstance(parent, Mapping):
        details = parent.get("subscription_details")
        if isinstance(details, Mapping) and _id(details.get("subscription")):
            return _id(details.get("subscription"))
    return _id(invoice.get("subscription"))


def routing_key(payload: Mapping[str, Any]) -> str:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if isinstance(obj, Mapping):
        if obj.get("object") == "invoice":
            key = _invoice_subscription(obj) or _id(obj.get("id"))
        elif obj.get("object") == "subscription":
            key = _id(obj.get("id"))
        else:
            key = _id(obj.get("subscription")) or _id(obj.get("id"))
        if key:
            return key
    return str(payload.get("id", ""))


def event_id(payload: Mapping[str, Any]) -> str:
    return str(payload.get("id", ""))


def _line_price(line: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(price id, offering_sku from price metadata) of an invoice line."""
    price: Any = line.get("price")
    pricing = line.get("pricing")
    if isinstance(pricing, Mapping):
        details = pricing.get("price_details")
        if isinstance(details, Mapping) and details.get("price") is not None:
            price = details.get("price")
    if price is None and isinstance(line.get("plan"), Mapping):
        price = line["plan"]
    sku = None
    if isinstance(price, Mapping):
        metadata = price.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("offering_sku"):
            sku = str(metadata["offering_sku"])
    return _id(price), sku


def _is_proration(line: Mapping[str, Any]) -> bool:
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        for details in parent.values():
            if isinstance(details, Mapping) and details.get("proration"):
                return True
    return bool(line.get("proration"))


def _timestamp(value: Any, what: str) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unmappable(f"Stripe {what} is not a unix timestamp")
    return datetime.fromtimestamp(value, UTC)


def _record_payment(
    source: str, payload: Mapping[str, Any], invoice: Mapping[str, Any], catalog: Catalog
) -> list[Command]:
    order_ref = _invoice_subscription(invoice) or _id(invoice.get("id"))
    if not order_ref:
        raise Unmappable("Stripe invoice has neither a subscription nor an id")
    lines_list = invoice.get("lines")
    raw_lines = lines_list.get("data") if isinstance(lines_list, Mapping) else None
    if not isinstance(raw_lines, list) or not raw_lines:
        raise Unmappable("Stripe invoice has no lines.data")
    by_sku: dict[str, PaidLine] = {}
    unmapped: list[str] = []
    for line in raw_lines:
        if not isinstance(line, Mapping) or _is_proration(line):
            continue
        price_id, sku = _line_price(line)
        offering = catalog.for_stripe_price(price_id, sku)
        if offering is None:
            wanted = f"offering_sku {sku!r}" if sku else f"price {price_id!r}"
            unmapped.append(f"{wanted} maps to no offering in the catalog")
            continue
        period = line.get("period")
        if not isinstance(period, Mapping):
            raise Unmappable(f"Stripe invoice line {line.get('id')!r} has no period")
        quantity = line.get("quantity") or 1
        if not isinstance(quantity, int) or quantity < 1:
            raise Unmappable(f"Stripe invoice line {line.get('id')!r} has quantity {quantity!r}")
        previous = by_sku.get(offering.sku)
        by_sku[offering.sku] = PaidLine(
            offering=offering,
            quantity=quantity + (previous.quantity if previous else 0),
            period_start=_timestamp(period.get("start"), "line period start"),
            period_end=_timestamp(period.get("end"), "line period end"),
        )
    commands: list[Command] = []
    if by_sku:
        commands.append(
            RecordPayment(
                source=source,
                order_ref=order_ref,
                customer=Customer(
                    id=_id(invoice.get("customer")),
                    email=invoice.get("customer_email") or None,
                ),
                lines=tuple(by_sku.values()),
                cause=Cause.provider(source, event_id(payload)),
                occurred_at=_timestamp(payload.get("created"), "event created"),
            )
        )
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    if not commands:
        raise Unmappable("Stripe invoice has no line with a price (only prorations?)")
    return commands


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("type")
    if not isinstance(kind, str) or not event_id(payload):
        raise Unmappable("not a Stripe event: it needs a string 'type' and 'id'")
    if kind in PAYMENT_EVENTS:
        return _record_payment(source, payload, _object(payload), catalog)
    if kind == "customer.subscription.deleted":
        subscription = _object(payload)
        order_ref = _id(subscription.get("id"))
        if not order_ref:
            raise Unmappable("Stripe subscription has no id")
        return [
            CancelOrder(
                source=source,
                order_ref=order_ref,
                reason="subscription_deleted",
                cause=Cause.provider(source, event_id(payload)),
                occurred_at=_timestamp(payload.get("created"), "event created"),
            )
        ]
    # Event types that carry no entitlement meaning (yet) are acknowledged and
    # left alone, so enabling extra events at Stripe fills no dead-letter queue.
    return []


PROVIDER = Provider(
    name="stripe",
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
)
