"""Paddle Billing: `Paddle-Signature: ts=…;h1=…` and subscription,
transaction and adjustment events (the mapping table is in the README's
"Paddle Billing" section).

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
TRANSACTION_EVENTS = frozenset(
    {"transaction.completed", "transaction.paid", "transaction.payment_failed"}
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
        # An adjustment of a one-off purchase goes with its transaction.
        return str(
            data.get("subscription_id") or data.get("transaction_id") or data.get("id") or ""
        )
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


def _amount(value: Any, what: str) -> str | None:
    """A Paddle amount: a string of an integer in the currency's lowest
    unit (https://developer.paddle.com/api-reference/about/data-types);
    anything else makes the event unmappable, naming the field."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.lstrip("-").isdigit():
        raise Unmappable(f"Paddle {what} {value!r:.80} is not an amount in minor units")
    return value


def _transaction_total(transaction: Mapping[str, Any]) -> str | None:
    """What the buyer paid: `details.totals.grand_total` (a full adjustment
    returns the grand total: https://developer.paddle.com/api-reference/adjustments/overview),
    else `total`."""
    details = transaction.get("details")
    totals = details.get("totals") if isinstance(details, Mapping) else None
    if not isinstance(totals, Mapping):
        return None
    return _amount(totals.get("grand_total"), "details.totals.grand_total") or _amount(
        totals.get("total"), "details.totals.total"
    )


def _subscription(
    source: str,
    data: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    customer: Customer,
) -> list[Command]:
    """A subscription snapshot (https://developer.paddle.com/api-reference/subscriptions/overview).
    Its `scheduled_change` is read, not guessed: action `cancel` ends
    access at `effective_at`, action `pause` suspends it then (Paddle keeps
    the subscription `active` until that date:
    https://developer.paddle.com/build/subscriptions/pause-subscriptions);
    `resume` changes nothing until Paddle resumes it (`subscription.resumed`)."""
    unmapped: list[str] = []
    subscription_id = ref(data.get("id"), "Paddle subscription id")
    status = STATUSES.get(str(data.get("status")))
    if not subscription_id or status is None:
        raise Unmappable(
            f"Paddle subscription has id {subscription_id!r}, status {data.get('status')!r}"
        )
    lines = _lines(data.get("items"), catalog, unmapped)
    start, end = _period(data.get("current_billing_period"), "current_billing_period")
    change = data.get("scheduled_change")
    cancel_at = pause_at = None
    if change is not None and not isinstance(change, Mapping):
        raise Unmappable(f"Paddle scheduled_change {change!r:.80} is not an object")
    if change is not None:
        action = change.get("action")
        effective_at = _time(change.get("effective_at"), "scheduled_change.effective_at")
        if action in ("cancel", "pause") and effective_at is None:
            raise Unmappable(f"Paddle scheduled_change {action!r} has no effective_at")
        if action == "cancel":
            cancel_at = effective_at
        elif action == "pause":
            pause_at = effective_at
        elif action != "resume":
            raise Unmappable(f"Paddle scheduled_change action {action!r} is not known")
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
            pause_at=pause_at,
        )
    command = OrderEvent(source, subscription_id, fact, tuple(lines), cause, occurred_at, customer)
    return _finish([command], unmapped)


def _transaction(
    source: str,
    kind: str,
    data: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    customer: Customer,
) -> list[Command]:
    """A paid or failed transaction (https://developer.paddle.com/api-reference/transactions/overview).
    Its id is the payment's reference: adjustments name it as
    `transaction_id`. One without `subscription_id` is a one-off purchase
    (https://developer.paddle.com/build/transactions/create-transaction):
    its order is the transaction, and each item gets one period of its
    offering from when it was billed, as Lemon Squeezy orders and Stripe's
    one-off invoices do."""
    unmapped: list[str] = []
    transaction_id = ref(data.get("id"), "Paddle transaction id")
    subscription_id = ref(data.get("subscription_id"), "Paddle subscription_id")
    if not transaction_id:
        raise Unmappable("Paddle transaction has no id")
    paid = kind != "transaction.payment_failed"
    if not subscription_id:
        if not paid:
            return []  # a one-off checkout not paid (yet) grants nothing
        lines = _lines(data.get("items"), catalog, unmapped)
        if not lines:
            raise Unmappable(
                "; ".join(unmapped) or "Paddle one-off transaction has no item that grants anything"
            )
        billed_at = _time(data.get("billed_at"), "billed_at") or occurred_at
        fact = lifecycle.payment(
            transaction_id, lines, starts=billed_at, amount=_transaction_total(data)
        )
        command = OrderEvent(
            source,
            transaction_id,
            fact,
            tuple(lines),
            cause,
            occurred_at,
            customer,
            payment_refs=(transaction_id,),
            invoice=transaction_id,
        )
        return _finish([command], unmapped)
    start, end = _period(data.get("billing_period"), "billing_period")
    lines = _lines(data.get("items"), catalog, unmapped, start, end)
    commands: list[Command] = []
    if lines:
        fact = (
            lifecycle.payment(transaction_id, lines, amount=_transaction_total(data))
            if paid
            else lifecycle.payment_failed(transaction_id, lines)
        )
        commands.append(
            OrderEvent(
                source,
                subscription_id,
                fact,
                tuple(lines),
                cause,
                occurred_at,
                customer,
                payment_refs=(transaction_id,) if paid else (),
                invoice=transaction_id,
            )
        )
    return _finish(commands, unmapped)


#: Adjustment actions that return money, judged full or partial by amount.
#: `chargeback_warning`: on a pre-chargeback alert Paddle refunds the
#: payment itself to avoid the chargeback
#: (https://www.paddle.com/help/manage/risk-prevention/understanding-chargebacks-with-paddle).
REFUND_ACTIONS = frozenset({"refund", "chargeback_warning"})
#: Adjustments with no bearing on access: credits lower what a manually
#: collected transaction still owes, before it is paid.
IGNORED_ACTIONS = frozenset({"credit", "credit_reverse"})


def _adjustment(
    source: str, data: Mapping[str, Any], cause: Cause, occurred_at: datetime
) -> list[Command]:
    """`adjustment.created` / `.updated` (https://developer.paddle.com/api-reference/adjustments/overview):
    money back on a transaction, which reaches the order through the
    payment that transaction was (`transaction_id`).

    - `refund` (and `chargeback_warning`, a refund Paddle makes itself)
      once `approved`: full when its `type` is `full` or its total is the
      transaction's grand total, else recorded only; `reversed` or
      `rejected`, it refunds nothing. `pending_approval` waits for Paddle.
    - `chargeback` (Paddle was charged back and contests it): the
      entitlement is suspended as disputed; `chargeback_reverse` (Paddle
      won) reinstates it. Paddle sends nothing when it loses: the
      chargeback stands and the entitlement stays suspended."""
    adjustment_id = ref(data.get("id"), "Paddle adjustment id")
    transaction_id = ref(data.get("transaction_id"), "Paddle adjustment transaction_id")
    action, status = data.get("action"), data.get("status")
    if not adjustment_id or not transaction_id:
        raise Unmappable("Paddle adjustment needs an id and a transaction_id")
    if action in IGNORED_ACTIONS or status == "pending_approval":
        return []
    if status not in ("approved", "rejected", "reversed"):
        raise Unmappable(f"Paddle adjustment status {status!r} is not known")
    undone = status != "approved"
    if action in REFUND_ACTIONS or action == "chargeback_warning_reverse":
        totals = data.get("totals")
        amount = _amount(
            totals.get("total") if isinstance(totals, Mapping) else None, "adjustment totals.total"
        )
        # A warning and its reversal name neither each other nor a refund:
        # the transaction ties them (Paddle keeps one warning per payment).
        warning = f"chargeback_warning/{transaction_id}"
        fact = lifecycle.refund(
            True if data.get("type") == "full" else None,
            transaction_id,
            amount,
            refund_id=adjustment_id if action == "refund" else warning,
            failed=undone or action == "chargeback_warning_reverse",
        )
    elif action in ("chargeback", "chargeback_reverse"):
        # A chargeback and its reversal are separate adjustments: the
        # transaction is what they share.
        won = action == "chargeback_reverse" or undone
        fact = lifecycle.dispute(
            f"chargeback/{transaction_id}", "won" if won else "open", transaction_id
        )
    else:
        raise Unmappable(f"Paddle adjustment action {action!r} is not known")
    return [PaymentEvent(source, (transaction_id,), fact, cause, occurred_at)]


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
    customer = Customer(id=ref(data.get("customer_id"), "Paddle customer_id"), email=None)
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription(source, data, catalog, cause, occurred_at, customer)
    if kind in TRANSACTION_EVENTS:
        return _transaction(source, kind, data, catalog, cause, occurred_at, customer)
    if kind in ("adjustment.created", "adjustment.updated"):
        return _adjustment(source, data, cause, occurred_at)
    return []


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("paddle-signature",),
)
