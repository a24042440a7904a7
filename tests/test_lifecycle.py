"""The full lifecycle on the Stripe path, without infrastructure: real Stripe
payloads through the real adapter and domain fold, with a test-held clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.entitlement import Refused, Status
from domain.lifecycle import Policy
from services.providers import Unmappable
from tests import stripe_events as se
from tests.lifecycle_world import DAY, MONTH, PRICES, T0, World, ts

SUB = "sub_1"
#: The API shape every test here runs on: each runs on both (see `shape`).
SHAPE = [se.LEGACY]


@pytest.fixture(autouse=True, params=[se.LEGACY, se.BASIL])
def shape(request: pytest.FixtureRequest) -> Any:
    SHAPE[0] = request.param
    yield request.param
    SHAPE[0] = se.LEGACY


def paid(k: int, plan: str = "basic", quantity: int = 1, **kw: Any) -> dict[str, Any]:
    """The invoice paying period k (0-based) of SUB, sent a minute into it."""
    return se.invoice_paid(
        subscription=SUB,
        lines=[
            {
                "price": PRICES[plan],
                "item": "si_main",
                "quantity": quantity,
                "start": ts(k * MONTH),
                "end": ts((k + 1) * MONTH),
            }
        ],
        invoice_id=kw.pop("invoice_id", f"in_{k}"),
        payment_intent=kw.pop("payment_intent", f"pi_{k}"),
        shape=kw.pop("shape", SHAPE[0]),
        created=ts(k * MONTH + 60),
        **kw,
    )


def failed(k: int, plan: str = "basic") -> dict[str, Any]:
    return paid(k, plan, kind="invoice.payment_failed")


def snapshot(
    k: int,
    status: str = "active",
    plan: str = "basic",
    quantity: int = 1,
    at: int = 120,
    kind: str = "customer.subscription.updated",
    extra: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    items = [{"price": PRICES[plan], "item": "si_main", "quantity": quantity}, *(extra or [])]
    return se.subscription_event(
        kind,
        subscription=SUB,
        items=items,
        status=status,
        start=ts(k * MONTH),
        end=ts((k + 1) * MONTH),
        created=ts(k * MONTH + at),
        shape=kw.pop("shape", SHAPE[0]),
        **kw,
    )


def test_an_incomplete_subscription_is_pending_until_its_first_invoice_is_paid() -> None:
    world = World()
    world.deliver(snapshot(0, "incomplete", kind="customer.subscription.created"))
    entitlement = world.only()
    assert entitlement.status is Status.PENDING and entitlement.period_end is None
    world.deliver(paid(0))
    assert entitlement.status is Status.ACTIVE
    assert entitlement.period_end == T0 + timedelta(days=30)
    assert world.event_types(entitlement) == ["Created", "Noted", "CustomerChanged", "Activated"]
    assert entitlement.customer_email == "buyer@example.com"


def test_a_checkout_before_its_subscription_gives_the_pending_entitlement_its_email() -> None:
    world = World()
    checkout = se._event(
        "checkout.session.completed",
        {
            "id": "cs_1",
            "object": "checkout.session",
            "mode": "subscription",
            "subscription": SUB,
            "customer": "cus_9",
            "customer_details": {"email": "ada@example.com"},
            "payment_status": "unpaid",
        },
        se.BASIL,
        None,
        ts(5),
    )
    world.deliver(checkout)
    assert world.entitlements() == []  # the session names no items: it waits on the order
    world.deliver(snapshot(0, "incomplete", kind="customer.subscription.created"))
    entitlement = world.only()
    assert entitlement.status is Status.PENDING
    assert (entitlement.customer_id, entitlement.customer_email) == ("cus_9", "ada@example.com")


def test_a_trialing_subscription_is_active_in_trial_until_the_trial_end() -> None:
    world = World()
    trial_end = ts(14 * DAY)
    world.deliver(
        snapshot(0, "trialing", kind="customer.subscription.created", trial_end=trial_end)
    )
    entitlement = world.only()
    assert entitlement.status is Status.ACTIVE and entitlement.trial
    assert entitlement.period_end == T0 + timedelta(days=14)
    # Without payment, it expires after the trial (plus the 24 h leeway).
    world.at(15 * DAY).tick()
    assert entitlement.status is Status.EXPIRED and not entitlement.trial


def test_renewals_extend_the_period_and_an_old_invoice_never_shortens_it() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(paid(2))
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(days=90)
    world.deliver(paid(1))  # late delivery of the middle period
    assert entitlement.period_end == T0 + timedelta(days=90)
    assert world.event_types(entitlement)[-1] == "Noted"


def test_a_payment_failure_is_overdue_then_suspended_then_expired_by_the_clock() -> None:
    world = World()  # pro: suspend 3 days and expire 14 days after the period end
    world.deliver(paid(0, "pro"))
    world.at(MONTH + 60).deliver(failed(1, "pro"))
    entitlement = world.only()
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.at(MONTH + 3 * DAY - 1).tick()
    assert entitlement.status is Status.ACTIVE
    world.at(MONTH + 3 * DAY).tick()
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "unpaid")
    world.at(MONTH + 14 * DAY).tick()
    assert (entitlement.status, entitlement.reason) == (Status.EXPIRED, "unpaid")
    # The retried invoice is paid at last: the renewal reinstates it.
    world.at(MONTH + 20 * DAY).deliver(paid(1, "pro"))
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)
    assert entitlement.period_end == T0 + timedelta(days=60)
    types = world.event_types(entitlement)
    assert types[-4:] == ["Overdue", "Suspended", "Expired", "Reinstated"]


def test_a_renewal_paid_while_suspended_reactivates() -> None:
    world = World()
    world.deliver(paid(0, "pro"))
    world.at(MONTH + 60).deliver(failed(1, "pro"))
    world.at(MONTH + 5 * DAY).tick()
    entitlement = world.only()
    assert entitlement.status is Status.SUSPENDED
    world.at(MONTH + 6 * DAY).deliver(paid(1, "pro"))
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)
    assert world.event_types(entitlement)[-1] == "Reinstated"


def test_without_thresholds_it_expires_at_the_period_end_plus_the_leeway() -> None:
    world = World(policy=Policy(expiry_leeway=timedelta(hours=6)))
    world.deliver(paid(0))
    entitlement = world.only()
    assert entitlement.due_at == T0 + timedelta(days=30)
    world.at(MONTH + 6 * 3600 - 1).tick()
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.at(MONTH + 6 * 3600).tick()
    assert entitlement.status is Status.EXPIRED
    world.at(MONTH + 7 * 3600).deliver(paid(1))  # a late renewal still revives it
    assert entitlement.status is Status.ACTIVE


def test_a_plan_change_keeps_the_entitlement_and_its_code() -> None:
    world = World()
    world.deliver(paid(0, "basic"))
    entitlement = world.only()
    codes = dict(entitlement.codes)
    world.deliver(snapshot(0, plan="pro", at=3600))
    assert world.only() is entitlement and entitlement.codes == codes
    assert (entitlement.sku, entitlement.seats) == ("pro", 5)
    assert entitlement.features == {"export": True} and entitlement.limits == {"projects": 50}
    world.deliver(snapshot(0, plan="pro", quantity=2, at=7200))
    assert (entitlement.seats, entitlement.quantity) == (10, 2)
    assert world.event_types(entitlement)[-2:] == ["OfferingChanged", "SeatsChanged"]


def test_cancel_at_period_end_schedules_cancellation_and_undoing_it_unschedules() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(snapshot(0, at=600, cancel_at_period_end=True))
    entitlement = world.only()
    assert entitlement.status is Status.ACTIVE
    assert entitlement.cancel_at == T0 + timedelta(days=30)
    world.deliver(snapshot(0, at=900))
    assert entitlement.cancel_at is None
    world.deliver(snapshot(0, at=1200, cancel_at_period_end=True))
    world.at(MONTH).tick()
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "canceled_at_period_end")
    types = world.event_types(entitlement)
    assert types[-4:] == ["CancelScheduled", "CancelUnscheduled", "CancelScheduled", "Canceled"]


def test_deletion_is_terminal_until_an_admin_reinstates() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(se.subscription_deleted(subscription=SUB, created=ts(600)))
    entitlement = world.only()
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "subscription_deleted")
    world.deliver(paid(1))
    assert entitlement.status is Status.CANCELED
    entitlement.administer(
        "reinstate", "ops", "goodwill", "req-1", world.rules.catalog, world.rules.policy, world.now
    )
    assert entitlement.status is Status.ACTIVE
    assert entitlement.period_end == T0 + timedelta(days=60)


def test_a_full_refund_of_the_current_period_cancels_and_a_partial_one_does_not() -> None:
    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    world.deliver(
        se.charge_refunded(
            payment_intent="pi_0", invoice="in_0", refunded=500, created=ts(DAY), shape=SHAPE[0]
        )
    )
    assert entitlement.status is Status.ACTIVE
    assert world.event_types(entitlement)[-1] == "Noted"
    world.deliver(
        se.charge_refunded(
            payment_intent="pi_0", invoice="in_0", created=ts(2 * DAY), shape=SHAPE[0]
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")


def test_a_refund_that_arrives_before_its_payment_waits_for_it() -> None:
    world = World()
    world.deliver(se.charge_refunded(payment_intent="pi_0", created=ts(DAY), shape=SHAPE[0]))
    assert world.entitlements() == []
    world.deliver(paid(0))
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "refunded")


def test_a_dispute_suspends_and_winning_it_reinstates() -> None:
    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    world.deliver(
        se.dispute(
            "charge.dispute.created", dispute_id="dp_1", payment_intent="pi_0", created=ts(DAY)
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "disputed")
    world.deliver(
        se.dispute(
            "charge.dispute.closed",
            dispute_id="dp_1",
            payment_intent="pi_0",
            status="won",
            created=ts(9 * DAY),
        )
    )
    assert entitlement.status is Status.ACTIVE
    assert world.event_types(entitlement)[-2:] == ["Suspended", "Reinstated"]


def test_a_lost_dispute_cancels() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(
        se.dispute(
            "charge.dispute.closed",
            dispute_id="dp_1",
            payment_intent="pi_0",
            status="lost",
            created=ts(9 * DAY),
        )
    )
    world.deliver(
        se.dispute(
            "charge.dispute.created", dispute_id="dp_1", payment_intent="pi_0", created=ts(DAY)
        )
    )  # the opening arrives last: still lost
    assert (world.only().status, world.only().reason) == (Status.CANCELED, "dispute_lost")


def test_a_stale_snapshot_is_kept_in_the_history_but_does_not_regress() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(snapshot(0, plan="pro", at=3600))
    entitlement = world.only()
    world.deliver(snapshot(0, plan="basic", at=1800, event_id="evt_stale"))
    assert entitlement.sku == "pro"
    last = entitlement.collect_events()[-1]
    assert type(last).__name__ == "Noted" and last.cause["event_id"] == "evt_stale"


def test_a_redelivered_event_changes_nothing() -> None:
    world = World()
    event = paid(0)
    world.deliver(event)
    entitlement = world.only()
    version = entitlement.version
    world.at(5 * MONTH).deliver(event)
    assert entitlement.version == version


def test_an_event_redelivered_after_its_entitlement_inherited_it_changes_nothing() -> None:
    """A deletion that waited for the order's first item is applied when the
    item appears; delivered again, it is a duplicate, not a second fact."""
    world = World()
    deleted = se.subscription_deleted(subscription=SUB, created=ts(600))
    world.deliver(deleted)
    world.deliver(paid(0))
    entitlement = world.only()
    version = entitlement.version
    world.deliver(deleted)
    assert entitlement.version == version
    assert entitlement.status is Status.CANCELED


def test_a_new_item_learns_what_its_order_already_knows() -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(se.subscription_deleted(subscription=SUB, created=ts(600)))
    # An add-on item shows up in a snapshot delivered after the deletion.
    world.deliver(snapshot(0, at=300, extra=[{"price": "price_addon", "item": "si_addon"}]))
    assert [e.status for e in world.entitlements()] == [Status.CANCELED, Status.CANCELED]


def test_admin_commands_are_recorded_with_the_key_name_and_reason() -> None:
    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    rules = world.rules

    def admin(action: str, request_id: str, days: int = 0) -> None:
        entitlement.administer(
            action,
            "ops",
            f"because {action}",
            request_id,
            rules.catalog,
            rules.policy,
            world.now,
            days=days,
        )

    admin("suspend", "r1")
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "admin")
    with pytest.raises(Refused):
        admin("suspend", "r2")
    admin("reinstate", "r3")
    assert entitlement.status is Status.ACTIVE
    admin("extend", "r4", days=10)
    assert entitlement.period_end == T0 + timedelta(days=40)
    admin("extend", "r4", days=10)  # the same request again: no effect
    assert entitlement.period_end == T0 + timedelta(days=40)
    admin("cancel", "r5")
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "admin")
    last = entitlement.collect_events()[-1]
    assert last.cause == {"kind": "admin", "source": "ops", "event_id": "r5"}
    assert last.fact is not None and last.fact["reason"] == "because cancel"
    admin("reinstate", "r6")
    assert entitlement.status is Status.ACTIVE
    with pytest.raises(Refused, match="to give more time, extend it"):
        admin("reinstate", "r7")  # nothing holds it back any more


# -- Stripe as it really behaves --------------------------------------------------


def test_the_renewal_snapshot_sent_before_the_charge_does_not_pay_the_period() -> None:
    """Stripe advances current_period_* (status still active) about an hour
    before it charges; if the charge fails, the new period is unpaid."""
    world = World()  # pro: suspend 3 days and expire 14 days after the period end
    world.deliver(paid(0, "pro"))
    world.at(MONTH - 3600).deliver(snapshot(1, "active", "pro", at=-3600))
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=MONTH)
    world.at(MONTH + 60).deliver(failed(1, "pro"))
    world.deliver(snapshot(1, "past_due", "pro", at=200))
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, True)
    world.at(MONTH + 3 * DAY).tick()
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "unpaid")
    # A trial still counts as paid through its end.
    trial = World()
    trial.deliver(snapshot(0, "trialing", trial_end=ts(14 * DAY)))
    assert trial.only().status is Status.ACTIVE and trial.only().trial


@pytest.mark.parametrize("how", ["invoice.voided", "invoice.marked_uncollectible"])
def test_a_failed_invoice_written_off_leaves_nothing_overdue(how: str) -> None:
    world = World()
    world.deliver(paid(0))
    world.deliver(paid(1))
    world.at(MONTH + 60).deliver(failed(2))  # e.g. an invoice for extra usage, later voided
    entitlement = world.only()
    assert entitlement.overdue
    written_off = failed(2)
    written_off["type"], written_off["id"] = how, "evt_written_off"
    world.deliver(written_off)
    assert (entitlement.status, entitlement.overdue) == (Status.ACTIVE, False)


def test_a_later_paid_period_clears_an_earlier_failure() -> None:
    world = World()
    world.deliver(paid(0))
    world.at(MONTH + 60).deliver(failed(1))
    world.at(2 * MONTH + 60).deliver(paid(2))
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=3 * MONTH)
    assert not entitlement.overdue


def test_a_proration_only_invoice_links_its_payment_so_its_dispute_suspends() -> None:
    world = World()
    world.deliver(paid(0))
    upgrade = se.invoice_paid(
        subscription=SUB,
        lines=[
            {
                "price": PRICES["basic"],
                "item": "si_main",
                "quantity": -1,
                "proration": True,
                "start": ts(DAY),
                "end": ts(MONTH),
            },
            {
                "price": PRICES["pro"],
                "item": "si_main",
                "proration": True,
                "start": ts(DAY),
                "end": ts(MONTH),
            },
        ],
        invoice_id="in_upgrade",
        payment_intent="pi_upgrade",
        shape=SHAPE[0],
        created=ts(DAY),
    )
    upgrade["data"]["object"]["lines"]["data"][0]["quantity"] = 1
    world.deliver(upgrade)  # no dead letter: a payment that grants nothing new
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=MONTH)
    world.deliver(
        se.dispute("charge.dispute.created", dispute_id="dp_up", payment_intent="pi_upgrade")
    )
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "disputed")


def test_a_truncated_invoice_pays_the_period_its_subscription_stated() -> None:
    world = World()
    world.deliver(paid(0))
    world.at(MONTH - 3600).deliver(snapshot(1, "active", at=-3600))
    renewal = paid(1)
    lines = renewal["data"]["object"]["lines"]
    proration = se.prorated(dict(lines["data"][0], id="il_proration"))
    lines["data"], lines["has_more"] = [proration] * 10, True  # the renewal line is on page 2
    world.at(MONTH + 60).deliver(renewal)
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=2 * MONTH)
    refund = se.charge_refunded(
        payment_intent="pi_1", invoice="in_1", created=ts(MONTH + DAY), shape=SHAPE[0]
    )
    world.deliver(refund)
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")


def test_an_item_of_quantity_0_grants_nothing_and_the_rest_of_the_event_applies() -> None:
    world = World()
    event = se.invoice_paid(
        subscription=SUB,
        lines=[
            {"price": PRICES["basic"], "item": "si_main", "start": ts(0), "end": ts(MONTH)},
            {
                "price": PRICES["addon"],
                "item": "si_seats",
                "quantity": 0,
                "start": ts(0),
                "end": ts(MONTH),
            },
        ],
        shape=SHAPE[0],
        created=ts(60),
    )
    world.deliver(event)
    world.deliver(
        snapshot(
            0,
            extra=[{"price": PRICES["addon"], "item": "si_seats", "quantity": 0}],
            cancel_at_period_end=True,
        )
    )
    entitlement = world.only()
    assert entitlement.slot == "si_main"
    assert entitlement.cancel_at == entitlement.period_end == T0 + timedelta(seconds=MONTH)


def test_a_one_off_invoice_grants_one_period_of_its_offering_from_the_payment() -> None:
    world = World()
    event = se.invoice_paid(
        subscription="unused",
        lines=[{"price": PRICES["pro"], "start": ts(DAY), "end": ts(DAY)}],
        invoice_id="in_once",
        payment_intent="pi_once",
        shape=SHAPE[0],
        created=ts(DAY),
    )
    world.at(DAY).deliver(se.one_off(event))
    entitlement = world.only()
    assert (entitlement.order_ref, entitlement.status) == ("in_once", Status.ACTIVE)
    assert entitlement.period_start == T0 + timedelta(days=1)
    assert entitlement.period_end == T0 + timedelta(days=1) + timedelta(days=31)  # P1M from Jan 2
    world.deliver(se.charge_refunded(payment_intent="pi_once", invoice="in_once", shape=SHAPE[0]))
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")


def session(mode: str, **fields: Any) -> dict[str, Any]:
    obj = {
        "id": "cs_1",
        "object": "checkout.session",
        "mode": mode,
        "payment_status": "paid",
        "payment_intent": "pi_cs",
        "invoice": None,
        "customer": "cus_1",
        "customer_details": {"email": "buyer@example.com"},
        "amount_total": 9900,
        "metadata": {},
        **fields,
    }
    return se._event("checkout.session.completed", obj, SHAPE[0], None, ts(60))


def test_a_paid_checkout_in_payment_mode_is_a_one_off_purchase() -> None:
    world = World()
    world.deliver(session("payment", metadata={"offering_sku": "pro"}))
    entitlement = world.only()
    assert (entitlement.sku, entitlement.status) == ("pro", Status.ACTIVE)
    assert entitlement.customer_email == "buyer@example.com"
    # Not paid yet (a delayed payment method), or granted by its own invoice:
    # nothing here. Naming no offering is a dead letter that says what to set.
    assert (
        World().normalize("s", session("payment", payment_status="unpaid"), world.rules.catalog, T0)
        == []
    )
    assert (
        World().normalize("s", session("payment", invoice="in_cs"), world.rules.catalog, T0) == []
    )
    with pytest.raises(Unmappable, match=r"metadata\.offering_sku"):
        World().normalize("s", session("payment"), world.rules.catalog, T0)


def test_basil_refund_events_are_judged_by_amount_and_a_failed_refund_refunds_nothing() -> None:
    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    world.deliver(
        se.refund_event("refund.created", payment_intent="pi_0", amount=100, refund_id="re_p")
    )
    assert entitlement.status is Status.ACTIVE  # partial
    world.deliver(se.refund_event("refund.created", payment_intent="pi_0", refund_id="re_f"))
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")
    world.deliver(
        se.refund_event("refund.updated", payment_intent="pi_0", refund_id="re_f", status="failed")
    )
    assert entitlement.status is Status.ACTIVE


def test_updates_in_the_same_second_are_ordered_by_what_they_changed() -> None:
    """Two updates with the same `created`: the one whose previous_attributes
    match the other's state came second, whatever their ids say."""
    first = snapshot(0, "active", at=100, event_id="evt_z")
    first["data"]["previous_attributes"] = {"status": "incomplete"}
    second = snapshot(0, "past_due", at=100, event_id="evt_a")
    second["data"]["previous_attributes"] = {"status": "active"}
    results = set()
    for order in ([first, second], [second, first]):
        world = World()
        world.deliver(paid(0))
        for event in order:
            world.deliver(event)
        results.add(world.only().overdue)
    assert results == {True}
    # Had the ids decided, evt_z (the active one) would have won.


def test_a_dispute_of_a_payment_whose_order_has_no_item_yet_waits_for_the_item() -> None:
    """A proration-only invoice may be the first thing seen of an order: a
    dispute of it then reaches the order's first item when it appears."""
    world = World()
    upgrade = paid(0, invoice_id="in_up", payment_intent="pi_up")
    lines = upgrade["data"]["object"]["lines"]
    lines["data"] = [se.prorated(line) for line in lines["data"]]
    world.deliver(upgrade)
    world.deliver(se.dispute("charge.dispute.created", dispute_id="dp", payment_intent="pi_up"))
    assert world.entitlements() == []
    world.deliver(paid(0))
    assert (world.only().status, world.only().reason) == (Status.SUSPENDED, "disputed")


# -- order independence ----------------------------------------------------------


def history(script: dict[str, Any]) -> list[dict[str, Any]]:
    """A realistic, in-order Stripe history of one subscription (and, maybe,
    a one-off purchase), in the shape the test runs on."""
    plan = "pro" if script["thresholds"] else "basic"
    periods = script["periods"]
    zero = [{"price": "price_addon", "item": "si_zero", "quantity": 0}] if script["zero"] else []
    events = [
        snapshot(0, "incomplete", plan, kind="customer.subscription.created", at=10, extra=zero)
    ]

    def pay(k: int) -> dict[str, Any]:
        invoice = paid(k, plan)
        if script["zero"]:
            line = dict(invoice["data"]["object"]["lines"]["data"][0], id=f"il_zero_{k}")
            invoice["data"]["object"]["lines"]["data"].append({**line, "quantity": 0})
        if k == script["truncated"]:
            lines = invoice["data"]["object"]["lines"]
            lines["data"], lines["has_more"] = [], True  # the renewal line is on page 2
        return invoice

    for k in range(periods):
        if k > 0 and (script["advance"] or k == script["truncated"]):
            # Stripe moves the period forward an hour before it charges.
            events.append(snapshot(k, "active", plan, at=-3600, extra=zero))
        if k == script["fail_at"]:
            events += [failed(k, plan), snapshot(k, "past_due", plan, at=200, extra=zero)]
            if not script["recovers"]:
                if script["written_off"]:
                    written_off = failed(k, plan)
                    written_off["type"] = "invoice.marked_uncollectible"
                    written_off["created"] += 3 * DAY
                    events += [written_off, snapshot(k, "active", plan, at=3 * DAY + 1)]
                break
        events += [pay(k), snapshot(k, "active", plan, extra=zero)]
        if k == script["change_at"]:
            plan = "basic" if plan == "pro" else "pro"
            extra = [{"price": "price_addon", "item": "si_addon"}] if script["addon"] else []
            events.append(snapshot(k, "active", plan, quantity=2, at=DAY, extra=extra + zero))
            # The upgrade's own invoice: prorations only.
            upgrade = paid(k, plan, invoice_id=f"in_up{k}", payment_intent="pi_up")
            upgrade["created"] += DAY
            lines = upgrade["data"]["object"]["lines"]
            lines["data"] = [se.prorated(line) for line in lines["data"]]
            events.append(upgrade)
        if script["same_second"] and k == 0:
            # Two updates Stripe made in one second; previous_attributes order them.
            first = snapshot(0, "active", plan, at=500, extra=zero)
            first["data"]["previous_attributes"] = {"status": "incomplete"}
            second = snapshot(0, "past_due", plan, at=500, extra=zero)
            second["data"]["previous_attributes"] = {"status": "active"}
            events += [first, second]
    last = periods - 1
    if script["refund"] is not None:
        k = min(script["refund"], last)
        events.append(
            se.charge_refunded(
                payment_intent=f"pi_{k}",
                invoice=f"in_{k}",
                refunded=9900 if script["full_refund"] else 100,
                created=ts(k * MONTH + 2 * DAY),
                shape=SHAPE[0],
            )
        )
    if script["dispute"] is not None:
        disputed = (
            "pi_up" if script["change_at"] is not None and script["dispute_upgrade"] else "pi_0"
        )
        events.append(
            se.dispute(
                "charge.dispute.created",
                dispute_id="dp_1",
                payment_intent=disputed,
                created=ts(3 * DAY),
            )
        )
        if script["dispute"] != "open":
            events.append(
                se.dispute(
                    "charge.dispute.closed",
                    dispute_id="dp_1",
                    payment_intent=disputed,
                    status=script["dispute"],
                    created=ts(9 * DAY),
                )
            )
    if script["cancel_at_end"]:
        events.append(snapshot(last, "active", plan, at=2 * DAY, cancel_at_period_end=True))
    if script["deleted"]:
        events.append(se.subscription_deleted(subscription=SUB, created=ts(periods * MONTH)))
    if script["one_off"]:
        once = se.invoice_paid(
            subscription="unused",
            lines=[{"price": "price_addon", "start": ts(DAY), "end": ts(DAY)}],
            invoice_id="in_once",
            payment_intent="pi_once",
            shape=SHAPE[0],
            created=ts(DAY),
        )
        events.append(se.one_off(once))
    # What Stripe sends with an event (basil's invoice_payment.paid) is an
    # event of its own: it may arrive in any order too.
    flat = []
    for event in events:
        flat += [{k: v for k, v in event.items() if k != "_then"}, *event.get("_then", ())]
    return flat


SCRIPTS = st.fixed_dictionaries(
    {
        "thresholds": st.booleans(),
        "periods": st.integers(1, 4),
        "advance": st.booleans(),
        "written_off": st.booleans(),
        "truncated": st.one_of(st.none(), st.integers(1, 3)),
        "zero": st.booleans(),
        "one_off": st.booleans(),
        "same_second": st.booleans(),
        "dispute_upgrade": st.booleans(),
        "fail_at": st.one_of(st.none(), st.integers(1, 3)),
        "recovers": st.booleans(),
        "change_at": st.one_of(st.none(), st.integers(0, 3)),
        "addon": st.booleans(),
        "refund": st.one_of(st.none(), st.integers(0, 3)),
        "full_refund": st.booleans(),
        "dispute": st.one_of(st.none(), st.sampled_from(["open", "won", "lost"])),
        "cancel_at_end": st.booleans(),
        "deleted": st.booleans(),
    }
)


def run(events: list[dict[str, Any]], end: int) -> World:
    world = World()
    for n, event in enumerate(events):
        # Deliveries spread over the months the history covers.
        world.at(n * end / len(events)).deliver(event)
    world.at(end + 60 * DAY).tick()
    return world


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=SCRIPTS, data=st.data())
def test_any_order_and_any_duplication_gives_the_in_order_result(
    script: dict[str, Any], data: st.DataObject
) -> None:
    events = history(script)
    end = (script["periods"] + 1) * MONTH
    expected = run(events, end).state()
    duplicated = events + data.draw(st.lists(st.sampled_from(events), max_size=len(events)))
    shuffled = data.draw(st.permutations(duplicated))
    assert run(list(shuffled), end).state() == expected


def test_an_emptied_item_suspends_its_entitlement_until_it_has_a_quantity_again() -> None:
    world = World()
    world.deliver(paid(0, quantity=2))
    entitlement = world.only()
    # The only item emptied, with a cancellation scheduled: both apply.
    world.deliver(snapshot(0, quantity=0, cancel_at_period_end=True, at=300))
    assert (entitlement.status, entitlement.reason) == (Status.SUSPENDED, "quantity_zero")
    assert entitlement.cancel_at == T0 + timedelta(seconds=MONTH)
    assert entitlement.seats == 0
    world.deliver(snapshot(0, quantity=3, at=400))
    assert (entitlement.status, entitlement.seats) == (Status.ACTIVE, 3)


def test_a_truncated_update_invoice_pays_no_period() -> None:
    """Only an invoice that bills a period pays for the lines it leaves out:
    a seat change's prorations, invoiced at once, pay for no renewal."""
    world = World()  # pro: suspend 3 days after the period end
    world.deliver(paid(0, "pro"))
    world.at(MONTH - 3600).deliver(snapshot(1, "active", "pro", at=-3600))
    world.at(MONTH + 60).deliver(failed(1, "pro"))
    update = paid(1, "pro", invoice_id="in_update", payment_intent="pi_update")
    update["data"]["object"]["billing_reason"] = "subscription_update"
    lines = update["data"]["object"]["lines"]
    lines["data"], lines["has_more"] = [], True
    world.at(MONTH + DAY).deliver(update)
    entitlement = world.only()
    assert entitlement.period_end == T0 + timedelta(seconds=MONTH)
    assert entitlement.overdue


def test_same_second_updates_follow_their_item_quantities_and_the_state_before() -> None:
    """On basil an update's previous_attributes name items; and a change
    undone in the same second is ordered from the snapshot before it."""

    def update(quantity: int, was: int | None, event_id: str, at: int = 100) -> dict[str, Any]:
        event = snapshot(0, quantity=quantity, at=at, event_id=event_id)
        if was is not None:
            item = dict(event["data"]["object"]["items"]["data"][0], quantity=was)
            event["data"]["previous_attributes"] = {"items": {"object": "list", "data": [item]}}
        return event

    base = update(1, None, "evt_base", at=50)
    up, down = update(3, 1, "evt_b"), update(2, 3, "evt_a")  # ids sort against the order
    for order in ([base, up, down], [down, up, base], [up, base, down]):
        world = World()
        world.deliver(paid(0))
        for event in order:
            world.deliver(event)
        assert world.only().quantity == 2

    def cancel(flag: bool, was: bool | None, event_id: str, at: int = 100) -> dict[str, Any]:
        event = snapshot(0, at=at, event_id=event_id, cancel_at_period_end=flag)
        if was is not None:
            event["data"]["previous_attributes"] = {"cancel_at_period_end": was}
        return event

    before = cancel(False, None, "evt_before", at=50)
    scheduled, undone = cancel(True, False, "evt_z"), cancel(False, True, "evt_y")
    for order in ([before, scheduled, undone], [undone, scheduled, before]):
        world = World()
        world.deliver(paid(0))
        for event in order:
            world.deliver(event)
        assert world.only().cancel_at is None


def test_refunds_add_up_and_a_failed_one_undoes_the_charge_total_that_counted_it() -> None:
    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    for n in (1, 2):  # two halves, named one by one
        world.deliver(
            se.refund_event(
                "refund.created",
                payment_intent="pi_0",
                amount=4950,
                refund_id=f"re_half{n}",
                created=ts(DAY + n),
            )
        )
    assert (entitlement.status, entitlement.reason) == (Status.CANCELED, "refunded")

    world = World()
    world.deliver(paid(0))
    entitlement = world.only()
    world.deliver(
        se.refund_event(
            "refund.created",
            payment_intent="pi_0",
            refund_id="re_1",
            status="pending",
            created=ts(DAY),
        )
    )
    world.deliver(
        se.charge_refunded(
            payment_intent="pi_0", invoice="in_0", created=ts(DAY + 1), shape=SHAPE[0]
        )
    )
    assert entitlement.status is Status.CANCELED
    world.deliver(
        se.refund_event(
            "refund.updated",
            payment_intent="pi_0",
            refund_id="re_1",
            status="failed",
            created=ts(2 * DAY),
        )
    )
    assert (entitlement.status, entitlement.reason) == (Status.ACTIVE, None)


def test_a_free_checkout_in_payment_mode_grants_too() -> None:
    world = World()
    free = session(
        "payment",
        payment_status="no_payment_required",
        amount_total=0,
        metadata={"offering_sku": "basic"},
    )
    world.deliver(free)
    assert world.only().status is Status.ACTIVE
    from services.providers.stripe import routing_key

    assert routing_key(free) == "pi_cs"  # the order the receipt and entitlement share
