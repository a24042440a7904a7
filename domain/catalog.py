"""The catalog: which offerings (SKUs) exist and what each one grants."""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

_PERIOD = re.compile(r"^P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?$")


@dataclass(frozen=True)
class Offering:
    """A sellable SKU and the rights it grants per purchased unit."""

    sku: str
    product: str
    period: str = "P1M"
    seats: int = 1
    features: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)
    suspend_after_days: int | None = None
    expire_after_days: int | None = None
    stripe_price_ids: tuple[str, ...] = ()
    #: Floating seats: leases kept alive by heartbeats, freed after lease_seconds.
    floating: bool = False
    lease_seconds: int = 900
    #: Provider price (variant, plan, item price) ids per provider name.
    prices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sku:
            raise ValueError("an offering needs a sku")
        if not self.product:
            raise ValueError(f"offering {self.sku!r} needs a product")
        if not _PERIOD.match(self.period) or self.period == "P":
            raise ValueError(
                f"offering {self.sku!r}: period {self.period!r} is not an ISO 8601 "
                "duration such as P1M or P1Y"
            )
        if self.seats < 1:
            raise ValueError(f"offering {self.sku!r}: seats must be at least 1")
        for name in ("suspend_after_days", "expire_after_days"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"offering {self.sku!r}: {name} must not be negative")


def add_period(start: datetime, period: str) -> datetime:
    """`start` plus an ISO 8601 period such as P1M or P1Y2M10D; a month from
    Jan 31 ends on the last day of February."""
    match = _PERIOD.match(period)
    if match is None:
        raise ValueError(f"{period!r} is not an ISO 8601 period")
    years, months, weeks, days = (int(g or 0) for g in match.groups())
    month_index = start.month - 1 + months + 12 * years
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day) + timedelta(weeks=weeks, days=days)


class Catalog:
    """Offerings by SKU, plus the provider price ids that map onto them."""

    def __init__(self, offerings: Iterable[Offering] = ()) -> None:
        self._by_sku: dict[str, Offering] = {}
        self._by_price: dict[tuple[str, str], Offering] = {}
        for offering in offerings:
            if offering.sku in self._by_sku:
                raise ValueError(f"offering {offering.sku!r} is defined twice")
            self._by_sku[offering.sku] = offering
            listed = [("stripe", p) for p in offering.stripe_price_ids]
            listed += [(provider, p) for provider, ids in offering.prices.items() for p in ids]
            for provider, price_id in listed:
                other = self._by_price.get((provider, price_id))
                if other is not None and other is not offering:
                    raise ValueError(
                        f"{provider} price {price_id!r} maps to both "
                        f"{other.sku!r} and {offering.sku!r}"
                    )
                self._by_price[(provider, price_id)] = offering

    def __iter__(self) -> Any:
        return iter(self._by_sku.values())

    def __len__(self) -> int:
        return len(self._by_sku)

    def get(self, sku: str) -> Offering | None:
        return self._by_sku.get(sku)

    def for_price(self, provider: str, price_id: str | None, sku: str | None) -> Offering | None:
        """The offering a provider's price stands for: an `offering_sku` the
        provider carries (price metadata, custom data) wins over the
        catalog's price-id list, so a vendor can map prices from either side."""
        if sku:
            return self._by_sku.get(sku)
        if price_id:
            return self._by_price.get((provider, str(price_id)))
        return None
