"""Codes back into Stripe (issue 14, section 3): a Stripe source with
`write_back_codes: true` writes each subscription's activation codes into
its metadata `activation_codes`, against a local fake of Stripe's
subscription update (the official SDK pointed at it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import httpx
import pytest
import stripe

from domain.entitlement import Entitlement, code_hash
from services.codes import CodeBook
from services.config import ConfigError, parse_config
from services.outbound.outbox import Dispatcher, Job, Outbox, Outcome
from services.outbound.stripe_codes import StripeCodes, channel, payload
from services.projections.follower import Follower, project_batch
from services.projections.stripe_codes import StripeCodesProjection
from services.stripe_api import CODES_KEY, METADATA_VALUE_LIMIT, StripeAPI, codes_metadata
from tests import stripe_events as se
from tests.fake_stripe import FakeStripe, fake_stripe
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, AUTH, entitlements, post
from tests.test_receipts import CODES, World, paid
from tests.test_store import NOW, YEAR
from tests.test_stripe_api import receipts

CODE_SECRET = "a-code-secret-of-enough-length"
BOOK = CodeBook(CODE_SECRET)


def codes(n: int) -> list[str]:
    entitlement = UUID(int=7)
    return [BOOK.code(entitlement, i) for i in range(n)]


# -- configuration ------------------------------------------------------


def test_write_back_codes_is_off_unless_asked() -> None:
    config = parse_config(f"sources: {{s: {{provider: stripe, secret: {se.SECRET}}}}}")
    assert config.sources["s"].write_back_codes is False
    keyed = parse_config(
        f"sources: {{s: {{provider: stripe, secret: {se.SECRET}, api_key_env: K,"
        " write_back_codes: true}}",
        {"K": "rk_test_write"},
    )
    assert keyed.sources["s"].write_back_codes is True
    assert keyed.sources["s"].api_key is not None
    assert "rk_test_write" not in repr(keyed.sources)


@pytest.mark.parametrize(
    ("source", "environ", "message"),
    [
        (f"provider: stripe, secret: {se.SECRET}, write_back_codes: true", {}, "needs an api_key"),
        (
            f"provider: stripe, secret: {se.SECRET}, api_key: '', write_back_codes: true",
            {},
            "it is empty",
        ),
        (
            f"provider: stripe, secret: {se.SECRET}, api_key_env: K, write_back_codes: true",
            {},
            r"\$K, which is not set",
        ),
        ("provider: paddle, secret: x, write_back_codes: true", {}, "stripe sources only"),
        ("provider: paddle, secret: x, api_key: k, write_back_codes: true", {}, "stripe sources"),
        (f"provider: stripe, secret: {se.SECRET}, write_back_codes: maybe", {}, "boolean"),
    ],
)
def test_a_bad_write_back_setting_is_a_clear_config_error(
    source: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"sources: {{s: {{{source}}}}}", environ)


# -- the metadata ---------------------------------------------------------


def test_codes_go_comma_separated_into_activation_codes() -> None:
    three = codes(3)
    metadata, left_out = codes_metadata(three)
    assert metadata[CODES_KEY] == ",".join(three)
    assert left_out == []
    # The other keys are there, empty: Stripe deletes them.
    assert {k: v for k, v in metadata.items() if k != CODES_KEY} == {
        f"{CODES_KEY}_{n}": "" for n in range(2, 6)
    }
    assert codes_metadata([])[0] == {CODES_KEY: "", **{f"{CODES_KEY}_{n}": "" for n in range(2, 6)}}


def test_codes_that_do_not_fit_500_characters_go_on_in_further_keys() -> None:
    many = codes(90)
    metadata, left_out = codes_metadata(many)
    assert all(len(value) <= METADATA_VALUE_LIMIT for value in metadata.values())
    # Whole codes only, in order, 16 of 29 characters to a key.
    written = [c for value in metadata.values() for c in value.split(",") if c]
    assert written == many[:80] and left_out == many[80:]
    assert metadata[CODES_KEY].split(",") == many[:16]
    assert metadata[f"{CODES_KEY}_2"].split(",") == many[16:32]
    assert len(",".join(many[:16])) == 479  # a 17th would make 509


# -- StripeAPI.write_codes ------------------------------------------------


def subscription(fake: FakeStripe, subscription_id: str, **metadata: str) -> None:
    fake.subscriptions[subscription_id] = {
        "id": subscription_id,
        "object": "subscription",
        "metadata": dict(metadata),
    }


def test_write_codes_sets_the_metadata_and_leaves_other_keys_alone() -> None:
    with fake_stripe() as (fake, base):
        subscription(fake, "sub_w", vendor_key="kept", activation_codes_2="stale")
        written = codes(2)
        StripeAPI("rk_test_w", base).write_codes("sub_w", written)
        [(sub, metadata)] = fake.writes
        assert sub == "sub_w" and metadata[CODES_KEY] == ",".join(written)
        assert fake.subscriptions["sub_w"]["metadata"] == {
            "vendor_key": "kept",
            CODES_KEY: ",".join(written),
        }
        assert fake.api_keys == {"Bearer rk_test_w"}


def test_write_codes_raises_what_stripe_answered_without_retrying() -> None:
    with fake_stripe() as (fake, base):
        api = StripeAPI("rk_test_w", base)
        with pytest.raises(stripe.InvalidRequestError) as unknown:
            api.write_codes("sub_unknown", codes(1))
        assert unknown.value.http_status == 404
        subscription(fake, "sub_x")
        fake.fail_writes(500)
        with pytest.raises(stripe.APIError):
            api.write_codes("sub_x", codes(1))
        assert fake.writes == []  # one request, no retry by the SDK
        api.write_codes("sub_x", codes(1))
        assert len(fake.writes) == 1


# -- the sender -----------------------------------------------------------


def job(subscription: str, entitlements: list[tuple[str, list[int]]], source: str = "s") -> Job:
    return Job.of(
        channel(source),
        "stripe",
        f"{entitlements[0][0] if entitlements else 'none'}/1",
        "stripe.codes",
        subscription,
        1,
        payload(source, subscription, entitlements),
    )


def send(sender: StripeCodes, one: Job) -> Outcome:
    return anyio.run(sender.send, one)


def test_the_sender_writes_the_codes_codebook_derives() -> None:
    first, second = UUID(int=1), UUID(int=2)
    with fake_stripe() as (fake, base):
        subscription(fake, "sub_send")
        sender = StripeCodes({"s": StripeAPI("rk_test_w", base)}, BOOK)
        one = job("sub_send", [(str(first), [0, 2]), (str(second), [0])])
        assert "code" not in str(one.payload).replace("code_indexes", "")
        outcome = send(sender, one)
        assert outcome.ok and outcome.status_code == 200 and outcome.error is None
        expected = [BOOK.code(first, 0), BOOK.code(first, 2), BOOK.code(second, 0)]
        assert fake.codes_written("sub_send") == [expected]
        assert BOOK.code(first, 0) not in outcome.answer


@pytest.mark.parametrize(
    ("status", "retry_after", "permanent", "error"),
    [
        (500, None, False, "Stripe answered 500"),
        (503, None, False, "Stripe answered 503"),
        (429, "7", False, "Stripe answered 429"),
        (409, None, False, "Stripe answered 409"),
        (400, None, True, "Stripe answered 400"),
    ],
)
def test_a_failed_write_is_an_outcome(
    status: int, retry_after: str | None, permanent: bool, error: str
) -> None:
    with fake_stripe() as (fake, base):
        subscription(fake, "sub_f")
        sender = StripeCodes({"s": StripeAPI("rk_test_w", base)}, BOOK)
        fake.fail_writes(status, retry_after=retry_after)
        outcome = send(sender, job("sub_f", [(str(UUID(int=3)), [0])]))
        assert not outcome.ok and outcome.status_code == status
        assert outcome.permanent is permanent and error in (outcome.error or "")
        assert outcome.retry_after == (float(retry_after) if retry_after else None)
        assert fake.writes == []
        # The next attempt goes through.
        assert send(sender, job("sub_f", [(str(UUID(int=3)), [0])])).ok
        assert len(fake.writes) == 1


def test_what_retrying_cannot_mend_is_permanent_and_never_shows_the_key() -> None:
    key = "rk_test_secretkey123"
    with fake_stripe() as (fake, base):
        sender = StripeCodes({"s": StripeAPI(key, base)}, BOOK)
        one = job("sub_nowhere", [(str(UUID(int=4)), [0])])
        missing = send(sender, one)
        assert (missing.ok, missing.permanent, missing.status_code) == (False, True, 404)
        assert missing.error == "Stripe has no subscription sub_nowhere (404)"
        subscription(fake, "sub_nowhere")
        fake.valid_keys = {"rk_test_other"}
        refused = send(sender, one)
        assert (refused.permanent, refused.status_code) == (True, 401)
        assert "api_key" in (refused.error or "")
        fake.valid_keys = None
        fake.read_only_keys = {key}
        read_only = send(sender, one)
        assert (read_only.permanent, read_only.status_code) == (True, 403)
        assert "Subscriptions: Write" in (read_only.error or "")
        for outcome in (missing, refused, read_only):
            assert key[:12] not in f"{outcome.error} {outcome.answer}"
        assert fake.writes == []


def test_stripe_out_of_reach_is_retried() -> None:
    with fake_stripe() as (_, base):
        pass  # stopped: nothing answers there now
    sender = StripeCodes({"s": StripeAPI("rk_test_w", base)}, BOOK)
    outcome = send(sender, job("sub_x", [(str(UUID(int=5)), [0])]))
    assert not outcome.ok and not outcome.permanent and outcome.status_code is None
    assert "could not be reached" in (outcome.error or "")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"source": "s", "subscription": "sub_x", "entitlements": [{"id": "not-a-uuid"}]},
        {
            "source": "s",
            "subscription": "sub_x",
            "entitlements": [{"id": str(UUID(int=1)), "code_indexes": [-1]}],
        },
        {"source": "s", "subscription": 7, "entitlements": []},
    ],
)
def test_a_malformed_payload_is_permanent(body: dict[str, Any]) -> None:
    sender = StripeCodes({"s": StripeAPI("rk_test_w", "http://127.0.0.1:9")}, BOOK)
    malformed = Job.of("stripe:s", "stripe", "m", "stripe.codes", "sub_x", 1, body)
    outcome = send(sender, malformed)
    assert not outcome.ok and outcome.permanent and "payload" in (outcome.error or "")


def test_a_source_without_an_api_now_is_permanent() -> None:
    outcome = send(StripeCodes({}, BOOK), job("sub_x", [], source="gone"))
    assert outcome.permanent and "'gone' has no api_key" in (outcome.error or "")


# -- the projection, the outbox and the dispatcher, on a real store ------------

WRITE_BACK = parse_config(
    f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}, api_key: rk_test_wb,
                 write_back_codes: true}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
"""
)
FAST = (0.05, 0.05, 0.05)


class WriteBack:
    """A World (domain service, read model) with the stripe-codes projection
    following its log and a dispatcher sending to a fake Stripe."""

    def __init__(self, database_url: str, base: str) -> None:
        self.world = World(database_url, WRITE_BACK)
        self.outbox = Outbox(self.world.read_model)
        self.projection = StripeCodesProjection(self.world.read_model, self.outbox, ["stripe-main"])
        self.api = StripeAPI("rk_test_wb", base)
        self.jobs_made = 0

    def send(self, event: dict[str, Any], receipt: str) -> None:
        self.world.send(event, receipt)
        self.project()

    def project(self) -> None:
        position = self.projection.position()
        changes, last = Follower(self.world.store).read(position, 10_000)
        if last is not None:
            before = len(self.outbox.jobs(kind="stripe", limit=1000))
            asyncio.run(project_batch(self.projection, changes, last))
            self.jobs_made += len(self.outbox.jobs(kind="stripe", limit=1000)) - before

    def deliver(self, until: Callable[[], bool], seconds: float = 15) -> None:
        """Run a dispatcher until `until()` and no stripe job is pending."""

        async def run() -> None:
            sender = StripeCodes({"stripe-main": self.api}, CODES)
            dispatcher = Dispatcher(self.outbox, [sender], schedule=FAST, poll_interval=0.05)
            stop = asyncio.Event()
            task = asyncio.create_task(dispatcher.run(stop))
            deadline = time.monotonic() + seconds
            try:
                while not (until() and not self.pending()):
                    assert time.monotonic() < deadline, "not delivered in time"
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await task

        asyncio.run(run())

    def pending(self) -> int:
        return self.outbox.counts(channel("stripe-main")).get("pending", 0)

    def change(self, entitlement: UUID, change: Callable[[Entitlement], object]) -> None:
        def apply(e: Entitlement) -> None:
            change(e)

        self.world.store.change(entitlement, apply)
        self.world.project()
        self.project()


def validates(world: World, code: str) -> bool:
    return world.read_model.by_code(code_hash(code)) is not None


@pytest.mark.integration
def test_a_paid_invoice_writes_its_codes_into_stripe_once_per_change(database_url: str) -> None:
    with fake_stripe() as (fake, base):
        wb = WriteBack(database_url, base)
        try:
            subscription(fake, "sub_wb", vendor="kept")
            event = paid("sub_wb")
            wb.send(event, "paid")
            [entitlement] = wb.world.read_model.entitlements(order_ref="sub_wb")
            first = CODES.code(entitlement.id, 0)
            wb.deliver(lambda: len(fake.writes) == 1)
            assert fake.codes_written("sub_wb") == [[first]]
            assert validates(wb.world, first)
            assert fake.subscriptions["sub_wb"]["metadata"] == {
                "vendor": "kept",
                "activation_codes": first,
            }

            # The provider retries the webhook, and a renewal's status
            # change: no codes changed, no job, nothing written.
            wb.send(event, "replayed")
            wb.world.settle(wb.world.now + timedelta(days=400))
            wb.project()
            [lapsed] = wb.world.read_model.entitlements(order_ref="sub_wb")
            assert lapsed.status != "ACTIVE"
            assert wb.jobs_made == 1
            wb.deliver(lambda: True)
            assert len(fake.writes) == 1

            # Rebuilt from the start: the same jobs, already there; none sent again.
            wb.projection.reset()
            wb.project()
            assert wb.jobs_made == 1 and wb.pending() == 0

            # A second code, then the first revoked, Stripe failing once on the way.
            fake.fail_writes(500)

            def issue(e: Entitlement) -> object:
                return e.issue_code(CODES.hash, "admin", "issue-1", wb.world.now)

            wb.change(entitlement.id, issue)
            second = CODES.code(entitlement.id, 1)
            wb.deliver(lambda: len(fake.writes) == 2)
            wb.change(entitlement.id, lambda e: e.revoke_code(0, "admin", "revoke-0", wb.world.now))
            wb.deliver(lambda: len(fake.writes) == 3)
            assert fake.codes_written("sub_wb") == [[first], [first, second], [second]]
            assert not validates(wb.world, first) and validates(wb.world, second)
            assert fake.subscriptions["sub_wb"]["metadata"]["activation_codes"] == second
            [failed, *_] = [
                r for r in wb.outbox.jobs(kind="stripe", limit=100) if len(r.attempts) > 1
            ]
            assert failed.status == "succeeded"
            assert [a.status_code for a in failed.attempts] == [500, 200]
            assert all(first not in a.answer and second not in a.answer for a in failed.attempts)
        finally:
            wb.world.close()


@pytest.mark.integration
def test_several_entitlements_of_one_subscription_are_written_together(
    database_url: str,
) -> None:
    with fake_stripe() as (fake, base):
        wb = WriteBack(database_url, base)
        try:
            subscription(fake, "sub_two")
            two_lines = se.invoice_paid(
                subscription="sub_two",
                shape=se.LEGACY,
                lines=[
                    {"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR},
                    {"price": "q", "sku": "better_annual", "start": NOW, "end": NOW + YEAR},
                ],
            )
            wb.send(two_lines, "paid")
            entitlements = wb.world.read_model.entitlements(order_ref="sub_two")
            assert len(entitlements) == 2
            wb.deliver(lambda: len(fake.writes) == wb.jobs_made)
            last = fake.codes_written("sub_two")[-1]
            assert sorted(last) == sorted(CODES.code(e.id, 0) for e in entitlements)
            assert all(validates(wb.world, code) for code in last)
            # A one-off payment has no subscription to write to: no job.
            made = wb.jobs_made
            wb.send(se.one_off(paid("sub_none")), "one-off")
            [one_off] = [e for e in wb.world.read_model.entitlements() if e.order_ref != "sub_two"]
            assert one_off.order_ref.startswith("in_")
            assert wb.jobs_made == made
            assert {r.job.ordering_key for r in wb.outbox.jobs(limit=100)} == {"sub_two"}
        finally:
            wb.world.close()


# -- end to end through `entitle dev` -------------------------------------------

DEV_CONFIG = """
sources:
  stripe-main: {{provider: stripe, secret: {secret}, api_key_env: STRIPE_API_KEY,
                 write_back_codes: true}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
"""


@pytest.mark.e2e
def test_entitle_dev_writes_a_paid_subscriptions_codes_into_stripe(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(DEV_CONFIG.format(secret=se.SECRET))
    with fake_stripe() as (fake, base):
        env = {
            "ENTITLE_ADMIN_KEYS": ADMIN,
            "STRIPE_API_KEY": "rk_test_write_back",
            "ENTITLE_STRIPE_API_BASE": base,
        }
        with Entitle(["dev"], tmp_path, env) as entitle:
            subscription(fake, "sub_dev", vendor="kept")
            event = paid("sub_dev")
            assert post(entitle, event).status_code == 202
            [[first]] = eventually(lambda: fake.codes_written("sub_dev"), 20)
            [item] = entitlements(entitle, order_ref="sub_dev")
            assert item["activation_code"] == first
            assert validate(entitle, first) == "VALID"

            # The provider sends the same webhook again: no codes changed.
            assert post(entitle, event).status_code == 202
            eventually(lambda: len(receipts(entitle)) == 2)
            # Then a second code (a later event: once it is written, the
            # replay is projected too), then the first revoked.
            url = f"{entitle.url}/v1/entitlements/{item['id']}"
            issued = httpx.post(f"{url}/codes", headers=AUTH)
            assert issued.status_code == 201, issued.text
            second = issued.json()["code"]
            eventually(lambda: len(fake.writes) == 2, 20)
            assert httpx.delete(f"{url}/codes/0", headers=AUTH).status_code == 200
            eventually(lambda: len(fake.writes) == 3, 20)
            assert fake.codes_written("sub_dev") == [[first], [first, second], [second]]
            assert fake.subscriptions["sub_dev"]["metadata"] == {
                "vendor": "kept",
                "activation_codes": second,
            }
            assert validate(entitle, second) == "VALID"
            assert eventually(lambda: validate(entitle, first) == "NOT_FOUND", 10)
            assert fake.api_keys == {"Bearer rk_test_write_back"}
            assert "rk_test_write_back" not in entitle.text


def validate(entitle: Entitle, code: str) -> str:
    answer = httpx.post(f"{entitle.url}/v1/validate", json={"activation_code": code})
    return str(answer.json()["code"])
