"""HTTP server benchmark: what the guards of `services/server.py` (head and
body timeouts, header limits, connection cap) cost against uvicorn's own
httptools protocol, on the same tiny ASGI app, in the same run.

    python bench/server.py                 # 3 rounds of 5 s each, alternating
    python bench/server.py --rounds 5 --seconds 10 --connections 64

Each variant runs in its own process; a client keeps `--connections`
keep-alive connections busy with small POSTs (a 300-byte JSON body, like a
validation request). Prints, per round, requests/s and the server's CPU time
per request (process time: steadier than requests/s on a shared machine),
then the guarded/bare ratios of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WARMUP = 2000
_served = 0
_started = 0.0


async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    global _served, _started
    if scope["type"] != "http":
        return
    _served += 1
    if _served == WARMUP:
        _started = time.process_time()
    if scope["path"] == "/cpu":
        per = (time.process_time() - _started) / max(1, _served - WARMUP)
        body = f"{per * 1e6:.3f}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]
        return
    while True:
        message = await receive()  # type: ignore[operator]
        if not message.get("more_body"):
            break
    await send(  # type: ignore[operator]
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]


def serve(port: int, guarded: bool) -> None:
    import uvicorn

    from services.server import HttpLimits
    from services.server import guarded as guard

    http = guard(HttpLimits()) if guarded else "httptools"
    uvicorn.run(app, port=port, http=http, log_level="warning", access_log=False, lifespan="off")


async def load(port: int, connections: int, seconds: float) -> float:
    body = b'{"activation_code": "' + b"A" * 260 + b'"}'
    request = (
        b"POST /v1/validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    done = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            done += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.monotonic() - started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(guarded: bool, connections: int, seconds: float) -> tuple[float, float]:
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port, guarded), daemon=True)
    server.start()
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        rate = asyncio.run(load(port, connections, seconds))
        with socket.create_connection(("127.0.0.1", port)) as ask:
            ask.sendall(b"GET /cpu HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := ask.recv(4096):
                answer += chunk
        return rate, float(answer.split(b"\r\n\r\n")[1])
    finally:
        server.terminate()
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"bare": [], "guarded": []}
    cpu: dict[str, list[float]] = {"bare": [], "guarded": []}
    for n in range(args.rounds):
        # Alternate which goes first: the machine drifts.
        order = ["bare", "guarded"] if n % 2 == 0 else ["guarded", "bare"]
        for name in order:
            rate, micros = measure(name == "guarded", args.connections, args.seconds)
            rates[name].append(rate)
            cpu[name].append(micros)
            print(f"round {n + 1} {name:8} {rate:9,.0f} requests/s  {micros:6.1f} µs CPU/request")
    bare, guarded = (statistics.median(rates[k]) for k in ("bare", "guarded"))
    bare_cpu, guarded_cpu = (statistics.median(cpu[k]) for k in ("bare", "guarded"))
    print(
        f"median: bare {bare:,.0f}/s {bare_cpu:.1f} µs, guarded {guarded:,.0f}/s "
        f"{guarded_cpu:.1f} µs; guarded/bare: rate {guarded / bare:.2f}, "
        f"CPU per request {guarded_cpu / bare_cpu:.2f}"
    )


if __name__ == "__main__":
    main()
