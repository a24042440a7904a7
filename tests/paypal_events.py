"""PayPal webhooks signed with a locally generated CA and certificate, the way
PayPal signs them: RSA-SHA256 over "id|time|webhook id|crc32(body)"."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

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

    @classmethod
    def make(
        cls, expired: bool = False, common: str = "messageverificationcerts.sandbox.paypal.com"
    ) -> Authority:
        now = datetime.now(UTC)
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
        return cls(root, leaf, key)

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
