"""Prometheus metrics (`GET /metrics`, the text exposition format).

Counters and the validation histogram live in prometheus-client's default
registry and are counted where things happen (ingress, fold, validation,
outbound). Levels that are facts of the store or the broker (consumer lag,
projector lag, parked webhooks, each part's health) are read when scraped,
by `Scrape`, so they are never stale and cost nothing between scrapes.
Each process serves its own; run several roles apart and scrape each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

from services.openapi import Documented, Operation

log = logging.getLogger("entitle.metrics")

WEBHOOKS_RECEIVED = Counter(
    "entitle_webhooks_received", "Webhook requests received, by configured source", ["source"]
)
WEBHOOKS_ACCEPTED = Counter(
    "entitle_webhooks_accepted", "Webhooks stored on the raw topic (answered 202)", ["source"]
)
WEBHOOKS_REJECTED = Counter(
    "entitle_webhooks_rejected",
    "Webhook requests refused, by source and the error code answered"
    " (invalid_signature, invalid_json, too_large, broker_unavailable, …)",
    ["source", "reason"],
)
FOLD_BATCHES = Counter(
    "entitle_fold_batches",
    "Consumer batches of raw webhooks: folded (committed) or failed (delivered again)",
    ["outcome"],
)
WEBHOOKS_FOLDED = Counter("entitle_webhooks_folded", "Webhooks folded into the event store")
EVENTS_FOLDED = Counter("entitle_events_folded", "Stored events the fold recorded")
DEAD_LETTERS = Counter("entitle_dead_letters", "Webhooks the fold dead-lettered")
VALIDATIONS = Counter(
    "entitle_validations",
    "POST /v1/validate answers, by their code (VALID, NOT_FOUND, SUSPENDED, …) or error",
    ["code"],
)
VALIDATION_SECONDS = Histogram(
    "entitle_validation_seconds",
    "Time to answer POST /v1/validate",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
OUTBOUND = Counter(
    "entitle_outbound_attempts",
    "Outbound delivery attempts by kind (webhook, mail, stripe) and outcome:"
    " succeeded, retrying (failed, due again) or failed (given up)",
    ["kind", "outcome"],
)
UNKNOWN_SOURCE = "(unknown)"  # a source name nobody configured: not a label value of its own


Reading = Callable[[], Awaitable[dict[tuple[str, ...], float]]]


@dataclass
class Scrape:
    """Levels read at scrape time, each a gauge with its own labels and an
    async reading (label values -> value). A reading that fails is left out
    of that scrape and logged, never a failed scrape."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    _readings: list[tuple[Gauge, Reading]] = field(default_factory=list)

    def gauge(self, name: str, documentation: str, labels: list[str], reading: Reading) -> None:
        gauge = Gauge(name, documentation, labels, registry=self.registry)
        self._readings.append((gauge, reading))

    async def read(self) -> None:
        async def one(gauge: Gauge, reading: Reading) -> None:
            gauge.clear()
            try:
                values = await asyncio.wait_for(reading(), 5.0)
            except Exception as exc:
                log.warning("metric %s not read: %r", gauge._name, exc)
                return
            for labels, value in values.items():
                (gauge.labels(*labels) if labels else gauge).set(value)

        await asyncio.gather(*(one(g, r) for g, r in self._readings))

    def route(self, more: Callable[[bytes], Awaitable[bytes]] | None = None) -> Documented:
        """`GET /metrics`; `more` adds other processes' to this one's."""

        async def metrics(_: Request) -> Response:
            await self.read()
            body = generate_latest(REGISTRY) + generate_latest(self.registry)
            if more is not None:
                body = await more(body)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        return Documented("/metrics", metrics, "GET", METRICS)


METRICS = Operation(
    "Prometheus metrics of this process",
    "meta",
    {200: "text/plain"},
    description="The Prometheus text format: webhooks received, accepted and rejected,"
    " fold batches, events folded, dead letters, parked webhooks, consumer lag per"
    " partition, projector lag, validations and their latency, outbound attempts.",
)
