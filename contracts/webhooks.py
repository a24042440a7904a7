"""Messages on `entitle.webhooks.raw` and `entitle.webhooks.dead-letter`."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RAW_TOPIC = "entitle.webhooks.raw"
DEAD_LETTER_TOPIC = "entitle.webhooks.dead-letter"


class RawWebhookV1(BaseModel):
    """A webhook exactly as the provider sent it, after its signature was
    verified; keyed on the topic by `routing_key` so one order's webhooks keep
    their order."""

    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    receipt_id: str = Field(description="Unique id the ingress gave this delivery")
    source: str = Field(description="Configured source name, as in POST /webhooks/{source}")
    provider: str = Field(description="Provider adapter of the source, e.g. 'stripe'")
    routing_key: str = Field(description="The provider's subscription or order id")
    received_at: datetime
    headers: dict[str, str] = Field(description="Request headers, lower-cased names")
    body: str = Field(description="The raw request body (UTF-8 JSON text)")
    via: Literal["webhook", "backfill"] = Field(
        default="webhook",
        description="How it came: a signed webhook, or fetched from the provider's API"
        " by a backfill (authenticated by the API key; no signature headers)",
    )


class RawLogMarkerV1(BaseModel):
    """The first record of partition 0 of `entitle.webhooks.raw`, written when
    the engine finds that partition empty on a broker without topic ids
    (Apache Kafka < 2.8): it names this log, so positions recorded for an
    earlier log of the same name (a topic deleted and created again) are not
    trusted. Consumers of the raw topic skip it."""

    model_config = ConfigDict(frozen=True)

    #: First, so a reader can tell a marker by the record's first bytes.
    kind: Literal["entitle.raw-log-marker"] = "entitle.raw-log-marker"
    version: Literal[1] = 1
    marker: str = Field(description="A new UUID for each log")
    created_at: datetime


#: How every marker record begins (`RawLogMarkerV1` serialises `kind` first).
MARKER_PREFIX = b'{"kind":"entitle.raw-log-marker"'


class DeadLetterV1(BaseModel):
    """A webhook that could not be mapped onto the catalog, with the reason."""

    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    id: str
    source: str
    provider: str
    provider_event_id: str
    reason: str
    recorded_at: datetime
    webhook: RawWebhookV1
