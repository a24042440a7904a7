"""`entitle audit export` at two sizes: events/s and peak memory of each.

Builds a store per size (SQLite under a temporary directory by default, or
`--database-url` prefixes … each size gets its own database) straight
through the domain: paid Stripe invoices folded by the domain service, then
usage recorded on those entitlements and saved with `store.record` in
batches. Each export runs in a fresh process writing to /dev/null, which
reports its own events/s and peak resident memory (VmHWM), so the
figures show whether memory grows with the log.

    python bench/export.py                 # 100,000 and 1,000,000 events
    python bench/export.py --sizes 20000 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

USAGE_PER_ENTITLEMENT = 50


def build(url: str, events: int) -> int:
    """Fill the store at `url` with about `events` events; returns the count."""
    from domain.entitlement import Entitlement, entitlement_id
    from services.codes import CodeBook
    from services.config import parse_config
    from services.fold import DomainService
    from services.store import EntitlementStore
    from tests import stripe_events as se
    from tests.test_store import paid, record

    config = parse_config(f"""
sources: {{stripe-main: {{provider: stripe, secret: {se.SECRET}}}}}
offerings:
  - {{sku: better_annual, product: acme, period: P1Y, seats: 3,
      limits: {{calls: 1000000000}}}}
""")
    store = EntitlementStore(url)
    service = DomainService(store, config, CodeBook("bench-code-secret-0123456789"))
    # Each subscription: about 5 events from its invoice, then its usage.
    subscriptions = max(1, events // (USAGE_PER_ENTITLEMENT + 5))
    for start in range(0, subscriptions, 500):
        chunk = range(start, min(start + 500, subscriptions))
        service.process([record(i, paid(f"sub_{i}")) for i in chunk])
    ids = [
        entitlement_id("stripe-main", f"sub_{i}", se.item_id(f"sub_{i}", "p"))
        for i in range(subscriptions)
    ]
    at = datetime.now(UTC)
    left = events - int(store.process_recorder.max_notification_id() or 0)
    for start in range(0, len(ids), 200):
        if left <= 0:
            break
        loaded = store.load_many(ids[start : start + 200])
        batch = [a for a in loaded.values() if isinstance(a, Entitlement)]
        for n in range(USAGE_PER_ENTITLEMENT):
            for entitlement in batch:
                if left > 0:
                    entitlement.record_usage("calls", 1, f"u{n}", at)
                    left -= 1
        store.record(batch, None)
    count = int(store.process_recorder.max_notification_id() or 0)
    store.close()
    if url.startswith("sqlite:///"):
        # Fold the build's write-ahead log into the database, as SQLite's
        # automatic checkpoints keep it on a live store: the first reader
        # of a long one maps its index (tens of MB) and would be measured.
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return count


def child(url: str) -> None:
    """Export everything to /dev/null; print events, seconds and peak RSS."""
    from services.audit import export
    from services.store import EntitlementStore

    store = EntitlementStore(url)
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        count = export(store, sink)
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak (the
    # builder's) over an exec into ru_maxrss.
    with open("/proc/self/status") as status:
        hwm = [line for line in status if line.startswith("VmHWM:")]
    peak = (
        int(hwm[0].split()[1]) // 1024
        if hwm
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    )
    print(json.dumps({"events": count, "seconds": seconds, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--database-url", help="a PostgreSQL server URL without database")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    root = Path(tempfile.mkdtemp(prefix="entitle-export-"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for size in args.sizes:
        if args.database_url:
            import psycopg

            name = f"entitle_bench_export_{size}"
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')
            url = f"{args.database_url.rsplit('/', 1)[0]}/{name}"
        else:
            url = f"sqlite:///{root / f'{size}.db'}"
        started = time.perf_counter()
        count = build(url, size)
        built = time.perf_counter() - started
        out = subprocess.run(
            [sys.executable, __file__, "--child", url],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if args.database_url:
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(
            f"{count:>9,} events (built in {built:.0f} s): exported {result['events']:,} in"
            f" {result['seconds']:.1f} s, {result['events'] / result['seconds']:,.0f} events/s,"
            f" peak RSS {result['peak_mb']} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
