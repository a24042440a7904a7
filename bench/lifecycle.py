"""Lifecycle benchmark: a realistic Stripe mix through the real services on
PostgreSQL, each phase on a fresh broker and a fresh database.

    python bench/lifecycle.py                      # both phases, default sizes
    python bench/lifecycle.py --subscriptions 2000 --rate 500 --seconds 20

The mix, per subscription: created (incomplete), first invoice paid, active;
0-3 renewals; 15 % a failed payment (half of them later paid); 10 % a plan
change; 10 % a cancellation (at period end or deleted); then 10 % duplicate
deliveries, and each subscription's events shuffled (interleaved with the
others'). Bodies carry ~1.5 KB of line descriptions, like real invoices.

1. fold: the raw topic is filled first, then `entitle domain` drains it;
   prints webhooks folded per second from its first commit to its last, with
   batches (the default ENTITLE_DOMAIN_BATCH, 2,000 on PostgreSQL) and
   naively (one webhook, one save).
2. end to end: `entitle ingress`, `domain` and `projector` as separate
   processes; webhooks are sent at a fixed rate and each one's latency is
   measured from the ingress's 202 to its first event on
   entitle.entitlements.events (webhooks that change nothing publish none).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ingest import Connection, sign  # noqa: E402

from contracts.events import EVENTS_TOPIC  # noqa: E402
from contracts.webhooks import RAW_TOPIC, RawWebhookV1  # noqa: E402
from services.kafka import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from services.providers.stripe import routing_key  # noqa: E402
from tests import stripe_events as se  # noqa: E402

ENTITLE = str(Path(sys.executable).parent / "entitle")
SECRET = "whsec_bench_secret"
DAY = 86400
PARTITIONS = 8
CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {SECRET}}}
offerings:
  - {{sku: basic, product: acme, seats: 1, limits: {{projects: 5}},
      stripe_price_ids: [price_basic]}}
  - {{sku: pro, product: acme, seats: 5, features: {{export: true}}, limits: {{projects: 50}},
      suspend_after_days: 3, expire_after_days: 14, stripe_price_ids: [price_pro]}}
"""


# -- the workload ------------------------------------------------------------------


def story(n: int, rng: random.Random, now: int) -> list[dict[str, Any]]:
    sub = f"sub_{n}_{rng.getrandbits(32):08x}"
    item = f"si_{sub}"
    price = rng.choice(["price_basic", "price_pro"])
    start = now - rng.randint(0, 80) * DAY
    events: list[dict[str, Any]] = []

    def invoice(k: int, kind: str = "invoice.paid") -> dict[str, Any]:
        begin = start + k * 30 * DAY
        event = se.invoice_paid(
            subscription=sub,
            shape=se.LEGACY,
            kind=kind,
            customer=f"cus_{n}",
            email=f"buyer{n}@example.com",
            lines=[{"price": price, "item": item, "start": begin, "end": begin + 30 * DAY}],
            invoice_id=f"in_{sub}_{k}",
            payment_intent=f"pi_{sub}_{k}",
            created=begin + 60 + (3600 if kind == "invoice.paid" and k and failing == k else 0),
        )
        event["data"]["object"]["lines"]["data"][0]["description"] = "Acme " + "x" * 1500
        return event

    def snapshot(k: int, status: str, at: int, **kw: Any) -> dict[str, Any]:
        begin = start + k * 30 * DAY
        return se.subscription_event(
            kw.pop("kind", "customer.subscription.updated"),
            subscription=sub,
            items=[{"price": price, "item": item}],
            status=status,
            start=begin,
            end=begin + 30 * DAY,
            created=begin + at,
            customer=f"cus_{n}",
            shape=se.LEGACY,
            **kw,
        )

    failing = -1
    renewals = rng.choices([0, 1, 2, 3], weights=[3, 3, 2, 2])[0]
    if rng.random() < 0.15:
        failing = renewals + 1
    events += [
        snapshot(0, "incomplete", 10, kind="customer.subscription.created"),
        invoice(0),
        snapshot(0, "active", 120),
    ]
    for k in range(1, renewals + 1):
        events += [invoice(k), snapshot(k, "active", 120)]
    last = renewals
    if failing > 0:
        events += [invoice(failing, "invoice.payment_failed"), snapshot(failing, "past_due", 120)]
        if rng.random() < 0.5:
            events += [invoice(failing), snapshot(failing, "active", 4000)]
            last = failing
    if rng.random() < 0.10:
        price = "price_pro" if price == "price_basic" else "price_basic"
        events.append(snapshot(last, "active", 2 * DAY))
    if rng.random() < 0.10:
        if rng.random() < 0.6:
            events.append(snapshot(last, "active", 3 * DAY, cancel_at_period_end=True))
        else:
            events.append(se.subscription_deleted(subscription=sub, created=start + 90 * DAY))
    return events


def workload(subscriptions: int, seed: int, now: int) -> list[dict[str, Any]]:
    """Every subscription's events, 10 % duplicated, shuffled within the
    subscription and interleaved with the others."""
    return mix(subscriptions, seed, now)[0]


def mix(
    subscriptions: int, seed: int, now: int
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """`workload`'s delivery order, and each subscription's events in the
    order they happened (without duplicates): what a run without faults,
    delivered in order, is compared with."""
    rng = random.Random(seed)
    queues = []
    stories = []
    for n in range(subscriptions):
        events = story(n, rng, now)
        stories.append(list(events))
        events += [rng.choice(events) for _ in range(len(events)) if rng.random() < 0.10]
        rng.shuffle(events)
        queues.append(events)
    out: list[dict[str, Any]] = []
    while queues:
        i = rng.randrange(len(queues))
        out.append(queues[i].pop())
        if not queues[i]:
            queues[i] = queues[-1]
            queues.pop()
    return out, stories


# -- infrastructure ------------------------------------------------------------------


#: This run's own suffix: two runs on one PostgreSQL never drop each other's databases.
RUN = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
_CREATED: list[tuple[str, str]] = []


def fresh_database(admin_url: str, name: str, unique: bool = True) -> str:
    """An empty database, as a URL: named `name` plus this run's suffix
    and dropped when the run ends, or (not `unique`) named `name` exactly,
    for a caller that names and drops its own."""
    if unique:
        name = f"{name}_{RUN}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    if unique and (admin_url, name) not in _CREATED:
        if not _CREATED:
            atexit.register(_drop_created)
        _CREATED.append((admin_url, name))
    parts = urlsplit(admin_url)
    return parts._replace(path=f"/{name}").geturl()


def _drop_created() -> None:
    for admin_url, name in _CREATED:
        with contextlib.suppress(Exception), psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def folded(database_url: str) -> int:
    """Webhooks the domain service has committed (tracking positions)."""
    with psycopg.connect(database_url) as conn:
        try:
            # Only the raw topic's partitions (eventsourcing tracks its own
            # `__migration__` in the same table).
            rows = conn.execute(
                "SELECT max(notification_id) FROM entitle_tracking"
                " WHERE application_name LIKE %s GROUP BY application_name",
                (RAW_TOPIC + "%",),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return 0
    return sum(int(row[0]) + 1 for row in rows if row[0] is not None)


def start(
    role: str | list[str], workdir: Path, env: dict[str, str], nice: int = 0
) -> subprocess.Popen[bytes]:
    """`entitle <role>` (or `entitle serve <roles…>` given a list) on a free
    port, once its /healthz answers; the port is `process.port`."""
    port = free_port()
    args = [role] if isinstance(role, str) else role
    name = args[-1]
    process = subprocess.Popen(
        [
            ENTITLE,
            *args,
            "--config",
            str(workdir / "entitle.yaml"),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        # Appended to: a role started again (bench/soak.py) keeps its earlier log.
        stderr=open(workdir / f"{name}.log", "ab"),  # noqa: SIM115
        preexec_fn=(lambda: os.nice(nice) and None) if nice else None,
    )
    process.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        time.sleep(0.1)
    raise RuntimeError(f"entitle {' '.join(args)} did not start; see {workdir / f'{name}.log'}")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folding(process: subprocess.Popen[bytes]) -> bool:
    """Whether this domain process has folded a webhook (its /metrics)."""
    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(f"http://127.0.0.1:{process.port}/metrics", timeout=1).text  # type: ignore[attr-defined]
        for line in text.splitlines():
            if line.startswith("entitle_webhooks_folded_total "):
                return float(line.split()[1]) > 0
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def envelope(event: dict[str, Any]) -> tuple[bytes, bytes]:
    body = json.dumps(event)
    key = routing_key(event)
    raw = RawWebhookV1(
        receipt_id=event["id"] + "-" + os.urandom(4).hex(),
        source="stripe-main",
        provider="stripe",
        routing_key=key,
        received_at=time.time(),  # type: ignore[arg-type]
        headers={"content-type": "application/json"},
        body=body,
    )
    return key.encode(), raw.model_dump_json().encode()


async def produce(bootstrap: str, events: list[dict[str, Any]]) -> None:
    await ensure_topics(bootstrap, PARTITIONS)
    # Every send is queued before any is awaited: at 100,000 subscriptions
    # (687,664 webhooks) the embedded broker took longer than aiokafka's
    # default 40 s to answer some batches, and the run failed before folding.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        max_batch_size=1 << 20,
        linger_ms=5,
        request_timeout_ms=600_000,
    )
    await producer.start()
    try:
        sends = [
            await producer.send(RAW_TOPIC, value, key=key) for key, value in map(envelope, events)
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


# -- phase 1: fold throughput ------------------------------------------------------


def bare_fold(admin_url: str, events: int, aggregates: int, state_bytes: int) -> float:
    """Seconds eventsourcing alone takes to store `events` events of about
    `state_bytes` each, on `aggregates` new aggregates, 100 aggregates a
    transaction with a tracking record (what the fold's exactly-once needs):
    the ceiling the fold is measured against, in a fresh database."""
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.persistence import Tracking

    from services.store import EntitlementStore

    class Thing(Aggregate):
        def __init__(self, data: str) -> None:
            self.data = data

        @event("Changed")
        def change(self, data: str) -> None:
            self.data = data

    database_url = fresh_database(admin_url, "entitle_bench_bare")
    store = EntitlementStore(database_url)
    data = "x" * max(state_bytes - 60, 1)
    more = max(events - aggregates, 0)  # events beyond each aggregate's first
    try:
        began = time.perf_counter()
        for done, start in enumerate(range(0, aggregates, 100), 1):
            things = [Thing(data) for _ in range(min(100, aggregates - start))]
            end = start + len(things)
            for index in range(more * start // aggregates, more * end // aggregates):
                things[index % len(things)].change(data)
            stored = [
                store.mapper.to_stored_event(e) for thing in things for e in thing.collect_events()
            ]
            store.recorder.insert_events(stored, tracking=Tracking("bare", done))
        return time.perf_counter() - began
    finally:
        store.close()


def fold_phase(
    events: list[dict[str, Any]], admin_url: str, batch: int | None, label: str, domains: int = 1
) -> float:
    """Webhooks/s `domains` processes fold `events` at, in batches of at most
    `batch` webhooks (None: the product's default)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"entitle-bench-{label}-"))
    (workdir / "entitle.yaml").write_text(CONFIG)
    broker = EmbeddedBroker()
    broker.start()
    database_url = fresh_database(admin_url, f"entitle_bench_{label}")
    try:
        asyncio.run(produce(broker.bootstrap, events))
        env = {
            "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "ENTITLE_KAFKA_IDEMPOTENCE": "false",
            "ENTITLE_DATABASE_URL": database_url,
            "ENTITLE_SCHEDULE_INTERVAL": "3600",
            "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
            **({"ENTITLE_DOMAIN_BATCH": str(batch)} if batch is not None else {}),
        }
        # Several: one consumer group, each its own name (ENTITLE_INSTANCE).
        processes = [
            start("domain", workdir, {**env, "ENTITLE_INSTANCE": f"bench-{index}"})
            for index in range(domains)
        ]
        try:
            first_at, first = None, 0
            # Each process's first fold ends the group's last rebalance: from
            # then on, all of them fold (the steady state).
            steady_at, steady, waiting = None, 0, list(processes)
            while (done := folded(database_url)) < len(events):
                for domain in processes:
                    if domain.poll() is not None:
                        raise RuntimeError(
                            f"a domain process exited ({domain.returncode}); see"
                            f" {workdir / 'domain.log'}"
                        )
                if first_at is None and done:
                    first_at, first = time.perf_counter(), done
                if waiting and done:
                    waiting = [p for p in waiting if not folding(p)]
                    if not waiting:
                        steady_at, steady = time.perf_counter(), folded(database_url)
                time.sleep(0.02)
            finished = time.perf_counter()
            rss = sum(resident_mb(domain.pid) for domain in processes)
        finally:
            for domain in processes:
                stop(domain)
        assert first_at is not None
        rate = (len(events) - first) / (finished - first_at)
        steady_rate = (
            (len(events) - steady) / (finished - steady_at) if steady_at is not None else None
        )
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT originator_id), avg(length(state))"
                " FROM entitle_events"
            ).fetchone()
            assert row is not None
            stored, aggregates, state_bytes = int(row[0]), int(row[1]), int(row[2] or 0)
        print(
            f"fold, {label:>7}: {len(events):>6} webhooks folded at {rate:,.0f} webhooks/s "
            f"by {domains} domain process{'es' if domains > 1 else ''} "
            f"({stored:,} events stored; {rss:.0f} MB resident)",
            flush=True,
        )
        if domains > 1:
            # The rate above includes the group's rebalances as members join
            # (seconds in which nothing folds); this one starts after them.
            print(
                f"fold, {label:>7}: once all {domains} fold: "
                + (
                    f"{len(events) - steady:,} webhooks at {steady_rate:,.0f} webhooks/s"
                    if steady_rate is not None
                    else "never (one of them folded nothing)"
                ),
                flush=True,
            )
        if label == "batched":
            seconds = bare_fold(admin_url, stored, aggregates, state_bytes)
            ceiling = len(events) / seconds
            print(
                f"bare eventsourcing: the same {stored:,} events ({state_bytes:,} B each on"
                f" average) on {aggregates:,} aggregates, 100 a transaction, in {seconds:.1f} s:"
                f" {ceiling:,.0f} webhooks/s equivalent; the fold {rate / ceiling:.2f} of it",
                flush=True,
            )
        return rate
    finally:
        broker.stop()


# -- phase 2: end-to-end latency ---------------------------------------------------


async def latency_phase(
    events: list[dict[str, Any]], admin_url: str, rate: float, concurrency: int
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="entitle-bench-e2e-"))
    (workdir / "entitle.yaml").write_text(CONFIG)
    broker = EmbeddedBroker()
    broker.start()
    database_url = fresh_database(admin_url, "entitle_bench_e2e")
    env = {
        "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ENTITLE_KAFKA_IDEMPOTENCE": "false",
        "ENTITLE_DATABASE_URL": database_url,
        "ENTITLE_ADMIN_KEYS": "bench:ek_bench_admin_key",
        "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
    }
    await ensure_topics(broker.bootstrap, PARTITIONS)
    processes = [start(role, workdir, env) for role in ("ingress", "domain", "projector")]
    ingress_port = processes[0].port  # type: ignore[attr-defined]
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    consumer = AIOKafkaConsumer(
        EVENTS_TOPIC,
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,  # the watcher must not add its own wait to what it measures
    )
    await consumer.start()

    async def watch() -> None:
        async for record in consumer:
            received = time.perf_counter()
            cause = json.loads(record.value or b"{}").get("cause", {})
            seen.setdefault(cause.get("event_id", ""), received)

    watcher = asyncio.create_task(watch())
    try:
        # The domain's first consumer-group join takes seconds on this broker:
        # wait until a warm-up webhook comes out the other end.
        warmup = se.invoice_paid(
            subscription="sub_warmup",
            lines=[
                {
                    "price": "price_basic",
                    "start": int(time.time()),
                    "end": int(time.time()) + 30 * DAY,
                }
            ],
        )
        await send(Connection("127.0.0.1", ingress_port), warmup, acked)
        deadline = time.monotonic() + 60
        while warmup["id"] not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        sent_for = await send_paced(ingress_port, events, rate, concurrency, acked)
        quiet = time.monotonic()
        count = len(seen)
        while time.monotonic() - quiet < 3:
            await asyncio.sleep(0.2)
            if len(seen) != count:
                count, quiet = len(seen), time.monotonic()
        memory = ", ".join(
            f"{role} {resident_mb(p.pid):.0f} MB"
            for role, p in zip(("ingress", "domain", "projector"), processes, strict=True)
        )
    finally:
        watcher.cancel()
        await consumer.stop()
        for process in processes:
            stop(process)
        broker.stop()
    latencies = sorted(
        (seen[eid] - at) * 1000 for eid, at in acked.items() if eid in seen and eid != warmup["id"]
    )
    distinct = len({e["id"] for e in events})
    print(
        f"end to end:    {len(events)} webhooks sent at {len(events) / sent_for:,.0f}/s "
        f"({distinct} distinct); {len(latencies)} published an event"
    )
    print(
        f"latency:       202 -> public event p50 {statistics.median(latencies):.0f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.0f} ms, "
        f"max {latencies[-1]:.0f} ms"
    )
    print(f"resident:      {memory}")


async def send_paced(
    port: int,
    events: list[dict[str, Any]],
    rate: float,
    concurrency: int,
    acked: dict[str, float],
    seconds: float | None = None,
) -> float:
    """Send `events` to the ingress at `rate` a second over `concurrency`
    keep-alive connections (stopping after `seconds`, if given); returns how
    long the sending took."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    began = time.perf_counter()

    async def pace() -> None:
        for n, event in enumerate(events):
            if seconds is not None and time.perf_counter() - began > seconds:
                break
            delay = began + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(event)
        for _ in range(concurrency):
            queue.put_nowait({})

    async def worker() -> None:
        connection = Connection("127.0.0.1", port)
        while event := await queue.get():
            await send(connection, event, acked)
        await connection.close()

    await asyncio.gather(pace(), *(worker() for _ in range(concurrency)))
    return time.perf_counter() - began


async def send(connection: Connection, event: dict[str, Any], acked: dict[str, float]) -> None:
    body = json.dumps(event).encode()
    headers = {"Stripe-Signature": sign(body, SECRET), "Content-Type": "application/json"}
    status = await connection.post("/webhooks/stripe-main", body, headers)
    if status == 202:
        acked.setdefault(event["id"], time.perf_counter())
    else:
        print(f"ingress answered {status}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--subscriptions", type=int, default=8000, help="for the fold phase")
    parser.add_argument("--naive-subscriptions", type=int, default=800)
    parser.add_argument("--rate", type=float, default=500, help="webhooks/s, end-to-end phase")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--phase", choices=["fold", "e2e", "all"], default="all")
    parser.add_argument(
        "--domains", type=int, default=1, help="domain processes folding (batched fold)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="ENTITLE_DOMAIN_BATCH of the batched fold (default: the product's; the"
        " environment's ENTITLE_DOMAIN_BATCH, if set, applies to every phase)",
    )
    args = parser.parse_args()
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    now = int(time.time())
    if args.phase in ("fold", "all"):
        events = workload(args.subscriptions, 1, now)
        sizes = [len(json.dumps(e)) for e in events[:500]]
        print(
            f"mix:           {len(events)} webhooks from {args.subscriptions} subscriptions, "
            f"{statistics.mean(sizes) / 1024:.1f} KB average"
        )
        fold_phase(events, args.postgres, args.batch, "batched", args.domains)
        if args.naive_subscriptions:
            fold_phase(workload(args.naive_subscriptions, 2, now), args.postgres, 1, "naive")
    if args.phase in ("e2e", "all"):
        wanted = int(args.rate * args.seconds)
        stream: list[dict[str, Any]] = []
        subscriptions = 0
        while len(stream) < wanted:
            subscriptions += 500
            stream = workload(subscriptions, 3, now)
        asyncio.run(latency_phase(stream[:wanted], args.postgres, args.rate, args.concurrency))


if __name__ == "__main__":
    main()
