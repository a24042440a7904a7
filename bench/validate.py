"""Validation benchmark: POST /v1/validate under load while webhooks are being
ingested, on PostgreSQL, with a fresh broker and database.

    python bench/validate.py                       # 2,000 entitlements, 20 s, 500 webhooks/s

`entitle api` serves validation alone; ingress, domain and projector run as
their own processes and take webhooks at a fixed rate meanwhile. The load
generator is a keep-alive HTTP/1.1 client in this process (all of it shares
the machine's cores). Prints validations/s, latency p50/p99, and the webhook
rate achieved alongside. Rate limits are raised for the run: one client
address sends everything.

The validation load comes from wrk (`apt install wrk`) when it is on PATH: a C
client leaves the cores to the server; `--client python` uses the asyncio
client in this process instead, which costs about as much CPU as the server.
Each process's CPU time over the measured window is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ingest import Connection  # noqa: E402
from lifecycle import (  # noqa: E402
    CONFIG,
    folded,
    fresh_database,
    resident_mb,
    send_paced,
    start,
    stop,
    story,
)

from services.kafka import EmbeddedBroker, ensure_topics  # noqa: E402
from services.projections import READ_MODEL  # noqa: E402

ROLES = ("ingress", "domain", "projector", "api")
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


WRK_SCRIPT = """
local codes = {}
for line in io.lines("%s") do codes[#codes + 1] = line end
math.randomseed(7)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local code = codes[math.random(#codes)]
  return wrk.format(nil, "/v1/validate", nil,
    '{"activation_code":"' .. code .. '","feature":"export"}')
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


async def wrk_load(
    port: int, codes: list[str], seconds: float, concurrency: int, workdir: Path
) -> tuple[int, int, float, float, float]:
    """(requests, failures, p50 s, p99 s, duration s) measured by wrk."""
    (workdir / "codes.txt").write_text("\n".join(codes) + "\n")
    (workdir / "validate.lua").write_text(WRK_SCRIPT % (workdir / "codes.txt"))
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:.0f}s",
        "-s",
        str(workdir / "validate.lua"),
        f"http://127.0.0.1:{port}/v1/validate",
        stdout=subprocess.PIPE,
    )
    out, _ = await process.communicate()
    line = next(x for x in out.decode().splitlines() if x.startswith("WRK "))
    requests, failures, p50, p99, duration = (int(x) for x in line.split()[1:])
    return requests, failures, p50 / 1e6, p99 / 1e6, duration / 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backlog(accepted: int, database_url: str) -> tuple[int, int]:
    """(webhooks accepted by the ingress not folded yet, stored events the
    read model has not caught up with): whether the ingest kept up. Counted
    from what the ingress acknowledged, not the topic's end offsets: Tansu
    reports the end of a partition as one past the first record of its last
    produce batch."""
    done = folded(database_url)
    with psycopg.connect(database_url) as conn:
        read = conn.execute(
            "SELECT position FROM entitle_read_positions WHERE name = %s", (READ_MODEL,)
        ).fetchone()
        head = conn.execute("SELECT max(notification_id) FROM entitle_events").fetchone()
    return accepted - done, (head[0] if head else 0) - (read[0] if read else 0)


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
        "ENTITLE_ADMIN_KEYS": "bench:ek_bench_admin_key",
        "ENTITLE_CODE_SECRET": "bench-code-secret-0123456789",
    }
    await ensure_topics(broker.bootstrap, 8)
    processes = [
        start(role, workdir, env, nice=0 if role == "api" else args.ingest_nice) for role in ROLES
    ]
    ingress_port, api_port = processes[0].port, processes[3].port  # type: ignore[attr-defined]
    try:
        now = int(time.time())
        rng = random.Random(1)
        # Entitlements to validate: each subscription's first payment, in order.
        seed = [e for n in range(args.entitlements) for e in story(n, rng, now)[:3]]
        seeded = await ingest_load(ingress_port, seed, 1000, 3600)
        admin = {"Authorization": "Bearer ek_bench_admin_key"}
        items: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while len(items) < args.entitlements and time.monotonic() < deadline:
            await asyncio.sleep(1)
            items = httpx.get(
                f"http://127.0.0.1:{api_port}/v1/entitlements",
                params={"limit": args.entitlements},
                headers=admin,
                timeout=30,
            ).json()["items"]
        # Many stories start long enough ago that their first period is over.
        codes = [item["activation_code"] for item in items if item["status"] == "ACTIVE"]
        # What the load will be answered: a fast wrong answer must not pass for speed.
        answers: dict[str, int] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            for code in codes:
                body = {"activation_code": code, "feature": "export"}
                answer = client.post("/v1/validate", json=body).json()["code"]
                answers[answer] = answers.get(answer, 0) + 1
        print(
            f"entitlements:  {len(codes)} ACTIVE, their codes validated at random; answered "
            + ", ".join(f"{count} {answer}" for answer, count in sorted(answers.items()))
        )
        background = [
            e for n in range(args.entitlements, args.entitlements * 10) for e in story(n, rng, now)
        ]
        pids = {role: p.pid for role, p in zip(ROLES, processes, strict=True)}
        if broker.pid is not None:
            pids["broker"] = broker.pid
        cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        machine_before = machine_seconds()
        if args.concurrency == 0:  # the ingest alone: what it leaves of the cores
            requests, failures, p50, p99, seconds = 0, 0, 0.0, 0.0, args.seconds
            ingested = await ingest_load(ingress_port, background, args.ingest_rate, args.seconds)
        elif args.client == "wrk":
            (requests, failures, p50, p99, seconds), ingested = await asyncio.gather(
                wrk_load(api_port, codes, args.seconds, args.concurrency, workdir),
                ingest_load(ingress_port, background, args.ingest_rate, args.seconds),
            )
        else:
            (latencies, failures), ingested = await asyncio.gather(
                validate_load(api_port, codes, args.seconds, args.concurrency),
                ingest_load(ingress_port, background, args.ingest_rate, args.seconds),
            )
            latencies.sort()
            requests, seconds = len(latencies), args.seconds
            p50 = statistics.median(latencies)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
        busy, elapsed = (a - b for a, b in zip(machine_seconds(), machine_before, strict=True))
        cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
        unfolded, unprojected = backlog(seeded + ingested, database_url)
        memory = ", ".join(
            f"{role} {resident_mb(p.pid):.0f} MB" for role, p in zip(ROLES, processes, strict=True)
        )
    finally:
        for process in processes:
            stop(process)
        broker.stop()
    print(
        f"validations:   {requests / seconds:,.0f}/s over {seconds:.0f} s at concurrency "
        f"{args.concurrency}, {args.client} client" + (f" ({failures} not 200)" if failures else "")
    )
    print(f"latency:       p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    print(
        f"meanwhile:     {ingested / args.seconds:,.0f} webhooks/s accepted by the ingress; "
        f"at the end {unfolded} not yet folded, {unprojected} events not yet projected"
    )
    print(
        "cpu:           "
        + ", ".join(f"{role} {used / elapsed:.0%}" for role, used in cpu.items())
        + f"; machine {busy / elapsed:.0%} of {os.cpu_count()} cores"
    )
    print(f"resident:      {memory}")


def machine_seconds() -> tuple[float, float]:
    """(busy CPU seconds of all cores, wall seconds) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--entitlements", type=int, default=1000, help="at most 1000 (one API page)"
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--concurrency", type=int, default=32, help="0: no validations, only the ingest"
    )
    parser.add_argument("--ingest-rate", type=float, default=500)
    parser.add_argument(
        "--ingest-nice", type=int, default=0, help="run ingress, domain and projector at this nice"
    )
    parser.add_argument(
        "--client", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
