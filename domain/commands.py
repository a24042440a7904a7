"""What a provider event means for our entitlements, and how it is applied.

Provider adapters turn webhooks into these commands; `apply` folds a command
into aggregates found through an `Aggregates` lookup, so the same code runs
in the domain service, in tests and in a re-drive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

from domain.catalog import Catalog
from domain.entitlement import (
    Cause,
    Entitlement,
    Order,
    Payment,
    entitlement_id,
    event_type,
    order_id,
    payment_id,
)
from domain.lifecycle import Fact, Line, Policy, Terms, terminal

A = TypeVar("A", Entitlement, Order, Payment)


@dataclass(frozen=True)
class Customer:
    id: str | None
    email: str | None


@dataclass(frozen=True)
class OrderEvent:
    """Something the provider said about one order (subscription): a payment,
    a failure, a snapshot of the subscription, its end.

    `lines` are the items it names; an entitlement is created for each one
    not seen before. `payment_refs` are the payment ids this event settles,
    so that refunds and disputes naming them find this order.
    """

    source: str
    order_ref: str
    fact: Fact
    lines: tuple[Line, ...]
    cause: Cause
    occurred_at: datetime
    customer: Customer | None = None
    payment_refs: tuple[str, ...] = ()
    invoice: str | None = None


@dataclass(frozen=True)
class PaymentEvent:
    """Something the provider said about a payment rather than an order (a
    refund, a dispute): it reaches the order through the payment."""

    source: str
    payment_refs: tuple[str, ...]
    fact: Fact
    cause: Cause
    occurred_at: datetime


Command = OrderEvent | PaymentEvent


class Aggregates(Protocol):
    """Where `apply` finds aggregates and registers new ones."""

    def find(self, aggregate_id: UUID, kind: type[A]) -> A | None: ...

    def add(self, aggregate: Entitlement | Order | Payment) -> None: ...


@dataclass(frozen=True)
class Rules:
    """What the fold needs besides the aggregates: the catalog, lifecycle
    policy, and the hash of an entitlement's n-th activation code (the code
    itself is derived by the service layer and never stored)."""

    catalog: Catalog
    policy: Policy
    code_hash: Callable[[UUID, int], str]


def touches(command: Command) -> list[UUID]:
    """The aggregates a command names directly, so a service can load them
    in bulk before applying (orders name their entitlements in turn)."""
    ids = [payment_id(command.source, ref) for ref in command.payment_refs]
    if isinstance(command, OrderEvent):
        ids.append(order_id(command.source, command.order_ref))
        ids += [entitlement_id(command.source, command.order_ref, ln.slot) for ln in command.lines]
    return ids


@dataclass
class Effect:
    """What applying one command did."""

    #: The events each entitlement it reached got (`entitlement.activated` …).
    events: dict[UUID, list[str]] = field(default_factory=dict)
    #: Whether every entitlement it reached had applied its cause already.
    duplicate: bool = False
    #: What its fact waits for when no entitlement could take it yet
    #: (`payment pi_1`, `an item of order sub_1`), and whether it began
    #: waiting now (not a repeat of a fact already waiting).
    waits_for: str | None = None
    newly_parked: bool = False
    #: What it waits on: `payment:<id>` or `order:<id>` (aggregate ids).
    waits_on: tuple[str, ...] = ()
    #: Payment ids it linked to their order (`payment_link`), newly or not.
    linked: tuple[str, ...] = ()
    newly_linked: bool = False
    #: Provider facts that had waited and reached their entitlements with it.
    delivered: tuple[Cause, ...] = ()

    def merge(self, other: Effect) -> None:
        for key, names in other.events.items():
            self.events.setdefault(key, []).extend(names)
        self.duplicate = self.duplicate or other.duplicate
        self.waits_for = self.waits_for or other.waits_for
        self.newly_parked = self.newly_parked or other.newly_parked
        self.waits_on += other.waits_on
        self.linked += other.linked
        self.delivered += other.delivered
        self.newly_linked = self.newly_linked or other.newly_linked


class _Watch:
    """Counts each entitlement's pending events, to tell what a command added."""

    def __init__(self, entitlements: list[Entitlement], cause: Cause) -> None:
        self.before = {e.id: len(e.pending_events) for e in entitlements}
        self.duplicate = bool(entitlements) and all(e.has_applied(cause) for e in entitlements)

    def effect(self, entitlements: list[Entitlement]) -> Effect:
        events = {}
        for entitlement in entitlements:
            new = entitlement.pending_events[self.before.get(entitlement.id, 0) :]
            if new:
                events[entitlement.id] = [event_type(event) for event in new]
        return Effect(events, duplicate=self.duplicate and not events)


def apply(command: Command, aggregates: Aggregates, rules: Rules, at: datetime) -> Effect:
    """Fold one command into the aggregates it concerns; returns what it did."""
    if isinstance(command, OrderEvent):
        return _apply_order_event(command, aggregates, rules, at)
    return _apply_payment_event(command, aggregates, rules, at)


def _entitlements(order: Order, aggregates: Aggregates) -> list[Entitlement]:
    found = (aggregates.find(ent_id, Entitlement) for ent_id in order.entitlements.values())
    return [e for e in found if e is not None]


def _apply_order_event(
    command: OrderEvent, aggregates: Aggregates, rules: Rules, at: datetime
) -> Effect:
    order = aggregates.find(order_id(command.source, command.order_ref), Order)
    if order is None:
        order = Order.open(command.source, command.order_ref, at)
        aggregates.add(order)
    fact: dict[str, Any] = dict(command.fact)
    if command.customer is not None:
        fact["customer"] = {"id": command.customer.id, "email": command.customer.email}
    entitlements = _entitlements(order, aggregates)
    watch = _Watch(entitlements, command.cause)
    delivered: list[Cause] = []
    lines = command.lines
    if not lines and not entitlements and command.fact["kind"] == "payment":
        # A payment that names no item (a PayPal sale) for an order whose
        # cancellation came first: the items that cancellation named are
        # made, already canceled.
        lines = _named_by_parked_ending(order, rules)
    # The items this event makes: not known ones, nor emptied ones, nor any
    # first named as they end (a cancellation of an item never seen), which
    # grant nothing: the fact stays on the order, and a payment for the item
    # later creates it already canceled.
    ending = terminal(command.fact)
    new = [ln for ln in lines if ln.slot not in order.entitlements and ln.quantity and not ending]
    if order.parked and not entitlements and new:
        # The order's first item takes the facts that waited for one.
        delivered += [c for c in map(Cause.of_fact, order.parked) if c is not None]
    waiting = _waiting_on_payments(command, aggregates)
    for line in new:
        if line.slot in order.entitlements:
            continue  # named twice in this event
        # A new item learns what its order already knows (a cancellation, a
        # failed payment), so its state does not depend on when it appeared.
        inherited = list(order.parked) + waiting
        if entitlements:
            inherited += [f for f in entitlements[0].facts.log if f["kind"] != "admin"]
        customer = command.customer or Customer(None, None)
        entitlement = Entitlement.create(
            source=command.source,
            order_ref=command.order_ref,
            slot=line.slot,
            terms=Terms.of(line.offering, line.quantity, customer.id, customer.email),
            code_hash=rules.code_hash(
                entitlement_id(command.source, command.order_ref, line.slot), 0
            ),
            inherited=inherited,
            cause=command.cause,
            occurred_at=command.occurred_at,
            at=at,
        )
        aggregates.add(entitlement)
        order.add_entitlement(line.slot, entitlement.id, at)
        entitlements.append(entitlement)
    waits_for, newly_parked = None, False
    if not entitlements:
        waits_for = f"an item of order {command.order_ref}"
        newly_parked = order.park({**fact, "key": command.cause.key, "at": command.occurred_at}, at)
    # What waited for this payment (a refund, a chargeback) reaches the
    # entitlements before the payment does: one made PENDING earlier is
    # then never activated by a payment already refunded.
    for ref in command.payment_refs:
        payment = aggregates.find(payment_id(command.source, ref), Payment)
        if payment is None:
            invoice = command.invoice or ref
            aggregates.add(Payment.open(command.source, ref, at, command.order_ref, invoice))
        elif payment.link(command.order_ref, command.invoice or ref, at):
            _deliver_parked(payment, order, aggregates, rules, at, delivered)
    for entitlement in entitlements:
        entitlement.settle(
            fact, command.cause, command.occurred_at, rules.catalog, rules.policy, at
        )
    effect = watch.effect(entitlements)
    effect.delivered = tuple(delivered)
    effect.waits_for, effect.newly_parked = waits_for, newly_parked
    if waits_for is not None:
        effect.waits_on = (f"order:{order.id}",)
    return effect


def _named_by_parked_ending(order: Order, rules: Rules) -> tuple[Line, ...]:
    """The items the newest ending the order keeps (`terminal`) names, for
    a payment that names none."""
    endings = [f for f in order.parked if terminal(f) and f.get("lines")]
    if not endings:
        return ()
    newest = max(endings, key=lambda f: (f["at"], f["key"]))
    found = []
    for slot, line in newest["lines"].items():
        offering = rules.catalog.get(line["sku"])
        if offering is not None and line.get("quantity"):
            found.append(Line(slot, offering, int(line["quantity"])))
    return tuple(found)


def _waiting_on_payments(command: OrderEvent, aggregates: Aggregates) -> list[Fact]:
    """The facts that wait for a payment `command` names and will reach its
    order with it (a refund or chargeback sent before the payment): a new
    item learns them as it is made, as it learns its order's, so it is
    never activated (nor its code mailed) by a payment already refunded."""
    found: list[Fact] = []
    for ref in command.payment_refs:
        payment = aggregates.find(payment_id(command.source, ref), Payment)
        if payment is None or payment.order_ref is not None:
            continue  # unknown, or linked before: what waited was delivered then
        for parked in payment.parked:
            fact = parked["fact"]
            if fact["kind"] == "payment_link":
                continue
            found.append(
                {
                    **fact,
                    "invoice": fact.get("invoice") or command.invoice or ref,
                    "key": Cause(**parked["cause"]).key,
                    "at": parked["occurred_at"],
                }
            )
    return found


def _deliver_parked(
    payment: Payment,
    order: Order,
    aggregates: Aggregates,
    rules: Rules,
    at: datetime,
    delivered: list[Cause],
) -> None:
    """The facts that waited for `payment`, now linked to `order`, reach
    its entitlements (each recorded on the order with what it did, and
    listed in `delivered`)."""
    entitlements = _entitlements(order, aggregates)
    for parked in payment.parked:
        cause = Cause(**parked["cause"])
        if not entitlements and parked["fact"]["kind"] != "payment_link":
            # Its first item takes it (and its receipt is applied then).
            _park_on_order(parked["fact"], payment, cause, parked["occurred_at"], order, at)
            continue
        if parked["fact"]["kind"] != "payment_link" and all(
            e.has_applied(cause) for e in entitlements
        ):
            # Inherited as the item was made (`_waiting_on_payments`): its
            # receipt names what it reached with the item's creation.
            delivered.append(cause)
            continue
        watch = _Watch(entitlements, cause)
        _deliver(
            parked["fact"],
            payment,
            cause,
            parked["occurred_at"],
            order,
            aggregates,
            rules,
            at,
            delivered,
        )
        reached = watch.effect(_entitlements(order, aggregates)).events
        order.payment_fact_delivered(parked["fact"], cause, reached, at)
        delivered.append(cause)


def _park_on_order(
    fact: Fact, payment: Payment, cause: Cause, occurred_at: datetime, order: Order, at: datetime
) -> bool:
    """Keep a payment's fact on its order until the order has an item."""
    invoice = fact.get("invoice") or payment.invoice
    return order.park({**fact, "invoice": invoice, "key": cause.key, "at": occurred_at}, at)


def _deliver(
    fact: Fact,
    payment: Payment,
    cause: Cause,
    occurred_at: datetime,
    order: Order,
    aggregates: Aggregates,
    rules: Rules,
    at: datetime,
    delivered: list[Cause],
) -> bool:
    """A payment fact reaches the order `payment` is linked to. A
    `payment_link` names more ids of the same payment (Stripe's
    `invoice_payment.paid`: the payment intent and charge that paid an
    invoice): they are linked to the order too, and what waited for them
    is delivered. Returns whether it linked an id not linked before."""
    source, order_ref = order.source, order.order_ref
    if fact["kind"] == "payment_link":
        invoice = payment.invoice or payment.ref
        linked = False
        for alias in fact["aliases"]:
            other = aggregates.find(payment_id(source, alias), Payment)
            if other is None:
                aggregates.add(Payment.open(source, alias, at, order_ref, invoice))
                linked = True
            elif other.link(order_ref, invoice, at):
                _deliver_parked(other, order, aggregates, rules, at, delivered)
                linked = True
        return linked
    fact = {**fact, "invoice": fact.get("invoice") or payment.invoice}
    for entitlement in _entitlements(order, aggregates):
        entitlement.settle(fact, cause, occurred_at, rules.catalog, rules.policy, at)
    return False


def _apply_payment_event(
    command: PaymentEvent, aggregates: Aggregates, rules: Rules, at: datetime
) -> Effect:
    payments = [
        (ref, aggregates.find(payment_id(command.source, ref), Payment))
        for ref in command.payment_refs
    ]
    for _, payment in payments:
        if payment is not None and payment.order_ref is not None:
            order = aggregates.find(order_id(command.source, payment.order_ref), Order)
            if order is not None:
                entitlements = _entitlements(order, aggregates)
                if not entitlements and command.fact["kind"] != "payment_link":
                    # The order has no item yet: its first one takes the fact.
                    newly = _park_on_order(
                        command.fact, payment, command.cause, command.occurred_at, order, at
                    )
                    return Effect(
                        waits_for=f"an item of order {order.order_ref}",
                        newly_parked=newly,
                        waits_on=(f"order:{order.id}",),
                    )
                watch = _Watch(entitlements, command.cause)
                delivered: list[Cause] = []
                linked = _deliver(
                    command.fact,
                    payment,
                    command.cause,
                    command.occurred_at,
                    order,
                    aggregates,
                    rules,
                    at,
                    delivered,
                )
                effect = watch.effect(_entitlements(order, aggregates))
                effect.delivered = tuple(delivered)
                if command.fact["kind"] == "payment_link":
                    effect.linked, effect.newly_linked = tuple(command.fact["aliases"]), linked
                order.payment_fact_delivered(command.fact, command.cause, effect.events, at)
                return effect
    # The payment itself has not arrived yet: wait for it on every ref.
    newly_parked = False
    for ref, payment in payments:
        if payment is None:
            payment = Payment.open(command.source, ref, at)
            aggregates.add(payment)
        newly_parked = (
            payment.park(command.fact, command.cause, command.occurred_at, at) or newly_parked
        )
    refs = ", ".join(command.payment_refs)
    waits_on = tuple(f"payment:{payment_id(command.source, ref)}" for ref in command.payment_refs)
    return Effect(waits_for=f"payment {refs}", newly_parked=newly_parked, waits_on=waits_on)


def still_waits(aggregates: Aggregates, waits_on: list[str]) -> bool:
    """Whether a fact parked on these (`Effect.waits_on`) still waits: no
    payment of them is linked to its order, the order has no item yet."""
    for entry in waits_on:
        kind, _, raw = entry.partition(":")
        if kind == "payment":
            payment = aggregates.find(UUID(raw), Payment)
            if payment is not None and payment.order_ref is not None:
                order = aggregates.find(order_id(payment.source, payment.order_ref), Order)
                return order is not None and not order.entitlements
        elif kind == "order":
            order = aggregates.find(UUID(raw), Order)
            if order is not None and order.entitlements:
                return False
    return True


def settle_due(entitlement: Entitlement, rules: Rules, now: datetime) -> bool:
    """Apply whatever time has changed since the entitlement's due time."""
    due_at = entitlement.due_at
    if due_at is None or due_at > now:
        return False
    return entitlement.settle(
        None, Cause.schedule(due_at), due_at, rules.catalog, rules.policy, now
    )
