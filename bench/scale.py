"""Scale benchmark: the same measurements at 10k, 100k (and 1M) entitlements
on PostgreSQL, each size in a fresh database.

    python bench/scale.py                            # 10k and 100k, 3 runs each
    python bench/scale.py --sizes 1000000 --runs 3   # a million (about 10 min to build)
    python bench/scale.py --replay                   # also `entitle replay` (slow at 1M)
    python bench/scale.py --sizes 1000000 --keep     # keep the built database, then
    python bench/scale.py --sizes 1000000 --database postgresql://…/entitle_bench_scale_1000000

Per size:
1. build: N Stripe subscriptions, one paid period each, straight into the
   store: the domain's own commands applied in batches of 1,000 (the events
   an `invoice.paid` folds to), and each entitlement's read-model row, in
   two worker processes. Not a measurement of the engine (the fold phase is).
2. index: a `ValidationIndex` loaded from that read model in a child
   process; prints bytes held per entitlement (tracemalloc) and load time.
3. api: `entitle api` started `--runs` times; prints start-up time (until
   /readyz answers 200), time until the index has loaded everything
   (its metric), resident memory then, and validations/s with p50/p99 of
   random ACTIVE codes (wrk when on PATH, else an asyncio client).
4. fold: 5,000 renewal `invoice.paid` webhooks of random existing
   subscriptions put on a fresh raw topic, drained by `entitle domain`
   (batches of 500); prints webhooks folded per second, `--runs` times.
5. replay (with `--replay`): the rebuild `entitle replay` calls, timed
   around the call as bench/replay.py does, events per second, twice, each
   beside eventsourcing's own select + decode of the same log; and the
   whole command's seconds (its interpreter's start and imports included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from lifecycle import (  # noqa: E402
    CONFIG,
    DAY,
    ENTITLE,
    fresh_database,
    produce,
    resident_mb,
    start,
    stop,
)
from validate import LIMITS, validate_load, wrk_load  # noqa: E402

from services.config import load_config  # noqa: E402
from services.kafka import EmbeddedBroker  # noqa: E402
from tests import stripe_events as se  # noqa: E402

CODE_SECRET = "bench-code-secret-0123456789"
SOURCE = "stripe-main"
PRICES = ("price_basic", "price_pro")


def subscription(n: int) -> tuple[str, str, str]:
    """(subscription id, price, item id) of subscription n."""
    sub = f"sub_{n}"
    price = PRICES[n % 2]
    return sub, price, se.item_id(sub, price)


# -- 1. build ------------------------------------------------------------------------


def build_chunk(args: tuple[str, str, int, int, int]) -> int:
    """Subscriptions `first` to `last` (exclusive) into the store and the read model."""
    database_url, config_path, first, last, now = args
    from domain import lifecycle
    from domain.commands import Customer, OrderEvent, Rules, apply, touches
    from domain.entitlement import Cause, Entitlement
    from services.codes import CodeBook
    from services.projections import entitlement_view
    from services.readmodel import ReadModel, Rows, entitlement_row
    from services.store import Batch, EntitlementStore

    config = load_config(Path(config_path))
    store, read_model = EntitlementStore(database_url), ReadModel(database_url)
    codes = CodeBook(CODE_SECRET)
    rules = Rules(config.catalog, config.policy, codes.hash)
    at = datetime.fromtimestamp(now, UTC)
    for begin in range(first, last, 1000):
        batch = Batch(store)
        commands = []
        for n in range(begin, min(last, begin + 1000)):
            sub, price, item = subscription(n)
            offering = config.catalog.for_price("stripe", price, None)
            assert offering is not None
            start_at = at - timedelta(days=n % 20)
            line = lifecycle.Line(item, offering, 1, start_at, start_at + timedelta(days=30))
            command = OrderEvent(
                source=SOURCE,
                order_ref=sub,
                fact=lifecycle.payment(f"in_{sub}_0", [line]),
                lines=(line,),
                cause=Cause.provider(SOURCE, f"evt_{sub}_0"),
                occurred_at=start_at,
                customer=Customer(f"cus_{n}", f"buyer{n}@example.com"),
                payment_refs=(f"in_{sub}_0",),
                invoice=f"in_{sub}_0",
            )
            commands.append(command)
        # Each one new: one query finds nothing, instead of one read each.
        batch.prefetch(i for command in commands for i in touches(command))
        for command in commands:
            apply(command, batch, rules, at)
        entitlements = [a for a in batch if isinstance(a, Entitlement)]
        store.record(batch, None)
        rows = Rows()
        for entitlement in entitlements:
            rows.entitlements.append(entitlement_row(entitlement_view(entitlement)))
            rows.codes += [(code, str(entitlement.id)) for code in entitlement.codes]
        with read_model.transaction() as cur:
            read_model.write(cur, rows, begin // 1000 + 1)
    store.close()
    read_model.close()
    return last - first


def build(database_url: str, config_path: Path, size: int) -> float:
    """Fill an empty database with `size` subscriptions; returns the seconds taken."""
    from services.projections.read_model import READ_MODEL
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    EntitlementStore(database_url).close()  # tables made once, not by both workers at once
    ReadModel(database_url).close()
    now = int(time.time())
    step = 20_000
    chunks = [
        (database_url, str(config_path), first, min(size, first + step), now)
        for first in range(0, size, step)
    ]
    began = time.perf_counter()
    done = 0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for count in pool.imap_unordered(build_chunk, chunks):
            done += count
            print(f"\r  built {done:,} of {size:,}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    store = EntitlementStore(database_url)
    head = store.process_recorder.max_notification_id() or 0
    store.close()
    read_model = ReadModel(database_url)
    with read_model.transaction() as cur:
        read_model.save_position(cur, READ_MODEL, head)  # the projector starts at the head
    read_model.close()
    return time.perf_counter() - began


# -- 2. index ------------------------------------------------------------------------


def measure_index(database_url: str) -> None:
    """(child process) Load a ValidationIndex; print bytes held and seconds."""
    import gc
    import tracemalloc

    from services.licensing import ValidationIndex
    from services.readmodel import ReadModel

    read_model = ReadModel(database_url)
    read_model.changed((0, ""), 1)  # the pool's connection, before measuring
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    began = time.perf_counter()
    index = ValidationIndex(read_model)
    index.refresh()
    seconds = time.perf_counter() - began
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    print(json.dumps({"bytes": held, "codes": len(index), "seconds": seconds}))


def index_figures(database_url: str, size: int) -> str:
    out = subprocess.run(
        [sys.executable, __file__, "--measure-index", database_url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures = json.loads(out.splitlines()[-1])
    return (
        f"index:   {figures['bytes'] / size:,.0f} bytes per entitlement held "
        f"({figures['codes']:,} codes, {figures['bytes'] / 2**20:,.0f} MB); "
        f"loaded in {figures['seconds']:.1f} s under tracemalloc"
    )


# -- 3. api --------------------------------------------------------------------------


def metric(port: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def api_run(workdir: Path, env: dict[str, str], codes: list[str], seconds: float) -> dict[str, Any]:
    began = time.perf_counter()
    api = start("api", workdir, env)
    port: int = api.port  # type: ignore[attr-defined]
    try:
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:
            time.sleep(0.05)
        ready = time.perf_counter() - began
        while metric(port, "entitle_validation_index_loaded") != 1.0:
            time.sleep(0.1)
        loaded = time.perf_counter() - began
        rss = resident_mb(api.pid)
        if shutil.which("wrk"):
            requests, failures, p50, p99, took = asyncio.run(
                wrk_load(port, codes, seconds, 32, workdir)
            )
        else:
            latencies, failures = asyncio.run(validate_load(port, codes, seconds, 16))
            latencies.sort()
            requests, took = len(latencies), seconds
            p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
        assert failures == 0, f"{failures} validations failed"
        return {
            "ready": ready,
            "loaded": loaded,
            "rss": max(rss, resident_mb(api.pid)),
            "rate": requests / took,
            "p50": p50 * 1000,
            "p99": p99 * 1000,
        }
    finally:
        stop(api)


# -- 4. fold -------------------------------------------------------------------------


def renewals(size: int, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    now = int(time.time())
    events = []
    for n in rng.sample(range(size), min(size, count)):
        sub, price, item = subscription(n)
        begin = now + 10 * DAY + seed * 31 * DAY
        event = se.invoice_paid(
            subscription=sub,
            shape=se.LEGACY,
            customer=f"cus_{n}",
            email=f"buyer{n}@example.com",
            lines=[{"price": price, "item": item, "start": begin, "end": begin + 30 * DAY}],
            invoice_id=f"in_{sub}_r{seed}",
            payment_intent=f"pi_{sub}_r{seed}",
            created=begin + 60,
        )
        event["data"]["object"]["lines"]["data"][0]["description"] = "Acme " + "x" * 1500
        events.append(event)
    return events


def stored(database_url: str) -> int:
    """Webhooks folded so far: each is stored once, by its receipt (the
    tracking positions cannot tell runs on fresh brokers apart)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM entitle_webhooks").fetchone()
    return int(row[0]) if row else 0


def fold_run(workdir: Path, database_url: str, events: list[dict[str, Any]]) -> float:
    broker = EmbeddedBroker()
    broker.start()
    try:
        before = stored(database_url)
        asyncio.run(produce(broker.bootstrap, events))
        env = {
            "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "ENTITLE_KAFKA_IDEMPOTENCE": "false",
            "ENTITLE_DATABASE_URL": database_url,
            "ENTITLE_DOMAIN_BATCH": "500",
            "ENTITLE_SCHEDULE_INTERVAL": "3600",
            "ENTITLE_CODE_SECRET": CODE_SECRET,
        }
        domain = start("domain", workdir, env)
        try:
            first_at, first = None, 0
            while (done := stored(database_url) - before) < len(events):
                if first_at is None and done:
                    first_at, first = time.perf_counter(), done
                time.sleep(0.02)
            finished = time.perf_counter()
        finally:
            stop(domain)
        assert first_at is not None
        return (len(events) - first) / (finished - first_at)
    finally:
        broker.stop()


# -- 5. replay -----------------------------------------------------------------------


def bare_read(database_url: str) -> tuple[int, float]:
    """(events, seconds) of eventsourcing alone selecting and decoding the
    log (bench/replay.py's baseline)."""
    from replay import bare

    from services.store import EntitlementStore

    store = EntitlementStore(database_url)
    try:
        return bare(store)
    finally:
        store.close()


def replay_run(workdir: Path, database_url: str) -> tuple[float, int, float]:
    """(seconds in `replay`, events, seconds of the whole `entitle replay`
    command): the first as bench/replay.py measures it, the call the command
    makes, so that the ratio to the bare read (also timed in-process) leaves
    out the interpreter's start and imports, a second or so at any size."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM entitle_events").fetchone()
        events = int(row[0]) if row else 0
    env = {**os.environ, "ENTITLE_DATABASE_URL": database_url, "ENTITLE_CODE_SECRET": CODE_SECRET}
    code = (
        "import time\n"
        "from services.projections import replay\n"
        "from services.readmodel import ReadModel\n"
        "from services.store import EntitlementStore\n"
        f"store, read_model = EntitlementStore({database_url!r}), ReadModel({database_url!r})\n"
        "began = time.perf_counter()\n"
        "replay(store, read_model)\n"
        "print(time.perf_counter() - began)\n"
    )
    inner = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    began = time.perf_counter()
    subprocess.run([ENTITLE, "replay"], cwd=workdir, env=env, check=True, capture_output=True)
    return float(inner.stdout.split()[-1]), events, time.perf_counter() - began


# -----------------------------------------------------------------------------------


def spread(values: list[float], unit: str = "", digits: int = 0) -> str:
    """min / median / max."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:,.{digits}f} / {mid:,.{digits}f} / {high:,.{digits}f}{unit}"


def one_size(args: argparse.Namespace, size: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"entitle-bench-scale-{size}-"))
    (workdir / "entitle.yaml").write_text(CONFIG + LIMITS)
    print(f"== {size:,} entitlements (load average {os.getloadavg()[0]:.2f})", flush=True)
    if args.database:  # built by an earlier run (--keep)
        database_url = args.database
    else:
        database_url = fresh_database(
            args.postgres, f"entitle_bench_scale_{size}", unique=not args.keep
        )
        took = build(database_url, workdir / "entitle.yaml", size)
        print(f"build:   {took:.0f} s ({size / took:,.0f} entitlements/s, not of the engine)")
        if args.keep:
            print(f"kept:    {database_url} (--database to measure it again)")
    print(index_figures(database_url, size), flush=True)

    from services.codes import CodeBook
    from services.config import load_config as load
    from services.readmodel import ReadModel

    read_model = ReadModel(database_url)
    rng = random.Random(3)
    with read_model.transaction(write=False) as cur:
        cur.execute("SELECT id FROM entitle_v4_entitlements WHERE status = 'ACTIVE'")
        ids = [row[0] for row in cur.fetchall()]
    read_model.close()
    book = CodeBook(CODE_SECRET)
    codes = [book.code(uuid.UUID(i), 0) for i in rng.sample(ids, min(len(ids), 20_000))]
    load(workdir / "entitle.yaml")  # the configuration is valid before starting anything
    env = {
        "ENTITLE_DATABASE_URL": database_url,
        "ENTITLE_ADMIN_KEYS": "bench:ek_bench_admin_key",
        "ENTITLE_CODE_SECRET": CODE_SECRET,
    }
    runs = [api_run(workdir, env, codes, args.seconds) for _ in range(args.runs)]
    print(
        f"api:     start-up (readyz 200) {spread([r['ready'] for r in runs], ' s', 1)}; "
        f"index loaded {spread([r['loaded'] for r in runs], ' s', 1)}; "
        f"resident {spread([r['rss'] for r in runs], ' MB')}"
    )
    print(
        f"         validations {spread([r['rate'] for r in runs], '/s')}; "
        f"p50 {spread([r['p50'] for r in runs], ' ms', 2)}; "
        f"p99 {spread([r['p99'] for r in runs], ' ms', 2)}",
        flush=True,
    )
    rates = [
        fold_run(workdir, database_url, renewals(size, args.fold_webhooks, seed))
        for seed in range(1, args.runs + 1)
    ]
    print(f"fold:    {spread(rates, ' webhooks/s')} ({args.fold_webhooks:,} renewals a run)")
    if args.replay:
        rounds = [(bare_read(database_url), replay_run(workdir, database_url)) for _ in range(2)]
        read = [count / took for (count, took), _ in rounds]
        rebuilt = [events / took for _, (took, events, _) in rounds]
        print(
            f"replay:  {rounds[0][1][1]:,} events at {spread(rebuilt, '/s')}; the bare read"
            f" (eventsourcing select + decode) {spread(read, '/s')}:"
            f" {spread([r / b for r, b in zip(rebuilt, read, strict=True)], '', 2)} of it;"
            f" the whole command {spread([whole for _, (_, _, whole) in rounds], ' s', 1)}"
        )
    print(f"         load average {os.getloadavg()[0]:.2f}", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--measure-index"]:
        measure_index(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="validation load per run")
    parser.add_argument("--fold-webhooks", type=int, default=5000)
    parser.add_argument("--replay", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep the built database (named by its size)"
    )
    parser.add_argument(
        "--database", help="measure this database, built by a run with --keep, of one --sizes"
    )
    args = parser.parse_args()
    for size in args.sizes:
        one_size(args, size)


if __name__ == "__main__":
    main()
