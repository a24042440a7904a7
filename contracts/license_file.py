"""The offline license file, and how a vendor's application checks it.

The file is one line of text, a JWS in compact form (RFC 7515) signed with
Ed25519 (`"alg": "EdDSA"`, RFC 8037):

    BASE64URL(header) "." BASE64URL(license JSON) "." BASE64URL(signature)

with header `{"alg": "EdDSA", "kid": <key id>, "typ": "entitle-license+jwt"}`
and the signature over the ASCII bytes `BASE64URL(header) "." BASE64URL(payload)`
exactly as shipped: a verifier never serialises anything again, so any JOSE
library, or 30 lines of any language (`clients/js/verify.mjs`), checks it.
The payload is `LicenseV1` as JSON. The public keys are served at
GET /v1/keys (raw 32 bytes, base64, and as a JWK). In the application:

    from contracts.license_file import verify_license
    license = verify_license(token, public_key_b64, fingerprint=this_device)
    if license.features.get("export"): ...

`contracts/license_file_vectors.json` holds test vectors (a key, tokens and
what each must verify to) for verifiers in other languages.

Deprecated, still read: the first format, `{"license": {…}, "signature":
"<base64 Ed25519 signature of canonical(license)>"}`, where canonical is the
license's JSON with sorted keys, no spaces, UTF-8 (`canonical`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "entitle-license/1"


class InvalidLicense(Exception):
    """The file is not a license this key signed, is for another device, or
    has expired; `kind` says which: malformed, signature, device, expired."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
    """POST /v1/activations/{id}/license-file: `token` is the file to ship;
    `license` is what it says (for the caller's convenience)."""

    license: LicenseV1
    signature: str = Field(
        description="Deprecated: the first format's signature (base64 Ed25519 of"
        " canonical(license)); ship `token` instead"
    )
    token: str | None = Field(
        default=None,
        description="The license file: a compact JWS (EdDSA) whose payload is `license`",
    )


class PublicKeyV1(BaseModel):
    id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str  # base64 of the raw 32-byte key
    jwk: dict[str, str] | None = Field(
        default=None, description='The same key as a JWK: {"kty": "OKP", "crv": "Ed25519", …}'
    )


class KeysV1(BaseModel):
    keys: list[PublicKeyV1]


def canonical(license: LicenseV1) -> bytes:
    data = license.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    """Unpadded base64url, canonical only: a last character whose unused
    bits are set decodes to the same bytes, and would make another file
    that verifies."""
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_") for c in text):
        raise ValueError("not base64url")
    if len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise ValueError("not canonical base64url")
    return data


TOKEN_TYPE = "entitle-license+jwt"


def sign_token(license: LicenseV1, sign: Callable[[bytes], bytes]) -> str:
    """The license as a compact JWS, `sign` making the Ed25519 signature."""
    header = {"alg": "EdDSA", "kid": license.key_id, "typ": TOKEN_TYPE}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(license.model_dump_json().encode())
    )
    return signing_input + "." + b64url(sign(signing_input.encode()))


def _from_token(token: str, key: Ed25519PublicKey) -> LicenseV1:
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("a compact JWS has three parts")
    header = json.loads(_unb64url(parts[0]))
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        raise ValueError("not an EdDSA JWS")
    key.verify(_unb64url(parts[2]), f"{parts[0]}.{parts[1]}".encode())
    return LicenseV1.model_validate_json(_unb64url(parts[1]))


def verify_license(
    document: str | bytes | dict[str, Any],
    public_key: str,
    fingerprint: str | None = None,
    now: datetime | None = None,
) -> LicenseV1:
    """The license, if `public_key` (base64, from GET /v1/keys) signed exactly
    this file, it is for `fingerprint` (when given) and has not expired.
    `document` is the token, or (deprecated) the first format's JSON.
    Raises InvalidLicense saying which of these it is not."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        text = document.decode() if isinstance(document, bytes) else document
        if isinstance(text, str) and not text.lstrip().startswith("{"):
            license = _from_token(text, key)
        else:
            raw = json.loads(text) if isinstance(text, str) else text
            signed = LicenseFileV1.model_validate(raw)
            key.verify(base64.b64decode(signed.signature, validate=True), canonical(signed.license))
            license = signed.license
    except (ValueError, TypeError, RecursionError, ValidationError, binascii.Error):
        # (UnicodeDecodeError is a ValueError; a deeply nested header, RecursionError)
        raise InvalidLicense("malformed", "not a well-formed license file") from None
    except InvalidSignature:
        raise InvalidLicense(
            "signature", "the signature does not match: the file was altered"
        ) from None
    if fingerprint is not None and license.fingerprint != fingerprint:
        raise InvalidLicense("device", "the license is for another device")
    if (now or datetime.now(UTC)) >= license.expires_at:
        raise InvalidLicense("expired", "the license has expired")
    return license


def _flip_unused_bits(text: str) -> str:
    """`text` (base64url of 64 bytes) with its last character's unused bits set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return text[:-1] + alphabet[alphabet.index(text[-1]) | 0b1111]


#: The private seed of the test vectors' key: public, for tests only.
VECTOR_SEED = bytes(range(1, 33))


def license_vectors() -> dict[str, Any]:
    """Tokens and what each must verify to, for verifiers in any language
    (`contracts/license_file_vectors.json`, written by `python -m contracts`).
    Ed25519 signatures are deterministic: the same vectors every time."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(VECTOR_SEED)
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(101, 133)))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    issued = datetime(2026, 12, 1, tzinfo=UTC)
    license = LicenseV1(
        key_id="vectors",
        entitlement_id=UUID("6f1f1c2e-3d4b-5a69-8778-99aabbccddee"),
        activation_id="6f1f1c2e-3d4b-5a69-8778-99aabbccddee.0123456789abcdef",
        fingerprint="device-1",
        offering="pro_annual",
        product="acme-studio",
        features={"export": True, "cloud_sync": False},
        limits={"projects": 50},
        status="ACTIVE",
        period_end=datetime(2027, 12, 1, tzinfo=UTC),
        issued_at=issued,
        expires_at=datetime(2026, 12, 8, tzinfo=UTC),
    )
    token = sign_token(license, key.sign)
    unicode = license.model_copy(
        update={"product": "Ünïcødé ⚡ studio", "fingerprint": "Ada\u2019s Mac"}
    )
    header, payload, signature = token.split(".")
    altered = license.model_copy(update={"features": {"export": True, "cloud_sync": True}})
    during, after = "2026-12-02T12:00:00Z", "2026-12-08T00:00:00Z"
    valid = {"valid": True, "license": license.model_dump(mode="json")}
    cases = [
        {
            "name": "valid",
            "token": token,
            "fingerprint": "device-1",
            "now": during,
            "expect": valid,
        },
        {
            "name": "valid, any device",
            "token": token,
            "fingerprint": None,
            "now": during,
            "expect": valid,
        },
        {
            "name": "non-ASCII payload",
            "token": sign_token(unicode, key.sign),
            "fingerprint": "Ada\u2019s Mac",
            "now": during,
            "expect": {"valid": True, "license": unicode.model_dump(mode="json")},
        },
        {
            "name": "payload altered, signature kept",
            "token": f"{header}.{b64url(altered.model_dump_json().encode())}.{signature}",
            "fingerprint": None,
            "now": during,
            "expect": {"valid": False, "error": "signature"},
        },
        {
            "name": "signed by another key",
            "token": sign_token(license, other.sign),
            "fingerprint": None,
            "now": during,
            "expect": {"valid": False, "error": "signature"},
        },
        {
            "name": "expired (at expires_at exactly)",
            "token": token,
            "fingerprint": None,
            "now": after,
            "expect": {"valid": False, "error": "expired"},
        },
        {
            "name": "another device",
            "token": token,
            "fingerprint": "device-2",
            "now": during,
            "expect": {"valid": False, "error": "device"},
        },
        {
            "name": "signature's last character changed in its unused bits",
            "token": f"{header}.{payload}.{_flip_unused_bits(signature)}",
            "fingerprint": None,
            "now": during,
            "expect": {"valid": False, "error": "malformed"},
        },
        {
            "name": "two parts",
            "token": f"{header}.{payload}",
            "fingerprint": None,
            "now": during,
            "expect": {"valid": False, "error": "malformed"},
        },
        {
            "name": "not base64url",
            "token": f"{header}.{payload}.not*base64",
            "fingerprint": None,
            "now": during,
            "expect": {"valid": False, "error": "malformed"},
        },
    ]
    return {
        "description": "Test vectors for entitle license files (compact JWS, EdDSA/Ed25519):"
        " verify each token with public_key at `now` (and `fingerprint` when not null);"
        " expect either the license or the error kind (malformed, signature, device,"
        " expired). The key is for tests only.",
        "public_key": base64.b64encode(raw).decode(),
        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)},
        "cases": cases,
    }
