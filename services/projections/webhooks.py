"""The outbound webhooks projection: every public entitlement event, and
`order.created`, becomes one job per endpoint that subscribes to it, saved
with this projection's position (`services.outbound.outbox`). It also keeps
the endpoints table the sender and the API read, from the endpoints' own
events, so an endpoint gets exactly the events recorded after it was, on a
rebuild as the first time; when an endpoint is deleted, what still waited
for it fails ("the endpoint was deleted").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

import anyio

from contracts.events import CustomerV1
from contracts.outbound import OrderCreatedV1
from domain.endpoint import Endpoint
from domain.entitlement import NAMESPACE, event_type
from services.outbound.outbox import Job, Outbox
from services.outbound.webhooks import (
    ENDPOINTS_TABLE,
    KIND,
    PROJECTION,
    EndpointInfo,
    stored_endpoints,
)
from services.projections.follower import Change
from services.projections.public_events import public_event

WEBHOOKS = PROJECTION
#: The last error of the jobs a deleted endpoint never got.
ENDPOINT_DELETED = "the endpoint was deleted"


def order_created_id(source: str, order_ref: str) -> str:
    return str(uuid5(NAMESPACE, f"order-created\x1f{source}\x1f{order_ref}"))


class WebhooksProjection:
    name = WEBHOOKS

    def __init__(
        self,
        outbox: Outbox,
        configured: list[EndpointInfo],
        wake: Callable[[], None] = lambda: None,
        endpoints_changed: Callable[[], None] = lambda: None,
        head: Callable[[], int] = lambda: 0,
    ) -> None:
        self.outbox = outbox
        self.endpoints_changed = endpoints_changed
        self.head = head
        #: While a rebuild replays the log up to `_held_until`, the channels
        #: paused before it stay paused (a replayed registration would
        #: otherwise resume a disabled endpoint until its disabling replays).
        self._held: set[str] = set()
        self._held_until = 0
        self.read_model = outbox.read_model
        self.configured = configured
        self.wake = wake
        outbox.create([ENDPOINTS_TABLE])
        self.endpoints: dict[UUID, EndpointInfo] = {}

    def position(self) -> int:
        """Where to resume; at 0 (the first run, or a rebuild after `entitle
        replay --webhooks`) the endpoints made through the API are forgotten
        and rebuilt from their own events as the log replays, so old events
        go only to the endpoints that existed when they were recorded."""
        sql = self.read_model.sql
        position = self.read_model.position(self.name)
        with self.read_model.transaction() as cur:
            stored = stored_endpoints(cur)
            first_seen = {e.id: e.since for e in stored if e.declared}
            # The configuration is the truth about declared endpoints: they
            # are written to the table (for `entitle outbound`), those no
            # longer declared go, and a restart resumes a paused one.
            for endpoint in stored:
                if endpoint.declared or position == 0:
                    cur.execute(
                        sql("DELETE FROM entitle_webhook_endpoints WHERE id = ?"),
                        (str(endpoint.id),),
                    )
            self.configured = [
                replace(e, since=first_seen.get(e.id, position)) for e in self.configured
            ]
            for endpoint in self.configured:
                self._write(cur, endpoint)
                self.outbox.pause(cur, str(endpoint.id), False)
            if position == 0:
                self._held = {str(e.id) for e in stored if not e.declared}
                self._held &= set(self.outbox.paused_channels(cur))
                self._held_until = self.head()
        kept = [] if position == 0 else [e for e in stored if not e.declared]
        self.endpoints = {e.id: e for e in kept} | {e.id: e for e in self.configured}
        return position

    def _write(self, cur: Any, endpoint: EndpointInfo) -> None:
        cur.execute(
            self.read_model.sql(
                "INSERT INTO entitle_webhook_endpoints (id, body) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET body = excluded.body"
            ),
            (str(endpoint.id), endpoint.to_json()),
        )

    async def project(self, changes: list[Change], position: int) -> None:
        jobs: list[Job] = []
        changed: dict[UUID, EndpointInfo] = {}
        deleted: dict[UUID, datetime] = {}
        orders: dict[tuple[str, str], list[Change]] = {}
        for change in changes:
            if change.endpoint is not None:
                endpoint = EndpointInfo.of(change.endpoint)
                self.endpoints[endpoint.id] = endpoint
                changed[endpoint.id] = endpoint
                if isinstance(change.event, Endpoint.Deleted):
                    deleted[endpoint.id] = change.event.timestamp
                continue
            if change.entitlement is None or not change.public:
                continue
            jobs += self._jobs(change)
            if event_type(change.event) == "entitlement.created":
                key = (change.entitlement.source, change.entitlement.order_ref)
                orders.setdefault(key, []).append(change)
        for (source, order_ref), created in orders.items():
            jobs += self._order_jobs(source, order_ref, created)

        def also(cur: Any) -> None:
            held = position <= self._held_until
            for endpoint in changed.values():
                self._write(cur, endpoint)
                paused = endpoint.disabled or endpoint.deleted
                self.outbox.pause(
                    cur, str(endpoint.id), paused or (held and str(endpoint.id) in self._held)
                )
            # What waited for a deleted endpoint will never go: it fails
            # now (after the jobs of this batch are in), on a rebuild too.
            for endpoint_id, at in deleted.items():
                self.outbox.give_up(cur, str(endpoint_id), ENDPOINT_DELETED, at)

        await anyio.to_thread.run_sync(self.outbox.commit, self.name, jobs, position, also)
        if changed:
            self.endpoints_changed()
        if jobs or changed:
            self.wake()

    def _jobs(self, change: Change) -> list[Job]:
        message = public_event(change)
        view = change.entitlement
        assert view is not None
        payload = {
            "type": message.type,
            "timestamp": message.recorded_at.isoformat(),
            "data": message.model_dump(mode="json"),
            "code_indexes": {str(view.id): [c.index for c in view.activation_codes]},
        }
        return [
            Job.of(
                str(endpoint.id),
                KIND,
                str(message.event_id),
                message.type,
                str(view.id),
                change.position,
                payload,
                ordered=endpoint.ordered,
            )
            for endpoint in self.endpoints.values()
            if endpoint.wants(message.type) and endpoint.since < change.position
        ]

    def _order_jobs(self, source: str, order_ref: str, created: list[Change]) -> list[Job]:
        """`order.created` for an order's first entitlements (those created
        in one batch: one webhook's, normally all of them)."""
        views = [change.entitlement for change in created if change.entitlement is not None]
        first = views[0]
        data = OrderCreatedV1(
            source=source,
            order_ref=order_ref,
            customer=CustomerV1(id=first.customer.id, email=first.customer.email),
            entitlement_ids=[view.id for view in views],
        )
        payload = {
            "type": "order.created",
            "timestamp": created[0].event.timestamp.isoformat(),
            "data": data.model_dump(mode="json", exclude_none=True),
            "code_indexes": {
                str(view.id): [c.index for c in view.activation_codes] for view in views
            },
        }
        message_id = order_created_id(source, order_ref)
        return [
            Job.of(
                str(endpoint.id),
                KIND,
                message_id,
                "order.created",
                f"order\x1f{source}\x1f{order_ref}",
                created[0].position,
                payload,
                ordered=False,
            )
            for endpoint in self.endpoints.values()
            if endpoint.wants("order.created") and endpoint.since < created[0].position
        ]
