"""Validation benchmark: POST /v1/validate under load while webhooks are being
ingested, on PostgreSQL, with a fresh broker and database.

    python bench/validate.py                       # 2,000 entitlements, 20 s, 500 webhooks/s

`entitle api` serves validation alone; ingress, domain and projector run as
their own processes and take webhooks at a fixed rate meanwhile. The load
generator is a keep-alive HTTP/1.1 client in this process (all of it shares
the machine's cores). Prints validations/s, latency p50/p99, and the webhook
rate achieved alongside. Rate limits are raised for the run: one client
address sends everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ingest import Connection  # noqa: E402
from lifecycle import (  # noqa: E402
    CONFIG,
    fresh_database,
    resident_mb,
    send_paced,
    start,
    stop,
    story,
)

from services.kafka import EmbeddedBroker, ensure_topics  # noqa: E402

LIMITS = """
licensing:
  per_code_per_second: 1000000
  per_code_burst: 1000000
  per_address_per_second: 1000000
  per_address_burst: 1000000
"""


async def validate_load(
    port: int, codes: list[str], seconds: float, concurrency: int
) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(7)

    async def worker() -> None:
        nonlocal failures
        connection = Connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            body = json.dumps({"activation_code": rng.choice(codes), "feature": "export"})
            started = time.perf_counter()
            status = await connection.post(
                "/v1/validate", body.encode(), {"Content-Type": "application/json"}
            )
            latencies.append(time.perf_counter() - started)
            failures += status != 200
        await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures


async def ingest_load(port: int, events: list[dict[str, Any]], rate: float, seconds: float) -> int:
    acked: dict[str, float] = {}
    await send_paced(port, events, rate, 8, acked, seconds)
    return len(acked)


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="entitle-bench-validate-"))
    (workdir / "entitle.yaml").write_text(CONFIG + LIMITS)
    broker = EmbeddedBroker()
    broker.start()
    database_url = fresh_database(args.postgres, "entitle_bench_validate")
    env = {
        "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ENTITLE_KAFKA_IDEMPOTENCE": "false",
        "ENTITLE_DATABASE_URL": database_url,
        "ENTITLE_ADMIN_KEYS": "bench:ek_bench",
        "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
    }
    await ensure_topics(broker.bootstrap, 8)
    processes = [start(role, workdir, env) for role in ("ingress", "domain", "projector", "api")]
    ingress_port, api_port = processes[0].port, processes[3].port  # type: ignore[attr-defined]
    try:
        now = int(time.time())
        rng = random.Random(1)
        # Entitlements to validate: each subscription's first payment, in order.
        seed = [e for n in range(args.entitlements) for e in story(n, rng, now)[:3]]
        await ingest_load(ingress_port, seed, 1000, 3600)
        admin = {"Authorization": "Bearer ek_bench"}
        codes: list[str] = []
        deadline = time.monotonic() + 120
        while len(codes) < args.entitlements and time.monotonic() < deadline:
            await asyncio.sleep(1)
            items = httpx.get(
                f"http://127.0.0.1:{api_port}/v1/entitlements",
                params={"limit": 1000, "status": "ACTIVE"},
                headers=admin,
                timeout=30,
            ).json()["items"]
            codes = [item["activation_code"] for item in items]
        print(f"entitlements:  {len(codes)} ACTIVE, their codes validated at random")
        background = [
            e for n in range(args.entitlements, args.entitlements * 10) for e in story(n, rng, now)
        ]
        (latencies, failures), ingested = await asyncio.gather(
            validate_load(api_port, codes, args.seconds, args.concurrency),
            ingest_load(ingress_port, background, args.ingest_rate, args.seconds),
        )
        memory = ", ".join(
            f"{role} {resident_mb(p.pid):.0f} MB"
            for role, p in zip(("ingress", "domain", "projector", "api"), processes, strict=True)
        )
    finally:
        for process in processes:
            stop(process)
        broker.stop()
    latencies.sort()
    print(
        f"validations:   {len(latencies) / args.seconds:,.0f}/s over {args.seconds:.0f} s at "
        f"concurrency {args.concurrency}" + (f" ({failures} not 200)" if failures else "")
    )
    print(
        f"latency:       p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms"
    )
    print(f"meanwhile:     {ingested / args.seconds:,.0f} webhooks/s accepted by the ingress")
    print(f"resident:      {memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--entitlements", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ingest-rate", type=float, default=500)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
