"""FastSpring: `X-FS-Signature` (base64 HMAC-SHA256 of the raw body with the
webhook's HMAC SHA256 secret, https://developer.fastspring.com/docs/message-security)
over a batch, `{"events": [{id, type, live, processed, created, data}, ...]}`
(https://developer.fastspring.com/docs/webhooks-overview).

The ingress verifies the batch once and stores each of its events as a
webhook of its own (`split`), so each is deduplicated by its own `id`,
applied, dead-lettered and re-driven on its own: one bad event does not hold
back the others. `normalize` therefore sees one event.

One subscription is one order (its FastSpring subscription id) with one
entitlement; a one-off product of an order is an entitlement of that order
(its FastSpring order id) per product path. Product paths map to offerings
under `prices.fastspring`. Payments are FastSpring orders (the initial
`order.completed`, each rebill's `subscription.charge.completed` order): a
`return.created` or `chargeback.created` names that order and reaches the
entitlement through it. Charge events need Webhook Expansion (without it they
name only ids, no period).

Times are unix milliseconds (`created`, `changed`, `next`, ...), read as UTC.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
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
    from_unix,
    listed,
    ref,
    same_signature,
    text_id,
)

NAME = "fastspring"
SLOT = "main"  # a FastSpring subscription is one product; a plan change keeps it
#: Events whose `data` is the subscription itself
#: (https://developer.fastspring.com/reference/subscriptions-1,
#: https://developer.fastspring.com/docs/pausing-subscriptions).
SUBSCRIPTION_EVENTS = frozenset(
    {
        "subscription.activated",
        "subscription.updated",
        "subscription.canceled",
        "subscription.uncanceled",
        "subscription.deactivated",
        "subscription.paused",
        "subscription.resumed",
    }
)
#: A subscription's `state` (https://developer.fastspring.com/reference/subscriptionupdated)
#: as a snapshot status. `canceled` is a cancellation scheduled for
#: `deactivationDate` (https://developer.fastspring.com/docs/subscriptioncanceled):
#: access continues until then. `overdue`: a rebill failed and is retried.
#: `paused`: no access until it resumes (https://fastspring.com/docs/pausing-subscriptions/).
STATES = {
    "active": "active",
    "trial": "trialing",
    "overdue": "past_due",
    "canceled": "active",
    "paused": "paused",
    "deactivated": "canceled",
}


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    """https://developer.fastspring.com/docs/message-security: the header
    carries no time, so a signature cannot expire, and a webhook has one
    secret, so there is no rotation to accept."""
    given = headers.get("x-fs-signature")
    if not given:
        raise SignatureError("missing X-FS-Signature header")
    digest = hmac.new(credentials.secret.encode(), body, hashlib.sha256).digest()
    if not same_signature(base64.b64encode(digest).decode(), given.strip()):
        raise SignatureError("X-FS-Signature does not match the payload")


def split(payload: Mapping[str, Any]) -> list[Any] | None:
    """The events of one FastSpring delivery, each to be stored on its own;
    None when the body is not a batch (it is then stored as it came, and
    normalizing it says why it is no event)."""
    events = payload.get("events")
    return list(events) if isinstance(events, list) and events else None


def event_id(payload: Mapping[str, Any]) -> str:
    """The event's `id`: automatic retries repeat it, manual resends get a
    new one (https://developer.fastspring.com/docs/webhooks-overview)."""
    return text_id(payload.get("id"))


def _data(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise Unmappable("FastSpring event has no data object")
    return data


def _id(value: Any, what: str) -> str | None:
    """An id that is a string, or the `id` of an expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return ref(value, f"FastSpring {what}") or None


def routing_key(payload: Mapping[str, Any]) -> str:
    """The subscription (or, for a one-off order, the order; for a refund
    or chargeback, the refunded order) whose events must keep their order."""
    data = payload.get("data")
    if not isinstance(data, Mapping):
        return event_id(payload)
    kind = payload.get("type")
    kind = kind if isinstance(kind, str) else ""
    value: Any = None
    if kind in SUBSCRIPTION_EVENTS:
        value = data.get("id")
    elif kind in ("subscription.charge.completed", "subscription.charge.failed"):
        value = data.get("subscription")
    elif kind == "order.completed":
        items = data.get("items")
        first = items[0] if isinstance(items, list) and items else None
        value = first.get("subscription") if isinstance(first, Mapping) else None
        value = value or data.get("id")
    elif kind == "return.created":
        value = data.get("original")
    elif kind == "chargeback.created":
        value = data.get("order")
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else event_id(payload)


def _ms(value: Any, what: str) -> datetime | None:
    """A FastSpring time (unix milliseconds), None if absent."""
    return None if value is None else from_unix(value, f"FastSpring {what}", scale=1000)


def _period_start(end: datetime | None, subscription: Mapping[str, Any]) -> datetime | None:
    """The start of the billing period that ends at `end`: one interval
    (`intervalUnit` day, week, month or year times `intervalLength`) before
    it. None where the subscription names no such interval."""
    unit, length = subscription.get("intervalUnit"), subscription.get("intervalLength")
    if end is None or not isinstance(length, int) or isinstance(length, bool):
        return None
    if not 1 <= length <= 1200:
        return None
    if unit in ("day", "week"):
        return end - timedelta(days=length * (7 if unit == "week" else 1))
    if unit in ("month", "year"):
        index = end.year * 12 + end.month - 1 - length * (12 if unit == "year" else 1)
        year, month = divmod(index, 12)
        if year < 1970:
            return None
        day = min(end.day, calendar.monthrange(year, month + 1)[1])
        return end.replace(year=year, month=month + 1, day=day)
    return None


def _product(value: Any) -> str | None:
    """A product path: a string, or the `product` of an expanded product."""
    if isinstance(value, Mapping):
        value = value.get("product")
    return ref(value, "FastSpring product")


def _line(
    slot: str,
    product: Any,
    quantity: Any,
    catalog: Catalog,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Line:
    path = _product(product)
    offering = catalog.for_price(NAME, path, None)
    if offering is None:
        raise Unmappable(f"FastSpring product {path!r} maps to no offering in the catalog")
    if quantity is None:
        quantity = 1
    if not isinstance(quantity, int) or isinstance(quantity, bool):
        raise Unmappable(f"FastSpring quantity {quantity!r:.80} of {path!r} is not an integer")
    return Line(slot, offering, quantity, start, end)


def _customer(data: Mapping[str, Any]) -> Customer:
    account = data.get("account")
    contact = account.get("contact") if isinstance(account, Mapping) else None
    if not isinstance(contact, Mapping):
        contact = data.get("customer")  # orders carry the buyer as `customer`
    email = contact.get("email") if isinstance(contact, Mapping) else None
    return Customer(
        id=_id(account, "account"), email=ref(email, "FastSpring contact email") or None
    )


def _amount(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unmappable(f"FastSpring {what} {value!r:.80} is not a number")
    return str(value)


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("type")
    if not isinstance(kind, str) or not kind:
        if "events" in payload:
            raise Unmappable("FastSpring batch with no event to store on its own")
        raise Unmappable("FastSpring event has no type")
    identifier = event_id(payload)
    if not identifier:
        raise Unmappable("FastSpring event has no id")
    cause = Cause.provider(source, identifier)
    created = from_unix(payload.get("created"), "FastSpring event created", scale=1000)
    data = _data(payload)
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription(source, kind, data, catalog, cause, created)
    if kind == "order.completed":
        return _order_completed(source, data, catalog, cause, created)
    if kind == "subscription.charge.completed":
        return _charge_completed(source, data, catalog, cause, created)
    if kind == "subscription.charge.failed":
        return _charge_failed(source, data, cause, created)
    if kind == "return.created":
        return _return_created(source, data, cause, created)
    if kind == "chargeback.created":
        return _chargeback_created(source, data, cause, created)
    return []  # reminders, account and mailing-list events grant nothing


def _subscription(
    source: str,
    kind: str,
    data: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    created: datetime,
) -> list[Command]:
    """A snapshot of the subscription (its `state`, `next` charge date,
    `deactivationDate`), ordered by its `changed` time."""
    subscription = _id(data.get("id"), "subscription id")
    if subscription is None:
        raise Unmappable("FastSpring subscription has no id")
    state = data.get("state")
    status = STATES.get(state) if isinstance(state, str) else None
    if status is None:
        raise Unmappable(f"FastSpring subscription state {state!r:.80} is not one we know")
    next_charge = _ms(data.get("next"), "subscription next")
    if status == "canceled":
        end = _ms(data.get("end"), "subscription end") or next_charge
    else:
        end = next_charge
    cancel_at = None
    if state == "canceled":
        cancel_at = _ms(data.get("deactivationDate"), "subscription deactivationDate") or end
    line = _line(SLOT, data.get("product"), data.get("quantity"), catalog)
    fact = lifecycle.subscription(
        status,
        [line],
        _period_start(end, data),
        end,
        trial_end=next_charge if status == "trialing" else None,
        cancel_at=cancel_at,
        # FastSpring moves `next` only once the rebill is paid; a failed one
        # turns the state to `overdue` instead.
        vouches=True,
        # Canceled (active until deactivationDate) is a cancellation all the
        # same: it mints nothing for a subscription never seen.
        final=state == "canceled",
    )
    changed = _ms(data.get("changed"), "subscription changed") or created
    return [
        OrderEvent(
            source,
            subscription,
            fact,
            # A deactivation mints nothing for a subscription never seen: the
            # fold keeps it on the order (`lifecycle.terminal`).
            (line,),
            cause,
            changed,
            _customer(data),
        )
    ]


def _order_completed(
    source: str, data: Mapping[str, Any], catalog: Catalog, cause: Cause, created: datetime
) -> list[Command]:
    """A paid order (https://developer.fastspring.com/reference/ordercompleted):
    each subscription item pays its first period (the expanded subscription's
    `begin`..`next`, else one period of the offering from the order); each
    other item is a one-off sale of one period of its offering."""
    order = _id(data.get("id"), "order id")
    if order is None:
        raise Unmappable("FastSpring order has no id")
    amount = _amount(data.get("total"), "order total")
    customer = _customer(data)
    commands: list[Command] = []
    unmapped: list[str] = []
    for item in listed(data.get("items"), "FastSpring order items"):
        if not isinstance(item, Mapping):
            raise Unmappable(f"FastSpring order item {item!r:.80} is not an object")
        subscription = item.get("subscription")
        subscription_id = _id(subscription, "item subscription")
        try:
            if subscription_id is not None:
                details = subscription if isinstance(subscription, Mapping) else {}
                end = _ms(details.get("next"), "subscription next")
                start = _ms(details.get("begin"), "subscription begin") or _period_start(
                    end, details
                )
                line = _line(SLOT, item.get("product"), item.get("quantity"), catalog, start, end)
                order_ref = subscription_id
            else:
                path = _product(item.get("product")) or ""
                line = _line(path, path, item.get("quantity"), catalog)
                # A one-off purchase is paid for one period of its offering.
                line = Line(
                    path,
                    line.offering,
                    line.quantity,
                    created,
                    add_period(created, line.offering.period),
                )
                order_ref = order
        except Unmappable as exc:
            unmapped.append(exc.reason)
            continue
        starts = None if line.period_end is not None else created
        commands.append(
            OrderEvent(
                source,
                order_ref,
                lifecycle.payment(order, [line], starts=starts, amount=amount),
                (line,),
                cause,
                created,
                customer,
                payment_refs=(order,),
                invoice=order,
            )
        )
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    if not commands:
        raise Unmappable(f"FastSpring order {order!r} has no items")
    return commands


def _charge_completed(
    source: str, data: Mapping[str, Any], catalog: Catalog, cause: Cause, created: datetime
) -> list[Command]:
    """A rebill was paid (https://developer.fastspring.com/reference/subscriptionchargecompleted):
    the expanded subscription's `next` is the new paid-through date, one
    interval after the period's start."""
    order, subscription = data.get("order"), data.get("subscription")
    if not isinstance(order, Mapping) or not isinstance(subscription, Mapping):
        raise Unmappable(
            "FastSpring subscription.charge.completed names only ids: enable Webhook"
            " Expansion on the webhook, then re-drive"
        )
    order_id = _id(order.get("id"), "order id")
    subscription_id = _id(subscription.get("id"), "subscription id")
    if order_id is None or subscription_id is None:
        raise Unmappable("FastSpring charge has no order id or subscription id")
    end = _ms(subscription.get("next"), "subscription next")
    if end is None:
        raise Unmappable("FastSpring charge's subscription has no next charge date (next)")
    line = _line(
        SLOT,
        subscription.get("product"),
        subscription.get("quantity"),
        catalog,
        _period_start(end, subscription),
        end,
    )
    amount = _amount(data.get("total"), "charge total")
    return [
        OrderEvent(
            source,
            subscription_id,
            lifecycle.payment(order_id, [line], amount=amount),
            (line,),
            cause,
            created,
            _customer(data),
            payment_refs=(order_id,),
            invoice=order_id,
        )
    ]


def _charge_failed(
    source: str, data: Mapping[str, Any], cause: Cause, created: datetime
) -> list[Command]:
    """A rebill failed (https://developer.fastspring.com/reference/subscriptionchargefailed):
    overdue until a later charge is paid."""
    subscription = data.get("subscription")
    subscription_id = _id(subscription, "subscription")
    if subscription_id is None:
        raise Unmappable("FastSpring subscription.charge.failed names no subscription")
    due = subscription.get("next") if isinstance(subscription, Mapping) else None
    # The rebill it failed, by its due date where the subscription is expanded.
    invoice = f"rebill/{subscription_id}/{due if isinstance(due, int) else cause.event_id}"
    return [
        OrderEvent(
            source,
            subscription_id,
            lifecycle.payment_failed(invoice, []),
            (),
            cause,
            created,
        )
    ]


def _return_created(
    source: str, data: Mapping[str, Any], cause: Cause, created: datetime
) -> list[Command]:
    """A refund (https://developer.fastspring.com/reference/returncreated):
    in full when `totalReturn` reaches the original order's `total`
    (without an expanded `original`, judged against the paid order's
    amount). A return FastSpring has not `completed` refunds nothing."""
    original = data.get("original")
    order = _id(original, "return original")
    if order is None:
        raise Unmappable("FastSpring return names no original order")
    returned = _amount(data.get("totalReturn"), "totalReturn")
    total = (
        _amount(original.get("total"), "original total") if isinstance(original, Mapping) else None
    )
    full: bool | None = None
    if returned is not None and total is not None:
        try:
            full = Decimal(returned) >= Decimal(total)
        except InvalidOperation:
            full = None
    return_id = _id(data.get("return"), "return id") or cause.event_id
    fact = lifecycle.refund(
        full, order, returned, refund_id=return_id, failed=data.get("completed") is False
    )
    return [PaymentEvent(source, (order,), fact, cause, created)]


def _chargeback_created(
    source: str, data: Mapping[str, Any], cause: Cause, created: datetime
) -> list[Command]:
    """A chargeback was filed against an order
    (https://developer.fastspring.com/reference/order-chargeback). FastSpring
    sends no webhook when it is won or lost: an admin reinstates or cancels."""
    order = _id(data.get("order"), "chargeback order")
    if order is None:
        raise Unmappable("FastSpring chargeback names no order")
    dispute = _id(data.get("id"), "chargeback id") or order
    fact = lifecycle.dispute(f"chargeback/{dispute}", "open", order)
    return [PaymentEvent(source, (order,), fact, cause, created)]


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    split=split,
    # The signature is of the whole batch, not of the one event each stored
    # webhook holds: kept, it would only look like a forgery.
    headers=(),
)
