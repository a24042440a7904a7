"""Fault suite: the whole stack as four processes on PostgreSQL and the
embedded broker, each reached through a TCP proxy this script cuts, while
webhooks arrive; then every acknowledged webhook is accounted for.

    python bench/soak.py                  # 6,000 webhooks for 1,000 subscriptions
    python bench/soak.py --short          # 1,000 webhooks, 5 s cuts: about a minute

The webhooks are `bench/lifecycle.py`'s Stripe mix (10 % duplicates, each
subscription's events shuffled and interleaved with the others'), sent at
--rate a second over --concurrency connections by a client that retries like
a provider: any answer but 202, a refused connection or a timeout sends the
webhook again after 0.1 s, 0.2 s ... at most 1 s. Meanwhile, by default:
SIGKILL the domain service (restarted at once), SIGKILL the projector, cut
the database for --cut seconds, SIGKILL the domain, cut the broker, SIGKILL
the domain (--faults). The stream is cut into one segment per fault and one
more: each fault comes halfway through its segment, and the next segment
goes out at full rate only once every service the fault hit recovered (at
two webhooks a second until then, so there is always something to fold).

The broker advertises the proxy's address, so every Kafka client (the
services' and this script's) reaches it through the proxy; this script reads
the database directly. The same webhooks, without duplicates and each
subscription's in the order they happened, are folded beforehand without
faults into a second database on a broker of their own: the result to match.

Prints, and exits 1 unless each of the first five is 0, every webhook was
acknowledged within --deadline seconds of retries, and every service
recovered:
- lost: acknowledged (202 with a receipt id) but without a receipt in
  `GET /v1/webhooks` once the stack settled;
- double-applied: provider events with two `applied` receipts, or whose
  events on an entitlement are not one run of versions in its history;
- public events missing: the store's entitlement events (but `noted`) not on
  `entitle.entitlements.events`;
- entitlements differing from the in-order run, in the read model (all but
  `sequence`, `created_at` and `updated_at`);
- outcomes differing from the in-order run: provider events whose receipts
  say otherwise (one applied, else parked, dead letter, ignored, duplicate);
- recovery: seconds from each restart, or restore, to the next fold (domain),
  commit of its projections (projector; for a broker cut, of the public
  events), 202 (ingress) or answered `GET /v1/webhooks` (api).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ingest import Connection, sign  # noqa: E402
from lifecycle import (  # noqa: E402
    CONFIG,
    PARTITIONS,
    SECRET,
    fresh_database,
    mix,
    produce,
    start,
    stop,
)

from contracts.events import EVENTS_TOPIC  # noqa: E402
from contracts.webhooks import RAW_TOPIC  # noqa: E402
from domain.entitlement import event_type  # noqa: E402
from services.kafka import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from services.projections import PUBLIC_EVENTS, PUBLIC_TYPES, READ_MODEL  # noqa: E402
from services.readmodel import ReadModel  # noqa: E402
from services.store import EntitlementStore  # noqa: E402
from tests.harness import Proxy  # noqa: E402

FAULTS = ("domain", "projector", "database", "domain", "broker", "domain")
ROLES = ("ingress", "domain", "projector", "api")
ADMIN_KEY = "ek_soak_admin_key"
#: Webhooks a second while a fault's services have not recovered yet.
TRICKLE = 2.0
#: Read-model fields that record when and how often, not what.
BOOKKEEPING = {"sequence", "created_at", "updated_at"}
#: A provider event's outcome is its deliveries' first in this order.
PRECEDENCE = ("applied", "parked", "dead_letter", "ignored", "duplicate")
POSITIONS = """
SELECT
  (SELECT coalesce(sum(last + 1), 0) FROM (
     SELECT max(notification_id) AS last FROM entitle_tracking
     WHERE application_name LIKE %(raw)s GROUP BY application_name) AS partitions),
  coalesce((SELECT position FROM entitle_read_positions WHERE name = %(read_model)s), 0),
  coalesce((SELECT position FROM entitle_read_positions WHERE name = %(public)s), 0),
  coalesce((SELECT max(notification_id) FROM entitle_events), 0)
"""


@dataclass(frozen=True)
class Options:
    webhooks: int = 6000
    subscriptions: int = 1000
    seed: int = 13
    rate: float = 100.0
    concurrency: int = 16
    cut: float = 10.0
    faults: tuple[str, ...] = FAULTS
    postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    #: The longest wait for a recovery, for the stack to settle, and the
    #: longest a webhook is sent again.
    deadline: float = 120.0
    #: Extra environment for the services (e.g. the Kafka session timeout).
    env: tuple[tuple[str, str], ...] = ()
    keep: bool = False

    @classmethod
    def short(cls, **overrides: Any) -> Options:
        """The same faults on about 1,000 webhooks, with 5 s cuts."""
        return replace(cls(webhooks=1000, subscriptions=150, rate=25.0, cut=5.0), **overrides)


@dataclass
class Result:
    """What a run left in the read model: the entitlements (but their
    bookkeeping), and each provider event's outcome."""

    entitlements: dict[str, dict[str, Any]]
    outcomes: dict[str, str]


@dataclass
class Recovery:
    fault: str
    service: str
    #: Seconds to the service's next fold or commit; None if not within the deadline.
    seconds: float | None


@dataclass
class Report:
    webhooks: int = 0
    distinct: int = 0
    acknowledged: int = 0
    attempts: int = 0
    #: Webhooks still not acknowledged after retrying for the deadline.
    given_up: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    lost_in_store: int = 0
    double_applied: list[str] = field(default_factory=list)
    public_expected: int = 0
    public_missing: list[str] = field(default_factory=list)
    public_repeated: int = 0
    entitlements: int = 0
    differing: list[str] = field(default_factory=list)
    #: Provider events whose outcome (applied, parked …) is not the in-order run's.
    outcomes_differing: list[str] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    projection_errors: int = 0
    in_order_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(
            self.given_up
            or self.lost
            or self.double_applied
            or self.public_missing
            or self.differing
            or self.outcomes_differing
            or any(r.seconds is None for r in self.recoveries)
        )


def database_url(admin_url: str, name: str, port: int | None = None) -> str:
    parts = urlsplit(admin_url)
    netloc = parts.netloc
    if port is not None:
        netloc = f"{netloc.rpartition('@')[0]}@127.0.0.1:{port}".lstrip("@")
    return parts._replace(netloc=netloc, path=f"/{name}").geturl()


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_env(bootstrap: str, database: str, options: Options) -> dict[str, str]:
    return {
        "ENTITLE_KAFKA_BOOTSTRAP": bootstrap,
        "ENTITLE_KAFKA_IDEMPOTENCE": "false",
        "ENTITLE_DATABASE_URL": database,
        "ENTITLE_ADMIN_KEYS": f"soak:{ADMIN_KEY}",
        "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
        **dict(options.env),
    }


async def start_all(
    roles: tuple[str, ...], workdir: Path, env: dict[str, str]
) -> dict[str, subprocess.Popen[bytes]]:
    """Start the domain service first: processes creating the tables of an
    empty database at once collide (IntegrityError on pg_type), then the
    others side by side."""
    first = {"domain": await asyncio.to_thread(start, "domain", workdir, env)}
    others = [role for role in roles if role != "domain"]
    started = await asyncio.gather(
        *(asyncio.to_thread(start, r, workdir, env) for r in others), return_exceptions=True
    )
    processes, errors = first, []
    for role, outcome in zip(others, started, strict=True):
        if isinstance(outcome, BaseException):
            errors.append(outcome)
        else:
            processes[role] = outcome
    if errors:  # none left running behind us
        for process in processes.values():
            stop(process)
        raise errors[0]
    return processes


class Positions:
    """The stack's progress, read from the database directly (not through
    the proxy): webhooks folded (tracking), each projection's position, and
    the end of the event log."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def read(self) -> tuple[int, int, int, int]:
        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        params = {"raw": RAW_TOPIC + "%", "read_model": READ_MODEL, "public": PUBLIC_EVENTS}
        try:
            row = await (await self._conn.execute(POSITIONS, params)).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0, 0, 0, 0
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    async def settled(self, which: slice, quiet: float = 0.25) -> tuple[int, int, int, int]:
        """The positions once `which` of them stayed the same for `quiet` seconds."""
        last = await self.read()
        while True:
            await asyncio.sleep(quiet)
            now = await self.read()
            if now[which] == last[which]:
                return now
            last = now

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def until(
    probe: Callable[[], Awaitable[bool] | bool], deadline: float, every: float = 0.05
) -> float | None:
    """Seconds until `probe()` holds, polling; None after `deadline` seconds."""
    began = time.monotonic()
    while time.monotonic() - began < deadline:
        result = probe()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - began
        await asyncio.sleep(every)
    return None


# -- the provider ----------------------------------------------------------------


class Sender:
    """Sends the stream to the ingress like a provider: each webhook until it
    is acknowledged, again after any other answer, error or timeout."""

    def __init__(self, port: int, events: list[dict[str, Any]], options: Options) -> None:
        self.port = port
        self.events = events
        self.options = options
        self.handed = 0  # webhooks handed to a connection so far
        self.fast_until = 0  # up to which webhook the stream goes at full rate
        self.acked: dict[str, str] = {}  # receipt id -> provider event id
        self.last_ack = 0.0
        self.attempts = 0
        self.given_up = 0
        self.refused: Counter[str] = Counter()

    async def run(self) -> None:
        # A short queue: while every connection retries, the stream waits.
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.options.concurrency)

        async def pace() -> None:
            due = time.monotonic()
            for n, event in enumerate(self.events):
                rate = self.options.rate if n < self.fast_until else TRICKLE
                due = max(due + 1 / rate, time.monotonic())
                await asyncio.sleep(due - time.monotonic())
                await queue.put(event)
                self.handed = n + 1
            for _ in range(self.options.concurrency):
                await queue.put(None)

        async def connection() -> None:
            client = Connection("127.0.0.1", self.port)
            while (event := await queue.get()) is not None:
                await self.deliver(client, event)
            await client.close()

        await asyncio.gather(pace(), *(connection() for _ in range(self.options.concurrency)))

    async def deliver(self, client: Connection, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        delay = 0.1
        first = time.monotonic()
        while time.monotonic() - first < self.options.deadline:
            self.attempts += 1
            headers = {"Stripe-Signature": sign(body, SECRET), "Content-Type": "application/json"}
            try:
                status, answer = await asyncio.wait_for(
                    client.request("/webhooks/stripe-main", body, headers), 30
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                await client.close()  # whatever it answers later belongs to no request
                self.refused[type(exc).__name__] += 1
            else:
                if status == 202:
                    self.acked[json.loads(answer)["receipt_id"]] = event["id"]
                    self.last_ack = time.monotonic()
                    return
                self.refused[str(status)] += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(1.0, delay * 2)
        self.given_up += 1  # a provider would go on for days; a run must end


# -- the faults ----------------------------------------------------------------------


class Stack:
    """The four services, with the broker and the database behind proxies."""

    def __init__(self, options: Options, workdir: Path, name: str) -> None:
        self.options = options
        self.workdir = workdir
        broker_port = free_port()
        self.kafka_proxy = Proxy(("127.0.0.1", broker_port))
        self.bootstrap = f"127.0.0.1:{self.kafka_proxy.port}"
        self.broker = EmbeddedBroker(broker_port, advertised=self.bootstrap)
        postgres = urlsplit(options.postgres)
        self.database_proxy = Proxy((postgres.hostname or "127.0.0.1", postgres.port or 5432))
        self.database = database_url(options.postgres, name)
        self.env = service_env(
            self.bootstrap, database_url(options.postgres, name, self.database_proxy.port), options
        )
        self.positions = Positions(self.database)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.api = httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)

    async def start(self) -> None:
        self.broker.start()
        await ensure_topics(self.bootstrap, PARTITIONS)
        self.processes = await start_all(ROLES, self.workdir, self.env)

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.processes[role].port}"  # type: ignore[attr-defined]

    async def api_answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = await self.api.get(f"{self.url('api')}/v1/webhooks", params={"limit": 1})
            return response.status_code == 200
        return False

    async def close(self) -> None:
        await self.api.aclose()
        await self.positions.close()
        for process in self.processes.values():
            stop(process)
        self.broker.stop()
        self.kafka_proxy.close()
        self.database_proxy.close()

    async def inflict(self, fault: str, sender: Sender) -> list[Recovery]:
        """Inflict one fault, and wait until every service it hit recovered."""
        deadline = self.options.deadline

        async def advanced(index: int, since: int) -> bool:
            return (await self.positions.read())[index] > since

        async def fold() -> float | None:
            return await until(lambda: advanced(0, folded), deadline)

        async def project() -> float | None:
            both = (
                await until(lambda: advanced(1, read_model), deadline),
                await until(lambda: advanced(2, public), deadline),
            )
            return None if None in both else time.monotonic() - began

        async def publish() -> float | None:
            return await until(lambda: advanced(2, public), deadline)

        async def accept() -> float | None:
            return await until(lambda: sender.last_ack > began, deadline)

        async def answer() -> float | None:
            return await until(self.api_answers, deadline, every=0.1)

        if fault in ("domain", "projector"):
            self.processes[fault].kill()
            self.processes[fault].wait()
            began = time.monotonic()
            restart = asyncio.ensure_future(asyncio.to_thread(start, fault, self.workdir, self.env))
            # What the dead process committed: a commit it sent just before
            # dying still lands (through the proxy), well before the new
            # process has even imported its modules.
            mine = slice(0, 1) if fault == "domain" else slice(1, 3)
            folded, read_model, public, _ = await self.positions.settled(mine)
            waits = {fault: fold() if fault == "domain" else project()}
            label = f"{fault} killed"
        else:
            proxy = self.database_proxy if fault == "database" else self.kafka_proxy
            proxy.cut()
            await asyncio.sleep(self.options.cut)
            folded, read_model, public, _ = await self.positions.read()
            proxy.restore()
            began = time.monotonic()
            restart = None
            if fault == "database":
                waits = {"domain": fold(), "projector": project(), "api": answer()}
            else:
                waits = {"ingress": accept(), "domain": fold(), "projector": publish()}
            label = f"{fault} cut {self.options.cut:g} s"
        if restart is not None:
            process, *seconds = await asyncio.gather(restart, *waits.values())
            self.processes[fault] = process
        else:
            seconds = await asyncio.gather(*waits.values())
        return [Recovery(label, service, s) for service, s in zip(waits, seconds, strict=True)]


async def drive(stack: Stack, sender: Sender, faults: tuple[str, ...]) -> list[Recovery]:
    """Each fault halfway through its segment of the stream; the next segment
    at full rate once the fault's services recovered."""
    segment = len(sender.events) // (len(faults) + 1)
    sender.fast_until = segment
    recoveries: list[Recovery] = []
    for k, fault in enumerate(faults):
        halfway = k * segment + segment // 2
        reached = await until(lambda n=halfway: sender.handed >= n, 600, 0.02)
        if reached is None:
            raise RuntimeError(f"the sender did not reach webhook {halfway} in 600 s")
        recoveries += await stack.inflict(fault, sender)
        sender.fast_until = (k + 2) * segment
    sender.fast_until = len(sender.events)
    return recoveries


# -- what the stack says afterwards -------------------------------------------------


async def receipts(stack: Stack) -> list[dict[str, Any]]:
    """Every receipt, through `GET /v1/webhooks`."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        response = await stack.api.get(f"{stack.url('api')}/v1/webhooks", params=params)
        response.raise_for_status()
        page = response.json()
        items += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return items


def stored_receipts(store: EntitlementStore) -> set[str]:
    found: set[str] = set()
    after = 0
    while notifications := store.process_recorder.select_notifications(
        start=after + 1, limit=1000, topics=["domain.receipt:Receipts.Recorded"]
    ):
        for notification in notifications:
            event: Any = store.mapper.to_domain_event(notification)
            found.update(item["receipt"] for item in event.items)
        after = notifications[-1].id
    return found


def histories(store: EntitlementStore, ids: list[str]) -> tuple[set[tuple[str, int]], set[str]]:
    """The store's public entitlement events (entitlement id, sequence), and
    the provider events applied twice: whose events on an entitlement are
    not one run of versions."""
    public: set[tuple[str, int]] = set()
    twice: set[str] = set()
    for entitlement_id in ids:
        seen: set[str] = set()
        previous = None
        for event in store.history(uuid.UUID(entitlement_id)):
            if event_type(event) in PUBLIC_TYPES:
                public.add((entitlement_id, event.originator_version))
            cause = getattr(event, "cause", None) or {}
            key = None
            if cause.get("kind") == "provider":
                key = f"{cause['source']}/{cause['event_id']}"
            if key is not None and key != previous and key in seen:
                twice.add(key)
            if key is not None:
                seen.add(key)
            previous = key
    return public, twice


async def published(bootstrap: str, expected: set[tuple[str, int]]) -> tuple[set[Any], int]:
    """What is on the public topic, read until every expected event is seen
    or nothing more came for 5 s; and how many messages repeat one."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    seen: set[Any] = set()
    repeated = 0
    try:
        await consumer.topics()
        numbers = consumer.partitions_for_topic(EVENTS_TOPIC) or ()
        partitions = [TopicPartition(EVENTS_TOPIC, p) for p in numbers]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        quiet = time.monotonic()
        while not expected <= seen and time.monotonic() - quiet < 5:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                quiet = time.monotonic()
                for record in records:
                    message = json.loads(record.value or b"{}")
                    key = (message["entitlement_id"], message["sequence"])
                    repeated += key in seen
                    seen.add(key)
    finally:
        await consumer.stop()
    return seen, repeated


def result(url: str, receipts: list[dict[str, Any]] | None = None) -> Result:
    """The read model's entitlements and outcomes (of `receipts`, or those
    it lists)."""
    read_model = ReadModel(url)
    try:
        views = read_model.entitlements(10**7)
        if receipts is None:
            receipts = [r.model_dump(mode="json") for r in read_model.receipts(10**7)[0]]
    finally:
        read_model.close()
    outcomes: dict[str, str] = {}
    for receipt in receipts:
        event = f"{receipt['source']}/{receipt['provider_event_id']}"
        ranks = [PRECEDENCE.index(o) for o in (receipt["outcome"], outcomes.get(event)) if o]
        outcomes[event] = PRECEDENCE[min(ranks)]
    return Result(
        {str(view.id): view.model_dump(mode="json", exclude=BOOKKEEPING) for view in views},
        outcomes,
    )


async def settle(stack: Stack, sender: Sender, deadline: float) -> None:
    """Wait until every acknowledged webhook has a receipt in the read model
    and both projections reached the end of the log, or `deadline` passes
    without progress."""
    acked = list(sender.acked)
    progress, last = time.monotonic(), None
    conn = await psycopg.AsyncConnection.connect(stack.database, autocommit=True)
    try:
        while time.monotonic() - progress < deadline:
            cursor = await conn.execute(
                "SELECT count(*) FROM entitle_v4_receipts WHERE id = ANY(%s)", (acked,)
            )
            row = await cursor.fetchone()
            positions = await stack.positions.read()
            now = (row[0] if row else 0, *positions)
            if now[0] == len(acked) and now[2] == now[3] == now[4]:
                await asyncio.sleep(2)  # anything applied twice would land now
                if await stack.positions.read() == positions:
                    return
            if now != last:
                progress, last = time.monotonic(), now
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def soak(
    options: Options,
    events: list[dict[str, Any]],
    workdir: Path,
    name: str,
    report: Report,
) -> Result:
    stack = Stack(options, workdir, name)
    try:
        await stack.start()
        sender = Sender(stack.processes["ingress"].port, events, options)  # type: ignore[attr-defined]
        _, report.recoveries = await asyncio.gather(
            sender.run(), drive(stack, sender, options.faults)
        )
        await settle(stack, sender, options.deadline)
        report.acknowledged = len(sender.acked)
        report.attempts, report.refused = sender.attempts, sender.refused
        report.given_up = sender.given_up
        listed = await receipts(stack)
        report.outcomes = Counter(r["outcome"] for r in listed)
        report.lost = sorted(set(sender.acked) - {r["id"] for r in listed})
        applied = Counter(
            f"{r['source']}/{r['provider_event_id']}" for r in listed if r["outcome"] == "applied"
        )
        found = result(stack.database, listed)
        store = EntitlementStore(stack.database)
        try:
            report.lost_in_store = len(set(report.lost) & stored_receipts(store))
            expected, twice = histories(store, sorted(found.entitlements))
        finally:
            store.close()
        report.double_applied = sorted(twice | {key for key, n in applied.items() if n > 1})
        seen, report.public_repeated = await published(stack.bootstrap, expected)
        report.public_expected = len(expected)
        report.public_missing = sorted(f"{e}#{s}" for e, s in expected - seen)
        with psycopg.connect(stack.database) as conn:
            for table, counter in (
                ("entitle_v4_dead_letters", "dead_letters"),
                ("entitle_projection_errors", "projection_errors"),
            ):
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                setattr(report, counter, int(row[0]) if row else 0)
        return found
    finally:
        await stack.close()


async def in_order(
    options: Options, events: list[dict[str, Any]], workdir: Path, name: str
) -> Result:
    """The same webhooks folded in order without faults."""
    url = fresh_database(options.postgres, name, unique=False)
    with EmbeddedBroker() as broker:
        await produce(broker.bootstrap, events)
        processes = await start_all(
            ("domain", "projector"), workdir, service_env(broker.bootstrap, url, options)
        )
        positions = Positions(url)
        try:

            async def done() -> bool:
                folded, read_model, public, end = await positions.read()
                return folded == len(events) and read_model == public == end

            if await until(done, options.deadline, 0.2) is None:
                raise RuntimeError(f"the in-order run did not finish; see {workdir}")
        finally:
            await positions.close()
            for process in processes.values():
                stop(process)
    return result(url)


def run(options: Options) -> Report:
    began = time.monotonic()
    stream, stories = mix(options.subscriptions, options.seed, int(time.time()))
    stream = stream[: options.webhooks]
    ids = {event["id"] for event in stream}
    ordered = [event for story in stories for event in story if event["id"] in ids]
    report = Report(webhooks=len(stream), distinct=len(ids))
    tag = uuid.uuid4().hex[:8]
    names = (f"entitle_soak_{tag}", f"entitle_soak_{tag}_in_order")
    workdir = Path(tempfile.mkdtemp(prefix="entitle-soak-"))
    (workdir / "in-order").mkdir()
    for directory in (workdir, workdir / "in-order"):
        (directory / "entitle.yaml").write_text(CONFIG)
    try:
        expected = asyncio.run(in_order(options, ordered, workdir / "in-order", names[1]))
        report.in_order_seconds = time.monotonic() - began
        fresh_database(options.postgres, names[0], unique=False)
        found = asyncio.run(soak(options, stream, workdir, names[0], report))
    finally:
        if not options.keep:
            for name in names:
                drop_database(options.postgres, name)
    report.entitlements = len(expected.entitlements)
    for what, want, got in (
        ("differing", expected.entitlements, found.entitlements),
        ("outcomes_differing", expected.outcomes, found.outcomes),
    ):
        keys = want.keys() | got.keys()
        setattr(report, what, sorted(k for k in keys if want.get(k) != got.get(k)))
    report.seconds = time.monotonic() - began
    if report.failed or options.keep:
        print(f"logs and configuration: {workdir}", file=sys.stderr)
    return report


def show(report: Report, options: Options) -> None:
    refused = ", ".join(f"{n} {what}" for what, n in report.refused.most_common())
    outcomes = ", ".join(f"{what} {n}" for what, n in report.outcomes.most_common())
    print(
        f"soak:                   {report.webhooks} webhooks ({report.distinct} distinct) for "
        f"{options.subscriptions} subscriptions, seed {options.seed}, {options.rate:g}/s over "
        f"{options.concurrency} connections; faults: {', '.join(options.faults)}"
    )
    print(f"in order, no faults:    folded in {report.in_order_seconds:.0f} s")
    print(
        f"acknowledged:           {report.acknowledged} ({report.attempts} attempts"
        + (f"; sent again after: {refused}" if refused else "")
        + (f"; {report.given_up} given up" if report.given_up else "")
        + ")"
    )
    print(
        f"outcomes:               {outcomes}; dead letters {report.dead_letters}, "
        f"projection errors {report.projection_errors}"
    )
    print(
        f"lost:                   {len(report.lost)}"
        + (f" ({report.lost_in_store} in the store's receipts)" if report.lost else "")
    )
    print(f"double-applied:         {len(report.double_applied)}")
    print(
        f"public events missing:  {len(report.public_missing)} of {report.public_expected} "
        f"({report.public_repeated} published more than once)"
    )
    print(f"entitlements differing: {len(report.differing)} of {report.entitlements}")
    print(f"outcomes differing:     {len(report.outcomes_differing)} of {report.distinct}")
    print("recovery (s):")
    for recovery in report.recoveries:
        seconds = "not recovered" if recovery.seconds is None else f"{recovery.seconds:.1f}"
        print(f"  {recovery.fault:<22} {recovery.service:<10} {seconds}")
    for what in ("lost", "double_applied", "public_missing", "differing", "outcomes_differing"):
        items = getattr(report, what)
        if items:
            print(f"{what}: {', '.join(items[:10])}" + (" ..." if len(items) > 10 else ""))
    print(f"took:                   {report.seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="1,000 webhooks, 5 s cuts")
    parser.add_argument("-n", "--webhooks", type=int)
    parser.add_argument("--subscriptions", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rate", type=float, help="webhooks a second between faults")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--cut", type=float, help="seconds each outage lasts")
    parser.add_argument(
        "--faults",
        help=f"comma-separated, in order, of {', '.join(sorted(set(FAULTS)))} "
        f"(default {','.join(FAULTS)})",
    )
    parser.add_argument("--deadline", type=float, help="longest wait for a recovery")
    parser.add_argument("--postgres", help="a PostgreSQL URL to create databases from")
    parser.add_argument("--keep", action="store_true", help="keep the databases and logs")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the services"
    )
    args = parser.parse_args()
    options = Options.short() if args.short else Options()
    given = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key not in ("short", "faults", "env", "keep")
    }
    if args.faults:
        faults = tuple(args.faults.split(","))
        unknown = set(faults) - set(FAULTS)
        if unknown:
            parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
        given["faults"] = faults
    env = tuple(tuple(item.split("=", 1)) for item in args.env)
    options = replace(options, **given, keep=args.keep, env=options.env + env)  # type: ignore[arg-type]
    report = run(options)
    show(report, options)
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
