"""A local webhook receiver for outbound tests: records every request it
gets per path, and answers what the test tells it to (per path: a status,
a Retry-After, a delay, or going down altogether)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    #: Per path: the status to answer (default 200).
    status: dict[str, int] = field(default_factory=dict)
    retry_after: dict[str, str] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def ok_at(self, path: str) -> list[Received]:
        """Requests to `path` that were answered 2xx."""
        with self.lock:
            return [r for r in self.requests if r.path == path and r.headers.get("_answer") == "ok"]


@contextmanager
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            path = self.path
            time.sleep(state.delay.get(path, 0))
            status = state.status.get(path, 200)
            headers = {k.lower(): v for k, v in self.headers.items()}
            headers["_answer"] = "ok" if 200 <= status < 300 else str(status)
            with state.lock:
                state.requests.append(Received(path, headers, body, time.monotonic()))
            # 204 and 304 carry no body (RFC 9110).
            answer = b"" if status in (204, 304) else json.dumps({"received": True}).encode()
            self.send_response(status)
            if path in state.retry_after:
                self.send_header("Retry-After", state.retry_after[path])
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, *_: Any) -> None:
            pass  # a sender that died mid-request (the SIGKILL test)

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
