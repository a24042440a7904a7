"""Paddle Billing webhook payloads in the published shapes, signed with the
official `paddle-python-sdk`'s own HMAC.

Where each shape comes from (repository PaddleHQ/paddle-python-sdk; only
ids, prices, amounts and times changed, and fields the entity documents as
nullable set to null where the happening has none):

- the envelope (`event_id`, `event_type`, `occurred_at`, `notification_id`,
  `data`): tests/Unit/Entities/Notifications/test_NotificationEvent.py;
- subscriptions: tests/Unit/Entities/_fixtures/notification/entity/
  subscription.updated.json, .paused.json (`current_billing_period` null,
  `paused_at` set), .canceled.json (`canceled_at` set), and
  `scheduled_change` as paddle_billing/Notifications/Entities/Subscriptions/
  SubscriptionScheduledChange.py reads it (`action`, `effective_at`,
  `resume_at`);
- transactions: tests/Functional/Resources/Simulations/_fixtures/payload/
  transaction.completed.json; a one-off purchase is the same transaction
  with `subscription_id` and `billing_period` null and a price without
  `billing_cycle` (its third item);
- adjustments: tests/Unit/Entities/_fixtures/notification/entity/
  adjustment.updated.json (`action`, `status`, `transaction_id`, `totals`,
  `type`), with the actions of paddle_billing/Notifications/Entities/Shared/
  Action.py.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

from paddle_billing.Notifications.PaddleSignature import PaddleSignature

from services.providers import Credentials
from tests.conformance import NotSupported, Payload, catalog
from tests.lifecycle_world import ts

SECRET = "pdl_ntfset_01hkz0test_secretkey"
_ids = itertools.count(1)


def iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _event(kind: str, data: dict[str, Any], occurred: int) -> dict[str, Any]:
    n = next(_ids)
    return {
        "event_id": f"evt_01pdl{int(time.time() * 1000):x}{n:06d}",
        "event_type": kind,
        "occurred_at": iso(occurred),
        "notification_id": f"ntf_01pdl{n:06d}",
        "data": data,
    }


def _price(price: str, product: str, amount: str = "9900", recurring: bool = True) -> Any:
    return {
        "id": price,
        "name": "Monthly (per seat)" if recurring else "One-time",
        "type": "standard",
        "status": "active",
        "quantity": {"maximum": 999, "minimum": 1},
        "tax_mode": "account_setting",
        "product_id": product,
        "unit_price": {"amount": amount, "currency_code": "USD"},
        "custom_data": None,
        "description": "Monthly" if recurring else "One-time",
        "trial_period": None,
        "billing_cycle": {"interval": "month", "frequency": 1} if recurring else None,
        "unit_price_overrides": [],
        "import_meta": None,
    }


def _item(price: str, product: str, quantity: int = 1) -> dict[str, Any]:
    """A subscription item (subscription.updated.json)."""
    return {
        "status": "active",
        "quantity": quantity,
        "recurring": True,
        "price": _price(price, product),
        "trial_dates": None,
    }


def subscription(
    kind: str,
    sub: str,
    status: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "pri_basic",
    cancel_at: int | None = None,
    product: str = "pro_01acme",
    pause_at: int | None = None,
) -> dict[str, Any]:
    change = None
    if cancel_at is not None:
        change = {"action": "cancel", "effective_at": iso(cancel_at), "resume_at": None}
    elif pause_at is not None:
        change = {"action": "pause", "effective_at": iso(pause_at), "resume_at": None}
    paused = status == "paused"
    data = {
        "id": sub,
        "status": status,
        "customer_id": "ctm_01pdl",
        "address_id": "add_01pdl",
        "business_id": None,
        "currency_code": "USD",
        "collection_mode": "automatic",
        "billing_details": None,
        "billing_cycle": {"interval": "month", "frequency": 1},
        # Paused or canceled, a subscription has no current period.
        "current_billing_period": (
            None
            if paused or status == "canceled"
            else {"starts_at": iso(start), "ends_at": iso(end)}
        ),
        "next_billed_at": None if paused or status == "canceled" else iso(end),
        "paused_at": iso(occurred) if paused else None,
        "canceled_at": iso(occurred) if status == "canceled" else None,
        "scheduled_change": change,
        "discount": None,
        "items": [_item(price, product)],
        "custom_data": None,
        "import_meta": None,
    }
    return _event(kind, data, occurred)


def transaction(
    sub: str | None,
    txn: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "pri_basic",
    failed: bool = False,
    amount: int = 9900,
    product: str = "pro_01acme",
) -> dict[str, Any]:
    """A subscription's transaction; `sub` None: a one-off purchase."""
    one_off = sub is None
    total = str(amount)
    data = {
        "id": txn,
        "status": "past_due" if failed else "completed",
        "customer_id": "ctm_01pdl",
        "address_id": "add_01pdl",
        "business_id": None,
        "custom_data": None,
        "subscription_id": sub,
        "invoice_id": None if failed else f"inv_{txn}",
        "invoice_number": None if failed else "325-10566",
        "origin": "web" if one_off else "subscription_recurring",
        "collection_mode": "automatic",
        "currency_code": "USD",
        "discount_id": None,
        "billing_details": None,
        "billing_period": None if one_off else {"starts_at": iso(start), "ends_at": iso(end)},
        "items": [
            {
                "price": _price(price, product, total, recurring=not one_off),
                "quantity": 1,
                "proration": None,
            }
        ],
        "details": {
            "totals": {
                "subtotal": total,
                "tax": "0",
                "discount": "0",
                "total": total,
                "grand_total": total,
                "credit": "0",
                "balance": "0",
                "credit_to_balance": "0",
                "currency_code": "USD",
            },
        },
        "billed_at": None if failed else iso(occurred),
        "created_at": iso(occurred),
        "updated_at": iso(occurred),
        "revised_at": None,
    }
    return _event(
        "transaction.payment_failed" if failed else "transaction.completed", data, occurred
    )


def adjustment(
    txn: str,
    action: str,
    amount: int,
    occurred: int,
    sub: str | None = None,
    status: str = "approved",
    adjustment_id: str | None = None,
    full: bool | None = None,
    kind: str = "adjustment.created",
) -> dict[str, Any]:
    """An adjustment of transaction `txn` (adjustment.updated.json);
    `full`: its `type` (null in the SDK's fixture, which predates it)."""
    total = str(amount)
    data = {
        "id": adjustment_id or f"adj_01pdl{next(_ids):06d}",
        "action": action,
        "type": None if full is None else ("full" if full else "partial"),
        "transaction_id": txn,
        "subscription_id": sub,
        "customer_id": "ctm_01pdl",
        "reason": "error" if action == "refund" else "chargeback",
        "credit_applied_to_balance": None,
        "currency_code": "USD",
        "status": status,
        "items": [
            {
                "id": f"adjitm_01pdl{next(_ids):06d}",
                "item_id": f"txnitm_{txn}",
                "type": "full" if full else "partial",
                "amount": total,
                "proration": None,
                "totals": {"subtotal": total, "tax": "0", "total": total},
            }
        ],
        "totals": {
            "subtotal": total,
            "tax": "0",
            "total": total,
            "fee": "0",
            "earnings": total,
            "retained_fee": "0",
            "currency_code": "USD",
        },
        "payout_totals": None,
        "tax_rates_used": None,
        "created_at": iso(occurred),
        "updated_at": iso(occurred),
    }
    return _event(kind, data, occurred)


def signed_headers(
    body: bytes, secret: str = SECRET, timestamp: int | None = None
) -> dict[str, str]:
    moment = int(time.time()) if timestamp is None else timestamp
    h1 = PaddleSignature.calculate_hmac(secret, f"{moment}:".encode() + body).hexdigest()
    return {"Paddle-Signature": f"ts={moment};h1={h1}", "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


class PaddleFixtures:
    """Paddle Billing's shapes for the conformance suite (see the module's
    sources), signed by the `paddle-python-sdk`."""

    provider = "paddle"

    def __init__(self) -> None:
        self.price = {"basic": "pri_01basic", "pro": "pri_01pro"}
        self.one_off = {"basic": "pri_01basic_once", "pro": "pri_01pro_once"}
        self.catalog = catalog(
            "paddle", {sku: (p, self.one_off[sku]) for sku, p in self.price.items()}
        )

    def _product(self, sku: str) -> str:
        return f"pro_01{sku}"

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return {k.lower(): v for k, v in signed_headers(body, secret, int(at)).items()}

    def signature_age_limit(self) -> float:
        return 5  # paddle_billing.Notifications.Verifier(maximum_variance=5)

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        # While a secret rotates Paddle sends one h1 per active secret
        # (https://developer.paddle.com/webhooks/signature-verification).
        headers = self.sign(body, old, at)
        newer = self.sign(body, new, at)["paddle-signature"].split(";h1=")[1]
        return {"paddle-signature": f"{headers['paddle-signature']};h1={newer}"}

    def _subscription(
        self, kind: str, sub: str, sku: str, status: str, start: int, end: int, at: int, **kw: Any
    ) -> list[Payload]:
        extra = {k: ts(v) for k, v in kw.items()}
        return [
            subscription(
                kind,
                sub,
                status,
                ts(start),
                ts(end),
                ts(at),
                price=self.price[sku],
                product=self._product(sku),
                **extra,
            )
        ]

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        return self._subscription("subscription.created", sub, sku, "active", start, end, at)

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Payload]:
        return [
            transaction(
                sub,
                invoice,
                ts(start),
                ts(end),
                ts(at),
                price=self.price[sku],
                amount=amount,
                product=self._product(sku),
            )
        ]

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Payload]:
        return [
            transaction(
                sub,
                invoice,
                ts(start),
                ts(end),
                ts(at),
                price=self.price[sku],
                failed=True,
                product=self._product(sku),
            )
        ]

    def cancel_at_period_end(
        self, sub: str, sku: str, start: int, end: int, at: int
    ) -> list[Payload]:
        return self._subscription(
            "subscription.updated", sub, sku, "active", start, end, at, cancel_at=end
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        return self._subscription("subscription.canceled", sub, sku, "canceled", start, end, at)

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        # https://developer.paddle.com/build/subscriptions/pause-subscriptions
        return self._subscription("subscription.paused", sub, sku, "paused", start, end, at)

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        return self._subscription("subscription.resumed", sub, sku, "active", start, end, at)

    def refunded(
        self, sub: str, invoice: str, amount: int, refunded: int, at: int
    ) -> list[Payload]:
        return [adjustment(invoice, "refund", refunded, ts(at), sub=sub)]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Payload]:
        if state == "lost":
            raise NotSupported(
                "Paddle sends no notification when it loses a contested chargeback: "
                "the `chargeback` adjustment stands"
            )
        action = "chargeback" if state == "open" else "chargeback_reverse"
        return [adjustment(invoice, action, 9900, ts(at), sub=sub)]

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Payload]:
        moment = ts(at)
        return [
            transaction(
                None,
                order,
                moment,
                moment,
                moment,
                price=self.one_off[sku],
                amount=amount,
                product=self._product(sku),
            )
        ]

    def without_zone(self, payload: Payload) -> Payload:
        payload["occurred_at"] = payload["occurred_at"].removesuffix("Z")
        return payload

    def with_quantity(self, payload: Payload, quantity: int) -> Payload:
        for item in payload["data"]["items"]:
            item["quantity"] = quantity
        return payload

    def with_price(self, payload: Payload, price: str) -> Payload:
        for item in payload["data"]["items"]:
            item["price"]["id"] = price
        return payload


FIXTURES = PaddleFixtures()
