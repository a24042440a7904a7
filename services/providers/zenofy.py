"""Zenofy (https://zenofy.io) checkouts: the SaaS subscription webhook of a
Software / SaaS product (`subscription.*`) and the order webhook of
*Integrations → Webhook* (`order_paid`, `order_refunded`, `order_cancelled`),
on one source.

Authentication. Zenofy sends the product's webhook secret as it is, in
`X-Webhook-Secret` (https://zenofy.io/doc/order-webhooks,
https://zenofy.io/doc/saas-subscription-webhooks); it is compared in
constant time. It proves the sender knows the secret but does not bind the
body, so serve the URL over HTTPS only. A sender that can sign may send
`X-Zenofy-Signature: sha256=<hex HMAC-SHA256 of the raw body>` instead (the
form of Zenofy's API-gateway webhooks, https://zenofy.io/doc/api-gateway-webhooks).
Neither carries a time: a signature cannot expire.

Subscriptions. Zenofy's page names the events and says each carries the
subscription's id, period dates and renewal metadata, with its originating
order; the field names below are this adapter's (the exact shape it
accepts):

    {"id": "zev_1", "event": "subscription.renewed", "created_at": "2026-02-01T00:00:00Z",
     "subscription": {"id": "zsub_2", "status": "ACTIVE", "plan": "pro", "quantity": 1,
                      "customer_email": "ada@example.com",
                      "current_period_start": "2026-02-01T00:00:00Z",
                      "current_period_end": "2026-03-01T00:00:00Z",
                      "order_id": "zord_1",
                      "renewal": {"order_id": "zord_2", "renews": "zsub_1"}}}

Statuses PENDING, ACTIVE, SUSPENDED, CANCELED and EXPIRED map one to one:
Zenofy states them outright. Renewals are paid by the buyer at the same
checkout, often under a new subscription id, so an order is the customer's
email and plan: a renewal paid with the same email extends the same
entitlement. The order that paid a period (`renewal.order_id`, or the
originating `order_id` on activation) is recorded as its payment, so an
`order_refunded` or `order_cancelled` of that order reaches it.

Orders (https://zenofy.io/doc/order-webhooks): `event`, `orderId`, `status`
(PAID, REFUNDED, CANCELLED), `totalAmount`, `currency`, `paymentGateway`,
`paymentReference`, `createdAt`, `paidAt`, `affiliateId`, `customer` (`name`,
`email`, `phoneNumber`) and `items` (`productId`, `productName`, `quantity`,
`unitPrice`, `totalPrice`, `currency`, `isBumpProduct`). They carry no event
id: a delivery is identified by a hash of its content.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from domain import lifecycle
from domain.catalog import Catalog, Offering, add_period
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
    listed,
    parse_time,
    ref,
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
ORDER_EVENTS = frozenset({"order_paid", "order_refunded", "order_cancelled"})
STATUSES = {
    "PENDING": "pending",
    "ACTIVE": "active",
    "SUSPENDED": "suspended",
    "CANCELED": "canceled",
    "EXPIRED": "expired",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    header = headers.get("x-zenofy-signature")
    if header is None and "x-webhook-secret" in headers:
        # What Zenofy sends: the product's webhook secret itself.
        if not same_signature(credentials.secret, headers["x-webhook-secret"].strip()):
            raise SignatureError("X-Webhook-Secret is not the source's secret")
        return
    scheme, _, given = (header or "").partition("=")
    if scheme != "sha256" or not given:
        raise SignatureError("needs 'X-Webhook-Secret' or 'X-Zenofy-Signature: sha256=<hex>'")
    expected = hmac.new(credentials.secret.encode(), body, hashlib.sha256).hexdigest()
    if not same_signature(expected, given.strip()):
        raise SignatureError("X-Zenofy-Signature does not match the payload")


def _is_order(payload: Mapping[str, Any]) -> bool:
    kind = payload.get("event")
    return isinstance(kind, str) and kind in ORDER_EVENTS


def _subscription(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    subscription = payload.get("subscription")
    if not isinstance(subscription, Mapping):
        raise Unmappable("Zenofy event has no subscription object")
    return subscription


def order_ref(email: str, plan: str) -> str:
    return f"{email.strip().lower()}/{plan}"


def routing_key(payload: Mapping[str, Any]) -> str:
    if _is_order(payload):
        order = payload.get("orderId")
        return f"order/{order}" if isinstance(order, str) and order else event_id(payload)
    subscription = payload.get("subscription")
    if isinstance(subscription, Mapping):
        email, plan = subscription.get("customer_email"), subscription.get("plan")
        if isinstance(email, str) and plan:
            return order_ref(email, str(plan))
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    if _is_order(payload):
        # Order webhooks have no id: a retry carries the same content.
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return "zo_" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return text_id(payload.get("id"))


def _time(value: Any, what: str) -> datetime | None:
    return parse_time(value, f"Zenofy {what}")


def _offering(product: str, catalog: Catalog) -> Offering | None:
    return catalog.for_price(NAME, product, None) or catalog.get(product)


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    if _is_order(payload):
        return _order(source, payload, catalog)
    kind = payload.get("event")
    if not isinstance(kind, str) or kind not in EVENTS or not event_id(payload):
        raise Unmappable(
            f"not a Zenofy subscription or order event: event {kind!r}, id {payload.get('id')!r}"
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
    offering = _offering(str(plan), catalog)
    if offering is None:
        raise Unmappable(f"plan {plan!r} maps to no offering in the catalog")
    quantity = subscription.get("quantity") or 1
    if not isinstance(quantity, int) or quantity < 1:
        raise Unmappable(f"Zenofy subscription has quantity {quantity!r}")
    start = _time(subscription.get("current_period_start"), "current_period_start")
    end = _time(subscription.get("current_period_end"), "current_period_end")
    line = Line(offering.sku, offering, quantity, start, end)
    order = order_ref(email, str(plan))
    customer = Customer(id=None, email=email.strip().lower())
    cause = Cause.provider(source, event_id(payload))
    # Zenofy states the period a payment bought outright: the snapshot
    # vouches for it, and an ACTIVE one after a suspension reinstates.
    commands: list[Command] = [
        OrderEvent(
            source,
            order,
            lifecycle.subscription(status, [line], start, end),
            (line,),
            cause,
            occurred_at,
            customer,
        )
    ]
    paid_by = _paying_order(kind, subscription)
    if paid_by is not None:
        # The order that paid this period, as its payment (one fact per
        # cause, hence its own): a refund or cancellation of that order
        # then reaches the entitlement.
        commands.append(
            OrderEvent(
                source,
                order,
                lifecycle.payment(paid_by, [line]),
                (line,),
                Cause.provider(source, f"{event_id(payload)}/order"),
                occurred_at,
                customer,
                payment_refs=(paid_by,),
                invoice=paid_by,
            )
        )
    return commands


def _paying_order(kind: str, subscription: Mapping[str, Any]) -> str | None:
    """The Zenofy order that paid the period an activation or renewal
    reports, or None."""
    if kind == "subscription.renewed":
        renewal = subscription.get("renewal")
        if isinstance(renewal, Mapping):
            found = ref(renewal.get("order_id"), "Zenofy renewal.order_id")
            if found:
                return found
        # A renewal pays, whether or not it names its order.
        return ref(subscription.get("id"), "Zenofy subscription id") or None
    if kind == "subscription.activated":
        return ref(subscription.get("order_id"), "Zenofy subscription order_id") or None
    return None


def _order(source: str, payload: Mapping[str, Any], catalog: Catalog) -> list[Command]:
    """An order webhook (https://zenofy.io/doc/order-webhooks). Paid, each
    line grants one period of its offering from `paidAt`; refunded (Zenofy
    refunds an order as a whole: no amount is sent) or cancelled after it
    was paid, the order's payment is revoked wherever it was recorded (a
    one-off order, or the subscription period it paid)."""
    kind = str(payload.get("event"))
    order = ref(payload.get("orderId"), "Zenofy orderId")
    if not order:
        raise Unmappable(f"Zenofy {kind} has no orderId")
    paid = _time(payload.get("paidAt"), "paidAt")
    cause = Cause.provider(source, event_id(payload))
    if kind != "order_paid":
        if paid is None:
            # Never paid: nothing was granted, so nothing to revoke.
            return []
        fact = (
            lifecycle.refund(True, order)
            if kind == "order_refunded"
            else lifecycle.ended("order_cancelled")
        )
        # Zenofy sends no time of the refund or cancellation: the payment's
        # own time stands for it (these facts are not ordered by time).
        return [PaymentEvent(source, (order,), fact, cause, paid)]
    if paid is None:
        raise Unmappable("Zenofy order_paid has no paidAt")
    customer = payload.get("customer")
    email = (
        ref(customer.get("email"), "Zenofy customer.email")
        if isinstance(customer, Mapping)
        else None
    )
    lines: dict[str, Line] = {}
    unmapped: list[str] = []
    for item in listed(payload.get("items"), "Zenofy items"):
        if not isinstance(item, Mapping):
            raise Unmappable(f"Zenofy item {item!r:.80} is not an object")
        product = ref(item.get("productId"), "Zenofy item productId")
        quantity = item.get("quantity", 1)
        if not product:
            raise Unmappable("Zenofy item has no productId")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 0:
            raise Unmappable(f"Zenofy item {product!r} has quantity {quantity!r}")
        offering = _offering(product, catalog)
        if offering is None:
            unmapped.append(f"product {product!r} maps to no offering in the catalog")
            continue
        if product in lines:  # the same product on two lines: one entitlement
            quantity += lines[product].quantity
        lines[product] = Line(product, offering, quantity, paid, add_period(paid, offering.period))
    commands: list[Command] = []
    if lines:
        commands.append(
            OrderEvent(
                source,
                f"order/{order}",
                lifecycle.payment(order, lines.values()),
                tuple(lines.values()),
                cause,
                paid,
                Customer(id=None, email=email.strip().lower() if email else None),
                payment_refs=(order,),
                invoice=order,
            )
        )
    if unmapped or not lines:
        raise Unmappable("; ".join(unmapped) or f"Zenofy order {order!r} has no items", commands)
    return commands


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    # X-Webhook-Secret is the secret itself: verified, never stored.
    headers=("x-zenofy-signature",),
)
