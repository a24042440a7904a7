"""The HTTP server: uvicorn's httptools protocol with the guards a public
webhook endpoint needs and uvicorn lacks.

uvicorn (0.54) has no timeout for a request's head or body (a client that
sends one byte a minute holds its connection for ever: slowloris), no limit
on the size or number of header lines with httptools, and its connection
cap still answers each request past it in plain text. `GuardedProtocol`
adds them; `HttpLimits` holds the settings (ENTITLE_HTTP_* variables, see
the README's *Limits*).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.config import Environment
from services.http import MASKED
from services.logs import LineBudget, access

#: The route named in the request line of what the server refuses before
#: the app sees it: no route was chosen, and the path is not read.
REFUSED = "(refused by the server)"


@dataclass(frozen=True)
class HttpLimits:
    #: Seconds a client has to send a request's head (request line and
    #: headers), counted from its first byte or from the connection's start.
    header_timeout: float = 10.0
    #: Seconds a client has to send a request's body once its head is in.
    body_timeout: float = 30.0
    #: Open connections at most; one more is answered 503 and closed.
    max_connections: int = 1000
    #: Header lines a request may have, and bytes its head may take.
    max_headers: int = 100
    max_header_bytes: int = 32 * 1024
    #: Request body bytes held at once by all requests being read.
    max_body_buffer: int = 64 * 1024 * 1024

    @classmethod
    def from_env(cls) -> HttpLimits:
        """The limits from ENTITLE_HTTP_HEADER_TIMEOUT, _BODY_TIMEOUT (seconds),
        _MAX_CONNECTIONS, _MAX_HEADERS, _MAX_HEADER_BYTES and _MAX_BODY_BUFFER
        (bytes); ConfigError naming the variable if one is not a positive number."""
        env = Environment.read()
        return cls(
            header_timeout=env.http_header_timeout,
            body_timeout=env.http_body_timeout,
            max_connections=env.http_max_connections,
            max_headers=env.http_max_headers,
            max_header_bytes=env.http_max_header_bytes,
            max_body_buffer=env.http_max_body_buffer,
        )


def guarded(limits: HttpLimits, budget: LineBudget | None = None) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`); what
    it refuses is logged within `budget` (the process's request lines')."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"limits": limits, "budget": budget or LineBudget(), "_sweeping": None},
    )


#: How often deadlines are looked at: a slow client is cut off at most this
#: much after its deadline.
SWEEP_SECONDS = 0.25


class GuardedProtocol(HttpToolsProtocol):
    limits = HttpLimits()
    budget = LineBudget()
    _sweeping: asyncio.TimerHandle | None = None  # per server: `guarded` makes a class each

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._due: float | None = None  # loop time by which the head or body must be in
        self._phase = "head"
        self._in_head = False
        self._head_bytes = 0  # as received, while a head is incomplete
        self._chunk = 0  # the chunk being parsed
        self._refused = False

    # -- the connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "too_many_connections",
                f"the server holds its most connections ({self.limits.max_connections}); retry",
                retry_after=True,
            )
            return
        self._start_head()
        if type(self)._sweeping is None:
            type(self)._sweeping = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._chunk = len(data)
        super().data_received(data)
        # A head begins with its first byte (on_message_begin), not when the
        # previous answer is out: the rest of a body the app did not read
        # is still that request's. A chunk that began a head counts whole.
        if self._in_head:
            self._head_bytes += len(data)
        # Checked after parsing: the chunk that ends a head may hold a body.
        if self._in_head and not self._refused and self._head_bytes > self.limits.max_header_bytes:
            self._too_large()

    # -- parser callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._in_head:
            self._start_head()  # the next request on a kept-alive connection
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        # Counted here rather than per header line: a callback each costs
        # more than the sum, and the bytes received bound what is held.
        # (A head received in fewer bytes than the limit is within it.)
        headers, limits = self.headers, self.limits
        if len(headers) > limits.max_headers or (
            self._head_bytes + self._chunk > limits.max_header_bytes
            and len(self.url) + sum(len(n) + len(v) for n, v in headers) > limits.max_header_bytes
        ):
            self._too_large()
            return
        super().on_headers_complete()
        self._due, self._phase = self.loop.time() + limits.body_timeout, "body"

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    # -- helpers ---------------------------------------------------------------

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        # A deadline is a number a sweep looks at, not a timer of its own:
        # a timer or two per request is most of what these guards would cost.
        self._due, self._phase = self.loop.time() + self.limits.header_timeout, "head"

    def _disarm(self) -> None:
        self._due = None

    def _sweep(self) -> None:
        now = self.loop.time()
        for protocol in list(self.connections):
            if not isinstance(protocol, GuardedProtocol):
                continue
            if protocol._due is not None and protocol._due <= now:
                protocol._timed_out()
        # Sweeps go on while anything is connected; the next connection
        # starts them again.
        type(self)._sweeping = (
            self.loop.call_later(SWEEP_SECONDS, self._sweep) if self.connections else None
        )

    def _timed_out(self) -> None:
        self._due = None
        seconds = self.limits.header_timeout if self._phase == "head" else self.limits.body_timeout
        detail = f"the request {self._phase} was not received within {seconds:g} s"
        if self.transport.is_closing():
            return
        cycle = self.cycle  # in the head phase, the previous request's (if any)
        if self._phase == "body" and cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()  # the app already answered; only stop waiting
                return
            cycle.disconnected = True  # the app's answer would come too late
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, "request_timeout", detail)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to what httptools cannot parse, as JSON like every error.
        self._refuse(HTTPStatus.BAD_REQUEST, "invalid_request", msg)

    def _too_large(self) -> None:
        self._refuse(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            f"a request may have at most {self.limits.max_headers} header lines "
            f"and {self.limits.max_header_bytes} bytes of head",
        )

    def _refuse(
        self, status: HTTPStatus, code: str, detail: str, retry_after: bool = False
    ) -> None:
        """Answer with the JSON error body every route uses, and close; a
        request line on `entitle.access` like the app's (the request never
        reached it), within the budget."""
        self._refused = True
        self._disarm()
        if access.isEnabledFor(logging.INFO):
            method = "-"  # maybe not received yet; a fresh parser says DELETE
            if self.budget.take((method, REFUSED, int(status))):
                access.info(
                    "%s %s %d %s",
                    method,
                    REFUSED,
                    int(status),
                    code,
                    extra={
                        "fields": {
                            "method": method,
                            "route": REFUSED,
                            "status": int(status),
                            "error": code,
                        },
                        MASKED: True,
                    },
                )

        body = json.dumps({"error": code, "detail": detail, "status": int(status)}).encode()
        head = [f"HTTP/1.1 {int(status)} {status.phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        if retry_after:
            head.append(b"retry-after: 1")
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


def tune_gc() -> None:
    """Before serving: move everything loaded so far (modules, the app, the
    configuration) out of the cyclic collector's way (`gc.freeze`), and let
    it run after 50,000 new container objects instead of 700. A request
    makes a few hundred short-lived objects, freed by reference counting;
    collecting every 700 of them walked the young heap several times a
    request, and with it the whole old heap every 70,000. Measured with
    bench/ingest.py --compare (a quarter of the ingress's busy CPU was the
    collector), memory unchanged."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
