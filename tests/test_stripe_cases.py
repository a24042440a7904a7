"""The Stripe cases found against real Stripe behaviour (`tests/cases/stripe/`,
from the shared cases folder), each with its expected result: payloads as
Stripe sends them, through the real adapter, fold, store and read model, on
a held clock that moves with the events' own times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts.api import EntitlementView, ReceiptView
from services.config import load_config
from tests.test_receipts import World

pytestmark = pytest.mark.integration

CASES = Path(__file__).parent / "cases" / "stripe"
CONFIG = load_config(CASES / "entitle.yaml")


def when(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def world(database_url: str) -> Any:
    w = World(database_url, CONFIG)
    yield w
    w.close()


def play(world: World, case: str, skip: tuple[str, ...] = ()) -> dict[str, ReceiptView]:
    """Send a case's payloads in name order, each when Stripe created it;
    returns the receipts by file name."""
    for path in sorted((CASES / case).glob("*.json")):
        if path.name.startswith(skip):
            continue
        event = json.loads(path.read_text())
        world.now = datetime.fromtimestamp(event["created"], UTC) + timedelta(seconds=1)
        world.send(event, path.stem)
    return world.receipts()


def only(world: World, order_ref: str) -> EntitlementView:
    [entitlement] = world.read_model.entitlements(order_ref=order_ref)
    return entitlement


def test_01_a_failed_renewal_does_not_extend_the_paid_period(world: World) -> None:
    got = play(world, "01", skip=("06-",))
    assert {r.outcome for r in got.values()} == {"applied"}
    world.settle(when("2026-01-02T00:00:00"))
    entitlement = only(world, "sub_case01")
    assert (entitlement.status, entitlement.overdue) == ("ACTIVE", True)
    assert entitlement.period_end == when("2026-01-01T00:00:00")
    world.settle(when("2026-01-04T00:00:01"))
    assert (only(world, "sub_case01").status, only(world, "sub_case01").status_reason) == (
        "SUSPENDED",
        "unpaid",
    )
    world.settle(when("2026-01-14T23:59:59"))
    assert only(world, "sub_case01").status == "SUSPENDED"
    play(world, "01", skip=("01-", "02-", "03-", "04-", "05-"))  # unpaid, 2026-01-15
    assert only(world, "sub_case01").status == "EXPIRED"


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [("refund", "CANCELED", "refunded"), ("dispute", "SUSPENDED", "disputed")],
)
def test_02_basil_refunds_and_disputes_reach_the_entitlement(
    world: World, kind: str, status: str, reason: str
) -> None:
    got = play(world, f"02-{kind}")
    order = f"sub_case02{kind[0]}"
    entitlement = only(world, order)
    assert (entitlement.status, entitlement.status_reason) == (status, reason)
    last = got[sorted(got)[-1]]
    assert last.outcome == "applied" and last.entitlement_ids == [str(entitlement.id)]
    assert got["01b-stripe-main-invoice_payment.paid-basil"].detail.startswith("linked pi_case02")


@pytest.mark.parametrize("kind", ["refund", "dispute"])
def test_02_without_the_invoice_payment_the_basil_fact_waits_visibly(
    world: World, kind: str
) -> None:
    """Without `invoice_payment.paid` nothing in a basil payload links the
    charge to its invoice: the fact is parked, saying what it waits for, and
    applied once the link arrives."""
    got = play(world, f"02-{kind}", skip=("01b-",))
    [waiting] = [r for r in got.values() if r.outcome == "parked"]
    assert waiting.waits_for is not None
    assert waiting.waits_for.startswith(f"payment pi_case02{kind[0]}")
    assert only(world, f"sub_case02{kind[0]}").status == "ACTIVE"
    link = json.loads(
        (CASES / f"02-{kind}" / "01b-stripe-main-invoice_payment.paid-basil.json").read_text()
    )
    world.send(link, "link")
    assert world.receipts()[waiting.id].outcome == "applied"
    assert only(world, f"sub_case02{kind[0]}").status != "ACTIVE"


def test_04_a_proration_only_invoice_links_its_payment_and_a_dispute_of_it_suspends(
    world: World,
) -> None:
    got = play(world, "04")
    assert [r.outcome for _, r in sorted(got.items())] == ["applied"] * 4
    assert world.read_model.dead_letters() == []
    entitlement = only(world, "sub_case04")
    assert (entitlement.status, entitlement.status_reason) == ("SUSPENDED", "disputed")


def test_05_a_truncated_renewal_invoice_pays_the_period_and_its_refund_cancels(
    world: World,
) -> None:
    got = play(world, "05", skip=("04-",))
    assert world.read_model.dead_letters() == []
    entitlement = only(world, "sub_case05")
    assert entitlement.period_end == when("2027-11-01T00:00:00")
    play_refund = json.loads(next((CASES / "05").glob("04-*.json")).read_text())
    world.send(play_refund, "refund")
    entitlement = only(world, "sub_case05")
    assert (entitlement.status, entitlement.status_reason) == ("CANCELED", "refunded")
    assert got


def test_06_overdue_clears_once_the_failed_invoice_is_written_off(world: World) -> None:
    play(world, "06")
    entitlement = only(world, "sub_case06")
    assert (entitlement.status, entitlement.overdue) == ("ACTIVE", False)
    assert entitlement.period_end == when("2027-11-01T00:00:00")


def test_10_an_item_of_quantity_0_grants_nothing_and_the_rest_applies(world: World) -> None:
    got = play(world, "10")
    assert {r.outcome for r in got.values()} == {"applied"}
    assert world.read_model.dead_letters() == []
    [entitlement] = world.read_model.entitlements(order_ref="sub_case10")
    assert entitlement.status == "ACTIVE"
    assert entitlement.period_end == entitlement.cancel_at == when("2027-11-01T00:00:00")
