"""One bad record never stops a partition or a projection: the fold dead-
letters a webhook it cannot fold and goes on; a projection records an event
it cannot project and goes on. Against real stores (SQLite and PostgreSQL)
and, for the public topic, a real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from contracts.events import EVENTS_TOPIC
from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain import lifecycle
from domain.commands import Command, Customer, Effect, OrderEvent, Rules, apply
from domain.dead_letter import DeadLetter, dead_letter_id
from domain.entitlement import Cause, Entitlement, Status, entitlement_id
from domain.lifecycle import Line
from services import fold
from services.codes import CodeBook
from services.config import parse_config
from services.fold import DomainService
from services.kafka import ensure_topics, make_broker
from services.projections import (
    READ_MODEL,
    Follower,
    PublicEventsProjection,
    ReadModelProjection,
    project_batch,
    replay,
)
from services.providers import Unmappable, check, parse_time
from services.readmodel import ReadModel
from services.store import Batch, EntitlementStore
from tests import standard_events as sw
from tests import stripe_events as se
from tests.test_store import NOW, YEAR, Record

CONFIG = parse_config(f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
  billing: {{provider: standard, secret: {sw.SECRET}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
  - {{sku: basic, product: acme, period: P1M}}
""")
CODES = CodeBook("test-code-secret-0123456789")


def envelope(offset: int, event: dict[str, Any], source: str = "stripe-main") -> Record:
    raw = RawWebhookV1(
        receipt_id=f"r-{offset}",
        source=source,
        provider=CONFIG.sources[source].provider.name,
        routing_key="same-partition",
        received_at=datetime.now(UTC),
        headers={},
        body=json.dumps(event),
    )
    return Record(RAW_TOPIC, 0, offset, raw.model_dump_json().encode())


def paid(subscription: str, **overrides: Any) -> dict[str, Any]:
    end = overrides.pop("end", NOW + YEAR)
    event = se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": NOW, "end": end}],
        **overrides,
    )
    return event


def zoneless() -> dict[str, Any]:
    """Case 08: a neutral billing event whose times carry no UTC offset."""
    event = sw.subscription("sub_poison", "active", NOW, NOW + YEAR, NOW)
    subscription = event["data"]["subscription"]
    event["timestamp"] = "2026-11-29T10:00:00"
    subscription["current_period_start"] = "2026-11-01T00:00:00"
    subscription["current_period_end"] = "2027-11-01T00:00:00"
    return event


POISONS: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    # name: (event, source, what the dead letter's reason names)
    "zoneless time": (zoneless, "billing", "timezone"),
    "year 9999 period end": (lambda: paid("sub_poison", end=253402300799), "stripe-main", "range"),
    "e-mail not a string": (
        lambda: paid("sub_poison", email={"address": "x@example.com"}),  # type: ignore[arg-type]
        "stripe-main",
        "customer e-mail address",
    ),
    "NUL in an e-mail": (
        lambda: paid("sub_poison", email="buyer\x00@example.com"),
        "stripe-main",
        "control character",
    ),
    # An id of the wrong type is no id: not "5", not an order of its own.
    "item id not a string": (
        lambda: se.invoice_paid(
            subscription="sub_poison",
            shape=se.LEGACY,
            lines=[{"price": "p", "sku": "better_annual", "item": 5, "start": NOW, "end": NOW}],
        ),
        "stripe-main",
        "not a string",
    ),
    "subscription id not a string": (
        lambda: se.invoice_paid(
            subscription=42,  # type: ignore[arg-type]
            shape=se.LEGACY,
            lines=[{"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR}],
        ),
        "stripe-main",
        "not a string",
    ),
}


def active(store: EntitlementStore, subscription: str) -> bool:
    ent = store.find(
        entitlement_id("stripe-main", subscription, se.item_id(subscription, "p")), Entitlement
    )
    return ent is not None and ent.status is Status.ACTIVE


def letter(store: EntitlementStore, source: str, event: dict[str, Any]) -> DeadLetter | None:
    return store.find(dead_letter_id(source, event["id"]), DeadLetter)


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(POISONS))
def test_a_poison_webhook_between_two_good_ones_is_dead_lettered(
    database_url: str, kind: str
) -> None:
    make, source, named = POISONS[kind]
    poison = make()
    store = EntitlementStore(database_url)
    service = DomainService(store, CONFIG, CODES)
    result = service.process(
        [envelope(0, paid("sub_a")), envelope(1, poison, source), envelope(2, paid("sub_b"))]
    )
    assert (result.webhooks, result.dead_letters) == (3, 1)
    assert active(store, "sub_a") and active(store, "sub_b")
    dead = letter(store, source, poison)
    assert dead is not None
    assert named in dead.reason.lower(), dead.reason
    assert store.position(f"{RAW_TOPIC}/0") == 2  # the partition moved past all three
    store.close()


@pytest.mark.integration
def test_an_exception_in_the_fold_dead_letters_that_webhook_only(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = fold.apply

    def failing(command: Command, *args: Any) -> Effect:
        if isinstance(command, OrderEvent) and command.order_ref == "sub_poison":
            raise RuntimeError("injected")
        return original(command, *args)

    monkeypatch.setattr(fold, "apply", failing)
    store = EntitlementStore(database_url)
    poison = paid("sub_poison")
    DomainService(store, CONFIG, CODES).process(
        [envelope(0, paid("sub_a")), envelope(1, poison), envelope(2, paid("sub_b"))]
    )
    assert active(store, "sub_a") and active(store, "sub_b")
    dead = letter(store, "stripe-main", poison)
    assert dead is not None and dead.reason == "folding failed: RuntimeError: injected"
    assert not active(store, "sub_poison")  # nothing of it half-applied
    store.close()


@pytest.mark.integration
def test_many_bad_webhooks_in_one_batch_are_found_in_halves_not_in_a_pass_each(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each bad webhook found costs a pass over the batch: with every other
    one of 64 bad, that was 33 passes (a batch of 2,000 so took 254 s). From
    the second one found, the batch is folded in halves: every good webhook
    applied, every bad one dead-lettered and logged once (not on each pass),
    in a fraction of the folds."""
    original = fold.apply
    folds = 0

    def failing(command: Command, *args: Any) -> Effect:
        nonlocal folds
        folds += 1
        if isinstance(command, OrderEvent) and command.order_ref.startswith("sub_bad"):
            raise RuntimeError("injected")
        return original(command, *args)

    monkeypatch.setattr(fold, "apply", failing)
    store = EntitlementStore(database_url)
    events = [paid(f"sub_bad_{n}" if n % 2 else f"sub_good_{n}") for n in range(64)]
    result = DomainService(store, CONFIG, CODES).process(
        [envelope(n, event) for n, event in enumerate(events)]
    )
    assert (result.webhooks, result.dead_letters) == (64, 32)
    assert all(active(store, f"sub_good_{n}") for n in range(0, 64, 2))
    assert all(letter(store, "stripe-main", event) is not None for event in events[1::2])
    assert store.position(f"{RAW_TOPIC}/0") == 63
    assert folds < 400, folds  # 208 in halves; a pass per bad webhook, 592
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead letter")]
    assert len(logged) == 32 and len(set(logged)) == 32, len(logged)
    store.close()


# -- projections -------------------------------------------------------------


def store_unchecked(store: EntitlementStore, order_ref: str, email: Any) -> None:
    """An entitlement with a customer e-mail the adapters would refuse, as
    events written before they checked could hold."""
    offering = CONFIG.catalog.get("better_annual")
    assert offering is not None
    now = datetime.now(UTC)
    line = Line("item", offering, 1, now, now + timedelta(days=365))
    command = OrderEvent(
        "stripe-main",
        order_ref,
        lifecycle.payment(f"in_{order_ref}", [line]),
        (line,),
        Cause.provider("stripe-main", f"evt_{order_ref}"),
        now,
        Customer("cus_1", email),
    )
    batch = Batch(store)
    apply(command, batch, Rules(CONFIG.catalog, CONFIG.policy, CODES.hash), now)
    store.record(batch, None)


def public_events(bootstrap: str) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            EVENTS_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=3000)
            return [json.loads(r.value) for rs in batches.values() for r in rs if r.value]
        finally:
            await consumer.stop()

    return asyncio.run(run())


@pytest.mark.integration
@pytest.mark.parametrize("email", [{"address": "x@example.com"}, "buyer\x00@example.com"])
def test_a_projection_records_an_event_it_cannot_project_and_goes_on(
    database_url: str, kafka_bootstrap: str, kafka_idempotence: bool, email: Any
) -> None:
    store = EntitlementStore(database_url)
    read_model = ReadModel(database_url)
    store_unchecked(store, "sub_good_1", "one@example.com")
    store_unchecked(store, "sub_bad", email)
    store_unchecked(store, "sub_good_2", "two@example.com")
    changes, last = Follower(store).read(0, 1000)
    assert last is not None

    async def project() -> None:
        await ensure_topics(kafka_bootstrap, 1)
        broker = make_broker(kafka_bootstrap, kafka_idempotence)
        await broker.start()
        try:
            for projection in (
                ReadModelProjection(read_model),
                PublicEventsProjection(read_model, broker),
            ):
                await project_batch(projection, changes, last)
        finally:
            await broker.stop()

    asyncio.run(project())
    good = {entitlement_id("stripe-main", f"sub_good_{n}", "item") for n in (1, 2)}
    bad = entitlement_id("stripe-main", "sub_bad", "item")
    assert {str(i) for i in good} <= {str(v.id) for v in read_model.entitlements(1000)}
    assert good <= {e.entitlement_id for e in _public(kafka_bootstrap)}
    assert read_model.position(READ_MODEL) == last
    errors = read_model.projection_errors()
    by_projection = {e.projection for e in errors if e.aggregate_id == str(bad)}
    if isinstance(email, dict) or database_url.startswith("postgres"):
        # Neither projection can render an e-mail that is not a string;
        # PostgreSQL cannot store a NUL in text.
        assert READ_MODEL in by_projection
    assert all(e.error and e.position <= last for e in errors)
    store.close()
    read_model.close()


@pytest.mark.integration
@pytest.mark.parametrize("email", [{"address": "x@example.com"}, "buyer\x00@example.com"])
def test_a_replay_records_what_it_cannot_project_as_the_projector_does(
    database_url: str, email: Any
) -> None:
    """`entitle replay` writes many events at once, with one view per
    entitlement: an event it cannot view or write costs only that event,
    recorded at the same position as the projector records it."""
    store = EntitlementStore(database_url)
    read_model = ReadModel(database_url)
    store_unchecked(store, "sub_good_1", "one@example.com")
    store_unchecked(store, "sub_bad", email)
    store_unchecked(store, "sub_good_2", "two@example.com")
    changes, last = Follower(store).read(0, 1000)
    assert last is not None
    asyncio.run(project_batch(ReadModelProjection(read_model), changes, last))

    def seen() -> tuple[list[str], set[tuple[str | None, int]]]:
        bodies = [v.model_dump_json() for v in read_model.entitlements(1000)]
        errors = read_model.projection_errors()
        return bodies, {(e.aggregate_id, e.position) for e in errors if e.projection == READ_MODEL}

    projected = seen()
    assert replay(store, read_model) == len(changes)
    assert seen() == projected
    assert len(projected[0]) >= 2
    assert read_model.position(READ_MODEL) == last
    store.close()
    read_model.close()


def _public(bootstrap: str) -> list[Any]:
    from contracts.events import EntitlementEventV1

    return [EntitlementEventV1.model_validate(e) for e in public_events(bootstrap)]


# -- the adapters' checks (pure) -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-11-29T10:00:00", "no UTC offset"),
        ("9999-12-31T00:00:00Z", "out of range"),
        ("1969-12-31T23:59:59Z", "out of range"),
        ("next tuesday", "not an ISO 8601 time"),
    ],
)
def test_a_provider_time_needs_an_offset_and_a_sane_year(value: str, message: str) -> None:
    with pytest.raises(Unmappable, match=message):
        parse_time(value, "Paddle occurred_at")
    assert parse_time("2026-11-29T10:00:00+01:00", "x") == datetime(2026, 11, 29, 9, tzinfo=UTC)


@pytest.mark.parametrize(
    ("customer", "quantity", "message"),
    [
        (Customer(["a"], None), 1, "customer id"),  # type: ignore[arg-type]
        (Customer("c", "a\nb@example.com"), 1, "customer e-mail address"),
        (Customer("c", "b@example.com"), -1, "quantity"),
        (Customer("c", "b@example.com"), 10**9, "quantity"),
    ],
)
def test_every_value_an_adapter_passes_on_is_checked(
    customer: Customer, quantity: int, message: str
) -> None:
    offering = CONFIG.catalog.get("basic")
    assert offering is not None
    now = datetime.now(UTC)
    line = Line("item", offering, quantity, now, now)
    command = OrderEvent(
        "s", "o", lifecycle.payment("in", [line]), (line,), Cause.provider("s", "e"), now, customer
    )
    with pytest.raises(Unmappable, match=message):
        check([command])


def _events_with_ids() -> dict[str, tuple[str, dict[str, Any], str]]:
    """provider -> (its id field, a real-shaped event of it, source kind)."""
    from tests import chargebee_events as cb
    from tests import paddle_events as pe
    from tests import paypal_events as pp
    from tests import zenofy_events as ze

    return {
        "stripe": (
            "id",
            se.subscription_event(
                "customer.subscription.updated",
                subscription="s",
                items=[{"price": "p"}],
                start=NOW,
                end=NOW + YEAR,
            ),
            "",
        ),
        "chargebee": (
            "id",
            cb.subscription("subscription_changed", "s", "active", NOW, NOW + YEAR, NOW * 1000),
            "",
        ),
        "paddle": (
            "event_id",
            pe.subscription("subscription.updated", "s", "active", NOW, NOW + YEAR, NOW),
            "",
        ),
        "paypal": (
            "id",
            pp.subscription("BILLING.SUBSCRIPTION.UPDATED", "s", "ACTIVE", NOW + YEAR, NOW),
            "",
        ),
        "zenofy": ("id", ze.event("subscription.updated", "s", "active", NOW, NOW + YEAR, NOW), ""),
    }


@pytest.mark.parametrize("provider", ["stripe", "chargebee", "paddle", "paypal", "zenofy"])
@pytest.mark.parametrize("bad", [None, {"a": 1}, 12345, ["evt"]])
def test_an_event_id_that_is_not_a_string_makes_the_event_unmappable(
    provider: str, bad: Any
) -> None:
    """Event ids deduplicate: "None" or "{'a': 1}" would make every such event
    a duplicate of the first."""
    from services.providers import PROVIDERS

    field, event, _ = _events_with_ids()[provider]
    event[field] = bad
    adapter = PROVIDERS[provider]
    assert adapter.event_id(event) == ""
    with pytest.raises(Unmappable):
        adapter.normalize("s", event, CONFIG.catalog, datetime.now(UTC))


@pytest.mark.parametrize("field", ["order_id", "subscription_id", "id"])
def test_a_lemon_squeezy_id_that_is_an_object_is_no_order(field: str) -> None:
    from services.providers import PROVIDERS
    from tests import lemonsqueezy_events as ls

    if field == "subscription_id":
        event = ls.invoice("subscription_payment_success", "1", "2", NOW)
        event["data"]["attributes"][field] = {"a": 1}
    else:
        event = ls.subscription("subscription_created", "9", "7", "active", NOW + YEAR, NOW)
        target = event["data"] if field == "id" else event["data"]["attributes"]
        target[field] = {"a": 1}
    with pytest.raises(Unmappable, match="is not a string"):
        PROVIDERS["lemonsqueezy"].normalize("s", event, CONFIG.catalog, datetime.now(UTC))


@pytest.mark.parametrize(
    ("provider", "header", "value"),
    [
        ("stripe", "stripe-signature", "t={now},v1=\u00e9"),
        ("paddle", "paddle-signature", "ts={now};h1=\u00e9"),
        ("lemonsqueezy", "x-signature", "\u00e9"),
        ("zenofy", "x-zenofy-signature", "sha256=\u00e9"),
    ],
)
def test_a_non_ascii_signature_is_a_bad_signature_not_a_crash(
    provider: str, header: str, value: str
) -> None:
    """Headers arrive as latin-1 text: a non-ASCII byte must be a 401, where
    hmac.compare_digest on a non-ASCII str would raise (a 500)."""
    from services.providers import PROVIDERS, Credentials, SignatureError

    now = time.time()
    headers = {header: value.format(now=int(now))}
    with pytest.raises(SignatureError):
        PROVIDERS[provider].verify(headers, b"{}", Credentials("s3cret"), now)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _replaced(event: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(event))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


@pytest.mark.parametrize(
    "provider", ["stripe", "paddle", "lemonsqueezy", "chargebee", "paypal", "zenofy", "standard"]
)
def test_any_field_of_the_wrong_type_is_unmappable_never_an_adapter_crash(provider: str) -> None:
    """Every field of every sample event, replaced by a value of another
    JSON type: the adapter answers commands or Unmappable (a dead letter
    naming the field), never another exception (a traceback in the log,
    "normalizing failed")."""
    from services.config import parse_config
    from services.providers import PROVIDERS
    from tests.test_dev_providers import CONFIG as EVERY_SOURCE
    from tests.test_dev_providers import lifecycle

    config = parse_config(EVERY_SOURCE)
    adapter = PROVIDERS[provider]
    now = int(time.time())
    _, steps = lifecycle(provider, now)
    crashes = []
    for event in (e for step in steps for e in step):
        for path in _paths(event):
            for value in ([], {}, 12345, None, "x", True, 1.5):
                mutated = _replaced(event, path, value)
                if not isinstance(mutated, dict):
                    continue
                try:
                    check(adapter.normalize(provider, mutated, config.catalog, datetime.now(UTC)))
                    adapter.routing_key(mutated)
                    adapter.event_id(mutated)
                except Unmappable:
                    pass
                except Exception as exc:
                    crashes.append(f"{'.'.join(map(str, path))} = {value!r}: {exc!r}")
    assert not crashes, "\n".join(sorted(set(crashes))[:30])
