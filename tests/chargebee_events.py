"""Chargebee v2 webhook payloads in the documented shapes: the event object
of https://apidocs.chargebee.com/docs/api/events and the subscription,
invoice, transaction and credit note objects as chargebee-python names their
fields (chargebee/models/*/responses.py); only ids, prices and times are
ours."""

from __future__ import annotations

import base64
import itertools
import json
import time
from typing import Any

from urllib3.util import make_headers

from services.providers import Credentials
from tests.conformance import NotSupported, catalog
from tests.lifecycle_world import ts

USERNAME = "entitle"
PASSWORD = "cb-webhook-password"
_ids = itertools.count(1)


def _event(kind: str, content: dict[str, Any], occurred: int) -> dict[str, Any]:
    return {
        "id": f"ev_cb{int(time.time() * 1000):x}{next(_ids):06d}",
        "occurred_at": occurred,
        "source": "scheduled_job",
        "object": "event",
        "api_version": "v2",
        "event_type": kind,
        "webhook_status": "scheduled",
        "content": content,
    }


def _customer() -> dict[str, Any]:
    return {"id": "cust_cb", "email": "cb@example.com", "object": "customer"}


def subscription(
    kind: str,
    sub: str,
    status: str,
    start: int,
    end: int,
    version_ms: int,
    price: str = "basic-USD-Monthly",
) -> dict[str, Any]:
    content = {
        "subscription": {
            "id": sub,
            "customer_id": "cust_cb",
            "status": status,
            "billing_period": 1,
            "billing_period_unit": "month",
            "current_term_start": start,
            "current_term_end": end,
            "cancelled_at": end if status == "cancelled" else None,
            "resource_version": version_ms,
            "object": "subscription",
            "subscription_items": [
                {
                    "item_price_id": price,
                    "item_type": "plan",
                    "quantity": 1,
                    "object": "subscription_item",
                }
            ],
        },
        "customer": _customer(),
    }
    return _event(kind, content, version_ms // 1000)


def invoice_event(
    kind: str,
    sub: str,
    invoice: str,
    start: int,
    end: int,
    occurred: int,
    price: str = "basic-USD-Monthly",
    status: str = "paid",
) -> dict[str, Any]:
    content = {
        "invoice": {
            "id": invoice,
            "customer_id": "cust_cb",
            "subscription_id": sub,
            "status": status,
            "total": 1000,
            "amount_paid": 1000 if status == "paid" else 0,
            "object": "invoice",
            "line_items": [
                {
                    "date_from": start,
                    "date_to": end,
                    "entity_type": "plan_item_price",
                    "entity_id": price,
                    "quantity": 1,
                    "amount": 1000,
                    "object": "line_item",
                }
            ],
        },
        "customer": _customer(),
    }
    return _event(kind, content, occurred)


def refunded(sub: str, invoice: str, amount: int, occurred: int) -> dict[str, Any]:
    event = invoice_event("payment_refunded", sub, invoice, 0, 0, occurred)
    event["content"]["transaction"] = {
        "id": "txn_cb",
        "amount": amount,
        "type": "refund",
        "linked_invoices": [{"invoice_id": invoice}],
    }
    return event


def headers(username: str = USERNAME, password: str = PASSWORD) -> dict[str, str]:
    return {**make_headers(basic_auth=f"{username}:{password}"), "Content-Type": "application/json"}


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# -- the conformance suite's fixture set (tests/conformance.py) ---------------------


def basic_auth(secret: str, username: str = USERNAME) -> dict[str, str]:
    """The header Chargebee sends with *Protect webhook URL with basic
    authentication* on (https://www.chargebee.com/docs/2.0/webhook_settings.html)."""
    token = base64.b64encode(f"{username}:{secret}".encode()).decode()
    return {"authorization": f"Basic {token}"}


class ChargebeeFixtures:
    """Chargebee's shapes for the conformance suite: the event envelope of
    https://apidocs.chargebee.com/docs/api/events (`id`, `occurred_at`,
    `source`, `object`, `api_version`, `event_type`, `webhook_status`,
    `content`), with the content each event type carries (subscription
    events: `subscription`, `customer`; payment events: `transaction`,
    `invoice`, `customer`, as chargebee/ai
    chargebee-integration/references/webhooks.md lists them; a refund also its
    `credit_note`), and the field names of the subscription, invoice,
    transaction and credit note objects of chargebee-python
    (chargebee/models/*/responses.py, transaction/operations.py).
    Product Catalog 2.0 item prices; one-time sales are charge item prices
    on an invoice without `subscription_id`."""

    provider = "chargebee"

    def __init__(self) -> None:
        self.price = {"basic": "basic-USD-Monthly", "pro": "pro-USD-Monthly"}
        #: Charge item prices sold once (one period of the offering).
        self.charge = {"basic": "basic-license-USD", "pro": "pro-license-USD"}
        self.catalog = catalog(
            "chargebee", {sku: (p, self.charge[sku]) for sku, p in self.price.items()}
        )

    def credentials(self, secret: str) -> Credentials:
        return Credentials(secret, username=USERNAME)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return basic_auth(secret)

    def body_signed(self) -> None:
        raise NotSupported(
            "Chargebee authenticates the sender by HTTP Basic auth and signs no body:"
            " a body changed in transit (TLS aside) cannot be told from the one sent"
        )

    def signature_age_limit(self) -> float:
        raise NotSupported("Chargebee's Basic auth carries no time: nothing to expire")

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        raise NotSupported(
            "Chargebee has one Basic auth password per webhook: changing it is no rotation"
            " with two valid at once"
        )

    def _event(self, kind: str, content: dict[str, Any], at: int) -> dict[str, Any]:
        return {
            "id": f"ev_{int(time.time() * 1000):x}{next(_ids):06d}",
            "occurred_at": ts(at),
            "source": "scheduled_job",
            "object": "event",
            "api_version": "v2",
            "event_type": kind,
            "webhook_status": "scheduled",
            "content": {**content, "customer": _customer()},
        }

    def _subscription(
        self,
        kind: str,
        sub: str,
        sku: str,
        status: str,
        start: int,
        end: int,
        at: int,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        subscription = {
            "id": sub,
            "customer_id": "cust_cb",
            "status": status,
            "billing_period": 1,
            "billing_period_unit": "month",
            "current_term_start": ts(start),
            "current_term_end": ts(end),
            "resource_version": ts(at) * 1000,
            "updated_at": ts(at),
            "object": "subscription",
            "subscription_items": [
                {
                    "item_price_id": self.price[sku],
                    "item_type": "plan",
                    "quantity": 1,
                    "unit_price": 9900,
                    "amount": 9900,
                    "object": "subscription_item",
                }
            ],
            **fields,
        }
        return [self._event(kind, {"subscription": subscription}, at)]

    def _invoice(
        self,
        sub: str | None,
        invoice: str,
        line: dict[str, Any],
        status: str,
        amount: int,
        at: int,
    ) -> dict[str, Any]:
        paid = status == "paid"
        return {
            "id": invoice,
            "customer_id": "cust_cb",
            **({"subscription_id": sub} if sub else {}),
            "recurring": sub is not None,
            "status": status,
            "date": ts(at),
            "paid_at": ts(at) if paid else None,
            "total": amount,
            "amount_paid": amount if paid else 0,
            "amount_due": 0 if paid else amount,
            "currency_code": "USD",
            "object": "invoice",
            "line_items": [
                {
                    **line,
                    "quantity": 1,
                    "unit_amount": amount,
                    "amount": amount,
                    "object": "line_item",
                }
            ],
        }

    def _payment(
        self, kind: str, sub: str | None, invoice: dict[str, Any], amount: int, at: int
    ) -> list[dict[str, Any]]:
        success = kind == "payment_succeeded"
        transaction = {
            "id": f"txn_{invoice['id']}",
            "customer_id": "cust_cb",
            **({"subscription_id": sub} if sub else {}),
            "type": "payment",
            "payment_method": "card",
            "gateway": "stripe",
            "status": "success" if success else "failure",
            "date": ts(at),
            "amount": amount,
            "currency_code": "USD",
            "object": "transaction",
            "linked_invoices": [
                {
                    "invoice_id": invoice["id"],
                    "applied_amount": amount if success else 0,
                    "applied_at": ts(at),
                    "invoice_status": invoice["status"],
                }
            ],
        }
        return [self._event(kind, {"transaction": transaction, "invoice": invoice}, at)]

    def _plan_line(self, sku: str, start: int, end: int) -> dict[str, Any]:
        return {
            "date_from": ts(start),
            "date_to": ts(end),
            "entity_type": "plan_item_price",
            "entity_id": self.price[sku],
        }

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription("subscription_created", sub, sku, "active", start, end, at)

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        obj = self._invoice(sub, invoice, self._plan_line(sku, start, end), "paid", amount, at)
        return self._payment("payment_succeeded", sub, obj, amount, at)

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        line = self._plan_line(sku, start, end)
        obj = self._invoice(sub, invoice, line, "payment_due", 9900, at)
        return self._payment("payment_failed", sub, obj, 9900, at)

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # `cancelled_at`: "set to be cancelled" at the term end.
        return self._subscription(
            "subscription_cancellation_scheduled",
            sub,
            sku,
            "non_renewing",
            start,
            end,
            at,
            cancelled_at=ts(end),
        )

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription(
            "subscription_cancelled",
            sub,
            sku,
            "cancelled",
            start,
            end,
            at,
            cancelled_at=ts(at),
            cancel_reason="not_paid",
        )

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription(
            "subscription_paused", sub, sku, "paused", start, end, at, pause_date=ts(at)
        )

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self._subscription(
            "subscription_resumed", sub, sku, "active", start, end, at, resume_date=ts(at)
        )

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        return [refund_event(sub, invoice, amount, refunded, at, self.price["basic"])]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        raise NotSupported(
            "Chargebee's webhooks carry no dispute or its outcome: it records a chargeback as"
            " a refund with payment_method 'chargeback' when the gateway reports it initiated"
            " (tests/test_chargebee.py covers that); won or lost reaches no event payload"
        )

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        line = {
            "date_from": ts(at),
            "date_to": ts(at),
            "entity_type": "charge_item_price",
            "entity_id": self.charge[sku],
        }
        obj = self._invoice(None, order, line, "paid", amount, at)
        return self._payment("payment_succeeded", None, obj, amount, at)

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotSupported("Chargebee's times are unix seconds: none lacks a zone")

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        content = payload["content"]
        lines = content["invoice"]["line_items"] if "invoice" in content else []
        items = content["subscription"]["subscription_items"] if "subscription" in content else []
        for line in [*lines, *items]:
            line["quantity"] = quantity
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        for line in payload["content"]["invoice"]["line_items"]:
            line["entity_id"] = price
        return payload


def refund_event(
    sub: str | None,
    invoice: str,
    amount: int,
    refunded: int,
    at: int,
    price: str,
    payment_method: str = "card",
) -> dict[str, Any]:
    """`payment_refunded`: the refund transaction, the invoice it refunds and
    the credit note it refunds through."""
    fixtures = FIXTURES
    obj = fixtures._invoice(
        sub,
        invoice,
        {
            "date_from": ts(0),
            "date_to": ts(30 * 86400),
            "entity_type": "plan_item_price",
            "entity_id": price,
        },
        "paid",
        amount,
        at,
    )
    credit_note = {
        "id": f"cn_{invoice}_{refunded}",
        "customer_id": "cust_cb",
        **({"subscription_id": sub} if sub else {}),
        "reference_invoice_id": invoice,
        "type": "refundable",
        "reason_code": "chargeback" if payment_method == "chargeback" else "product_unsatisfactory",
        "status": "refunded",
        "total": refunded,
        "amount_refunded": refunded,
        "object": "credit_note",
    }
    transaction = {
        "id": f"txn_rf_{invoice}_{refunded}",
        "customer_id": "cust_cb",
        **({"subscription_id": sub} if sub else {}),
        "type": "refund",
        "payment_method": payment_method,
        "gateway": "stripe",
        "status": "success",
        "date": ts(at),
        "amount": refunded,
        "refunded_txn_id": f"txn_{invoice}",
        "currency_code": "USD",
        "object": "transaction",
        "linked_credit_notes": [
            {
                "cn_id": credit_note["id"],
                "applied_amount": refunded,
                "applied_at": ts(at),
                "cn_total": refunded,
                "cn_status": "refunded",
                "cn_reference_invoice_id": invoice,
            }
        ],
    }
    return fixtures._event(
        "payment_refunded",
        {"transaction": transaction, "invoice": obj, "credit_note": credit_note},
        at,
    )


FIXTURES = ChargebeeFixtures()
