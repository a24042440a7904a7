"""The outbox: every outbound notification as a job, and the dispatcher
that sends them.

A projection saves its jobs in the same transaction as its position in the
event log, and a job's id is derived from (channel, message), so a replayed
or rebuilt log never enqueues a job twice. The dispatcher sends due jobs
through the `Sender` of their kind, at least once: a send whose success was
not recorded before a crash is sent again, with the same message id, which
the receiver deduplicates on.

A *channel* is one receiver (a webhook endpoint's id, ``mail``,
``stripe:<source>``). Each channel has its own worker and its own limit of
sends in flight, so a slow or failing receiver never slows another. A job
marked `ordered` waits until every earlier job (by log position) of its
channel with the same ordering key (an entitlement) succeeded or was given
up: the wait is per entitlement, not per channel.

Retries follow `RETRY_SCHEDULE` (seconds after each failed attempt, ±20 %
jitter, a receiver's Retry-After honoured up to `RETRY_AFTER_CAP`); after
the last one the job is `failed`. A channel that has done nothing but fail
for `DISABLE_AFTER` is paused and its sender told (`Sender.disabled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from uuid import uuid5

import anyio
import psycopg

from domain.entitlement import NAMESPACE
from services.health import sleep_unless
from services.metrics import OUTBOUND
from services.readmodel import ReadModel, moment
from services.store import CREATE_LOCK

log = logging.getLogger("entitle.outbound")

#: Seconds to wait after the 1st, 2nd, … failed attempt (Standard Webhooks'
#: and Svix's schedule); after the last, the job is given up (`failed`).
RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
JITTER = 0.2
#: A receiver's Retry-After is honoured up to this many seconds.
RETRY_AFTER_CAP = 36000.0
#: A channel failing every attempt for this long is paused.
DISABLE_AFTER = timedelta(days=5)
#: Sends in flight per channel.
CONCURRENCY = 64
#: After this many failed attempts in a row, a channel sends one job at a
#: time, `PROBE_INTERVAL` seconds apart, until one succeeds (a circuit
#: breaker): a dead receiver costs the others almost nothing.
FAILING_STREAK = 16
PROBE_INTERVAL = 1.0

JobStatus = Literal["pending", "succeeded", "failed"]

_TABLES = [
    """CREATE TABLE IF NOT EXISTS entitle_outbox_jobs (
        id TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        kind TEXT NOT NULL,
        message_id TEXT NOT NULL,
        type TEXT NOT NULL,
        ordering_key TEXT NOT NULL,
        ordered INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        -- Attempts made before the last resend: the schedule starts again there.
        retry_base INTEGER NOT NULL DEFAULT 0,
        next_at TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_status_code INTEGER,
        last_error TEXT
    )""",
    # Whether a channel has a job due: one probe.
    "CREATE INDEX IF NOT EXISTS entitle_outbox_chan"
    " ON entitle_outbox_jobs (channel, status, next_at)",
    # Due jobs of a channel in log order: the scan stops at the limit.
    "CREATE INDEX IF NOT EXISTS entitle_outbox_next"
    " ON entitle_outbox_jobs (channel, status, seq, id)",
    "CREATE INDEX IF NOT EXISTS entitle_outbox_order"
    " ON entitle_outbox_jobs (channel, ordering_key, status, seq)",
    "CREATE INDEX IF NOT EXISTS entitle_outbox_list ON entitle_outbox_jobs (channel, seq, id)",
    """CREATE TABLE IF NOT EXISTS entitle_outbox_attempts (
        job_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        at TEXT NOT NULL,
        status_code INTEGER,
        latency_ms DOUBLE PRECISION NOT NULL,
        answer TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (job_id, n)
    )""",
    # Per channel: its kind, paused (a disabled endpoint), since when it fails.
    """CREATE TABLE IF NOT EXISTS entitle_outbox_channels (
        channel TEXT PRIMARY KEY,
        kind TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        failing_since TEXT,
        last_success_at TEXT
    )""",
]


def job_id(channel: str, message_id: str) -> str:
    """The job's id: the same for the same message to the same channel."""
    return str(uuid5(NAMESPACE, f"job\x1f{channel}\x1f{message_id}"))


@dataclass(frozen=True)
class Job:
    """One message to one channel. `payload` is JSON-able and never holds
    an activation code or a secret: senders derive those at send time."""

    id: str
    channel: str
    kind: str
    message_id: str
    type: str
    ordering_key: str
    ordered: bool
    seq: int
    payload: dict[str, Any]
    attempts: int = 0
    created_at: datetime | None = None
    #: Attempts before the last resend (the retry schedule restarts there).
    retry_base: int = 0

    @classmethod
    def of(
        cls,
        channel: str,
        kind: str,
        message_id: str,
        type: str,
        ordering_key: str,
        seq: int,
        payload: dict[str, Any],
        ordered: bool = True,
    ) -> Job:
        return cls(
            job_id(channel, message_id),
            channel,
            kind,
            message_id,
            type,
            ordering_key,
            ordered,
            seq,
            payload,
        )


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    ok: bool
    #: HTTP status or SMTP reply code, when the receiver answered.
    status_code: int | None = None
    #: The first 1 KB of the receiver's answer.
    answer: str = ""
    #: Why it failed, without secrets.
    error: str | None = None
    #: Seconds the receiver asked us to wait (Retry-After).
    retry_after: float | None = None
    #: The receiver said never again (HTTP 410): pause the channel.
    disable: bool = False
    #: Retrying cannot help: give the job up now.
    permanent: bool = False


class Sender(Protocol):
    kind: str

    async def send(self, job: Job) -> Outcome:
        """Attempt `job` once; a receiver's fault is an `Outcome`, not an exception."""
        ...


@dataclass(frozen=True)
class Attempt:
    n: int
    at: datetime
    status_code: int | None
    latency_ms: float
    answer: str
    error: str | None


@dataclass(frozen=True)
class JobRecord:
    """A job as the operations API shows it, with its attempts."""

    job: Job
    status: JobStatus
    next_at: datetime | None
    updated_at: datetime
    last_status_code: int | None
    last_error: str | None
    attempts: list[Attempt] = field(default_factory=list)


def next_delay(
    attempts: int,
    retry_after: float | None,
    schedule: Sequence[float] = RETRY_SCHEDULE,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones, or None
    when the schedule is spent: the scheduled wait ±`JITTER`, at least the
    receiver's Retry-After (capped at `RETRY_AFTER_CAP`)."""
    if attempts > len(schedule):
        return None
    delay = schedule[attempts - 1] * (1 + JITTER * (2 * rand() - 1))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


_JOB_COLUMNS = (
    "id, channel, kind, message_id, type, ordering_key, ordered, seq, payload, attempts,"
    " created_at, retry_base"
)


def _job(row: Sequence[Any]) -> Job:
    return Job(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        bool(row[6]),
        int(row[7]),
        json.loads(row[8]),
        int(row[9]),
        _time(row[10]),
        int(row[11]),
    )


class Outbox:
    """The jobs, their attempts and the channels' state, in the read
    model's database."""

    def __init__(self, read_model: ReadModel, behind: str | None = None) -> None:
        """`behind`: a projection (the read model's) whose position no job
        is sent ahead of, so a receiver that calls the API about what it got
        (validates the code it was sent) finds it there."""
        self.read_model = read_model
        self.behind = behind
        self._sql = read_model.sql
        self.create(_TABLES)

    def create(self, statements: Sequence[str]) -> None:
        """Create tables (a channel's own), one process at a time."""
        with self.read_model.transaction() as cur:
            if self.read_model.postgres:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
            for statement in statements:
                cur.execute(statement)

    # -- what projections write -------------------------------------------

    def commit(
        self,
        projection: str,
        jobs: Sequence[Job],
        position: int,
        also: Callable[[Any], None] | None = None,
        now: datetime | None = None,
    ) -> None:
        """In one transaction: add `jobs` (a job id already there is left as
        it is), run `also(cursor)` for the projection's own tables, and save
        the projection's position."""
        with self.read_model.transaction() as cur:
            self._insert(cur, jobs, now)
            if also is not None:
                also(cur)
            self.read_model.save_position(cur, projection, position)

    def add(self, jobs: Sequence[Job], now: datetime | None = None) -> None:
        """Add jobs outside any projection (a test ping)."""
        with self.read_model.transaction() as cur:
            self._insert(cur, jobs, now)

    def _insert(self, cur: Any, jobs: Sequence[Job], now: datetime | None) -> None:
        if not jobs:
            return
        at = moment(now or datetime.now(UTC))
        cur.executemany(
            self._sql(
                "INSERT INTO entitle_outbox_jobs (id, channel, kind, message_id, type,"
                " ordering_key, ordered, seq, payload, status, attempts, next_at,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending',"
                " 0, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
            ),
            [
                (
                    job.id,
                    job.channel,
                    job.kind,
                    job.message_id,
                    job.type,
                    job.ordering_key,
                    int(job.ordered),
                    job.seq,
                    json.dumps(job.payload, default=str),
                    at,
                    at,
                    at,
                )
                for job in jobs
            ],
        )
        cur.executemany(
            self._sql(
                "INSERT INTO entitle_outbox_channels (channel, kind) VALUES (?, ?)"
                " ON CONFLICT (channel) DO UPDATE SET kind = excluded.kind"
            ),
            sorted({(job.channel, job.kind) for job in jobs}),
        )

    def paused_channels(self, cur: Any) -> list[str]:
        """The channels paused now, in the caller's transaction."""
        cur.execute(self._sql("SELECT channel FROM entitle_outbox_channels WHERE paused = 1"))
        return [row[0] for row in cur.fetchall()]

    def pause(self, cur: Any, channel: str, paused: bool) -> None:
        """Pause (or resume) a channel, in the caller's transaction."""
        cur.execute(
            self._sql(
                "INSERT INTO entitle_outbox_channels (channel, paused) VALUES (?, ?)"
                " ON CONFLICT (channel) DO UPDATE SET paused = excluded.paused,"
                " failing_since = CASE WHEN excluded.paused = 0 THEN NULL"
                " ELSE entitle_outbox_channels.failing_since END"
            ),
            (channel, int(paused)),
        )

    # -- what the dispatcher reads and writes ---------------------------------

    def due_channels(self, now: datetime) -> list[tuple[str, str]]:
        """(channel, kind) of every unpaused channel with a job due."""
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT c.channel, c.kind FROM entitle_outbox_channels c"
                    " WHERE c.paused = 0 AND c.kind IS NOT NULL AND EXISTS (SELECT 1"
                    " FROM entitle_outbox_jobs j WHERE j.channel = c.channel"
                    " AND j.status = 'pending' AND j.next_at <= ?)"
                ),
                (moment(now),),
            )
            return [(row[0], row[1]) for row in cur.fetchall()]

    def due(self, channel: str, now: datetime, limit: int, busy: Sequence[str] = ()) -> list[Job]:
        """Up to `limit` jobs of `channel` due at `now`, oldest first, none in
        `busy` and none ordered behind an unfinished job of its key (one
        with a lower `seq`: a projection gives one key's jobs distinct ones).

        The scan must follow the (channel, status, seq) index and stop at
        the limit; `COALESCE` keeps both databases' planners off the
        (status, next_at) index, which made them sort every pending job of
        the channel (80 ms at 20,000 instead of 1-2 ms, measured on SQLite)."""
        skip = f" AND j.id NOT IN ({', '.join('?' * len(busy))})" if busy else ""
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    f"SELECT {', '.join('j.' + c for c in _JOB_COLUMNS.split(', '))}"
                    " FROM entitle_outbox_jobs j"
                    " WHERE j.channel = ? AND j.status = 'pending'"
                    " AND COALESCE(j.next_at, '') <= ?" + skip + ""
                    # A channel paused while its worker runs (an endpoint
                    # disabled) gets nothing more: the worker then ends.
                    " AND NOT EXISTS (SELECT 1 FROM entitle_outbox_channels c"
                    " WHERE c.channel = j.channel AND c.paused = 1)"
                    " AND (j.ordered = 0 OR NOT EXISTS (SELECT 1 FROM entitle_outbox_jobs p"
                    " WHERE p.channel = j.channel AND p.ordering_key = j.ordering_key"
                    " AND p.status = 'pending' AND p.seq < j.seq))"
                    + (
                        " AND j.seq <= COALESCE((SELECT r.position FROM entitle_read_positions r"
                        " WHERE r.name = ?), 0)"
                        if self.behind
                        else ""
                    )
                    + f" ORDER BY j.seq, j.id LIMIT {int(limit)}"
                ),
                (channel, moment(now), *busy, *([self.behind] if self.behind else [])),
            )
            return [_job(row) for row in cur.fetchall()]

    def record(
        self,
        results: Sequence[tuple[Job, Outcome, datetime, float]],
        schedule: Sequence[float] = RETRY_SCHEDULE,
        disable_after: timedelta = DISABLE_AFTER,
    ) -> list[tuple[str, str]]:
        """Record attempts (job, outcome, when, latency in ms) in one
        transaction: each job succeeded, given up, or due again later.
        Returns the channels to disable, each with the reason."""
        disable: dict[str, str] = {}
        attempts, updates = [], []
        succeeded: dict[str, datetime] = {}
        failing: dict[str, datetime] = {}
        for job, outcome, at, latency in results:
            n = job.attempts + 1
            attempts.append(
                (
                    job.id,
                    n,
                    moment(at),
                    outcome.status_code,
                    latency,
                    outcome.answer[:1024],
                    outcome.error,
                )
            )
            status: JobStatus = "succeeded"
            next_at = at
            if outcome.ok:
                succeeded[job.channel] = max(at, succeeded.get(job.channel, at))
            else:
                delay = (
                    None
                    if outcome.permanent
                    else next_delay(n - job.retry_base, outcome.retry_after, schedule)
                )
                status = "pending" if delay is not None else "failed"
                # Counted from the attempt's end: after a 15 s timeout, the
                # first retry still waits its 5 s.
                next_at = at + timedelta(milliseconds=latency, seconds=delay or 0)
                failing[job.channel] = min(at, failing.get(job.channel, at))
                if outcome.disable:
                    disable[job.channel] = f"the receiver answered {outcome.status_code} (gone)"
            updates.append(
                (
                    status,
                    n,
                    moment(next_at),
                    moment(at),
                    outcome.status_code,
                    outcome.error,
                    job.id,
                    status,
                )
            )
        with self.read_model.transaction() as cur:
            cur.executemany(
                self._sql(
                    "INSERT INTO entitle_outbox_attempts (job_id, n, at, status_code,"
                    " latency_ms, answer, error) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (job_id, n) DO NOTHING"
                ),
                attempts,
            )
            update = self._sql(
                "UPDATE entitle_outbox_jobs SET status = ?, attempts = ?, next_at = ?,"
                " updated_at = ?, last_status_code = ?, last_error = ? WHERE id = ?"
                # A job given up while its attempt flew (its endpoint
                # deleted) stays failed unless the attempt got through.
                " AND (status = 'pending' OR ? = 'succeeded')"
            )
            cur.executemany(update, [u for u in updates if u[0] != "failed"])
            # Each job given up is logged once, after the commit: only those
            # this update gave up (not one given up already while it flew).
            given_up = set()
            for u in updates:
                if u[0] == "failed":
                    cur.execute(update, u)
                    if cur.rowcount == 1:
                        given_up.add(u[6])
            # A success ends a channel's failing spell; failures start one.
            for channel, at in succeeded.items():
                cur.execute(
                    self._sql(
                        "INSERT INTO entitle_outbox_channels (channel, last_success_at)"
                        " VALUES (?, ?) ON CONFLICT (channel) DO UPDATE SET"
                        " failing_since = NULL, last_success_at = excluded.last_success_at"
                    ),
                    (channel, moment(at)),
                )
            for channel, at in failing.items():
                if channel in succeeded:
                    continue
                cur.execute(
                    self._sql(
                        "INSERT INTO entitle_outbox_channels (channel, failing_since)"
                        " VALUES (?, ?) ON CONFLICT (channel) DO UPDATE SET failing_since ="
                        " COALESCE(entitle_outbox_channels.failing_since, excluded.failing_since)"
                    ),
                    (channel, moment(at)),
                )
                cur.execute(
                    self._sql(
                        "SELECT failing_since FROM entitle_outbox_channels WHERE channel = ?"
                    ),
                    (channel,),
                )
                since = _time(cur.fetchone()[0])
                latest = max(r[2] for r in results if r[0].channel == channel)
                if channel not in disable and since is not None and latest - since >= disable_after:
                    days = disable_after.total_seconds() / 86400
                    disable[channel] = f"every attempt failed for {days:g} days"
            for channel in disable:
                self.pause(cur, channel, True)
        for (job, outcome, *_), status in zip(results, (u[0] for u in updates), strict=True):
            OUTBOUND.labels(job.kind, "retrying" if status == "pending" else status).inc()
            if job.id in given_up:
                log.warning(
                    "outbound %s %s given up after %d attempt(s): %s",
                    job.kind,
                    job.message_id,
                    job.attempts + 1,
                    without_addresses(outcome.error or ""),
                )
        return sorted(disable.items())

    # -- what operators read and do ----------------------------------------

    def jobs(
        self,
        channel: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        after: tuple[int, str] | None = None,
        limit: int = 100,
        job_id: str | None = None,
    ) -> list[JobRecord]:
        """Jobs, oldest first (by log position, then id), after the cursor
        `after` = (seq, id), with their attempts."""
        clauses: list[str] = []
        params: list[Any] = []
        filters = (("channel", channel), ("kind", kind), ("status", status), ("id", job_id))
        for column, value in filters:
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            clauses.append("(seq > ? OR (seq = ? AND id > ?))")
            params += [after[0], after[0], after[1]]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_JOB_COLUMNS}, status, next_at, updated_at, last_status_code,"
                    f" last_error FROM entitle_outbox_jobs{where}"
                    f" ORDER BY seq, id LIMIT {int(limit)}"
                ),
                params,
            )
            rows = cur.fetchall()
            records = [
                JobRecord(
                    _job(row),
                    row[12],
                    _time(row[13]) if row[12] == "pending" else None,
                    _time(row[14]) or datetime.now(UTC),
                    row[15],
                    row[16],
                )
                for row in rows
            ]
            if records:
                cur.execute(
                    self._sql(
                        "SELECT job_id, n, at, status_code, latency_ms, answer, error"
                        " FROM entitle_outbox_attempts WHERE job_id IN"
                        f" ({', '.join('?' * len(records))}) ORDER BY job_id, n"
                    ),
                    [r.job.id for r in records],
                )
                by_job: dict[str, list[Attempt]] = {}
                for a in cur.fetchall():
                    by_job.setdefault(a[0], []).append(
                        Attempt(a[1], _time(a[2]) or datetime.now(UTC), a[3], a[4], a[5], a[6])
                    )
                for record in records:
                    record.attempts.extend(by_job.get(record.job.id, []))
        return records

    def job(self, job_id: str) -> JobRecord | None:
        found = self.jobs(job_id=job_id, limit=1)
        return found[0] if found else None

    def resend(self, job_ids: Sequence[str], now: datetime | None = None) -> int:
        """Send these jobs again, whatever came of them, with a fresh retry
        schedule; returns how many there were."""
        if not job_ids:
            return 0
        with self.read_model.transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE entitle_outbox_jobs SET status = 'pending', retry_base = attempts,"
                    f" next_at = ? WHERE id IN ({', '.join('?' * len(job_ids))})"
                ),
                (moment(now or datetime.now(UTC)), *job_ids),
            )
            return int(cur.rowcount)

    def counts(self, channel: str) -> dict[str, int]:
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT status, COUNT(*) FROM entitle_outbox_jobs WHERE channel = ?"
                    " GROUP BY status"
                ),
                (channel,),
            )
            return {row[0]: int(row[1]) for row in cur.fetchall()}

    # -- added for the operations API (services/outbound_api.py) -----------

    def paused(self, channel: str) -> tuple[datetime | None, int | None, str | None] | None:
        """None unless `channel` is paused; else since when it has failed,
        and the status code and error of its latest attempt."""
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT paused, failing_since FROM entitle_outbox_channels WHERE channel = ?"
                ),
                (channel,),
            )
            row = cur.fetchone()
            if row is None or not row[0]:
                return None
            cur.execute(
                self._sql(
                    "SELECT last_status_code, last_error FROM entitle_outbox_jobs"
                    " WHERE channel = ? AND attempts > 0 ORDER BY updated_at DESC LIMIT 1"
                ),
                (channel,),
            )
            last = cur.fetchone()
        return _time(row[1]), last[0] if last else None, last[1] if last else None

    def give_up(self, cur: Any, channel: str, error: str, at: datetime) -> None:
        """Make the channel's pending jobs `failed` with `error`, in the
        caller's transaction (an endpoint deleted)."""
        cur.execute(
            self._sql(
                "UPDATE entitle_outbox_jobs SET status = 'failed', last_error = ?,"
                " updated_at = ? WHERE channel = ? AND status = 'pending'"
            ),
            (error, moment(at), channel),
        )

    def unsuccessful_since(self, channel: str, since: datetime) -> tuple[list[str], list[str]]:
        """Ids of the channel's jobs created at or after `since` that failed,
        and of those still pending after failed attempts (since their last
        resend, if any)."""
        with self.read_model.transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT id, status FROM entitle_outbox_jobs WHERE channel = ?"
                    " AND created_at >= ? AND (status = 'failed'"
                    " OR (status = 'pending' AND attempts > retry_base)) ORDER BY seq, id"
                ),
                (channel, moment(since)),
            )
            rows = cur.fetchall()
        return [r[0] for r in rows if r[1] == "failed"], [r[0] for r in rows if r[1] != "failed"]

    def due_now(self, job_ids: Sequence[str], now: datetime | None = None) -> int:
        """Make these pending jobs due now, keeping their attempts; returns
        how many there were."""
        if not job_ids:
            return 0
        with self.read_model.transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE entitle_outbox_jobs SET next_at = ? WHERE status = 'pending'"
                    f" AND id IN ({', '.join('?' * len(job_ids))})"
                ),
                (moment(now or datetime.now(UTC)), *job_ids),
            )
            return int(cur.rowcount)

    def send_again(
        self,
        failed: Sequence[str],
        retrying: Sequence[str] = (),
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> int:
        """`resend` the `failed` jobs and make the `retrying` ones due now,
        100 at a time, calling `progress(done, total)` after each batch;
        returns how many there were."""
        total, done = len(failed) + len(retrying), 0
        for batch, send in ((failed, self.resend), (retrying, self.due_now)):
            for start in range(0, len(batch), 100):
                done += send(batch[start : start + 100])
                progress(done, total)
        return done


class Lease:
    """At most one dispatcher sends from a database's outbox at a time: two
    projector processes (a rolling deploy) would otherwise both send every
    due job. On PostgreSQL a session advisory lock, on SQLite an `flock` on
    a file beside the database; either is released when its holder dies, and
    a standby takes over at its next try."""

    # "entout": not the store's CREATE_LOCK, which every process takes to start.
    KEY = 0x656E746F7574

    def __init__(self, read_model: ReadModel) -> None:
        self.read_model = read_model
        self._connection: Any = None
        self._fd: int | None = None

    def hold(self) -> bool:
        """Take the lease if free, or check it is still ours; False while
        another dispatcher holds it (or the database cannot be reached)."""
        if not self.read_model.postgres:
            return self._hold_file()
        if self._connection is not None:
            try:
                self._connection.execute("SELECT 1")
                return True
            except Exception:  # the session, and with it the lock, is gone
                self.release()
        try:
            connection = psycopg.connect(self.read_model.url, autocommit=True, connect_timeout=5)
            row = connection.execute("SELECT pg_try_advisory_lock(%s)", (self.KEY,)).fetchone()
        except Exception:
            return False
        if row and row[0]:
            self._connection = connection
            return True
        connection.close()
        return False

    def _hold_file(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(
            self.read_model.sqlite_path + ".dispatcher.lock", os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class Dispatcher:
    """Sends due jobs: one worker per channel with due jobs, each with at
    most `concurrency` sends in flight. `wake()` after adding jobs sends
    them at once instead of at the next poll."""

    def __init__(
        self,
        outbox: Outbox,
        senders: Sequence[Sender],
        schedule: Sequence[float] = RETRY_SCHEDULE,
        concurrency: int = CONCURRENCY,
        poll_interval: float = 0.5,
        disable_after: timedelta = DISABLE_AFTER,
        on_disable: Callable[[str, str, str], Awaitable[None]] | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.outbox = outbox
        self.senders = {sender.kind: sender for sender in senders}
        self.schedule = tuple(schedule)
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.disable_after = disable_after
        #: Called with (kind, channel, reason) when a channel is paused.
        self.on_disable = on_disable
        #: None: this is the only dispatcher (tests).
        self.lease = lease
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        # Set (and replaced) by every wake: an idle channel worker takes the
        # current one before looking for jobs, so jobs added meanwhile wake
        # it at once (polling every 0.1 s cost 50 ms of latency on average).
        self._added = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()
        self._added.set()
        self._added = asyncio.Event()

    async def run(self, stop: asyncio.Event, working: Callable[[], None] = lambda: None) -> None:
        """Until `stop`: start a worker for each channel with due jobs, while
        this dispatcher holds the lease (else stand by, trying each second)."""
        standing_by = False
        checked = 0.0
        try:
            while not stop.is_set():
                self._wake.clear()
                # Checked at most every second: wakes come with every commit.
                if self.lease is not None and (standing_by or time.monotonic() - checked >= 1):
                    checked = time.monotonic()
                    held = await anyio.to_thread.run_sync(self.lease.hold)
                else:
                    held = True
                if not held:
                    if not standing_by:
                        log.info("another dispatcher sends from this outbox; standing by")
                    standing_by = True
                    await self._stop_workers()
                    working()
                    await sleep_unless(stop, 1.0)
                    continue
                if standing_by:
                    log.info("this dispatcher now sends from the outbox")
                standing_by = False
                now = datetime.now(UTC)
                channels = await anyio.to_thread.run_sync(self.outbox.due_channels, now)
                working()
                for channel, kind in channels:
                    worker = self._workers.get(channel)
                    if worker is not None and not worker.done():
                        continue
                    sender = self.senders.get(kind)
                    if sender is None:
                        continue
                    self._workers[channel] = asyncio.create_task(
                        self._channel(channel, sender, stop)
                    )
                for channel in [c for c, w in self._workers.items() if w.done()]:
                    task = self._workers.pop(channel)
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            await self._stop_workers()
            if self.lease is not None:
                self.lease.release()

    async def _stop_workers(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()

    async def _channel(self, channel: str, sender: Sender, stop: asyncio.Event) -> None:
        """Send the channel's due jobs until it has none (then the worker
        ends; `run` starts another when there are).

        Sends go on while the last outcomes are being saved; what finishes
        meanwhile is saved together next, so the database sees few, larger
        transactions. A job stays "in flight" (never picked again) until its
        outcome is saved. A channel whose last `FAILING_STREAK` attempts all
        failed sends one job at a time, `PROBE_INTERVAL` apart, until one
        succeeds."""
        flying: dict[str, asyncio.Task[tuple[Job, Outcome, datetime, float]]] = {}
        saving: asyncio.Future[list[tuple[str, str]]] | None = None
        saving_ids: list[str] = []
        idle = failed_in_a_row = 0
        probe_at = 0.0
        try:
            while not stop.is_set():
                breaking = failed_in_a_row >= FAILING_STREAK
                if breaking and not flying and (wait := probe_at - time.monotonic()) > 0:
                    await sleep_unless(stop, wait)
                    continue
                limit = 1 if breaking else self.concurrency
                free = limit - len(flying)
                added = self._added
                if free > 0 and (free >= min(8, limit) or len(flying) == len(saving_ids)):
                    jobs = await anyio.to_thread.run_sync(
                        self.outbox.due, channel, datetime.now(UTC), free, list(flying)
                    )
                    for job in jobs:
                        flying[job.id] = asyncio.create_task(_attempt(sender, job))
                if not flying:
                    idle += 1
                    if idle > 3:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(added.wait(), 0.1)
                    continue
                idle = 0
                waits: list[asyncio.Future[Any]] = [t for t in flying.values() if not t.done()]
                if saving is not None:
                    waits.append(saving)
                if waits:
                    await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if saving is not None and saving.done():
                    disabled = saving.result()
                    for job_id in saving_ids:
                        flying.pop(job_id, None)
                    saving, saving_ids = None, []
                    if await self._disabled(sender, channel, disabled):
                        return
                if saving is None:
                    results = [
                        task.result()
                        for job_id, task in flying.items()
                        if task.done() and job_id not in saving_ids
                    ]
                    if results:
                        for _, outcome, _, _ in results:
                            failed_in_a_row = 0 if outcome.ok else failed_in_a_row + 1
                        probe_at = time.monotonic() + PROBE_INTERVAL
                        saving_ids = [job.id for job, *_ in results]
                        saving = asyncio.ensure_future(
                            anyio.to_thread.run_sync(
                                self.outbox.record, results, self.schedule, self.disable_after
                            )
                        )
        finally:
            for task in flying.values():
                task.cancel()
            if saving is not None:
                # What was sent is saved before the worker goes (a crash
                # instead only means those are sent again).
                with contextlib.suppress(Exception):
                    await asyncio.shield(saving)

    async def _disabled(
        self, sender: Sender, channel: str, disabled: list[tuple[str, str]]
    ) -> bool:
        """Report channels the last save paused; True if `channel` was one."""
        for disabled_channel, reason in disabled:
            log.warning("outbound channel %s disabled: %s", disabled_channel, reason)
            if self.on_disable is not None:
                await self.on_disable(sender.kind, disabled_channel, reason)
        return any(name == channel for name, _ in disabled)


_ADDRESS = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")


def without_addresses(text: str) -> str:
    """`text` with every e-mail address in it cut to "…@…": a mail
    server's refusal often quotes the recipient, and the buyer's address is
    theirs, not the log's."""
    return _ADDRESS.sub("…@…", text)


async def _attempt(sender: Sender, job: Job) -> tuple[Job, Outcome, datetime, float]:
    at = datetime.now(UTC)
    started = time.perf_counter()
    try:
        outcome = await sender.send(job)
    except Exception as exc:  # a sender's bug must not stop the channel
        log.exception("sender %s failed on job %s", sender.kind, job.id)
        outcome = Outcome(ok=False, error=f"internal error: {type(exc).__name__}")
    return job, outcome, at, (time.perf_counter() - started) * 1000
