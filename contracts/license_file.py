"""The offline license file, and how a vendor's application checks it.

    {"license": {"format": "entitle-license/1", "key_id": "…", "entitlement_id": "…",
                 "activation_id": "…", "fingerprint": "…", "offering": "pro",
                 "product": "acme", "features": {…}, "limits": {…}, "status": "ACTIVE",
                 "period_end": "…", "issued_at": "…", "expires_at": "…"},
     "signature": "<base64 Ed25519 signature of canonical(license)>"}

canonical(license) is its JSON with sorted keys, no spaces, UTF-8. The public
key is served at GET /v1/keys (raw 32 bytes, base64). In the application:

    from contracts.license_file import verify_license
    license = verify_license(text, public_key_b64, fingerprint=this_device)
    if license.features.get("export"): ...
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT = "entitle-license/1"


class InvalidLicense(Exception):
    """The file is not a license this key signed, is for another device, or has expired."""


class LicenseV1(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["entitle-license/1"] = "entitle-license/1"
    key_id: str
    entitlement_id: UUID
    activation_id: str
    fingerprint: str
    offering: str
    product: str
    features: dict[str, Any]
    limits: dict[str, int]
    status: str
    period_end: datetime | None
    issued_at: datetime
    expires_at: datetime


class LicenseFileV1(BaseModel):
    license: LicenseV1
    signature: str


class PublicKeyV1(BaseModel):
    id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str  # base64 of the raw 32-byte key


class KeysV1(BaseModel):
    keys: list[PublicKeyV1]


def canonical(license: LicenseV1) -> bytes:
    data = license.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def verify_license(
    document: str | bytes | dict[str, Any],
    public_key: str,
    fingerprint: str | None = None,
    now: datetime | None = None,
) -> LicenseV1:
    """The license, if `public_key` (base64, from GET /v1/keys) signed exactly
    this content, it is for `fingerprint` (when given) and has not expired."""
    try:
        raw = json.loads(document) if isinstance(document, (str, bytes)) else document
        signed = LicenseFileV1.model_validate(raw)
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(signed.signature, validate=True), canonical(signed.license))
    except (ValueError, ValidationError, binascii.Error):
        raise InvalidLicense("not a well-formed license file") from None
    except InvalidSignature:
        raise InvalidLicense("the signature does not match: the file was altered") from None
    license = signed.license
    if fingerprint is not None and license.fingerprint != fingerprint:
        raise InvalidLicense("the license is for another device")
    if (now or datetime.now(UTC)) >= license.expires_at:
        raise InvalidLicense("the license has expired")
    return license
