"""Webhook ingress: verify, key, hand to Kafka, and only then say 2xx.

It never interprets a webhook beyond the routing key; the domain service does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client.metrics import Counter as CounterChild
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from contracts.api import Accepted
from contracts.webhooks import RawWebhookV1
from services.config import Config, Source
from services.http import (
    HTTPError,
    http_error_response,
    internal_error_response,
    read_limited,
    read_limited_body,
)
from services.kafka import MAX_MESSAGE_BYTES
from services.logs import NOTED
from services.metrics import (
    UNKNOWN_SOURCE,
    WEBHOOKS_ACCEPTED,
    WEBHOOKS_RECEIVED,
    WEBHOOKS_REJECTED,
)
from services.openapi import Documented, Operation
from services.providers import SignatureError, has_control_character

log = logging.getLogger("entitle.ingress")

MAX_BODY_BYTES = 1024 * 1024
PUBLISH_TIMEOUT_SECONDS = 10.0
#: Kept with every stored webhook besides what its provider names
#: (`Provider.headers`): enough to tell who sent it, nothing a client can
#: bloat the log with. Credentials are never kept.
KEPT_HEADERS = ("content-type", "user-agent")
# An escaped UTF-16 surrogate: JSON lets "\ud800" through, but a lone one
# is no text (no database or broker can store it).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

#: publish(envelope bytes, routing key bytes); returns once the broker acknowledged.
Publish = Callable[[bytes, bytes], Awaitable[object]]


def make_envelope(
    source: Source,
    payload: dict[str, Any],
    body: str,
    headers: dict[str, str],
    via: Literal["webhook", "backfill"] = "webhook",
) -> RawWebhookV1:
    """A verified webhook (or one fetched from the provider's API), as it
    goes on the raw topic: with a new receipt id, and routed by the
    provider's order reference so one order's webhooks keep their order."""
    receipt_id = str(uuid.uuid4())
    try:
        routing_key = source.provider.routing_key(payload) or receipt_id
    except Exception:
        # An odd payload is the domain service's to judge (a dead letter
        # naming the field); here it only needs some key.
        routing_key = receipt_id
    if has_control_character(routing_key) or len(routing_key) > 255:
        routing_key = receipt_id  # it is shown and stored as the receipt's order reference
    return RawWebhookV1(
        receipt_id=receipt_id,
        source=source.name,
        provider=source.provider.name,
        routing_key=routing_key,
        received_at=datetime.now(UTC),
        headers={
            name: headers[name]
            for name in (*KEPT_HEADERS, *source.provider.headers)
            if name in headers
        },
        body=body,
        via=via,
    )


#: The most a stored webhook may take on the raw topic, leaving room for the
#: record's key and framing within the broker's message size.
MAX_ENVELOPE_BYTES = MAX_MESSAGE_BYTES - 16 * 1024


def too_large(size: int) -> HTTPError:
    return HTTPError(
        413,
        "payload_too_large",
        f"the webhook takes {size} bytes once stored (JSON-escaped, with its headers); "
        f"the raw topic takes at most {MAX_ENVELOPE_BYTES}",
    )


def parse_body(body: bytes) -> tuple[dict[str, Any], str]:
    """(the JSON object, the body as text) of a verified webhook, or a 400
    naming what is wrong: empty, not UTF-8 (an encoded surrogate included),
    not JSON, nested deeper than the parser goes, a lone escaped surrogate,
    or not an object."""
    if not body.strip():
        raise HTTPError(400, "empty_body", "the webhook body is empty")
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise HTTPError(
            400, "invalid_json", f"the webhook body is not UTF-8 (byte {exc.start})"
        ) from None
    try:
        payload = json.loads(text)
    except ValueError:
        raise HTTPError(400, "invalid_json", "the webhook body is not JSON") from None
    except RecursionError:
        raise HTTPError(400, "invalid_json", "the webhook body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise HTTPError(400, "invalid_json", "the webhook body is not a JSON object")
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(payload):
        raise HTTPError(
            400, "invalid_json", "the webhook body has a lone UTF-16 surrogate (\\ud800-\\udfff)"
        )
    return payload, text


def _lone_surrogate(payload: Any) -> bool:
    # Iterative: the payload may be nested as deep as the parser allows.
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return True
    return False


#: The path the ingress serves, followed by the source's name.
PREFIX = "/webhooks/"


class Ingress:
    def __init__(self, config: Config, publish: Publish, clock: Callable[[], float] = time.time):
        self.config = config
        self.publish = publish
        self.clock = clock
        #: The documented route; the ASGI entry names it in the scope, for the access log.
        self.route = Documented(PREFIX + "{source}", self.receive, "POST", RECEIVE)
        self._counters: dict[str, tuple[CounterChild, CounterChild]] = {}

    async def receive(self, request: Request) -> Response:
        """The route's handler (Starlette's); `asgi` serves the same in front of it."""
        name = request.path_params["source"]

        async def body() -> bytes:
            return await read_limited(request, MAX_BODY_BYTES)

        headers = {k.lower(): v for k, v in request.headers.items()}
        return await self._counted(name, headers, body, request.scope.setdefault(NOTED, {}))

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /webhooks/{source} as a bare ASGI app, put in front of
        Starlette's middleware and router by the composition root: the
        hot path, where those layers took a fifth of the ingress's CPU
        (bench/ingest.py --compare)."""
        scope["route"] = self.route
        name = scope["path"][len(PREFIX) :]  # ASGI paths are decoded already

        async def body() -> bytes:
            return await read_limited_body(scope, receive, MAX_BODY_BYTES)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            response = await self._counted(name, headers, body, scope.setdefault(NOTED, {}))
        except HTTPError as exc:
            response = http_error_response(exc)
        except Exception as exc:
            response = internal_error_response(exc)
        await response(scope, receive, send)

    async def _counted(
        self,
        name: str,
        headers: dict[str, str],
        body: Callable[[], Awaitable[bytes]],
        noted: dict[str, str],
    ) -> Response:
        """The answer, counted; `noted` gets what the request's log line
        should say of the stored webhook (services.logs.RequestLog)."""
        label = name if name in self.config.sources else UNKNOWN_SOURCE
        counted = self._counters.get(label)
        if counted is None:
            # A child per configured source (and "unknown"), kept: `labels`
            # takes a lock and builds a key tuple on every call.
            counted = self._counters[label] = (
                WEBHOOKS_RECEIVED.labels(label),
                WEBHOOKS_ACCEPTED.labels(label),
            )
        counted[0].inc()
        try:
            answer = await self._receive(name, headers, body, noted)
        except HTTPError as exc:
            WEBHOOKS_REJECTED.labels(label, exc.code).inc()
            raise
        counted[1].inc()
        return answer

    async def _receive(
        self,
        name: str,
        headers: dict[str, str],
        read: Callable[[], Awaitable[bytes]],
        noted: dict[str, str],
    ) -> Response:
        source = self.config.sources.get(name)
        if source is None:
            raise HTTPError(
                404, "unknown_source", f"no webhook source named {name!r} is configured"
            )
        body = await read()
        try:
            if source.unsigned:
                pass  # allow_unsigned: what it may do is limited in the fold
            elif source.provider.blocking_verify:
                await anyio.to_thread.run_sync(
                    source.provider.verify, headers, body, source.credentials(), self.clock()
                )
            else:
                source.provider.verify(headers, body, source.credentials(), self.clock())
        except SignatureError as exc:
            # On the request's line (within its budget), not a line of its
            # own: anyone can send bad signatures, as many as they like.
            noted.update(source=name, rejected=str(exc))
            raise HTTPError(401, "invalid_signature", str(exc)) from None
        payload, text = parse_body(body)
        events = source.provider.split(payload) if source.provider.split else None
        if events is None:
            envelopes = [make_envelope(source, payload, text, headers)]
        else:
            # A batch: each event is stored as a webhook of its own (its own
            # id, deduplication and outcome), verified with the batch above.
            envelopes = [
                make_envelope(
                    source, event if isinstance(event, dict) else {}, _text(event), headers
                )
                for event in events
            ]
        values = [envelope.model_dump_json().encode() for envelope in envelopes]
        stored = [len(value) <= MAX_ENVELOPE_BYTES for value in values]
        if events is None or not any(stored):
            for value in values:
                if len(value) > MAX_ENVELOPE_BYTES:
                    raise too_large(len(value))
        # One at a time, so one order's events keep their order; if one is
        # not stored, the provider retries the batch and the events already
        # stored are duplicates by their ids.
        payloads = [payload] if events is None else events
        for envelope, value, keep, event in zip(envelopes, values, stored, payloads, strict=True):
            if keep:
                event_id = _event_id(source, event)
                await self._publish(name, envelope, value)
                if events is None:  # one webhook: its request's line says it
                    noted.update(
                        source=name, provider_event_id=event_id, receipt_id=envelope.receipt_id
                    )
                else:
                    # The request's line counts them; one each only at debug
                    # level (a batch may hold hundreds, outside the budget).
                    log.debug(
                        "stored webhook %s from %s (event %s)",
                        envelope.receipt_id,
                        name,
                        event_id,
                        extra={
                            "fields": {
                                "source": name,
                                "provider_event_id": event_id,
                                "receipt_id": envelope.receipt_id,
                            }
                        },
                    )
        if events is not None:
            noted.update(source=name, events_stored=str(sum(stored)))
            # An event too large to store is left out of the acknowledgment
            # (the provider shows it unprocessed); the others are kept.
            for event, value, keep in zip(events, values, stored, strict=True):
                if not keep:
                    event_id = source.provider.event_id(event) if isinstance(event, dict) else ""
                    log.error(
                        "event %r of a %s batch takes %d bytes once stored (the raw topic"
                        " takes at most %d): not stored, not acknowledged",
                        event_id[:100],
                        name,
                        len(value),
                        MAX_ENVELOPE_BYTES,
                    )
            return _acknowledge(source, [e for e, keep in zip(events, stored, strict=True) if keep])
        return accepted(envelopes[0].receipt_id)

    async def _publish(self, name: str, envelope: RawWebhookV1, value: bytes) -> None:
        receipt_id, routing_key = envelope.receipt_id, envelope.routing_key
        try:
            # asyncio.timeout, not wait_for: no task of its own per webhook.
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await self.publish(value, routing_key.encode())
        except MessageSizeTooLargeError:
            # The topic takes less than we assumed (created by hand with a
            # smaller max.message.bytes): a retry would fail the same way.
            log.error("broker refused webhook %s for %s as too large", receipt_id, name)
            raise too_large(len(value)) from None
        except Exception as exc:
            log.error("broker did not accept webhook %s for %s: %r", receipt_id, name, exc)
            raise HTTPError(
                503,
                "broker_unavailable",
                "the webhook could not be stored; retry later",
                {"Retry-After": "5"},
            ) from None


def accepted(receipt_id: str) -> Response:
    """202 with `Accepted` (contracts.api) as JSON, written out: a receipt id
    is a UUID, nothing to escape, and building the model and serialising it
    cost more than the rest of the answer."""
    body = b'{"status":"accepted","receipt_id":"' + receipt_id.encode() + b'"}'
    return Response(body, status_code=202, media_type="application/json")


def _event_id(source: Source, payload: Any) -> str:
    """The provider's event id, for the log ('' when it has none we keep)."""
    try:
        found = source.provider.event_id(payload) if isinstance(payload, dict) else ""
    except Exception:
        return ""
    return found if len(found) <= 255 and not has_control_character(found) else ""


def _text(event: Any) -> str:
    # Not escaped as ASCII (a "€" would take 6 bytes, not 3): the body was
    # checked for lone surrogates, so the text is valid UTF-8.
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def _acknowledge(source: Source, events: list[Any]) -> Response:
    """The answer to a stored batch: 202 with the ids of its events, one a
    line, which FastSpring marks processed (others it sends again:
    https://developer.fastspring.com/reference/processed-and-unprocessed-webhook-events)."""
    ids = [source.provider.event_id(e) if isinstance(e, dict) else "" for e in events]
    # An id the fold would not keep (a control character, too long) is no id.
    kept = [i for i in ids if i and len(i) <= 255 and not has_control_character(i)]
    return PlainTextResponse("\n".join(kept), status_code=202)


RECEIVE = Operation(
    "Receive a provider's webhook",
    "webhooks",
    {202: (Accepted, "text/plain")},
    body={"type": "object", "description": "The provider's event as it sent it, signed"},
    path={"source": "A source configured in entitle.yaml (e.g. stripe)"},
    errors={
        400: "The body is empty or not a JSON object",
        401: "The signature is missing, wrong or too old",
        404: "No source of this name is configured",
        413: "The body is too large",
        503: "The webhook could not be stored; retry",
    },
    description="202 once the webhook is stored: JSON with its receipt id, or for a"
    " FastSpring batch the stored events' ids, one a line (text/plain)."
    " The provider's own signature header authenticates it.",
)


def routes(ingress: Ingress) -> list[Route]:
    return [ingress.route]
