"""The catalog: which offerings (SKUs) exist and what each one grants."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


class Catalog:
    """Offerings by SKU, plus the provider price ids that map onto them."""

    def __init__(self, offerings: Iterable[Offering] = ()) -> None:
        self._by_sku: dict[str, Offering] = {}
        self._by_stripe_price: dict[str, Offering] = {}
        for offering in offerings:
            if offering.sku in self._by_sku:
                raise ValueError(f"offering {offering.sku!r} is defined twice")
            self._by_sku[offering.sku] = offering
            for price_id in offering.stripe_price_ids:
                if price_id in self._by_stripe_price:
                    raise ValueError(
                        f"Stripe price {price_id!r} maps to both "
                        f"{self._by_stripe_price[price_id].sku!r} and {offering.sku!r}"
                    )
                self._by_stripe_price[price_id] = offering

    def __iter__(self) -> Any:
        return iter(self._by_sku.values())

    def __len__(self) -> int:
        return len(self._by_sku)

    def get(self, sku: str) -> Offering | None:
        return self._by_sku.get(sku)

    def for_stripe_price(self, price_id: str | None, sku: str | None) -> Offering | None:
        """The offering a Stripe price stands for: its `offering_sku` metadata
        wins over the catalog's price-id list, so a vendor can map prices from
        either side."""
        if sku:
            return self._by_sku.get(sku)
        if price_id:
            return self._by_stripe_price.get(price_id)
        return None
