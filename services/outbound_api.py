"""The admin API of outbound notifications: webhook endpoints (each change
an event of `domain.endpoint.Endpoint`, so audited), their deliveries with
every attempt, resending and recovering, and the mails sent to buyers."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
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
    EndpointHistory,
    EndpointList,
    EndpointPatch,
    EndpointView,
    PingV1,
    Recover,
    Resent,
    TestSent,
)
from domain.endpoint import CHANGEABLE, Endpoint
from services.api import API, _limit, _no_control_characters, _only
from services.http import HTTPError, busy, decode_cursor, encode_cursor, read_json
from services.openapi import CURSOR, LIMIT, Answer, Documented, Operation, Query
from services.outbound.outbox import Job, JobRecord, Outbox
from services.outbound.rules import events_problem, url_problem
from services.outbound.webhooks import KIND, EndpointInfo, Endpoints, Resolver
from services.outbound.webhooks import endpoint_secret as derive_secret
from services.projections import history_entry
from services.projections.webhooks import WEBHOOKS
from services.store import StillChanging

STATUSES = ("pending", "succeeded", "failed")
KINDS = ("webhook", "mail", "stripe")
#: Most seconds a rotation waits for the webhooks projection to take it.
ROTATION_WAIT = 5.0


def _endpoint_id(request: Request) -> uuid.UUID:
    raw = request.path_params["id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise HTTPError(422, "invalid_id", f"{raw!r} is not an endpoint id (a UUID)") from None


def _cursor(raw: str | None) -> tuple[int, str] | None:
    parts = decode_cursor(raw, "position", "id")
    return None if parts is None else (parts[0], parts[1])


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
        last_error=record.last_error,
    )


def _paused_reason(paused: tuple[datetime | None, int | None, str | None]) -> str:
    since, status_code, _ = paused
    if status_code == 410:
        why = "the receiver answered 410 (gone)"
    elif since is not None:
        why = f"every attempt failed since {since.isoformat()}"
    else:
        why = "its attempts kept failing"
    return f"paused by the dispatcher: {why}"


def endpoint_state(endpoint: EndpointInfo, outbox: Outbox) -> tuple[bool, str | None]:
    """Whether the endpoint is disabled, and why. A declared endpoint has
    no events: it is disabled while the dispatcher has its channel paused
    (a 410, days of failures), until a restart with the file fixed."""
    if not endpoint.declared:
        return endpoint.disabled, endpoint.disabled_reason
    paused = outbox.paused(str(endpoint.id))
    if paused is None:
        return False, None
    return True, (
        f"{_paused_reason(paused)}; it is declared in the configuration file:"
        " fix it there and restart entitle to resume"
    )


def endpoint_view(
    endpoint: EndpointInfo, outbox: Outbox, secret: str | None = None
) -> EndpointView:
    """The endpoint as the API and `entitle outbound endpoints` show it;
    `secret` only on creation and rotation."""
    disabled, reason = endpoint_state(endpoint, outbox)
    return EndpointView(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        description=endpoint.description,
        include_codes=endpoint.include_codes,
        ordered=endpoint.ordered,
        disabled=disabled,
        disabled_reason=reason,
        declared_in_config=endpoint.declared,
        created_at=endpoint.created_at,
        secret_rotated_at=endpoint.rotated_at,
        secret=secret,
        deliveries=outbox.counts(str(endpoint.id)),
    )


def unsendable(endpoint: EndpointInfo | None, outbox: Outbox) -> tuple[str, str] | None:
    """(error code, why) if nothing queued for `endpoint` would be sent now
    (deleted or disabled), or None."""
    if endpoint is None or endpoint.deleted:
        return "endpoint_deleted", "the endpoint was deleted"
    disabled, reason = endpoint_state(endpoint, outbox)
    if not disabled:
        return None
    how = "" if endpoint.declared else '; enable it first with PATCH {"disabled": false}'
    return "endpoint_disabled", f"the endpoint is disabled ({reason}){how}"


def unsendable_job(
    record: JobRecord, outbox: Outbox, endpoint: EndpointInfo | None
) -> tuple[str, str] | None:
    """(error code, why) if sending the job again would do nothing now: its
    endpoint (`endpoint`, for a webhook) deleted or disabled, its channel
    (mail, Stripe) paused."""
    if record.job.kind == KIND:
        return unsendable(endpoint, outbox)
    paused = outbox.paused(record.job.channel)
    if paused is None:
        return None
    return "channel_paused", (
        f"{record.job.channel} is {_paused_reason(paused)};"
        " fix its settings and restart entitle to resume"
    )


def job_endpoint(record: JobRecord) -> uuid.UUID | None:
    """The id of the endpoint a webhook job goes to."""
    if record.job.kind != KIND:
        return None
    try:
        return uuid.UUID(record.job.channel)
    except ValueError:
        return None


def recover(outbox: Outbox, channel: str, since: datetime) -> int:
    """Send the channel's jobs made since `since` again, now: the failed ones
    with a fresh schedule, those still retrying at once (keeping their
    attempts); returns how many."""
    return outbox.send_again(*outbox.unsuccessful_since(channel, since))


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
        shown = None
        if secret and not endpoint.declared:
            shown = derive_secret(self.server_secret, endpoint.id, endpoint.generation)
        return endpoint_view(endpoint, self.outbox, shown)

    def _stored(self, endpoint_id: uuid.UUID, deleted: bool = False) -> Endpoint | None:
        """The endpoint made through the API; a deleted one only if asked."""
        try:
            found = self.store.find(endpoint_id, Endpoint)
        except TypeError:
            return None
        return None if found is None or (found.deleted and not deleted) else found

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
            events=_unique(body.events),
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

    async def _info(self, endpoint_id: uuid.UUID, deleted: bool = False) -> EndpointInfo:
        """The endpoint, or a 404; a deleted one only if asked (its
        deliveries stay listed)."""
        declared = self.endpoints.configured.get(endpoint_id)
        if declared is not None:
            return declared
        stored = await anyio.to_thread.run_sync(self._stored, endpoint_id, deleted)
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
        for name in ("url", "events", "include_codes", "ordered", "disabled"):
            if name in given and given[name] is None:
                raise HTTPError(422, "invalid_body", f"{name} cannot be null")
        if given.get("url") is not None:
            await self._check_url(given["url"])
        if "events" in given:  # [] subscribes to every event
            _check_events(given["events"])
            given["events"] = _unique(given["events"])
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
        # Answered once the webhooks projection has the new generation (up
        # to ROTATION_WAIT seconds), so what is sent after this answer is
        # signed with the secret it shows too.
        deadline = time.monotonic() + ROTATION_WAIT
        while time.monotonic() < deadline:
            stored = (await anyio.to_thread.run_sync(self.endpoints.load)).get(endpoint_id)
            if stored is None or stored.generation >= endpoint.generation:
                break
            await anyio.sleep(0.05)
        view = await anyio.to_thread.run_sync(self._view, EndpointInfo.of(endpoint), True)
        return JSONResponse(view.model_dump(mode="json"))

    async def _refuse_unsendable(self, info: EndpointInfo) -> None:
        refusal = await anyio.to_thread.run_sync(unsendable, info, self.outbox)
        if refusal is not None:
            raise HTTPError(409, *refusal)

    async def test(self, request: Request) -> JSONResponse:
        """Send a `ping` now (202 with the delivery to follow); a 409 for a
        disabled endpoint, which would send nothing."""
        self.admin.authenticate(request)
        info = await self._info(_endpoint_id(request))
        await self._refuse_unsendable(info)
        message_id = f"ping_{uuid.uuid4().hex}"
        at = self.clock()
        # Listed (and sent) after what the webhooks projection has queued so
        # far: at its position in the log, not before every event.
        seq = await anyio.to_thread.run_sync(self.outbox.read_model.position, WEBHOOKS)
        job = Job.of(
            str(info.id),
            KIND,
            message_id,
            "ping",
            message_id,
            seq,
            {
                "type": "ping",
                "timestamp": at.isoformat(),
                "data": PingV1(endpoint_id=info.id).model_dump(mode="json"),
            },
            ordered=False,
        )
        await anyio.to_thread.run_sync(self.outbox.add, [job])
        sent = TestSent(delivery_id=job.id, message_id=message_id)
        return JSONResponse(sent.model_dump(), status_code=202)

    async def history(self, request: Request) -> JSONResponse:
        """The endpoint's audit trail: every change, who made it and when."""
        self.admin.authenticate(request)
        endpoint_id = _endpoint_id(request)
        self._declared(endpoint_id)
        if await anyio.to_thread.run_sync(self._stored, endpoint_id) is None:
            raise HTTPError(404, "not_found", f"no webhook endpoint {endpoint_id}")
        events = await anyio.to_thread.run_sync(self.store.history, endpoint_id)
        body = EndpointHistory(endpoint_id=endpoint_id, events=[history_entry(e) for e in events])
        return JSONResponse(body.model_dump(mode="json"))

    # -- deliveries ------------------------------------------------------------

    async def deliveries(self, request: Request) -> JSONResponse:
        """The endpoint's deliveries, in the order of the events that caused
        them, each with every attempt; a deleted endpoint's too."""
        self.admin.authenticate(request)
        _no_control_characters(request)
        _only(request, {"status", "cursor", "limit"})
        info = await self._info(_endpoint_id(request), deleted=True)
        return await self._list(request, channel=str(info.id), kind=KIND)

    async def _list(self, request: Request, **filters: str) -> JSONResponse:
        status = request.query_params.get("status")
        if status is not None and status not in STATUSES:
            raise HTTPError(422, "invalid_query", f"status must be one of {', '.join(STATUSES)}")
        after = _cursor(request.query_params.get("cursor"))
        limit = _limit(request)
        # One more than a page: a next_cursor only when there is a next page.
        records = await anyio.to_thread.run_sync(
            lambda: self.outbox.jobs(status=status, after=after, limit=limit + 1, **filters)
        )
        cursor = None
        if len(records) > limit:
            records = records[:limit]
            cursor = encode_cursor(records[-1].job.seq, records[-1].job.id)
        body = DeliveryList(items=[delivery_view(r) for r in records], next_cursor=cursor)
        return JSONResponse(body.model_dump(mode="json"))

    async def resend(self, request: Request) -> JSONResponse:
        """Send a delivery (or any job) again; a 409 where that would do
        nothing now (its endpoint deleted or disabled, its channel paused)."""
        self.admin.authenticate(request)
        _no_control_characters(request)
        job_id = request.path_params["id"]
        record = await anyio.to_thread.run_sync(self.outbox.job, job_id)
        if record is None:
            raise HTTPError(404, "not_found", f"no delivery {job_id!r}")
        endpoint = None
        endpoint_id = job_endpoint(record)
        if endpoint_id is not None:
            with contextlib.suppress(HTTPError):
                endpoint = await self._info(endpoint_id, deleted=True)
        refusal = await anyio.to_thread.run_sync(unsendable_job, record, self.outbox, endpoint)
        if refusal is not None:
            raise HTTPError(409, *refusal)
        count = await anyio.to_thread.run_sync(self.outbox.resend, [job_id])
        return JSONResponse(Resent(resent=count).model_dump(), status_code=202)

    async def recover(self, request: Request) -> JSONResponse:
        """Send again, now, every delivery to the endpoint made since `since`
        that failed, or is still being retried after failed attempts."""
        self.admin.authenticate(request)
        info = await self._info(_endpoint_id(request))
        body = await read_json(request, Recover)
        if body.since > self.clock():
            raise HTTPError(422, "invalid_body", "since is in the future")
        await self._refuse_unsendable(info)
        count = await anyio.to_thread.run_sync(recover, self.outbox, str(info.id), body.since)
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


def _unique(events: list[str] | None) -> list[str]:
    """The types and prefixes, each once, in the order given ([]: all)."""
    return list(dict.fromkeys(events or []))


def _check_events(events: list[str] | None) -> None:
    problem = events_problem(events)
    if problem is not None:
        raise HTTPError(422, "invalid_body", problem)


_ENDPOINT = {"id": "The endpoint's id (UUID)"}
_STATUS = Query("status", "Only deliveries in this state", {"enum": list(STATUSES)})
_PAGED = (_STATUS, CURSOR, LIMIT)
_NOT_SENDABLE = {409: "The endpoint is deleted or disabled, or its channel paused"}


def routes(api: OutboundAPI) -> list[Route]:
    base = "/v1/webhook-endpoints"
    tag = "outbound webhooks"

    def op(summary: str, answers: dict[int, Answer], **more: Any) -> Operation:
        return Operation(summary, tag, answers, security="admin", **more)

    one = op("One endpoint", {200: EndpointView}, path=_ENDPOINT)
    return [
        Documented(
            base,
            api.create,
            "POST",
            op("Add an endpoint", {201: EndpointView}, body=EndpointCreate),
        ),
        Documented(base, api.list, "GET", op("Every endpoint", {200: EndpointList})),
        Documented(base + "/{id}", api.get, "GET", one),
        Documented(
            base + "/{id}",
            api.patch,
            "PATCH",
            op("Change an endpoint", {200: EndpointView}, body=EndpointPatch, path=_ENDPOINT),
        ),
        Documented(
            base + "/{id}",
            api.delete,
            "DELETE",
            op("Delete an endpoint", {204: None}, path=_ENDPOINT),
        ),
        Documented(
            base + "/{id}/rotate-secret",
            api.rotate,
            "POST",
            op(
                "A new signing secret (the old one signs too for a day)",
                {200: EndpointView},
                path=_ENDPOINT,
            ),
        ),
        Documented(
            base + "/{id}/test",
            api.test,
            "POST",
            op("Send a ping", {202: TestSent}, path=_ENDPOINT, errors=_NOT_SENDABLE),
        ),
        Documented(
            base + "/{id}/deliveries",
            api.deliveries,
            "GET",
            op(
                "The endpoint's deliveries, oldest first",
                {200: DeliveryList},
                path=_ENDPOINT,
                query=_PAGED,
            ),
        ),
        Documented(
            base + "/{id}/history",
            api.history,
            "GET",
            op("Every change to the endpoint", {200: EndpointHistory}, path=_ENDPOINT),
        ),
        Documented(
            base + "/{id}/recover",
            api.recover,
            "POST",
            op(
                "Send again every failed delivery since a time",
                {202: Resent},
                body=Recover,
                path=_ENDPOINT,
                errors=_NOT_SENDABLE,
            ),
        ),
        Documented(
            "/v1/deliveries/{id}/resend",
            api.resend,
            "POST",
            Operation(
                "Send a delivery (any outbound job) again",
                tag,
                {202: Resent},
                path={"id": "The delivery's id"},
                security="admin",
                errors=_NOT_SENDABLE,
            ),
        ),
        Documented(
            "/v1/mails",
            api.mails,
            "GET",
            Operation(
                "Mails to buyers, oldest first",
                "mail",
                {200: DeliveryList},
                query=_PAGED,
                security="admin",
            ),
        ),
        Documented(
            "/v1/outbox",
            api.outbox_jobs,
            "GET",
            Operation(
                "Outbound jobs of a kind, oldest first",
                "outbound webhooks",
                {200: DeliveryList},
                query=(
                    Query("kind", "webhook, mail or stripe", {"enum": list(KINDS)}, required=True),
                    *_PAGED,
                ),
                security="admin",
            ),
        ),
    ]
