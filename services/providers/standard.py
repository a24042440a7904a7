"""Standard Webhooks (standardwebhooks.com) carrying the neutral billing event
of `contracts.billing`, for any billing system without an adapter here.

Signature: `webhook-signature: v1,<base64>` (a space-separated list during
key rotation), HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}",
keyed with the base64-decoded part of the `whsec_…` secret (unlike Stripe,
which keys with the literal string); ±5 minutes unless configured.

The event is our own contract (`contracts/billing.py`): every time must carry
a UTC offset (a zoneless one is a dead letter naming the field, not a naive
datetime that breaks the fold: shared case 08), and a `payment.succeeded`
without `subscription_id` is a one-off sale.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from contracts import describe
from contracts.billing import BillingEventV1, BillingItemV1
from domain import lifecycle
from domain.catalog import Catalog, add_period
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import Credentials, Provider, SignatureError, Unmappable, text_id

NAME = "standard"
TOLERANCE_SECONDS = 300


def signing_key(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the source's secret is not a base64 whsec_ key") from None


def secret_problem(secret: str) -> str | None:
    try:
        key = signing_key(secret)
    except SignatureError as exc:
        return str(exc)
    return None if key else "the source's whsec_ key is empty"


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not timestamp or not signatures:
        raise SignatureError("needs webhook-id, webhook-timestamp and webhook-signature headers")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    tolerance = credentials.tolerance_seconds or TOLERANCE_SECONDS
    if abs(now - sent) > tolerance:
        raise SignatureError(f"webhook-timestamp is outside the {tolerance:g} s tolerance")
    signed = f"{msg_id}.{sent}.".encode() + body
    expected = base64.b64encode(
        hmac.new(signing_key(credentials.secret), signed, hashlib.sha256).digest()
    )
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, value.encode()):
            return
    raise SignatureError("no v1 signature in webhook-signature matches the payload")


def _data(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    return data if isinstance(data, Mapping) else {}


def routing_key(payload: Mapping[str, Any]) -> str:
    data = _data(payload)
    for part, field in (("subscription", "id"), ("payment", "subscription_id"), ("payment", "id")):
        obj = data.get(part)
        if isinstance(obj, Mapping) and obj.get(field):
            return str(obj[field])
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _lines(
    items: list[BillingItemV1],
    catalog: Catalog,
    unmapped: list[str],
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[Line]:
    lines = []
    for item in items:
        offering = catalog.for_price(NAME, item.price, item.sku)
        if offering is None:
            wanted = f"sku {item.sku!r}" if item.sku else f"price {item.price!r}"
            unmapped.append(f"{wanted} maps to no offering in the catalog")
            continue
        lines.append(Line(item.id or offering.sku, offering, item.quantity, start, end))
    return lines


def _customer(value: Any) -> Customer | None:
    return Customer(value.id, value.email) if value is not None else None


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    try:
        event = BillingEventV1.model_validate(payload)
    except ValidationError as exc:
        raise Unmappable(f"not a billing event v1: {describe(exc)}") from None
    cause = Cause.provider(source, event.id)
    unmapped: list[str] = []
    commands: list[Command] = []
    subscription, payment = event.data.subscription, event.data.payment
    if subscription is not None and event.type.startswith("subscription."):
        lines = _lines(subscription.items, catalog, unmapped)
        fact = (
            lifecycle.ended("subscription_canceled", lines)
            if event.type == "subscription.canceled"
            else lifecycle.subscription(
                subscription.status,
                lines,
                subscription.current_period_start,
                subscription.current_period_end,
                trial_end=subscription.trial_end,
                cancel_at=subscription.cancel_at,
            )
        )
        commands.append(
            OrderEvent(
                source,
                subscription.id,
                fact,
                tuple(lines),
                cause,
                event.timestamp,
                _customer(subscription.customer),
            )
        )
    elif (
        payment is not None
        and event.type == "payment.succeeded"
        and payment.subscription_id is None
    ):
        # A one-off sale (payment.succeeded without a subscription; the
        # contract requires one on payment.failed): each item grants one
        # period of its offering, unless the payment states its own end.
        starts = payment.period_start or event.timestamp
        lines = [
            Line(
                line.slot,
                line.offering,
                line.quantity,
                starts,
                payment.period_end or add_period(starts, line.offering.period),
            )
            for line in _lines(payment.items, catalog, unmapped)
        ]
        if lines:
            commands.append(
                OrderEvent(
                    source,
                    payment.id,
                    lifecycle.payment(payment.id, lines),
                    tuple(lines),
                    cause,
                    event.timestamp,
                    _customer(payment.customer),
                    payment_refs=(payment.id,),
                    invoice=payment.id,
                )
            )
    elif payment is not None and event.type in ("payment.succeeded", "payment.failed"):
        assert payment.subscription_id is not None
        lines = _lines(payment.items, catalog, unmapped, payment.period_start, payment.period_end)
        paid = event.type == "payment.succeeded"
        if lines:
            commands.append(
                OrderEvent(
                    source,
                    payment.subscription_id,
                    (lifecycle.payment if paid else lifecycle.payment_failed)(payment.id, lines),
                    tuple(lines),
                    cause,
                    event.timestamp,
                    _customer(payment.customer),
                    payment_refs=(payment.id,) if paid else (),
                    invoice=payment.id,
                )
            )
    elif payment is not None:
        if event.type == "payment.refunded":
            fact = lifecycle.refund(payment.refund == "full", payment.id)
        else:
            assert payment.dispute is not None
            fact = lifecycle.dispute(payment.dispute.id, payment.dispute.status, payment.id)
        commands.append(PaymentEvent(source, (payment.id,), fact, cause, event.timestamp))
    if unmapped:
        raise Unmappable("; ".join(unmapped), commands)
    return commands


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    headers=("webhook-id", "webhook-timestamp", "webhook-signature"),
    secret_problem=secret_problem,
)
