"""Outbound webhooks benchmark.

    python bench/outbound.py                 # both phases, default sizes
    python bench/outbound.py --jobs 20000 --rate 200 --seconds 20

1. dispatch: a backlog of signed webhook jobs (--jobs, 5 events for each of
   --jobs/5 entitlements, ordered per entitlement) in the outbox on SQLite,
   sent by the real dispatcher and sender to one local receiver (a separate
   process answering 204). Prints deliveries/s, beside a bare baseline in the
   same run: aiohttp posting the same signed bodies at the same concurrency
   with no database. Then again with a second endpoint whose every answer
   is 500 (on the default retry schedule), to show the healthy one's rate.
2. latency: the production shape on PostgreSQL (`entitle serve ingress
   domain api` and `entitle projector`) with one endpoint; paid invoices for new
   subscriptions are posted at --rate per second for --seconds, and each
   delivered message's latency is its arrival at the receiver minus the
   event's `recorded_at` (the fold's commit). Then again with a second,
   always-failing endpoint. Each run also prints the CPU time the projector
   process used while the events were posted and delivered (what the
   failing endpoint costs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from lifecycle import fresh_database, start  # noqa: E402

from services.kafka import EmbeddedBroker, free_port  # noqa: E402
from services.outbound.outbox import Dispatcher, Job, Outbox  # noqa: E402
from services.outbound.webhooks import (  # noqa: E402
    EndpointInfo,
    Endpoints,
    WebhookSender,
    message_body,
    sign,
)
from services.readmodel import ReadModel  # noqa: E402
from tests import stripe_events as se  # noqa: E402

ENTITLE = str(Path(sys.executable).parent / "entitle")
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONCURRENCY = 64

RECEIVER = """
import json, sys, time
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

seen = {}

async def hook(request):
    body = await request.body()
    path = request.path_params["path"]
    if path.startswith("fail"):
        return Response(status_code=500)
    arrived = time.time()
    recorded = json.loads(body).get("data", {}).get("recorded_at")
    seen.setdefault(path, []).append((arrived, recorded))
    return Response(status_code=204)

async def stats(request):
    return JSONResponse(seen.get(request.path_params["path"], []))

async def reset(request):
    seen.clear()
    return Response(status_code=204)

app = Starlette(routes=[
    Route("/hook/{path}", hook, methods=["POST"]),
    Route("/stats/{path}", stats, methods=["GET"]),
    Route("/reset", reset, methods=["POST"]),
])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/reset", timeout=1)
                break
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait()


def endpoint(url: str) -> EndpointInfo:
    return EndpointInfo(uuid4(), url, [], "bench", False, True, secret=SECRET)


def backlog(target: EndpointInfo, count: int) -> list[Job]:
    now = datetime.now(UTC).isoformat()
    jobs = []
    for n in range(count):
        entitlement = f"ent-{n // 5}"
        payload = {
            "type": "entitlement.renewed",
            "timestamp": now,
            "data": {"n": n, "pad": "x" * 900},
        }
        jobs.append(
            Job.of(
                str(target.id),
                "webhook",
                f"msg-{n}",
                "entitlement.renewed",
                entitlement,
                n,
                payload,
            )
        )
    # Interleave entitlements as a real log does: event k of every one, then k+1.
    jobs.sort(key=lambda job: (job.seq % 5, job.seq))
    return [
        Job(j.id, j.channel, j.kind, j.message_id, j.type, j.ordering_key, True, i, j.payload)
        for i, j in enumerate(jobs)
    ]


async def bare(jobs: list[Job], target: EndpointInfo) -> float:
    """aiohttp alone: sign and post every job, CONCURRENCY in flight."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:

        async def one(job: Job) -> None:
            async with semaphore:
                body = message_body(job, target, None)
                ts = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": job.message_id,
                    "webhook-timestamp": str(ts),
                    "webhook-signature": sign([SECRET], job.message_id, ts, body),
                }
                async with session.post(target.url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 204

        started = time.perf_counter()
        await asyncio.gather(*(one(job) for job in jobs))
        return len(jobs) / (time.perf_counter() - started)


async def dispatched(jobs: list[Job], targets: list[EndpointInfo], watch: EndpointInfo) -> float:
    """The real dispatcher and sender: deliveries/s to `watch`."""
    with tempfile.TemporaryDirectory() as tmp:
        read_model = ReadModel(f"sqlite:///{tmp}/bench.db")
        outbox = Outbox(read_model)
        for start in range(0, len(jobs), 2000):
            outbox.commit("bench", jobs[start : start + 2000], start)
        sender = WebhookSender(Endpoints(outbox, targets), "server-secret", None, True, True)
        dispatcher = Dispatcher(outbox, [sender], concurrency=CONCURRENCY)
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(dispatcher.run(stop))
        wanted = sum(1 for job in jobs if job.channel == str(watch.id))
        while True:
            await asyncio.sleep(0.2)
            counts = await asyncio.to_thread(outbox.counts, str(watch.id))
            if counts.get("succeeded", 0) >= wanted:
                break
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        await sender.aclose()
        read_model.close()
        return wanted / elapsed


def phase_dispatch(count: int) -> None:
    print(f"\n1. dispatch: {count} queued webhooks, one local endpoint, {CONCURRENCY} in flight")
    with receiver() as url:
        healthy = endpoint(f"{url}/hook/ok")
        failing = endpoint(f"{url}/hook/fail")
        jobs = backlog(healthy, count)
        rounds = []
        for _ in range(2):
            base = asyncio.run(bare(jobs, healthy))
            alone = asyncio.run(dispatched(jobs, [healthy], healthy))
            both_jobs = jobs + [
                Job(
                    j.id + "f",
                    str(failing.id),
                    j.kind,
                    j.message_id,
                    j.type,
                    j.ordering_key,
                    True,
                    j.seq,
                    j.payload,
                )
                for j in jobs
            ]
            both = asyncio.run(dispatched(both_jobs, [healthy, failing], healthy))
            rounds.append((base, alone, both))
        for base, alone, both in rounds:
            print(
                f"   bare aiohttp {base:7.0f}/s | entitle {alone:7.0f}/s ({alone / base:.2f}x)"
                f" | beside a failing endpoint {both:7.0f}/s ({both / alone:.2f}x alone)"
            )


CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - sku: better_annual
    product: acme-studio
    period: P1Y
    stripe_price_ids: [price_annual]
outbound:
  allow_http: true
  allow_private_networks: true
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def post_at(rate: float, seconds: float, base: str, tag: str) -> int:
    """Paid invoices for new subscriptions at `rate` per second."""
    now = int(time.time())
    total = int(rate * seconds)
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> None:
            event = se.invoice_paid(
                subscription=f"sub_{tag}_{n}",
                lines=[{"price": "price_annual", "start": now, "end": now + 365 * 86400}],
            )
            body = se.body(event)
            async with session.post(
                f"{base}/webhooks/stripe-main", data=body, headers=se.signed_headers(body)
            ) as response:
                assert response.status == 202, await response.text()

        started = time.perf_counter()
        pending = []
        for n in range(total):
            pending.append(asyncio.create_task(one(n)))
            delay = started + (n + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*pending)
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_run(
    url: str, rate: float, seconds: float, fail_too: bool, postgres: str
) -> tuple[float, float, int, float]:
    """The production shape on PostgreSQL: ingress, domain and API in one
    process, the projector (projections and dispatcher) in another."""
    workdir = Path(tempfile.mkdtemp(prefix="entitle-bench-outbound-"))
    (workdir / "entitle.yaml").write_text(CONFIG)
    broker = EmbeddedBroker()
    broker.start()
    env = {
        "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ENTITLE_KAFKA_IDEMPOTENCE": "false",
        "ENTITLE_DATABASE_URL": fresh_database(postgres, "entitle_bench_outbound"),
        "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
        "ENTITLE_ADMIN_KEYS": "bench:ek_bench_admin_key",
    }
    processes = []
    try:
        front = start(["serve", "ingress", "domain", "api"], workdir, env)
        base = f"http://127.0.0.1:{front.port}"  # type: ignore[attr-defined]
        processes.append(front)
        projector = start("projector", workdir, env)
        processes.append(projector)
        auth = {"Authorization": "Bearer ek_bench_admin_key"}
        tag = uuid4().hex[:8]
        path = f"ok-{tag}"
        endpoints = [(f"{url}/hook/{path}", ["entitlement.*"])]
        if fail_too:
            endpoints.append((f"{url}/hook/fail-{tag}", []))
        for target, events in endpoints:
            body = {"url": target, "events": events}
            httpx.post(f"{base}/v1/webhook-endpoints", json=body, headers=auth).raise_for_status()
        time.sleep(1)  # the projector has seen the endpoints
        cpu_before = cpu_seconds(projector.pid)
        sent = asyncio.run(post_at(rate, seconds, base, tag))
        expected = 2 * sent  # created and activated for each
        deadline = time.monotonic() + 60
        seen: list[Any] = []
        while time.monotonic() < deadline:
            seen = httpx.get(f"{url}/stats/{path}").json()
            if len(seen) >= expected:
                break
            time.sleep(0.2)
        cpu = cpu_seconds(projector.pid) - cpu_before
        latencies = [
            (arrived - datetime.fromisoformat(recorded).timestamp()) * 1000
            for arrived, recorded in seen
            if recorded
        ]
        return percentile(latencies, 50), percentile(latencies, 99), len(seen), cpu
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()


def phase_latency(rate: float, seconds: float, postgres: str) -> None:
    print(
        f"\n2. latency: ingress+domain+api and projector processes on PostgreSQL,"
        f" paid invoices at {rate:g}/s for {seconds:g} s ({2 * rate:g} entitlement events/s)"
    )
    with receiver() as url:
        for fail_too in (False, True, False, True):
            p50, p99, count, cpu = latency_run(url, rate, seconds, fail_too, postgres)
            what = "beside an always-failing endpoint" if fail_too else "one endpoint alone"
            print(
                f"   {what:33}: {count} delivered, committed -> delivered"
                f" p50 {p50:5.0f} ms, p99 {p99:5.0f} ms; projector CPU {cpu:4.1f} s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--phase", choices=["dispatch", "latency", "both"], default="both")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    if args.phase in ("dispatch", "both"):
        phase_dispatch(args.jobs)
    if args.phase in ("latency", "both"):
        phase_latency(args.rate, args.seconds, args.postgres)


if __name__ == "__main__":
    main()
