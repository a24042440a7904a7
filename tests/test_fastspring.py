"""FastSpring behaviour the conformance suite does not cover: batches split
at the ingress, sub-states (trial, overdue), chargebacks, refunds not yet
processed, one-off orders of several products, expansion off, and no
entitlement minted by a deactivation. Built from the shapes of
tests/fastspring_events.py."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
from starlette.applications import Starlette

from contracts.webhooks import RawWebhookV1
from domain.commands import OrderEvent
from domain.lifecycle import Status
from services.config import parse_config
from services.http import HTTPError, handle_http_error
from services.ingress import Ingress, routes
from services.providers import PROVIDERS, Unmappable
from tests import fastspring_events as fs
from tests.lifecycle_world import DAY, MONTH, T0, World

with warnings.catch_warnings():
    # Starlette would rather have httpx2; httpx is what this project has.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

FX = fs.FIXTURES
ADAPTER = PROVIDERS["fastspring"]
CONFIG = f"""
sources:
  fastspring: {{provider: fastspring, secret: {fs.SECRET}}}
offerings:
  - {{sku: basic, product: acme, prices: {{fastspring: [acme-basic-monthly]}}}}
  - {{sku: pro, product: acme, seats: 5, prices: {{fastspring: [acme-pro-monthly]}}}}
"""


def world() -> World:
    return World(catalog=FX.catalog, provider="fastspring")


def t(offset: int) -> int:
    return FX._t(offset)


# -- the ingress: one stored webhook per event ----------------------------------------


def ingress() -> tuple[TestClient, list[tuple[bytes, bytes]]]:
    published: list[tuple[bytes, bytes]] = []

    async def publish(value: bytes, key: bytes) -> None:
        published.append((value, key))

    app = Starlette(
        routes=routes(Ingress(parse_config(CONFIG), publish)),
        exception_handlers={HTTPError: handle_http_error},
    )
    return TestClient(app), published


def test_a_batch_is_stored_event_by_event_and_acknowledged_by_their_ids() -> None:
    """One request, three events: each is stored on its own (so each is
    deduplicated, folded and dead-lettered on its own), keyed by its own
    subscription or order; a non-object among them is stored too, to
    become a dead letter. FastSpring marks processed the ids the 202 lists."""
    activated = FX.subscribed("sub_a", "basic", 0, MONTH, 10)[0]
    unknown = FX.with_price(FX.paid("sub_b", "ord_b", "basic", 0, MONTH, 20)[0], "nobody")
    payload = fs.batch(activated, unknown, 42)  # type: ignore[arg-type]
    body = fs.body(payload)
    client, published = ingress()
    response = client.post("/webhooks/fastspring", content=body, headers=fs.signed_headers(body))
    assert response.status_code == 202, response.text
    assert response.text.split("\n") == [activated["id"], unknown["id"]]
    stored = [RawWebhookV1.model_validate_json(value) for value, _ in published]
    assert [json.loads(w.body) for w in stored] == [activated, unknown, 42]
    assert [key for _, key in published][:2] == [b"sub_a", b"sub_b"]
    assert len({w.receipt_id for w in stored}) == 3
    assert all("x-fs-signature" not in w.headers for w in stored)  # it signs the batch


def test_an_event_too_large_to_store_is_left_out_and_the_others_are_kept() -> None:
    """An event whose stored form outgrows the raw topic (a body of quotes,
    each escaped twice once stored) is neither stored nor acknowledged, so
    FastSpring shows it unprocessed; the batch's other events are stored.
    Non-ASCII text is stored as UTF-8: 340,000 "\u20ac" fit."""
    good = FX.subscribed("sub_g", "basic", 0, MONTH, 10)[0]
    huge = FX.subscribed("sub_h", "basic", 0, MONTH, 10)[0]
    huge["data"]["notes"] = '"' * 521_000
    client, published = ingress()

    def post(*events: dict[str, Any]) -> Any:
        body = json.dumps(fs.batch(*events), ensure_ascii=False).encode()  # "€" as UTF-8
        return client.post("/webhooks/fastspring", content=body, headers=fs.signed_headers(body))

    response = post(good, huge)
    assert response.status_code == 202, response.text
    assert response.text.split("\n") == [good["id"]]
    assert [json.loads(RawWebhookV1.model_validate_json(v).body)["id"] for v, _ in published] == [
        good["id"]
    ]
    assert post(huge).status_code == 413  # a batch of nothing else is refused whole
    euros = FX.subscribed("sub_e", "basic", 0, MONTH, 10)[0]
    euros["data"]["notes"] = "\u20ac" * 340_000
    assert post(euros).status_code == 202


def test_a_batch_with_a_bad_signature_stores_nothing() -> None:
    body = fs.body(fs.batch(*FX.subscribed("sub_x", "basic", 0, MONTH, 10)))
    client, published = ingress()
    for headers in (fs.signed_headers(body, "wrong"), {"Content-Type": "application/json"}):
        response = client.post("/webhooks/fastspring", content=body, headers=headers)
        assert response.status_code == 401
    assert published == []


def test_a_body_that_is_no_batch_is_stored_whole_and_named_unmappable() -> None:
    body = b'{"events": []}'
    client, published = ingress()
    response = client.post("/webhooks/fastspring", content=body, headers=fs.signed_headers(body))
    assert response.status_code == 202
    [(value, _)] = published
    payload = json.loads(RawWebhookV1.model_validate_json(value).body)
    with pytest.raises(Unmappable, match="batch"):
        ADAPTER.normalize("fastspring", payload, FX.catalog, T0)


# -- sub-states ----------------------------------------------------------------------


def test_a_trial_is_active_until_its_first_charge_date() -> None:
    w = world().at(10)
    w.deliver(FX._snapshot("subscription.activated", "sub_t", "pro", "trial", 0, 14 * DAY, 10)[0])
    item = w.only()
    assert (item.status, item.trial, item.seats) == (Status.ACTIVE, True, 5)
    assert item.period_end == T0.replace(day=15)


def test_an_overdue_subscription_stays_active_and_overdue() -> None:
    w = paid("sub_o")
    overdue = FX._snapshot("subscription.updated", "sub_o", "basic", "overdue", 0, MONTH, 2 * DAY)
    w.at(2 * DAY).deliver(overdue[0])
    assert (w.only().status, w.only().overdue) == (Status.ACTIVE, True)


def test_a_scheduled_cancellation_keeps_access_until_the_deactivation_date() -> None:
    w = paid("sub_c")
    w.at(DAY).deliver(FX.cancel_at_period_end("sub_c", "basic", 0, MONTH, DAY)[0])
    assert (w.only().status, w.only().cancel_at) == (Status.ACTIVE, T0.replace(day=31))
    w.at(MONTH + 1).tick()
    assert (w.only().status, w.only().reason) == (Status.CANCELED, "canceled_at_period_end")


def paid(sub: str) -> World:
    w = world().at(20)
    for payload in (
        *FX.subscribed(sub, "basic", 0, MONTH, 10),
        *FX.paid(sub, f"o_{sub}", "basic", 0, MONTH, 20),
    ):
        w.deliver(payload)
    assert w.only().status is Status.ACTIVE
    return w


# -- money back --------------------------------------------------------------------


def test_a_chargeback_suspends_the_entitlement_of_its_order() -> None:
    w = paid("sub_cb")
    w.at(DAY).deliver(fs.chargeback_created("o_sub_cb", t(DAY)))
    assert (w.only().status, w.only().reason) == (Status.SUSPENDED, "disputed")


def test_a_return_not_completed_refunds_nothing() -> None:
    w = paid("sub_rn")
    w.at(DAY).deliver(fs.return_created("o_sub_rn", 99.0, 99.0, t(DAY), completed=False))
    assert w.only().status is Status.ACTIVE


def test_a_refund_of_a_one_off_order_in_full_cancels_it() -> None:
    w = world().at(10)
    w.deliver(FX.sold("ord_one", "pro", 10, amount=4900)[0])
    w.at(DAY).deliver(fs.return_created("ord_one", 49.0, 49.0, t(DAY)))
    assert (w.only().status, w.only().reason) == (Status.CANCELED, "refunded")


# -- orders ----------------------------------------------------------------------------


def test_a_one_off_order_of_two_products_grants_each_for_one_period() -> None:
    items = [fs.item("acme-basic-monthly", 1), fs.item("acme-pro-monthly", 2)]
    w = world().at(10)
    w.deliver(fs.order_completed("ord_two", items, t(10), 44.85))
    basic, pro = w.entitlements()
    assert (basic.sku, basic.status, pro.sku, pro.quantity) == ("basic", Status.ACTIVE, "pro", 2)
    assert basic.period_end == T0.replace(month=2, second=10)


def test_an_order_with_one_unknown_product_grants_the_others_and_names_it() -> None:
    items = [fs.item("acme-basic-monthly"), fs.item("mystery-box")]
    event = fs.order_completed("ord_mixed", items, t(10))
    with pytest.raises(Unmappable, match="mystery-box") as caught:
        ADAPTER.normalize("fastspring", event, FX.catalog, T0)
    [command] = caught.value.commands
    assert isinstance(command, OrderEvent)
    assert [line.offering.sku for line in command.lines] == ["basic"]


def test_a_deactivation_of_a_subscription_never_seen_mints_no_entitlement() -> None:
    w = world().at(MONTH + 10)
    w.deliver(FX.canceled("sub_late", "basic", 0, MONTH, MONTH + 10)[0])
    assert w.entitlements() == []
    # Its initial order arrives after: the entitlement is created canceled.
    w.deliver(FX.paid("sub_late", "o_late", "basic", 0, MONTH, 20)[0])
    assert w.only().status is Status.CANCELED


def test_subscription_events_without_expansion_still_map() -> None:
    data = fs.subscription(
        "sub_nx", "acme-pro-monthly", "active", t(MONTH), t(10), t(0), expanded=False
    )
    w = world().at(10)
    w.deliver(fs.event("subscription.activated", data, t(10)))
    assert (w.only().sku, w.only().status) == ("pro", Status.ACTIVE)


def test_a_charge_without_expansion_is_unmappable_saying_so() -> None:
    charge = FX.paid("sub_e", "o_e2", "basic", MONTH, 2 * MONTH, MONTH + 20)[0]
    charge["data"]["order"] = "o_e2"
    charge["data"]["subscription"] = "sub_e"
    with pytest.raises(Unmappable, match="Webhook Expansion"):
        ADAPTER.normalize("fastspring", charge, FX.catalog, T0)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("created",), "2026-01-01T00:00:00", "event created"),
        (("data", "next"), 1.5, "subscription next"),
        (("data", "state"), "frozen", "state 'frozen'"),
        (("id",), None, "no id"),
    ],
)
def test_an_odd_field_is_unmappable_naming_it(
    path: tuple[str, ...], value: Any, named: str
) -> None:
    event = FX.subscribed("sub_f", "basic", 0, MONTH, 10)[0]
    target = event
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(Unmappable, match=named):
        ADAPTER.normalize("fastspring", event, FX.catalog, T0)


def _samples() -> list[dict[str, Any]]:
    return [
        *FX.subscribed("sub_s", "basic", 0, MONTH, 10),
        *FX.paid("sub_s", "o_s1", "basic", 0, MONTH, 20),
        *FX.paid("sub_s", "o_s2", "basic", MONTH, 2 * MONTH, MONTH + 20),
        *FX.payment_failed("sub_s", "o_s3", "basic", 2 * MONTH, 3 * MONTH, 2 * MONTH + 20),
        *FX.cancel_at_period_end("sub_s", "basic", MONTH, 2 * MONTH, MONTH + DAY),
        *FX.sold("o_s4", "pro", 10),
        fs.return_created("o_s1", 99.0, 20.0, t(DAY)),
        fs.chargeback_created("o_s1", t(DAY)),
    ]


def test_any_field_of_the_wrong_type_is_unmappable_never_an_adapter_crash() -> None:
    """As tests/test_poison.py asks of every adapter: each field of each
    sample, replaced by a value of another JSON type, gives commands that
    pass `check` or Unmappable, never another exception."""
    from services.providers import check
    from tests.test_poison import _paths, _replaced

    crashes = []
    others: list[Any] = [[], {}, 12345, None, "x", True, 1.5]
    for sample in _samples():
        for path in _paths(sample):
            for value in others:
                mutated = _replaced(sample, path, value)
                if not isinstance(mutated, dict):
                    continue
                try:
                    ADAPTER.routing_key(mutated)
                    ADAPTER.event_id(mutated)
                    check(ADAPTER.normalize("fastspring", mutated, FX.catalog, T0))
                except Unmappable:
                    pass
                except Exception as exc:
                    crashes.append(
                        f"{sample['type']} {'.'.join(map(str, path))} = {value!r}: {exc!r}"
                    )
    assert not crashes, "\n".join(sorted(set(crashes))[:30])
