"""Billing providers: how each one signs webhooks and what its events mean.

A provider is one module exposing `PROVIDER`, plus one line in `MODULES`, and
one fixture set (`tests/<module>_events.py`) that passes `tests/conformance.py`.
"""

from __future__ import annotations

import hmac
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from domain.catalog import Catalog
from domain.commands import Command, Customer, Effect, OrderEvent
from domain.lifecycle import Line


class SignatureError(Exception):
    """The webhook is not authentic (missing, malformed, wrong or expired)."""


class Unmappable(Exception):
    """The event cannot be fully applied: an unknown price, or a shape we do
    not understand. `commands` holds whatever part of it did map."""

    def __init__(self, reason: str, commands: list[Command] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.commands = commands or []


#: The times a provider may name: earlier or later is a corrupt field (a
#: "lifetime" end of year 9999 included), never a date to compute with.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
#: Most seats one item may buy.
MAX_QUANTITY = 1_000_000
MAX_TEXT = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def ref(value: Any, what: str, numbers: bool = False) -> str | None:
    """A provider's id (or e-mail) from a payload, None if absent. It must be
    a string (or, with `numbers`, an integer: Lemon Squeezy's ids are); any
    other value makes the event unmappable, naming the field, rather than an
    id like "{'a': 1}" that would open an order of its own."""
    if value is None or isinstance(value, str):
        return value
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if "mail" in what.lower():  # personal: say what is wrong, never the value
        raise Unmappable(f"{what} is not a string (a {type(value).__name__})")
    raise Unmappable(f"{what} {value!r:.80} is not a string")


def listed(value: Any, what: str) -> list[Any]:
    """A provider's list from a payload, [] if absent; any other value
    makes the event unmappable, naming the field."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unmappable(f"{what} {value!r:.80} is not a list")
    return value


def same_signature(expected: str, given: str) -> bool:
    """Constant-time comparison of two signatures as text. Compared as
    UTF-8 bytes: `hmac.compare_digest` raises on a str that is not ASCII,
    and a header may hold any byte (a bad signature, not a server error)."""
    return hmac.compare_digest(expected.encode(), given.encode())


def text_id(value: Any) -> str:
    """A provider event's id, or "" unless it is a string: an id that is
    null, a number or an object identifies nothing (the event is then
    unmappable, as one without an id)."""
    return value if isinstance(value, str) else ""


def parse_time(value: Any, what: str) -> datetime | None:
    """An RFC 3339 time from a payload ("Z" allowed), None if absent, in
    UTC (PayPal writes local offsets like -07:00; everything we show is
    UTC). It must carry a UTC offset and fall in 1970-2200; otherwise the
    event is unmappable, saying which field."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise Unmappable(f"{what} {value!r} is not an ISO 8601 time") from None
    return _in_range(parsed, what).astimezone(UTC)


def from_unix(value: Any, what: str, scale: int = 1) -> datetime:
    """A unix time (integer seconds, or `scale`ths of one: Stripe, Chargebee)
    as an aware datetime in 1970-2200; anything else makes the event
    unmappable, naming the field."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unmappable(f"{what} is not a unix timestamp")
    try:
        parsed = datetime.fromtimestamp(value / scale, UTC)
    except (OverflowError, OSError, ValueError):
        raise Unmappable(f"{what} {value!r} is out of range (1970-2200)") from None
    return _in_range(parsed, what)


def _in_range(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise Unmappable(f"{what} {moment.isoformat()!r} has no UTC offset")
    if not EARLIEST <= moment <= LATEST:
        raise Unmappable(f"{what} {moment.isoformat()!r} is out of range (1970-2200)")
    return moment


def check(commands: list[Command]) -> None:
    """Every value an adapter passes on, checked for type and range, so
    that one odd field (an e-mail that is an object, a NUL in an id, a
    time without offset, year 9999) is a dead letter naming the field, not
    a failure further down (in the fold, a projection, the read model).
    Raises Unmappable."""
    for command in commands:
        _text(command.order_ref if isinstance(command, OrderEvent) else "-", "order reference")
        _text(command.cause.event_id, "event id")
        _moment(command.occurred_at, "event time")
        for ref in command.payment_refs:
            _text(ref, "payment reference")
        _value(command.fact, "fact")
        if isinstance(command, OrderEvent):
            _customer(command.customer)
            for line in command.lines:
                _line(line)


def _customer(customer: Customer | None) -> None:
    if customer is not None:
        _text(customer.id, "customer id", optional=True)
        _text(customer.email, "the customer e-mail address", optional=True)


def _line(line: Line) -> None:
    what = f"item {line.slot!r}"
    _text(line.slot, "item id")
    quantity = line.quantity
    if not isinstance(quantity, int) or isinstance(quantity, bool):
        raise Unmappable(f"{what} quantity {quantity!r} is not an integer")
    if not 0 <= quantity <= MAX_QUANTITY:
        raise Unmappable(f"{what} quantity {quantity} is not within 0-{MAX_QUANTITY}")
    for moment, name in ((line.period_start, "period start"), (line.period_end, "period end")):
        if moment is not None:
            _moment(moment, f"{what} {name}")


def _text(value: Any, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    problem = _text_problem(value)
    if problem:
        raise Unmappable(f"{what} {problem}")


def _text_problem(value: Any) -> str | None:
    # Never the value itself: it may be personal (an e-mail address, a name
    # in a fact), and a reason is kept, listed, logged and published.
    if type(value) is not str:
        return f"is not a string (a {type(value).__name__})"
    if len(value) > MAX_TEXT:
        return f"is longer than {MAX_TEXT} characters"
    if has_control_character(value):
        return "contains a control character"
    return None


def has_control_character(value: str) -> bool:
    # isprintable() is the fast answer for almost every string; the pattern
    # says whether a non-printable one holds a control character.
    return not value.isprintable() and _CONTROL.search(value) is not None


def _moment(value: Any, what: str) -> None:
    if not isinstance(value, datetime):
        raise Unmappable(f"{what} {value!r:.80} is not a time")
    _in_range(value, what)


def _value(value: Any, what: str) -> None:
    """Facts are JSON-like: check every string and time in them."""
    found = _problem(value)
    if found is not None:
        path, problem = found
        raise Unmappable(f"{'.'.join([what, *reversed(path)])} {problem}")


def _problem(value: Any) -> tuple[list[str], str] | None:
    """The path (innermost first) and problem of the first bad value, or
    None. The path is built only for a bad value: this runs on every fact."""
    kind = type(value)
    if kind is str:
        problem = _text_problem(value)
        return ([], problem) if problem else None
    if kind is datetime:
        if value.tzinfo is not None and EARLIEST <= value <= LATEST:
            return None
        try:
            _in_range(value, "")
        except Unmappable as exc:
            return [], exc.reason.strip()
        return None
    if kind is dict or isinstance(value, Mapping):
        for key, item in value.items():
            found = _problem(item) or (
                ([], f"key {key!r:.80} is not a string") if type(key) is not str else None
            )
            if found is not None:
                found[0].append(str(key))
                return found
        return None
    if kind is list or kind is tuple:
        for item in value:
            found = _problem(item)
            if found is not None:
                return found
        return None
    if kind is int or kind is float:
        return None if -(10**15) <= value <= 10**15 else ([], f"{value!r} is out of range")
    if value is None or kind is bool:
        return None
    return [], f"{value!r:.80} is not a JSON value"


#: What an unsigned source may tell: a subscription in good standing (or
#: beginning), and payments. Anyone who knows its URL can send anything
#: naming any customer's e-mail, so nothing that ends, suspends, refunds or
#: writes off access is taken from it.
_UNSIGNED_STATUSES = frozenset({"pending", "trialing", "active"})
#: How far ahead of our clock an unsigned source's event time may be.
UNSIGNED_CLOCK_SKEW = timedelta(minutes=10)


def unsigned_refusal(commands: list[Command], now: datetime) -> str | None:
    """Why an unsigned source's webhook may not be applied (it would end,
    suspend or refund access, or set a period already over), or None."""
    for command in commands:
        fact = command.fact
        kind = fact["kind"]
        ends = [fact.get("end"), *(line.get("end") for line in fact.get("lines", {}).values())]
        if command.occurred_at > now + UNSIGNED_CLOCK_SKEW:
            # Dated ahead, it would rank above every real snapshot to come.
            what = f"an event dated {command.occurred_at.isoformat()}, in the future"
        elif kind not in ("payment", "subscription"):
            what = f"a {kind.replace('_', ' ')!r} fact"
        elif kind == "subscription" and fact["status"] not in _UNSIGNED_STATUSES:
            what = f"a subscription that is {fact['status']!r}"
        elif fact.get("cancel_at") is not None:
            what = "a cancellation date"
        elif any(end is not None and end <= now for end in ends):
            what = "a period that is over"
        else:
            continue
        return (
            f"an unsigned source (allow_unsigned) may not send {what}: anyone could, naming "
            "any customer; an admin can act on the entitlement through the API"
        )
    return None


#: What an unsigned source's webhook may do to entitlements once applied:
#: create, activate, renew, extend, or note a fact. Not change an offering,
#: seats or customer, nor suspend, cancel, expire or revise a period (a
#: snapshot that leaves an item out cancels it, one with a lower quantity
#: takes seats away), nor wait on an order to act on a later grant.
_UNSIGNED_EFFECTS = frozenset(
    {
        "entitlement.created",
        "entitlement.activated",
        "entitlement.renewed",
        "entitlement.extended",
        "entitlement.recovered",
        "entitlement.noted",
    }
)


def unsigned_effect_refusal(effect: Effect) -> str | None:
    """Why what an unsigned source's webhook did may not be kept, or None."""
    done = {name for names in effect.events.values() for name in names}
    taken = sorted(done - _UNSIGNED_EFFECTS)
    if taken:
        what = ", ".join(taken)
    elif effect.newly_parked:
        what = f"a fact that waits for {effect.waits_for}"
    else:
        return None
    return (
        f"an unsigned source (allow_unsigned) may not cause {what}: anyone could, naming "
        "any customer; an admin can act on the entitlement through the API"
    )


def event_type(payload: Mapping[str, Any]) -> str:
    """The provider's name for an event's type, wherever it puts it: `type`
    (Stripe, Standard Webhooks), `event_type` (Paddle, Chargebee, PayPal),
    `meta.event_name` (Lemon Squeezy), `event` (Zenofy); "" if none."""
    meta = payload.get("meta")
    for value in (
        payload.get("type"),
        payload.get("event_type"),
        meta.get("event_name") if isinstance(meta, Mapping) else None,
        payload.get("event"),
    ):
        if isinstance(value, str) and value:
            return value[:200]
    return ""


@dataclass(frozen=True)
class Credentials:
    """What a source is configured with to authenticate its webhooks."""

    secret: str  # HMAC key or password; "" where the provider needs none
    username: str | None = None  # HTTP Basic auth (Chargebee)
    tolerance_seconds: float | None = None  # signature age allowed; provider default if None
    webhook_id: str | None = None  # the provider's id of this webhook (PayPal)

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials(username={self.username!r})"


@dataclass(frozen=True)
class Provider:
    name: str
    #: verify(headers (lower-case names), raw body, credentials, now in unix seconds)
    verify: Callable[[Mapping[str, str], bytes, Credentials, float], None]
    #: The key that keeps one order's webhooks in order on the raw topic.
    routing_key: Callable[[Mapping[str, Any]], str]
    #: The provider's own id for this event, used to deduplicate deliveries.
    event_id: Callable[[Mapping[str, Any]], str]
    #: normalize(source, payload, catalog, received_at) -> commands; raises Unmappable.
    normalize: Callable[[str, Mapping[str, Any], Catalog, datetime], list[Command]]
    #: Whether a source of this provider needs a secret to verify its
    #: webhooks (PayPal's are verified by certificate: no). Without one, a
    #: source must say `allow_unsigned: true`.
    secret_required: bool = True
    #: Other source settings it cannot work without (e.g. "username").
    needs: tuple[str, ...] = ()
    #: verify may block (a certificate fetch): ingress runs it in a worker thread.
    blocking_verify: bool = False
    #: Why a configured secret can verify nothing (a Standard Webhooks key
    #: that decodes to no bytes), or None; checked at start-up.
    secret_problem: Callable[[str], str | None] = lambda secret: None
    #: The request headers (lower-case) kept with a stored webhook: what
    #: verify reads and the provider's delivery metadata. Others are dropped.
    headers: tuple[str, ...] = ()
    #: For a provider that sends several events in one request (FastSpring's
    #: `{"events": [...]}`): the events of a verified body, or None if it is
    #: not such a batch. The ingress stores each as a webhook of its own, so
    #: each is deduplicated by its own id, folded, dead-lettered and re-driven
    #: on its own; the request's signature is verified once, over the batch.
    split: Callable[[Mapping[str, Any]], list[Any] | None] | None = None


#: One line per provider: its module here, which exposes `PROVIDER`.
MODULES = (
    "stripe",
    "paddle",
    "lemonsqueezy",
    "chargebee",
    "paypal",
    "fastspring",
    "zenofy",
    "standard",
)


def _registry() -> dict[str, Provider]:
    providers: list[Provider] = [
        importlib.import_module(f"services.providers.{module}").PROVIDER for module in MODULES
    ]
    return {p.name: p for p in providers}


PROVIDERS: dict[str, Provider] = _registry()
