"""`GET /metrics` of a running `entitle dev`, scraped and parsed as
Prometheus would: each counter moves by what the test did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, CONFIG, YEAR, entitlements, post

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Entitle]:
    workdir = tmp_path_factory.mktemp("metrics")
    (workdir / "entitle.yaml").write_text(CONFIG)
    with Entitle(["dev"], Path(workdir), {"ENTITLE_ADMIN_KEYS": ADMIN}) as entitle:
        yield entitle


def scrape(stack: Entitle) -> Samples:
    answer = httpx.get(f"{stack.url}/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happened(stack: Entitle) -> None:
    before = scrape(stack)
    now = int(time.time())
    paid = se.invoice_paid(
        subscription="sub_metrics",
        shape=se.BASIL,
        lines=[{"price": "price_basic", "start": now, "end": now + YEAR}],
    )
    unmapped = se.invoice_paid(
        subscription="sub_metrics_dl",
        shape=se.BASIL,
        lines=[{"price": "price_unknown", "start": now, "end": now + YEAR}],
    )
    assert post(stack, paid).status_code == 202
    assert post(stack, unmapped).status_code == 202
    assert post(stack, paid, secret="whsec_wrong").status_code == 401
    assert httpx.post(f"{stack.url}/webhooks/nobody", content=b"{}").status_code == 404
    [item] = eventually(lambda: entitlements(stack, order_ref="sub_metrics"), timeout=10)
    for code in (item["activation_code"], "NOPE-NOPE"):
        httpx.post(f"{stack.url}/v1/validate", json={"activation_code": code})

    def settled() -> Samples | None:
        after = scrape(stack)
        moved = value(after, "entitle_dead_letters_total") > value(
            before, "entitle_dead_letters_total"
        )
        return after if moved else None

    after = eventually(settled, timeout=10)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("entitle_webhooks_received_total", source="stripe-main") == 3
    assert delta("entitle_webhooks_accepted_total", source="stripe-main") == 2
    assert (
        delta("entitle_webhooks_rejected_total", source="stripe-main", reason="invalid_signature")
        == 1
    )
    # A source nobody configured is one label value, whatever the path said.
    assert (
        delta("entitle_webhooks_rejected_total", source="(unknown)", reason="unknown_source") == 1
    )
    assert delta("entitle_webhooks_folded_total") == 2
    assert delta("entitle_events_folded_total") >= 2  # created, activated, receipts
    assert delta("entitle_fold_batches_total", outcome="folded") >= 1
    assert delta("entitle_dead_letters_total") == 1
    assert delta("entitle_validations_total", code="VALID") == 1
    assert delta("entitle_validations_total", code="NOT_FOUND") == 1
    assert delta("entitle_validation_seconds_count") == 2
    assert ("entitle_parked_webhooks", ()) in after

    # Levels read when scraped: the fold and the projections catch up.
    def caught_up() -> Samples | None:
        now = scrape(stack)
        lags = {k: v for k, v in now.items() if k[0] == "entitle_consumer_lag"}
        behind = {k: v for k, v in now.items() if k[0] == "entitle_projector_lag"}
        if lags and behind and not any(lags.values()) and not any(behind.values()):
            return now
        return None

    levels = eventually(caught_up, timeout=15)
    assert len([k for k in levels if k[0] == "entitle_consumer_lag"]) >= 1
    projections = {dict(k[1])["projection"] for k in levels if k[0] == "entitle_projector_lag"}
    assert {"read-model", "public-events"} <= {p.split("-v")[0] for p in projections}, projections
    parts = {dict(k[1])["part"]: v for k, v in levels.items() if k[0] == "entitle_part_up"}
    assert parts.get("fold") == 1.0 and all(parts.values()), parts
    # The validation index holds the one code issued, once loaded.
    assert levels[("entitle_validation_index_loaded", ())] == 1.0
    assert levels[("entitle_validation_index_codes", ())] >= 1
