"""The Entitlement aggregate and command folding, without infrastructure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from domain.catalog import Offering
from domain.commands import CancelOrder, Customer, PaidLine, RecordPayment, apply
from domain.entitlement import Cause, Entitlement, Order, Status, entitlement_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ANNUAL = Offering(
    sku="better_annual",
    product="acme",
    period="P1Y",
    seats=3,
    features={"export": True},
    limits={"projects": 50},
)
MONTHLY = Offering(sku="basic_monthly", product="acme", seats=1)


class Aggregates:
    """An in-memory aggregate lookup (the domain's port), for pure tests."""

    def __init__(self) -> None:
        self.items: dict[UUID, Any] = {}

    def find(self, aggregate_id: UUID, kind: type[Any]) -> Any:
        return self.items.get(aggregate_id)

    def add(self, aggregate: Any) -> None:
        self.items[aggregate.id] = aggregate

    def entitlements(self) -> list[Entitlement]:
        return [a for a in self.items.values() if isinstance(a, Entitlement)]


def codes() -> Any:
    n = iter(range(1000))
    return lambda: f"CODE-{next(n)}"


def payment(event_id: str, *lines: PaidLine, order_ref: str = "sub_1") -> RecordPayment:
    return RecordPayment(
        source="stripe-main",
        order_ref=order_ref,
        customer=Customer("cus_1", "a@example.com"),
        lines=lines,
        cause=Cause.provider("stripe-main", event_id),
        occurred_at=T0,
    )


def line(offering: Offering = ANNUAL, quantity: int = 1, months: int = 12) -> PaidLine:
    return PaidLine(offering, quantity, T0, T0 + timedelta(days=30 * months))


def cancel(event_id: str, order_ref: str = "sub_1") -> CancelOrder:
    return CancelOrder(
        source="stripe-main",
        order_ref=order_ref,
        reason="subscription_deleted",
        cause=Cause.provider("stripe-main", event_id),
        occurred_at=T0,
    )


def test_a_paid_invoice_creates_one_active_entitlement_per_offering() -> None:
    aggregates = Aggregates()
    apply(payment("evt_1", line(ANNUAL, quantity=2), line(MONTHLY)), aggregates, T0, codes())
    by_sku = {e.sku: e for e in aggregates.entitlements()}
    assert set(by_sku) == {"better_annual", "basic_monthly"}
    annual = by_sku["better_annual"]
    assert annual.status is Status.ACTIVE
    assert annual.seats == 6  # offering seats x quantity
    assert annual.features == {"export": True} and annual.limits == {"projects": 50}
    assert annual.period_end == T0 + timedelta(days=360)
    assert annual.customer_email == "a@example.com"
    assert annual.id == entitlement_id("stripe-main", "sub_1", "better_annual")
    assert annual.activation_code != by_sku["basic_monthly"].activation_code


def test_the_same_provider_event_twice_changes_nothing() -> None:
    aggregates = Aggregates()
    apply(payment("evt_1", line()), aggregates, T0, codes())
    [entitlement] = aggregates.entitlements()
    entitlement.collect_events()
    apply(payment("evt_1", line(months=24)), aggregates, T0, codes())
    assert entitlement.collect_events() == []
    assert entitlement.period_end == T0 + timedelta(days=360)


def test_a_later_payment_extends_the_period_and_never_shortens_it() -> None:
    aggregates = Aggregates()
    apply(payment("evt_1", line(months=12)), aggregates, T0, codes())
    apply(payment("evt_2", line(months=24)), aggregates, T0, codes())
    [entitlement] = aggregates.entitlements()
    assert entitlement.period_end == T0 + timedelta(days=720)
    apply(payment("evt_3", line(months=12)), aggregates, T0, codes())
    assert entitlement.period_end == T0 + timedelta(days=720)


def test_cancel_cancels_every_entitlement_of_the_order_only() -> None:
    aggregates = Aggregates()
    apply(payment("evt_1", line(ANNUAL), line(MONTHLY)), aggregates, T0, codes())
    apply(payment("evt_2", line(ANNUAL), order_ref="sub_2"), aggregates, T0, codes())
    apply(cancel("evt_3"), aggregates, T0, codes())
    statuses = {(e.order_ref, e.sku): e.status for e in aggregates.entitlements()}
    assert statuses == {
        ("sub_1", "better_annual"): Status.CANCELED,
        ("sub_1", "basic_monthly"): Status.CANCELED,
        ("sub_2", "better_annual"): Status.ACTIVE,
    }


def test_a_cancellation_that_arrives_before_the_payment_still_wins() -> None:
    aggregates = Aggregates()
    apply(cancel("evt_9"), aggregates, T0, codes())
    apply(payment("evt_1", line()), aggregates, T0, codes())
    [entitlement] = aggregates.entitlements()
    assert entitlement.status is Status.CANCELED
    assert [type(e).__name__ for e in entitlement.collect_events()] == [
        "Created",
        "Activated",
        "Canceled",
    ]


def test_a_payment_after_cancellation_does_not_reactivate() -> None:
    aggregates = Aggregates()
    apply(payment("evt_1", line()), aggregates, T0, codes())
    apply(cancel("evt_2"), aggregates, T0, codes())
    apply(payment("evt_3", line(months=24)), aggregates, T0, codes())
    [entitlement] = aggregates.entitlements()
    assert entitlement.status is Status.CANCELED


def test_events_carry_the_recording_time_and_cause_passed_in() -> None:
    aggregates = Aggregates()
    recorded = T0 + timedelta(hours=5)
    apply(payment("evt_1", line()), aggregates, recorded, codes())
    order = next(a for a in aggregates.items.values() if isinstance(a, Order))
    [entitlement] = aggregates.entitlements()
    events = entitlement.collect_events()
    assert {e.timestamp for e in events} == {recorded}
    assert events[-1].cause == {"kind": "provider", "source": "stripe-main", "event_id": "evt_1"}
    assert order.entitlements == {"better_annual": entitlement.id}
