"""PayPal webhooks signed with a locally generated CA and certificate, the way
PayPal signs them: RSA-SHA256 over "id|time|webhook id|crc32(body)".

`FIXTURES` (the conformance suite's set, at the end) builds each event from
PayPal's published samples, changed only in ids, amounts and times:

- BILLING.SUBSCRIPTION.*: the subscription of "Show subscription details"
  (https://developer.paypal.com/docs/api/subscriptions/v1/#subscriptions_get)
  as the webhook carries it (resource_version 2.0; a sandbox delivery of
  BILLING.SUBSCRIPTION.CANCELLED has `status_change_note`, `billing_info`
  with `last_payment` and no `next_billing_time`).
- PAYMENT.SALE.COMPLETED / REFUNDED: the samples of
  https://developer.paypal.com/docs/subscriptions/reference/webhooks/ and
  PayPal-PHP-SDK sample/notifications/ValidateWebhookEvent.php (a sale with
  `billing_agreement_id`; a refund with `sale_id`, `parent_payment`).
- PAYMENT.CAPTURE.COMPLETED / REFUNDED / REVERSED, CHECKOUT.ORDER.APPROVED:
  the samples of https://developer.paypal.com/api/rest/webhooks/event-names/
  (Payments v2, Orders): a v2 refund names its capture only in
  `links[rel=up]`, and its times carry a local offset ("-07:00").
- CUSTOMER.DISPUTE.CREATED / RESOLVED: the samples of
  https://developer.paypal.com/docs/disputes/webhooks/ (`dispute_id`,
  `disputed_transactions[].seller_transaction_id`, `status`,
  `dispute_outcome.outcome_code`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from domain.catalog import Catalog, Offering
from services.providers import Credentials
from tests.conformance import NotSupported

WEBHOOK_ID = "WH-ENTITLE-TEST-1"
CERT_URL = "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-360caa42-test"
_ids = itertools.count(1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass
class Authority:
    """A test CA and a PayPal-named signing certificate it issued."""

    root: x509.Certificate
    leaf: x509.Certificate
    key: rsa.RSAPrivateKey
    root_key: rsa.RSAPrivateKey | None = None

    @classmethod
    def make(
        cls,
        expired: bool = False,
        common: str = "messageverificationcerts.sandbox.paypal.com",
        now: datetime | None = None,
    ) -> Authority:
        """Valid around `now` (the wall clock by default)."""
        now = now or datetime.now(UTC)
        root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        root = _cert(
            "Entitle Test Root CA",
            root_key,
            "Entitle Test Root CA",
            root_key,
            True,
            now - timedelta(days=1),
            now + timedelta(days=365),
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        window = (
            (now - timedelta(days=30), now - timedelta(days=1))
            if expired
            else (now - timedelta(days=1), now + timedelta(days=90))
        )
        leaf = _cert(common, key, "Entitle Test Root CA", root_key, False, *window)
        return cls(root, leaf, key, root_key)

    def renewed(self, now: datetime) -> Authority:
        """A new signing certificate from the same root, as PayPal rotates
        its certificate (valid around `now`)."""
        assert self.root_key is not None
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        common = self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        leaf = _cert(
            str(common),
            key,
            "Entitle Test Root CA",
            self.root_key,
            False,
            now - timedelta(days=1),
            now + timedelta(days=90),
        )
        return Authority(self.root, leaf, key, self.root_key)

    def leaf_pem(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def seed(self, cache_dir: Path, url: str = CERT_URL) -> None:
        """Put the certificate where ENTITLE_PAYPAL_CERT_CACHE looks for it."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / (hashlib.sha256(url.encode()).hexdigest() + ".pem")).write_bytes(
            self.leaf_pem()
        )

    def headers(
        self,
        body: bytes,
        webhook_id: str = WEBHOOK_ID,
        url: str = CERT_URL,
        transmission_time: str | None = None,
    ) -> dict[str, str]:
        transmission_id = f"tx-{next(_ids)}-{int(time.time() * 1000)}"
        sent = transmission_time or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = f"{transmission_id}|{sent}|{webhook_id}|{zlib.crc32(body)}".encode()
        signature = self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return {
            "PAYPAL-TRANSMISSION-ID": transmission_id,
            "PAYPAL-TRANSMISSION-TIME": sent,
            "PAYPAL-TRANSMISSION-SIG": base64.b64encode(signature).decode(),
            "PAYPAL-CERT-URL": url,
            "PAYPAL-AUTH-ALGO": "SHA256withRSA",
            "Content-Type": "application/json",
        }


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(kind: str, resource_type: str, resource: dict[str, Any], created: int) -> dict[str, Any]:
    return {
        "id": f"WH-{int(time.time() * 1000):X}-{next(_ids):06d}",
        "event_version": "1.0",
        "create_time": iso(created),
        "resource_type": resource_type,
        "resource_version": "2.0",
        "event_type": kind,
        "summary": kind.lower(),
        "resource": resource,
    }


def subscription(
    kind: str, sub: str, status: str, next_billing: int | None, updated: int, plan: str = "P-BASIC"
) -> dict[str, Any]:
    return _event(
        kind,
        "subscription",
        {
            "id": sub,
            "plan_id": plan,
            "status": status,
            "quantity": "1",
            "start_time": iso(updated),
            "update_time": iso(updated),
            "subscriber": {"email_address": "pp@example.com", "payer_id": "PAYER1"},
            "billing_info": {
                "next_billing_time": iso(next_billing) if next_billing else None,
                "failed_payments_count": 1 if "FAILED" in kind else 0,
            },
        },
        updated,
    )


def sale(sub: str, sale_id: str, created: int, total: str = "9.99") -> dict[str, Any]:
    return _event(
        "PAYMENT.SALE.COMPLETED",
        "sale",
        {
            "id": sale_id,
            "state": "completed",
            "billing_agreement_id": sub,
            "amount": {"total": total, "currency": "USD"},
            "create_time": iso(created),
        },
        created,
    )


def refund(sale_id: str, created: int, total: str = "-9.99") -> dict[str, Any]:
    return _event(
        "PAYMENT.SALE.REFUNDED",
        "refund",
        {
            "id": f"R{sale_id}",
            "state": "completed",
            "sale_id": sale_id,
            "amount": {"total": total, "currency": "USD"},
            "create_time": iso(created),
        },
        created,
    )


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# -- the conformance suite's fixture set ---------------------------------------------


def _amount(minor: int) -> str:
    return f"{minor / 100:.2f}"


def _links(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"href": href, "rel": rel, "method": "GET"} for rel, href in pairs]


def _webhook(kind: str, resource_type: str, resource: dict[str, Any], at: int) -> dict[str, Any]:
    """The envelope of every PayPal webhook (event_version 1.0)."""
    event_id = f"WH-{next(_ids):08d}{int(time.time() * 1000) % 10**8:08d}"
    return {
        "id": event_id,
        "event_version": "1.0",
        "create_time": iso(at),
        "resource_type": resource_type,
        "resource_version": "2.0",
        "event_type": kind,
        "summary": kind.replace(".", " ").lower(),
        "resource": resource,
        "links": _links(
            ("self", f"https://api.paypal.com/v1/notifications/webhooks-events/{event_id}")
        ),
    }


def local(ts: int, hours: int = -7) -> str:
    """`ts` as PayPal's v2 payments write it: local time with its offset."""
    zone = timezone(timedelta(hours=hours))
    return datetime.fromtimestamp(ts, zone).isoformat(timespec="seconds")


class PayPalFixtures:
    """PayPal's shapes for the conformance suite (sources in the module
    docstring). PayPal signs with a certificate, not a shared secret: the
    suite's "secret" is the webhook id the signature covers, and the
    certificate is a test one, trusted by the adapter's certificate store
    while the suite runs."""

    provider = "paypal"

    def __init__(self) -> None:
        from tests.lifecycle_world import T0

        self.price = {"basic": "P-BASIC", "pro": "P-PRO"}
        #: One-off sales: the `sku` of an order's items, mapped beside the plan.
        self.item = {"basic": "ITEM-BASIC", "pro": "ITEM-PRO"}
        # The plans bill every 30 days (billing_cycles[].frequency: DAY x 30),
        # the suite's month: a sale pays one such cycle.
        self.catalog = Catalog(
            [
                Offering(
                    sku=sku,
                    product="acme",
                    seats=seats,
                    period="P30D",
                    prices={"paypal": (self.price[sku], self.item[sku])},
                )
                for sku, seats in (("basic", 1), ("pro", 5))
            ]
        )
        self._t0 = T0
        self._authorities: dict[str, Authority] = {}

    def _t(self, offset: int) -> int:
        return int(self._t0.timestamp()) + offset

    # -- signatures ------------------------------------------------------------

    def _authority(self, url: str) -> Authority:
        """A test certificate at `url`, valid around the suite's clock, and
        the adapter's certificate store serving and trusting it: the test
        roots are its only roots (no test verifies a real PayPal chain
        in-process; other URLs are still fetched as before)."""
        from services.providers import paypal

        if url not in self._authorities:
            first = next(iter(self._authorities.values()), None)
            self._authorities[url] = (
                first.renewed(self._t0) if first else Authority.make(now=self._t0)
            )
        store = paypal.CERTIFICATES
        if not getattr(store, "conformance", False):
            previous = store
            mine = self._authorities

            def fetch(cert_url: str) -> bytes:
                if cert_url in mine:
                    return mine[cert_url].leaf_pem()
                return previous.fetch(cert_url)

            def roots() -> list[x509.Certificate]:
                return [next(iter(mine.values())).root]

            store = paypal.Certificates(fetch=fetch, roots=roots, cache_dir=previous.cache_dir)
            store.conformance = True  # type: ignore[attr-defined]
            paypal.CERTIFICATES = store
        return self._authorities[url]

    def credentials(self, secret: str) -> Credentials:
        return Credentials("", webhook_id=secret)

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        return self._signed(body, secret, at, CONFORMANCE_CERT_URL)

    def _signed(self, body: bytes, secret: str, at: float, url: str) -> dict[str, str]:
        authority = self._authority(url)
        sent = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        headers = authority.headers(body, webhook_id=secret, url=url, transmission_time=sent)
        return {k.lower(): v for k, v in headers.items()}

    def signature_age_limit(self) -> float:
        raise NotSupported(
            "PayPal names no age limit for PAYPAL-TRANSMISSION-TIME (its SDKs check none) and "
            "resends a webhook 25 times over three days; a source bounds it with "
            "tolerance_seconds (tests/test_paypal.py)"
        )

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        # PayPal shares no secret to rotate: it rotates its signing
        # certificate, and each delivery names the one it used in
        # PAYPAL-CERT-URL (fetched and chain-checked like the first).
        return self._signed(body, new, at, CONFORMANCE_CERT_URL.replace("-1", "-2"))

    # -- a subscription's life -----------------------------------------------

    def _subscription(
        self,
        kind: str,
        sub: str,
        sku: str,
        status: str,
        start: int,
        at: int,
        next_billing: int | None = None,
        last_paid: int | None = None,
        failed: int = 0,
        outstanding: int = 0,
        note: str | None = None,
    ) -> dict[str, Any]:
        billing: dict[str, Any] = {
            "outstanding_balance": {"currency_code": "USD", "value": _amount(outstanding)},
            "cycle_executions": [
                {
                    "tenure_type": "REGULAR",
                    "sequence": 1,
                    "cycles_completed": 1,
                    "cycles_remaining": 0,
                    "current_pricing_scheme_version": 1,
                    "total_cycles": 0,
                }
            ],
            "failed_payments_count": failed,
        }
        if last_paid is not None:
            billing["last_payment"] = {
                "amount": {"currency_code": "USD", "value": "99.00"},
                "time": iso(self._t(last_paid)),
            }
        if next_billing is not None:
            billing["next_billing_time"] = iso(self._t(next_billing))
        if failed:
            billing["last_failed_payment"] = {
                "amount": {"currency_code": "USD", "value": "99.00"},
                "time": iso(self._t(at)),
                "reason_code": "PAYMENT_DENIED",
            }
        resource: dict[str, Any] = {
            "id": sub,
            "plan_id": self.price[sku],
            "status": status,
            "status_update_time": iso(self._t(at)),
            "quantity": "1",
            "plan_overridden": False,
            "shipping_amount": {"currency_code": "USD", "value": "0.0"},
            "subscriber": {
                "name": {"given_name": "John", "surname": "Doe"},
                "email_address": "customer@example.com",
                "payer_id": "2GRYK9AY6RNE4",
            },
            "create_time": iso(self._t(start)),
            "start_time": iso(self._t(start)),
            "update_time": iso(self._t(at)),
            "billing_info": billing,
            "links": _links(("self", f"https://api.paypal.com/v1/billing/subscriptions/{sub}")),
        }
        if note is not None:
            resource["status_change_note"] = note
        return _webhook(kind, "subscription", resource, self._t(at))

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            self._subscription(
                "BILLING.SUBSCRIPTION.ACTIVATED", sub, sku, "ACTIVE", start, at, next_billing=end
            )
        ]

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Any]:
        # PayPal makes the sale when it bills the cycle (its create_time is
        # the cycle's start); the webhook follows at `at`.
        sale = {
            "id": invoice,
            "state": "completed",
            "amount": {
                "total": _amount(amount),
                "currency": "USD",
                "details": {"subtotal": _amount(amount)},
            },
            "payment_mode": "INSTANT_TRANSFER",
            "protection_eligibility": "ELIGIBLE",
            "protection_eligibility_type": (
                "ITEM_NOT_RECEIVED_ELIGIBLE,UNAUTHORIZED_PAYMENT_ELIGIBLE"
            ),
            "transaction_fee": {"value": "0.91", "currency": "USD"},
            "billing_agreement_id": sub,
            "create_time": iso(self._t(start)),
            "update_time": iso(self._t(start)),
            "links": _links(
                ("self", f"https://api.paypal.com/v1/payments/sale/{invoice}"),
                ("refund", f"https://api.paypal.com/v1/payments/sale/{invoice}/refund"),
            ),
        }
        return [_webhook("PAYMENT.SALE.COMPLETED", "sale", sale, self._t(at))]

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Any]:
        return [
            self._subscription(
                "BILLING.SUBSCRIPTION.PAYMENT.FAILED",
                sub,
                sku,
                "ACTIVE",
                0,
                at,
                next_billing=start,
                failed=1,
                outstanding=9900,
            )
        ]

    def cancel_at_period_end(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # PayPal cancels at once (no next_billing_time): the cycle last
        # paid (last_payment.time, the cycle's start) is what is left.
        return [
            self._subscription(
                "BILLING.SUBSCRIPTION.CANCELLED",
                sub,
                sku,
                "CANCELLED",
                0,
                at,
                last_paid=start,
                note="Not needed anymore",
            )
        ]

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return self.cancel_at_period_end(sub, sku, start, end, at)

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        # Suspended by the merchant (POST .../suspend with a reason): no
        # failed payment, the reason in status_change_note.
        return [
            self._subscription(
                "BILLING.SUBSCRIPTION.SUSPENDED",
                sub,
                sku,
                "SUSPENDED",
                0,
                at,
                last_paid=start,
                note="Item out of stock",
            )
        ]

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Any]:
        return [
            self._subscription(
                "BILLING.SUBSCRIPTION.ACTIVATED",
                sub,
                sku,
                "ACTIVE",
                0,
                at,
                next_billing=end,
                last_paid=start,
                note="Reactivating on customer request",
            )
        ]

    # -- money back ----------------------------------------------------------------

    def refunded(self, sub: str, invoice: str, amount: int, refunded: int, at: int) -> list[Any]:
        refund_id = f"R{next(_ids):06d}{invoice}"
        resource = {
            "id": refund_id,
            "state": "completed",
            "amount": {"total": "-" + _amount(refunded), "currency": "USD"},
            "refund_to_payer": {"value": _amount(refunded), "currency": "USD"},
            "sale_id": invoice,
            "parent_payment": f"PAY-{invoice}",
            "refund_reason_code": "REFUND",
            "create_time": iso(self._t(at)),
            "update_time": iso(self._t(at)),
            "links": _links(
                ("self", f"https://api.paypal.com/v1/payments/refund/{refund_id}"),
                ("sale", f"https://api.paypal.com/v1/payments/sale/{invoice}"),
            ),
        }
        return [_webhook("PAYMENT.SALE.REFUNDED", "refund", resource, self._t(at))]

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Any]:
        return [dispute_event(dispute, invoice, state, self._t(at))]

    # -- one-off sales -----------------------------------------------------------------

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Any]:
        # The Orders v2 flow: the buyer approves (items), the merchant captures.
        return [
            order_event("CHECKOUT.ORDER.APPROVED", order, self.item[sku], self._t(at), amount),
            capture_completed(f"CAP-{order}", order, self._t(at) + 5, amount),
        ]

    # -- bad input ---------------------------------------------------------------

    def without_zone(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["create_time"] = payload["create_time"].removesuffix("Z")
        payload["resource"]["create_time"] = payload["resource"]["create_time"].removesuffix("Z")
        return payload

    def with_quantity(self, payload: dict[str, Any], quantity: int) -> dict[str, Any]:
        resource = payload["resource"]
        if "quantity" not in resource:
            raise NotSupported(
                "a PayPal sale names no quantity: the subscription's `quantity` is the only one"
            )
        resource["quantity"] = str(quantity)
        return payload

    def with_price(self, payload: dict[str, Any], price: str) -> dict[str, Any]:
        # A sale names no plan: what buys one is the subscription it pays
        # (billing_agreement_id), whose events name the plan.
        sub = payload["resource"]["billing_agreement_id"]
        event = self._subscription(
            "BILLING.SUBSCRIPTION.UPDATED", sub, "basic", "ACTIVE", 0, 30, next_billing=86400
        )
        event["resource"]["plan_id"] = price
        return event


CONFORMANCE_CERT_URL = (
    "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-conformance-1"
)

DISPUTE_OUTCOME = {"won": "RESOLVED_SELLER_FAVOUR", "lost": "RESOLVED_BUYER_FAVOUR"}


def dispute_event(dispute: str, transaction: str, state: str, at: int) -> dict[str, Any]:
    """CUSTOMER.DISPUTE.CREATED (state open) or .RESOLVED (won, lost)."""
    resource: dict[str, Any] = {
        "dispute_id": dispute,
        "create_time": iso(at),
        "update_time": iso(at),
        "disputed_transactions": [
            {
                "seller_transaction_id": transaction,
                "seller": {"merchant_id": "RD465XN5VS364", "name": "Test Store"},
                "items": [],
                "seller_protection_eligible": True,
            }
        ],
        "reason": "MERCHANDISE_OR_SERVICE_NOT_RECEIVED",
        "status": "OPEN" if state == "open" else "RESOLVED",
        "dispute_amount": {"currency_code": "USD", "value": "99.00"},
        "dispute_life_cycle_stage": "CHARGEBACK",
        "dispute_channel": "INTERNAL",
        "links": _links(("self", f"https://api.paypal.com/v1/customer/disputes/{dispute}")),
    }
    kind = "CUSTOMER.DISPUTE.CREATED"
    if state != "open":
        kind = "CUSTOMER.DISPUTE.RESOLVED"
        resource["dispute_outcome"] = {
            "outcome_code": DISPUTE_OUTCOME.get(state, state),
            "amount_refunded": {
                "currency_code": "USD",
                "value": "99.00" if state == "lost" else "0.00",
            },
        }
    return _webhook(kind, "dispute", resource, at)


def order_event(
    kind: str,
    order: str,
    item_sku: str,
    at: int,
    amount: int = 4900,
    captures: list[dict[str, Any]] | None = None,
    quantity: str = "1",
) -> dict[str, Any]:
    """CHECKOUT.ORDER.APPROVED / COMPLETED: the order resource of
    https://developer.paypal.com/docs/api/orders/v2/#orders_get."""
    unit: dict[str, Any] = {
        "reference_id": "default",
        "amount": {
            "currency_code": "USD",
            "value": _amount(amount),
            "breakdown": {"item_total": {"currency_code": "USD", "value": _amount(amount)}},
        },
        "payee": {"email_address": "merchant@example.com", "merchant_id": "RD465XN5VS364"},
        "items": [
            {
                "name": "License",
                "unit_amount": {"currency_code": "USD", "value": _amount(amount)},
                "quantity": quantity,
                "sku": item_sku,
                "category": "DIGITAL_GOODS",
            }
        ],
    }
    if captures is not None:
        unit["payments"] = {"captures": captures}
    resource = {
        "id": order,
        "intent": "CAPTURE",
        "status": "COMPLETED" if kind.endswith("COMPLETED") else "APPROVED",
        "purchase_units": [unit],
        "payer": {
            "name": {"given_name": "John", "surname": "Doe"},
            "email_address": "buyer@example.com",
            "payer_id": "QYR5Z8XDVJNXQ",
        },
        "create_time": iso(at - 60),
        "update_time": iso(at),
        "links": _links(("self", f"https://api.paypal.com/v2/checkout/orders/{order}")),
    }
    return _webhook(kind, "checkout-order", resource, at)


def capture(capture_id: str, order: str, at: int, amount: int = 4900) -> dict[str, Any]:
    """A capture (https://developer.paypal.com/docs/api/payments/v2/#captures_get),
    its times in local time with an offset as PayPal's sample has them."""
    return {
        "id": capture_id,
        "amount": {"currency_code": "USD", "value": _amount(amount)},
        "final_capture": True,
        "seller_protection": {
            "status": "ELIGIBLE",
            "dispute_categories": ["ITEM_NOT_RECEIVED", "UNAUTHORIZED_TRANSACTION"],
        },
        "seller_receivable_breakdown": {
            "gross_amount": {"currency_code": "USD", "value": _amount(amount)},
            "paypal_fee": {"currency_code": "USD", "value": "0.37"},
            "net_amount": {"currency_code": "USD", "value": _amount(amount - 37)},
        },
        "status": "COMPLETED",
        "supplementary_data": {"related_ids": {"order_id": order}},
        "create_time": local(at),
        "update_time": local(at),
        "links": _links(
            ("self", f"https://api.paypal.com/v2/payments/captures/{capture_id}"),
            ("up", f"https://api.paypal.com/v2/checkout/orders/{order}"),
        ),
    }


def capture_completed(capture_id: str, order: str, at: int, amount: int = 4900) -> dict[str, Any]:
    return _webhook(
        "PAYMENT.CAPTURE.COMPLETED", "capture", capture(capture_id, order, at, amount), at
    )


def capture_refund(
    kind: str, capture_id: str, at: int, amount: int, refund_id: str | None = None
) -> dict[str, Any]:
    """PAYMENT.CAPTURE.REFUNDED / REVERSED: a v2 refund, naming its capture
    only in links[rel=up] (PayPal's PAYMENT.CAPTURE.REVERSED sample)."""
    refund_id = refund_id or f"RF{next(_ids):06d}"
    resource = {
        "id": refund_id,
        "amount": {"currency_code": "USD", "value": _amount(amount)},
        "seller_payable_breakdown": {
            "gross_amount": {"currency_code": "USD", "value": _amount(amount)},
            "paypal_fee": {"currency_code": "USD", "value": "0.00"},
            "net_amount": {"currency_code": "USD", "value": _amount(amount)},
            "total_refunded_amount": {"currency_code": "USD", "value": _amount(amount)},
        },
        "note_to_payer": "Payment reversed" if kind.endswith("REVERSED") else "Refund",
        "status": "COMPLETED",
        "create_time": local(at),
        "update_time": local(at),
        "links": _links(
            ("self", f"https://api.paypal.com/v2/payments/refunds/{refund_id}"),
            ("up", f"https://api.paypal.com/v2/payments/captures/{capture_id}"),
        ),
    }
    return _webhook(kind, "refund", resource, at)


FIXTURES = PayPalFixtures()
