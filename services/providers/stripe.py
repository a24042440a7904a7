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
from datetime import datetime
from typing import Any

from domain import lifecycle
from domain.catalog import Catalog, Offering
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
    from_unix,
    ref,
    same_signature,
    text_id,
)

TOLERANCE_SECONDS = 300
PAYMENT_EVENTS = frozenset({"invoice.paid", "invoice.payment_succeeded"})
#: Invoices that bill a subscription period (https://docs.stripe.com/api/invoices/object#invoice_object-billing_reason).
PERIOD_BILLING_REASONS = frozenset({"subscription_create", "subscription_cycle", "subscription"})
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "customer.subscription.deleted",
    }
)


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
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
    tolerance = credentials.tolerance_seconds or TOLERANCE_SECONDS
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"Stripe-Signature timestamp is outside the {tolerance:g} s tolerance")
    # Stripe keys the HMAC with the literal `whsec_…` string, not its decoding.
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(credentials.secret.encode(), signed, hashlib.sha256).hexdigest()
    if not any(same_signature(expected, candidate) for candidate in candidates):
        raise SignatureError("no v1 signature in Stripe-Signature matches the payload")


def _object(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        raise Unmappable("Stripe event has no data.object")
    return obj


def _id(value: Any, what: str = "Stripe reference") -> str | None:
    """A Stripe reference, whether left as an id or expanded into an object;
    anything else makes the event unmappable (see `providers.ref`)."""
    if isinstance(value, Mapping):
        if not isinstance(value.get("id"), str):
            raise Unmappable(f"{what} {dict(value)!r:.80} is an object without an id")
        value = value["id"]
    return ref(value, what)


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
        elif obj.get("object") == "charge":
            key = _id(obj.get("invoice")) or _id(obj.get("payment_intent")) or _id(obj.get("id"))
        elif obj.get("object") == "checkout.session":
            key = (
                _id(obj.get("subscription"))
                or _id(obj.get("invoice"))
                or _id(obj.get("payment_intent"))
                or _id(obj.get("id"))
            )
        elif obj.get("object") == "dispute":
            key = _id(obj.get("payment_intent")) or _id(obj.get("charge"))
        else:
            key = _id(obj.get("subscription")) or _id(obj.get("id"))
        if key:
            return key
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _line_price(line: Mapping[str, Any]) -> Any:
    """An invoice line's price: an id (current API) or an object with metadata."""
    price: Any = line.get("price")
    pricing = line.get("pricing")
    if isinstance(pricing, Mapping):
        details = pricing.get("price_details")
        if isinstance(details, Mapping) and details.get("price") is not None:
            price = details.get("price")
    if price is None and isinstance(line.get("plan"), Mapping):
        price = line["plan"]
    return price


def _is_proration(line: Mapping[str, Any]) -> bool:
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        for details in parent.values():
            if isinstance(details, Mapping) and details.get("proration"):
                return True
    return bool(line.get("proration"))


def _timestamp(value: Any, what: str) -> datetime:
    return from_unix(value, f"Stripe {what}")


def _optional_timestamp(value: Any, what: str) -> datetime | None:
    return None if value is None else _timestamp(value, what)


def _line_item(line: Mapping[str, Any]) -> str | None:
    """The subscription item an invoice line bills, in either shape."""
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        details = parent.get("subscription_item_details")
        if isinstance(details, Mapping) and _id(details.get("subscription_item")):
            return _id(details.get("subscription_item"))
    return _id(line.get("subscription_item"))


def _quantity(value: Any, where: str) -> int:
    """An item's quantity; 0 is allowed (an emptied item grants nothing)."""
    quantity = 1 if value is None else value
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 0:
        raise Unmappable(f"Stripe {where} has quantity {quantity!r}")
    return quantity


def _offering(price: Any, catalog: Catalog, unmapped: list[str]) -> Offering | None:
    price_id, sku = _price(price)
    if price_id is None and sku is None:
        unmapped.append("an item names no price")
        return None
    offering = catalog.for_price("stripe", price_id, sku)
    if offering is None:
        wanted = f"offering_sku {sku!r}" if sku else f"price {price_id!r}"
        unmapped.append(f"{wanted} maps to no offering in the catalog")
    return offering


def _price(price: Any) -> tuple[str | None, str | None]:
    """(price id, offering_sku from the price's metadata)."""
    sku = None
    if isinstance(price, Mapping):
        metadata = price.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("offering_sku"):
            sku = str(metadata["offering_sku"])
    return _id(price, "Stripe price"), sku


def _invoice_lines(
    invoice: Mapping[str, Any], catalog: Catalog, unmapped: list[str], one_off: bool
) -> list[Line]:
    """The items an invoice pays for, one Line per subscription item.
    Proration lines (the difference a mid-period change costs) and lines of
    quantity 0 grant nothing and are left out. A one-off invoice's lines
    carry no period: the payment starts one."""
    lines_list = invoice.get("lines")
    raw_lines = lines_list.get("data") if isinstance(lines_list, Mapping) else None
    if not isinstance(raw_lines, list) or (not raw_lines and not _truncated(invoice)):
        raise Unmappable("Stripe invoice has no lines.data")
    by_slot: dict[str, Line] = {}
    for line in raw_lines:
        if not isinstance(line, Mapping) or _is_proration(line):
            continue
        where = f"invoice line {line.get('id')!r}"
        quantity = _quantity(line.get("quantity"), where)
        if quantity == 0:
            continue
        offering = _offering(_line_price(line), catalog, unmapped)
        if offering is None:
            continue
        start = end = None
        if not one_off:
            period = line.get("period")
            if not isinstance(period, Mapping):
                raise Unmappable(f"Stripe {where} has no period")
            start = _timestamp(period.get("start"), "line period start")
            end = _timestamp(period.get("end"), "line period end")
        slot = _line_item(line) or offering.sku
        previous = by_slot.get(slot)
        by_slot[slot] = Line(
            slot=slot,
            offering=offering,
            quantity=quantity + (previous.quantity if previous else 0),
            period_start=start,
            period_end=end,
        )
    return list(by_slot.values())


def _truncated(invoice: Mapping[str, Any]) -> bool:
    """Whether the webhook carries only the first page of the invoice's
    lines (Stripe embeds at most 10: https://docs.stripe.com/api/invoices/object#invoice_object-lines)."""
    lines_list = invoice.get("lines")
    return isinstance(lines_list, Mapping) and lines_list.get("has_more") is True


def _cause(source: str, payload: Mapping[str, Any]) -> Cause:
    return Cause.provider(source, event_id(payload))


def _created(payload: Mapping[str, Any]) -> datetime:
    return _timestamp(payload.get("created"), "event created")


def _finish(commands: list[Command], unmapped: list[str], what: str) -> list[Command]:
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    if not commands:
        raise Unmappable(f"Stripe {what} has no item of quantity 1 or more")
    return commands


def _invoice_event(
    source: str, kind: str, payload: Mapping[str, Any], catalog: Catalog
) -> list[Command]:
    """A paid or failed invoice. Paid, it moves the paid-through date of
    the items it bills and links its payment ids (payment intent, charge,
    the invoice itself) to the order, for refunds and disputes to find,
    even when it grants nothing new (only prorations, or items of quantity
    0). One without a subscription is a one-off purchase: its order is the
    invoice, and each item gets one period of its offering from the payment."""
    invoice = _object(payload)
    invoice_id = _id(invoice.get("id"))
    subscription = _invoice_subscription(invoice)
    order_ref = subscription or invoice_id
    if not order_ref or not invoice_id:
        raise Unmappable("Stripe invoice has neither a subscription nor an id")
    paid = kind in PAYMENT_EVENTS
    unmapped: list[str] = []
    one_off = subscription is None
    lines = _invoice_lines(invoice, catalog, unmapped, one_off)
    # Only an invoice that bills a period pays for what it leaves out; an
    # update's invoice (prorations of a seat change) pays for no period.
    truncated = (
        _truncated(invoice)
        and not one_off
        and invoice.get("billing_reason") in PERIOD_BILLING_REASONS
    )
    if not lines and (one_off or not paid) and not truncated:
        if unmapped:
            raise Unmappable("; ".join(unmapped))
        if not paid:
            return []  # a failure to pay for nothing that grants anything
        raise Unmappable(
            "Stripe one-off invoice has no item that grants anything"
            " (only prorations or quantity 0)"
        )
    amount = invoice.get("amount_paid")
    if paid:
        paid_at = _paid_at(invoice) or _created(payload)
        fact = lifecycle.payment(
            invoice_id,
            lines,
            starts=paid_at if one_off else None,
            amount=str(amount)
            if isinstance(amount, int) and not isinstance(amount, bool)
            else None,
            rest_of_subscription=truncated,
        )
    else:
        fact = lifecycle.payment_failed(invoice_id, lines)
    command = OrderEvent(
        source=source,
        order_ref=order_ref,
        fact=fact,
        lines=tuple(lines),
        cause=_cause(source, payload),
        occurred_at=_created(payload),
        customer=Customer(
            id=_id(invoice.get("customer")), email=invoice.get("customer_email") or None
        ),
        payment_refs=_payment_refs(invoice, invoice_id) if paid else (),
        invoice=invoice_id,
    )
    if unmapped:
        raise Unmappable("; ".join(unmapped), [command])
    return [command]


def _paid_at(invoice: Mapping[str, Any]) -> datetime | None:
    transitions = invoice.get("status_transitions")
    if isinstance(transitions, Mapping) and transitions.get("paid_at") is not None:
        return _timestamp(transitions["paid_at"], "status_transitions.paid_at")
    return None


def _payment_refs(invoice: Mapping[str, Any], invoice_id: str) -> tuple[str, ...]:
    """The id refunds and disputes will name this payment by: its payment
    intent (or, without one, its charge), on the invoice before
    2025-03-31.basil and since then in `payments` when expanded; else the
    invoice itself, which `invoice_payment.paid` links to its payment
    intent later. One id each: every id is an aggregate to store."""
    refs = list(_refs(invoice, "payment_intent") or _refs(invoice, "charge"))
    payments = invoice.get("payments")
    data = payments.get("data") if isinstance(payments, Mapping) else None
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("payment"), Mapping):
            payment = entry["payment"]
            refs += _refs(payment, "payment_intent") or _refs(payment, "charge")
    return tuple(dict.fromkeys(refs)) or (invoice_id,)


def _written_off(source: str, kind: str, payload: Mapping[str, Any]) -> list[Command]:
    """`invoice.voided` / `invoice.marked_uncollectible`: the vendor no
    longer expects the invoice to be paid, so failing to pay it leaves the
    subscription's current period owing nothing
    (https://docs.stripe.com/invoicing/overview#invoice-statuses)."""
    invoice = _object(payload)
    invoice_id = _id(invoice.get("id"))
    subscription = _invoice_subscription(invoice)
    if not invoice_id:
        raise Unmappable("Stripe invoice has no id")
    if subscription is None:
        return []  # a one-off invoice never paid granted nothing
    how = "voided" if kind == "invoice.voided" else "uncollectible"
    return [
        OrderEvent(
            source=source,
            order_ref=subscription,
            fact=lifecycle.written_off(invoice_id, how),
            lines=(),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
        )
    ]


def _invoice_payment(source: str, payload: Mapping[str, Any]) -> list[Command]:
    """`invoice_payment.paid` (2025-03-31.basil and later): which payment
    intent or charge paid an invoice, the only place a basil payload says
    so (https://docs.stripe.com/api/invoice-payment/object)."""
    obj = _object(payload)
    invoice = _id(obj.get("invoice"))
    payment = obj.get("payment")
    aliases = _refs(payment, "payment_intent", "charge") if isinstance(payment, Mapping) else ()
    if not invoice or not aliases:
        raise Unmappable("Stripe invoice payment names no invoice, payment intent or charge")
    return [
        PaymentEvent(
            source=source,
            # Whichever of them the invoice's own event was recorded under.
            payment_refs=(invoice, *aliases),
            fact=lifecycle.payment_link(aliases),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
        )
    ]


def _subscription_lines(
    subscription: Mapping[str, Any], catalog: Catalog, unmapped: list[str]
) -> list[Line]:
    items = subscription.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if not isinstance(data, list):
        raise Unmappable("Stripe subscription has no items.data")
    lines = []
    for item in data:
        if not isinstance(item, Mapping):
            continue
        # An emptied item (quantity 0) stays in the snapshot: it grants
        # nothing (no entitlement is made for it; one it had is suspended).
        quantity = _quantity(item.get("quantity"), f"subscription item {item.get('id')!r}")
        offering = _offering(item.get("price") or item.get("plan"), catalog, unmapped)
        if offering is None:
            continue
        lines.append(
            Line(slot=_id(item.get("id")) or offering.sku, offering=offering, quantity=quantity)
        )
    return lines


def _subscription_period(subscription: Mapping[str, Any]) -> tuple[Any, Any]:
    """The current period, on the subscription (older API versions) or on
    its items (2025-03-31.basil and later)."""
    start, end = subscription.get("current_period_start"), subscription.get("current_period_end")
    if end is None:
        items = subscription.get("items")
        data = items.get("data") if isinstance(items, Mapping) else None
        ends = [i for i in data or [] if isinstance(i, Mapping) and i.get("current_period_end")]
        if ends:
            latest = max(ends, key=lambda i: i["current_period_end"])
            start, end = latest.get("current_period_start"), latest["current_period_end"]
    return start, end


#: Subscription fields whose `previous_attributes` tell which of two
#: updates in the same second came first.
ORDERING_FIELDS = (
    "status",
    "cancel_at_period_end",
    "cancel_at",
    "canceled_at",
    "trial_end",
    "current_period_start",
    "current_period_end",
    "quantity",
)


def _previous(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What an update changed, from `data.previous_attributes`
    (https://docs.stripe.com/api/events/object#event_object-data-previous_attributes)."""
    data = payload.get("data")
    previous = data.get("previous_attributes") if isinstance(data, Mapping) else None
    return _ordering(previous) if isinstance(previous, Mapping) else {}


def _ordering(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The ordering fields `obj` has, where they are plain values, and its
    items' quantities (on basil, where the subscription itself carries no
    quantity or period, the items are what an update changes)."""
    found = {
        field: obj[field]
        for field in ORDERING_FIELDS
        if field in obj
        and (
            obj[field] is None
            or isinstance(obj[field], bool)
            or (isinstance(obj[field], int) and abs(obj[field]) < 2**53)
            or (isinstance(obj[field], str) and len(obj[field]) <= 100)
        )
    }
    items = obj.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if isinstance(data, list):
        quantities = {
            str(item.get("id")): item.get("quantity")
            for item in data
            if isinstance(item, Mapping) and isinstance(item.get("quantity"), int)
        }
        found["items"] = dict(sorted(quantities.items()))
    return found


def _subscription_event(
    source: str, kind: str, payload: Mapping[str, Any], catalog: Catalog
) -> list[Command]:
    subscription = _object(payload)
    order_ref = _id(subscription.get("id"))
    if not order_ref:
        raise Unmappable("Stripe subscription has no id")
    unmapped: list[str] = []
    lines = _subscription_lines(subscription, catalog, unmapped)
    if kind == "customer.subscription.deleted":
        fact = lifecycle.ended("subscription_deleted", lines)
    else:
        status = subscription.get("status")
        if not isinstance(status, str):
            raise Unmappable("Stripe subscription has no status")
        start, end = _subscription_period(subscription)
        period_end = _optional_timestamp(end, "current_period_end")
        cancel_at = _optional_timestamp(subscription.get("cancel_at"), "cancel_at")
        if cancel_at is None and subscription.get("cancel_at_period_end"):
            cancel_at = period_end
        fact = lifecycle.subscription(
            status,
            lines,
            _optional_timestamp(start, "current_period_start"),
            period_end,
            trial_end=_optional_timestamp(subscription.get("trial_end"), "trial_end"),
            cancel_at=cancel_at,
            # Stripe moves the period forward before it charges for it.
            vouches=False,
            state=_ordering(subscription),
            previous=_previous(payload),
        )
    commands: list[Command] = []
    if lines or kind == "customer.subscription.deleted":
        commands.append(
            OrderEvent(
                source=source,
                order_ref=order_ref,
                fact=fact,
                lines=tuple(lines),
                cause=_cause(source, payload),
                occurred_at=_created(payload),
                customer=Customer(id=_id(subscription.get("customer")), email=None),
            )
        )
    return _finish(commands, unmapped, "subscription")


def _checkout_completed(source: str, payload: Mapping[str, Any], catalog: Catalog) -> list[Command]:
    """A Checkout Session completed. In subscription mode it names the
    customer (the subscription's own events grant). In payment mode, once
    paid, it is a one-off purchase: granted by its invoice when Checkout
    made one, else here, by the offering its `metadata.offering_sku` names
    (webhooks carry no line items: https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-line_items)."""
    session = _object(payload)
    details = session.get("customer_details")
    email = details.get("email") if isinstance(details, Mapping) else None
    customer = Customer(id=_id(session.get("customer")), email=email or None)
    if session.get("mode") == "payment":
        paid = session.get("payment_status") in ("paid", "no_payment_required")
        if not paid or _id(session.get("invoice")):
            return []  # not paid yet (async_payment_succeeded follows), or its invoice grants
        metadata = session.get("metadata")
        sku = metadata.get("offering_sku") if isinstance(metadata, Mapping) else None
        offering = catalog.get(str(sku)) if sku else None
        if offering is None:
            raise Unmappable(
                f"Stripe Checkout Session {session.get('id')!r} in payment mode names no"
                f" offering (metadata.offering_sku {sku!r}); enable invoice creation,"
                " or set metadata.offering_sku"
            )
        order_ref = _id(session.get("payment_intent")) or _id(session.get("id"))
        if not order_ref:
            raise Unmappable("Stripe Checkout Session has no id")
        amount = session.get("amount_total")
        line = Line(slot=offering.sku, offering=offering)
        return [
            OrderEvent(
                source=source,
                order_ref=order_ref,
                fact=lifecycle.payment(
                    order_ref,
                    [line],
                    starts=_created(payload),
                    amount=str(amount) if isinstance(amount, int) else None,
                ),
                lines=(line,),
                cause=_cause(source, payload),
                occurred_at=_created(payload),
                customer=customer,
                payment_refs=_refs(session, "payment_intent", "id"),
                invoice=order_ref,
            )
        ]
    order_ref = _id(session.get("subscription"))
    if session.get("mode") != "subscription" or not order_ref:
        return []  # setup mode: nothing is bought
    return [
        OrderEvent(
            source=source,
            order_ref=order_ref,
            fact={"kind": "checkout", "payment_status": session.get("payment_status")},
            lines=(),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
            customer=customer,
        )
    ]


def _refs(obj: Mapping[str, Any], *fields: str) -> tuple[str, ...]:
    return tuple(ref for ref in (_id(obj.get(f)) for f in fields) if ref)


def _charge_refunded(source: str, payload: Mapping[str, Any]) -> list[Command]:
    charge = _object(payload)
    # A charge that names neither waits under its own id, as a dispute that
    # names only its charge does: both end as dead letters if nothing links
    # them within lifecycle.parked_days.
    refs = _refs(charge, "payment_intent", "invoice") or _refs(charge, "id")
    if not refs:
        raise Unmappable("Stripe charge names no charge, invoice or payment intent")
    amount, refunded = charge.get("amount"), charge.get("amount_refunded")
    full = charge.get("refunded") is True or (
        isinstance(amount, int) and isinstance(refunded, int) and refunded >= amount > 0
    )
    return [
        PaymentEvent(
            source=source,
            payment_refs=refs,
            fact=lifecycle.refund(full, _id(charge.get("invoice"))),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
        )
    ]


def _refund_event(source: str, payload: Mapping[str, Any]) -> list[Command]:
    """`refund.created` / `refund.updated` (how 2025-03-31.basil reports
    refunds): full or partial by its amount against the payment's; one
    that failed or was canceled refunds nothing
    (https://docs.stripe.com/api/refunds/object#refund_object-status)."""
    refund = _object(payload)
    refund_id = _id(refund.get("id"))
    refs = _refs(refund, "payment_intent", "charge")
    if not refund_id or not refs:
        raise Unmappable("Stripe refund needs an id and a charge or payment intent")
    amount = refund.get("amount")
    return [
        PaymentEvent(
            source=source,
            payment_refs=refs,
            fact=lifecycle.refund(
                None,
                amount=str(amount) if isinstance(amount, int) else None,
                refund_id=refund_id,
                failed=refund.get("status") in ("failed", "canceled"),
            ),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
        )
    ]


def _dispute_event(source: str, kind: str, payload: Mapping[str, Any]) -> list[Command]:
    dispute = _object(payload)
    dispute_id = _id(dispute.get("id"))
    refs = _refs(dispute, "payment_intent", "charge")
    if not dispute_id or not refs:
        raise Unmappable("Stripe dispute needs an id and a charge or payment intent")
    if kind == "charge.dispute.created":
        state = "open"
    else:
        state = "lost" if dispute.get("status") == "lost" else "won"
    return [
        PaymentEvent(
            source=source,
            payment_refs=refs,
            fact=lifecycle.dispute(dispute_id, state),
            cause=_cause(source, payload),
            occurred_at=_created(payload),
        )
    ]


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("type")
    if not isinstance(kind, str) or not event_id(payload):
        raise Unmappable("not a Stripe event: it needs a string 'type' and 'id'")
    if kind in PAYMENT_EVENTS or kind == "invoice.payment_failed":
        return _invoice_event(source, kind, payload, catalog)
    if kind in ("invoice.voided", "invoice.marked_uncollectible"):
        return _written_off(source, kind, payload)
    if kind == "invoice_payment.paid":
        return _invoice_payment(source, payload)
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription_event(source, kind, payload, catalog)
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return _checkout_completed(source, payload, catalog)
    if kind == "charge.refunded":
        return _charge_refunded(source, payload)
    if kind in ("refund.created", "refund.updated", "refund.failed"):
        return _refund_event(source, payload)
    if kind in ("charge.dispute.created", "charge.dispute.closed"):
        return _dispute_event(source, kind, payload)
    # Event types that carry no entitlement meaning are acknowledged and left
    # alone, so enabling extra events at Stripe fills no dead-letter queue.
    return []


PROVIDER = Provider(
    name="stripe",
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("stripe-signature",),
)
