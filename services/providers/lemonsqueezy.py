"""Lemon Squeezy: `X-Signature` (hex HMAC-SHA256 of the raw body with the
webhook's signing secret, https://docs.lemonsqueezy.com/help/webhooks/signing-requests),
JSON:API payloads named by `meta.event_name`
(https://docs.lemonsqueezy.com/help/webhooks/event-types).

Lemon Squeezy sends no event id and no timestamp header, so a delivery is
identified by a hash of its content (a retry carries the same bytes'
meaning), and events are ordered by the object's `updated_at`.

One purchase is one Lemon Squeezy *order*: the order and its subscription
arrive as separate events, and both land on the order (subscriptions carry
`order_id`), as one entitlement. Subscription invoices name only their
subscription: they reach the order through the link the subscription's own
events record (`subscription/<id>`), waiting for it if they come first.
They name no period either: a paid one pays the period the subscription
states (`renews_at`), and the newest is the current period's.

Money back: `order_refunded` and `subscription_payment_refunded` carry the
object's `total` and `refunded_amount` (cents); all of it is a full refund.
Lemon Squeezy is the merchant of record and handles chargebacks itself: it
sends no webhook for them.
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
#: https://docs.lemonsqueezy.com/help/webhooks/event-types
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
        "subscription_payment_refunded",
    }
)
ORDER_EVENTS = frozenset({"order_created", "order_refunded"})
#: Events that say nothing about access: Lemon Squeezy's own license keys
#: and affiliates (https://docs.lemonsqueezy.com/help/webhooks/event-types).
IGNORED_EVENTS = frozenset({"license_key_created", "license_key_updated", "affiliate_activated"})
#: Subscription statuses (https://docs.lemonsqueezy.com/api/subscriptions/the-subscription-object)
#: as the fold names them; `paused` is read with its `pause.mode`.
STATUSES = {
    "on_trial": "trialing",
    "active": "active",
    "paused": "paused",
    "past_due": "past_due",
    "unpaid": "unpaid",
    "cancelled": "active",  # canceled, but paid until ends_at (a scheduled cancellation)
    "expired": "expired",
}
#: Invoices that pay a period (`billing_reason`); `updated` is a proration
#: charged on a plan change, which pays for no period of its own.
PERIOD_BILLING_REASONS = frozenset({"initial", "renewal"})


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


def _cents(value: Any, what: str) -> int:
    """An amount in cents (Lemon Squeezy's `total`, `refunded_amount`)."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Unmappable(f"Lemon Squeezy {what} {value!r:.80} is not an amount in cents")
    return value


def _refunded_in_full(attributes: Mapping[str, Any]) -> bool:
    """Whether an order or subscription invoice has been refunded in full:
    `refunded_amount` against `total` (both in cents,
    https://docs.lemonsqueezy.com/api/orders/the-order-object and
    /api/subscription-invoices/the-subscription-invoice-object); a free
    one (total 0) by its status `refunded` ("fully refunded")."""
    total = _cents(attributes.get("total"), "total")
    refunded = _cents(attributes.get("refunded_amount"), "refunded_amount")
    if total == 0:
        return attributes.get("status") == "refunded"
    return refunded >= total


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


def _subscription_state(
    attributes: Mapping[str, Any],
) -> tuple[str, datetime | None, datetime | None]:
    """(status as the fold names it, paid-through end, cancellation date) of
    a subscription object, https://docs.lemonsqueezy.com/api/subscriptions/the-subscription-object.

    `cancelled`: still paid until `ends_at`, when it ends. `paused` is read
    with its `pause.mode`: `void` halts the service (suspended), `free`
    keeps it while payment collection is halted (active, through the later
    of `renews_at` and `resumes_at`)."""
    raw = attributes.get("status")
    status = STATUSES.get(str(raw))
    if status is None:
        raise Unmappable(f"Lemon Squeezy subscription status {raw!r}")
    trial_end = _time(attributes.get("trial_ends_at"), "trial_ends_at")
    ends_at = _time(attributes.get("ends_at"), "ends_at")
    renews_at = _time(attributes.get("renews_at"), "renews_at")
    if raw == "cancelled":
        return status, ends_at, ends_at
    if raw == "expired" and attributes.get("cancelled"):
        return "canceled", ends_at, None  # the grace period after a cancellation ran out
    if raw == "on_trial":
        return status, trial_end, None
    if raw == "paused":
        pause = attributes.get("pause")
        mode = pause.get("mode") if isinstance(pause, Mapping) else None
        if mode == "void":
            return "paused", renews_at, None
        if mode != "free" or not isinstance(pause, Mapping):
            raise Unmappable(f"Lemon Squeezy paused subscription pause.mode {mode!r:.80}")
        resumes_at = _time(pause.get("resumes_at"), "pause.resumes_at")
        ends = [moment for moment in (renews_at, resumes_at) if moment is not None]
        return "active", max(ends) if ends else None, None
    return status, renews_at, None


def _subscription_event(
    source: str,
    object_id: str,
    attributes: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    customer: Customer,
) -> OrderEvent:
    order = ref(attributes.get("order_id"), "Lemon Squeezy order_id", numbers=True)
    if order is None or not object_id:
        raise Unmappable("Lemon Squeezy subscription has no id or order_id")
    item = attributes.get("first_subscription_item")
    quantity = item.get("quantity") if isinstance(item, Mapping) else 1
    line = _offering_line(attributes.get("variant_id"), catalog, quantity)
    status, end, cancel_at = _subscription_state(attributes)
    fact = lifecycle.subscription(
        status,
        [line],
        None,
        end,
        trial_end=_time(attributes.get("trial_ends_at"), "trial_ends_at"),
        cancel_at=cancel_at,
        # Cancelled (paid until ends_at) is a cancellation all the same: it
        # mints nothing for a subscription never seen.
        final=attributes.get("status") == "cancelled",
    )
    # One that is over mints nothing for an order never seen: the fold
    # keeps the fact on the order (`lifecycle.terminal`).
    return OrderEvent(
        source,
        f"order/{order}",
        fact,
        (line,),
        cause,
        occurred_at,
        customer,
        payment_refs=(f"subscription/{object_id}",),
    )


def _invoice_event(
    name: str,
    source: str,
    object_id: str,
    attributes: Mapping[str, Any],
    cause: Cause,
    occurred_at: datetime,
) -> PaymentEvent:
    """A subscription invoice (https://docs.lemonsqueezy.com/api/subscription-invoices):
    it names only its subscription, and reaches the order through it."""
    subscription = ref(
        attributes.get("subscription_id"), "Lemon Squeezy subscription_id", numbers=True
    )
    if subscription is None or not object_id:
        raise Unmappable("Lemon Squeezy subscription invoice has no id or subscription_id")
    invoice = f"invoice/{object_id}"
    total = _cents(attributes.get("total"), "total")
    if name == "subscription_payment_refunded":
        refunded = _cents(attributes.get("refunded_amount"), "refunded_amount")
        fact = lifecycle.refund(_refunded_in_full(attributes), invoice, amount=str(refunded))
    elif name == "subscription_payment_failed":
        fact = lifecycle.payment_failed(invoice, [])
    else:
        # It names no period: it pays the one the subscription states
        # (`renews_at`), unless it is a proration, which pays none.
        fact = lifecycle.payment(
            invoice,
            [],
            amount=str(total),
            subscription_period=str(attributes.get("billing_reason")) in PERIOD_BILLING_REASONS,
        )
    return PaymentEvent(source, (f"subscription/{subscription}",), fact, cause, occurred_at)


def _order_event(
    name: str,
    source: str,
    object_id: str,
    attributes: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    customer: Customer,
) -> list[Command]:
    """An order (https://docs.lemonsqueezy.com/api/orders): a one-off sale,
    or the first payment of a subscription, which looks the same."""
    item = attributes.get("first_order_item")
    if not object_id or not isinstance(item, Mapping):
        raise Unmappable("Lemon Squeezy order has no id or first_order_item")
    order = f"order/{object_id}"
    if name == "order_refunded":
        refunded = _cents(attributes.get("refunded_amount"), "refunded_amount")
        fact = lifecycle.refund(_refunded_in_full(attributes), order, amount=str(refunded))
        return [OrderEvent(source, order, fact, (), cause, occurred_at)]
    if attributes.get("status") != "paid":
        return []  # pending or failed: nothing is paid yet
    created = _time(attributes.get("created_at"), "created_at") or occurred_at
    line = _offering_line(item.get("variant_id"), catalog, item.get("quantity"))
    # A one-off order is paid for one period of its offering (perpetual: a
    # long one); a subscription's order yields to the period it states.
    line = Line(
        SLOT, line.offering, line.quantity, created, add_period(created, line.offering.period)
    )
    fact = lifecycle.payment(
        order,
        [line],
        amount=str(_cents(attributes.get("total"), "total")),
        subscription_period=True,
    )
    return [OrderEvent(source, order, fact, (line,), cause, occurred_at, customer, invoice=order)]


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    name = _event_name(payload)
    if name in IGNORED_EVENTS:
        return []
    if name not in SUBSCRIPTION_EVENTS | INVOICE_EVENTS | ORDER_EVENTS:
        raise Unmappable(f"Lemon Squeezy event {name!r:.80} is not one this adapter reads")
    object_id, attributes = _data(payload)
    cause = Cause.provider(source, event_id(payload))
    occurred_at = _time(attributes.get("updated_at") or attributes.get("created_at"), "updated_at")
    if occurred_at is None:
        raise Unmappable("Lemon Squeezy object has neither updated_at nor created_at")
    if name in INVOICE_EVENTS:
        return [_invoice_event(name, source, object_id, attributes, cause, occurred_at)]
    customer = Customer(
        id=ref(attributes.get("customer_id"), "Lemon Squeezy customer_id", numbers=True),
        email=ref(attributes.get("user_email"), "Lemon Squeezy user_email") or None,
    )
    if name in SUBSCRIPTION_EVENTS:
        return [
            _subscription_event(
                source, object_id, attributes, catalog, cause, occurred_at, customer
            )
        ]
    return _order_event(name, source, object_id, attributes, catalog, cause, occurred_at, customer)


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("x-signature", "x-event-name"),
)
