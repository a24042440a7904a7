"""The provider conformance suite (`tests/conformance.py`), run for every
registered fixture set: each provider's published payload shapes must
reach the same entitlement states through its adapter and the fold."""

from __future__ import annotations

import importlib
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from domain.entitlement import Entitlement
from domain.lifecycle import Status
from services.providers import MODULES, PROVIDERS, SignatureError, Unmappable
from tests.conformance import FixtureSet, NotSupported, Payload
from tests.lifecycle_world import DAY, MONTH, T0, World

#: Every registered provider's fixture set (`tests/<module>_events.py`): a
#: provider without one fails here.
FIXTURE_SETS: dict[str, FixtureSet] = {
    module: importlib.import_module(f"tests.{module}_events").FIXTURES for module in MODULES
}

SECRET = "conformance-secret-0123456789abcdef"


@pytest.fixture(params=sorted(FIXTURE_SETS))
def fx(request: pytest.FixtureRequest) -> FixtureSet:
    return FIXTURE_SETS[request.param]


def supported(build: Callable[..., Any], *args: Any) -> Any:
    try:
        return build(*args)
    except NotSupported as exc:
        pytest.skip(str(exc))


def optional(build: Callable[..., Any], *args: Any) -> Any | None:
    """A step of a longer story that a provider may not have (None): the
    rest of the story still runs."""
    try:
        return build(*args)
    except NotSupported:
        return None


def world(fx: FixtureSet) -> World:
    return World(catalog=fx.catalog, provider=fx.provider)


def deliver(w: World, payloads: list[Payload], at: int | None = None) -> None:
    if at is not None:
        w.at(at)
    for payload in payloads:
        w.deliver(payload)


def status(entitlement: Entitlement) -> Status:
    return entitlement.status


def seconds(entitlement: Entitlement) -> tuple[Status, str | None, int | None]:
    end = entitlement.period_end
    return (
        entitlement.status,
        entitlement.reason,
        None if end is None else int((end - T0).total_seconds()),
    )


# -- signatures ---------------------------------------------------------------------


def body_of(fx: FixtureSet) -> bytes:
    return json.dumps(fx.paid("sub_sig", "inv_sig", "basic", 0, MONTH, 10)[0]).encode()


def test_a_signed_webhook_verifies(fx: FixtureSet) -> None:
    body, now = body_of(fx), T0.timestamp()
    headers = fx.sign(body, SECRET, now)
    PROVIDERS[fx.provider].verify(headers, body, fx.credentials(SECRET), now)


@pytest.mark.parametrize("change", ["body", "secret"])
def test_a_changed_body_or_another_secret_is_refused(fx: FixtureSet, change: str) -> None:
    if change == "body":
        # A provider that authenticates the sender but signs no body (HTTP
        # Basic auth) says so with an optional `body_signed` raising NotSupported.
        supported(getattr(fx, "body_signed", lambda: None))
    body, now = body_of(fx), T0.timestamp()
    headers = fx.sign(body, SECRET if change == "body" else "another-secret-0123456789", now)
    if change == "body":
        body = body.replace(b"sub_sig", b"sub_sIg")
    with pytest.raises(SignatureError):
        PROVIDERS[fx.provider].verify(headers, body, fx.credentials(SECRET), now)


def test_an_old_signature_is_refused(fx: FixtureSet) -> None:
    limit = supported(fx.signature_age_limit)
    body, now = body_of(fx), T0.timestamp()
    headers = fx.sign(body, SECRET, now - limit - 5)
    with pytest.raises(SignatureError):
        PROVIDERS[fx.provider].verify(headers, body, fx.credentials(SECRET), now)


def test_a_webhook_signed_while_the_secret_rotates_verifies(fx: FixtureSet) -> None:
    body, now = body_of(fx), T0.timestamp()
    headers = supported(fx.rotated, body, "old-secret-0123456789abcdef", SECRET, now)
    PROVIDERS[fx.provider].verify(headers, body, fx.credentials(SECRET), now)


# -- a subscription's life ---------------------------------------------------------


def test_a_subscription_from_first_payment_to_cancellation(fx: FixtureSet) -> None:
    w = world(fx)
    deliver(w, fx.subscribed("sub_1", "pro", 0, MONTH, 10), at=10)
    deliver(w, fx.paid("sub_1", "inv_1", "pro", 0, MONTH, 20), at=20)
    item = w.only()
    assert seconds(item) == (Status.ACTIVE, None, MONTH)
    assert (item.sku, item.seats) == ("pro", 5)
    # Renewed.
    deliver(w, fx.paid("sub_1", "inv_2", "pro", MONTH, 2 * MONTH, MONTH + 20), at=MONTH + 20)
    assert seconds(item) == (Status.ACTIVE, None, 2 * MONTH)
    # The next renewal fails: still active, overdue.
    at = 2 * MONTH + 20
    failed = optional(fx.payment_failed, "sub_1", "inv_3", "pro", 2 * MONTH, 3 * MONTH, at)
    if failed is not None:
        deliver(w, failed, at=at)
        assert (item.status, item.overdue) == (Status.ACTIVE, True)
    # Recovered: paid on a retry.
    at = 2 * MONTH + 3 * DAY
    deliver(w, fx.paid("sub_1", "inv_3", "pro", 2 * MONTH, 3 * MONTH, at), at=at)
    assert (item.status, item.overdue) == (Status.ACTIVE, False)
    assert seconds(item)[2] == 3 * MONTH
    # Canceled at the end of the period: active until then.
    at = 2 * MONTH + 5 * DAY
    ending = optional(fx.cancel_at_period_end, "sub_1", "pro", 2 * MONTH, 3 * MONTH, at)
    if ending is not None:
        deliver(w, ending, at=at)
        assert status(item) is Status.ACTIVE
        assert item.cancel_at == T0 + timedelta(seconds=3 * MONTH)
    at = 3 * MONTH + 10
    deliver(w, fx.canceled("sub_1", "pro", 2 * MONTH, 3 * MONTH, at), at=at)
    w.tick()
    assert status(item) is Status.CANCELED


def test_pause_and_resume(fx: FixtureSet) -> None:
    w = world(fx)
    deliver(w, fx.subscribed("sub_p", "basic", 0, MONTH, 10), at=10)
    deliver(w, fx.paid("sub_p", "inv_p", "basic", 0, MONTH, 20), at=20)
    paused = supported(fx.paused, "sub_p", "basic", 0, MONTH, 5 * DAY)
    deliver(w, paused, at=5 * DAY)
    item = w.only()
    assert status(item) is Status.SUSPENDED
    deliver(w, fx.resumed("sub_p", "basic", 9 * DAY, MONTH + 9 * DAY, 9 * DAY), at=9 * DAY)
    assert status(item) is Status.ACTIVE


# -- money back ---------------------------------------------------------------------


def paid_subscription(fx: FixtureSet) -> World:
    w = world(fx)
    deliver(w, fx.subscribed("sub_r", "basic", 0, MONTH, 10), at=10)
    deliver(w, fx.paid("sub_r", "inv_r", "basic", 0, MONTH, 20, amount=9900), at=20)
    assert w.only().status is Status.ACTIVE
    return w


def test_a_full_refund_of_the_current_period_cancels(fx: FixtureSet) -> None:
    w = paid_subscription(fx)
    deliver(w, supported(fx.refunded, "sub_r", "inv_r", 9900, 9900, DAY), at=DAY)
    assert (w.only().status, w.only().reason) == (Status.CANCELED, "refunded")


def test_a_partial_refund_is_recorded_only(fx: FixtureSet) -> None:
    w = paid_subscription(fx)
    deliver(w, supported(fx.refunded, "sub_r", "inv_r", 9900, 2000, DAY), at=DAY)
    assert w.only().status is Status.ACTIVE


@pytest.mark.parametrize(("outcome", "status"), [("won", Status.ACTIVE), ("lost", Status.CANCELED)])
def test_a_chargeback_suspends_until_it_is_decided(
    fx: FixtureSet, outcome: str, status: Status
) -> None:
    w = paid_subscription(fx)
    deliver(w, supported(fx.disputed, "sub_r", "inv_r", "dp_1", "open", DAY), at=DAY)
    assert (w.only().status, w.only().reason) == (Status.SUSPENDED, "disputed")
    deliver(w, supported(fx.disputed, "sub_r", "inv_r", "dp_1", outcome, 9 * DAY), at=9 * DAY)
    assert w.only().status is status


# -- one-off sales ------------------------------------------------------------------


def test_a_one_off_sale_grants_a_license(fx: FixtureSet) -> None:
    w = world(fx)
    deliver(w, supported(fx.sold, "ord_1", "pro", 10), at=10)
    item = w.only()
    assert item.status is Status.ACTIVE
    assert (item.sku, item.seats) == ("pro", 5)


# -- what an event may and may not make -----------------------------------------------


def test_a_cancellation_of_an_item_never_seen_makes_no_entitlement(fx: FixtureSet) -> None:
    """It is kept on the order: the creation and payment that arrive after
    it (sent before it) make the entitlement already canceled."""
    w = world(fx)
    deliver(w, fx.canceled("sub_c", "basic", 0, MONTH, 2 * DAY), at=2 * DAY)
    assert w.entitlements() == []
    deliver(w, fx.subscribed("sub_c", "basic", 0, MONTH, 10), at=2 * DAY + 60)
    deliver(w, fx.paid("sub_c", "inv_c", "basic", 0, MONTH, 20))
    w.at(MONTH + DAY).tick()  # PayPal's cancellation leaves the paid cycle running
    assert status(w.only()) is Status.CANCELED
    assert "Renewed" not in w.event_types(w.only())  # nothing ended is renewed


def test_a_paid_invoice_sets_the_seats_an_older_snapshot_stated_otherwise(
    fx: FixtureSet,
) -> None:
    w = world(fx)

    def sized(payloads: list[Payload], quantity: int) -> list[Payload]:
        return [supported(fx.with_quantity, p, quantity) for p in payloads]

    deliver(w, sized(fx.subscribed("sub_q", "pro", 0, MONTH, 10), 2))
    deliver(w, sized(fx.paid("sub_q", "inv_q", "pro", 0, MONTH, 20), 3))
    assert (w.only().quantity, w.only().seats) == (3, 15)
    # The renewal for 4, then the older snapshot (for 2) delivered late.
    at = MONTH + 20
    deliver(w, sized(fx.paid("sub_q", "inv_q2", "pro", MONTH, 2 * MONTH, at), 4), at=at)
    deliver(w, sized(fx.subscribed("sub_q", "pro", 0, MONTH, 10), 2))
    assert (w.only().quantity, w.only().seats) == (4, 20)


# -- order, duplicates, bad input ------------------------------------------------------


def short_history(fx: FixtureSet) -> list[tuple[int, Payload]]:
    steps = [
        (10, fx.subscribed("sub_o", "basic", 0, MONTH, 10)),
        (20, fx.paid("sub_o", "inv_o1", "basic", 0, MONTH, 20)),
        (MONTH + 20, fx.paid("sub_o", "inv_o2", "basic", MONTH, 2 * MONTH, MONTH + 20)),
        (
            MONTH + DAY,
            optional(fx.cancel_at_period_end, "sub_o", "basic", MONTH, 2 * MONTH, MONTH + DAY)
            or [],
        ),
    ]
    return [(at, payload) for at, payloads in steps for payload in payloads]


def permutations(history: list[tuple[int, Payload]]) -> Iterator[list[tuple[int, Payload]]]:
    """Every order of the webhooks, up to 6 of them (720 orders); for a
    longer history every order of its happenings (each keeping its own
    webhooks' order) and the whole history reversed."""
    if len(history) <= 6:
        yield from (list(p) for p in itertools.permutations(history))
        return
    steps: list[list[tuple[int, Payload]]] = []
    for at, payload in history:  # a happening: the webhooks sent at one time
        if steps and steps[-1][0][0] == at:
            steps[-1].append((at, payload))
        else:
            steps.append([(at, payload)])
    for order in itertools.permutations(steps):
        yield [item for step in order for item in step]
    yield history[::-1]


def test_any_order_and_any_duplicates_reach_the_in_order_state(fx: FixtureSet) -> None:
    history = short_history(fx)
    expected = world(fx)
    for at, payload in history:
        expected.at(at).deliver(payload)
    last = max(at for at, _ in history)
    want = expected.at(last).state()
    assert want  # the history made an entitlement
    for order in permutations(history):
        w = world(fx).at(last)
        for _, payload in order + order:  # every webhook delivered twice
            w.deliver(payload)
        assert w.state() == want, [p.get("id") or p.get("event_id") for _, p in order]


def test_a_time_without_offset_is_unmappable_naming_the_field(fx: FixtureSet) -> None:
    payload = fx.paid("sub_z", "inv_z", "basic", 0, MONTH, 20)[0]
    naive = supported(fx.without_zone, payload)
    with pytest.raises(Unmappable, match=r"offset|zone"):
        PROVIDERS[fx.provider].normalize("src", naive, fx.catalog, T0)


def test_an_unknown_price_is_unmappable(fx: FixtureSet) -> None:
    payload = fx.with_price(fx.paid("sub_u", "inv_u", "basic", 0, MONTH, 20)[0], "price_nobody")
    with pytest.raises(Unmappable, match="price_nobody"):
        PROVIDERS[fx.provider].normalize("src", payload, fx.catalog, T0)


@pytest.mark.parametrize("provider", ["lemonsqueezy", "fastspring", "paypal"])
def test_a_cancellation_event_with_time_left_mints_nothing_for_a_subscription_never_seen(
    provider: str,
) -> None:
    """Lemon Squeezy's `subscription_cancelled`, FastSpring's
    `subscription.canceled` and PayPal's CANCELLED leave the paid period
    running, but they are cancellations: for a subscription never seen
    they make no entitlement (nor code, nor mail); what comes after it
    (sent before it) makes the entitlement, which ends with the period."""
    fx = FIXTURE_SETS[provider]
    w = world(fx)
    deliver(w, fx.cancel_at_period_end("sub_n", "basic", 0, MONTH, 2 * DAY), at=2 * DAY)
    assert w.entitlements() == []
    deliver(w, fx.subscribed("sub_n", "basic", 0, MONTH, 10), at=2 * DAY + 60)
    deliver(w, fx.paid("sub_n", "inv_n", "basic", 0, MONTH, 20))
    assert status(w.only()) is Status.ACTIVE
    assert w.only().cancel_at is not None
    w.at(MONTH + DAY).tick()
    assert status(w.only()) is Status.CANCELED


#: The fixture sets whose `refunded` also refunds a one-off sale (others
#: build a subscription invoice's refund: Lemon Squeezy's
#: subscription_payment_refunded, PayPal's PAYMENT.SALE.REFUNDED; a basil
#: Stripe invoice names its payment only in the invoice_payment.paid after it).
ONE_OFF_REFUNDS = ("chargebee", "fastspring", "paddle", "standard", "zenofy")


@pytest.mark.parametrize("provider", ONE_OFF_REFUNDS)
def test_a_one_off_sale_refunded_before_its_payment_arrives_is_never_activated(
    provider: str,
) -> None:
    """The sale that arrives after its own full refund makes the
    entitlement already canceled: never `activated` (nor its code mailed)."""
    fx = FIXTURE_SETS[provider]
    w = world(fx)
    deliver(w, supported(fx.refunded, "ord_f", "ord_f", 4900, 4900, DAY), at=DAY)
    deliver(w, supported(fx.sold, "ord_f", "basic", 20, 4900), at=DAY + 60)
    item = w.only()
    assert (item.status, item.reason) == (Status.CANCELED, "refunded")
    assert "Activated" not in w.event_types(item)
