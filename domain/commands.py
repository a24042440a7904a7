"""What a provider event means for our entitlements, and how it is applied.

Provider adapters turn webhooks into these commands; `apply` folds a command
into aggregates found through an `Aggregates` lookup, so the same code runs
in the domain service, in tests and in a re-drive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar
from uuid import UUID

from domain.catalog import Offering
from domain.entitlement import Cause, Entitlement, Order, entitlement_id, order_id

A = TypeVar("A", Entitlement, Order)


@dataclass(frozen=True)
class Customer:
    id: str | None
    email: str | None


@dataclass(frozen=True)
class PaidLine:
    """One invoice line that maps onto a catalog offering."""

    offering: Offering
    quantity: int
    period_start: datetime
    period_end: datetime


@dataclass(frozen=True)
class RecordPayment:
    """An order was paid for the given lines and periods."""

    source: str
    order_ref: str
    customer: Customer
    lines: tuple[PaidLine, ...]
    cause: Cause
    occurred_at: datetime


@dataclass(frozen=True)
class CancelOrder:
    """The provider canceled the whole order (e.g. subscription deleted)."""

    source: str
    order_ref: str
    reason: str
    cause: Cause
    occurred_at: datetime


Command = RecordPayment | CancelOrder


class Aggregates(Protocol):
    """Where `apply` finds aggregates and registers new ones."""

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None: ...

    def add(self, aggregate: Entitlement | Order) -> None: ...


def apply(
    command: Command,
    aggregates: Aggregates,
    at: datetime,
    new_activation_code: Callable[[], str],
) -> None:
    """Fold one command into the aggregates it concerns."""
    order = aggregates.find(order_id(command.source, command.order_ref), Order)
    if order is None:
        order = Order.open(command.source, command.order_ref, at)
        aggregates.add(order)
    if isinstance(command, RecordPayment):
        _record_payment(command, order, aggregates, at, new_activation_code)
    else:
        order.cancel(command.reason, command.cause, command.occurred_at, at)
        for ent_id in order.entitlements.values():
            entitlement = aggregates.find(ent_id, Entitlement)
            if entitlement is not None:
                entitlement.cancel(command.reason, command.cause, command.occurred_at, at)


def _record_payment(
    command: RecordPayment,
    order: Order,
    aggregates: Aggregates,
    at: datetime,
    new_activation_code: Callable[[], str],
) -> None:
    for line in command.lines:
        offering = line.offering
        ent_id = entitlement_id(command.source, command.order_ref, offering.sku)
        entitlement = aggregates.find(ent_id, Entitlement)
        if entitlement is None:
            entitlement = Entitlement.create(
                source=command.source,
                order_ref=command.order_ref,
                sku=offering.sku,
                product=offering.product,
                features=dict(offering.features),
                limits=dict(offering.limits),
                seats=offering.seats * line.quantity,
                quantity=line.quantity,
                customer_id=command.customer.id,
                customer_email=command.customer.email,
                activation_code=new_activation_code(),
                cause=command.cause,
                occurred_at=command.occurred_at,
                at=at,
            )
            aggregates.add(entitlement)
            order.add_entitlement(offering.sku, ent_id, at)
        entitlement.record_payment(
            line.period_start, line.period_end, command.cause, command.occurred_at, at
        )
        if order.cancellation is not None:
            # The cancellation arrived before this payment: it still wins.
            reason, cause, occurred_at = order.cancellation
            entitlement.cancel(reason, cause, occurred_at, at)
