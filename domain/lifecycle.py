"""Where an entitlement stands, derived from what it has been told.

An entitlement keeps every provider and admin *fact* it has been given
(payments, failures, subscription snapshots, cancellations, refunds, disputes,
admin actions). Its status, period, offering and seats are a pure function of
that set of facts and the current time: `Facts.standing` and `Facts.terms`.
Because a set has no order, the final state cannot depend on the order in
which webhooks arrived, nor on how often each one did. Where two facts
disagree (two subscription snapshots), the provider's timestamp decides, with
the event id as tie-break, so a stale event is remembered but cannot regress
the state.

Facts are plain JSON-friendly dicts, because they are stored inside domain
events. The constructors below are the only way adapters build them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from domain.catalog import Catalog, Offering, add_period


class Status(StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


Fact = dict[str, Any]

# Subscription statuses a snapshot can carry: Stripe's, plus "pending",
# "suspended" and "expired" for providers that state them outright.
PAID_SUBSCRIPTION = frozenset({"active", "past_due", "unpaid"})
OVERDUE_SUBSCRIPTION = frozenset({"past_due", "unpaid"})


# -- fact constructors (what adapters produce) --------------------------------


@dataclass(frozen=True)
class Line:
    """One purchased item: `slot` is the provider's stable id for it (a
    subscription item), so a plan change keeps the same entitlement."""

    slot: str
    offering: Offering
    quantity: int = 1
    period_start: datetime | None = None
    period_end: datetime | None = None

    def as_fact(self) -> dict[str, Any]:
        return {
            "sku": self.offering.sku,
            "quantity": self.quantity,
            "start": self.period_start,
            "end": self.period_end,
        }


def _lines(lines: Iterable[Line]) -> dict[str, Any]:
    return {line.slot: line.as_fact() for line in lines}


def payment(
    invoice: str,
    lines: Iterable[Line],
    starts: datetime | None = None,
    amount: str | None = None,
    rest_of_subscription: bool = False,
    subscription_period: bool = False,
) -> Fact:
    """An invoice was paid for these lines' periods. A provider that names no
    period (PayPal's sales, one-off purchases) gives `starts` instead: one
    period of each entitlement's offering from then. `amount` lets a later
    refund be judged full or partial. `rest_of_subscription`: the invoice
    also paid items it does not list (a webhook carries only its first
    lines), for the period the subscription last stated before it.
    `subscription_period`: once the order has a subscription, it pays the
    period the subscription states, not one of its own (Lemon Squeezy's
    subscription invoices name none, and a subscription's first order looks
    like a one-off sale); those made since the end of the period before
    the subscription's current one paid it (a full refund of one cancels)."""
    fact: Fact = {
        "kind": "payment",
        "invoice": invoice,
        "lines": _lines(lines),
        "starts": starts,
        "amount": amount,
    }
    if rest_of_subscription:
        fact["rest"] = True
    if subscription_period:
        fact["subscription_period"] = True
    return fact


def payment_failed(invoice: str, lines: Iterable[Line]) -> Fact:
    return {"kind": "payment_failed", "invoice": invoice, "lines": _lines(lines)}


def subscription(
    status: str,
    lines: Iterable[Line],
    period_start: datetime | None,
    period_end: datetime | None,
    trial_end: datetime | None = None,
    cancel_at: datetime | None = None,
    vouches: bool = True,
    pause_at: datetime | None = None,
    state: Mapping[str, Any] | None = None,
    previous: Mapping[str, Any] | None = None,
    final: bool = False,
) -> Fact:
    """The provider's whole view of the subscription at one moment.

    `vouches`: whether an `active` snapshot proves its period is paid. Not
    on providers that move the period forward before they charge for it
    (Stripe: `customer.subscription.updated` about an hour before the
    renewal invoice is attempted, https://docs.stripe.com/billing/subscriptions/overview#subscription-lifecycle;
    Chargebee: `subscription_renewed` with an invoice still to be paid):
    there only a paid invoice moves the paid-through date.

    `state` and `previous`: fields of the provider's object as they are now
    and as they were before this change (Stripe's `data.previous_attributes`),
    which order two snapshots made in the same second (`_snapshot_later`).

    `pause_at`: the provider has scheduled a pause that withholds access
    from then (Paddle's `scheduled_change` with action `pause`), so access
    stops on time even if the pause's own webhook comes late.

    `final`: the provider has ended the subscription, though the snapshot
    leaves the cycle already paid running (PayPal's CANCELLED): like a
    canceled one, it makes no entitlement for an item never seen."""
    fact: Fact = {
        "kind": "subscription",
        "status": status,
        "lines": _lines(lines),
        "start": period_start,
        "end": period_end,
        "trial_end": trial_end,
        "cancel_at": cancel_at,
        "vouches": vouches,
    }
    if pause_at is not None:
        # Left out when unset, so snapshots without one stay as they were.
        fact["pause_at"] = pause_at
    if final:
        fact["final"] = True
    if state:
        # What is unset is left out (read back as None): snapshots are many.
        fact["state"] = {k: v for k, v in state.items() if v is not None}
    if previous:
        fact["previous"] = dict(previous)
    return fact


def written_off(invoice: str, how: str) -> Fact:
    """The provider no longer expects `invoice` to be paid (`how`: `voided`,
    `uncollectible`): a failure to pay it leaves nothing overdue."""
    return {"kind": "written_off", "invoice": invoice, "how": how}


def payment_link(aliases: Iterable[str]) -> Fact:
    """More ids of the payment it is delivered through (a payment intent, a
    charge): refunds and disputes that name them find its order."""
    return {"kind": "payment_link", "aliases": sorted(set(aliases))}


def ended(reason: str, lines: Iterable[Line] = ()) -> Fact:
    """The provider canceled (deleted) the subscription or order."""
    return {"kind": "ended", "reason": reason, "lines": _lines(lines)}


def terminal(fact: Mapping[str, Any]) -> bool:
    """Whether `fact` says its items are over (an ended order, a canceled
    or expired subscription): an item first named by such a fact has
    nothing to grant, so no entitlement is made for it from this fact."""
    kind = fact.get("kind")
    return kind == "ended" or (
        kind == "subscription"
        and (fact.get("status") in ("canceled", "expired") or bool(fact.get("final")))
    )


def refund(
    full: bool | None,
    invoice: str | None = None,
    amount: str | None = None,
    refund_id: str | None = None,
    failed: bool = False,
) -> Fact:
    """`full` None: judged by `amount` against the refunded payment's amount.
    A refund the provider names (`refund_id`) and later reports `failed`
    refunds nothing."""
    fact: Fact = {"kind": "refund", "full": full, "invoice": invoice, "amount": amount}
    if refund_id is not None:
        fact["refund"] = refund_id
        fact["failed"] = failed
    return fact


def dispute(dispute_id: str, state: str, invoice: str | None = None) -> Fact:
    """A chargeback: state is `open`, `won` or `lost`."""
    if state not in ("open", "won", "lost"):
        raise ValueError(f"dispute state {state!r} is not open, won or lost")
    return {"kind": "dispute", "dispute": dispute_id, "state": state, "invoice": invoice}


def change(slot: str, sku: str, quantity: int, by: str, reason: str) -> Fact:
    """An admin set the item's offering and quantity (seats = the offering's
    seats x quantity). It holds until the provider states the item again
    at a later time (`Facts.terms`: the newer wins)."""
    return {
        "kind": "change",
        "slot": slot,
        "sku": sku,
        "quantity": quantity,
        "by": by,
        "reason": reason,
    }


def admin(action: str, by: str, reason: str, days: int = 0, waived: Iterable[str] = ()) -> Fact:
    return {
        "kind": "admin",
        "action": action,
        "by": by,
        "reason": reason,
        "days": days,
        "waived": sorted(waived),
    }


# -- derived state -------------------------------------------------------------


@dataclass(frozen=True)
class Terms:
    """What the entitlement grants."""

    sku: str
    product: str
    features: Mapping[str, Any]
    limits: Mapping[str, int]
    seats: int
    quantity: int
    customer_id: str | None
    customer_email: str | None

    @classmethod
    def of(
        cls,
        offering: Offering,
        quantity: int,
        customer_id: str | None = None,
        customer_email: str | None = None,
    ) -> Terms:
        return cls(
            sku=offering.sku,
            product=offering.product,
            features=dict(offering.features),
            limits=dict(offering.limits),
            seats=offering.seats * quantity,
            quantity=quantity,
            customer_id=customer_id,
            customer_email=customer_email,
        )


@dataclass(frozen=True)
class Standing:
    """Where the entitlement is in its lifecycle, and when that next changes
    by itself (`due_at`), so a scheduler can come back then."""

    status: Status = Status.PENDING
    reason: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    trial: bool = False
    overdue: bool = False
    cancel_at: datetime | None = None
    due_at: datetime | None = None


@dataclass(frozen=True)
class Policy:
    """Lifecycle settings that are not per offering."""

    #: Without suspend/expire thresholds, how long after the period end a
    #: late renewal may still arrive before the entitlement expires.
    expiry_leeway: timedelta = timedelta(hours=24)
    #: How long a refund, dispute or payment fact may wait for what it names
    #: (a payment, an order's first item) before it becomes a dead letter:
    #: longer than any provider keeps retrying a webhook (Stripe: 3 days).
    parked_for: timedelta = timedelta(days=7)


def _order_key(fact: Mapping[str, Any]) -> tuple[datetime, str]:
    return (fact["at"], fact["key"])


class Facts:
    """Every fact an entitlement has been given, indexed for derivation.

    `add` is idempotent per fact key and commutative: the indexes keep sets
    or maxima, never "the last one added".
    """

    def __init__(self, facts: Iterable[Fact] = ()) -> None:
        self.log: list[Fact] = []
        self._by_key: dict[str, Fact] = {}
        self.paid: dict[str, Fact] = {}  # invoice -> payment fact
        self.failed: dict[str, Fact] = {}  # invoice -> its (first) failure
        self.written_off: set[str] = set()
        self.latest_snapshot: Fact | None = None
        self.snapshots: list[Fact] = []
        self._tie_undecided = False
        self._top_count = 0  # snapshots in the newest second
        self.snapshot_paid_through: tuple[datetime, datetime | None] | None = None
        self.latest_lines: Fact | None = None  # newest payment/failure/ended with lines
        self.ended: dict[str, str] = {}  # fact key -> reason
        self.refunds: dict[str, Fact] = {}  # fact key -> refund fact
        self.failed_refunds: dict[str, Fact] = {}  # refund id -> its failure
        self.disputes: dict[str, Fact] = {}  # dispute id -> newest fact
        self.latest_customer: Fact | None = None
        self.admin: list[Fact] = []
        self.changes: dict[str, Fact] = {}  # slot -> newest admin change of its terms
        for fact in facts:
            self.add(fact)

    def add(self, fact: Fact) -> None:
        key = fact["key"]
        known = self._by_key.get(key)
        if known is not None:
            if known is not fact:
                _merge_lines(known, fact)
            return
        self._by_key[key] = fact
        self.log.append(fact)
        kind = fact["kind"]
        who = fact.get("customer")
        if (
            who
            and who.get("email")
            and (
                self.latest_customer is None or _order_key(fact) > _order_key(self.latest_customer)
            )
        ):
            self.latest_customer = fact
        if (
            fact.get("lines")
            and kind != "subscription"
            and (self.latest_lines is None or _order_key(fact) > _order_key(self.latest_lines))
        ):
            self.latest_lines = fact
        if kind == "payment":
            previous = self.paid.get(fact["invoice"])
            if previous is None or _order_key(fact) < _order_key(previous):
                self.paid[fact["invoice"]] = fact
        elif kind == "payment_failed":
            previous = self.failed.get(fact["invoice"])
            if previous is None or _order_key(fact) < _order_key(previous):
                self.failed[fact["invoice"]] = fact
        elif kind == "written_off":
            self.written_off.add(fact["invoice"])
        elif kind == "subscription":
            self.snapshots.append(fact)
            top = self.latest_snapshot
            if top is None or fact["at"] > top["at"]:
                self.latest_snapshot, self._tie_undecided, self._top_count = fact, False, 1
            elif fact["at"] == top["at"] or self._top_count > 1:
                # A tie in the newest second: ordered among the snapshots
                # (an older one may decide it), only then.
                self._top_count += fact["at"] == top["at"]
                self.latest_snapshot, self._tie_undecided = _newest(self.snapshots)
            through = _snapshot_paid_through(fact)
            if through is not None and (
                self.snapshot_paid_through is None or through[0] > self.snapshot_paid_through[0]
            ):
                self.snapshot_paid_through = through
        elif kind == "ended":
            self.ended[key] = fact["reason"]
        elif kind == "refund":
            if fact.get("failed"):
                self.failed_refunds[fact["refund"]] = fact
            else:
                self.refunds[key] = fact
        elif kind == "dispute":
            previous = self.disputes.get(fact["dispute"])
            if previous is None or _dispute_rank(fact) > _dispute_rank(previous):
                self.disputes[fact["dispute"]] = fact
        elif kind == "change":
            previous = self.changes.get(fact["slot"])
            if previous is None or _order_key(fact) > _order_key(previous):
                self.changes[fact["slot"]] = fact
        elif kind == "admin":
            # Admin actions are recorded one after another by us, so their
            # order is the order they were taken in.
            self.admin.append(fact)

    # -- terms ---------------------------------------------------------------

    def terms(self, slot: str, current: Terms, catalog: Catalog) -> Terms:
        """The offering and quantity the provider last stated for `slot`.

        The newer (by provider time) of the newest subscription snapshot and
        the newest paid invoice line for it wins: a snapshot is the
        provider's view of the plan, and an invoice paid after it for a
        different quantity is what the buyer now pays for. Without either,
        the newest line of any other fact does.
        """
        stated: Fact | None = None  # the provider's fact the line comes from
        snapshot = self.latest_snapshot
        paid: Fact | None = None
        for fact in self.paid.values():
            if slot in fact["lines"] and (paid is None or _order_key(fact) > _order_key(paid)):
                paid = fact
        if snapshot is not None and slot in snapshot["lines"]:
            newer_paid = paid is not None and _order_key(paid) > _order_key(snapshot)
            stated = paid if newer_paid and paid is not None else snapshot
        elif paid is not None:
            stated = paid
        elif self.latest_lines is not None and slot in self.latest_lines["lines"]:
            stated = self.latest_lines
        else:
            for fact in self.log:
                if slot in (fact.get("lines") or {}) and (
                    stated is None or _order_key(fact) > _order_key(stated)
                ):
                    stated = fact
        line: Mapping[str, Any] | None = stated["lines"][slot] if stated is not None else None
        # An admin's change holds until the provider states the item later.
        changed = self.changes.get(slot)
        if changed is not None and (stated is None or _order_key(changed) > _order_key(stated)):
            line = changed
        customer_id, customer_email = current.customer_id, current.customer_email
        if self.latest_customer is not None:
            who = self.latest_customer["customer"]
            customer_id = who.get("id") or customer_id
            customer_email = who.get("email") or customer_email
        terms = replace(current, customer_id=customer_id, customer_email=customer_email)
        if line is None:
            return terms
        offering = catalog.get(line["sku"])
        if offering is None:
            # The SKU left the catalog: keep granting what was granted.
            return terms
        return Terms.of(offering, int(line["quantity"]), customer_id, customer_email)

    # -- standing ------------------------------------------------------------

    def _admin_state(self) -> tuple[str | None, int, set[str]]:
        hold: str | None = None
        days = 0
        waived: set[str] = set()
        for fact in self.admin:
            action = fact["action"]
            if action in ("suspend", "cancel"):
                hold = action
            elif action == "reinstate":
                hold = None
                waived.update(fact["waived"])
            elif action == "extend":
                days += int(fact["days"])
        return hold, days, waived

    def _paid_through(
        self, slot: str, offering: Offering | None
    ) -> tuple[datetime | None, datetime | None, str | None]:
        """(period start, period end, invoice) of the latest paid period."""
        best: tuple[datetime, datetime | None, str | None] | None = None
        for invoice, fact in self.paid.items():
            if self.snapshots and fact.get("subscription_period"):
                continue  # it paid the period the subscription states
            line = fact["lines"].get(slot)
            if line is not None and line.get("end") is not None:
                candidate = (line["end"], line.get("start"), invoice)
            elif fact.get("starts") is not None and offering is not None:
                starts = fact["starts"]
                candidate = (add_period(starts, offering.period), starts, invoice)
            elif fact.get("rest") and (stated := self._stated_before(fact, slot)) is not None:
                candidate = (stated[1], stated[0], invoice)
            else:
                continue
            if (
                best is None
                or candidate[0] > best[0]
                or (candidate[0] == best[0] and invoice < (best[2] or ""))
            ):
                best = candidate
        through = self.snapshot_paid_through
        if through is not None and (best is None or through[0] > best[0]):
            # The snapshot's period is paid by the newest payment when that
            # one reaches within a period of its end: PayPal states the next
            # billing time a few hours after the sale's own period ends, and
            # refunding that sale must still end the license.
            current = None
            if (
                best is not None
                and offering is not None
                and add_period(best[0], offering.period) > through[0]
            ):
                current = best[2]
            return through[1], through[0], current
        if best is None:
            return None, None, None
        return best[1], best[0], best[2]

    def _subscription_period_payments(self) -> list[str]:
        """The invoices of the payments of the period the subscription states
        (`payment(subscription_period=True)`): those made since the end of
        the period before it (every one, in the first period)."""
        paid = [(i, f) for i, f in self.paid.items() if f.get("subscription_period")]
        ends = {t[0] for s in self.snapshots if (t := _snapshot_paid_through(s)) is not None}
        if not paid or not ends:
            return []
        current = max(ends)
        since = max((end for end in ends if end < current), default=None)
        return sorted(invoice for invoice, fact in paid if since is None or fact["at"] >= since)

    def undecided_tie(self) -> bool:
        """Whether the newest snapshot shares its second with another and
        only their content ordered them (nothing they say they changed
        from): a fetch of the provider's current state can settle it."""
        return self._tie_undecided

    def _stated_before(self, fact: Fact, slot: str) -> tuple[datetime | None, datetime] | None:
        """(start, end) of `slot`'s period in the newest snapshot before `fact`."""
        best: Fact | None = None
        for snapshot in self.snapshots:
            if (
                slot in snapshot["lines"]
                and snapshot.get("end") is not None
                and _order_key(snapshot) <= _order_key(fact)
                and (best is None or _order_key(snapshot) > _order_key(best))
            ):
                best = snapshot
        return (best.get("start"), best["end"]) if best is not None else None

    def blocking(
        self, slot: str, now: datetime, offering: Offering | None = None
    ) -> list[tuple[Status, str, str | None]]:
        """Everything that keeps the entitlement from being ACTIVE, most
        severe first: (status, reason, waivable fact key or None)."""
        hold, _, waived = self._admin_state()
        found: list[tuple[Status, str, str | None]] = []
        if hold == "cancel":
            found.append((Status.CANCELED, "admin", None))
        for key, reason in sorted(self.ended.items()):
            if key not in waived:
                found.append((Status.CANCELED, reason, key))
        snapshot = self.latest_snapshot
        if snapshot is not None and snapshot["key"] not in waived:
            if snapshot["status"] == "canceled":
                found.append((Status.CANCELED, "subscription_canceled", snapshot["key"]))
            elif slot not in snapshot["lines"] and snapshot["lines"]:
                found.append((Status.CANCELED, "removed_from_subscription", snapshot["key"]))
            elif snapshot["lines"].get(slot, {}).get("quantity") == 0:
                # The item is still there, emptied: it grants nothing for now.
                found.append((Status.SUSPENDED, "quantity_zero", snapshot["key"]))
        _, _, current_invoice = self._paid_through(slot, offering)
        current = [current_invoice] if current_invoice is not None else []
        if current_invoice is None and self.snapshots:
            current = self._subscription_period_payments()
        for invoice in current:
            refund_key = self._refunded_in_full(invoice)
            if refund_key is not None and refund_key not in waived:
                found.append((Status.CANCELED, "refunded", refund_key))
                break
        for dispute_id, fact in sorted(self.disputes.items()):
            if dispute_id in waived:
                continue
            if fact["state"] == "lost":
                found.append((Status.CANCELED, "dispute_lost", dispute_id))
            elif fact["state"] == "open":
                found.append((Status.SUSPENDED, "disputed", dispute_id))
        # The one reason that time alone brings: it ranks after every other
        # cancellation, so the reason cannot depend on when it was derived.
        if (
            snapshot is not None
            and snapshot["key"] not in waived
            and snapshot["cancel_at"] is not None
            and now >= snapshot["cancel_at"]
        ):
            found.append((Status.CANCELED, "canceled_at_period_end", snapshot["key"]))
        if (
            snapshot is not None
            and snapshot["key"] not in waived
            and snapshot.get("pause_at") is not None
            and now >= snapshot["pause_at"]
        ):
            found.append((Status.SUSPENDED, "paused", snapshot["key"]))
        if hold == "suspend":
            found.append((Status.SUSPENDED, "admin", None))
        if snapshot is not None and snapshot["key"] not in waived:
            # Providers that state these outright (Zenofy-style checkouts,
            # the neutral schema) are taken at their word.
            if snapshot["status"] in ("paused", "suspended"):
                found.append((Status.SUSPENDED, snapshot["status"], snapshot["key"]))
            elif snapshot["status"] == "expired":
                found.append((Status.EXPIRED, "expired", snapshot["key"]))
        found.sort(key=lambda item: _SEVERITY[item[0]])
        return found

    def _refunded_in_full(self, invoice: str | None) -> str | None:
        """The key of a refund that returns all of `invoice`, or None. A
        refund the provider reports failed refunds nothing, and makes the
        charge totals it sent before (which counted it) count for nothing
        too; refunds it names one by one add up."""
        if invoice is None:
            return None
        failures = [f for f in self.failed_refunds.values() if f.get("invoice") in (None, invoice)]
        standing: list[tuple[str, Fact]] = []
        for key, fact in sorted(self.refunds.items()):
            if fact["invoice"] != invoice or fact.get("refund") in self.failed_refunds:
                continue
            if fact.get("refund") is None and any(
                _order_key(f) > _order_key(fact) for f in failures
            ):
                continue  # a charge total that counted a refund since failed
            standing.append((key, fact))
        for key, fact in standing:
            if self._full_refund(fact):
                return key
        by_id = {fact["refund"]: (key, fact) for key, fact in standing if fact.get("refund")}
        paid = self.paid.get(invoice)
        if by_id and paid is not None and paid.get("amount") is not None:
            try:
                total = sum(abs(Decimal(str(f.get("amount") or 0))) for _, f in by_id.values())
                if total >= Decimal(str(paid["amount"])):
                    return max(key for key, _ in by_id.values())
            except InvalidOperation:
                return None
        return None

    def _full_refund(self, fact: Fact) -> bool:
        if fact["full"] is not None:
            return bool(fact["full"])
        paid = self.paid.get(fact["invoice"] or "")
        if paid is None or paid.get("amount") is None or fact.get("amount") is None:
            return False
        try:
            return abs(Decimal(str(fact["amount"]))) >= Decimal(str(paid["amount"]))
        except InvalidOperation:
            return False

    def standing(
        self, slot: str, offering: Offering | None, policy: Policy, now: datetime
    ) -> Standing:
        _, extension_days, _ = self._admin_state()
        start, end, _ = self._paid_through(slot, offering)
        if end is not None:
            end = end + timedelta(days=extension_days)
        snapshot = self.latest_snapshot
        cancel_at = snapshot["cancel_at"] if snapshot is not None else None
        pause_at = snapshot.get("pause_at") if snapshot is not None else None
        trial = (
            snapshot is not None
            and snapshot["status"] == "trialing"
            and snapshot["trial_end"] is not None
            and end is not None
            and end <= snapshot["trial_end"] + timedelta(days=extension_days)
        )
        blocking = self.blocking(slot, now, offering)
        if blocking:
            status, reason, _ = blocking[0]
            return Standing(
                status,
                reason,
                start,
                end,
                False,
                False,
                cancel_at,
                _due(now, [] if status is Status.CANCELED else [cancel_at, pause_at]),
            )
        if end is None:
            if snapshot is not None and snapshot["status"] == "incomplete_expired":
                return Standing(Status.EXPIRED, "incomplete_expired", cancel_at=cancel_at)
            return Standing(
                Status.PENDING, None, cancel_at=cancel_at, due_at=_due(now, [cancel_at, pause_at])
            )
        suspend_days = offering.suspend_after_days if offering is not None else None
        expire_days = offering.expire_after_days if offering is not None else None
        suspend_at: datetime | None = None
        expire_at: datetime | None = None
        if suspend_days is None and expire_days is None:
            expire_at = end + policy.expiry_leeway
        else:
            suspend_at = end + timedelta(days=suspend_days) if suspend_days is not None else None
            expire_at = end + timedelta(days=expire_days) if expire_days is not None else None
        due = _due(now, [end, suspend_at, expire_at, cancel_at, pause_at])
        if expire_at is not None and now >= expire_at:
            return Standing(Status.EXPIRED, "unpaid", start, end, False, False, cancel_at, due)
        if suspend_at is not None and now >= suspend_at:
            return Standing(Status.SUSPENDED, "unpaid", start, end, False, True, cancel_at, due)
        return Standing(
            Status.ACTIVE, None, start, end, trial, self._overdue(slot, end, now), cancel_at, due
        )

    def _overdue(self, slot: str, end: datetime, now: datetime) -> bool:
        """Whether the current period is unpaid: it has ended unpaid, or an
        invoice beyond the paid-through date failed and is neither paid nor
        written off since, or the provider's newest snapshot says so and no
        payment came after it."""
        if now >= end:
            return True
        for invoice, failure in self.failed.items():
            if invoice in self.paid or invoice in self.written_off:
                continue
            line = failure["lines"].get(slot)
            if line is None and failure["lines"]:
                continue  # another item's invoice
            failed_end = line.get("end") if line is not None else None
            if failed_end is not None:
                if failed_end > end:
                    return True
            elif not any(_order_key(p) > _order_key(failure) for p in self.paid.values()):
                return True
        snapshot = self.latest_snapshot
        if snapshot is None or snapshot["status"] not in OVERDUE_SUBSCRIPTION:
            return False
        # A payment the provider made after that snapshot settles it.
        return not any(_order_key(p) > _order_key(snapshot) for p in self.paid.values())


def _merge_lines(known: Fact, fact: Fact) -> None:
    """The same provider event again, understood more fully (re-driven after
    the catalog gained an offering): it may name more items."""
    if fact.get("lines") and known.get("lines") is not None:
        for slot, line in fact["lines"].items():
            known["lines"].setdefault(slot, line)


def _snapshot_paid_through(fact: Fact) -> tuple[datetime, datetime | None] | None:
    """(end, start) that a subscription snapshot vouches is paid for."""
    if fact["status"] == "trialing" and fact.get("trial_end") is not None:
        return fact["trial_end"], fact.get("start")
    if fact["status"] == "active" and fact.get("end") is not None and fact.get("vouches", True):
        return fact["end"], fact.get("start")
    return None


#: Where a status usually comes in a subscription's life: of two snapshots
#: in the same second that nothing else orders, the later status wins.
_STATUS_ORDER = {
    "pending": 0,
    "incomplete": 1,
    "incomplete_expired": 2,
    "trialing": 3,
    "active": 4,
    "past_due": 5,
    "unpaid": 6,
    "paused": 6,
    "suspended": 6,
    "canceled": 7,
    "expired": 8,
}


def _follows(later: Fact, earlier: Fact) -> bool:
    """Whether `later` says it changed from what `earlier` shows: every
    field it reports as changed had, before, the value `earlier` has."""
    previous = later.get("previous")
    state = earlier.get("state")
    if not previous or state is None:
        return False
    return all(state.get(field) == value for field, value in previous.items())


def _newest(snapshots: list[Fact]) -> tuple[Fact, bool]:
    """The newest snapshot, and whether a same-second tie had to be broken
    by content alone. Snapshots made in the newest second are put in the
    order their `previous` fields chain in, starting from the newest one
    before that second (so a change and its undoing in one second end
    right); where the chain does not decide, `_snapshot_later` does."""
    top = max(s["at"] for s in snapshots)
    remaining = [s for s in snapshots if s["at"] == top]
    if len(remaining) == 1:
        return remaining[0], False
    earlier = [s for s in snapshots if s["at"] < top]
    current = max(earlier, key=functools.cmp_to_key(_compare)) if earlier else None
    undecided = False
    while len(remaining) > 1:
        followers = [s for s in remaining if current is not None and _follows(s, current)]
        if len(followers) == 1:
            current = followers[0]
        else:
            pool = followers or remaining
            # The first of them is the one every other says it changed from.
            firsts = [s for s in pool if all(_follows(o, s) for o in remaining if o is not s)]
            if len(firsts) == 1:
                current = firsts[0]
            else:
                undecided = True
                current = min(pool, key=functools.cmp_to_key(_compare))
        remaining.remove(current)
    return remaining[0], undecided


def _compare(a: Fact, b: Fact) -> int:
    return 0 if a is b else (1 if _snapshot_later(a, b) else -1)


def _snapshot_later(fact: Fact, other: Fact) -> bool:
    """Whether snapshot `fact` is newer than `other`: by the provider's
    time; in the same second (Stripe's `created` has one-second resolution)
    by which one changed from the other (`previous_attributes`); then by a
    rule that depends on their content only (the usual order of statuses,
    the later period end, a scheduled cancellation), never on random ids
    unless the two say the same."""
    if fact["at"] != other["at"]:
        return bool(fact["at"] > other["at"])
    forward, backward = _follows(fact, other), _follows(other, fact)
    if forward != backward:
        return forward
    return _content_rank(fact) > _content_rank(other)


def _content_rank(fact: Fact) -> tuple[int, datetime, int, str]:
    end = fact.get("end") or fact["at"]
    return (
        _STATUS_ORDER.get(fact["status"], 0),
        end,
        int(fact.get("cancel_at") is not None),
        fact["key"],
    )


_DISPUTE_ORDER = {"open": 0, "won": 1, "lost": 1}
_SEVERITY = {Status.CANCELED: 0, Status.EXPIRED: 1, Status.SUSPENDED: 2}


def _dispute_rank(fact: Fact) -> tuple[int, datetime, str]:
    # A closed dispute outranks its opening whatever the timestamps say.
    return (_DISPUTE_ORDER[fact["state"]], fact["at"], fact["key"])


def _due(now: datetime, moments: Iterable[datetime | None]) -> datetime | None:
    future = [m for m in moments if m is not None and m > now]
    return min(future) if future else None
