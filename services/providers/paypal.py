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
period of the entitlement's offering from the sale time.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from domain import lifecycle
from domain.catalog import Catalog
from domain.commands import Command, Customer, OrderEvent, PaymentEvent
from domain.entitlement import Cause
from domain.lifecycle import Line
from services.providers import (
    MAX_QUANTITY,
    Credentials,
    Provider,
    SignatureError,
    Unmappable,
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
        if kind == "PAYMENT.SALE.REFUNDED":
            return f"sale/{resource.get('sale_id')}"
        return str(resource.get("billing_agreement_id") or resource.get("id", ""))
    return text_id(payload.get("id"))


def event_id(payload: Mapping[str, Any]) -> str:
    return text_id(payload.get("id"))


def _time(value: Any, what: str) -> datetime | None:
    return parse_time(value, f"PayPal {what}")


def _amount(resource: Mapping[str, Any]) -> str | None:
    amount = resource.get("amount")
    if isinstance(amount, Mapping):
        value = amount.get("total") or amount.get("value")
        return None if value is None else str(value).lstrip("-")
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
        subscription_id = ref(resource.get("id"), "PayPal subscription id")
        plan = ref(resource.get("plan_id"), "PayPal plan_id")
        status = STATUSES.get(str(resource.get("status")))
        if not subscription_id or status is None:
            raise Unmappable(f"PayPal subscription has status {resource.get('status')!r}")
        if kind == "BILLING.SUBSCRIPTION.PAYMENT.FAILED" and status == "active":
            status = "past_due"  # until a later payment settles it
        offering = catalog.for_price(NAME, None if plan is None else str(plan), None)
        if offering is None:
            raise Unmappable(f"plan {plan!r} maps to no offering in the catalog")
        quantity = _quantity(resource.get("quantity"))
        line = Line(SLOT, offering, quantity)
        billing = resource.get("billing_info")
        next_billing = billing.get("next_billing_time") if isinstance(billing, Mapping) else None
        fact = lifecycle.subscription(
            status,
            [line],
            _time(resource.get("start_time"), "start_time"),
            _time(next_billing, "next_billing_time"),
        )
        subscriber = resource.get("subscriber")
        subscriber = subscriber if isinstance(subscriber, Mapping) else {}
        email = ref(subscriber.get("email_address"), "PayPal subscriber.email_address")
        payer = ref(subscriber.get("payer_id"), "PayPal subscriber.payer_id")
        # Snapshots are ordered by when PayPal last changed the subscription.
        updated = _time(
            resource.get("update_time") or resource.get("status_update_time"), "update_time"
        )
        return [
            OrderEvent(
                source,
                str(subscription_id),
                fact,
                (line,),
                cause,
                updated or created,
                Customer(id=payer, email=email),
            )
        ]
    if kind == "PAYMENT.SALE.COMPLETED":
        agreement = ref(resource.get("billing_agreement_id"), "PayPal billing_agreement_id")
        sale = ref(resource.get("id"), "PayPal sale id")
        if not agreement or not sale:
            return []  # not a subscription payment
        when = _time(resource.get("create_time"), "sale create_time") or created
        fact = lifecycle.payment(f"sale/{sale}", [], starts=when, amount=_amount(resource))
        return [
            OrderEvent(
                source,
                str(agreement),
                fact,
                (),
                cause,
                created,
                payment_refs=(f"sale/{sale}",),
                invoice=f"sale/{sale}",
            )
        ]
    if kind == "PAYMENT.SALE.REFUNDED":
        sale = resource.get("sale_id")
        if not sale:
            raise Unmappable("PayPal refund names no sale_id")
        fact = lifecycle.refund(None, f"sale/{sale}", _amount(resource))
        return [PaymentEvent(source, (f"sale/{sale}",), fact, cause, created)]
    return []


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
