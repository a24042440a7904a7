"""The outbox and its dispatcher on a real SQLite database, with senders
that answer what each test needs."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from contracts.outbound import EndpointView
from services.cli import main
from services.outbound.outbox import (
    RETRY_AFTER_CAP,
    RETRY_SCHEDULE,
    Dispatcher,
    Job,
    Lease,
    Outbox,
    Outcome,
    next_delay,
)
from services.outbound.webhooks import ENDPOINTS_TABLE, EndpointInfo
from services.readmodel import ReadModel


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    read_model = ReadModel(f"sqlite:///{tmp_path}/outbox.db")
    yield Outbox(read_model)
    read_model.close()


class Scripted:
    """Answers per channel from a list of outcomes (then success)."""

    kind = "test"

    def __init__(self, script: dict[str, list[Outcome]] | None = None) -> None:
        self.script = script or {}
        self.sent: list[tuple[str, int]] = []

    async def send(self, job: Job) -> Outcome:
        self.sent.append((job.channel, job.payload["n"]))
        queue = self.script.get(job.channel, [])
        return queue.pop(0) if queue else Outcome(ok=True, status_code=200)


def jobs(channel: str, key: str, count: int, ordered: bool = True, start: int = 0) -> list[Job]:
    return [
        Job.of(channel, "test", f"{channel}-{key}-{n}", "t", key, n, {"n": n}, ordered=ordered)
        for n in range(start, start + count)
    ]


def run(dispatcher: Dispatcher, seconds: float) -> None:
    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task

    asyncio.run(go())


def test_the_retry_schedule_jitters_within_a_fifth_and_honours_retry_after_up_to_a_cap() -> None:
    for attempt, base in enumerate(RETRY_SCHEDULE, 1):
        low = next_delay(attempt, None, rand=lambda: 0.0)
        high = next_delay(attempt, None, rand=lambda: 1.0)
        assert low == pytest.approx(base * 0.8) and high == pytest.approx(base * 1.2)
    assert next_delay(len(RETRY_SCHEDULE) + 1, None) is None
    assert next_delay(1, 120, rand=lambda: 0.5) == 120
    assert next_delay(1, 10**9, rand=lambda: 0.5) == RETRY_AFTER_CAP
    assert next_delay(3, 1, rand=lambda: 0.5) == 1800  # never sooner than the schedule


def test_a_replayed_projection_never_enqueues_twice(outbox: Outbox) -> None:
    outbox.commit("p", jobs("a", "k", 3), 10)
    outbox.commit("p", jobs("a", "k", 3), 10)
    assert outbox.counts("a") == {"pending": 3}
    assert outbox.read_model.position("p") == 10


def test_ordered_jobs_wait_per_key_and_unordered_ones_do_not(outbox: Outbox) -> None:
    outbox.commit("p", jobs("a", "k1", 3) + jobs("a", "k2", 2, start=10), 1)
    outbox.commit("p", jobs("b", "k1", 3, ordered=False), 2)
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert [j.payload["n"] for j in outbox.due("a", now, 100)] == [0, 10]
    assert [j.payload["n"] for j in outbox.due("b", now, 100)] == [0, 1, 2]
    assert outbox.due("a", now, 100, busy=[outbox.due("a", now, 1)[0].id])[0].payload["n"] == 10


def test_a_failing_key_holds_back_only_its_own_jobs_then_all_arrive_in_order(
    outbox: Outbox,
) -> None:
    failing = [Outcome(ok=False, status_code=500)] * 2
    sender = Scripted({"a": list(failing)})
    outbox.commit("p", jobs("a", "k1", 3) + jobs("b", "k1", 3), 1)
    run(Dispatcher(outbox, [sender], schedule=(0.1, 0.1, 0.1), poll_interval=0.05), 1.5)
    assert [n for c, n in sender.sent if c == "b"] == [0, 1, 2]
    assert [n for c, n in sender.sent if c == "a"] == [0, 0, 0, 1, 2]
    [first] = [r for r in outbox.jobs(channel="a") if r.job.payload["n"] == 0]
    assert [a.status_code for a in first.attempts] == [500, 500, 200]
    assert first.status == "succeeded"


def test_exhausted_and_permanent_failures_are_failed_and_release_the_next(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    sender = Scripted(
        {
            "a": [Outcome(ok=False, error="boom")] * 3,
            "b": [
                Outcome(
                    ok=False,
                    permanent=True,
                    error="the recipient was refused: SMTP 550 5.1.1 <ada@example.com>: unknown",
                )
            ],
        }
    )
    outbox.commit("p", jobs("a", "k", 2) + jobs("b", "k", 2), 1)
    with caplog.at_level(logging.WARNING, logger="entitle.outbound"):
        run(Dispatcher(outbox, [sender], schedule=(0.05, 0.05), poll_interval=0.05), 1.0)
    # Each job given up says so once, with why; a retry says nothing.
    given_up = sorted(r.getMessage() for r in caplog.records if "given up" in r.getMessage())
    assert len(given_up) == 2, given_up
    assert given_up[0].endswith("after 3 attempt(s): boom")
    # A mail server's refusal quotes the buyer's address: not in the log.
    assert given_up[1].endswith(
        "after 1 attempt(s): the recipient was refused: SMTP 550 5.1.1 <…@…>: unknown"
    )
    statuses = {(r.job.channel, r.job.payload["n"]): r.status for r in outbox.jobs()}
    assert statuses == {
        ("a", 0): "failed",
        ("a", 1): "succeeded",
        ("b", 0): "failed",
        ("b", 1): "succeeded",
    }
    assert sender.sent.count(("a", 0)) == 3 and sender.sent.count(("b", 0)) == 1


def test_a_channel_failing_for_the_whole_window_is_paused_and_reported(outbox: Outbox) -> None:
    disabled: list[tuple[str, str, str]] = []

    async def on_disable(kind: str, channel: str, reason: str) -> None:
        disabled.append((kind, channel, reason))

    sender = Scripted({"a": [Outcome(ok=False, status_code=500)] * 100})
    outbox.commit("p", jobs("a", "k", 1, ordered=False) + jobs("a", "j", 1, ordered=False), 1)
    dispatcher = Dispatcher(
        outbox,
        [sender],
        schedule=(0.05,) * 50,
        poll_interval=0.05,
        disable_after=timedelta(seconds=0.4),
        on_disable=on_disable,
    )
    run(dispatcher, 1.5)
    assert [(k, c) for k, c, _ in disabled] == [("test", "a")]
    assert "failed for" in disabled[0][2]
    tried = len(sender.sent)
    run(Dispatcher(outbox, [sender], poll_interval=0.05), 0.5)
    assert len(sender.sent) == tried  # paused: nothing more is sent


def _endpoint(outbox: Outbox, endpoint_id: str, **more: Any) -> EndpointInfo:
    """An endpoint in the table the webhooks projection keeps."""
    info = EndpointInfo(UUID(endpoint_id), "https://x.example/h", [], "crm", False, True, **more)
    outbox.create([ENDPOINTS_TABLE])
    with outbox.read_model.transaction() as cur:
        cur.execute(
            outbox.read_model.sql("INSERT INTO entitle_webhook_endpoints (id, body) VALUES (?, ?)"),
            (endpoint_id, info.to_json()),
        )
    return info


def test_the_cli_lists_resends_and_recovers(
    outbox: Outbox, tmp_path: Path, monkeypatch: Any, capfd: Any
) -> None:
    endpoint = "5f0c6a3e-3a41-4b55-9a3c-8f7a9a9d3c11"
    _endpoint(outbox, endpoint)
    webhooks = [
        Job.of(endpoint, "webhook", f"m{n}", "t", "k", n, {"n": n}, ordered=False) for n in range(4)
    ]
    outbox.commit("p", webhooks, 1)
    records = outbox.jobs(channel=endpoint)
    at = datetime.now(UTC)
    outbox.record(
        [(r.job, Outcome(ok=False, permanent=True, status_code=400), at, 5.0) for r in records[:3]]
    )
    # The fourth is still being retried after a failure.
    outbox.record([(records[3].job, Outcome(ok=False, status_code=503), at, 5.0)])
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path}/outbox.db")
    assert main(["outbound", "deliveries", endpoint, "--status", "failed"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 3 and '"status_code":400' in lines[0]
    assert main(["outbound", "resend", records[0].job.id]) == 0
    assert outbox.counts(endpoint) == {"pending": 2, "failed": 2}
    since = (at - timedelta(minutes=1)).isoformat()
    assert main(["outbound", "recover", endpoint, "--since", since]) == 0
    captured = capfd.readouterr()
    assert "resent 3 of 3" in captured.err
    assert outbox.counts(endpoint) == {"pending": 4}
    assert all(r.next_at and r.next_at <= datetime.now(UTC) for r in outbox.jobs(channel=endpoint))
    # A time to come is refused.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert main(["outbound", "recover", endpoint, "--since", later]) == 2
    assert "in the future" in capfd.readouterr().err


def test_the_cli_says_so_for_an_endpoint_or_delivery_it_does_not_know(
    outbox: Outbox, tmp_path: Path, monkeypatch: Any, capfd: Any
) -> None:
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path}/outbox.db")
    unknown = str(uuid4())
    for command in (
        ["deliveries", unknown],
        ["recover", unknown, "--since", "2026-01-01T00:00:00Z"],
    ):
        assert main(["outbound", *command]) == 1
        captured = capfd.readouterr()
        assert f"no webhook endpoint {unknown}" in captured.err and captured.out == ""
    assert main(["outbound", "resend", unknown]) == 1
    assert "no such delivery" in capfd.readouterr().err


def test_the_cli_refuses_to_recover_to_a_disabled_or_deleted_endpoint(
    outbox: Outbox, tmp_path: Path, monkeypatch: Any, capfd: Any
) -> None:
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path}/outbox.db")
    disabled = str(uuid4())
    _endpoint(outbox, disabled, disabled=True, disabled_reason="disabled by ops")
    deleted = str(uuid4())
    _endpoint(outbox, deleted, deleted=True)
    since = "2026-01-01T00:00:00Z"
    assert main(["outbound", "recover", disabled, "--since", since]) == 1
    assert "disabled by ops" in capfd.readouterr().err
    assert main(["outbound", "recover", deleted, "--since", since]) == 1
    assert "deleted" in capfd.readouterr().err
    # A deleted endpoint's deliveries are still listed, and not sent again.
    job = Job.of(deleted, "webhook", "m", "t", "k", 1, {"n": 1})
    outbox.add([job])
    assert main(["outbound", "deliveries", deleted]) == 0
    assert job.id in capfd.readouterr().out
    assert main(["outbound", "resend", job.id]) == 1
    assert "the endpoint was deleted" in capfd.readouterr().err


def test_the_cli_shows_endpoints_as_the_api_does(
    outbox: Outbox, tmp_path: Path, monkeypatch: Any, capfd: Any
) -> None:
    monkeypatch.setenv("ENTITLE_DATABASE_URL", f"sqlite:///{tmp_path}/outbox.db")
    endpoint = str(uuid4())
    _endpoint(outbox, endpoint, created_at=datetime(2026, 11, 30, 10, tzinfo=UTC))
    _endpoint(outbox, str(uuid4()), deleted=True)
    assert main(["outbound", "endpoints"]) == 0
    [line] = capfd.readouterr().out.splitlines()
    shown = json.loads(line)
    assert set(shown) == set(EndpointView.model_fields) - {"secret"}
    view = EndpointView.model_validate(shown)
    assert str(view.id) == endpoint and view.created_at == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert shown["created_at"] == "2026-11-30T10:00:00Z"


def test_two_dispatchers_on_one_database_send_each_job_once_and_a_standby_takes_over(
    database_url: str,
) -> None:
    """Two projector processes (a rolling deploy) share an outbox: one holds
    the lease and sends, the other stands by until the first is gone."""
    read_model = ReadModel(database_url)
    outbox = Outbox(read_model)
    first, second = Scripted(), Scripted()
    outbox.commit("p", jobs("a", "k", 20, ordered=False), 1)

    async def go() -> None:
        stop_first, stop_second = asyncio.Event(), asyncio.Event()
        one = Dispatcher(outbox, [first], poll_interval=0.05, lease=Lease(read_model))
        two = Dispatcher(outbox, [second], poll_interval=0.05, lease=Lease(read_model))
        running = [asyncio.create_task(one.run(stop_first))]
        await asyncio.sleep(0.3)
        running.append(asyncio.create_task(two.run(stop_second)))
        await asyncio.sleep(1.0)
        assert len(first.sent) == 20 and second.sent == []
        # Holding the lease does not keep another process from starting
        # (which takes the store's table lock on PostgreSQL).
        other = await asyncio.wait_for(asyncio.to_thread(ReadModel, database_url), 10)
        await asyncio.wait_for(asyncio.to_thread(Outbox, other), 10)
        other.close()
        outbox.commit("p", jobs("a", "k", 5, ordered=False, start=20), 2)
        stop_first.set()
        await running[0]
        await asyncio.sleep(2.5)  # the standby tries once a second
        stop_second.set()
        await running[1]

    asyncio.run(go())
    sent = [n for _, n in first.sent + second.sent]
    assert sorted(sent) == list(range(25))  # each once
    assert len(second.sent) == 5
    read_model.close()


def test_a_resent_job_keeps_its_attempts_and_starts_the_schedule_again(outbox: Outbox) -> None:
    [job] = jobs("a", "k", 1)
    outbox.commit("p", [job], 1)
    at = datetime.now(UTC)
    for n in range(3):
        [due] = outbox.due("a", at + timedelta(days=n + 1), 1)
        outbox.record([(due, Outcome(ok=False, status_code=500), at, 15_000.0)], schedule=(5, 5))
    [record] = outbox.jobs(channel="a")
    assert record.status == "failed" and [a.n for a in record.attempts] == [1, 2, 3]
    outbox.resend([job.id])
    [due] = outbox.due("a", datetime.now(UTC) + timedelta(seconds=1), 1)
    outbox.record([(due, Outcome(ok=False, status_code=503), at, 15_000.0)], schedule=(5, 5))
    [record] = outbox.jobs(channel="a")
    # The fourth attempt is listed, and the job is retried, not given up.
    assert [a.status_code for a in record.attempts] == [500, 500, 500, 503]
    assert record.status == "pending"
    # The wait counts from the attempt's end (15 s after it started).
    assert record.next_at is not None
    assert record.next_at - at >= timedelta(seconds=15 + 4)


def test_a_job_is_found_by_id_among_many_at_one_position(outbox: Outbox) -> None:
    many = [Job.of("a", "test", f"ping-{n}", "ping", f"k{n}", 0, {"n": n}) for n in range(1005)]
    outbox.add(many)
    last = max(many, key=lambda j: j.id)
    found = outbox.job(last.id)
    assert found is not None and found.job.id == last.id
    assert outbox.job("nope") is None


def test_a_channel_paused_while_its_worker_sends_gets_nothing_more(outbox: Outbox) -> None:
    """An endpoint disabled mid-burst (its channel paused) stops at once:
    the worker sends no further job, and the rest wait for it."""

    class Disabling(Scripted):
        async def send(self, job: Job) -> Outcome:
            if not self.sent:
                with outbox.read_model.transaction() as cur:
                    outbox.pause(cur, job.channel, True)
            return await super().send(job)

    sender = Disabling()
    outbox.commit("p", jobs("a", "k", 20, ordered=False), 1)
    run(Dispatcher(outbox, [sender], concurrency=1, poll_interval=0.05), 0.8)
    assert sender.sent == [("a", 0)]
    assert outbox.counts("a") == {"succeeded": 1, "pending": 19}


def test_a_job_given_up_while_its_attempt_flies_stays_failed_unless_it_got_through(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    outbox.commit("p", jobs("a", "k", 3, ordered=False), 1)
    first, second, third = outbox.due("a", datetime.now(UTC) + timedelta(seconds=1), 10)
    at = datetime.now(UTC)
    with outbox.read_model.transaction() as cur:  # the endpoint is deleted meanwhile
        outbox.give_up(cur, "a", "the endpoint was deleted", at)
    with caplog.at_level(logging.WARNING, logger="entitle.outbound"):
        outbox.record(
            [
                (first, Outcome(ok=False, status_code=500, error="answered 500"), at, 1.0),
                (second, Outcome(ok=True, status_code=200), at, 1.0),
                (third, Outcome(ok=False, permanent=True, error="answered 400"), at, 1.0),
            ]
        )
    records = {r.job.id: r for r in outbox.jobs(channel="a")}
    for given_up in (first, third):
        assert (records[given_up.id].status, records[given_up.id].last_error) == (
            "failed",
            "the endpoint was deleted",
        )
    assert records[second.id].status == "succeeded"
    assert [a.status_code for a in records[first.id].attempts] == [500]
    # Given up before its answer came: not logged as given up by it.
    assert not [r for r in caplog.records if "given up" in r.getMessage()]


def test_no_job_is_sent_ahead_of_the_read_model(tmp_path: Path) -> None:
    """A receiver that asks the API about what it was sent (validates the
    code in an entitlement.created) must find it: jobs wait for the read
    model's projection to reach the event that made them."""
    read_model = ReadModel(f"sqlite:///{tmp_path}/outbox.db")
    try:
        outbox = Outbox(read_model, behind="read-model-test")
        outbox.commit("p", jobs("c1", "k", 4, ordered=False, start=1), 4)
        now = datetime.now(UTC)
        assert outbox.due("c1", now, 10) == []  # the read model has nothing yet
        read_model.set_position("read-model-test", 2)
        assert [j.seq for j in outbox.due("c1", now, 10)] == [1, 2]
        read_model.set_position("read-model-test", 4)
        assert [j.seq for j in outbox.due("c1", now, 10)] == [1, 2, 3, 4]
        # Without a projection to wait for (the CLI's outbox), all are due.
        assert len(Outbox(read_model).due("c1", now, 10)) == 4
    finally:
        read_model.close()
