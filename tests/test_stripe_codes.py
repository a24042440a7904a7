"""Codes back into Stripe (issue 14, section 3): a Stripe source with
`write_back_codes: true` writes each subscription's activation codes into
its metadata `activation_codes`, against a local fake of Stripe's
subscription update (the official SDK pointed at it)."""

from __future__ import annotations

from uuid import UUID

import pytest
import stripe

from services.codes import CodeBook
from services.config import ConfigError, parse_config
from services.stripe_api import CODES_KEY, METADATA_VALUE_LIMIT, StripeAPI, codes_metadata
from tests import stripe_events as se
from tests.fake_stripe import FakeStripe, fake_stripe

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
