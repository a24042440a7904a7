"""Ingest benchmark: send N signed Stripe `invoice.paid` webhooks to a running
stack at a chosen concurrency, then wait until all N are folded and visible.

    entitle dev --config examples/entitle.yaml &
    python bench/ingest.py -n 5000 -c 32 --admin-key ek_… --database-url sqlite:///.entitle/entitle.db

Prints webhooks/s acknowledged, p50/p99 acknowledgement latency, and the time
until all N are folded into the event store and projected (folded/s). Each
webhook is a new subscription, so each one creates an entitlement.
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


if __name__ == "__main__":
    asyncio.run(main())
