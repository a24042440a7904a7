"""Ingest benchmark: send N signed Stripe `invoice.paid` webhooks to a running
stack at a chosen concurrency, then wait until all N are folded and visible.

    entitle dev --config examples/entitle.yaml &
    python bench/ingest.py -n 5000 -c 32 --database-url sqlite:///.entitle/entitle.db

Prints webhooks/s acknowledged, p50/p99 acknowledgement latency, and the time
until all N are folded into the event store and projected (folded/s). Each
webhook is a new subscription, so each one creates an entitlement.

    python bench/ingest.py --compare [--rounds 3 -n 20000 -c 32]

starts its own embedded broker and, in turn, a bare handler (Starlette, the
Stripe HMAC check with `hmac`, aiokafka `send_and_wait` with linger 20 ms:
the least an ingress can do) and `entitle ingress`, each in its own process
with the same broker and client, and prints acknowledged webhooks/s of each
per round and the product/bare ratio of the medians, with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sqlite3
import statistics
import time
import uuid
from urllib.parse import urlsplit


def invoice_paid(run: str, n: int, now: int) -> bytes:
    sub = f"sub_bench_{run}_{n}"
    event = {
        "id": f"evt_bench_{run}_{n}",
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": now,
        "type": "invoice.paid",
        "data": {
            "object": {
                "id": f"in_bench_{run}_{n}",
                "object": "invoice",
                "customer": f"cus_{n}",
                "customer_email": f"buyer{n}@example.com",
                "status": "paid",
                "parent": {
                    "type": "subscription_details",
                    "subscription_details": {"subscription": sub, "metadata": {}},
                },
                "lines": {
                    "object": "list",
                    "has_more": False,
                    "data": [
                        {
                            "id": f"il_{run}_{n}",
                            "object": "line_item",
                            "amount": 9900,
                            "currency": "usd",
                            "quantity": 1,
                            "period": {"start": now, "end": now + 30 * 86400},
                            "pricing": {
                                "type": "price_details",
                                "price_details": {
                                    "price": "price_basic_monthly",
                                    "product": "prod_acme",
                                },
                            },
                            "parent": {
                                "type": "subscription_item_details",
                                "subscription_item_details": {
                                    "subscription": sub,
                                    "subscription_item": f"si_{n}",
                                    "proration": False,
                                },
                            },
                            "description": "Acme Studio basic (monthly) " + "x" * 1500,
                        }
                    ],
                },
            }
        },
    }
    return json.dumps(event).encode()


def sign(body: bytes, secret: str) -> str:
    ts = int(time.time())
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


class Connection:
    """A minimal keep-alive HTTP/1.1 client: httpx's async pool tops out near
    250 requests/s here, far below what the server does, so it would measure
    itself."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        return (await self.request(path, body, headers))[0]

    async def request(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST `body`; the answer's status and body. Raises ConnectionError
        when the server closed the connection instead of answering."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        answer = await self.reader.readexactly(length)
        return int(status_line.split()[1]), answer

    async def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def count_folded(database_url: str, run: str) -> int:
    pattern = f"sub_bench_{run}_%"
    sql = "SELECT count(*) FROM entitle_v4_entitlements WHERE order_ref LIKE "
    if urlsplit(database_url).scheme == "sqlite":
        path = urlsplit(database_url).path[1:]
        with sqlite3.connect(path, timeout=30) as conn:
            return int(conn.execute(sql + "?", (pattern,)).fetchone()[0])
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql + "%s", (pattern,)).fetchone()
        return int(row[0]) if row else 0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--source", default="stripe-main")
    parser.add_argument("--secret", default="whsec_example")
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument(
        "--database-url",
        default="sqlite:///.entitle/entitle.db",
        help="the stack's database, to see when webhooks are folded",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    run = uuid.uuid4().hex[:8]
    now = int(time.time())
    bodies = [invoice_paid(run, n, now) for n in range(args.n)]
    latencies: list[float] = []
    failures: dict[int, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    target = urlsplit(args.url)
    path = f"/webhooks/{args.source}"

    async def worker() -> None:
        connection = Connection(target.hostname or "127.0.0.1", target.port or 80)
        try:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                status = await connection.post(
                    path,
                    body,
                    {
                        "Stripe-Signature": sign(body, args.secret),
                        "Content-Type": "application/json",
                    },
                )
                latencies.append(time.perf_counter() - started)
                if status != 202:
                    failures[status] = failures.get(status, 0) + 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    acked = time.perf_counter() - started
    folded = 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        folded = await asyncio.to_thread(count_folded, args.database_url, run)
        if folded >= args.n - sum(failures.values()):
            break
        await asyncio.sleep(0.05)
    all_folded = time.perf_counter() - started

    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    body_kb = sum(map(len, bodies)) / len(bodies) / 1024
    print(f"webhooks:        {args.n} x {body_kb:.1f} KB at concurrency {args.concurrency}")
    print(
        f"acknowledged:    {args.n / acked:,.0f} webhooks/s ({acked:.2f} s)"
        + (f"  failures: {failures}" if failures else "")
    )
    print(f"ack latency:     p50 {p50:.1f} ms   p99 {p99:.1f} ms")
    print(
        f"folded:          {folded} of {args.n} in {all_folded:.2f} s after the first send "
        f"= {folded / all_folded:,.0f} webhooks/s (visible in the read model)"
    )


# -- the bare baseline, side by side ---------------------------------------------

SECRET = "whsec_bench_compare"


def bare_app(bootstrap: str) -> object:
    """The least an ingress can do: read the body, check Stripe's HMAC,
    take the routing key, wait for the broker's acknowledgment, answer 202."""
    from aiokafka import AIOKafkaProducer
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    producer: list[AIOKafkaProducer] = []

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        header = request.headers.get("stripe-signature", "")
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        mac = hmac.new(SECRET.encode(), parts.get("t", "").encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest(), parts.get("v1", "")):
            return JSONResponse({"error": "invalid_signature"}, status_code=401)
        payload = json.loads(body)
        key = payload["data"]["object"]["parent"]["subscription_details"]["subscription"]
        await producer[0].send_and_wait("entitle.webhooks.raw", body, key=key.encode())
        return JSONResponse({"status": "accepted"}, status_code=202)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def span(_: Starlette):  # type: ignore[no-untyped-def]
        started = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
        await started.start()
        producer.append(started)
        try:
            yield
        finally:
            await started.stop()

    return Starlette(routes=[Route("/webhooks/{source}", receive, methods=["POST"])], lifespan=span)


def serve_bare(port: int, bootstrap: str) -> None:
    import uvicorn

    uvicorn.run(
        bare_app(bootstrap),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop" if _has("uvloop") else "asyncio",
    )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


async def blast(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, dict[int, int]]:
    """Send every body; (acknowledged webhooks/s, failures by status)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    failures: dict[int, int] = {}

    async def worker() -> None:
        connection = Connection("127.0.0.1", port)
        try:
            while not queue.empty():
                body = queue.get_nowait()
                headers = {
                    "Stripe-Signature": sign(body, SECRET),
                    "Content-Type": "application/json",
                }
                status = await connection.post("/webhooks/stripe-main", body, headers)
                if status != 202:
                    failures[status] = failures.get(status, 0) + 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - started), failures


def compare(args: argparse.Namespace) -> None:
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from services.kafka import EmbeddedBroker, free_port

    entitle = str(Path(sys.executable).parent / "entitle")
    work = Path(tempfile.mkdtemp(prefix="entitle-ingest-"))
    (work / "entitle.yaml").write_text(
        f"sources: {{stripe-main: {{provider: stripe, secret: {SECRET}}}}}\n"
        "offerings: [{sku: basic_monthly, product: acme,"
        " stripe_price_ids: [price_basic_monthly]}]\n"
    )
    results: dict[str, list[float]] = {"bare": [], "ingress": []}
    with EmbeddedBroker() as broker:
        env = {
            **os.environ,
            "ENTITLE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "ENTITLE_KAFKA_IDEMPOTENCE": "false",
            "ENTITLE_DATABASE_URL": f"sqlite:///{work / 'entitle.db'}",
        }

        def start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
            port = free_port()
            if kind == "bare":
                command = [sys.executable, __file__, "--serve-bare", str(port), broker.bootstrap]
            else:
                command = [entitle, "ingress", "--config", "entitle.yaml", "--port", str(port)]
            process = subprocess.Popen(
                command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with __import__("socket").create_connection(("127.0.0.1", port), 0.2):
                        break
                except OSError:
                    time.sleep(0.1)
            return process, port

        now = int(time.time())
        for round_ in range(args.rounds):
            for kind in ("bare", "ingress"):
                process, port = start(kind)
                try:
                    run = f"{kind}{round_}{uuid.uuid4().hex[:6]}"
                    warm = [invoice_paid(run + "w", n, now) for n in range(2000)]
                    asyncio.run(blast(port, warm, args.concurrency))
                    bodies = [invoice_paid(run, n, now) for n in range(args.n)]
                    rate, failures = asyncio.run(blast(port, bodies, args.concurrency))
                finally:
                    process.terminate()
                    process.wait(30)
                results[kind].append(rate)
                extra = f"  failures: {failures}" if failures else ""
                print(f"round {round_ + 1} {kind:8} {rate:8,.0f} webhooks/s{extra}", flush=True)
    bare, product = (statistics.median(results[k]) for k in ("bare", "ingress"))
    load = os.getloadavg()
    print(
        f"bare     min/median/max {min(results['bare']):,.0f} / {bare:,.0f} / "
        f"{max(results['bare']):,.0f} webhooks/s"
    )
    print(
        f"ingress  min/median/max {min(results['ingress']):,.0f} / {product:,.0f} / "
        f"{max(results['ingress']):,.0f} webhooks/s"
    )
    print(f"ingress / bare (medians): {product / bare:.2f}")
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--serve-bare"]:
        serve_bare(int(sys.argv[2]), sys.argv[3])
    elif "--compare" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--compare", action="store_true")
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("-n", type=int, default=20000)
        parser.add_argument("-c", "--concurrency", type=int, default=32)
        compare(parser.parse_args())
    else:
        asyncio.run(main())
