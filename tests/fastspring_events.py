"""FastSpring webhook payloads in their published shapes, changed only in
ids, products, amounts and times.

Where each shape comes from:

* the batch envelope `{"events": [{id, processed, created, type, live,
  data}]}`: https://developer.fastspring.com/docs/webhooks-overview and the
  sample batches in cyberwombat/woocommerce-fastspring-payment-gateway
  `includes/class-wc-gateway-fastspring-handler.php` (an early version);
* `subscription.activated`, `.canceled`, `.deactivated` (a subscription
  object, Webhook Expansion on), `order.completed` and
  `subscription.charge.completed`: bgultekin/cashier-fastspring
  `tests/Payloads/*.json`, as https://developer.fastspring.com/reference/subscriptionactivated,
  /subscriptioncanceled, /ordercompleted and /subscriptionchargecompleted show them;
* `subscription.charge.failed`: https://developer.fastspring.com/reference/subscriptionchargefailed
  (`reason`, `account`, `subscription`);
* `return.created`: the sample in the WooCommerce gateway above and
  https://developer.fastspring.com/reference/returncreated (`return`,
  `original`, `totalReturn`, `completed`);
* `chargeback.created`: https://developer.fastspring.com/reference/order-chargeback.

The signature is https://developer.fastspring.com/docs/message-security:
`X-FS-Signature`, base64 HMAC-SHA256 of the body.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
from typing import Any

from services.providers import Credentials
from tests.conformance import NotSupported, catalog
from tests.lifecycle_world import DAY, ts

SECRET = "fs-hmac-sha256-secret"
ACCOUNT = "TVWhu0iwQhKJyuhpT_2yMw"

_ids = itertools.count(1)


def _next(prefix: str) -> str:
    return f"{prefix}{next(_ids):08d}"


def ms(unix_seconds: int) -> int:
    return unix_seconds * 1000


def _account(email: str = "ne1@all.com") -> dict[str, Any]:
    return {
        "id": ACCOUNT,
        "account": ACCOUNT,
        "contact": {
            "first": "Leeroy",
            "last": "Jenkins",
            "email": email,
            "company": None,
            "phone": None,
        },
        "language": "en",
        "country": "US",
        "lookup": {"global": "TVWhu0iwQhKJyuhpT_2yMw"},
        "url": "https://furiousfalcon.onfastspring.com/account",
    }


def _product(path: str) -> dict[str, Any]:
    return {
        "product": path,
        "parent": None,
        "display": {"en": "Falcon Monthly Subscription"},
        "sku": "furious10",
        "format": "digital",
        "pricing": {
            "renew": "auto",
            "interval": "month",
            "intervalLength": 1,
            "quantityBehavior": "allow",
            "quantityDefault": 1,
            "price": {"USD": 14.95},
        },
    }


def _moment(name: str, value: int | None) -> dict[str, Any]:
    """FastSpring's four renderings of one time (ms, ms, s, display)."""
    return {
        name: value,
        f"{name}Value": value,
        f"{name}InSeconds": None if value is None else value // 1000,
        f"{name}Display": None if value is None else "1/1/26",
    }


def subscription(
    sub: str,
    product: str,
    state: str,
    next_charge: int | None,
    changed: int,
    begin: int,
    interval: tuple[str, int] = ("month", 1),
    quantity: int = 1,
    canceled: int | None = None,
    deactivation: int | None = None,
    end_date: int | None = None,
    expanded: bool = True,
    email: str = "ne1@all.com",
) -> dict[str, Any]:
    """A subscription object (times in ms), as `subscription.*` events carry
    it and as an expanded charge or order item names it."""
    unit, length = interval
    return {
        "id": sub,
        "subscription": sub,
        "active": state != "deactivated",
        "state": state,
        **_moment("changed", changed),
        "live": False,
        "currency": "USD",
        "account": _account(email) if expanded else ACCOUNT,
        "product": _product(product) if expanded else product,
        "sku": "furious10",
        "display": "Falcon Monthly Subscription",
        "quantity": quantity,
        "adhoc": False,
        "autoRenew": True,
        "price": 14.95,
        "priceDisplay": "$14.95",
        "discount": 0.0,
        "subtotal": 14.95,
        **_moment("next", next_charge),
        **_moment("end", end_date),
        **_moment("canceledDate", canceled),
        **_moment("deactivationDate", deactivation),
        "sequence": 1,
        "periods": None,
        "remainingPeriods": None,
        **_moment("begin", begin),
        "intervalUnit": unit,
        "intervalLength": length,
        "nextChargeCurrency": "USD",
        "nextChargeDate": next_charge,
        "nextChargeTotal": 14.95,
        "paymentReminder": {"intervalUnit": "day", "intervalLength": 1},
        "paymentOverdue": {"intervalUnit": "week", "intervalLength": 1, "total": 2, "sent": 0},
        "cancellationSetting": {
            "cancellation": "AFTER_LAST_NOTIFICATION",
            "intervalUnit": "week",
            "intervalLength": 1,
        },
    }


def event(kind: str, data: dict[str, Any], created: int, event_id: str = "") -> dict[str, Any]:
    """One event of a batch (`created` in ms)."""
    return {
        "id": event_id or _next("fsevt"),
        "processed": False,
        "created": created,
        "type": kind,
        "live": False,
        "data": data,
    }


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {"events": list(events)}


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def signature(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def signed_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-FS-Signature": signature(body, secret)}


def _order(
    order: str, items: list[dict[str, Any]], total: float, changed: int, expanded: bool = True
) -> dict[str, Any]:
    return {
        "order": order,
        "id": order,
        "reference": f"FUR{order[-6:]}-8970-10118",
        "buyerReference": None,
        "completed": True,
        **_moment("changed", changed),
        "language": "en",
        "live": False,
        "currency": "USD",
        "payoutCurrency": "USD",
        "invoiceUrl": f"https://furiousfalcon.onfastspring.com/account/order/{order}/invoice",
        "account": _account() if expanded else ACCOUNT,
        "total": total,
        "totalDisplay": f"${total:.2f}",
        "totalInPayoutCurrency": total,
        "tax": 0.0,
        "subtotal": total,
        "discount": 0.0,
        "billDescriptor": "FS* fsprg.com",
        "payment": {"type": "test", "creditcard": "visa", "cardEnding": "4242"},
        "customer": {
            "first": "Leeroy",
            "last": "Jenkins",
            "email": "ne1@all.com",
            "company": None,
            "phone": None,
        },
        "address": {"city": "Santa Barbara", "regionCode": "CA", "country": "US"},
        "notes": [],
        "items": items,
    }


def item(
    product: str, quantity: int = 1, subscription: dict[str, Any] | str | None = None
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "product": product,
        "quantity": quantity,
        "display": "Falcon Monthly Subscription",
        "sku": "furious10",
        "subtotal": 14.95,
        "discount": 0.0,
        "fulfillments": {},
    }
    if subscription is not None:
        found["subscription"] = subscription
    return found


def order_completed(
    order: str, items: list[dict[str, Any]], created: int, total: float = 14.95
) -> dict[str, Any]:
    return event("order.completed", _order(order, items, total, created), created)


def charge_completed(
    order: str, sub: dict[str, Any], created: int, total: float = 14.95
) -> dict[str, Any]:
    """A rebill paid, Webhook Expansion on: the order, its account and the
    subscription as it is after the charge (`next` moved on)."""
    items = [item(sub["product"]["product"], sub["quantity"], sub["id"])]
    data = {
        "order": _order(order, items, total, created, expanded=False),
        "currency": "USD",
        "total": total,
        "status": "successful",
        **_moment("timestamp", created),
        "sequence": 2,
        "periods": None,
        "account": _account(),
        "subscription": {**sub, "account": ACCOUNT, "product": sub["product"]["product"]},
    }
    return event("subscription.charge.completed", data, created)


def charge_failed(sub: dict[str, Any], created: int) -> dict[str, Any]:
    data = {
        "reason": "EXPIRED_CARD",
        "account": _account(),
        "quote": None,
        "subscription": {**sub, "state": "overdue"},
    }
    return event("subscription.charge.failed", data, created)


def return_created(
    original: str,
    original_total: float,
    returned: float,
    created: int,
    return_id: str = "",
    completed: bool = True,
) -> dict[str, Any]:
    data = {
        "return": return_id or _next("ret"),
        "reference": "SOF170918-8960-65188X",
        "completed": completed,
        **_moment("changed", created),
        "live": False,
        "account": ACCOUNT,
        "currency": "USD",
        "payoutCurrency": "USD",
        "totalReturn": returned,
        "totalReturnDisplay": f"${returned:.2f}",
        "totalReturnInPayoutCurrency": returned,
        "tax": 0.0,
        "subtotal": returned,
        "payment": {"type": "test", "cardEnding": "4242"},
        "reason": "Product Not As Expected",
        "note": "",
        "original": {
            "id": original,
            "order": original,
            "reference": "SOF170918-7652-19314",
            "account": ACCOUNT,
            "currency": "USD",
            "payoutCurrency": "USD",
            "total": original_total,
            "totalDisplay": f"${original_total:.2f}",
            "totalInPayoutCurrency": original_total,
            "subtotal": original_total,
            "tax": 0.0,
            "notes": [],
        },
        "customer": {"first": "asd", "last": "asdsadasda", "email": "ne1@all.com"},
        "items": [],
    }
    return event("return.created", data, created)


def chargeback_created(order: str, created: int) -> dict[str, Any]:
    data = {
        "id": order,
        "reasonCode": "4837",
        "reasonDescription": "FRAUDULENT",
        "fraudType": "true",
        "creationDate": "Fri May 09 17:00:00 UTC 2025",
        "chargebackAmount": 14.95,
        "currency": "USD",
        "order": order,
        "processorCaseId": "dsp_6dtaqbtq3cee7fqg3522hjgeqi",
        "status": "NEW",
        "paymentMethod": "CREDIT_CARD",
        "paymentMethodVariant": "Mastercard",
    }
    return event("chargeback.created", data, created)


# -- the conformance suite's fixture set (tests/conformance.py) ---------------------


class FastSpringFixtures:
    """FastSpring's shapes for the conformance suite. The suite's periods
    are 30 days: the subscriptions bill every 30 days (`intervalUnit` day)."""

    provider = "fastspring"

    def __init__(self) -> None:
        self.price = {"basic": "acme-basic-monthly", "pro": "acme-pro-monthly"}
        self.catalog = catalog("fastspring", {sku: (p,) for sku, p in self.price.items()})

    @staticmethod
    def _t(offset: int) -> int:
        return ms(ts(offset))

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return {"x-fs-signature": signature(body, secret)}

    def signature_age_limit(self) -> float:
        raise NotSupported("X-FS-Signature signs the body only, with no time: it cannot expire")

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        raise NotSupported("a FastSpring webhook has one HMAC secret: it signs with no other")

    def _sub(
        self, sub: str, sku: str, state: str, start: int, end: int, at: int, **fields: Any
    ) -> dict[str, Any]:
        return subscription(
            sub,
            self.price[sku],
            state,
            self._t(end),
            self._t(at),
            self._t(start),
            interval=("day", (end - start) // DAY),
            **fields,
        )

    def _snapshot(
        self, kind: str, sub: str, sku: str, state: str, start: int, end: int, at: int, **f: Any
    ) -> list[Any]:
        return [event(kind, self._sub(sub, sku, state, start, end, at, **f), self._t(at))]

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot("subscription.activated", sub, sku, "active", start, end, at)

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        subscription = self._sub(sub, sku, "active", start, end, at)
        if start == 0:  # the suite's subscriptions begin at 0: the initial purchase
            items = [item(self.price[sku], 1, subscription)]
            return [order_completed(invoice, items, self._t(at), amount / 100)]
        return [charge_completed(invoice, subscription, self._t(at), amount / 100)]

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        # A failed rebill names no order: the subscription is still due at `start`.
        return [
            charge_failed(
                self._sub(sub, sku, "overdue", start - (end - start), start, at), self._t(at)
            )
        ]

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot(
            "subscription.canceled",
            sub,
            sku,
            "canceled",
            start,
            end,
            at,
            canceled=self._t(at),
            deactivation=self._t(end),
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot(
            "subscription.deactivated",
            sub,
            sku,
            "deactivated",
            start,
            end,
            at,
            canceled=self._t(at),
            end_date=self._t(at),
        )

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # https://developer.fastspring.com/docs/pausing-subscriptions: in the
        # `paused` state the buyer has no access until it resumes.
        return self._snapshot("subscription.updated", sub, sku, "paused", start, end, at)

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._snapshot("subscription.resumed", sub, sku, "active", start, end, at)

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        return [return_created(invoice, amount / 100, refunded / 100, self._t(at))]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        raise NotSupported(
            "FastSpring reports a chargeback only when it is filed (chargeback.created,"
            " https://developer.fastspring.com/reference/order-chargeback), never won or lost"
        )

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        return [order_completed(order, [item(self.price[sku])], self._t(at), amount / 100)]

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotSupported("FastSpring's times are unix milliseconds: none lacks a zone")

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        payload = copy.deepcopy(payload)
        data = payload["data"]
        if isinstance(data.get("quantity"), int):  # a subscription
            data["quantity"] = quantity
        order = data.get("order") if isinstance(data.get("order"), dict) else data
        for line in order.get("items") or []:
            line["quantity"] = quantity
            if isinstance(line.get("subscription"), dict):
                line["subscription"]["quantity"] = quantity
        if isinstance(data.get("subscription"), dict):
            data["subscription"]["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        payload = copy.deepcopy(payload)
        data = payload["data"]
        order = data.get("order") if isinstance(data.get("order"), dict) else data
        for line in order["items"]:
            line["product"] = price
            if isinstance(line.get("subscription"), dict):
                line["subscription"]["product"]["product"] = price
        if isinstance(data.get("subscription"), dict):
            data["subscription"]["product"] = price
        return payload


FIXTURES = FastSpringFixtures()
