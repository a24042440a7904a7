"""The admin API of outbound notifications: webhook endpoints (each change
an event of `domain.endpoint.Endpoint`, so audited), their deliveries with
every attempt, resending and recovering, and the mails sent to buyers."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts.outbound import (
    AttemptView,
    DeliveryList,
    DeliveryView,
    EndpointCreate,
    EndpointList,
    EndpointPatch,
    EndpointView,
    PingV1,
    Recover,
    Resent,
)
from domain.endpoint import CHANGEABLE, Endpoint
from services.api import API, _limit, _no_control_characters, _only
from services.http import HTTPError, busy, read_json
from services.outbound.outbox import Job, JobRecord, Outbox
from services.outbound.rules import events_problem, url_problem
from services.outbound.webhooks import KIND, EndpointInfo, Endpoints, Resolver
from services.outbound.webhooks import endpoint_secret as derive_secret
from services.projections import history_entry
from services.store import StillChanging

STATUSES = ("pending", "succeeded", "failed")
KINDS = ("webhook", "mail", "stripe")


def _endpoint_id(request: Request) -> uuid.UUID:
    raw = request.path_params["id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise HTTPError(422, "invalid_id", f"{raw!r} is not an endpoint id (a UUID)") from None


def _cursor(raw: str | None) -> tuple[int, str] | None:
    if raw is None:
        return None
    try:
        seq, job = json.loads(base64.urlsafe_b64decode(raw.encode()))
        if isinstance(seq, int) and isinstance(job, str):
            return seq, job
    except (ValueError, TypeError):
        pass
    raise HTTPError(422, "invalid_query", "cursor is not one this API gave (next_cursor)")


def delivery_view(record: JobRecord) -> DeliveryView:
    return DeliveryView(
        id=record.job.id,
        endpoint_id=record.job.channel,
        message_id=record.job.message_id,
        type=record.job.type,
        status=record.status,
        attempts=[
            AttemptView(
                n=a.n,
                at=a.at,
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                answer=a.answer,
                error=a.error,
            )
            for a in record.attempts
        ],
        next_attempt_at=record.next_at,
        created_at=record.job.created_at,
    )


class OutboundAPI:
    def __init__(
        self,
        admin: API,
        outbox: Outbox,
        endpoints: Endpoints,
        server_secret: str,
        allow_http: bool,
        allow_private: bool,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.admin = admin
        self.store = admin.store
        self.outbox = outbox
        self.endpoints = endpoints
        self.server_secret = server_secret
        self.allow_http = allow_http
        self.resolver = Resolver(allow_private)
        self.clock = clock

    # -- endpoints -----------------------------------------------------------

    async def _check_url(self, url: str) -> None:
        problem = url_problem(url, self.allow_http)
        if problem is None:
            problem = await self.resolver.problem(urlsplit(url).hostname or "")
            # A name that does not resolve yet may later; where it resolves
            # is checked again before every attempt.
            if problem is not None and "does not resolve" in problem:
                problem = None
        if problem is not None:
            raise HTTPError(422, "invalid_url", problem)

    def _view(self, endpoint: EndpointInfo, secret: bool = False) -> EndpointView:
        declared = endpoint.id in self.endpoints.configured
        return EndpointView(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            description=endpoint.description,
            include_codes=endpoint.include_codes,
            ordered=endpoint.ordered,
            disabled=endpoint.disabled,
            disabled_reason=endpoint.disabled_reason,
            declared_in_config=declared,
            created_at=endpoint.created_at,
            secret_rotated_at=endpoint.rotated_at,
            secret=derive_secret(self.server_secret, endpoint.id, endpoint.generation)
            if secret and not declared
            else None,
            deliveries=self.outbox.counts(str(endpoint.id)),
        )

    def _stored(self, endpoint_id: uuid.UUID) -> Endpoint | None:
        try:
            found = self.store.find(endpoint_id, Endpoint)
        except TypeError:
            return None
        return None if found is None or found.deleted else found

    def _declared(self, endpoint_id: uuid.UUID) -> None:
        if endpoint_id in self.endpoints.configured:
            raise HTTPError(
                409,
                "declared_in_config",
                "this endpoint is declared in the configuration file; change it there",
            )

    async def create(self, request: Request) -> JSONResponse:
        key = self.admin.authenticate(request)
        body = await read_json(request, EndpointCreate)
        await self._check_url(body.url)
        _check_events(body.events)
        endpoint = Endpoint.register(
            uuid.uuid4(),
            url=body.url,
            events=body.events or [],
            description=body.description,
            include_codes=body.include_codes,
            ordered=body.ordered,
            by=key.name,
            at=self.clock(),
        )
        await anyio.to_thread.run_sync(self.store.record, [endpoint], None)
        view = await anyio.to_thread.run_sync(self._view, EndpointInfo.of(endpoint), True)
        return JSONResponse(view.model_dump(mode="json"), status_code=201)

    async def list(self, request: Request) -> JSONResponse:
        self.admin.authenticate(request)
        _only(request, set())
        found = await anyio.to_thread.run_sync(self.endpoints.load)

        def views() -> list[EndpointView]:
            return [self._view(e) for e in found.values() if not e.deleted]

        items = await anyio.to_thread.run_sync(views)
        return JSONResponse(EndpointList(items=items).model_dump(mode="json"))

    async def _info(self, endpoint_id: uuid.UUID) -> EndpointInfo:
        declared = self.endpoints.configured.get(endpoint_id)
        if declared is not None:
            return declared
        stored = await anyio.to_thread.run_sync(self._stored, endpoint_id)
        if stored is None:
            raise HTTPError(404, "not_found", f"no webhook endpoint {endpoint_id}")
        return EndpointInfo.of(stored)

    async def get(self, request: Request) -> JSONResponse:
        self.admin.authenticate(request)
        info = await self._info(_endpoint_id(request))
        view = await anyio.to_thread.run_sync(self._view, info)
        return JSONResponse(view.model_dump(mode="json"))

    async def _change(self, endpoint_id: uuid.UUID, change: Callable[[Endpoint], None]) -> Endpoint:
        self._declared(endpoint_id)

        def apply(endpoint: Endpoint) -> None:
            if endpoint.deleted:
                raise HTTPError(404, "not_found", f"no webhook endpoint {endpoint_id}")
            change(endpoint)

        try:
            found = await anyio.to_thread.run_sync(
                lambda: self.store.update(endpoint_id, Endpoint, apply)
            )
        except StillChanging:
            raise busy("the endpoint") from None
        if found is None:
            raise HTTPError(404, "not_found", f"no webhook endpoint {endpoint_id}")
        return found

    async def patch(self, request: Request) -> JSONResponse:
        key = self.admin.authenticate(request)
        endpoint_id = _endpoint_id(request)
        body = await read_json(request, EndpointPatch)
        given = body.model_dump(exclude_unset=True)
        if given.get("url") is not None:
            await self._check_url(given["url"])
        if "events" in given:
            _check_events(given["events"])
            given["events"] = given["events"] or []
        for name in ("url", "include_codes", "ordered", "disabled"):
            if name in given and given[name] is None:
                raise HTTPError(422, "invalid_body", f"{name} cannot be null")
        at = self.clock()

        def change(endpoint: Endpoint) -> None:
            changes = {k: v for k, v in given.items() if k in CHANGEABLE}
            if changes:
                endpoint.change(changes, key.name, at)
            if given.get("disabled") is True:
                endpoint.disable(f"disabled by {key.name}", key.name, at)
            elif given.get("disabled") is False:
                endpoint.enable(key.name, at)

        endpoint = await self._change(endpoint_id, change)
        view = await anyio.to_thread.run_sync(self._view, EndpointInfo.of(endpoint))
        return JSONResponse(view.model_dump(mode="json"))

    async def delete(self, request: Request) -> Response:
        key = self.admin.authenticate(request)
        endpoint_id = _endpoint_id(request)
        at = self.clock()
        await self._change(endpoint_id, lambda e: e.delete(key.name, at))
        return Response(status_code=204)

    async def rotate(self, request: Request) -> JSONResponse:
        """A new secret, shown once; the old one keeps signing beside it for 24 h."""
        key = self.admin.authenticate(request)
        endpoint_id = _endpoint_id(request)
        at = self.clock()
        endpoint = await self._change(endpoint_id, lambda e: e.rotate_secret(key.name, at))
        view = await anyio.to_thread.run_sync(self._view, EndpointInfo.of(endpoint), True)
        return JSONResponse(view.model_dump(mode="json"))

    async def test(self, request: Request) -> JSONResponse:
        """Send a `ping` now (202 with the delivery to follow)."""
        self.admin.authenticate(request)
        info = await self._info(_endpoint_id(request))
        message_id = f"ping_{uuid.uuid4().hex}"
        at = self.clock()
        job = Job.of(
            str(info.id),
            KIND,
            message_id,
            "ping",
            message_id,
            0,
            {
                "type": "ping",
                "timestamp": at.isoformat(),
                "data": PingV1(endpoint_id=info.id).model_dump(mode="json"),
            },
            ordered=False,
        )
        await anyio.to_thread.run_sync(self.outbox.add, [job])
        return JSONResponse({"delivery_id": job.id, "message_id": message_id}, status_code=202)

    async def history(self, request: Request) -> JSONResponse:
        """The endpoint's audit trail: every change, who made it and when."""
        self.admin.authenticate(request)
        endpoint_id = _endpoint_id(request)
        self._declared(endpoint_id)
        if await anyio.to_thread.run_sync(self._stored, endpoint_id) is None:
            raise HTTPError(404, "not_found", f"no webhook endpoint {endpoint_id}")
        events = await anyio.to_thread.run_sync(self.store.history, endpoint_id)
        entries = [history_entry(event).model_dump(mode="json") for event in events]
        return JSONResponse({"endpoint_id": str(endpoint_id), "events": entries})

    # -- deliveries ------------------------------------------------------------

    async def deliveries(self, request: Request) -> JSONResponse:
        """The endpoint's deliveries, oldest first, each with every attempt."""
        self.admin.authenticate(request)
        _no_control_characters(request)
        _only(request, {"status", "cursor", "limit"})
        info = await self._info(_endpoint_id(request))
        return await self._list(request, channel=str(info.id), kind=KIND)

    async def _list(self, request: Request, **filters: str) -> JSONResponse:
        status = request.query_params.get("status")
        if status is not None and status not in STATUSES:
            raise HTTPError(422, "invalid_query", f"status must be one of {', '.join(STATUSES)}")
        after = _cursor(request.query_params.get("cursor"))
        limit = _limit(request)
        records = await anyio.to_thread.run_sync(
            lambda: self.outbox.jobs(status=status, after=after, limit=limit, **filters)
        )
        cursor = None
        if len(records) == limit:
            last = records[-1].job
            cursor = base64.urlsafe_b64encode(json.dumps([last.seq, last.id]).encode()).decode()
        body = DeliveryList(items=[delivery_view(r) for r in records], next_cursor=cursor)
        return JSONResponse(body.model_dump(mode="json"))

    async def resend(self, request: Request) -> JSONResponse:
        self.admin.authenticate(request)
        _no_control_characters(request)
        job_id = request.path_params["id"]
        record = await anyio.to_thread.run_sync(self.outbox.job, job_id)
        if record is None:
            raise HTTPError(404, "not_found", f"no delivery {job_id!r}")
        count = await anyio.to_thread.run_sync(self.outbox.resend, [job_id])
        return JSONResponse(Resent(resent=count).model_dump(), status_code=202)

    async def recover(self, request: Request) -> JSONResponse:
        """Send again every delivery to the endpoint that failed since `since`."""
        self.admin.authenticate(request)
        info = await self._info(_endpoint_id(request))
        body = await read_json(request, Recover)
        if body.since.tzinfo is None:
            raise HTTPError(422, "invalid_body", "since must be a time with an offset")

        def run() -> int:
            return self.outbox.resend(self.outbox.failed_since(str(info.id), body.since))

        count = await anyio.to_thread.run_sync(run)
        return JSONResponse(Resent(resent=count).model_dump(), status_code=202)

    async def outbox_jobs(self, request: Request) -> JSONResponse:
        """Every outbound job of a kind (webhook, mail, stripe), oldest first."""
        self.admin.authenticate(request)
        _no_control_characters(request)
        _only(request, {"kind", "status", "cursor", "limit"})
        kind = request.query_params.get("kind")
        if kind not in KINDS:
            raise HTTPError(422, "invalid_query", f"kind must be one of {', '.join(KINDS)}")
        return await self._list(request, kind=kind)

    async def mails(self, request: Request) -> JSONResponse:
        """Mails to buyers, oldest first, with every attempt."""
        self.admin.authenticate(request)
        _no_control_characters(request)
        _only(request, {"status", "cursor", "limit"})
        return await self._list(request, kind="mail")


def _check_events(events: list[str] | None) -> None:
    problem = events_problem(events)
    if problem is not None:
        raise HTTPError(422, "invalid_body", problem)


def routes(api: OutboundAPI) -> list[Route]:
    base = "/v1/webhook-endpoints"
    return [
        Route(base, api.create, methods=["POST"]),
        Route(base, api.list, methods=["GET"]),
        Route(base + "/{id}", api.get, methods=["GET"]),
        Route(base + "/{id}", api.patch, methods=["PATCH"]),
        Route(base + "/{id}", api.delete, methods=["DELETE"]),
        Route(base + "/{id}/rotate-secret", api.rotate, methods=["POST"]),
        Route(base + "/{id}/test", api.test, methods=["POST"]),
        Route(base + "/{id}/deliveries", api.deliveries, methods=["GET"]),
        Route(base + "/{id}/history", api.history, methods=["GET"]),
        Route(base + "/{id}/recover", api.recover, methods=["POST"]),
        Route("/v1/deliveries/{id}/resend", api.resend, methods=["POST"]),
        Route("/v1/mails", api.mails, methods=["GET"]),
        Route("/v1/outbox", api.outbox_jobs, methods=["GET"]),
    ]
