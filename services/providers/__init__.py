"""Billing providers: how each one signs webhooks and what its events mean.

A provider is one module exposing `PROVIDER`, plus one line in `PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from domain.catalog import Catalog
from domain.commands import Command


class SignatureError(Exception):
    """The webhook is not authentic (missing, malformed, wrong or expired)."""


class Unmappable(Exception):
    """The event cannot be fully applied: an unknown price, or a shape we do
    not understand. `commands` holds whatever part of it did map."""

    def __init__(self, reason: str, commands: list[Command] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.commands = commands or []


def parse_time(value: Any, what: str) -> datetime | None:
    """An ISO 8601 / RFC 3339 time from a payload ("Z" allowed), None if
    absent; a malformed one makes the event unmappable, saying which field."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise Unmappable(f"{what} {value!r} is not an ISO 8601 time") from None


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
    #: Whether a source of this provider must have a secret.
    secret_required: bool = True
    #: Other source settings it cannot work without (e.g. "username").
    needs: tuple[str, ...] = ()
    #: verify may block (a certificate fetch): ingress runs it in a worker thread.
    blocking_verify: bool = False


def _registry() -> dict[str, Provider]:
    from services.providers import (
        chargebee,
        lemonsqueezy,
        paddle,
        paypal,
        standard,
        stripe,
        zenofy,
    )

    providers = (
        stripe.PROVIDER,
        paddle.PROVIDER,
        lemonsqueezy.PROVIDER,
        chargebee.PROVIDER,
        paypal.PROVIDER,
        zenofy.PROVIDER,
        standard.PROVIDER,
    )
    return {p.name: p for p in providers}


PROVIDERS: dict[str, Provider] = _registry()
