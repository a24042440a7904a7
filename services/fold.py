"""The domain service: folds raw webhooks from Kafka into the event store.

Each partition's share of a consumer batch is applied in one transaction that
also records the partition's last offset (an eventsourcing tracking record
named `<topic>/<partition>`). Offsets at or below the recorded one are skipped,
so a redelivery after a crash or rebalance is never applied twice; the Kafka
offset is committed only after the database commit, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID, uuid4

import anyio
from aiokafka import TopicPartition
from eventsourcing.persistence import IntegrityError, Tracking
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from contracts.api import ReceiptView
from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from domain.commands import (
    Command,
    Effect,
    OrderEvent,
    Rules,
    apply,
    settle_due,
    still_waits,
    touches,
)
from domain.dead_letter import DeadLetter, dead_letter_id
from domain.entitlement import Entitlement, Order, Payment, order_id
from domain.receipt import ReceiptResolution, Receipts, classify, receipt, resolution_id
from services.codes import CodeBook
from services.config import Config
from services.health import Backoff, Health, describe, sleep_unless, transient
from services.kafka import end_offsets, incarnation, is_marker
from services.metrics import DEAD_LETTERS, EVENTS_FOLDED, FOLD_BATCHES, WEBHOOKS_FOLDED
from services.personal import Personal, address_in
from services.providers import (
    Unmappable,
    check,
    event_type,
    has_control_character,
    unsigned_effect_refusal,
    unsigned_refusal,
)
from services.readmodel import ReadModel
from services.store import AggregateCache, Batch, EntitlementStore
from services.stripe_api import StripeAPI, complete_invoice, current_subscription

log = logging.getLogger("entitle.domain")

CONSUMER_GROUP = "entitle-domain"
#: A batch with two bad webhooks is folded in halves from this many (each).
SPLIT_FROM = 16
FOLD = "fold"


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
    #: (source, provider event id, reason) of each new dead letter: logged
    #: once saved, not on each attempt at the batch.
    letters: list[tuple[str, str, str]] = field(default_factory=list, repr=False)

    def add(self, other: FoldResult) -> None:
        """Count `other`'s (a part of the same batch) in."""
        self.webhooks += other.webhooks
        self.skipped += other.skipped
        self.dead_letters += other.dead_letters
        self.events += other.events
        self.letters += other.letters


@dataclass(frozen=True)
class Decoded:
    """A raw webhook, parsed and normalized: the commands that mapped, and
    the reason (with the provider event id) if some part did not."""

    webhook: RawWebhookV1
    commands: list[Command]
    reason: str | None
    event_id: str
    event_type: str = ""
    #: The envelope's JSON, kept with the receipt.
    envelope: bytes = b""
    #: The customer's e-mail address it names, if any: what its personal
    #: data (the envelope, a dead letter's body) are sealed under.
    owner: str | None = None


class Refused(Exception):
    """A webhook that folded, but may not be kept (an unsigned source's that
    would take access away): it is dead-lettered with this reason."""


def customer_email(commands: Sequence[Command]) -> str | None:
    """The customer's e-mail address the commands name, if any: the key a
    webhook's personal data are sealed under."""
    for command in commands:
        if isinstance(command, OrderEvent) and command.customer and command.customer.email:
            return command.customer.email
    return None


def position_name(topic: str, partition: int, incarnation: str = "") -> str:
    """The tracking name of a partition's position: `<topic>/<partition>`,
    or `<topic>@<incarnation>/<partition>` for one incarnation of the topic
    (a position is only meaningful in the log it came from)."""
    if incarnation:
        return f"{topic}@{incarnation}/{partition}"
    return f"{topic}/{partition}"


class DomainService:
    def __init__(
        self,
        store: EntitlementStore,
        config: Config,
        codes: CodeBook,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache_size: int = 10_000,
        apis: Mapping[str, StripeAPI] | None = None,
    ) -> None:
        #: Sources whose provider API can fill in what a webhook left out.
        self.apis = dict(apis or {})
        self.store = store
        self.config = config
        self.clock = clock
        self.codes = codes
        self.rules = Rules(config.catalog, config.policy, codes.hash)
        self.cache = AggregateCache(cache_size)

    def process(
        self,
        records: Sequence[Record],
        incarnation: str = "",
        decoded: dict[tuple[str, int], Decoded] | None = None,
        now: datetime | None = None,
    ) -> FoldResult:
        """Apply a consumer batch in one transaction, with each partition's
        last offset (under the raw log's `incarnation`); blocking, so call it
        from a worker thread. `decoded`: webhooks decoded (and bad ones found)
        by an earlier attempt at these records, by (position name, offset),
        at `now` (the attempt's time, which the rules see; default the clock's).

        A webhook whose folding raises is taken out of the batch and dead-
        lettered with the error, and the rest is folded again without it: one
        bad record never stops its partition. From the second bad one in a
        batch, the batch is folded in halves (`_in_halves`). Errors that say
        the database is unavailable propagate, so the caller retries the
        whole batch later."""
        by_partition: dict[str, list[Record]] = defaultdict(list)
        for record in records:
            if is_marker(record.value):
                continue  # names the log (RawLog); no webhook
            by_partition[position_name(record.topic, record.partition, incarnation)].append(record)
        for group in by_partition.values():
            group.sort(key=lambda r: r.offset)
        now = self.clock() if now is None else now
        decoded = {} if decoded is None else decoded
        conflicts = poisons = 0
        while True:
            pending: dict[str, list[Record]] = {}
            for name, group in by_partition.items():
                last = self.store.position(name)
                fresh = [r for r in group if last is None or r.offset > last]
                if fresh:
                    pending[name] = fresh
            todo: list[tuple[tuple[str, int], Decoded]] = []
            for name, group in pending.items():
                for record in group:
                    key = (name, record.offset)
                    if key not in decoded:
                        decoded[key] = self._decode(record, now)
                    todo.append((key, decoded[key]))
            result = FoldResult(webhooks=len(todo), skipped=len(records) - len(todo))
            if not todo:
                return result
            batch = Batch(self.store, self.cache)
            saved = False
            poison: tuple[tuple[str, int], Exception] | None = None
            try:
                self._prefetch(batch, [item for _, item in todo])
                receipts = []
                for key, item in todo:
                    try:
                        receipts.append(self._fold(item, batch, now, result))
                    except Exception as exc:
                        if transient(exc) or not item.commands:
                            raise
                        poison = (key, exc)
                        break
                if poison is None:
                    first, offset = todo[0][0]
                    recorded = Receipts.record(receipts, f"{first}/{offset}", now)
                    positions = [
                        Tracking(name, group[-1].offset) for name, group in pending.items()
                    ]
                    # New customers' keys in one transaction, not one each.
                    self.store.keyring.prepare(item.owner for _, item in todo if item.owner)
                    webhooks = [(item.webhook.receipt_id, self._sealed(item)) for _, item in todo]
                    # The receipts first in the log: a projector that reads this
                    # transaction in several batches then has a parked receipt
                    # before the event that applies its fact after all.
                    result.events = self.store.record([recorded, *batch], positions, webhooks)
                    saved = True
                    _log_letters(result.letters)
            except IntegrityError:
                # Another consumer saved these offsets or aggregates first (a
                # rebalance, or an admin action): reload, apply what is left.
                conflicts += 1
                if conflicts == 5:
                    raise RuntimeError("could not save a batch after 5 attempts") from None
                log.warning("conflict saving a batch (attempt %d); retrying", conflicts)
                continue
            except Exception as exc:
                if transient(exc):
                    raise
                if len(todo) > 1:
                    # Something in the batch cannot be saved (or loaded): find
                    # which webhook by saving them one at a time.
                    log.warning("batch cannot be saved (%s); saving one at a time", describe(exc))
                    return self._one_by_one(by_partition, incarnation, decoded, now)
                if not todo[0][1].commands:
                    raise  # not even its dead letter can be saved
                poison = (todo[0][0], exc)
            finally:
                batch.done(saved)
            if poison is None:
                return result
            key, error = poison
            item = decoded[key]
            if isinstance(error, Refused):
                reason = str(error)
                log.warning("webhook %s (%s) refused: %s", item.webhook.receipt_id, key, reason)
            else:
                reason = f"folding failed: {describe(error)}"
                log.error(
                    "webhook %s (%s) cannot be folded: %s", item.webhook.receipt_id, key, reason
                )
            decoded[key] = replace(item, commands=[], reason=reason)
            poisons += 1
            if poisons > 1 and len(todo) >= 2 * SPLIT_FROM:
                left = [record for group in pending.values() for record in group]
                halves = self._in_halves(left, incarnation, decoded, now)
                halves.skipped += len(records) - len(left)
                return halves

    def _in_halves(
        self,
        records: Sequence[Record],
        incarnation: str,
        decoded: dict[tuple[str, int], Decoded],
        now: datetime,
    ) -> FoldResult:
        """Fold what is left of a batch with bad webhooks in it (`records`,
        none folded yet) as two transactions, each half (in halves again,
        should it hold two bad ones) saved apart, at the batch's `now`.
        Each bad webhook found costs a pass over the batch: k of them in
        2,000 webhooks took k passes over 2,000 (about 170 s with every one
        bad, 6.6 s with 1 %), in halves about log2(2,000) passes over each
        part of it (4.3 s and 2.0 s). Each half
        holds every partition's records in offset order, so the first half's
        positions are below the second's, and a crash between them redoes
        only the second."""
        ordered = sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
        middle = len(ordered) // 2
        total = FoldResult()
        for half in (ordered[:middle], ordered[middle:]):
            total.add(self.process(half, incarnation, decoded, now))
        return total

    def _one_by_one(
        self,
        by_partition: dict[str, list[Record]],
        incarnation: str,
        decoded: dict[tuple[str, int], Decoded],
        now: datetime,
    ) -> FoldResult:
        total = FoldResult()
        for group in by_partition.values():
            for record in group:
                total.add(self.process([record], incarnation, decoded, now))
        return total

    def _sealed(self, item: Decoded) -> bytes:
        """The webhook as kept beside the events: sealed under its customer's
        key when it names the customer's e-mail (services/personal.py)."""
        if item.owner is None:
            return item.envelope
        return self.store.keyring.seal_bytes(item.owner, item.envelope)

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
            return Decoded(unreadable, [], why, where, "", unreadable.model_dump_json().encode())
        commands, reason, payload = self._normalize(webhook, now)
        kind = event_type(payload) if isinstance(payload, dict) else ""
        event_id = self._event_id(webhook, payload)
        owner = customer_email(commands) or address_in(payload)
        return Decoded(webhook, commands, reason, event_id, kind, record.value or b"", owner)

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

    def _fold(
        self, item: Decoded, batch: Batch, now: datetime, result: FoldResult
    ) -> dict[str, Any]:
        """Fold one decoded webhook into the batch (counting a new dead
        letter in `result`); returns its receipt."""
        effect = Effect()
        for command in item.commands:
            effect.merge(apply(command, batch, self.rules, now))
        for command in self._settle_ties(item, batch, now):
            effect.merge(apply(command, batch, self.rules, now))
        source = self.config.sources.get(item.webhook.source)
        if source is not None and source.unsigned and item.commands:
            refusal = unsigned_effect_refusal(effect)
            if refusal is not None:
                raise Refused(refusal)  # the batch is folded again without it
        for cause in effect.delivered:
            # A fact dead-lettered after waiting parked_days, applied at last.
            letter = batch.find(dead_letter_id(cause.source, cause.event_id), DeadLetter)
            if letter is not None:
                letter.resolved("applied when what it waited for arrived", now)
        webhook = item.webhook
        if item.reason is not None and self._dead_letter(
            batch, webhook, item.reason, item.event_id, now, item.owner
        ):
            result.dead_letters += 1
            result.letters.append((webhook.source, item.event_id, item.reason))
        outcome, detail = classify(item.reason, len(item.commands), effect, item.event_type)
        return receipt(
            receipt=webhook.receipt_id,
            source=webhook.source,
            provider=webhook.provider,
            provider_event_id=item.event_id,
            event_type=item.event_type,
            # Shown and stored as text: a key the ingress did not vet is left out.
            order_ref="" if has_control_character(webhook.routing_key) else webhook.routing_key,
            received_at=webhook.received_at,
            outcome=outcome,
            detail=detail,
            effect=effect,
            via=webhook.via,
        )

    def _settle_ties(self, item: Decoded, batch: Batch, now: datetime) -> list[Command]:
        """With a provider API: when a subscription update leaves its order's
        newest snapshot tied in the same second with one it cannot be ordered
        against, the subscription as the provider has it now, to apply too."""
        api = self.apis.get(item.webhook.source)
        if api is None:
            return []
        for command in item.commands:
            if not isinstance(command, OrderEvent) or command.fact["kind"] != "subscription":
                continue
            order = batch.find(order_id(command.source, command.order_ref), Order)
            if order is None:
                continue
            tied = [
                e
                for e in (batch.find(i, Entitlement) for i in order.entitlements.values())
                if e is not None and e.facts.undecided_tie()
            ]
            if not tied:
                continue
            fetched = current_subscription(command.order_ref, item.event_id, api, now)
            if fetched is None:
                return []
            log.info("subscription %s: two updates in one second; fetched it", command.order_ref)
            webhook = item.webhook.model_copy(update={"body": json.dumps(fetched)})
            commands, reason, _ = self._normalize(webhook, now)
            if reason is not None:
                log.warning("fetched subscription %s: %s", command.order_ref, reason)
                return []
            return commands
        return []

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
            api = self.apis.get(webhook.source)
            if api is not None:
                payload = complete_invoice(payload, api)
            commands = source.provider.normalize(webhook.source, payload, self.config.catalog, now)
            check(commands)
            reason: str | None = None
        except Unmappable as exc:
            try:
                check(exc.commands)
            except Unmappable as bad:
                return [], f"{bad.reason}; {exc.reason}", payload
            commands, reason = exc.commands, exc.reason
        except Exception as exc:  # a provider adapter bug must not block the partition
            log.exception("cannot normalize webhook %s", webhook.receipt_id)
            return [], f"normalizing failed: {describe(exc)}", payload
        # What did map of a partly unmappable event is held to the same rule.
        refusal = unsigned_refusal(commands, now) if source and source.unsigned else None
        if refusal is not None:
            return [], "; ".join(r for r in (refusal, reason) if r), payload
        return commands, reason, payload

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
                if letter.webhook.get("body") is None:
                    # Sealed under the key of a customer since erased.
                    letter.redriven("its webhook was erased with its customer", now)
                    failed += 1
                    continue
                webhook = RawWebhookV1.model_validate(letter.webhook)
                commands, reason, _ = self._normalize(webhook, now)
                effect = Effect()
                for command in commands:
                    effect.merge(apply(command, batch, self.rules, now))
                if reason is None and effect.waits_for and not effect.events:
                    reason = f"still waits for {effect.waits_for}"
                letter.redriven(reason, now)
                if reason is None:
                    self._resolution(batch, webhook.receipt_id, now).resolve(
                        "applied",
                        "re-driven",
                        now,
                        [str(i) for i in effect.events],
                        sorted({name for names in effect.events.values() for name in names}),
                    )
                resolved, failed = resolved + (reason is None), failed + (reason is not None)
            try:
                self.store.record(batch, None)
            except IntegrityError:
                log.warning("conflict re-driving dead letters (attempt %d)", attempt + 1)
                continue
            return resolved, failed
        raise RuntimeError("could not re-drive dead letters after 5 attempts")

    def give_up(
        self,
        batch: Batch,
        parked: ReceiptView,
        waits_on: list[str],
        now: datetime,
        letters: list[tuple[str, str, str]],
    ) -> bool:
        """A parked webhook that waited `policy.parked_for` becomes a dead
        letter saying what it waited for. It stays parked in the domain: if
        what it names arrives after all, it is applied then. Returns whether
        it gave up (not if it was applied, or given up, meanwhile); a new
        dead letter's (source, event id, reason) is added to `letters`, for
        the caller to log once it is saved."""
        resolution = self._resolution(batch, parked.id, now)
        if resolution.outcome == "dead_letter" or not still_waits(batch, waits_on):
            return False
        days = self.config.policy.parked_for / timedelta(days=1)
        reason = f"waited {days:g} days for {parked.waits_for}"
        stored = self.store.webhook(parked.id)
        webhook = (
            RawWebhookV1.model_validate_json(stored)
            if stored is not None
            else RawWebhookV1(
                receipt_id=parked.id,
                source=parked.source,
                provider=parked.provider,
                routing_key=parked.order_ref,
                received_at=parked.received_at,
                headers={},
                body="",
            )
        )
        if self._dead_letter(batch, webhook, reason, parked.provider_event_id, now):
            letters.append((webhook.source, parked.provider_event_id, reason))
        resolution.resolve("dead_letter", reason, now)
        return True

    @staticmethod
    def _resolution(batch: Batch, receipt_key: str, now: datetime) -> ReceiptResolution:
        resolution = batch.find(resolution_id(receipt_key), ReceiptResolution)
        if resolution is None:
            resolution = ReceiptResolution.open(receipt_key, now)
            batch.add(resolution)
        return resolution

    def _event_id(self, webhook: RawWebhookV1, payload: Any) -> str:
        source = self.config.sources.get(webhook.source)
        if source is not None and isinstance(payload, dict):
            event_id = source.provider.event_id(payload)
            if event_id and not has_control_character(event_id) and len(event_id) <= 255:
                return event_id
        return webhook.receipt_id

    def _dead_letter(
        self,
        batch: Batch,
        webhook: RawWebhookV1,
        reason: str,
        event_id: str,
        now: datetime,
        owner: str | None = None,
    ) -> int:
        if batch.find(dead_letter_id(webhook.source, event_id), DeadLetter) is not None:
            return 0  # the same provider event already dead-lettered
        kept = webhook.model_dump(mode="json")
        if owner:
            kept["body"] = Personal(kept["body"], owner)  # sealed under the customer's key
        batch.add(
            DeadLetter.record(
                source=webhook.source,
                provider=webhook.provider,
                provider_event_id=event_id,
                reason=reason,
                webhook=kept,
                at=now,
            )
        )
        return 1


def _log_letters(letters: list[tuple[str, str, str]]) -> None:
    """One line per new dead letter (source, provider event id, reason),
    once the transaction that saved them has committed."""
    for source, event_id, reason in letters:
        log.warning("dead letter %r/%r: %s", source, event_id, reason)


class Scheduler:
    """Applies time-based transitions (overdue, suspend, expire, scheduled
    cancel) when an entitlement's due time comes, and turns webhooks parked
    longer than `lifecycle.parked_days` into dead letters.

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
        waited = self.read_model.waiting_since(now - self.service.rules.policy.parked_for)
        if not due and not waited:
            return 0
        for attempt in range(5):
            batch = Batch(self.service.store)
            for raw_id in due:
                entitlement = batch.find(UUID(raw_id), Entitlement)
                if entitlement is not None:
                    settle_due(entitlement, self.service.rules, now)
            letters: list[tuple[str, str, str]] = []
            given_up = sum(
                self.service.give_up(batch, parked, waits_on, now, letters)
                for parked, waits_on in waited
            )
            try:
                saved = self.service.store.record(batch, None)
            except IntegrityError:
                log.warning("conflict settling due entitlements (attempt %d)", attempt + 1)
                continue
            _log_letters(letters)
            DEAD_LETTERS.inc(given_up)
            return saved
        raise RuntimeError("could not settle due entitlements after 5 attempts")

    async def run(
        self, stop: asyncio.Event, working: Callable[[], None], interval: float = 1.0
    ) -> None:
        """Settle due entitlements every `interval` seconds until `stop` is
        set; an error propagates (to `supervise`, which starts it again)."""
        while not stop.is_set():
            saved = await anyio.to_thread.run_sync(self.run_once)
            working()
            if saved:
                log.info("schedule: %d events", saved)
            await sleep_unless(stop, interval)


class RawLog:
    """Which incarnation of the raw topic the fold reads.

    A stored position is only trusted for the log it came from: a topic
    deleted and created again, or the embedded broker started again (it keeps
    nothing), begins a new log at offset 0, and the old positions would skip
    its first records. The broker's topic id (Metadata v10+) names the log,
    or on a broker without ids a marker record at the start of partition 0
    (`services.kafka.incarnation`); positions are recorded under that name
    (`position_name`), and those of earlier logs are deleted.

    The name is looked up at start, whenever records could come from another
    log than the one last seen (a first batch, offsets that go back), and
    every `interval` seconds by `watch`, since a consumer whose position lies
    beyond a new log's end may wait there silently. On a new log each
    partition is read from its start: records fetched from elsewhere are
    dropped unfolded, and the partition sought back to the start.
    """

    def __init__(self, bootstrap: str, store: EntitlementStore, topic_ids: bool = True) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.topic_ids = topic_ids
        self.current: str | None = None
        #: The FastStream subscriber reading the topic (`subscribe` sets it).
        self.subscriber: Any = None
        self._next: dict[int, int] = {}  # partition -> offset expected next
        self._new_log = False  # each partition must be read from its start...
        self._started: set[int] = set()  # ...and these have been
        self._lock = asyncio.Lock()

    async def accept(self, records: Sequence[Record]) -> tuple[str, list[Record]]:
        """The incarnation to record positions under, and the records to fold
        now (possibly fewer than given, see above)."""
        if self.current is None or any(
            record.offset < self._next.get(record.partition, record.offset + 1)
            for record in records
        ):
            await self.check()
        current = self.current
        assert current is not None
        kept = list(records)
        waiting = {r.partition for r in records} - self._started if self._new_log else set()
        if waiting:
            partitions = [TopicPartition(RAW_TOPIC, p) for p in sorted(waiting)]
            starts = await self.consumer.beginning_offsets(partitions)
            for partition in partitions:
                first = min(r.offset for r in kept if r.partition == partition.partition)
                name = position_name(RAW_TOPIC, partition.partition, current)
                if (
                    first <= starts[partition]
                    or await anyio.to_thread.run_sync(self.store.position, name) is not None
                ):
                    self._started.add(partition.partition)
                else:
                    kept = [r for r in kept if r.partition != partition.partition]
                    self.consumer.seek(partition, starts[partition])
        return current, kept

    @property
    def consumer(self) -> Any:
        """The subscriber's aiokafka consumer, once it runs."""
        return getattr(self.subscriber, "consumer", None)

    def folded(self, records: Sequence[Record]) -> None:
        for record in records:
            self._next[record.partition] = max(
                self._next.get(record.partition, 0), record.offset + 1
            )

    async def watch(
        self, stop: asyncio.Event, working: Callable[[], None], interval: float = 5.0
    ) -> None:
        while not stop.is_set():
            await self.check()
            working()
            await sleep_unless(stop, interval)

    async def check(self) -> None:
        async with self._lock:
            found = await incarnation(self.bootstrap, RAW_TOPIC, self.topic_ids)
            if found == self.current:
                return
            positions = await anyio.to_thread.run_sync(self.store.positions, RAW_TOPIC)
            known = {self._of(name) for name in positions}
            if found is None:
                # No topic id, and no marker where partition 0 begins: retention
                # removed it, or the topic held webhooks before the engine ran,
                # or was created again by hand. The log is the one whose
                # positions are recorded, unless some lie beyond its end.
                named = sorted(known - {""})
                trusted = self.current
                if trusted is None:
                    trusted = named[0] if len(named) == 1 else ""
                ends = await end_offsets(self.bootstrap, RAW_TOPIC) if trusted else {}
                beyond = [
                    name
                    for name, offset in positions.items()
                    if self._of(name) == trusted
                    and offset >= ends.get(int(name.rpartition("/")[2]), offset + 1)
                ]
                if not beyond:
                    if self.current is None:
                        log.warning(
                            "%s has no topic id and no marker at its start: "
                            "trusting the positions recorded for %s",
                            RAW_TOPIC,
                            self._name(trusted),
                        )
                        self.current = trusted
                    return
                if self.current is None:
                    self.current = trusted  # so the log below is "created again"
                found = f"unmarked-{uuid4()}"
            if self.current is not None:
                log.warning(
                    "%s was created again: incarnation %s, was %s; "
                    "folding the new log from its start",
                    RAW_TOPIC,
                    self._name(found),
                    self._name(self.current),
                )
                await self._start_again()
            elif known - {""} and found not in known:
                log.warning(
                    "%s is a new log: incarnation %s, positions were recorded for %s; "
                    "folding it from its start",
                    RAW_TOPIC,
                    self._name(found),
                    ", ".join(self._name(i) for i in sorted(known)),
                )
                await self._start_again()
            else:
                # Positions recorded before incarnations were (legacy names)
                # are not used; the consumer group's offsets still are, and a
                # webhook folded again is recognised by its provider event id.
                log.info("%s: incarnation %s", RAW_TOPIC, self._name(found))
            stale = [name for name in positions if self._of(name) != found]
            if stale:
                # Their log is gone: they protect nothing, and would leave
                # several logs to choose from once a marker is removed.
                await anyio.to_thread.run_sync(self.store.forget_positions, stale)
            self.current = found
            self._next.clear()

    async def drain(self, timeout: float) -> int:
        """Wait until the fold has committed every record on the raw topic,
        or has folded nothing for `timeout` seconds; the number left. A
        process of `entitle dev` calls it before it stops: what the stack
        acknowledged is then folded, where the embedded broker (which keeps
        nothing) would lose it. A backlog that is still shrinking is waited
        for, however long it takes."""
        deadline = time.monotonic() + timeout
        left = best = -1
        while True:
            try:
                left = await self._unfolded()
            except Exception as exc:
                log.warning("could not tell what is left to fold: %s", describe(exc))
                return left
            if best < 0 or left < best:
                best, deadline = left, time.monotonic() + timeout  # progress
            if left == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if left:
            log.warning("stopping with %d webhook(s) on %s not yet folded", left, RAW_TOPIC)
        return left

    async def _unfolded(self) -> int:
        return sum((await self.lag()).values())

    async def lag(self) -> dict[int, int]:
        """Records on each partition of the raw topic not yet folded (end
        offset minus the committed offset); {} before the consumer runs."""
        consumer = self.consumer
        if consumer is None:
            return {}
        lag = {}
        for partition, end in (await end_offsets(self.bootstrap, RAW_TOPIC)).items():
            committed = await consumer.committed(TopicPartition(RAW_TOPIC, partition))
            lag[partition] = max(0, end - (committed or 0))
        return lag

    async def _start_again(self) -> None:
        self._new_log = True
        self._started = set()
        if self.consumer is not None and (assigned := self.consumer.assignment()):
            await self.consumer.seek_to_beginning(*assigned)

    @staticmethod
    def _name(incarnation: str) -> str:
        return incarnation or "(none recorded)"

    @staticmethod
    def _of(name: str) -> str:
        """The incarnation a position name belongs to ('' for legacy names)."""
        return name[len(RAW_TOPIC) :].partition("/")[0].removeprefix("@")


async def _undecoded(message: Any) -> Any:
    """A batch's values as they are: the handler reads the records itself.
    FastStream's own decoding made a message object and ran json.loads on
    every record for an argument nobody read (7.7 % of the fold's time)."""
    return message.body


def subscribe(
    broker: KafkaBroker,
    service: DomainService,
    raw_log: RawLog,
    health: Health,
    max_records: int = 500,
    session_timeout: float = 6.0,
) -> None:
    """Register the raw-webhook consumer on a FastStream broker.

    A member killed without leaving the group (SIGKILL, a lost host) holds
    its partitions until `session_timeout` seconds pass without its
    heartbeat, unless its restarted successor takes it out first (app.py
    calls `evict_predecessor` before joining). Apache Kafka accepts 6 s at
    least (group.min.session.timeout.ms); the embedded broker, Tansu, holds
    a new member's join for about half the session."""
    backoff = Backoff()
    health.ok(FOLD)

    subscriber = broker.subscriber(
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
        session_timeout_ms=int(session_timeout * 1000),
        # Three heartbeats a session, as Kafka advises: one lost is no expiry.
        heartbeat_interval_ms=int(session_timeout * 1000 / 3),
        decoder=_undecoded,
    )

    raw_log.subscriber = subscriber

    @subscriber
    async def on_raw_webhooks(_: list[bytes], message: KafkaMessage) -> None:
        records = message.raw_message
        if not isinstance(records, tuple):
            records = (records,)
        started = time.perf_counter()
        try:
            incarnation, records = await raw_log.accept(records)
            result = await anyio.to_thread.run_sync(service.process, records, incarnation)
        except Exception as exc:
            # Only an unavailable database or broker gets here (a bad record is
            # dead-lettered inside): wait, then have the batch delivered again.
            delay = backoff.next()
            health.failing(FOLD, exc)
            log.error(
                "batch of %d webhooks failed (%s); it is delivered again in %.1f s",
                len(records),
                describe(exc),
                delay,
                exc_info=None if transient(exc) or backoff.attempts > 1 else exc,
            )
            FOLD_BATCHES.labels("failed").inc()
            await asyncio.sleep(delay)
            await message.nack()
            return
        FOLD_BATCHES.labels("folded").inc()
        WEBHOOKS_FOLDED.inc(result.webhooks)
        EVENTS_FOLDED.inc(result.events)
        DEAD_LETTERS.inc(result.dead_letters)
        raw_log.folded(records)
        backoff.reset()
        health.ok(FOLD)
        folded = time.perf_counter()
        await message.ack()
        log.debug(
            "folded %s in %.1f ms, offsets committed in %.1f ms",
            result,
            (folded - started) * 1000,
            (time.perf_counter() - folded) * 1000,
        )
