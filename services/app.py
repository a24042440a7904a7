"""The composition root: one place that wires domain, store, broker and HTTP
into a process with the roles it was asked to run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

import anyio
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from contracts.api import Liveness, Readiness
from contracts.webhooks import RAW_TOPIC
from domain.endpoint import Endpoint
from domain.entitlement import NAMESPACE
from services import api, ingress, licensing, openapi, topics, ui
from services.codes import CodeBook
from services.config import AdminKey, Config, Settings, Source
from services.fold import CONSUMER_GROUP, DomainService, RawLog, Scheduler, subscribe
from services.health import Health, describe, sleep_unless, supervise
from services.http import (
    HTTPError,
    Shortcut,
    handle_http_error,
    handle_internal_error,
    handle_starlette_error,
)
from services.kafka import (
    NoTopicIds,
    ensure_topics,
    evict_predecessor,
    instance_client_id,
    make_broker,
    make_producer,
    topic_id,
)
from services.metrics import Scrape
from services.openapi import Documented, Operation
from services.outbound.mail import CHANNEL as MAIL_CHANNEL
from services.outbound.mail import Mailer, mail_settings
from services.outbound.outbox import RETRY_SCHEDULE, Dispatcher, Lease, Outbox, Sender
from services.outbound.rules import endpoint_problem
from services.outbound.stripe_codes import StripeCodes
from services.outbound.stripe_codes import channel as stripe_channel
from services.outbound.webhooks import KIND as WEBHOOK_KIND
from services.outbound.webhooks import EndpointInfo, Endpoints, WebhookSender
from services.outbound_api import OutboundAPI
from services.outbound_api import routes as outbound_routes
from services.projections import (
    Follower,
    LogBell,
    Needs,
    Projection,
    follow,
    listen,
    projections,
)
from services.projections.read_model import READ_MODEL
from services.projections.stripe_codes import write_back_sources
from services.readmodel import ReadModel
from services.store import EntitlementStore
from services.stripe_api import StripeAPI, backfill
from services.supervisor import Peers, merge_parts

log = logging.getLogger("entitle")

ROLES = ("ingress", "domain", "projector", "api")
HEALTHZ = Operation("The process answers", "meta", {200: Liveness})
READYZ = Operation(
    "Whether every part of this process works",
    "meta",
    {200: Readiness, 503: Readiness},
    description="503 while a part is starting, failing or stopped; `parts` says which.",
)


@dataclass(frozen=True)
class Roles:
    ingress: bool = False
    domain: bool = False
    projector: bool = False
    api: bool = False

    @classmethod
    def all(cls) -> Roles:
        return cls(True, True, True, True)

    @classmethod
    def parse(cls, names: list[str]) -> Roles:
        unknown = set(names) - set(ROLES)
        if unknown:
            raise ValueError(
                f"unknown role(s) {', '.join(sorted(unknown))}; roles are {', '.join(ROLES)}"
            )
        return cls(**{name: True for name in names})

    def names(self) -> list[str]:
        return [name for name in ROLES if getattr(self, name)]


async def backfill_every(
    source: Source,
    api: StripeAPI,
    read_model: ReadModel,
    broker: KafkaBroker,
    stop: asyncio.Event,
    working: Callable[[], None],
) -> None:
    """Every `source.backfill_every`, send what Stripe has of the last two
    intervals that never reached us (an endpoint disabled, a long outage)."""
    assert source.backfill_every is not None
    every = source.backfill_every

    async def seen(ids: list[str]) -> set[str]:
        return await anyio.to_thread.run_sync(read_model.seen_events, source.name, ids)

    async def publish(value: bytes, key: bytes) -> object:
        return await broker.publish(value, RAW_TOPIC, key=key)

    while not stop.is_set():
        await backfill(source, api, datetime.now(UTC) - 2 * every, seen, publish)
        working()
        await sleep_unless(stop, every.total_seconds())


def declared_endpoints(config: Config, allow_http: bool, allow_private: bool) -> list[EndpointInfo]:
    """The webhook endpoints the configuration declares, each with a fixed
    id derived from its name; a ValueError for one the endpoint rules
    refuse now that `allow_http` and `allow_private` are known (the rest were checked as the
    file was read)."""
    outbound = config.outbound
    for e in outbound.endpoints:
        problem = endpoint_problem(e.url, e.events, allow_http, allow_private)
        if problem is not None:
            raise ValueError(f"outbound endpoint {e.name!r}: {problem}")
    return [
        EndpointInfo(
            declared_id(e.name),
            e.url,
            list(e.events),
            e.description or e.name,
            e.include_codes,
            e.ordered,
            secret=e.secret.get_secret_value(),
            declared=True,
        )
        for e in outbound.endpoints
    ]


def declared_id(name: str) -> UUID:
    """The id of the endpoint declared in the configuration as `name`."""
    return uuid5(NAMESPACE, f"endpoint\x1f{name}")


async def disable_channel(store: EntitlementStore, kind: str, channel: str, reason: str) -> None:
    """An endpoint the dispatcher gave up on is disabled, as an event."""
    if kind != WEBHOOK_KIND:
        return
    at = datetime.now(UTC)
    await anyio.to_thread.run_sync(
        lambda: store.update(UUID(channel), Endpoint, lambda e: e.disable(reason, "dispatcher", at))
    )


def _scrape(
    health: Health,
    read_model: ReadModel | None,
    raw_log: RawLog | None,
    running: list[Projection],
    recorder: Any,
    index: licensing.ValidationIndex | None = None,
    peers: Peers | None = None,
) -> BaseRoute:
    """`GET /metrics`, with the levels this process can read when scraped."""
    scrape = Scrape()

    async def parts() -> dict[tuple[str, ...], float]:
        return {(name,): float(part.state == "ok") for name, part in health.parts().items()}

    scrape.gauge(
        "entitle_part_up", "1 while a part of this process works (as /readyz)", ["part"], parts
    )
    if read_model is not None:

        async def parked() -> dict[tuple[str, ...], float]:
            return {(): float(await anyio.to_thread.run_sync(read_model.parked))}

        scrape.gauge(
            "entitle_parked_webhooks", "Webhooks parked now, waiting for what they name", [], parked
        )
    if raw_log is not None:

        async def lag() -> dict[tuple[str, ...], float]:
            return {(str(p),): float(n) for p, n in (await raw_log.lag()).items()}

        scrape.gauge(
            "entitle_consumer_lag",
            "Raw webhooks on each partition not yet folded (end offset minus committed offset)",
            ["partition"],
            lag,
        )
    if recorder is not None:

        async def behind() -> dict[tuple[str, ...], float]:
            def read() -> dict[tuple[str, ...], float]:
                head = recorder.max_notification_id() or 0
                return {(p.name,): float(max(0, head - p.position())) for p in running}

            return await anyio.to_thread.run_sync(read)

        scrape.gauge(
            "entitle_projector_lag",
            "Stored events each projection of this process has not yet projected",
            ["projection"],
            behind,
        )
    if index is not None:

        async def held() -> dict[tuple[str, ...], float]:
            return {(): float(len(index))}

        async def loaded() -> dict[tuple[str, ...], float]:
            return {(): float(index.loaded)}

        scrape.gauge(
            "entitle_validation_index_codes",
            "Activation code hashes the validation index holds in memory",
            [],
            held,
        )
        scrape.gauge(
            "entitle_validation_index_loaded",
            "1 once the validation index has caught up with the read model since start-up"
            " (before that, codes it does not hold are validated from the read model)",
            [],
            loaded,
        )
    return scrape.route(peers.metrics if peers is not None else None)


def build_app(
    config: Config,
    settings: Settings,
    roles: Roles,
    admin_keys: list[AdminKey],
    peers: Peers | None = None,
) -> ASGIApp:
    """The app of a process running `roles`; `peers`, the other processes
    of an `entitle dev` stack, whose readiness and metrics it adds to its own."""
    health = Health()
    # `entitle dev` mails (to files) even with no `notifications.email`.
    config = dataclasses.replace(config, email=mail_settings(config.email, settings.dev))
    needs_broker = roles.ingress or roles.domain or roles.projector
    if needs_broker and not settings.kafka_bootstrap:
        raise ValueError("roles ingress, domain and projector need ENTITLE_KAFKA_BOOTSTRAP")
    store = (
        EntitlementStore(settings.database_url)
        if (roles.domain or roles.projector or roles.api)
        else None
    )
    read_model = (
        ReadModel(settings.database_url) if (roles.projector or roles.api or roles.domain) else None
    )
    broker: KafkaBroker | None = None
    # Named per host (or ENTITLE_INSTANCE): a restarted domain service
    # finds what its killed predecessor left in the consumer group.
    client_id = instance_client_id("domain" if roles.domain else "service", settings.instance)
    if needs_broker:
        assert settings.kafka_bootstrap
        broker = make_broker(
            settings.kafka_bootstrap,
            settings.kafka_idempotence,
            # No linger: a webhook's 202 waits for its produce request, and
            # the client sends one request per broker at a time, so webhooks
            # arriving meanwhile share the next one anyway. A linger only
            # added its own wait to each: 32 requests in flight got 1.1k
            # webhooks/s with 20 ms, 2.5k with 5 ms, 3.2k with none
            # (bench/ingest.py --compare, this machine).
            linger_ms=0,
            client_id=client_id,
        )
    codes: CodeBook | None = None
    if roles.domain or roles.api or roles.projector:
        if not settings.code_secret:
            raise ValueError(
                "roles domain, projector and api need ENTITLE_CODE_SECRET"
                " (the same in every process)"
            )
        codes = CodeBook(settings.code_secret)
    outbound = config.outbound
    # `entitle dev` sends to the developer's own machine unless told not to.
    allow_http = outbound.allow_http if outbound.allow_http is not None else settings.dev
    allow_private = (
        outbound.allow_private_networks
        if outbound.allow_private_networks is not None
        else settings.dev
    )
    declared = declared_endpoints(config, allow_http, allow_private)
    outbox = (
        Outbox(read_model, behind=READ_MODEL)
        if read_model is not None and (roles.projector or roles.api)
        else None
    )
    endpoints: Endpoints | None = None
    if outbox is not None:
        endpoints = Endpoints(outbox, declared)
    mailer: Mailer | None = None
    if roles.projector and config.email is not None:
        assert codes is not None and outbox is not None
        if config.email.host is None and config.email.outbox_dir is None:
            raise ValueError("notifications.email needs a host (or an outbox_dir for .eml files)")
        assert read_model is not None
        reader = read_model

        def current_codes(entitlement_id: UUID) -> list[int] | None:
            view = reader.entitlement(str(entitlement_id))
            return None if view is None else [c.index for c in view.activation_codes]

        mailer = Mailer(config.email, codes, current_codes=current_codes)
    if roles.projector and outbox is not None:
        # Mail and Stripe are paused after days of nothing but failures; a
        # restart (with the settings fixed) resumes them: they have no admin
        # switch, unlike a webhook endpoint.
        with outbox.read_model.transaction() as cur:
            for channel in [MAIL_CHANNEL, *map(stripe_channel, write_back_sources(config))]:
                outbox.pause(cur, channel, False)
    scheduler: Scheduler | None = None
    raw_log: RawLog | None = None
    apis = {
        name: StripeAPI(source.api_key.get_secret_value(), settings.stripe_api_base)
        for name, source in config.sources.items()
        if source.api_key is not None
    }
    if roles.domain:
        assert store is not None and broker is not None and read_model is not None
        assert codes is not None and settings.kafka_bootstrap is not None
        service = DomainService(
            store, config, codes, cache_size=settings.aggregate_cache, apis=apis
        )
        raw_log = RawLog(settings.kafka_bootstrap, store, settings.kafka_topic_ids)
        subscribe(
            broker,
            service,
            raw_log,
            health,
            settings.domain_batch,
            session_timeout=settings.kafka_session_timeout,
        )
        scheduler = Scheduler(service, read_model)

    routes: list[BaseRoute] = []
    index: licensing.ValidationIndex | None = None
    validation: licensing.Licensing | None = None
    receiver: ingress.Ingress | None = None
    #: The ingress's producer, made in the lifespan (aiokafka needs the loop).
    raw_producers: list[AIOKafkaProducer] = []
    if roles.ingress:

        async def publish(value: bytes, key: bytes) -> object:
            return await (await raw_producers[0].send(RAW_TOPIC, value, key=key))

        receiver = ingress.Ingress(config, publish)
        routes += ingress.routes(receiver)
    if roles.api:
        assert store is not None and read_model is not None
        assert codes is not None
        signer = (
            licensing.Signer.from_secret(settings.license_key) if settings.license_key else None
        )
        index = licensing.ValidationIndex(read_model)
        admin = api.API(store, read_model, admin_keys, config, codes, index=index)
        routes += api.routes(admin)
        assert outbox is not None and endpoints is not None and settings.code_secret
        outbound_api = OutboundAPI(
            admin, outbox, endpoints, settings.code_secret, allow_http, allow_private
        )
        routes += outbound_routes(outbound_api)
        validation = licensing.Licensing(
            store,
            read_model,
            signer,
            config.license_file_ttl,
            licensing.Limits.from_config(config.rate_limits),
            config.catalog,
            index,
        )
        routes += licensing.routes(validation)
        routes += topics.routes(settings.kafka_bootstrap)
        ui_store, ui_codes = store, codes

        def redrive(ids: list[UUID]) -> tuple[int, int]:
            return DomainService(ui_store, config, ui_codes).redrive(ids)

        routes += ui.routes(
            admin,
            outbound_api,
            validation,
            settings.code_secret,
            redrive,
            settings.kafka_bootstrap,
            lambda: ui_store.process_recorder.max_notification_id() or 0,
            Mailer(config.email, codes) if config.email is not None else None,
            settings.public_url,
        )

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(Liveness(roles=roles.names()).model_dump())

    async def readyz(_: Request) -> JSONResponse:
        parts = {
            name: f"{part.state}: {part.detail}" if part.detail else part.state
            for name, part in health.parts().items()
        }
        checks: list[tuple[str, Awaitable[object]]] = []
        if settings.kafka_bootstrap is not None and broker is not None:
            checks.append(("broker", topic_id(settings.kafka_bootstrap, RAW_TOPIC, 2000)))
        if read_model is not None:
            checks.append(("database", anyio.to_thread.run_sync(read_model.ping)))
        errors: int | None = None
        for name, check in checks:
            try:
                await asyncio.wait_for(check, 3.0)
                parts[name] = "ok"
            except NoTopicIds:
                parts[name] = "ok"
            except Exception as exc:
                parts[name] = f"failing: {describe(exc) if str(exc) else 'no answer in 3 s'}"
        if read_model is not None and parts.get("database") == "ok":
            with contextlib.suppress(Exception):
                errors = await anyio.to_thread.run_sync(read_model.count_projection_errors)
        names = roles.names()
        if peers is not None:
            more, theirs = await peers.readiness()
            names = [r for r in ROLES if r in set(names) | set(more)]
            parts = merge_parts(parts, theirs)
        ready = all(state == "ok" for state in parts.values())
        body = Readiness(ready=ready, roles=names, parts=parts, projection_errors=errors)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)

    running: list[Projection] = []  # this process's projections, once started
    routes.append(
        _scrape(
            health,
            read_model,
            raw_log,
            running,
            store.process_recorder if store else None,
            index,
            peers,
        )
    )
    routes.append(Documented("/healthz", healthz, "GET", HEALTHZ))
    routes.append(Documented("/readyz", readyz, "GET", READYZ))
    shortcut = [("POST", "/v1/validate", licensing.VALIDATE)] if validation is not None else []
    routes += openapi.routes(lambda: app.routes, shortcut)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        senders: list[Sender] = []

        def keep(name: str, loop: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
            """Run `loop(working)` under `supervise`, for as long as the process."""
            working = functools.partial(health.ok, name)
            tasks.append(asyncio.create_task(supervise(name, lambda: loop(working), health, stop)))

        if broker is not None:
            assert settings.kafka_bootstrap
            await ensure_topics(
                settings.kafka_bootstrap,
                settings.raw_partitions,
                topic_ids=settings.kafka_topic_ids,
                replication=settings.topic_replication,
            )
            if roles.domain:
                await evict_predecessor(settings.kafka_bootstrap, CONSUMER_GROUP, client_id)
            await broker.start()
            if roles.ingress:
                raw_producers.append(
                    make_producer(settings.kafka_bootstrap, settings.kafka_idempotence, client_id)
                )
                await raw_producers[0].start()
        if roles.projector:
            assert store is not None and read_model is not None and broker is not None
            bell: LogBell | None = None
            if store.notify_channel is not None:
                bell = LogBell()
                channel = store.notify_channel
                keep(
                    "listener",
                    functools.partial(listen, settings.database_url, channel, bell, stop),
                )
            assert outbox is not None and endpoints is not None and settings.code_secret
            assert codes is not None
            senders += [
                WebhookSender(
                    endpoints,
                    settings.code_secret,
                    codes,
                    allow_http,
                    allow_private,
                ),
                StripeCodes({name: apis[name] for name in write_back_sources(config)}, codes),
            ]
            if mailer is not None:
                senders.append(mailer)
            dispatcher = Dispatcher(
                outbox,
                senders,
                schedule=outbound.retry_schedule or RETRY_SCHEDULE,
                on_disable=functools.partial(disable_channel, store),
                lease=Lease(read_model),
            )
            recorder = store.process_recorder
            needs = Needs(
                read_model,
                broker,
                outbox,
                config,
                declared,
                dispatcher.wake,
                head=lambda: recorder.max_notification_id() or 0,
                endpoints_changed=endpoints.invalidate,
            )
            follower = Follower(store)  # one for all: each batch decoded once
            running.extend(projections(needs))
            for projection in running:
                loop = functools.partial(
                    follow, store, projection, stop, bell=bell, follower=follower
                )
                keep(f"projection:{projection.name}", loop)
            keep("dispatcher", functools.partial(dispatcher.run, stop))
        if raw_log is not None:
            keep("raw-log", functools.partial(raw_log.watch, stop))
            assert read_model is not None and broker is not None
            for name, source in config.sources.items():
                if source.backfill_every is not None:
                    loop = functools.partial(
                        backfill_every, source, apis[name], read_model, broker, stop
                    )
                    keep(f"backfill:{name}", loop)
        if scheduler is not None:
            keep(
                "scheduler",
                functools.partial(scheduler.run, stop, interval=settings.schedule_interval),
            )
        if index is not None:
            # Loaded by its loop, not before serving: until a code is held,
            # its validation is answered from the read model (a miss), so a
            # large read model does not keep the API from answering.
            keep("index", functools.partial(index.follow, stop))
        try:
            yield
        finally:
            if raw_log is not None and (roles.ingress or settings.dev):
                # The requests are answered (in `entitle dev`, the web
                # process has stopped first); fold what they stored first.
                # What is left is lost with an embedded broker: the process
                # then exits 3 (services/cli.py), so its supervisor says so.
                app.state.unfolded = await raw_log.drain(timeout=10.0)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sender in senders:
                with contextlib.suppress(Exception):
                    await sender.aclose()  # type: ignore[attr-defined]
            for producer in raw_producers:
                await producer.stop()
            if broker is not None:
                await broker.stop()
            if read_model is not None:
                read_model.close()
            if store is not None:
                store.close()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPError: handle_http_error,
            HTTPException: handle_starlette_error,
            Exception: handle_internal_error,
        },
    )
    served: ASGIApp = app
    if receiver is not None:
        served = Shortcut(served, "POST", ingress.PREFIX, receiver.asgi, prefix=True)
    if validation is not None:
        served = Shortcut(served, "POST", "/v1/validate", validation.validate)
    return served
