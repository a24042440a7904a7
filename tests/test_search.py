"""Searching and paging the entitlement list, on SQLite and PostgreSQL:
each filter, a prefix search, and cursor pages that list an entitlement
there throughout exactly once while others are written between pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from services.config import parse_config
from services.projections import replay
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.test_grants import Call, run
from tests.test_store import NOW, YEAR, record, service

CONFIG = parse_config(f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
  - {{sku: gold, product: zenith, period: P1Y, seats: 10}}
""")


def bought(n: int, email: str, sku: str = "better_annual", customer: str = "cus_a") -> Any:
    return se.invoice_paid(
        subscription=f"sub_{n:03}",
        shape=se.LEGACY,
        email=email,
        customer=customer,
        lines=[{"price": "p", "sku": sku, "start": NOW, "end": NOW + YEAR}],
    )


def shop(database_url: str, count: int) -> tuple[EntitlementStore, ReadModel]:
    store = EntitlementStore(database_url)
    events = [
        bought(
            n,
            f"Buyer{n}@Example.com" if n % 3 else f"ada{n}@lovelace.org",
            "gold" if n % 4 == 0 else "better_annual",
            "cus_gold" if n % 5 == 0 else "cus_a",
        )
        for n in range(count)
    ]
    service(store, CONFIG).process([record(n, e) for n, e in enumerate(events)])
    read_model = ReadModel(database_url)
    replay(store, read_model)
    return store, read_model


def test_filters_and_prefix_search(database_url: str) -> None:
    _, read_model = shop(database_url, 30)

    def found(**query: Any) -> set[str]:
        views, _ = read_model.entitlement_page(1000, **query)
        return {v.order_ref for v in views}

    everyone = found()
    assert len(everyone) == 30
    # The address as the provider sent it, in any case.
    assert found(filters={"customer_email": "BUYER7@example.COM"}) == {"sub_007"}
    assert found(filters={"product": "zenith"}) == {f"sub_{n:03}" for n in range(0, 30, 4)}
    assert found(filters={"customer_id": "cus_gold"}) == {f"sub_{n:03}" for n in range(0, 30, 5)}
    assert found(filters={"source": "stripe-main", "offering": "gold", "status": "ACTIVE"}) == {
        f"sub_{n:03}" for n in range(0, 30, 4)
    }
    assert found(filters={"source": "manual"}) == set()
    assert found(q="ADA1") == {"sub_012", "sub_015", "sub_018"}  # ada12@…, ada15@…, ada18@…
    assert found(q="sub_02") == {f"sub_02{n}" for n in range(10)}
    assert found(q="sub_02%") == set()  # no wildcards
    assert found(q="b") == {f"sub_{n:03}" for n in range(30) if n % 3}
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert found(updated_since=later) == set()
    assert found(updated_since=later - timedelta(days=1)) == everyone


def test_cursor_pages_are_stable_under_writes(database_url: str) -> None:
    store, read_model = shop(database_url, 23)
    before = {v.order_ref for v in read_model.entitlement_page(1000)[0]}
    seen: list[str] = []
    after: str | None = None
    written = 100
    while True:
        page, after = read_model.entitlement_page(5, after)
        assert len(page) <= 5
        seen += [v.order_ref for v in page]
        if after is None:
            break
        # Others bought between pages: they may or may not be listed.
        service(store, CONFIG).process([record(written, bought(written, "new@example.com"))])
        replay(store, read_model)
        written += 1
    assert len(seen) == len(set(seen))  # nothing listed twice
    assert before <= set(seen)  # nothing there throughout missed
    assert read_model.entitlement_page(5, after="f" * 36)[0] == []


def test_the_api_pages_with_next_cursor(database_url: str) -> None:
    shop(database_url, 12)
    refs: list[str] = []
    bad: list[httpx.Response] = []

    async def walk(call: Call) -> None:
        params: dict[str, Any] = {"limit": 5, "q": "buyer"}
        while True:
            answer = await call("GET", "/v1/entitlements", params=params)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            refs.extend(item["order_ref"] for item in body["items"])
            if body["next_cursor"] is None:
                break
            params["cursor"] = body["next_cursor"]
        for p in ({"cursor": "nope"}, {"q": ""}, {"updated_since": "yesterday"}):
            bad.append(await call("GET", "/v1/entitlements", params=p))

    run(database_url, walk, CONFIG)
    assert sorted(refs) == sorted(f"sub_{n:03}" for n in range(12) if n % 3)
    assert [b.status_code for b in bad] == [422, 422, 422]
    assert all(b.json()["error"] == "invalid_query" for b in bad)
