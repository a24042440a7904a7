"""Every webhook the fold takes gets one receipt with its outcome, written
with its effect and rebuilt by a replay; a parked one ends, applied when what
it waits for arrives, or a dead letter after `lifecycle.parked_days`.
Against real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from contracts.api import ReceiptView
from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain.dead_letter import DeadLetter, dead_letter_id
from services.codes import CodeBook
from services.config import Config, parse_config
from services.fold import DomainService, Scheduler
from services.projections import Follower, ReadModelProjection, project_batch, replay
from services.readmodel import ReadModel
from services.store import EntitlementStore
from tests import stripe_events as se
from tests.test_store import NOW, YEAR, Record

pytestmark = pytest.mark.integration

CONFIG = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
lifecycle: {{parked_days: 7}}
""")
CODES = CodeBook("test-code-secret-0123456789")


class World:
    """A domain service, its read model projection, and a held clock."""

    def __init__(
        self, database_url: str, config: Config = CONFIG, apis: dict[str, Any] | None = None
    ) -> None:
        self.now = datetime.now(UTC)
        self.store = EntitlementStore(database_url)
        self.read_model = ReadModel(database_url)
        self.service = DomainService(self.store, config, CODES, clock=lambda: self.now, apis=apis)
        self.offset = 0
        self.position = 0

    def send(self, event: dict[str, Any], receipt: str) -> None:
        self.service.process([self.record(event, receipt)])
        self.project()

    def record(self, event: dict[str, Any], receipt: str) -> Record:
        """The raw topic's next record: `event` as the ingress sends it on."""
        raw = RawWebhookV1(
            receipt_id=receipt,
            source="stripe-main",
            provider="stripe",
            routing_key=str(event["data"]["object"].get("subscription") or event["id"]),
            received_at=self.now,
            headers={},
            body=json.dumps(event),
        )
        self.offset += 1
        return Record(RAW_TOPIC, 0, self.offset - 1, raw.model_dump_json().encode())

    def project(self) -> None:
        import asyncio

        changes, last = Follower(self.store).read(self.position, 10_000)
        if last is not None:
            asyncio.run(project_batch(ReadModelProjection(self.read_model), changes, last))
            self.position = last

    def settle(self, now: datetime) -> None:
        """Let time pass to `now`: the scheduler settles what became due."""
        self.now = now
        Scheduler(self.service, self.read_model).run_once()
        self.project()

    def receipts(self, **filters: str) -> dict[str, ReceiptView]:
        items, _ = self.read_model.receipts(1000, **filters)
        return {item.id: item for item in items}

    def close(self) -> None:
        self.store.close()
        self.read_model.close()


@pytest.fixture
def world(database_url: str) -> Any:
    w = World(database_url)
    yield w
    w.close()


def paid(subscription: str, sku: str = "better_annual", **kw: Any) -> dict[str, Any]:
    return se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": sku, "start": NOW, "end": NOW + YEAR}],
        **kw,
    )


def test_every_outcome_is_recorded_and_rebuilt_by_a_replay(world: World) -> None:
    first = paid("sub_r", payment_intent="pi_r")
    world.send(first, "applied")
    world.send(first, "duplicate")  # the provider's retry: the same evt_
    world.send({**se.subscription_deleted(subscription="x"), "type": "customer.created"}, "ignored")
    world.send(se.charge_refunded(payment_intent="pi_never_seen"), "parked")
    world.send(paid("sub_p", sku="platinum"), "dead")

    got = world.receipts()
    assert {k: v.outcome for k, v in got.items()} == {
        "applied": "applied",
        "duplicate": "duplicate",
        "ignored": "ignored",
        "parked": "parked",
        "dead": "dead_letter",
    }
    assert got["applied"].event_types == ["entitlement.activated", "entitlement.created"]
    assert len(got["applied"].entitlement_ids) == 1
    assert got["applied"].event_type == "invoice.paid"
    assert got["applied"].provider_event_id == first["id"]
    assert got["duplicate"].detail and "already applied" in got["duplicate"].detail
    assert got["ignored"].detail == "customer.created means nothing for entitlements"
    assert got["parked"].waits_for == "payment pi_never_seen"
    assert got["dead"].detail and "platinum" in got["dead"].detail
    assert set(world.receipts(outcome="parked")) == {"parked"}
    assert set(world.receipts(order_ref="sub_r")) == {"applied", "duplicate"}

    # Paging: newest first, each page after the last, none twice.
    page, cursor = world.read_model.receipts(2)
    seen = [r.id for r in page]
    while cursor is not None:
        page, cursor = world.read_model.receipts(2, cursor)
        seen += [r.id for r in page]
    assert sorted(seen) == sorted(got)

    replay(world.store, world.read_model)
    assert world.receipts() == got


def test_a_parked_refund_is_applied_when_its_payment_arrives(world: World) -> None:
    world.send(se.charge_refunded(payment_intent="pi_late"), "refund")
    assert world.receipts()["refund"].outcome == "parked"
    world.send(paid("sub_late", payment_intent="pi_late"), "payment")
    got = world.receipts()
    refund = got["refund"]
    assert refund.outcome == "applied"
    assert refund.waits_for is None and refund.resolved_at is not None
    # It says which entitlement it reached: the one the payment made, which
    # knew the refund as it was made (created already canceled, never
    # activated, so no code is mailed for a refunded payment).
    assert refund.entitlement_ids == got["payment"].entitlement_ids != []
    assert refund.event_types == ["entitlement.created"]
    assert "entitlement.activated" not in got["payment"].event_types
    [entitlement] = world.read_model.entitlements(order_ref="sub_late")
    assert entitlement.status == "CANCELED"

    replay(world.store, world.read_model)
    assert world.receipts() == got


def test_a_refund_folded_with_its_payment_is_applied_however_the_log_is_read(
    world: World,
) -> None:
    """After an outage the fold takes a backlog in one transaction, and the
    projector reads the log in batches, which may end anywhere in it."""
    refund = world.record(se.charge_refunded(payment_intent="pi_same"), "refund")
    payment = world.record(paid("sub_same", payment_intent="pi_same"), "payment")
    world.service.process([refund, payment])
    replay(world.store, world.read_model, batch_size=1)
    assert world.receipts()["refund"].outcome == "applied"


def test_a_refund_that_waits_too_long_becomes_a_dead_letter(world: World) -> None:
    refund = se.charge_refunded(payment_intent="pi_gone")
    world.send(refund, "refund")
    scheduler = Scheduler(world.service, world.read_model)

    world.now += timedelta(days=6, hours=23)
    scheduler.run_once()
    world.project()
    assert world.receipts()["refund"].outcome == "parked"

    world.now += timedelta(hours=2)
    scheduler.run_once()
    world.project()
    receipt = world.receipts()["refund"]
    assert receipt.outcome == "dead_letter"
    assert receipt.detail == "waited 7 days for payment pi_gone"
    letter = world.store.find(dead_letter_id("stripe-main", refund["id"]), DeadLetter)
    assert letter is not None and letter.reason == "waited 7 days for payment pi_gone"
    assert [d.provider_event_id for d in world.read_model.dead_letters()] == [refund["id"]]

    # Its payment arrives after all: the refund still reaches the entitlement,
    # and its dead letter is resolved.
    world.send(paid("sub_gone", payment_intent="pi_gone"), "payment")
    assert world.receipts()["refund"].outcome == "applied"
    [view] = world.read_model.dead_letters()
    assert view.resolved_at is not None
    letter = world.store.find(dead_letter_id("stripe-main", refund["id"]), DeadLetter)
    assert letter is not None and letter.resolved_at is not None


def test_a_dead_letter_the_scheduler_makes_is_logged_once_when_saved(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer saving first makes the scheduler try again; a line per
    attempt (or for a letter never saved) would say more than happened."""
    refund = se.charge_refunded(payment_intent="pi_gone")
    world.send(refund, "refund")
    scheduler = Scheduler(world.service, world.read_model)
    world.now += timedelta(days=7, hours=1)
    record = world.store.record
    conflicts = [IntegrityError("another writer saved first")] * 2

    def contended(*args: Any, **kwargs: Any) -> int:
        if conflicts:
            raise conflicts.pop()
        return record(*args, **kwargs)

    monkeypatch.setattr(world.store, "record", contended)
    scheduler.run_once()
    assert not conflicts  # it did try three times
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead letter")]
    expected = f"dead letter 'stripe-main'/{refund['id']!r}: waited 7 days for payment pi_gone"
    assert logged == [expected]
    assert world.store.find(dead_letter_id("stripe-main", refund["id"]), DeadLetter) is not None


def test_a_refund_or_dispute_naming_only_its_charge_waits_like_any_other(world: World) -> None:
    refund = se.charge_refunded(payment_intent="")
    refund["data"]["object"]["payment_intent"] = None
    dispute = se.dispute("charge.dispute.created", dispute_id="dp_1", payment_intent="")
    dispute["data"]["object"]["payment_intent"] = None
    dispute["data"]["object"]["charge"] = "ch_only"
    world.send(refund, "refund")
    world.send(dispute, "dispute")
    got = world.receipts()
    assert got["refund"].outcome == got["dispute"].outcome == "parked"
    assert got["refund"].waits_for == f"payment {refund['data']['object']['id']}"
    assert got["dispute"].waits_for == "payment ch_only"


def test_a_nul_in_an_order_reference_is_a_dead_letter_with_its_receipt(world: World) -> None:
    """PostgreSQL text cannot hold NUL: the receipt still appears, and no
    projection fails on it (one receipt event holds a whole batch's)."""
    bad = paid("sub_\x00nul")
    world.send(bad, "nul")
    world.send(paid("sub_fine"), "fine")
    got = world.receipts()
    assert got["nul"].outcome == "dead_letter" and "control character" in (got["nul"].detail or "")
    assert got["fine"].outcome == "applied"
    assert world.read_model.count_projection_errors() == 0


def test_an_ending_that_makes_no_entitlement_leaves_what_waited_on_the_order_waiting(
    world: World,
) -> None:
    """A cancellation naming an item never seen makes nothing, so what
    waited for an item of its order (here long enough to be a dead letter)
    is not resolved by it: nothing reached an entitlement."""
    voided = paid("sub_wait")
    voided["type"] = "invoice.voided"
    world.send(voided, "voided")
    world.now += timedelta(days=8)
    Scheduler(world.service, world.read_model).run_once()
    world.project()
    assert world.receipts()["voided"].outcome == "dead_letter"
    items = [{"price": "p", "sku": "better_annual"}]
    ended = se.subscription_deleted(subscription="sub_wait", items=items, shape=se.LEGACY)
    world.send(ended, "end")
    assert world.receipts()["end"].outcome == "parked"
    assert world.read_model.entitlements(order_ref="sub_wait") == []
    [letter] = world.read_model.dead_letters()
    assert letter.resolved_at is None
