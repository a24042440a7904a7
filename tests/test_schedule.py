"""Time-based transitions on real databases, with a clock the test controls:
due times live in the event-sourced state, so they survive a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from domain.entitlement import Entitlement, Status, entitlement_id
from services.config import parse_config
from services.fold import DomainService, Scheduler
from services.projections import Follower, ReadModelProjection
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.test_store import CODES, record

pytestmark = pytest.mark.integration

CONFIG = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: pro, product: acme, suspend_after_days: 3, expire_after_days: 14,
      stripe_price_ids: [price_pro]}}
  - {{sku: basic, product: acme, stripe_price_ids: [price_basic]}}
lifecycle: {{expiry_leeway_hours: 2}}
""")
START = datetime(2026, 3, 1, tzinfo=UTC)
END = START + timedelta(days=30)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def paid(subscription: str, price: str) -> dict[str, object]:
    return se.invoice_paid(
        subscription=subscription,
        lines=[{"price": price, "start": int(START.timestamp()), "end": int(END.timestamp())}],
        created=int(START.timestamp()) + 60,
    )


def project(store: EntitlementStore, read_model: ReadModel) -> None:
    projection = ReadModelProjection(read_model)
    position = projection.position()
    changes, last = Follower(store).read(position, 10_000)
    if last is not None:
        projection.apply(changes, last)


def status(store: EntitlementStore, subscription: str, price: str) -> Status:
    ent_id = entitlement_id("stripe-main", subscription, se.item_id(subscription, price))
    entitlement = store.find(ent_id, Entitlement)
    assert entitlement is not None
    return entitlement.status


def test_due_entitlements_are_suspended_then_expired_across_a_restart(database_url: str) -> None:
    clock = Clock(START + timedelta(minutes=5))
    store, read_model = EntitlementStore(database_url), ReadModel(database_url)
    service = DomainService(store, CONFIG, CODES, clock=clock)
    service.process(
        [record(0, paid("sub_pro", "price_pro")), record(1, paid("sub_basic", "price_basic"))]
    )
    project(store, read_model)
    scheduler = Scheduler(service, read_model)
    assert scheduler.run_once() == 0  # nothing is due yet

    clock.now = END + timedelta(days=3)
    assert scheduler.run_once() > 0
    project(store, read_model)
    assert status(store, "sub_pro", "price_pro") is Status.SUSPENDED
    assert status(store, "sub_basic", "price_basic") is Status.EXPIRED  # 2 h leeway, no thresholds
    assert scheduler.run_once() == 0  # firing again changes nothing

    # A restart: new store, read model and scheduler; the timer is still there.
    store.close()
    read_model.close()
    store, read_model = EntitlementStore(database_url), ReadModel(database_url)
    clock.now = END + timedelta(days=20)
    scheduler = Scheduler(DomainService(store, CONFIG, CODES, clock=clock), read_model)
    assert scheduler.run_once() > 0
    assert status(store, "sub_pro", "price_pro") is Status.EXPIRED
    ent_id = entitlement_id("stripe-main", "sub_pro", se.item_id("sub_pro", "price_pro"))
    last = store.history(ent_id)[-1]
    assert type(last).__name__ == "Expired"
    assert last.cause["kind"] == "schedule"  # type: ignore[attr-defined]
    assert last.occurred_at == END + timedelta(days=14)  # type: ignore[attr-defined]
    store.close()
    read_model.close()
