"""Manual grants and changes by an admin, on SQLite and PostgreSQL: an
entitlement without a provider, another offering or seats with a reason,
each an audited event, and a provider's later word still wins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx

from services.app import Roles, build_app
from services.config import Config, Settings, admin_keys, parse_config
from services.projections import replay
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.test_store import record, service

CONFIG = parse_config(f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - {{sku: team, product: acme, period: P1Y, seats: 3, features: {{export: true}}}}
  - {{sku: solo, product: acme, period: P1M, seats: 1}}
""")
AUTH = {"Authorization": "Bearer ek_test_admin_key"}
Call = Callable[..., Awaitable[httpx.Response]]


def run(
    database_url: str, steps: Callable[[Call], Awaitable[None]], config: Config = CONFIG
) -> None:
    """`steps(call)` against an API process's app on `database_url` (no
    broker, no projector), `call(method, path, …)` sending the admin key."""
    settings = Settings(
        kafka_bootstrap=None,
        database_url=database_url,
        kafka_idempotence=False,
        raw_partitions=1,
        code_secret="x" * 32,
    )
    app = build_app(config, settings, Roles(api=True), admin_keys("ops:ek_test_admin_key"))

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://entitle") as client:

            async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                headers = {**AUTH, **kwargs.pop("headers", {})}
                return await client.request(method, path, headers=headers, **kwargs)

            await steps(call)

    asyncio.run(go())


def test_a_manual_grant_is_an_entitlement_with_a_code_and_a_history(database_url: str) -> None:
    store = EntitlementStore(database_url)

    async def steps(call: Call) -> None:
        body = {
            "offering": "team",
            "customer": {"email": "Reseller@Example.com", "id": "deal-7"},
            "seats": 6,
            "period": "P1Y",
            "reason": "reseller deal #7",
        }
        once = {"Idempotency-Key": "grant-7"}
        made = await call("POST", "/v1/entitlements", json=body, headers=once)
        assert made.status_code == 201, made.text
        grant = made.json()
        assert (grant["source"], grant["status"], grant["seats"], grant["offering"]) == (
            "manual",
            "ACTIVE",
            6,
            "team",
        )
        end = datetime.fromisoformat(grant["period_end"])
        assert abs(end - (datetime.now(UTC) + timedelta(days=365))) < timedelta(days=1)
        assert grant["order_ref"] == "manual-grant-7" and grant["activation_code"]
        # A retry is the same grant, not a second one.
        again = await call("POST", "/v1/entitlements", json=body, headers=once)
        assert again.status_code == 201 and again.json()["id"] == grant["id"]
        await asyncio.to_thread(replay, store, ReadModel(database_url))  # (no projector here)
        listed = await call("GET", "/v1/entitlements", params={"source": "manual"})
        assert [e["id"] for e in listed.json()["items"]] == [grant["id"]]
        valid = await call(
            "POST", "/v1/validate", json={"activation_code": grant["activation_code"]}
        )
        assert valid.json()["code"] == "VALID"
        history = (await call("GET", f"/v1/entitlements/{grant['id']}/history")).json()
        first = history["events"][0]
        assert first["type"] == "entitlement.created"
        assert first["cause"] == {"kind": "admin", "source": "ops", "event_id": "grant-7"}
        facts = [e["data"].get("fact") or {} for e in history["events"]]
        assert {"by": "ops", "reason": "reseller deal #7"} in [f.get("grant") for f in facts]
        for wrong, why in (
            ({**body, "offering": "nope"}, "no offering"),
            ({**body, "seats": 4}, "multiple"),
            ({**body, "period_end": "2030-01-01T00:00:00Z"}, "not both"),
            ({**body, "period": "one year"}, "ISO 8601"),
            ({k: v for k, v in body.items() if k != "reason"}, "reason"),
            ({**body, "customer": {"email": "not-an-email"}}, "e-mail address"),
            ({**body, "order_ref": ""}, "order_ref"),
        ):
            refused = await call("POST", "/v1/entitlements", json=wrong)
            assert refused.status_code == 422 and why in refused.text, (wrong, refused.text)
        # Another grant may not take an order reference already granted.
        taken = await call("POST", "/v1/entitlements", json={**body, "order_ref": "manual-grant-7"})
        assert taken.status_code == 409 and "another grant's" in taken.text
        for far in ({"period_end": "9999-12-31T23:59:59Z", "period": None}, {"period": "P7900Y"}):
            refused = await call("POST", "/v1/entitlements", json={**body, **far})
            assert refused.status_code == 422, refused.text
        # A grant's period is its own: another offering does not move its end.
        monthly = await call("POST", "/v1/entitlements", json={**body, "seats": 3})
        changed = await call(
            "POST",
            f"/v1/entitlements/{monthly.json()['id']}/change",
            json={"offering": "solo", "reason": "fewer seats"},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["period_end"] == monthly.json()["period_end"]
        long_key = await call(
            "POST", "/v1/entitlements", json=body, headers={"Idempotency-Key": "k" * 256}
        )
        assert long_key.status_code == 422 and "Idempotency-Key" in long_key.text
        unauthorized = await call(
            "POST", "/v1/entitlements", json=body, headers={"Authorization": ""}
        )
        assert unauthorized.status_code == 401

    run(database_url, steps)


def test_an_admin_changes_offering_and_seats_until_the_provider_says_otherwise(
    database_url: str,
) -> None:
    store = EntitlementStore(database_url)
    now = int(time.time())
    bought = se.invoice_paid(
        subscription="sub_change",
        shape=se.LEGACY,
        created=now - 3600,
        lines=[{"price": "p", "sku": "team", "start": now - 3600, "end": now + 86400 * 300}],
    )
    service(store, CONFIG).process([record(0, bought)])
    replay(store, ReadModel(database_url))  # (no projector runs here)

    async def steps(call: Call) -> None:
        [item] = (await call("GET", "/v1/entitlements", params={"order_ref": "sub_change"})).json()[
            "items"
        ]
        url = f"/v1/entitlements/{item['id']}/change"
        more = await call("POST", url, json={"seats": 9, "reason": "bought 6 more offline"})
        assert more.status_code == 200, more.text
        assert (more.json()["seats"], more.json()["offering"]) == (9, "team")
        solo = await call("POST", url, json={"offering": "solo", "reason": "downgrade by phone"})
        assert (solo.json()["offering"], solo.json()["seats"]) == ("solo", 1)
        same = await call("POST", url, json={"offering": "solo", "reason": "again"})
        assert same.status_code == 409
        odd = await call("POST", url, json={"offering": "team", "seats": 4, "reason": "x"})
        assert odd.status_code == 409 and "multiple" in odd.text
        assert (await call("POST", url, json={"reason": "nothing"})).status_code == 422
        history = (await call("GET", f"/v1/entitlements/{item['id']}/history")).json()
        changes = [e for e in history["events"] if e["cause"]["kind"] == "admin"]
        assert [e["type"] for e in changes] == [
            "entitlement.seats_changed",
            "entitlement.offering_changed",
        ]
        assert changes[1]["data"]["fact"]["reason"] == "downgrade by phone"

        # The provider states the item again, later: its word wins.
        renewed = se.invoice_paid(
            subscription="sub_change",
            shape=se.LEGACY,
            created=now + 60,
            lines=[{"price": "p", "sku": "team", "start": now, "end": now + 86400 * 400}],
        )
        service(store, CONFIG).process([record(1, renewed)])
        state = store.entitlement(UUID(item["id"]))
        assert state is not None and (state.sku, state.seats) == ("team", 3)

    run(database_url, steps)
