"""The domain service: folds raw webhooks from Kafka into the event store.

Each partition's share of a consumer batch is applied in one transaction that
also records the partition's last offset (an eventsourcing tracking record
named `<topic>/<partition>`). Offsets at or below the recorded one are skipped,
so a redelivery after a crash or rebalance is never applied twice; the Kafka
offset is committed only after the database commit, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import anyio
from eventsourcing.persistence import IntegrityError, Tracking
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain.commands import Command, Rules, apply, settle_due, touches
from domain.dead_letter import DeadLetter, dead_letter_id
from domain.entitlement import Entitlement, Order, Payment, order_id
from services.codes import CodeBook
from services.config import Config
from services.providers import Unmappable
from services.readmodel import ReadModel
from services.store import AggregateCache, Batch, EntitlementStore

log = logging.getLogger("entitle.domain")

CONSUMER_GROUP = "entitle-domain"


class Record(Protocol):
    """What the fold needs of a Kafka record (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass
class FoldResult:
    webhooks: int = 0
    skipped: int = 0
    dead_letters: int = 0
    events: int = 0


@dataclass(frozen=True)
class Decoded:
    """A raw webhook, parsed and normalized: the commands that mapped, and
    the reason (with the provider event id) if some part did not."""

    webhook: RawWebhookV1
    commands: list[Command]
    reason: str | None
    event_id: str


def position_name(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


class DomainService:
    def __init__(
        self,
        store: EntitlementStore,
        config: Config,
        codes: CodeBook,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache_size: int = 10_000,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.codes = codes
        self.rules = Rules(config.catalog, config.policy, codes.hash)
        self.cache = AggregateCache(cache_size)

    def process(self, records: Sequence[Record]) -> FoldResult:
        """Apply a consumer batch in one transaction, with each partition's
        last offset; blocking, so call it from a worker thread."""
        by_partition: dict[str, list[Record]] = defaultdict(list)
        for record in records:
            by_partition[position_name(record.topic, record.partition)].append(record)
        for group in by_partition.values():
            group.sort(key=lambda r: r.offset)
        now = self.clock()
        decoded: dict[tuple[str, int], Decoded] = {}
        for attempt in range(5):
            pending: dict[str, list[Record]] = {}
            for name, group in by_partition.items():
                last = self.store.position(name)
                fresh = [r for r in group if last is None or r.offset > last]
                if fresh:
                    pending[name] = fresh
            todo = []
            for name, group in pending.items():
                for record in group:
                    if (name, record.offset) not in decoded:
                        decoded[(name, record.offset)] = self._decode(record, now)
                    todo.append(decoded[(name, record.offset)])
            result = FoldResult(webhooks=len(todo), skipped=len(records) - len(todo))
            if not todo:
                return result
            batch = Batch(self.store, self.cache)
            saved = False
            try:
                self._prefetch(batch, todo)
                result.dead_letters = sum(self._fold(item, batch, now) for item in todo)
                positions = [Tracking(name, group[-1].offset) for name, group in pending.items()]
                result.events = self.store.record(batch, positions)
                saved = True
            except IntegrityError:
                # Another consumer saved these offsets or aggregates first (a
                # rebalance, or an admin action): reload, apply what is left.
                log.warning("conflict saving a batch (attempt %d); retrying", attempt + 1)
                continue
            finally:
                batch.done(saved)
            return result
        raise RuntimeError("could not save a batch after 5 attempts")

    def _decode(self, record: Record, now: datetime) -> Decoded:
        """Parse and normalize one raw webhook (no database access)."""
        try:
            webhook = RawWebhookV1.model_validate_json(record.value or b"")
        except ValidationError as exc:
            # Keep the bytes as they were, wrapped in an envelope, so nothing is lost.
            where = f"{record.topic}/{record.partition}/{record.offset}"
            log.error("unreadable envelope at %s: %s", where, exc.errors()[0]["msg"])
            unreadable = RawWebhookV1(
                receipt_id=where,
                source="?",
                provider="?",
                routing_key="",
                received_at=now,
                headers={},
                body=(record.value or b"").decode(errors="replace"),
            )
            why = f"unreadable envelope: {exc.errors()[0]['msg']}"
            return Decoded(unreadable, [], why, where)
        commands, reason, payload = self._normalize(webhook, now)
        event_id = self._event_id(webhook, payload) if reason is not None else ""
        return Decoded(webhook, commands, reason, event_id)

    def _prefetch(self, batch: Batch, items: list[Decoded]) -> None:
        """Load everything the batch will touch in a few queries: what the
        commands name, then what those aggregates name in turn."""
        wanted: set[UUID] = set()
        for item in items:
            for command in item.commands:
                wanted.update(touches(command))
            if item.reason is not None:
                wanted.add(dead_letter_id(item.webhook.source, item.event_id))
        for _ in range(3):
            loaded = batch.prefetch(wanted)
            wanted = set()
            for aggregate in loaded.values():
                if isinstance(aggregate, Order):
                    wanted.update(aggregate.entitlements.values())
                elif isinstance(aggregate, Payment) and aggregate.order_ref is not None:
                    wanted.add(order_id(aggregate.source, aggregate.order_ref))
            if not wanted:
                return

    def _fold(self, item: Decoded, batch: Batch, now: datetime) -> int:
        """Fold one decoded webhook into the batch; returns 1 if it dead-lettered."""
        for command in item.commands:
            apply(command, batch, self.rules, now)
        if item.reason is None:
            return 0
        return self._dead_letter(batch, item.webhook, item.reason, item.event_id, now)

    def _normalize(
        self, webhook: RawWebhookV1, now: datetime
    ) -> tuple[list[Command], str | None, Any]:
        """(commands to apply, why it is (partly) unmappable or None, payload)."""
        source = self.config.sources.get(webhook.source)
        payload: Any = None
        try:
            payload = json.loads(webhook.body)
            if not isinstance(payload, dict):
                raise Unmappable("webhook body is not a JSON object")
            if source is None:
                raise Unmappable(f"source {webhook.source!r} is not configured")
            commands = source.provider.normalize(webhook.source, payload, self.config.catalog, now)
        except Unmappable as exc:
            return exc.commands, exc.reason, payload
        except Exception as exc:  # a provider adapter bug must not block the partition
            log.exception("cannot normalize webhook %s", webhook.receipt_id)
            return [], f"internal error: {exc!r}", payload
        return commands, None, payload

    def redrive(self, letter_ids: Sequence[UUID]) -> tuple[int, int]:
        """Re-process dead letters with today's catalog, exactly as if they
        had mapped when they arrived (the provider's own times and event ids
        are kept). Returns (resolved, still unmappable)."""
        now = self.clock()
        for attempt in range(5):
            batch = Batch(self.store)
            resolved = failed = 0
            for letter_id in letter_ids:
                letter = batch.find(letter_id, DeadLetter)
                if letter is None or letter.resolved_at is not None:
                    continue
                webhook = RawWebhookV1.model_validate(letter.webhook)
                commands, reason, _ = self._normalize(webhook, now)
                for command in commands:
                    apply(command, batch, self.rules, now)
                letter.redriven(reason, now)
                resolved, failed = resolved + (reason is None), failed + (reason is not None)
            try:
                self.store.record(batch, None)
            except IntegrityError:
                log.warning("conflict re-driving dead letters (attempt %d)", attempt + 1)
                continue
            return resolved, failed
        raise RuntimeError("could not re-drive dead letters after 5 attempts")

    def _event_id(self, webhook: RawWebhookV1, payload: Any) -> str:
        source = self.config.sources.get(webhook.source)
        if source is not None and isinstance(payload, dict):
            event_id = source.provider.event_id(payload)
            if event_id:
                return event_id
        return webhook.receipt_id

    def _dead_letter(
        self, batch: Batch, webhook: RawWebhookV1, reason: str, event_id: str, now: datetime
    ) -> int:
        if batch.find(dead_letter_id(webhook.source, event_id), DeadLetter) is not None:
            return 0  # the same provider event already dead-lettered
        log.warning("dead letter %s/%s: %s", webhook.source, event_id, reason)
        batch.add(
            DeadLetter.record(
                source=webhook.source,
                provider=webhook.provider,
                provider_event_id=event_id,
                reason=reason,
                webhook=webhook.model_dump(mode="json"),
                at=now,
            )
        )
        return 1


class Scheduler:
    """Applies time-based transitions (overdue, suspend, expire, scheduled
    cancel) when an entitlement's due time comes.

    Due times are part of each entitlement's event-sourced state; the read
    model only indexes them, so a restart (or a rebuilt read model) loses no
    timer. Firing twice is harmless: a settled entitlement has a new due time.
    """

    def __init__(self, service: DomainService, read_model: ReadModel, limit: int = 500) -> None:
        self.service = service
        self.read_model = read_model
        self.limit = limit

    def run_once(self) -> int:
        """Settle every entitlement now due; returns the events saved."""
        now = self.service.clock()
        due = self.read_model.due(now, self.limit)
        if not due:
            return 0
        for attempt in range(5):
            batch = Batch(self.service.store)
            for raw_id in due:
                entitlement = batch.find(UUID(raw_id), Entitlement)
                if entitlement is not None:
                    settle_due(entitlement, self.service.rules, now)
            try:
                return self.service.store.record(batch, None)
            except IntegrityError:
                log.warning("conflict settling due entitlements (attempt %d)", attempt + 1)
        raise RuntimeError("could not settle due entitlements after 5 attempts")

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                saved = await anyio.to_thread.run_sync(self.run_once)
                if saved:
                    log.info("schedule: %d events", saved)
            except Exception:
                log.exception("schedule run failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def subscribe(broker: KafkaBroker, service: DomainService, max_records: int = 500) -> None:
    """Register the raw-webhook consumer on a FastStream broker."""

    @broker.subscriber(
        RAW_TOPIC,
        group_id=CONSUMER_GROUP,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=50,
        # A fetch returns once 64 KB wait or after 100 ms: at hundreds of
        # webhooks a second that makes batches of dozens (one transaction
        # each) rather than ones and twos, and a lone webhook waits 0.1 s.
        fetch_max_wait_ms=100,
        fetch_min_bytes=65536,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_raw_webhooks(_: list[bytes], message: KafkaMessage) -> None:
        records = message.raw_message
        if not isinstance(records, tuple):
            records = (records,)
        started = time.perf_counter()
        try:
            result = await anyio.to_thread.run_sync(service.process, records)
        except Exception:
            log.exception("batch of %d webhooks failed; it will be redelivered", len(records))
            await message.nack()
            raise
        folded = time.perf_counter()
        await message.ack()
        log.debug(
            "folded %s in %.1f ms, offsets committed in %.1f ms",
            result,
            (folded - started) * 1000,
            (time.perf_counter() - folded) * 1000,
        )
