"""Stripe's API, for what webhooks cannot give: events never delivered
(an endpoint disabled, an outage longer than Stripe retries) and the lines a
webhook leaves out of a long invoice; and, with `write_back_codes`, to write
each subscription's activation codes into its metadata. Through the official
`stripe` package, with a source's `api_key` (a restricted key with read
access to events and invoices is enough; write-back also needs write access
to subscriptions)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe

from services.config import Source
from services.ingress import make_envelope

log = logging.getLogger("entitle.stripe")

#: Stripe keeps events for 30 days (https://docs.stripe.com/api/events/list).
EVENTS_KEPT = timedelta(days=30)
TIMEOUT_SECONDS = 10.0

#: The metadata key the codes go to, comma-separated, as the Zentitle seed has it.
CODES_KEY = "activation_codes"
#: Stripe's limit on one metadata value, in characters; a subscription has
#: at most 50 keys of at most 40 characters (https://docs.stripe.com/metadata).
METADATA_VALUE_LIMIT = 500
#: Keys for codes: `activation_codes`, then `activation_codes_2` ... `_5`.
CODES_KEYS = 5


def codes_metadata(codes: list[str]) -> tuple[dict[str, str], list[str]]:
    """The metadata that holds `codes`, and the codes left out.

    `activation_codes` holds as many whole codes, comma-separated, as fit in
    Stripe's 500 characters (16 of ours, 29 characters each); the next go to
    `activation_codes_2`, and so on to `activation_codes_5` (80 codes in
    all); codes past that are left out (the admin API and the portal still
    show them). Every key is always given, the unused ones empty, which
    Stripe takes as "delete" (https://docs.stripe.com/metadata): a set that
    shrank leaves no stale codes behind. No codes empties every key.
    ValueError if one code alone is longer than a metadata value."""
    values: list[list[str]] = [[] for _ in range(CODES_KEYS)]
    key, length = 0, 0
    left_out: list[str] = []
    for code in codes:
        if len(code) > METADATA_VALUE_LIMIT:
            raise ValueError(f"a code of {len(code)} characters fits no metadata value")
        if key < CODES_KEYS and values[key] and length + 1 + len(code) > METADATA_VALUE_LIMIT:
            key, length = key + 1, 0
        if key >= CODES_KEYS:
            left_out.append(code)
            continue
        length += len(code) + (1 if values[key] else 0)  # and its comma
        values[key].append(code)
    names = [CODES_KEY, *(f"{CODES_KEY}_{n}" for n in range(2, CODES_KEYS + 1))]
    return {name: ",".join(value) for name, value in zip(names, values, strict=True)}, left_out


class StripeAPI:
    """One source's view of Stripe's API. `base` replaces
    https://api.stripe.com (a test double, stripe-mock)."""

    def __init__(self, api_key: str, base: str | None = None) -> None:
        # The fold waits for a fetch (a truncated invoice, a tie): a short
        # timeout and one retry bound that wait to ~20 s, not 80 s x 3.
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": base} if base else {},
            max_network_retries=1,
            http_client=stripe.new_default_http_client(timeout=TIMEOUT_SECONDS),
        )

    def events(self, since: datetime) -> Iterator[dict[str, Any]]:
        """Every event created at or after `since` (at most 30 days back),
        newest first, as the JSON a webhook would carry."""
        since = max(since, datetime.now(UTC) - EVENTS_KEPT)
        page = self.client.v1.events.list(
            {"created": {"gte": int(since.timestamp())}, "limit": 100}
        )
        for event in page.auto_paging_iter():
            yield json.loads(str(event))

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        """The subscription as Stripe has it now."""
        found = self.client.v1.subscriptions.retrieve(subscription_id)
        return dict(json.loads(str(found)))

    def write_codes(self, subscription_id: str, codes: list[str]) -> None:
        """Set the subscription's metadata `activation_codes` to `codes`,
        comma-separated, in that order (see `codes_metadata` for more than
        fit in one value); other metadata keys are left alone.

        Raises `stripe.StripeError` as Stripe answered (a 404 for an unknown
        subscription, a 403 for a key without write access to subscriptions,
        `APIConnectionError` when it cannot be reached). Not retried here:
        the outbox that calls it retries with backoff and logs each try."""
        metadata, left_out = codes_metadata(codes)
        if left_out:
            log.warning(
                "subscription %s has %d codes; the %d past %d keys are not written to Stripe",
                subscription_id,
                len(codes),
                len(left_out),
                CODES_KEYS,
            )
        self.client.v1.subscriptions.update(
            subscription_id,
            {"metadata": metadata},
            {"max_network_retries": 0},
        )

    def invoice_lines(self, invoice_id: str) -> list[dict[str, Any]]:
        """All lines of an invoice (a webhook embeds the first 10)."""
        page = self.client.v1.invoices.line_items.list(invoice_id, {"limit": 100})
        return [json.loads(str(line)) for line in page.auto_paging_iter()]


def complete_invoice(payload: dict[str, Any], api: StripeAPI) -> dict[str, Any]:
    """The event with its invoice's lines fetched in full when the webhook
    carried only the first page (`lines.has_more`); unchanged otherwise, or
    when Stripe cannot be reached (the adapter then takes the rest from the
    subscription, see `services.providers.stripe`)."""
    data = payload.get("data")
    if not isinstance(data, dict):
        return payload
    invoice = data.get("object")
    if not isinstance(invoice, dict) or invoice.get("object") != "invoice":
        return payload
    lines = invoice.get("lines")
    if not isinstance(lines, dict) or lines.get("has_more") is not True:
        return payload
    invoice_id = invoice.get("id")
    if not isinstance(invoice_id, str):
        return payload
    try:
        every = api.invoice_lines(invoice_id)
    except stripe.StripeError as exc:
        log.warning("could not fetch the lines of invoice %s: %s", invoice_id, exc)
        return payload
    whole = {**invoice, "lines": {**lines, "data": every, "has_more": False}}
    return {**payload, "data": {**data, "object": whole}}


@dataclass
class BackfillResult:
    listed: int = 0
    sent: int = 0


async def backfill(
    source: Source,
    api: StripeAPI,
    since: datetime,
    seen: Callable[[list[str]], Awaitable[set[str]]],
    publish: Callable[[bytes, bytes], Awaitable[object]],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> BackfillResult:
    """Send Stripe's events since `since` that never reached us (by event id:
    `seen` answers which of a list have a receipt) through the raw topic,
    oldest first, each marked `via: backfill`. Blocking calls to Stripe run
    in a worker thread."""
    import anyio

    events = await anyio.to_thread.run_sync(lambda: list(api.events(since)))
    events.sort(key=lambda e: (e.get("created") or 0, str(e.get("id"))))
    result = BackfillResult(listed=len(events))
    known: set[str] = set()
    ids = [str(e.get("id")) for e in events]
    for start in range(0, len(ids), 500):
        known |= await seen(ids[start : start + 500])
    missing = [e for e in events if str(e.get("id")) not in known]
    for done, event in enumerate(missing, 1):
        envelope = make_envelope(source, event, json.dumps(event), {}, via="backfill")
        await publish(envelope.model_dump_json().encode(), envelope.routing_key.encode())
        result.sent += 1
        progress(done, len(missing))
    if missing:
        log.info(
            "backfill of %s: %d of %d events were missing; sent",
            source.name,
            result.sent,
            result.listed,
        )
    return result


def current_subscription(
    subscription_id: str, event_id: str, api: StripeAPI, now: datetime
) -> dict[str, Any] | None:
    """A `customer.subscription.updated` event made of the subscription as
    Stripe has it at `now` (id `<event_id>/fetched`, created `now`), to
    settle two updates in one second that their payloads cannot order;
    None when Stripe cannot be reached."""
    try:
        subscription = api.subscription(subscription_id)
    except stripe.StripeError as exc:
        log.warning("could not fetch subscription %s: %s", subscription_id, exc)
        return None
    return {
        "id": f"{event_id}/fetched",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": int(now.timestamp()),
        "data": {"object": subscription},
    }
