"""Chargebee: webhooks authenticated by HTTP Basic auth (Chargebee signs no
body), subscription, invoice and refund events.

Subscription snapshots are ordered by the subscription's `resource_version`
(milliseconds), which Chargebee bumps on every change. A plan is the slot
"plan" (one per subscription, kept across plan changes); an addon's slot is
its item price id.
"""

from __future__ import annotations

import base64
import binascii
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
    from_unix,
    listed,
    ref,
    text_id,
)

NAME = "chargebee"
SUBSCRIPTION_EVENTS = frozenset(
    {
        "subscription_created",
        "subscription_started",
        "subscription_activated",
        "subscription_changed",
        "subscription_renewed",
        "subscription_cancelled",
        "subscription_reactivated",
        "subscription_paused",
        "subscription_resumed",
        "subscription_cancellation_scheduled",
        "subscription_scheduled_cancellation_removed",
    }
)
#: Invoice statuses that mean its collection failed (https://apidocs.chargebee.com/docs/api/invoices#invoice_status).
UNPAID = frozenset({"payment_due", "not_paid"})
STATUSES = {
    "future": "pending",
    "in_trial": "trialing",
    "active": "active",
    "non_renewing": "active",  # with a cancellation at the term end
    "paused": "paused",
    "cancelled": "canceled",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    header = headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise SignatureError("Chargebee webhooks need 'Authorization: Basic …'")
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the Basic credentials are not base64") from None
    expected = f"{credentials.username or ''}:{credentials.secret}".encode()
    if not hmac.compare_digest(given, expected):
        raise SignatureError("the Basic credentials do not match the source's")


def _content(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    content = payload.get("content")
    return content if isinstance(content, Mapping) else {}


def _obj(payload: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = _content(payload).get(name)
    return value if isinstance(value, Mapping) else None


def routing_key(payload: Mapping[str, Any]) -> str:
    subscription = _obj(payload, "subscription")
    if subscription is not None and subscription.get("id"):
        return str(subscription["id"])
    invoice = _obj(payload, "invoice")
    if invoice is not None:
        return str(invoice.get("subscription_id") or invoice.get("id") or "")
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _time(value: Any, what: str, scale: int = 1) -> datetime | None:
    return None if value is None else from_unix(value, f"Chargebee {what}", scale)


def _ref(obj: Mapping[str, Any], field: str) -> str:
    return ref(obj.get(field), f"Chargebee {field}") or ""


def _slot(item_type: Any, item_price_id: str) -> str:
    return "plan" if item_type in ("plan", "plan_item_price") else item_price_id


def _subscription_lines(
    subscription: Mapping[str, Any], catalog: Catalog, unmapped: list[str]
) -> list[Line]:
    lines = []
    for item in listed(subscription.get("subscription_items"), "Chargebee subscription_items"):
        if not isinstance(item, Mapping) or item.get("item_type") == "charge":
            continue
        price_id = str(ref(item.get("item_price_id"), "Chargebee item_price_id"))
        offering = catalog.for_price(NAME, price_id, None)
        if offering is None:
            unmapped.append(f"item price {price_id!r} maps to no offering in the catalog")
            continue
        # An emptied item (quantity 0) stays in the snapshot and grants nothing.
        quantity = _quantity(item.get("quantity"), price_id)
        lines.append(Line(_slot(item.get("item_type"), price_id), offering, quantity))
    return lines


def _quantity(value: Any, price_id: str) -> int:
    quantity = 1 if value is None else value
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 0:
        raise Unmappable(f"Chargebee item price {price_id!r} has quantity {quantity!r}")
    return quantity


def _invoice_lines(invoice: Mapping[str, Any], catalog: Catalog, unmapped: list[str]) -> list[Line]:
    lines: dict[str, Line] = {}
    for item in listed(invoice.get("line_items"), "Chargebee invoice line_items"):
        if not isinstance(item, Mapping) or item.get("entity_type") not in (
            "plan_item_price",
            "addon_item_price",
        ):
            continue
        price_id = str(ref(item.get("entity_id"), "Chargebee line entity_id"))
        offering = catalog.for_price(NAME, price_id, None)
        if offering is None:
            unmapped.append(f"item price {price_id!r} maps to no offering in the catalog")
            continue
        quantity = _quantity(item.get("quantity"), price_id)
        if not quantity:
            continue
        slot = _slot(item.get("entity_type"), price_id)
        lines[slot] = Line(
            slot,
            offering,
            quantity,
            _time(item.get("date_from"), "line date_from"),
            _time(item.get("date_to"), "line date_to"),
        )
    return list(lines.values())


def _customer(payload: Mapping[str, Any]) -> Customer | None:
    customer = _obj(payload, "customer")
    if customer is None:
        return None
    return Customer(
        id=ref(customer.get("id"), "Chargebee customer id"),
        email=ref(customer.get("email"), "Chargebee customer email"),
    )


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("event_type")
    if not isinstance(kind, str) or not event_id(payload):
        raise Unmappable("not a Chargebee event: it needs event_type and id")
    occurred_at = _time(payload.get("occurred_at"), "occurred_at")
    if occurred_at is None:
        raise Unmappable("Chargebee event has no occurred_at")
    cause = Cause.provider(source, event_id(payload))
    subscription = _obj(payload, "subscription")
    invoice = _obj(payload, "invoice")
    unmapped: list[str] = []
    commands: list[Command] = []
    # An event may carry a subscription and an invoice: each is a fact of its
    # own (the invoice's under the event id + "/invoice", since an
    # entitlement keeps one fact per cause).
    invoice_cause = (
        Cause.provider(source, f"{event_id(payload)}/invoice") if subscription else cause
    )
    status = ref(invoice.get("status"), "Chargebee invoice status") if invoice is not None else None
    if invoice is not None and invoice.get("subscription_id") and kind != "payment_refunded":
        invoice_id = _ref(invoice, "id")
        order = _ref(invoice, "subscription_id")
        written_off = status == "voided" or (invoice.get("write_off_amount") or 0) > 0
        if written_off:
            # Written off, it is marked paid with nothing collected: no payment.
            how = "voided" if status == "voided" else "uncollectible"
            fact = lifecycle.written_off(invoice_id, how)
            commands.append(OrderEvent(source, order, fact, (), invoice_cause, occurred_at))
        elif status == "paid" or status in UNPAID or kind == "payment_failed":
            # Paid, it moves the paid-through date and is what a later refund
            # names; not paid (a renewal whose collection failed), it leaves the
            # new term unpaid and the subscription overdue.
            lines = _invoice_lines(invoice, catalog, unmapped)
            paid = status == "paid"
            if lines:
                commands.append(
                    OrderEvent(
                        source,
                        order,
                        (lifecycle.payment if paid else lifecycle.payment_failed)(
                            invoice_id, lines
                        ),
                        tuple(lines),
                        invoice_cause,
                        occurred_at,
                        _customer(payload),
                        invoice=invoice_id if paid else None,
                    )
                )
    if kind == "payment_refunded" and invoice is not None and invoice.get("subscription_id"):
        total = invoice.get("total") or invoice.get("amount_paid") or 0
        credit = _obj(payload, "credit_note")
        transaction = _obj(payload, "transaction")
        refunded = (credit or {}).get("total") or (transaction or {}).get("amount") or 0
        fact = lifecycle.refund(bool(total) and refunded >= total, _ref(invoice, "id"))
        commands.append(
            OrderEvent(source, _ref(invoice, "subscription_id"), fact, (), cause, occurred_at)
        )
    elif kind in SUBSCRIPTION_EVENTS and subscription is not None:
        sub_status = STATUSES.get(str(subscription.get("status")))
        if not subscription.get("id") or sub_status is None:
            raise Unmappable(f"Chargebee subscription has status {subscription.get('status')!r}")
        lines = _subscription_lines(subscription, catalog, unmapped)
        end = _time(subscription.get("current_term_end"), "current_term_end")
        cancel_at = _time(subscription.get("cancelled_at"), "cancelled_at")
        if subscription.get("status") == "non_renewing":
            cancel_at = cancel_at or end
        fact = lifecycle.subscription(
            sub_status,
            lines,
            _time(subscription.get("current_term_start"), "current_term_start"),
            end,
            trial_end=_time(subscription.get("trial_end"), "trial_end"),
            cancel_at=cancel_at if sub_status != "canceled" else None,
            # Chargebee starts the next term before it has collected for it
            # (subscription_renewed with an invoice still payment_due).
            vouches=False,
        )
        # Chargebee bumps resource_version (ms) on every change: it orders snapshots.
        version = _time(subscription.get("resource_version"), "resource_version", 1000)
        commands.append(
            OrderEvent(
                source,
                _ref(subscription, "id"),
                fact,
                tuple(lines),
                cause,
                version or occurred_at,
                _customer(payload),
            )
        )
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    return commands


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    needs=("username",),
)
