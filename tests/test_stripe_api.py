"""Healing from Stripe's API, against a local fake of its endpoints (the
official SDK pointed at it): the lines a webhook leaves out of a long
invoice, and events that never reached us, sent again by a backfill."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.stripe_api import StripeAPI
from tests import stripe_events as se
from tests.fake_stripe import fake_stripe
from tests.harness import ENTITLE, Entitle, eventually
from tests.test_dev import ADMIN, AUTH, YEAR, entitlements, post
from tests.test_receipts import CONFIG, NOW, World


def renewal_in_two_pages(subscription: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An invoice.paid whose webhook carries 10 proration lines (has_more)
    and, from the API, those plus the renewal line itself."""
    full = se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR}],
        payment_intent="pi_renewal",
    )
    renewal_line = full["data"]["object"]["lines"]["data"][0]
    proration = se.prorated({**renewal_line, "id": "il_proration"})
    prorations = [{**proration, "id": f"il_proration_{n}"} for n in range(10)]
    event = json.loads(json.dumps(full))
    event["data"]["object"]["lines"] = {
        "object": "list",
        "data": prorations,
        "has_more": True,
        "url": f"/v1/invoices/{full['data']['object']['id']}/lines",
    }
    return event, [*prorations, renewal_line]


@pytest.mark.integration
def test_a_truncated_invoice_fetches_its_remaining_lines(database_url: str) -> None:
    with fake_stripe() as (fake, base):
        world = World(database_url, CONFIG, apis={"stripe-main": StripeAPI("rk_test", base)})
        try:
            event, lines = renewal_in_two_pages("sub_long")
            fake.lines[event["data"]["object"]["id"]] = lines
            # No snapshot told the period: only the fetched line can.
            world.send(event, "renewal")
            [entitlement] = world.read_model.entitlements(order_ref="sub_long")
            assert entitlement.status == "ACTIVE"
            assert int(entitlement.period_end.timestamp()) == NOW + YEAR  # type: ignore[union-attr]
            assert any("/lines" in url for url in fake.requests)
            # Stripe unreachable for that invoice (404 here): the webhook is
            # still applied as far as it goes, its payment recorded.
            other, _ = renewal_in_two_pages("sub_unknown_to_api")
            world.send(other, "other")
            assert world.receipts()["other"].outcome in ("applied", "parked")
        finally:
            world.close()


@pytest.mark.integration
def test_two_updates_in_one_second_that_payloads_cannot_order_fetch_the_subscription(
    database_url: str,
) -> None:
    with fake_stripe() as (fake, base):
        world = World(database_url, CONFIG, apis={"stripe-main": StripeAPI("rk_test", base)})
        try:
            world.send(paid("sub_tie"), "paid")

            def update(cancel: bool) -> dict[str, Any]:
                return se.subscription_event(
                    "customer.subscription.updated",
                    subscription="sub_tie",
                    items=[{"price": "p", "sku": "better_annual"}],
                    start=NOW,
                    end=NOW + YEAR,
                    cancel_at_period_end=cancel,
                    shape=se.LEGACY,
                    created=NOW + 100,
                )

            # Scheduled and unscheduled in one second, no previous_attributes:
            # by content the scheduled one would win. Stripe says it is not.
            fake.subscriptions["sub_tie"] = update(False)["data"]["object"]
            world.now = datetime.fromtimestamp(NOW + 200, UTC)  # received after both
            world.send(update(True), "scheduled")
            world.send(update(False), "unscheduled")
            [entitlement] = world.read_model.entitlements(order_ref="sub_tie")
            assert entitlement.cancel_at is None
            assert any("/v1/subscriptions/sub_tie" in url for url in fake.requests)
        finally:
            world.close()


STRIPE_KEYED = """
sources:
  stripe-main: {{provider: stripe, secret: {secret}, api_key_env: STRIPE_API_KEY{every}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3}}
"""


def paid(subscription: str, created: int | None = None) -> dict[str, Any]:
    return se.invoice_paid(
        subscription=subscription,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": NOW, "end": NOW + YEAR}],
        created=created,
    )


def keyed_stack(tmp_path: Path, base: str, every: str = "") -> Entitle:
    config = STRIPE_KEYED.format(
        secret=se.SECRET, every=f", backfill_every: {every}" if every else ""
    )
    (tmp_path / "entitle.yaml").write_text(config)
    env = {
        "ENTITLE_ADMIN_KEYS": ADMIN,
        "STRIPE_API_KEY": "rk_test_backfill",
        "ENTITLE_STRIPE_API_BASE": base,
    }
    return Entitle(["dev"], tmp_path, env)


def receipts(entitle: Entitle) -> list[dict[str, Any]]:
    answer = httpx.get(f"{entitle.url}/v1/webhooks", params={"limit": "1000"}, headers=AUTH)
    return list(answer.json()["items"])


@pytest.mark.e2e
def test_backfill_sends_the_events_that_never_reached_us(tmp_path: Path) -> None:
    with fake_stripe() as (fake, base), keyed_stack(tmp_path, base) as entitle:
        delivered = paid("sub_delivered")
        missed = [paid("sub_missed_1"), paid("sub_missed_2")]
        fake.events += [delivered, *missed]
        assert post(entitle, delivered).status_code == 202
        eventually(lambda: len(receipts(entitle)) == 1)

        def run(**env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [ENTITLE, "stripe", "backfill", "--source", "stripe-main", "--since", "72h"],
                cwd=tmp_path,
                env={**entitle.env, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )

        def backfill() -> dict[str, Any]:
            done = run()
            assert done.returncode == 0, done.stderr
            # No bar when stderr is no terminal: the summary line only.
            assert "backfill stripe-main" not in done.stderr, done.stderr
            return dict(json.loads(done.stdout.splitlines()[-1]))

        assert backfill() | {"since": None} == {
            "source": "stripe-main",
            "since": None,
            "listed": 3,
            "sent": 2,
        }
        refs = {"sub_delivered", "sub_missed_1", "sub_missed_2"}
        eventually(lambda: {e["order_ref"] for e in entitlements(entitle)} == refs)
        via = {r["provider_event_id"]: r["via"] for r in receipts(entitle)}
        assert via == {
            delivered["id"]: "webhook",
            missed[0]["id"]: "backfill",
            missed[1]["id"]: "backfill",
        }
        assert fake.api_keys == {"Bearer rk_test_backfill"}
        # Again: nothing is missing now.
        assert backfill()["sent"] == 0
        assert "rk_test_backfill" not in entitle.text  # the key is never logged
        # A key Stripe refuses: one line saying so, no traceback.
        fake.valid_keys = {"rk_test_backfill"}
        refused = run(STRIPE_API_KEY="rk_test_wrong")
        assert refused.returncode == 2
        assert "Stripe answered" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.e2e
def test_a_periodic_backfill_closes_gaps_by_itself(tmp_path: Path) -> None:
    with fake_stripe() as (fake, base), keyed_stack(tmp_path, base, every="1s") as entitle:
        # The backfill looks two intervals back from each run: the event is
        # made once the domain process (which runs it) is ready.
        eventually(lambda: httpx.get(f"{entitle.url}/readyz").status_code == 200, 30)
        fake.events.append(paid("sub_never_delivered"))
        [item] = eventually(lambda: entitlements(entitle, order_ref="sub_never_delivered"), 20)
        assert item["status"] == "ACTIVE"
        [receipt] = receipts(entitle)
        assert (receipt["via"], receipt["outcome"]) == ("backfill", "applied")


def test_a_bad_backfill_setting_is_a_clear_config_error(tmp_path: Path) -> None:
    from services.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="backfill_every needs an api_key"):
        parse_config(
            f"sources: {{s: {{provider: stripe, secret: {se.SECRET}, backfill_every: 15m}}}}"
        )
    with pytest.raises(ConfigError, match="backfill_every"):
        parse_config(
            f"sources: {{s: {{provider: stripe, secret: {se.SECRET}, api_key: k,"
            " backfill_every: soon}}"
        )
    with pytest.raises(ConfigError, match="stripe sources only"):
        parse_config("sources: {p: {provider: paddle, secret: x, api_key: k}}")
