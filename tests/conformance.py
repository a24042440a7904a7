"""One behaviour every provider adapter must show, as eventsourcing runs one
recorder suite per store: `tests/test_conformance.py` runs these stories for
each provider in `services.providers.MODULES`, through the real adapter (`normalize`,
`verify`) and the real domain fold (`tests/lifecycle_world.World`).

A provider's fixture set lives in its `tests/<provider>_events.py` as
`FIXTURES`, built from the provider's published sample payloads (official
SDK test fixtures, documentation examples) and changed only in ids, prices
and times; that module says where each shape comes from. A happening a
provider does not have (Chargebee signs nothing, so no signature expires)
raises `NotSupported` with the reason, and the story is skipped saying so.
A fixture set whose provider authenticates the sender but signs no body
(HTTP Basic auth) may also define `body_signed()` raising NotSupported: the
changed-body story is then skipped (every other fixture set needs nothing).

Times are seconds after `lifecycle_world.T0`; a fixture turns them into
the provider's own format (unix seconds, RFC 3339 with an offset). A
builder returns the list of webhooks the provider sends for the happening,
in the order it sends them (usually one).
"""

from __future__ import annotations

from typing import Any, Protocol

from domain.catalog import Catalog, Offering
from services.providers import Credentials

Payload = dict[str, Any]

#: The offerings every fixture set maps: `basic` (1 seat) and `pro` (5
#: seats), each with one price per provider (its subscriptions and one-off
#: sales alike).
SKUS = ("basic", "pro")


class NotSupported(Exception):
    """The provider has no such happening (the reason says why)."""


def catalog(provider: str, prices: dict[str, tuple[str, ...]]) -> Catalog:
    """The suite's offerings with `provider`'s price ids (`prices` by sku)."""
    return Catalog(
        [
            Offering(sku="basic", product="acme", seats=1, prices={provider: prices["basic"]}),
            Offering(sku="pro", product="acme", seats=5, prices={provider: prices["pro"]}),
        ]
    )


class FixtureSet(Protocol):
    """What the suite needs from one provider's published payload shapes."""

    #: Its key in `services.providers.PROVIDERS`.
    provider: str
    catalog: Catalog
    #: The catalog's recurring price of each sku (as the provider names it).
    price: dict[str, str]

    def credentials(self, secret: str) -> Credentials:
        """A source's credentials with `secret` (and whatever else it needs)."""
        ...

    def sign(self, body: bytes, secret: str, at: float) -> dict[str, str]:
        """The headers (lower-case names) the provider sends with `body`,
        signed with `secret` at unix time `at`."""
        ...

    def signature_age_limit(self) -> float:
        """Seconds after which a signed webhook is refused by default;
        NotSupported where the signature carries no time."""
        ...

    def rotated(self, body: bytes, old: str, new: str, at: float) -> dict[str, str]:
        """Headers as the provider sends them while its secret rotates from
        `old` to `new` (one verifying with `new` must accept them);
        NotSupported where it has no rotation."""
        ...

    # -- a subscription's life --------------------------------------------------

    def subscribed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        """The subscription created and active for [start, end), one seat
        of `sku`, before its first payment is reported."""
        ...

    def paid(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int, amount: int = 9900
    ) -> list[Payload]:
        """The payment of `invoice` (`amount` in minor units) for the
        period [start, end) of `sub`."""
        ...

    def payment_failed(
        self, sub: str, invoice: str, sku: str, start: int, end: int, at: int
    ) -> list[Payload]:
        """The renewal payment of `invoice` for [start, end) failed."""
        ...

    def cancel_at_period_end(
        self, sub: str, sku: str, start: int, end: int, at: int
    ) -> list[Payload]:
        """The buyer canceled: the subscription ends at `end`."""
        ...

    def canceled(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        """The subscription is over (canceled now)."""
        ...

    def paused(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        """Paused in the mode that withholds access (no collection, no use)."""
        ...

    def resumed(self, sub: str, sku: str, start: int, end: int, at: int) -> list[Payload]:
        """Resumed after `paused`, active for [start, end)."""
        ...

    # -- money back ---------------------------------------------------------------

    def refunded(
        self, sub: str, invoice: str, amount: int, refunded: int, at: int
    ) -> list[Payload]:
        """`refunded` of `invoice`'s `amount` was returned to the buyer."""
        ...

    def disputed(self, sub: str, invoice: str, dispute: str, state: str, at: int) -> list[Payload]:
        """A chargeback on `invoice`: `state` is open, won or lost."""
        ...

    # -- one-off sales --------------------------------------------------------------

    def sold(self, order: str, sku: str, at: int, amount: int = 4900) -> list[Payload]:
        """A one-off purchase of one `sku` (no subscription), paid."""
        ...

    # -- bad input ----------------------------------------------------------------

    def without_zone(self, payload: Payload) -> Payload:
        """`payload` with its event time stripped of its UTC offset;
        NotSupported where times are unix seconds (never without a zone)."""
        ...

    def with_price(self, payload: Payload, price: str) -> Payload:
        """`payload` (from `paid`) buying `price` instead."""
        ...

    def with_quantity(self, payload: Payload, quantity: int) -> Payload:
        """`payload` (from `subscribed` or `paid`) for `quantity` of its item."""
        ...
