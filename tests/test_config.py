"""The configuration file: what is accepted and how mistakes are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError, admin_keys, parse_config

GOOD = """
sources:
  stripe-main: {provider: stripe, secret: whsec_example}
  stripe-eu: {provider: stripe, secret_env: STRIPE_EU_SECRET}
offerings:
  - {sku: better_annual, product: acme, period: P1Y, seats: 3,
     features: {export: true}, limits: {projects: 50}, suspend_after_days: 3}
"""


def test_a_valid_file_gives_sources_and_catalog() -> None:
    config = parse_config(GOOD, {"STRIPE_EU_SECRET": "whsec_eu"})
    assert config.sources["stripe-eu"].secret.get_secret_value() == "whsec_eu"
    assert config.sources["stripe-main"].provider.name == "stripe"
    offering = config.catalog.get("better_annual")
    assert offering is not None and offering.seats == 3 and offering.limits == {"projects": 50}


def test_secrets_do_not_show_in_reprs() -> None:
    config = parse_config(GOOD, {"STRIPE_EU_SECRET": "whsec_eu"})
    assert "whsec" not in repr(config.sources) and "whsec" not in str(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources: {s: {provider: nope, secret: x}}", "provider 'nope'"),
        ("sources: {s: {provider: stripe}}", "needs secret"),
        ("sources: {s: {provider: stripe, secret_env: MISSING}}", r"\$MISSING"),
        ("offerings: [{sku: a, product: p, period: monthly}]", "ISO 8601"),
        ("offerings: [{sku: a, product: p}, {sku: a, product: p}]", "defined twice"),
        ("offerings: [{sku: a, product: p, seats: 0}]", "seats"),
        ("offerings: [{sku: a}]", "product"),
        ("surprise: 1", "surprise"),
        ("sources: [", "not valid YAML"),
        ("sources: {z: {provider: zenofy}}", "allow_unsigned: true"),
        ("sources: {p: {provider: paypal, webhook_id: ''}}", "needs webhook_id"),
        ("sources: {s: {provider: stripe, secret: x, tolerance_seconds: 1e400}}", "tolerance"),
        ("sources: {z: {provider: zenofy, secret: ''}}", "the secret is empty"),
        ("sources: {s: {provider: stripe, secret: '  '}}", "the secret is empty"),
        ("sources: {s: {provider: standard, secret: whsec_}}", "key is empty"),
        ("sources: {s: {provider: standard, secret: 'whsec_#!'}}", "not a base64"),
        ("sources: {z: {provider: zenofy, secret: x, allow_unsigned: true}}", "one or the other"),
    ],
)
def test_mistakes_are_reported_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, {})


def test_admin_keys_may_be_named() -> None:
    keys = admin_keys("ops:ek_first_admin_key, ek_second_admin_key,")
    assert [(k.name, k.secret) for k in keys] == [
        ("ops", "ek_first_admin_key"),
        ("key2", "ek_second_admin_key"),
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (":ek_first_admin_key", "entry 1 has no name before ':'"),
        ("ops:short", "entry 1 has a key of 5 characters: use at least 16"),
        ("ops:ek_first_admin_key,ops:ek_second_admin_key", "entry 2 repeats the name 'ops'"),
        ("a:ek_first_admin_key,b:ek_first_admin_key", "entry 2 repeats a key given before"),
        ("o p:ek_first_admin_key", "entry 1 names it 'o p'"),
        ("ops:ek_first admin_key", "entry 1 has a space or control character"),
        (",", "names no key"),
    ],
)
def test_a_bad_admin_key_list_says_which_entry_without_showing_a_key(
    value: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        admin_keys(value)
    assert problem in str(raised.value) and "ek_first" not in str(raised.value)


def test_rate_limits_have_defaults_and_can_be_set() -> None:
    default = parse_config(GOOD, {"STRIPE_EU_SECRET": "x"}).rate_limits
    assert (default.seat_per_address, default.admin_failures_per_address) == ((10, 50), (0.1, 10))
    limits = parse_config(
        GOOD
        + "licensing: {seat_per_address_per_second: 2, seat_per_address_burst: 5}\n"
        + "admin: {failed_auth_per_second: 0.5, failed_auth_burst: 3}\n",
        {"STRIPE_EU_SECRET": "x"},
    ).rate_limits
    assert (limits.seat_per_address, limits.admin_failures_per_address) == ((2, 5), (0.5, 3))
    assert limits.per_code == default.per_code == (10, 20)
    with pytest.raises(ConfigError, match="failed_auth_burst"):
        parse_config("admin: {failed_auth_burst: 0}", {})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENTITLE_RAW_PARTITIONS", "0"),
        ("ENTITLE_DOMAIN_BATCH", "many"),
        ("ENTITLE_SCHEDULE_INTERVAL", "-1"),
        ("ENTITLE_AGGREGATE_CACHE", "1.5"),
        ("ENTITLE_KAFKA_SESSION_TIMEOUT", "abc"),
        ("ENTITLE_KAFKA_SESSION_TIMEOUT", "inf"),
        ("ENTITLE_SCHEDULE_INTERVAL", "nan"),
        ("ENTITLE_KAFKA_TOPIC_IDS", "maybe"),
        ("ENTITLE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("ENTITLE_TRUSTED_PROXIES", "127.0.0.1,garbage"),
    ],
)
def test_a_setting_that_is_no_usable_number_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    from services.config import Settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(tmp_path)


@pytest.mark.parametrize(
    ("database_url", "told", "batch"),
    [
        ("postgresql://postgres@127.0.0.1:5432/entitle", None, 2000),
        ("postgres://postgres@127.0.0.1:5432/entitle", None, 2000),
        ("POSTGRESQL://postgres@127.0.0.1:5432/entitle", None, 2000),
        (None, None, 500),  # SQLite, the default
        ("sqlite:///entitle.db", None, 500),
        ("postgresql://postgres@127.0.0.1:5432/entitle", "40", 40),
        ("sqlite:///entitle.db", "3000", 3000),
    ],
)
def test_the_fold_batch_follows_the_database_unless_told(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str | None,
    told: str | None,
    batch: int,
) -> None:
    """Larger transactions on PostgreSQL (bench/lifecycle.py); SQLite's one
    writer is held a fraction of a second at a time."""
    from services.config import Settings

    for variable, value in (("ENTITLE_DATABASE_URL", database_url), ("ENTITLE_DOMAIN_BATCH", told)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert Settings.from_env(tmp_path).domain_batch == batch


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENTITLE_HTTP_MAX_HEADER_BYTES", "inf"),
        ("ENTITLE_HTTP_MAX_CONNECTIONS", "1e400"),
        ("ENTITLE_HTTP_MAX_CONNECTIONS", "1.5"),
        ("ENTITLE_HTTP_HEADER_TIMEOUT", "1e400"),
        ("ENTITLE_HTTP_BODY_TIMEOUT", "0"),
    ],
)
def test_an_http_limit_that_is_no_usable_number_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from services.server import HttpLimits

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        HttpLimits.from_env()


WEBHOOK_SECRET = "whsec_" + "a" * 43 + "="


def endpoint_file(endpoint: str, *outbound: str) -> str:
    settings = "".join(f"  {line}\n" for line in outbound)
    return f"outbound:\n{settings}  endpoints:\n    crm: {{secret_env: CRM, {endpoint}}}\n"


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ('url: "ftp://127.0.0.1:19101/ftp"', "absolute, https"),
        ('url: "http://203.0.113.7:19101/plain"', "loopback"),
        ('url: "http://127.0.0.1:19101/frag#x"', "fragment"),
        ('url: "http://user:pw@127.0.0.1:19101/creds"', "credentials"),
        ('url: "https://hooks.example/x\\r\\nX-Injected: 1"', "control"),
        ('url: "https://[64:ff9b::7f00:1]/x"', "non-public"),
        ('url: "https://10.0.0.7/x"', "non-public"),
        ('url: "https://localhost/x"', "non-public"),
        ('url: "https://hooks.example/x", events: ["bogus.thing", "entitlement.nope"]', "bogus"),
        ('url: "https://hooks.example/x", description: "crm\\u0000"', "control"),
        ('url: "https://hooks.example/x", include_codes: "yes"', "boolean"),
        ('url: "https://hooks.example/x", include_codes: 1', "boolean"),
        ('url: "https://hooks.example/x", ordered: "no"', "boolean"),
    ],
)
def test_a_declared_endpoint_is_held_to_the_apis_rules(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"outbound.*{message}"):
        # Unset, allow_private_networks is true in `entitle dev`: say false.
        strict = endpoint_file(endpoint, "allow_private_networks: false")
        parse_config(strict, {"CRM": WEBHOOK_SECRET})


def test_private_addresses_and_http_in_the_file_follow_the_outbound_settings() -> None:
    env = {"CRM": WEBHOOK_SECRET}
    private = endpoint_file('url: "https://10.0.0.7/x"', "allow_private_networks: true")
    assert parse_config(private, env).outbound.endpoints[0].url == "https://10.0.0.7/x"
    loopback = 'url: "http://127.0.0.1:9/x"'
    refused = endpoint_file(loopback, "allow_http: false", "allow_private_networks: true")
    with pytest.raises(ConfigError, match="must be https"):
        parse_config(refused, env)
    with pytest.raises(ConfigError, match="boolean"):
        parse_config(endpoint_file(loopback, 'allow_private_networks: "yes"'), env)


def test_http_to_loopback_declared_in_the_file_is_refused_at_start_unless_allowed(
    tmp_path: Path,
) -> None:
    from services.app import Roles, build_app
    from services.config import Settings

    text = endpoint_file('url: "http://127.0.0.1:9/x"', "allow_private_networks: true")
    config = parse_config(text, {"CRM": WEBHOOK_SECRET})  # allow_http unset: known at start

    def start(dev: bool) -> object:
        settings = Settings(
            kafka_bootstrap=None,
            database_url=f"sqlite:///{tmp_path}/e.db",
            kafka_idempotence=False,
            raw_partitions=1,
            code_secret="x" * 32,
            dev=dev,
        )
        return build_app(config, settings, Roles(api=True), admin_keys("ops:ek_test_admin_key"))

    with pytest.raises(ValueError, match="outbound endpoint 'crm': the URL must be https"):
        start(dev=False)
    assert start(dev=True) is not None


def test_every_flag_in_the_file_is_a_boolean() -> None:
    for text in (
        "sources: {s: {provider: stripe, secret: x, allow_unsigned: 1}}",
        "offerings: [{sku: a, product: p, floating: 'yes'}]",
        "outbound: {allow_http: 'true'}",
    ):
        with pytest.raises(ConfigError, match="boolean"):
            parse_config(text, {})


def test_no_source_may_be_named_like_manual_grants() -> None:
    with pytest.raises(ConfigError, match="'manual' is taken by manual grants"):
        parse_config("sources:\n  manual: {provider: stripe, secret: whsec_x}\n", {})


def test_every_option_says_what_it_is_and_its_default() -> None:
    import argparse

    from services.cli import parser

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [p]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    found += parsers(child)
        return found

    missing = []
    for p in parsers(parser()):
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            shown = formatter._get_help_string(action)  # type: ignore[attr-defined]
            if not action.help:
                missing.append(f"{p.prog} {action.option_strings[0]}: no help")
            elif action.default not in (None, False) and "default" not in shown:
                missing.append(f"{p.prog} {action.option_strings[0]}: no default shown")
    assert not missing, missing
    assert "ENTITLE_RAW_PARTITIONS" in parser().format_help()  # the environment, with defaults
