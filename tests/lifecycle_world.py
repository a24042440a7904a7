"""A pure, in-memory world for lifecycle tests: Stripe payloads go through
the real adapter and the real domain fold, with the clock in the test's hands."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from domain.catalog import Catalog, Offering
from domain.commands import Rules, apply, settle_due
from domain.entitlement import Entitlement
from domain.lifecycle import Policy
from services.providers import PROVIDERS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400
MONTH = 30 * DAY
SOURCE = "stripe-main"

BASIC = Offering(
    sku="basic",
    product="acme",
    seats=1,
    features={"export": False},
    limits={"projects": 5},
    stripe_price_ids=("price_basic",),
)
PRO = Offering(
    sku="pro",
    product="acme",
    seats=5,
    features={"export": True},
    limits={"projects": 50},
    suspend_after_days=3,
    expire_after_days=14,
    stripe_price_ids=("price_pro",),
)
ADDON = Offering(
    sku="addon",
    product="acme-cloud",
    features={"cloud_sync": True},
    stripe_price_ids=("price_addon",),
)
CATALOG = Catalog([BASIC, PRO, ADDON])
PRICES = {"basic": "price_basic", "pro": "price_pro", "addon": "price_addon"}


def ts(offset_seconds: float) -> int:
    return int(T0.timestamp() + offset_seconds)


class World:
    def __init__(
        self, catalog: Catalog = CATALOG, policy: Policy | None = None, provider: str = "stripe"
    ) -> None:
        self.normalize = PROVIDERS[provider].normalize
        self.items: dict[UUID, Any] = {}
        self.codes = itertools.count(1)
        self.rules = Rules(catalog, policy or Policy(), lambda ent_id, n: f"hash-{ent_id}-{n}")
        self.now = T0

    # the domain's Aggregates port
    def find(self, aggregate_id: UUID, kind: type[Any]) -> Any:
        return self.items.get(aggregate_id)

    def add(self, aggregate: Any) -> None:
        self.items[aggregate.id] = aggregate

    def at(self, offset_seconds: float) -> World:
        self.now = T0 + timedelta(seconds=offset_seconds)
        return self

    def deliver(self, event: dict[str, Any]) -> None:
        """Fold one event; then what Stripe sends with it (`_then`)."""
        for command in self.normalize(SOURCE, event, self.rules.catalog, self.now):
            apply(command, self, self.rules, self.now)
        for then in event.get("_then", ()):
            self.deliver(then)

    def tick(self) -> None:
        for entitlement in self.entitlements():
            settle_due(entitlement, self.rules, self.now)

    def entitlements(self) -> list[Entitlement]:
        return sorted(
            (a for a in self.items.values() if isinstance(a, Entitlement)), key=lambda e: e.slot
        )

    def only(self) -> Entitlement:
        (entitlement,) = self.entitlements()
        return entitlement

    def state(self) -> dict[str, tuple[Any, ...]]:
        """What a user sees of each entitlement (not its random code)."""
        return {
            e.slot: (
                e.status,
                e.reason,
                e.period_start,
                e.period_end,
                e.trial,
                e.overdue,
                e.cancel_at,
                e.due_at,
                e.sku,
                e.seats,
                e.quantity,
                e.features,
                e.limits,
                e.customer_id,
                e.customer_email,
            )
            for e in self.entitlements()
        }

    def event_types(self, entitlement: Entitlement) -> list[str]:
        return [type(e).__name__ for e in entitlement.collect_events()]
