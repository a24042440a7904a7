"""Webhook ingress: verify, key, hand to Kafka, and only then say 2xx.

It never interprets a webhook beyond the routing key; the domain service does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts.api import Accepted
from contracts.webhooks import RawWebhookV1
from services.config import Config, Source
from services.http import HTTPError
from services.providers import SignatureError, has_control_character

log = logging.getLogger("entitle.ingress")

MAX_BODY_BYTES = 1024 * 1024
PUBLISH_TIMEOUT_SECONDS = 10.0
# Credentials and cookies are not kept with the stored webhook.
_DROPPED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

#: publish(envelope bytes, routing key bytes); returns once the broker acknowledged.
Publish = Callable[[bytes, bytes], Awaitable[object]]


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, "payload_too_large", f"the body exceeds {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "payload_too_large", f"the body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(
            400, "client_disconnected", "the request body was not fully received"
        ) from None
    return b"".join(chunks)


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
        headers={k: v for k, v in headers.items() if k not in _DROPPED_HEADERS},
        body=body,
        via=via,
    )


class Ingress:
    def __init__(self, config: Config, publish: Publish, clock: Callable[[], float] = time.time):
        self.config = config
        self.publish = publish
        self.clock = clock

    async def receive(self, request: Request) -> JSONResponse:
        name = request.path_params["source"]
        source = self.config.sources.get(name)
        if source is None:
            raise HTTPError(
                404, "unknown_source", f"no webhook source named {name!r} is configured"
            )
        body = await read_body(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            if source.provider.blocking_verify:
                await anyio.to_thread.run_sync(
                    source.provider.verify, headers, body, source.credentials(), self.clock()
                )
            else:
                source.provider.verify(headers, body, source.credentials(), self.clock())
        except SignatureError as exc:
            log.info("rejected webhook for %s: %s", name, exc)
            raise HTTPError(401, "invalid_signature", str(exc)) from None
        if not body.strip():
            raise HTTPError(400, "empty_body", "the webhook body is empty")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "invalid_json", "the webhook body is not JSON") from None
        except RecursionError:
            raise HTTPError(400, "invalid_json", "the webhook body is nested too deeply") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "invalid_json", "the webhook body is not a JSON object")
        envelope = make_envelope(source, payload, body.decode(), headers)
        receipt_id, routing_key = envelope.receipt_id, envelope.routing_key
        try:
            await asyncio.wait_for(
                self.publish(envelope.model_dump_json().encode(), routing_key.encode()),
                PUBLISH_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            log.error("broker did not accept webhook %s for %s: %r", receipt_id, name, exc)
            raise HTTPError(
                503,
                "broker_unavailable",
                "the webhook could not be stored; retry later",
                {"Retry-After": "5"},
            ) from None
        return JSONResponse(Accepted(receipt_id=receipt_id).model_dump(), status_code=202)


def routes(ingress: Ingress) -> list[Route]:
    return [Route("/webhooks/{source}", ingress.receive, methods=["POST"])]
