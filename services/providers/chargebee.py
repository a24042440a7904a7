"""Chargebee: webhooks authenticated by HTTP Basic auth (Chargebee signs no
body: https://www.chargebee.com/docs/2.0/webhook_settings.html#basic-authentication),
subscription, invoice and refund events
(https://apidocs.chargebee.com/docs/api/events#event_types).

Subscription snapshots are ordered by the subscription's `resource_version`
(milliseconds), which Chargebee bumps on every change. A plan is the slot
"plan" (one per subscription, kept across plan changes); an addon's slot is
its item price id. Product Catalog 1.0 subscriptions (`plan_id`,
`plan_quantity`, `addons[]`) map as 2.0 ones (`subscription_items[]`) do:
plans and addons by id under `prices.chargebee`
(https://apidocs.chargebee.com/docs/api/subscriptions?prod_cat_ver=1).

An invoice without `subscription_id` is a one-time invoice
(https://apidocs.chargebee.com/docs/api/invoices#create_an_invoice_for_items):
paid, each charge of it that maps to an offering is one period of that
offering from `paid_at`, on an order of its own (the invoice).
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
        "subscription_pause_scheduled",
        "subscription_scheduled_pause_removed",
        "subscription_resumption_scheduled",
        "subscription_scheduled_resumption_removed",
        "subscription_trial_extended",
        "subscription_cancellation_scheduled",
        "subscription_scheduled_cancellation_removed",
    }
)
#: Invoice statuses that mean its collection failed (https://apidocs.chargebee.com/docs/api/invoices#invoice_status).
UNPAID = frozenset({"payment_due", "not_paid"})
#: Subscription statuses (https://apidocs.chargebee.com/docs/api/subscriptions#subscription_status).
#: `paused` withholds access; a pause or resumption that is only
#: scheduled (`pause_date`, `resume_date` on a subscription still `active`
#: or `paused`) changes nothing until Chargebee reports it done.
STATUSES = {
    "future": "pending",
    "in_trial": "trialing",
    "active": "active",
    "non_renewing": "active",  # with a cancellation at the term end
    "paused": "paused",
    "cancelled": "canceled",
}
#: Invoice line entity types that bill a subscription's period: Product
#: Catalog 2.0 item prices and 1.0 plans and addons
#: (https://apidocs.chargebee.com/docs/api/invoices#invoice_line_items_entity_type).
PERIOD_LINES = frozenset({"plan_item_price", "addon_item_price", "plan", "addon"})
#: What a one-time invoice may sell: charges (2.0), addons (1.0 non-recurring
#: addons) and, exceptionally, plans. `adhoc` lines name no item, and
#: `plan_setup` fees grant nothing of their own.
ONE_TIME_LINES = PERIOD_LINES | {"charge_item_price"}
#: The refund transaction's payment method when Chargebee records an
#: automated chargeback (https://apidocs.chargebee.com/docs/api/transactions#transaction_payment_method).
CHARGEBACK = "chargeback"


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
    credit_note = _obj(payload, "credit_note")
    if credit_note is not None:
        return str(
            credit_note.get("subscription_id") or credit_note.get("reference_invoice_id") or ""
        )
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _time(value: Any, what: str, scale: int = 1) -> datetime | None:
    return None if value is None else from_unix(value, f"Chargebee {what}", scale)


def _ref(obj: Mapping[str, Any], field: str) -> str:
    return ref(obj.get(field), f"Chargebee {field}") or ""


def _amount(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _slot(item_type: Any, price_id: str) -> str:
    return "plan" if item_type in ("plan", "plan_item_price") else price_id


def _line(
    item_type: Any,
    price_id: Any,
    quantity: Any,
    catalog: Catalog,
    unmapped: list[str],
    start: datetime | None = None,
    end: datetime | None = None,
) -> Line | None:
    price = ref(price_id, "Chargebee item price id")
    if not price:
        raise Unmappable(f"Chargebee {item_type} item names no id")
    offering = catalog.for_price(NAME, price, None)
    if offering is None:
        unmapped.append(f"item price {price!r} maps to no offering in the catalog")
        return None
    return Line(_slot(item_type, price), offering, _quantity(quantity, price), start, end)


def _subscription_lines(
    subscription: Mapping[str, Any], catalog: Catalog, unmapped: list[str]
) -> list[Line]:
    """The items of a subscription: `subscription_items[]` (Product Catalog
    2.0), or `plan_id` with `plan_quantity` and `addons[]` (1.0). An emptied
    item (quantity 0) stays in the snapshot and grants nothing."""
    found: list[Line | None] = []
    items = subscription.get("subscription_items")
    if items is None and subscription.get("plan_id") is not None:
        found.append(
            _line(
                "plan",
                subscription["plan_id"],
                subscription.get("plan_quantity"),
                catalog,
                unmapped,
            )
        )
        for addon in listed(subscription.get("addons"), "Chargebee subscription addons"):
            if isinstance(addon, Mapping):
                found.append(
                    _line("addon", addon.get("id"), addon.get("quantity"), catalog, unmapped)
                )
    for item in listed(items, "Chargebee subscription_items"):
        if not isinstance(item, Mapping) or item.get("item_type") == "charge":
            continue
        found.append(
            _line(
                item.get("item_type"),
                item.get("item_price_id"),
                item.get("quantity"),
                catalog,
                unmapped,
            )
        )
    return [line for line in found if line is not None]


def _quantity(value: Any, price_id: str) -> int:
    quantity = 1 if value is None else value
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 0:
        raise Unmappable(f"Chargebee item price {price_id!r} has quantity {quantity!r}")
    return quantity


def _invoice_lines(
    invoice: Mapping[str, Any], catalog: Catalog, unmapped: list[str], one_time: bool
) -> list[Line]:
    """The items an invoice bills, one Line per slot. A subscription's
    invoice pays each line's `date_from`-`date_to`; a one-time invoice's
    lines carry no period of ours (its payment starts one)."""
    kinds = ONE_TIME_LINES if one_time else PERIOD_LINES
    lines: dict[str, Line] = {}
    for item in listed(invoice.get("line_items"), "Chargebee invoice line_items"):
        if not isinstance(item, Mapping):
            continue
        kind = ref(item.get("entity_type"), "Chargebee line entity_type")
        if kind not in kinds:
            continue
        start = end = None
        if not one_time:
            start = _time(item.get("date_from"), "line date_from")
            end = _time(item.get("date_to"), "line date_to")
        line = _line(
            kind,
            item.get("entity_id"),
            item.get("quantity"),
            catalog,
            unmapped,
            start,
            end,
        )
        if line is not None and line.quantity:
            lines[line.slot] = line
    return list(lines.values())


def _customer(payload: Mapping[str, Any]) -> Customer | None:
    customer = _obj(payload, "customer")
    if customer is None:
        return None
    return Customer(
        id=ref(customer.get("id"), "Chargebee customer id"),
        email=ref(customer.get("email"), "Chargebee customer email"),
    )


def _invoice_commands(
    source: str,
    payload: Mapping[str, Any],
    invoice: Mapping[str, Any],
    kind: str,
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    unmapped: list[str],
) -> list[Command]:
    """What an invoice in an event's content says: paid, it moves the
    paid-through date (and is what a later refund names, with its
    `amount_paid`); not paid (a renewal whose collection failed), the new
    term is unpaid and the subscription overdue; voided or written off, it
    is owed no more. A one-time invoice, paid, grants one period of each
    offering it sells; one that sells nothing we map is unmappable."""
    invoice_id = _ref(invoice, "id")
    if not invoice_id:
        raise Unmappable("Chargebee invoice has no id")
    subscription = _ref(invoice, "subscription_id") or None
    status = ref(invoice.get("status"), "Chargebee invoice status")
    one_time = subscription is None
    order = subscription or invoice_id
    if status == "voided" or (_amount(invoice.get("write_off_amount")) or 0) > 0:
        if one_time:
            return []  # a one-time invoice never paid granted nothing
        # Written off, it is marked paid with nothing collected: no payment.
        how = "voided" if status == "voided" else "uncollectible"
        return [
            OrderEvent(
                source, order, lifecycle.written_off(invoice_id, how), (), cause, occurred_at
            )
        ]
    paid = status == "paid"
    if not (paid or status in UNPAID or kind == "payment_failed"):
        return []  # pending or posted: nothing collected or failed yet
    lines = _invoice_lines(invoice, catalog, unmapped, one_time)
    if one_time and paid and not lines and not unmapped:
        raise Unmappable(
            f"Chargebee one-time invoice {invoice_id!r} sells no charge, addon or plan"
            " that maps to an offering"
        )
    if not lines or (one_time and not paid):
        return []  # a failure to pay for nothing that grants anything
    if paid:
        paid_at = _time(invoice.get("paid_at"), "invoice paid_at") or occurred_at
        amount = _amount(invoice.get("amount_paid"))
        fact = lifecycle.payment(
            invoice_id,
            lines,
            starts=paid_at if one_time else None,
            amount=None if amount is None else str(amount),
        )
    else:
        fact = lifecycle.payment_failed(invoice_id, lines)
    return [
        OrderEvent(
            source,
            order,
            fact,
            tuple(lines),
            cause,
            occurred_at,
            _customer(payload),
            invoice=invoice_id if paid else None,
        )
    ]


def _refunded(
    source: str, payload: Mapping[str, Any], cause: Cause, occurred_at: datetime
) -> list[Command]:
    """`payment_refunded`: a refund transaction (`transaction.type` refund)
    against an invoice, with the credit note it refunds
    (https://apidocs.chargebee.com/docs/api/events#event_types). It returns
    the whole invoice when its `amount` reaches the invoice's `amount_paid`;
    otherwise it is recorded, and refunds of one invoice add up (each by its
    transaction id). A refund recorded with payment method `chargeback` is
    Chargebee's record of a chargeback, made when the gateway reports it
    initiated (https://www.chargebee.com/docs/payments/configuring-chargeback-management.html):
    a dispute, open, on the charged-back payment."""
    transaction = _obj(payload, "transaction") or {}
    invoice = _obj(payload, "invoice") or {}
    credit_note = _obj(payload, "credit_note") or {}
    invoice_id = (
        _ref(invoice, "id")
        or _ref(credit_note, "reference_invoice_id")
        or _linked_invoice(transaction)
    )
    if not invoice_id:
        raise Unmappable("Chargebee refund names no invoice (invoice, credit note or transaction)")
    order = (
        _ref(invoice, "subscription_id")
        or _ref(credit_note, "subscription_id")
        or _ref(transaction, "subscription_id")
        or invoice_id  # a one-time invoice is its own order
    )
    refund_id = _ref(transaction, "id")
    amount = _amount(transaction.get("amount"))
    if amount is None:
        amount = _amount(credit_note.get("amount_refunded")) or _amount(credit_note.get("total"))
    if not refund_id or amount is None:
        raise Unmappable("Chargebee refund transaction has no id or amount")
    if transaction.get("payment_method") == CHARGEBACK:
        charged_back = (
            _ref(transaction, "refunded_txn_id")
            or _ref(transaction, "reference_transaction_id")
            or refund_id
        )
        fact = lifecycle.dispute(charged_back, "open", invoice_id)
    else:
        paid = _amount(invoice.get("amount_paid")) or _amount(invoice.get("total"))
        # Judged here when the invoice says what was paid; else by the fold,
        # adding up this invoice's refunds against its payment's amount.
        full = True if paid and amount >= paid else None
        fact = lifecycle.refund(
            full,
            invoice_id,
            amount=str(amount),
            refund_id=refund_id,
            failed=transaction.get("status") in ("failure", "voided", "timeout"),
        )
    return [OrderEvent(source, order, fact, (), cause, occurred_at, _customer(payload))]


def _linked_invoice(transaction: Mapping[str, Any]) -> str:
    for note in listed(transaction.get("linked_credit_notes"), "Chargebee linked_credit_notes"):
        if isinstance(note, Mapping) and note.get("cn_reference_invoice_id"):
            return _ref(note, "cn_reference_invoice_id")
    return ""


def _snapshot(
    source: str,
    payload: Mapping[str, Any],
    subscription: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    occurred_at: datetime,
    unmapped: list[str],
) -> OrderEvent:
    status = subscription.get("status")
    sub_status = STATUSES.get(str(status))
    if not subscription.get("id") or sub_status is None:
        raise Unmappable(f"Chargebee subscription has status {status!r}")
    lines = _subscription_lines(subscription, catalog, unmapped)
    end = _time(subscription.get("current_term_end"), "current_term_end")
    cancel_at = _time(subscription.get("cancelled_at"), "cancelled_at")
    if status == "non_renewing":
        cancel_at = cancel_at or end
    # Read so that a corrupt one is a dead letter naming it; a scheduled
    # pause or resumption changes access only when Chargebee carries it out
    # (subscription_paused, subscription_resumed), not on the date we expect.
    _time(subscription.get("pause_date"), "pause_date")
    _time(subscription.get("resume_date"), "resume_date")
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
    return OrderEvent(
        source,
        _ref(subscription, "id"),
        fact,
        tuple(lines),
        cause,
        version or occurred_at,
        _customer(payload),
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
    if kind == "payment_refunded":
        return _refunded(source, payload, cause, occurred_at)
    subscription = _obj(payload, "subscription")
    invoice = _obj(payload, "invoice")
    unmapped: list[str] = []
    commands: list[Command] = []
    if invoice is not None:
        # An event may carry a subscription and an invoice: each is a fact of
        # its own (the invoice's under the event id + "/invoice", since an
        # entitlement keeps one fact per cause).
        invoice_cause = (
            Cause.provider(source, f"{event_id(payload)}/invoice") if subscription else cause
        )
        commands += _invoice_commands(
            source, payload, invoice, kind, catalog, invoice_cause, occurred_at, unmapped
        )
    if kind in SUBSCRIPTION_EVENTS and subscription is not None:
        commands.append(
            _snapshot(source, payload, subscription, catalog, cause, occurred_at, unmapped)
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
