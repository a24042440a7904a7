"""PayPal Subscriptions: offline webhook verification and subscription/sale events.

PayPal signs "{transmission id}|{transmission time}|{webhook id}|{crc32 of
the raw body}" with RSA-SHA256, using the certificate at PAYPAL-CERT-URL.
That certificate is fetched only over HTTPS from PayPal's own API hosts,
its chain must lead to a trusted root and be valid now, and it is cached
(in memory, and on disk with ENTITLE_PAYPAL_CERT_CACHE, which also lets an
offline host be seeded). ENTITLE_PAYPAL_TRUST_ROOTS names a PEM file of
roots to trust instead of the system's (certifi's) bundle.

A subscription's slot is "plan": a plan change (revision) keeps the
entitlement. PAYMENT.SALE.COMPLETED names no period and no plan: it pays one
period of the entitlement's offering from the sale time. Refunds and
reversals of sales and captures, disputes, and one-off orders (Orders v2:
CHECKOUT.ORDER.*, PAYMENT.CAPTURE.*) reach the entitlement too; each rule
names the PayPal page it comes from. Every time must carry an offset.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import threading
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from domain import lifecycle
from domain.catalog import Catalog, add_period
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    MAX_QUANTITY,
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
    listed,
    parse_time,
    ref,
    text_id,
)

NAME = "paypal"
SLOT = "plan"
CERT_HOSTS = frozenset(
    {"api.paypal.com", "api-m.paypal.com", "api.sandbox.paypal.com", "api-m.sandbox.paypal.com"}
)
SUBSCRIPTION_EVENTS = frozenset(
    {
        "BILLING.SUBSCRIPTION.CREATED",
        "BILLING.SUBSCRIPTION.ACTIVATED",
        "BILLING.SUBSCRIPTION.UPDATED",
        "BILLING.SUBSCRIPTION.RE-ACTIVATED",
        "BILLING.SUBSCRIPTION.SUSPENDED",
        "BILLING.SUBSCRIPTION.CANCELLED",
        "BILLING.SUBSCRIPTION.EXPIRED",
        "BILLING.SUBSCRIPTION.PAYMENT.FAILED",
    }
)
SALE_MONEY_BACK = frozenset({"PAYMENT.SALE.REFUNDED", "PAYMENT.SALE.REVERSED"})
CAPTURE_MONEY_BACK = frozenset({"PAYMENT.CAPTURE.REFUNDED", "PAYMENT.CAPTURE.REVERSED"})
DISPUTE_EVENTS = frozenset(
    {"CUSTOMER.DISPUTE.CREATED", "CUSTOMER.DISPUTE.UPDATED", "CUSTOMER.DISPUTE.RESOLVED"}
)
ORDER_EVENTS = frozenset({"CHECKOUT.ORDER.APPROVED", "CHECKOUT.ORDER.COMPLETED"})
STATUSES = {
    "APPROVAL_PENDING": "pending",
    "APPROVED": "pending",
    "ACTIVE": "active",
    "SUSPENDED": "suspended",
    "CANCELLED": "canceled",
    "EXPIRED": "expired",
}


def _https_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read(64 * 1024)
        return body


def _system_roots() -> list[x509.Certificate]:
    path = os.environ.get("ENTITLE_PAYPAL_TRUST_ROOTS")
    if not path:
        import certifi

        path = certifi.where()
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


class Certificates:
    """PayPal's signing certificates by URL: fetched from allow-listed hosts
    only, chain- and time-checked on every use, cached."""

    def __init__(
        self,
        fetch: Callable[[str], bytes] = _https_get,
        roots: Callable[[], list[x509.Certificate]] = _system_roots,
        cache_dir: Path | None = None,
    ) -> None:
        self.fetch = fetch
        self.roots = roots
        self.cache_dir = cache_dir
        self._chains: dict[str, list[x509.Certificate]] = {}
        self._trusted: list[x509.Certificate] | None = None
        self._lock = threading.Lock()

    def signing_key(self, url: str, now: datetime) -> rsa.RSAPublicKey:
        try:
            parts = urlsplit(url)  # raises on "https://[::1/x"; .port on ":99999"
            fits = parts.scheme == "https" and parts.hostname in CERT_HOSTS and not parts.port
        except ValueError:
            fits = False
        if not fits:
            raise SignatureError("PAYPAL-CERT-URL is not an https URL on a PayPal API host")
        chain = self._chain(url)
        self._check(chain, now)
        key = chain[0].public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SignatureError("PayPal's certificate does not hold an RSA key")
        return key

    def _chain(self, url: str) -> list[x509.Certificate]:
        with self._lock:
            if url in self._chains:
                return self._chains[url]
        cached = (
            self.cache_dir / (hashlib.sha256(url.encode()).hexdigest() + ".pem")
            if (self.cache_dir)
            else None
        )
        if cached is not None and cached.exists():
            pem = cached.read_bytes()
        else:
            try:
                pem = self.fetch(url)
            except Exception as exc:
                raise SignatureError(f"cannot fetch PayPal's certificate: {exc}") from None
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(pem)
        try:
            chain = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise SignatureError("PAYPAL-CERT-URL did not return PEM certificates") from None
        with self._lock:
            self._chains[url] = chain
        return chain

    def _check(self, chain: list[x509.Certificate], now: datetime) -> None:
        if self._trusted is None:
            self._trusted = self.roots()
        common = chain[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not common or not str(common[0].value).endswith(".paypal.com"):
            raise SignatureError("PayPal's certificate is not issued to a paypal.com name")
        for cert in chain:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise SignatureError("PayPal's certificate chain is expired or not yet valid")
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise SignatureError("PayPal's certificate chain does not link up") from None
        top = chain[-1]
        for root in self._trusted:
            if root == top:
                return
            try:
                top.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                return
        raise SignatureError("PayPal's certificate does not chain to a trusted root")


def _default_certificates() -> Certificates:
    cache = os.environ.get("ENTITLE_PAYPAL_CERT_CACHE")
    return Certificates(cache_dir=Path(cache) if cache else None)


CERTIFICATES = _default_certificates()


def verify(headers: Mapping[str, str], body: bytes, credentials: Credentials, now: float) -> None:
    transmission_id = headers.get("paypal-transmission-id")
    transmission_time = headers.get("paypal-transmission-time")
    signature = headers.get("paypal-transmission-sig")
    cert_url = headers.get("paypal-cert-url")
    algorithm = headers.get("paypal-auth-algo", "SHA256withRSA")
    if not (transmission_id and transmission_time and signature and cert_url):
        raise SignatureError(
            "needs PAYPAL-TRANSMISSION-ID, -TIME, -SIG and PAYPAL-CERT-URL headers"
        )
    if algorithm != "SHA256withRSA":
        raise SignatureError(f"PAYPAL-AUTH-ALGO {algorithm!r} is not SHA256withRSA")
    if credentials.tolerance_seconds is not None:
        try:
            sent = datetime.fromisoformat(transmission_time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise SignatureError("PAYPAL-TRANSMISSION-TIME is not an ISO 8601 time") from None
        if abs(now - sent) > credentials.tolerance_seconds:
            raise SignatureError("PAYPAL-TRANSMISSION-TIME is outside the tolerance")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("PAYPAL-TRANSMISSION-SIG is not base64") from None
    message = f"{transmission_id}|{transmission_time}|{credentials.webhook_id}|{zlib.crc32(body)}"
    key = CERTIFICATES.signing_key(cert_url, datetime.fromtimestamp(now, UTC))
    try:
        key.verify(raw_signature, message.encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise SignatureError("PAYPAL-TRANSMISSION-SIG does not match the payload") from None


def _resource(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    resource = payload.get("resource")
    if not isinstance(resource, Mapping):
        raise Unmappable("PayPal event has no resource")
    return resource


def routing_key(payload: Mapping[str, Any]) -> str:
    resource = payload.get("resource")
    if isinstance(resource, Mapping):
        kind = str(payload.get("event_type", ""))
        if kind.startswith("BILLING.SUBSCRIPTION."):
            return str(resource.get("id", ""))
        if kind in SALE_MONEY_BACK:
            return f"sale/{resource.get('sale_id')}"
        if kind in CAPTURE_MONEY_BACK:
            return f"capture/{_link(resource, 'up') or ''}"
        if kind.startswith("CUSTOMER.DISPUTE."):
            return f"dispute/{resource.get('dispute_id')}"
        if kind == "PAYMENT.CAPTURE.COMPLETED":
            return str(_capture_order(resource) or resource.get("id", ""))
        return str(resource.get("billing_agreement_id") or resource.get("id", ""))
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _time(value: Any, what: str) -> datetime | None:
    """An RFC 3339 time of the payload. PayPal writes UTC ("…Z") or a
    local offset ("2018-08-15T14:30:10-07:00" in its capture samples);
    one without an offset is unmappable, naming the field."""
    return parse_time(value, f"PayPal {what}")


def _money(value: Any) -> str | None:
    """The amount of a v1 `amount` ({total, currency}) or a v2 `money`
    ({value, currency_code}), without sign (v1 refunds are negative)."""
    if isinstance(value, Mapping):
        amount = value.get("total") if value.get("total") is not None else value.get("value")
        return None if amount is None else str(amount).lstrip("-")
    return None


def _amount(resource: Mapping[str, Any]) -> str | None:
    return _money(resource.get("amount"))


def _link(resource: Mapping[str, Any], rel: str) -> str | None:
    """The last path segment of the resource's HATEOAS link `rel`: a v2
    refund names its capture only there (`rel: up`,
    https://developer.paypal.com/docs/api/payments/v2/#refunds_get)."""
    for link in listed(resource.get("links"), "PayPal links"):
        if isinstance(link, Mapping) and link.get("rel") == rel:
            href = ref(link.get("href"), f"PayPal links[{rel}].href")
            if href:
                return urlsplit(href).path.rstrip("/").rsplit("/", 1)[-1] or None
    return None


def _capture_order(resource: Mapping[str, Any]) -> str | None:
    """The order a capture belongs to: `supplementary_data.related_ids.order_id`
    (https://developer.paypal.com/docs/api/payments/v2/#captures_get)."""
    supplementary = resource.get("supplementary_data")
    related = supplementary.get("related_ids") if isinstance(supplementary, Mapping) else None
    if isinstance(related, Mapping):
        return ref(related.get("order_id"), "PayPal supplementary_data.related_ids.order_id")
    return None


def normalize(
    source: str, payload: Mapping[str, Any], catalog: Catalog, received_at: datetime
) -> list[Command]:
    kind = payload.get("event_type")
    if not isinstance(kind, str) or not event_id(payload):
        raise Unmappable("not a PayPal event: it needs event_type and id")
    resource = _resource(payload)
    created = _time(payload.get("create_time"), "create_time")
    if created is None:
        raise Unmappable("PayPal event has no create_time")
    cause = Cause.provider(source, event_id(payload))
    if kind in SUBSCRIPTION_EVENTS:
        return [_subscription(kind, source, resource, catalog, cause, created)]
    if kind == "PAYMENT.SALE.COMPLETED":
        return [_sale(source, resource, cause, created)]
    if kind in SALE_MONEY_BACK:
        sale = ref(resource.get("sale_id"), "PayPal sale_id")
        if not sale:
            raise Unmappable(f"PayPal {kind} names no sale_id")
        return _money_back(source, f"sale/{sale}", resource, cause, created)
    if kind in CAPTURE_MONEY_BACK:
        capture = _link(resource, "up")
        if not capture:
            raise Unmappable(f"PayPal {kind} names no capture (links[rel=up])")
        return _money_back(source, f"capture/{capture}", resource, cause, created)
    if kind in DISPUTE_EVENTS:
        return [_dispute(kind, source, resource, cause, created)]
    if kind in ORDER_EVENTS:
        return _order(kind, source, resource, catalog, cause, created)
    if kind == "PAYMENT.CAPTURE.COMPLETED":
        return [_capture(source, resource, cause, created)]
    return []


def _subscription(
    kind: str,
    source: str,
    resource: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    created: datetime,
) -> Command:
    """A BILLING.SUBSCRIPTION.* event: the subscription resource
    (https://developer.paypal.com/docs/api/subscriptions/v1/#subscriptions_get)
    as it is now.

    SUSPENDED is read, not guessed: PayPal itself suspends a subscription
    whose `billing_info.failed_payments_count` reached the plan's
    `payment_failure_threshold` (https://developer.paypal.com/docs/api/subscriptions/v1/#definition-subscription_billing_info),
    which is dunning (`unpaid`: overdue, then suspended or expired by the
    offering's thresholds after the paid-through date); with no failed
    payment the merchant suspended it (`status_change_note` holds their
    reason): a pause, no access until it is activated again.

    CANCELLED is immediate at PayPal and refunds nothing
    (https://developer.paypal.com/docs/api/subscriptions/v1/#subscriptions_cancel):
    the buyer keeps the cycle last paid (`billing_info.last_payment.time`
    plus the offering's period, the same rule as a sale's period), then the
    entitlement is canceled; one never paid is canceled at once."""
    subscription_id = ref(resource.get("id"), "PayPal subscription id")
    plan = ref(resource.get("plan_id"), "PayPal plan_id")
    status = STATUSES.get(str(resource.get("status")))
    if not subscription_id or status is None:
        raise Unmappable(f"PayPal subscription has status {resource.get('status')!r}")
    offering = catalog.for_price(NAME, None if plan is None else str(plan), None)
    if offering is None:
        raise Unmappable(f"plan {plan!r} maps to no offering in the catalog")
    quantity = _quantity(resource.get("quantity"))
    line = Line(SLOT, offering, quantity)
    billing = resource.get("billing_info")
    billing = billing if isinstance(billing, Mapping) else {}
    failures = billing.get("failed_payments_count") or 0
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        raise Unmappable(f"PayPal billing_info.failed_payments_count {failures!r:.40} is no count")
    last_payment = billing.get("last_payment")
    paid_at = _time(
        last_payment.get("time") if isinstance(last_payment, Mapping) else None,
        "billing_info.last_payment.time",
    )
    cancel_at = None
    if kind == "BILLING.SUBSCRIPTION.PAYMENT.FAILED" and status == "active":
        status = "past_due"  # until a later payment settles it
    elif status == "suspended":
        status = "unpaid" if failures > 0 else "paused"
    elif status == "canceled" and paid_at is not None:
        status, cancel_at = "active", add_period(paid_at, offering.period)
    ended = str(resource.get("status")) in ("CANCELLED", "EXPIRED")
    fact = lifecycle.subscription(
        status,
        [line],
        _time(resource.get("start_time"), "start_time"),
        _time(billing.get("next_billing_time"), "billing_info.next_billing_time"),
        cancel_at=cancel_at,
        state={
            "paypal_status": str(resource.get("status")),
            "failed_payments_count": failures,
            "outstanding_balance": _money(billing.get("outstanding_balance")),
            "status_change_note": ref(
                resource.get("status_change_note"), "PayPal status_change_note"
            ),
        },
        final=ended,
    )
    subscriber = resource.get("subscriber")
    subscriber = subscriber if isinstance(subscriber, Mapping) else {}
    email = ref(subscriber.get("email_address"), "PayPal subscriber.email_address")
    payer = ref(subscriber.get("payer_id"), "PayPal subscriber.payer_id")
    # Snapshots are ordered by when PayPal last changed the subscription.
    updated = _time(
        resource.get("update_time") or resource.get("status_update_time"), "update_time"
    )
    return OrderEvent(
        source,
        str(subscription_id),
        fact,
        (line,),
        cause,
        updated or created,
        Customer(id=payer, email=email),
    )


def _sale(source: str, resource: Mapping[str, Any], cause: Cause, created: datetime) -> Command:
    """PAYMENT.SALE.COMPLETED of a subscription (`billing_agreement_id`,
    https://developer.paypal.com/docs/subscriptions/reference/webhooks/):
    it names no period and no plan, so it pays one period of the
    entitlement's offering from the sale's `create_time`. A sale of no
    subscription (the v1 Payments API) names no item: unmappable."""
    agreement = ref(resource.get("billing_agreement_id"), "PayPal billing_agreement_id")
    sale = ref(resource.get("id"), "PayPal sale id")
    if not sale:
        raise Unmappable("PayPal sale has no id")
    if not agreement:
        raise Unmappable(
            f"PayPal sale {sale!r} names no billing_agreement_id: it pays no subscription,"
            " and a sale names no item to map"
        )
    when = _time(resource.get("create_time"), "sale create_time") or created
    fact = lifecycle.payment(f"sale/{sale}", [], starts=when, amount=_amount(resource))
    return OrderEvent(
        source,
        str(agreement),
        fact,
        (),
        cause,
        created,
        payment_refs=(f"sale/{sale}",),
        invoice=f"sale/{sale}",
    )


def _money_back(
    source: str, payment: str, resource: Mapping[str, Any], cause: Cause, created: datetime
) -> list[Command]:
    """A refund or reversal of a sale (PAYMENT.SALE.REFUNDED/REVERSED) or
    a capture (PAYMENT.CAPTURE.REFUNDED/REVERSED; a reversal is PayPal
    taking the money back, https://developer.paypal.com/api/rest/webhooks/event-names/#payments-v2).
    Full or partial is judged by its amount against the payment's; the
    refunds of one payment add up by their ids. A refund PayPal reports
    FAILED or CANCELLED refunds nothing; a PENDING one has moved no money
    yet (its completion is another event)."""
    refund_id = ref(resource.get("id"), "PayPal refund id")
    state = str(resource.get("status") or resource.get("state") or "completed").lower()
    if state == "pending":
        return []
    if state not in ("completed", "failed", "cancelled"):
        raise Unmappable(f"PayPal refund {refund_id!r} has status {state!r}")
    _time(resource.get("create_time"), "refund create_time")
    fact = lifecycle.refund(
        None,
        payment if payment.startswith("sale/") else None,  # a capture's order knows its invoice
        _amount(resource),
        refund_id=refund_id,
        failed=state != "completed",
    )
    return [PaymentEvent(source, (payment,), fact, cause, created)]


#: What a resolved dispute's `dispute_outcome.outcome_code` means for the
#: merchant (https://developer.paypal.com/docs/api/customer-disputes/v1/#definition-dispute_outcome):
#: lost where the buyer gets the money back, won where the merchant keeps it.
DISPUTE_OUTCOMES = {
    "RESOLVED_BUYER_FAVOUR": "lost",
    "ACCEPTED": "lost",  # the merchant accepted the claim (and refunded)
    "RESOLVED_SELLER_FAVOUR": "won",
    "CANCELED_BY_BUYER": "won",
    "DENIED": "won",
    "RESOLVED_WITH_PAYOUT": "won",  # PayPal paid the buyer itself
}


def _dispute(
    kind: str, source: str, resource: Mapping[str, Any], cause: Cause, created: datetime
) -> Command:
    """CUSTOMER.DISPUTE.CREATED/UPDATED/RESOLVED
    (https://developer.paypal.com/docs/disputes/webhooks/): open until
    RESOLVED, then won or lost by `dispute_outcome.outcome_code`. It names
    the payment by `disputed_transactions[].seller_transaction_id`: a
    subscription's sale or an order's capture."""
    dispute_id = ref(resource.get("dispute_id"), "PayPal dispute_id")
    if not dispute_id:
        raise Unmappable("PayPal dispute has no dispute_id")
    refs: list[str] = []
    for n, transaction in enumerate(
        listed(resource.get("disputed_transactions"), "PayPal disputed_transactions")
    ):
        seller = (
            transaction.get("seller_transaction_id") if isinstance(transaction, Mapping) else None
        )
        seller = ref(seller, f"PayPal disputed_transactions[{n}].seller_transaction_id")
        if seller:
            refs += [f"sale/{seller}", f"capture/{seller}"]
    if not refs:
        raise Unmappable(
            f"PayPal dispute {dispute_id!r} names no disputed_transactions[].seller_transaction_id"
        )
    status = resource.get("status")
    if kind == "CUSTOMER.DISPUTE.RESOLVED" or status == "RESOLVED":
        outcome = resource.get("dispute_outcome")
        code = outcome.get("outcome_code") if isinstance(outcome, Mapping) else None
        state = DISPUTE_OUTCOMES.get(str(code))
        if state is None:
            raise Unmappable(f"PayPal dispute {dispute_id!r} resolved with outcome_code {code!r}")
    else:
        state = "open"
    _time(resource.get("update_time"), "dispute update_time")
    fact = lifecycle.dispute(dispute_id, state)
    return PaymentEvent(source, tuple(refs), fact, cause, created)


def _items(resource: Mapping[str, Any], catalog: Catalog, unmapped: list[str]) -> list[Line]:
    """The lines of an order: `purchase_units[].items[]` whose `sku` maps
    to an offering (under `prices.paypal`), one slot per sku."""
    quantities: dict[str, tuple[Any, int]] = {}
    for u, unit in enumerate(listed(resource.get("purchase_units"), "PayPal purchase_units")):
        if not isinstance(unit, Mapping):
            raise Unmappable(f"PayPal purchase_units[{u}] is not an object")
        for i, item in enumerate(listed(unit.get("items"), f"PayPal purchase_units[{u}].items")):
            if not isinstance(item, Mapping):
                raise Unmappable(f"PayPal purchase_units[{u}].items[{i}] is not an object")
            sku = ref(item.get("sku"), f"PayPal purchase_units[{u}].items[{i}].sku")
            offering = catalog.for_price(NAME, sku, None)
            if offering is None:
                unmapped.append(f"item sku {sku!r} maps to no offering in the catalog")
                continue
            quantity = _quantity(item.get("quantity"))
            known = quantities.get(str(sku))
            quantities[str(sku)] = (offering, quantity + (known[1] if known else 0))
    return [Line(sku, offering, quantity) for sku, (offering, quantity) in quantities.items()]


def _order(
    kind: str,
    source: str,
    resource: Mapping[str, Any],
    catalog: Catalog,
    cause: Cause,
    created: datetime,
) -> list[Command]:
    """A one-off sale through the Orders API
    (https://developer.paypal.com/docs/api/orders/v2/#orders_get).
    CHECKOUT.ORDER.APPROVED names the items but is not paid: the
    entitlement waits (PENDING) for the capture. CHECKOUT.ORDER.COMPLETED
    names the items and their captures: paid, one period of each offering
    from the capture (a `period` of P100Y is a perpetual license). An order
    whose items map to nothing is unmappable."""
    order_id = ref(resource.get("id"), "PayPal order id")
    if not order_id:
        raise Unmappable("PayPal order has no id")
    unmapped: list[str] = []
    lines = _items(resource, catalog, unmapped)
    if not lines:
        raise Unmappable(
            "; ".join(unmapped)
            or f"PayPal order {order_id!r} names no item (purchase_units[].items[].sku)"
        )
    payer = resource.get("payer")
    payer = payer if isinstance(payer, Mapping) else {}
    customer = Customer(
        id=ref(payer.get("payer_id"), "PayPal payer.payer_id"),
        email=ref(payer.get("email_address"), "PayPal payer.email_address"),
    )
    updated = _time(resource.get("update_time"), "order update_time")
    order_at = _time(resource.get("create_time"), "order create_time")
    occurred = updated or order_at or created
    invoice = f"order/{order_id}"
    captures = [
        capture
        for unit in listed(resource.get("purchase_units"), "PayPal purchase_units")
        if isinstance(unit, Mapping) and isinstance(unit.get("payments"), Mapping)
        for capture in listed(unit["payments"].get("captures"), "PayPal payments.captures")
        if isinstance(capture, Mapping) and capture.get("status") == "COMPLETED"
    ]
    if kind == "CHECKOUT.ORDER.COMPLETED" and captures:
        capture_ids = [ref(c.get("id"), "PayPal capture id") for c in captures]
        paid_at = min(
            _time(c.get("create_time"), "capture create_time") or occurred for c in captures
        )
        try:
            total = sum(Decimal(_money(c.get("amount")) or "0") for c in captures)
        except InvalidOperation:
            raise Unmappable(
                f"PayPal order {order_id!r} has a capture amount that is no number"
            ) from None
        fact = lifecycle.payment(invoice, lines, starts=paid_at, amount=str(total))
        refs = tuple(f"capture/{c}" for c in capture_ids if c)
    else:
        fact = lifecycle.subscription("pending", lines, None, None)
        refs = ()
    command = OrderEvent(
        source, invoice, fact, tuple(lines), cause, occurred, customer, refs, invoice
    )
    if unmapped:
        raise Unmappable("; ".join(unmapped), [command])
    return [command]


def _capture(source: str, resource: Mapping[str, Any], cause: Cause, created: datetime) -> Command:
    """PAYMENT.CAPTURE.COMPLETED: the payment of an order
    (https://developer.paypal.com/docs/api/payments/v2/#captures_get). A
    capture names no item, only its order
    (`supplementary_data.related_ids.order_id`): it pays one period of what
    the order's CHECKOUT.ORDER.* event names, and waits for that event if
    it comes later (a dead letter if it never does)."""
    capture = ref(resource.get("id"), "PayPal capture id")
    order_id = _capture_order(resource)
    if not capture or not order_id:
        raise Unmappable("PayPal capture names no order (supplementary_data.related_ids.order_id)")
    paid_at = _time(resource.get("create_time"), "capture create_time") or created
    invoice = f"order/{order_id}"
    fact = lifecycle.payment(invoice, [], starts=paid_at, amount=_amount(resource))
    return OrderEvent(
        source, invoice, fact, (), cause, created, None, (f"capture/{capture}",), invoice
    )


def _quantity(value: Any) -> int:
    """PayPal's subscription quantity: a string of digits ("1") in its API
    (https://developer.paypal.com/docs/api/subscriptions/v1/#subscriptions_get),
    an integer accepted too; 1 if absent."""
    if value is None or value == "":
        return 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_QUANTITY:
        raise Unmappable(f"PayPal subscription quantity {value!r:.40} is not a number of seats")
    return value


PROVIDER = Provider(
    name=NAME,
    verify=verify,
    routing_key=routing_key,
    event_id=event_id,
    normalize=normalize,
    secret_required=False,
    needs=("webhook_id",),
    blocking_verify=True,
    headers=(
        "paypal-transmission-id",
        "paypal-transmission-time",
        "paypal-transmission-sig",
        "paypal-cert-url",
        "paypal-auth-algo",
    ),
)
