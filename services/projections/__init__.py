"""Projections of the event store's notification log, one module each,
all fed by one follower (`follower`):

- `read_model`: the API's tables (exactly once);
- `public_events`: the public Kafka topics (at least once);
- `webhooks`: signed webhooks to the vendor's endpoints, as outbox jobs;
- `stripe_codes`: activation codes back into Stripe subscriptions, as outbox jobs;
- `mail`: the buyer's mails (the activation code), as outbox jobs.

A new projection is one module and one line in `projections` below;
what projections may need is in `Needs`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker

    from services.config import Config
    from services.outbound.outbox import Outbox
    from services.outbound.webhooks import EndpointInfo
    from services.projections.follower import (
        PUBLIC_TYPES,
        Change,
        Follower,
        LogBell,
        Projection,
        follow,
        listen,
        project_batch,
    )
    from services.projections.mail import MAIL, MailProjection
    from services.projections.public_events import PUBLIC_EVENTS, PublicEventsProjection
    from services.projections.read_model import READ_MODEL, ReadModelProjection, replay
    from services.projections.views import (
        dead_letter_view,
        entitlement_view,
        history_entry,
        receipt_view,
    )
    from services.projections.webhooks import WEBHOOKS, WebhooksProjection
    from services.readmodel import ReadModel

#: Where each name below is, imported when first used: a process that
#: needs one projection (a replay's fold process, the API's views) does not
#: import the others' clients (Kafka, Stripe, SMTP, HTTP), which took a
#: replay's fold process 1.5 of its 1.7 s to start (python -X importtime).
_WHERE = {
    **dict.fromkeys(
        [
            "PUBLIC_TYPES",
            "Change",
            "Follower",
            "LogBell",
            "Projection",
            "follow",
            "listen",
            "project_batch",
        ],
        "follower",
    ),
    **dict.fromkeys(["MAIL", "MailProjection"], "mail"),
    **dict.fromkeys(["PUBLIC_EVENTS", "PublicEventsProjection"], "public_events"),
    **dict.fromkeys(["READ_MODEL", "ReadModelProjection", "replay"], "read_model"),
    **dict.fromkeys(
        ["dead_letter_view", "entitlement_view", "history_entry", "receipt_view"], "views"
    ),
    **dict.fromkeys(["WEBHOOKS", "WebhooksProjection"], "webhooks"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "MAIL",
    "PUBLIC_EVENTS",
    "PUBLIC_TYPES",
    "READ_MODEL",
    "WEBHOOKS",
    "Change",
    "Follower",
    "LogBell",
    "MailProjection",
    "Needs",
    "Projection",
    "PublicEventsProjection",
    "ReadModelProjection",
    "WebhooksProjection",
    "dead_letter_view",
    "entitlement_view",
    "follow",
    "history_entry",
    "listen",
    "project_batch",
    "projections",
    "receipt_view",
    "replay",
]


@dataclass(frozen=True)
class Needs:
    """What the projections of a projector process are built from."""

    read_model: ReadModel
    broker: KafkaBroker
    outbox: Outbox
    config: Config
    #: The webhook endpoints declared in the configuration.
    endpoints: list[EndpointInfo]
    #: Tells the outbox's dispatcher that jobs were added.
    wake: Callable[[], None]
    #: The log's last position now: where a projection that must not act on
    #: history (mail) starts when it has no position yet.
    head: Callable[[], int]
    #: Tells the webhook sender the endpoints table changed.
    endpoints_changed: Callable[[], None] = lambda: None


def projections(needs: Needs) -> list[Projection]:
    """Every projection a projector process runs, each following the log."""
    from services.projections.mail import mail_projection
    from services.projections.public_events import PublicEventsProjection
    from services.projections.read_model import ReadModelProjection
    from services.projections.stripe_codes import stripe_codes_projection
    from services.projections.webhooks import WebhooksProjection

    return [
        ReadModelProjection(needs.read_model),
        PublicEventsProjection(needs.read_model, needs.broker),
        WebhooksProjection(
            needs.outbox, needs.endpoints, needs.wake, needs.endpoints_changed, needs.head
        ),
        *stripe_codes_projection(needs.read_model, needs.outbox, needs.config, needs.wake),
        *mail_projection(needs.outbox, needs.config.email, needs.head, needs.wake),
    ]
