"""Replay benchmark: how fast `entitle replay` rebuilds the read model from
the event store, beside a bare eventsourcing read of the same events, and
how long an as-of fold of one long entitlement takes.

    python bench/replay.py                          # 120,000 events on SQLite
    python bench/replay.py --events 1000000         # the big run
    python bench/replay.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

The store is built once per size (and database) and reused from `--dir`
(default /tmp/entitle-bench-replay; `--rebuild` builds it again). It is
made through the domain, in bulk, like real use: subscriptions created,
renewed (some paid ahead, some failed and recovered), changing plan or
customer e-mail, canceled; admin suspensions; activation codes issued;
seats activated and released; usage recorded; provider events delivered
twice (duplicate receipts); unmappable ones as dead letters; refunds parked
and later resolved as dead letters; and one metered entitlement that gets
about 1,100 events spread over the whole log (the as-of subject). Older
subscriptions are picked more often, so lengths vary widely. Events are
saved in transactions of about 2,000 events, each with the receipts of its
provider events, as the domain service saves its batches.

Printed, from one run: the bare rate (select_notifications pages of 1,000
and mapper.to_domain_event of each), `entitle replay`'s rate (the function
the CLI calls) and its ratio to the bare rate, the total seconds, the
as-of folds (to version 1,000 and to a recorded time in the middle of
that entitlement's history) and the peak resident memory of the
measuring process (the store is built in a child process). CPU times
include the replay's and verify's fold processes; peak memory does not.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from contracts.webhooks import RawWebhookV1  # noqa: E402
from domain.commands import Customer, OrderEvent, Rules, apply  # noqa: E402
from domain.dead_letter import DeadLetter  # noqa: E402
from domain.entitlement import (  # noqa: E402
    Cause,
    Entitlement,
    Refused,
    entitlement_id,
)
from domain.lifecycle import Line, ended, payment, payment_failed, subscription  # noqa: E402
from domain.receipt import ReceiptResolution, Receipts, receipt  # noqa: E402
from services import audit  # noqa: E402
from services.codes import CodeBook  # noqa: E402
from services.config import parse_config  # noqa: E402
from services.projections import replay  # noqa: E402
from services.readmodel import ReadModel  # noqa: E402
from services.store import EntitlementStore  # noqa: E402

SOURCE = "stripe-main"
CONFIG = parse_config("""
sources:
  stripe-main: {provider: stripe, secret: whsec_bench}
offerings:
  - {sku: basic, product: acme, seats: 1, limits: {projects: 5}}
  - {sku: pro, product: acme, seats: 5, features: {export: true}, limits: {projects: 50},
     suspend_after_days: 3, expire_after_days: 14}
  - {sku: metered, product: acme, seats: 3, limits: {api_calls: 1000000000}}
""")
CODES = CodeBook("bench-code-secret-0123456789")
RULES = Rules(CONFIG.catalog, CONFIG.policy, CODES.hash)
START = datetime(2025, 1, 1, tzinfo=UTC)
MONTH = timedelta(days=30)
#: At most so many receipts (one Receipts record) and events per transaction.
RECEIPTS_EVERY, SAVE_EVERY = 500, 2000
#: Version of the as-of subject that is folded.
AS_OF_VERSION = 1000


# -- building the store ---------------------------------------------------------


class _Memory:
    """Every aggregate built so far, in memory (the domain's `Aggregates`)."""

    def __init__(self) -> None:
        self.items: dict[UUID, Any] = {}
        self.touched: dict[UUID, Any] = {}

    def find(self, aggregate_id: UUID, kind: type[Any]) -> Any:
        found = self.items.get(aggregate_id)
        if found is not None:
            self.touched[aggregate_id] = found
        return found

    def add(self, aggregate: Any) -> None:
        self.items[aggregate.id] = aggregate
        self.touched[aggregate.id] = aggregate


class _Sub:
    """One subscription (order) with a single item."""

    def __init__(self, n: int, sku: str, at: datetime) -> None:
        self.n = n
        self.order_ref = f"sub_{n:07d}"
        self.slot = f"si_{n:07d}"
        self.sku = sku
        self.invoices = 0
        self.period_end = at
        self.email = f"buyer{n}@example.com"
        self.seats: list[str] = []
        self.suspended = False

    @property
    def id(self) -> UUID:
        return entitlement_id(SOURCE, self.order_ref, self.slot)

    def line(self, start: datetime | None = None, end: datetime | None = None) -> Line:
        offering = CONFIG.catalog.get(self.sku)
        assert offering is not None
        return Line(self.slot, offering, 1, start, end)


class Builder:
    """Makes a store of about `events` events through the domain (see the
    module's docstring for the mix)."""

    def __init__(self, store: EntitlementStore, seed: int) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.memory = _Memory()
        self.at = START
        self.subs: list[_Sub] = []
        self.items: list[dict[str, Any]] = []
        self.parked: list[str] = []
        self.saved = 0
        self.counter = 0
        self.made = 0
        self.long: _Sub | None = None
        #: Aggregates the builder will not change again (dropped after saving).
        self.gone: set[UUID] = set()

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter:08d}"

    def _provider(self, sub: _Sub, fact: dict[str, Any], event_type: str, lines: bool) -> None:
        """One provider event applied (10 % of them delivered twice)."""
        event_id = self._next("evt")
        command = OrderEvent(
            source=SOURCE,
            order_ref=sub.order_ref,
            fact=fact,
            lines=(sub.line(),) if lines else (),
            cause=Cause.provider(SOURCE, event_id),
            occurred_at=self.at,
            customer=Customer(f"cus_{sub.n}", sub.email),
        )
        for delivery in range(2 if self.rng.random() < 0.10 else 1):
            effect = apply(command, self.memory, RULES, self.at)
            outcome = "duplicate" if effect.duplicate or delivery else "applied"
            self._receipt(sub.order_ref, event_id, event_type, outcome, None, effect)

    def _receipt(
        self,
        order_ref: str,
        event_id: str,
        event_type: str,
        outcome: Any,
        detail: str | None,
        effect: Any,
    ) -> str:
        receipt_id = self._next("rcpt")
        self.items.append(
            receipt(
                receipt=receipt_id,
                source=SOURCE,
                provider="stripe",
                provider_event_id=event_id,
                event_type=event_type,
                order_ref=order_ref,
                received_at=self.at,
                outcome=outcome,
                detail=detail,
                effect=effect,
            )
        )
        return receipt_id

    def _entitlement(self, sub: _Sub) -> Entitlement:
        found = self.memory.find(sub.id, Entitlement)
        assert isinstance(found, Entitlement)
        return found

    # the actions ------------------------------------------------------------

    def create(self, sku: str | None = None) -> _Sub:
        sku = sku or self.rng.choice(["basic", "basic", "pro"])
        self.made += 1
        sub = _Sub(self.made, sku, self.at)
        self.subs.append(sub)
        self.renew(sub)
        return sub

    def renew(self, sub: _Sub) -> None:
        start = max(sub.period_end, self.at - timedelta(days=1))
        sub.period_end = start + MONTH
        sub.invoices += 1
        fact = payment(f"in_{sub.order_ref}_{sub.invoices}", [sub.line(start, sub.period_end)])
        self._provider(sub, fact, "invoice.paid", lines=True)

    def fail_and_recover(self, sub: _Sub) -> None:
        start, end = sub.period_end, sub.period_end + MONTH
        fact = payment_failed(f"in_{sub.order_ref}_{sub.invoices + 1}", [sub.line(start, end)])
        self._provider(sub, fact, "invoice.payment_failed", lines=True)
        if self.rng.random() < 0.6:
            self.renew(sub)

    def change_plan(self, sub: _Sub) -> None:
        sub.sku = "pro" if sub.sku == "basic" else "basic"
        self.renew(sub)

    def change_customer(self, sub: _Sub) -> None:
        sub.email = f"buyer{sub.n}+{self.counter}@example.com"
        fact = subscription("active", [sub.line()], self.at - MONTH, sub.period_end)
        self._provider(sub, fact, "customer.updated", lines=False)

    def cancel(self, sub: _Sub) -> None:
        self._provider(sub, ended("canceled"), "customer.subscription.deleted", lines=False)
        if sub is not self.long:
            self.subs.remove(sub)
            self.gone.add(sub.id)

    def suspend_or_reinstate(self, sub: _Sub) -> None:
        action = "reinstate" if sub.suspended else "suspend"
        entitlement = self._entitlement(sub)
        entitlement.administer(
            action, "ops", "bench", self._next("req"), RULES.catalog, RULES.policy, self.at
        )
        sub.suspended = not sub.suspended

    def issue_code(self, sub: _Sub) -> None:
        self._entitlement(sub).issue_code(RULES.code_hash, "ops", self._next("req"), self.at)

    def seat(self, sub: _Sub) -> None:
        entitlement = self._entitlement(sub)
        if sub.seats and (len(sub.seats) >= entitlement.seats or self.rng.random() < 0.3):
            seat_id = sub.seats.pop(self.rng.randrange(len(sub.seats)))
            if seat_id in entitlement.activations:
                entitlement.release(seat_id, "released", self._next("req"), self.at)
            return
        seat_id = self._next("seat")
        code = next(iter(entitlement.codes))
        entitlement.activate(code, f"fp-{seat_id}", "laptop", seat_id, self._next("req"), self.at)
        sub.seats.append(seat_id)

    def usage(self, sub: _Sub) -> None:
        entitlement = self._entitlement(sub)
        metric = next(iter(entitlement.limits))
        entitlement.record_usage(metric, 1, self._next("use"), self.at)

    def dead_letter(self) -> None:
        event_id = self._next("evt")
        receipt_id = self._receipt(
            "", event_id, "invoice.paid", "dead_letter", "no offering", _NONE
        )
        webhook = RawWebhookV1(
            receipt_id=receipt_id,
            source=SOURCE,
            provider="stripe",
            routing_key="sub_unknown",
            received_at=self.at,
            headers={},
            body=json.dumps({"id": event_id, "type": "invoice.paid"}),
        )
        letter = DeadLetter.record(
            source=SOURCE,
            provider="stripe",
            provider_event_id=event_id,
            reason="price price_unknown maps to no offering",
            webhook=webhook.model_dump(mode="json"),
            at=self.at,
        )
        self.memory.add(letter)
        self.gone.add(letter.id)

    def park(self) -> None:
        """A refund for a payment never seen: parked, and after a while a
        dead letter for waiting too long (a ReceiptResolution)."""
        receipt_id = self._receipt(
            "", self._next("evt"), "charge.refunded", "parked", "waits", _NONE
        )
        self.parked.append(receipt_id)
        if len(self.parked) > 50:
            waited = self.parked.pop(0)
            resolution = ReceiptResolution.open(waited, self.at)
            resolution.resolve("dead_letter", "waited 7 days for payment pi_x", self.at)
            self.memory.add(resolution)
            self.gone.add(resolution.id)

    # the whole --------------------------------------------------------------

    def step(self) -> None:
        self.at += timedelta(seconds=20)
        rng = self.rng
        if not self.subs or rng.random() < 0.14:
            self.create()
            return
        # Older subscriptions come up more often: lengths vary widely.
        sub = self.subs[int(len(self.subs) * rng.random() ** 1.5)]
        if sub is self.long:
            return  # its events come at a steady pace (`build`)
        roll = rng.random()
        try:
            if roll < 0.25:
                self.renew(sub)
            elif roll < 0.28:
                self.fail_and_recover(sub)
            elif roll < 0.31:
                self.change_plan(sub)
            elif roll < 0.35:
                self.change_customer(sub)
            elif roll < 0.37:
                self.cancel(sub)
            elif roll < 0.38:
                self.suspend_or_reinstate(sub)
            elif roll < 0.43:
                self.issue_code(sub)
            elif roll < 0.60:
                self.seat(sub)
            elif roll < 0.95:
                self.usage(sub)
            elif roll < 0.98:
                self.dead_letter()
            else:
                self.park()
        except Refused:
            pass  # not active, over its limit: as a client would be told

    def save(self) -> None:
        aggregates = [a for a in self.memory.touched.values() if a.pending_events]
        if self.items:
            where = self._next("batch")
            aggregates.append(Receipts.record(self.items, where, self.at))  # never kept
            self.items = []
        self.saved += self.store.record(aggregates, None)
        self.memory.touched.clear()
        # Ended aggregates are not needed again: keep only what may change.
        for aggregate_id in self.gone:
            self.memory.items.pop(aggregate_id, None)
        self.gone.clear()

    def build(self, events: int) -> dict[str, Any]:
        self.long = self.create("metered")
        long_every = max(1, events // (AS_OF_VERSION + 100))
        pending = 0
        middle: datetime | None = None
        next_long = long_every
        steps = 0
        while self.saved + pending < events:
            self.step()
            steps += 1
            if steps % 100:  # (counting pending events costs: not each step)
                continue
            pending = sum(len(a.pending_events) for a in self.memory.touched.values())
            while self.saved + pending >= next_long:
                next_long += long_every
                pending += 1
                entitlement = self._entitlement(self.long)
                if entitlement.period_end is None or entitlement.period_end < self.at + MONTH:
                    self.renew(self.long)
                else:
                    self.usage(self.long)
                if middle is None and entitlement.version >= AS_OF_VERSION // 2:
                    middle = self.at
            if pending >= SAVE_EVERY or len(self.items) >= RECEIPTS_EVERY:
                self.save()
                pending = 0
        self.save()
        long = self._entitlement(self.long)
        assert long.version >= AS_OF_VERSION, f"the long entitlement has {long.version} events"
        return {
            "events": self.saved,
            "entitlements": self.made,
            "long": str(self.long.id),
            "long_events": long.version,
            "middle": (middle or self.at).isoformat(),
        }


class _NoEffect:
    """The effect of a webhook that reached no entitlement (for `receipt`)."""

    def __init__(self) -> None:
        self.events: dict[UUID, list[str]] = {}
        self.waits_for = "payment pi_x"
        self.waits_on = ("payment:x",)


_NONE: Any = _NoEffect()


# -- the cache -------------------------------------------------------------------


def database_for(args: argparse.Namespace) -> tuple[str, Path]:
    """The store's URL and the file that describes it once built."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"replay_{args.events}_{args.seed}"
    if args.postgres:
        import psycopg

        database = f"entitle_bench_{name}"
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
            ).fetchone()
            if exists is None or args.rebuild:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{database}"')
                (directory / f"{database}.json").unlink(missing_ok=True)
        url = urlsplit(args.postgres)._replace(path=f"/{database}").geturl()
        return url, directory / f"{database}.json"
    path = directory / f"{name}.db"
    if args.rebuild:
        for suffix in ("", "-wal", "-shm", ".create-lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        (directory / f"{name}.json").unlink(missing_ok=True)
    return f"sqlite:///{path}", directory / f"{name}.json"


def build(url: str, events: int, seed: int, described: Path) -> None:
    started = time.perf_counter()
    store = EntitlementStore(url)
    try:
        info = Builder(store, seed).build(events)
    finally:
        store.close()
    info["seconds"] = round(time.perf_counter() - started, 1)
    described.write_text(json.dumps(info))
    print(
        f"built: {info['events']:,} events, {info['entitlements']:,} entitlements"
        f" in {info['seconds']:.0f} s ({info['events'] / info['seconds']:,.0f} events/s)",
        flush=True,
    )


# -- measuring -------------------------------------------------------------------


def bare(store: EntitlementStore, page: int = 1000) -> tuple[int, float]:
    """Events selected and decoded by eventsourcing alone, and the seconds."""
    recorder, mapper = store.process_recorder, store.mapper
    started, position, count = time.perf_counter(), 0, 0
    while notifications := recorder.select_notifications(start=position + 1, limit=page):
        for notification in notifications:
            mapper.to_domain_event(notification)
        count += len(notifications)
        position = notifications[-1].id
    return count, time.perf_counter() - started


def timed(call: Any, runs: int = 7) -> tuple[float, Any]:
    """Median milliseconds of `runs` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def cpu_time() -> float:
    """CPU seconds of this process and of its children that ended (the
    fold's processes: `services/projections/parallel.py`)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_mb() -> float:
    """The peak resident memory of the largest child process that ended."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(url: str, info: dict[str, Any]) -> None:
    store = EntitlementStore(url)
    read_model = ReadModel(url)
    try:
        cpu = cpu_time()
        count, seconds = bare(store)
        bare_rate, bare_cpu = count / seconds, cpu_time() - cpu
        print(
            f"bare eventsourcing: {count:,} events selected + decoded in {seconds:.1f} s"
            f" = {bare_rate:,.0f} events/s ({bare_cpu:.1f} s CPU; peak RSS {peak_mb():,.0f} MB)",
            flush=True,
        )

        cpu, started = cpu_time(), time.perf_counter()
        replayed = replay(store, read_model)
        seconds, replay_cpu = time.perf_counter() - started, cpu_time() - cpu
        rate = count / seconds
        print(
            f"entitle replay:     {count:,} events ({replayed:,} projected) in {seconds:.1f} s"
            f" = {rate:,.0f} events/s, {rate / bare_rate:.0%} of bare"
            f" ({replay_cpu:.1f} s CPU, {bare_cpu / replay_cpu:.0%} of bare's rate by CPU time;"
            f" peak RSS {peak_mb():,.0f} MB, of a fold process {child_peak_mb():,.0f} MB)",
            flush=True,
        )

        cpu, started = cpu_time(), time.perf_counter()
        report = audit.verify(store, read_model)
        seconds, verify_cpu = time.perf_counter() - started, cpu_time() - cpu
        verified = report.events / seconds
        print(
            f"entitle audit verify: {report.events:,} events in {seconds:.1f} s"
            f" = {verified:,.0f} events/s, {verified / bare_rate:.0%} of bare"
            f" ({verify_cpu:.1f} s CPU; {report.mismatch_count} mismatches;"
            f" peak RSS {peak_mb():,.0f} MB)",
            flush=True,
        )

        long_id, middle = UUID(info["long"]), datetime.fromisoformat(info["middle"])
        ms, state = timed(lambda: store.entitlement_as_of(long_id, version=AS_OF_VERSION))
        assert state.version == AS_OF_VERSION
        print(
            f"as of version {AS_OF_VERSION:,} of an entitlement with {info['long_events']:,}"
            f" events: {ms:.1f} ms (median of 7)"
        )
        ms, state = timed(lambda: store.entitlement_as_of(long_id, at=middle))
        print(
            f"as of {middle:%Y-%m-%d %H:%M:%S} (its version {state.version:,}):"
            f" {ms:.1f} ms (median of 7)"
        )
    finally:
        read_model.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=120_000)
    parser.add_argument("--postgres", help="a PostgreSQL URL: measure there instead of SQLite")
    parser.add_argument("--dir", default="/tmp/entitle-bench-replay", help="where stores are kept")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--rebuild", action="store_true", help="build the store again")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url, described = database_for(args)
    if args.build_only:
        build(url, args.events, args.seed, described)
        return
    if not described.exists():
        # In a child process, so the peak memory printed is the measurement's.
        command = [sys.executable, __file__, "--build-only", "--events", str(args.events)]
        command += ["--dir", args.dir, "--seed", str(args.seed)]
        command += ["--postgres", args.postgres] if args.postgres else []
        subprocess.run(command, check=True)
    info = json.loads(described.read_text())
    print(
        f"store: {url} ({info['events']:,} events, {info['entitlements']:,} entitlements,"
        f" built in {info['seconds']:.0f} s)",
        flush=True,
    )
    measure(url, info)


if __name__ == "__main__":
    main()
