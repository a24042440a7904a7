"""Customers' credentials. Activation codes: derived from a server secret,
shown to admins and customers, never stored (events keep only
`domain.entitlement.code_hash`). Seat secrets: random, shown once to the
device that took the seat, stored only as `domain.entitlement.seat_secret_hash`.

code n of an entitlement = the first 125 bits of
HMAC-SHA256(ENTITLE_CODE_SECRET, entitlement id | n), written as 25
Crockford base32 characters in five groups. Validation needs only the hash,
so a lost secret loses the ability to show codes again, not to check them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from uuid import UUID

from domain.entitlement import code_hash

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: A seat secret, or enough of one to matter, wherever it appears: the prefix
#: makes them recognisable, so logs can mask them (and scanners find leaks).
SEAT_SECRET = re.compile(r"es_[A-Za-z0-9_-]{16,}")


def new_seat_secret() -> str:
    """`es_` and 256 random bits in URL-safe base64 (46 characters)."""
    return "es_" + secrets.token_urlsafe(32)


class CodeBook:
    def __init__(self, secret: str) -> None:
        if len(secret) < 16:
            raise ValueError("ENTITLE_CODE_SECRET must be at least 16 characters")
        self._key = secret.encode()

    def code(self, entitlement_id: UUID, index: int) -> str:
        digest = hmac.new(
            self._key, b"code\x1f" + entitlement_id.bytes + index.to_bytes(4, "big"), hashlib.sha256
        ).digest()
        bits = int.from_bytes(digest[:16], "big") >> 3  # 125 bits
        chars = "".join(CROCKFORD[(bits >> (5 * (24 - i))) & 31] for i in range(25))
        return "-".join(chars[i : i + 5] for i in range(0, 25, 5))

    def hash(self, entitlement_id: UUID, index: int) -> str:
        return code_hash(self.code(entitlement_id, index))


def load_secret(
    data_dir: Path = Path(".entitle"),
    generate: bool = False,
    env: str = "ENTITLE_CODE_SECRET",
    file_name: str = "code-secret",
) -> str | None:
    """A secret from the environment, else the one `entitle dev` keeps in its
    data directory (generated on first use when `generate`), so codes and
    license signatures stay the same across restarts."""
    secret = os.environ.get(env)
    if secret:
        return secret
    path = data_dir / file_name
    if path.exists():
        return path.read_text().strip()
    if not generate:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret
