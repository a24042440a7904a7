"""Personal data in the event store, sealed under a key per customer.

A customer's e-mail address (and the raw webhooks and dead letters that
carry their name) is stored encrypted (AES-256-GCM) under a key of that
customer's; erasing the customer deletes the key, and every stored copy
becomes unreadable without rewriting a single event (crypto-shredding).

- Keys live in `entitle_customer_keys` in the event store's database:
  `key_id` (random: nothing derived from the address is left in the events
  once the key is gone), `lookup` (SHA-256 of the normalised address,
  deleted with the key) and the 32 key bytes.
- In an event's state, a sealed value is `{"_type_": "personal", "_data_":
  "<key id>:<base64 nonce+ciphertext>"}`: eventsourcing's transcoder opens it
  as it decodes (a plain string, or None once the key is erased), so only
  events that hold personal data pay for it.
- Keys are cached in memory. A cache is trusted for `CACHE_SECONDS`; then
  one query reads the erasure count (`entitle_erasures`) and drops every
  key if it changed. An erasure deletes the key, tells every keyring of
  its own process at once, and waits `CACHE_SECONDS` (plus a margin) before
  it appends its events, so no process decrypts with an erased key after it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import threading
import time
import unicodedata
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder, Transcoding
from eventsourcing.utils import get_topic

from services.providers import MAX_TEXT

#: How long a process trusts its cached keys before it checks for erasures.
CACHE_SECONDS = 1.0

KEYS = "entitle_customer_keys"
ERASURES = "entitle_erasures"
#: The transcoding's name in stored events.
NAME = "personal"
#: What a sealed byte string (a raw webhook) starts with.
SEALED = b"entitle-sealed:1:"


#: The longest address kept and erased: an adapter passes on any text up
#: to `MAX_TEXT`, so whatever was stored can be erased.
MAX_ADDRESS = MAX_TEXT


def normalise(email: str) -> str:
    """The address as keys are looked up by: trimmed, composed (NFC, so
    "ü" typed as u + combining diaeresis is the same address) and lower case."""
    return unicodedata.normalize("NFC", email.strip()).lower()


def _digest(text: str) -> str:
    return hashlib.sha256(b"entitle customer key\x1f" + text.encode()).hexdigest()


@functools.lru_cache(maxsize=65_536)
def lookup_of(email: str) -> str:
    return _digest(normalise(email))


def lookups_of(email: str) -> set[str]:
    """Every lookup a key of `email` may have been made under: today's, and
    those of before addresses were composed (NFC or NFD as it came)."""
    stripped = email.strip()
    return {lookup_of(email)} | {
        _digest(unicodedata.normalize(form, stripped).lower()) for form in ("NFC", "NFD")
    }


def _spellings(char: str) -> set[str]:
    """Regular expressions for one character of an address as text may hold
    it: either case, composed or not, as itself or JSON-escaped once or
    twice (`\\u00fc`, `\\"`; a JSON string inside JSON)."""

    def escaped(text: str) -> str:
        return "".join(json.dumps(c)[1:-1] for c in text)

    found: set[str] = set()
    for form in {char, unicodedata.normalize("NFD", char)}:
        for variant in {form, form.lower(), form.upper()}:
            once = escaped(variant)
            # Twice: a provider's body is a JSON string inside the raw webhook's JSON.
            found |= {variant, once, escaped(once)}
            if variant == "/":
                found |= {"\\/", "\\\\/"}
    return {re.escape(f) for f in found}


def spelling_pattern(addresses: Iterable[str]) -> re.Pattern[str]:
    """A pattern that finds any of `addresses` (normalised) in text however
    it is spelt there: any case, NFC or NFD, plain or JSON-escaped."""
    parts = []
    for address in sorted(set(addresses)):
        parts.append(
            "".join(
                "(?:" + "|".join(sorted(_spellings(c), key=len, reverse=True)) + ")"
                for c in address
            )
        )
    return re.compile("|".join(parts) or "(?!)", re.IGNORECASE)


def plain_run(address: str) -> str:
    """The longest part of `address` spelt the same in any text that holds
    it (ASCII letters, digits and `.-_+@`, lower case): what a SQL search
    can look for before the pattern above checks each row found."""
    runs = re.findall(r"[a-z0-9.\-_+@]+", address.lower())
    return max(runs, key=len) if runs else ""


def address_in(payload: Any, depth: int = 5) -> str | None:
    """The first e-mail address in a provider's payload: a string with an
    @ under a key naming an e-mail (`customer_email`, `email`,
    `email_address`, `user_email` …), looked for `depth` levels deep. For
    webhooks whose commands name no customer (one that maps to nothing)."""
    if depth <= 0:
        return None
    if isinstance(payload, dict):
        nested = []
        for key, value in payload.items():
            if isinstance(value, str):
                if "email" in key.lower() and "@" in value and len(value) <= MAX_ADDRESS:
                    return value
            elif isinstance(value, (dict, list)):
                nested.append(value)
        for value in nested:
            found = address_in(value, depth - 1)
            if found:
                return found
    elif isinstance(payload, list):
        for value in payload[:20]:
            found = address_in(value, depth - 1)
            if found:
                return found
    return None


class Personal(str):
    """A string to be sealed under the key of `owner` (an e-mail address)
    where the mapper looks for one (a dead letter's webhook body). In
    memory it is the string itself."""

    owner: str

    def __new__(cls, value: str, owner: str) -> Personal:
        made = super().__new__(cls, value)
        made.owner = owner
        return made


class KeyTable:
    """SQL for the key and erasure tables, on the event store's connections."""

    def __init__(self, datastore: Any, postgres: bool) -> None:
        self.datastore = datastore
        self.postgres = postgres
        schema = getattr(datastore, "schema", "") if postgres else ""
        prefix = f'"{schema}".' if schema else ""
        self.keys = prefix + KEYS
        self.erasures = prefix + ERASURES
        self.webhooks = prefix + "entitle_webhooks"  # services.store.WEBHOOKS

    @staticmethod
    def create_statements(postgres: bool) -> list[str]:
        blob = "BYTEA" if postgres else "BLOB"
        return [
            f"CREATE TABLE IF NOT EXISTS {KEYS} (key_id TEXT PRIMARY KEY,"
            f" lookup TEXT NOT NULL UNIQUE, secret {blob} NOT NULL, created_at TEXT NOT NULL)",
            # One row per erasure request: its count is what caches check.
            f"CREATE TABLE IF NOT EXISTS {ERASURES} (id TEXT PRIMARY KEY,"
            " requested_at TEXT NOT NULL, requested_by TEXT NOT NULL, body TEXT NOT NULL)",
        ]

    def sql(self, statement: str) -> str:
        statement = statement.replace("{keys}", self.keys).replace("{erasures}", self.erasures)
        return statement.replace("?", "%s") if self.postgres else statement

    @contextmanager
    def cursor(self, commit: bool) -> Iterator[Any]:
        with self.datastore.transaction(commit=commit) as cursor:
            yield cursor

    def rows(self, statement: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.cursor(commit=False) as cursor:
            cursor.execute(self.sql(statement), tuple(params))
            found = cursor.fetchall()
        return [tuple(row.values()) if isinstance(row, Mapping) else tuple(row) for row in found]

    def generation(self) -> int:
        return int(self.rows("SELECT count(*) FROM {erasures}")[0][0])

    def by_lookup(self, lookup: str) -> tuple[str, bytes] | None:
        found = self.rows("SELECT key_id, secret FROM {keys} WHERE lookup = ?", (lookup,))
        return (str(found[0][0]), bytes(found[0][1])) if found else None

    def every_key(self) -> list[tuple[str, bytes]]:
        return [(str(k), bytes(v)) for k, v in self.rows("SELECT key_id, secret FROM {keys}")]

    def by_id(self, key_id: str) -> bytes | None:
        found = self.rows("SELECT secret FROM {keys} WHERE key_id = ?", (key_id,))
        return bytes(found[0][0]) if found else None

    def create_many(self, lookups: list[str]) -> list[tuple[str, str, bytes]]:
        """(lookup, key id, key) for each of `lookups`, made in one
        transaction where missing."""
        now = datetime.now(UTC).isoformat()
        with self.cursor(commit=True) as cursor:
            cursor.executemany(
                self.sql(
                    "INSERT INTO {keys} (key_id, lookup, secret, created_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (lookup) DO NOTHING"
                ),
                [
                    (os.urandom(16).hex(), lk, AESGCM.generate_key(bit_length=256), now)
                    for lk in lookups
                ],
            )
        found: list[tuple[str, str, bytes]] = []
        for start in range(0, len(lookups), 500):
            chunk = lookups[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.rows(
                f"SELECT lookup, key_id, secret FROM {{keys}} WHERE lookup IN ({marks})", chunk
            )
            found += [(str(a), str(b), bytes(c)) for a, b, c in rows]
        return found

    def create(self, lookup: str) -> tuple[str, bytes]:
        """The key for `lookup`, made now unless another writer made it first."""
        key_id, secret = os.urandom(16).hex(), AESGCM.generate_key(bit_length=256)
        with self.cursor(commit=True) as cursor:
            cursor.execute(
                self.sql(
                    "INSERT INTO {keys} (key_id, lookup, secret, created_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (lookup) DO NOTHING"
                ),
                (key_id, lookup, secret, datetime.now(UTC).isoformat()),
            )
        found = self.by_lookup(lookup)
        assert found is not None
        return found


#: Every keyring of this process, so an erasure reaches them all at once.
_RINGS: weakref.WeakSet[Keyring] = weakref.WeakSet()


def forget_everywhere(key_ids: Iterable[str]) -> None:
    """Drop erased keys from every keyring in this process."""
    ids = list(key_ids)
    for ring in list(_RINGS):
        ring.forget(ids)


class Keyring:
    """Customer keys, cached (see the module's docstring)."""

    def __init__(self, table: KeyTable | None = None, ttl: float = CACHE_SECONDS) -> None:
        self._table = table
        self.ttl = ttl
        self._lock = threading.Lock()
        self._by_id: dict[str, AESGCM | None] = {}  # None: erased (for good)
        # Keys read but not used yet: a cipher is made on first use (making
        # one for every key up front took 2 s of a million-event replay).
        self._unused: dict[str, bytes] = {}
        self._by_lookup: dict[str, tuple[str, AESGCM, bytes]] = {}
        # Opened values by token: a customer's address seals to the same
        # token every time (below), so a replay opens each one once.
        self._opened: dict[str, str | None] = {}
        self._tokens: dict[tuple[str, str], str] = {}  # (owner, text) -> token
        self._generation: int | None = None
        self._trusted_until = 0.0
        self._loaded = False  # every key read since the last erasure
        _RINGS.add(self)

    @property
    def table(self) -> KeyTable:
        assert self._table is not None, "the keyring has no table yet"
        return self._table

    @table.setter
    def table(self, table: KeyTable) -> None:
        self._table = table

    def generation(self) -> int:
        """The store's erasure count, checked at most every `ttl` seconds;
        cached keys are dropped when it changes."""
        if time.monotonic() >= self._trusted_until:
            with self._lock:
                if time.monotonic() >= self._trusted_until:
                    current = self.table.generation()
                    if current != self._generation:
                        erased: dict[str, AESGCM | None] = {
                            k: v for k, v in self._by_id.items() if v is None
                        }
                        self._by_id, self._by_lookup, self._loaded = erased, {}, False
                        self._unused = {}
                        self._opened, self._tokens = {}, {}
                        self._generation = current
                    self._trusted_until = time.monotonic() + self.ttl
        assert self._generation is not None
        return self._generation

    def forget(self, key_ids: Iterable[str]) -> None:
        with self._lock:
            for key_id in key_ids:
                self._by_id[key_id] = None
                self._unused.pop(key_id, None)
            self._by_lookup = {
                k: v for k, v in self._by_lookup.items() if self._by_id.get(v[0]) is not None
            }
            self._opened, self._tokens = {}, {}

    def key_for(self, email: str) -> tuple[str, AESGCM, bytes]:
        """The customer's key (made if they have none yet)."""
        self.generation()
        lookup = lookup_of(email)
        found = self._by_lookup.get(lookup)
        if found is None:
            with self._lock:
                key_id, secret = self.table.by_lookup(lookup) or self.table.create(lookup)
                found = (key_id, AESGCM(secret), secret)
                self._by_lookup[lookup] = found
                self._by_id[key_id] = found[1]
        return found

    def prepare(self, emails: Iterable[str]) -> None:
        """Have the keys of these customers at hand, those missing made in
        one transaction (rather than one each as events are mapped)."""
        self.generation()
        missing = sorted({lookup_of(e) for e in emails} - set(self._by_lookup))
        if not missing:
            return
        with self._lock:
            for lookup, key_id, secret in self.table.create_many(missing):
                key = AESGCM(secret)
                self._by_lookup[lookup] = (key_id, key, secret)
                self._by_id[key_id] = key

    def _key(self, key_id: str) -> AESGCM | None:
        if time.monotonic() >= self._trusted_until:
            self.generation()
        try:
            return self._by_id[key_id]
        except KeyError:
            pass
        with self._lock:
            if not self._loaded:
                # The first miss loads every key (one query): a replay of a
                # million events meets most customers, one query each otherwise.
                self._loaded = True
                self._unused = {
                    known: secret
                    for known, secret in self.table.every_key()
                    if known not in self._by_id
                }
            if key_id in self._by_id:
                return self._by_id[key_id]
            unused = self._unused.pop(key_id, None)
            if unused is not None:
                self._by_id[key_id] = AESGCM(unused)
                return self._by_id[key_id]
            found = self.table.by_id(key_id)
            key = AESGCM(found) if found is not None else None
            self._by_id[key_id] = key
            return key

    def seal(self, owner: str, text: str) -> str:
        """`text` sealed under `owner`'s key: `<key id>:<base64>`. The nonce
        is derived from the key and the text (as in AES-SIV), so the same
        text seals to the same token: that tells no more than the key id
        does (whose it is), and a nonce is never reused for another text."""
        if time.monotonic() < self._trusted_until:
            known = self._tokens.get((owner, text))
            if known is not None:
                return known
        key_id, key, secret = self.key_for(owner)
        nonce = hashlib.blake2b(text.encode(), key=secret, digest_size=12).digest()
        sealed = key.encrypt(nonce, text.encode(), key_id.encode())
        token = f"{key_id}:{base64.b64encode(nonce + sealed).decode()}"
        if len(self._tokens) >= 100_000:
            self._tokens = {}
        self._tokens[(owner, text)] = token
        return token

    def open(self, token: str) -> str | None:
        """The sealed text, or None if its key was erased."""
        if time.monotonic() >= self._trusted_until:
            self.generation()
        try:
            return self._opened[token]
        except KeyError:
            pass
        key_id, _, data = token.partition(":")
        key = self._key(key_id)
        opened: str | None = None
        if key is not None:
            raw = base64.b64decode(data)
            try:
                opened = key.decrypt(raw[:12], raw[12:], key_id.encode()).decode()
            except InvalidTag:
                opened = None
        if len(self._opened) >= 200_000:
            self._opened = {}
        self._opened[token] = opened
        return opened

    def seal_bytes(self, owner: str, data: bytes) -> bytes:
        key_id, key, _ = self.key_for(owner)
        nonce = os.urandom(12)
        return SEALED + key_id.encode() + b":" + nonce + key.encrypt(nonce, data, key_id.encode())

    def open_bytes(self, data: bytes) -> bytes | None:
        """`data` as it was sealed (unchanged if it is not), or None if its
        key was erased."""
        if not data.startswith(SEALED):
            return data
        rest = data[len(SEALED) :]
        key_id = rest[:32].decode()
        key = self._key(key_id)
        if key is None:
            return None
        try:
            return key.decrypt(rest[33:45], rest[45:], key_id.encode())
        except InvalidTag:
            return None


def owners(state: Mapping[str, Any]) -> Iterator[str]:
    """The customers' addresses `SealingMapper` seals values of in an
    event's state (its `__dict__`)."""
    email = state.get("customer_email")
    if isinstance(email, str) and email:
        yield email
    for fact in [state.get("fact"), *(state.get("inherited") or ())]:
        who = fact.get("customer") if isinstance(fact, dict) else None
        if isinstance(who, dict) and isinstance(who.get("email"), str) and who["email"]:
            yield who["email"]
    webhook = state.get("webhook")
    if isinstance(webhook, dict) and isinstance(webhook.get("body"), Personal):
        yield webhook["body"].owner


class PersonalTranscoding(Transcoding):
    """Opens sealed values as events are decoded (values are sealed by
    `SealingMapper`, which knows whose they are)."""

    type = Personal
    name = NAME

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def encode(self, obj: Any) -> str:
        return self.keyring.seal(obj.owner, str(obj))

    def decode(self, data: Any) -> str | None:
        return self.keyring.open(cast(str, data))


class SealingMapper(Mapper[UUID]):
    """eventsourcing's mapper, sealing personal values as events are stored:

    - `customer_email` (an entitlement's creation, a change of customer);
    - `fact.customer.email` and `inherited[].customer.email` (the provider
      facts entitlements, orders and payments keep);
    - a dead letter's `webhook.body` when the fold knew whose it is (`Personal`).
    """

    def __init__(self, transcoder: Transcoder, keyring: Keyring, **kwargs: Any) -> None:
        super().__init__(transcoder, **kwargs)
        self.keyring = keyring

    def _sealed(self, owner: str, text: str) -> dict[str, str]:
        return {"_type_": NAME, "_data_": self.keyring.seal(owner, text)}

    def _fact(self, fact: Any) -> Any:
        who = fact.get("customer") if isinstance(fact, dict) else None
        if isinstance(who, dict):
            email = who.get("email")
            if isinstance(email, str) and email:
                return {**fact, "customer": {**who, "email": self._sealed(email, email)}}
        return fact

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        state = dict(vars(domain_event))
        originator_id = state.pop("originator_id")
        originator_version = state.pop("originator_version")
        class_version = getattr(type(domain_event), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        email = state.get("customer_email")
        if isinstance(email, str) and email:
            state["customer_email"] = self._sealed(email, email)
        if state.get("fact") is not None:
            state["fact"] = self._fact(state["fact"])
        if state.get("inherited"):
            state["inherited"] = [self._fact(f) for f in state["inherited"]]
        webhook = state.get("webhook")
        if isinstance(webhook, dict) and isinstance(webhook.get("body"), Personal):
            body = webhook["body"]
            state["webhook"] = {**webhook, "body": self._sealed(body.owner, str(body))}
        stored_state = self.transcoder.encode(state)
        if self.compressor:
            stored_state = self.compressor.compress(stored_state)
        if self.cipher:
            stored_state = self.cipher.encrypt(stored_state)
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=get_topic(type(domain_event)),
            state=stored_state,
        )
