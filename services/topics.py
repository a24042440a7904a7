"""The topics the engine publishes, declared as FastStream publishers: the
projector sends through them, and their declarations make the AsyncAPI
document (`GET /asyncapi.json`, and FastStream's page at `GET /asyncapi`)
that lists every topic with its payload's schema from `contracts/`."""

from __future__ import annotations

from dataclasses import dataclass

from faststream.kafka import KafkaBroker
from faststream.kafka.publisher.usecase import DefaultPublisher
from faststream.specification import AsyncAPI, get_asyncapi_html
from faststream.specification.base import Specification
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from contracts.events import EVENTS_TOPIC, EntitlementEventV1
from contracts.state import STATE_TOPIC, EntitlementStateV1
from contracts.webhooks import DEAD_LETTER_TOPIC, RAW_TOPIC, DeadLetterV1, RawWebhookV1
from services import version
from services.openapi import Documented, Operation


@dataclass(frozen=True)
class Publishers:
    raw: DefaultPublisher
    events: DefaultPublisher
    state: DefaultPublisher
    dead_letters: DefaultPublisher


def declare(broker: KafkaBroker) -> Publishers:
    """The engine's publishers on `broker` (before or after it started)."""
    return Publishers(
        raw=broker.publisher(
            RAW_TOPIC,
            title=RAW_TOPIC,
            schema=RawWebhookV1,
            description="Every webhook the ingress accepted, as received (after its signature"
            " was verified), keyed by the provider's subscription or order id. Internal: the"
            " domain service consumes it. On brokers without topic ids, partition 0 begins"
            " with one RawLogMarkerV1 record naming the log.",
        ),
        events=broker.publisher(
            EVENTS_TOPIC,
            title=EVENTS_TOPIC,
            schema=EntitlementEventV1,
            description="Every change of an entitlement, keyed by entitlement id, in order per"
            " entitlement (`sequence`). At least once: deduplicate on `event_id`, which"
            " `entitle publish` keeps when it sends events again.",
        ),
        state=broker.publisher(
            STATE_TOPIC,
            title=STATE_TOPIC,
            schema=EntitlementStateV1,
            description="Compacted (cleanup.policy=compact), keyed by entitlement id: each"
            " entitlement's current state, sent with the events of every change. Read it from"
            " the start for every entitlement, then follow the events, ignoring those whose"
            " `sequence` is not above the state's. Never a tombstone.",
        ),
        dead_letters=broker.publisher(
            DEAD_LETTER_TOPIC,
            title=DEAD_LETTER_TOPIC,
            schema=DeadLetterV1,
            description="Webhooks that could not be mapped onto the catalog, with the reason,"
            " keyed by routing key; `entitle redrive` folds them after the catalog is fixed.",
        ),
    )


def asyncapi(bootstrap: str | None) -> Specification:
    """The AsyncAPI 3.0 document of the topics; its server is `bootstrap`
    when known (a broker only described, never connected)."""
    broker = KafkaBroker(
        bootstrap or "localhost:9092",
        description="Apache Kafka (or the embedded broker of `entitle dev`)",
    )
    declare(broker)
    return AsyncAPI(
        broker,
        title="entitle",
        version=version(),
        description="The Kafka topics of the entitle entitlement engine. Payloads are JSON"
        " (content-type application/json); their schemas are also in contracts/schemas/.",
    ).to_specification()


def routes(bootstrap: str | None) -> list[Route]:
    """`GET /asyncapi.json` (the document) and `GET /asyncapi` (FastStream's
    page for it, which loads its script and styles from a CDN)."""
    document = asyncapi(bootstrap)
    body = document.to_json().encode()
    page = get_asyncapi_html(document, try_it_out_path=None)

    async def as_json(_: Request) -> Response:
        return Response(body, media_type="application/json")

    async def as_page(_: Request) -> Response:
        return HTMLResponse(page)

    return [
        Documented(
            "/asyncapi.json",
            as_json,
            "GET",
            Operation(
                "The AsyncAPI document of the Kafka topics", "meta", {200: "application/json"}
            ),
        ),
        Documented(
            "/asyncapi",
            as_page,
            "GET",
            Operation("FastStream's page for the AsyncAPI document", "meta", {200: "text/html"}),
        ),
    ]
