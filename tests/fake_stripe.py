"""A small local stand-in for the few Stripe API endpoints entitle calls
(`GET /v1/events`, `GET /v1/invoices/{id}/lines`, `GET` and `POST
/v1/subscriptions/{id}`), with Stripe's list pagination, so the official
SDK can be pointed at it: no network."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.kafka import free_port


class FakeStripe:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.api_keys: set[str] = set()
        #: When set, other keys get Stripe's 401.
        self.valid_keys: set[str] | None = None
        #: Keys that may read, not write: a POST with one gets Stripe's 403.
        self.read_only_keys: set[str] = set()
        #: Every accepted POST /v1/subscriptions/{id}: (id, the form's metadata).
        self.writes: list[tuple[str, dict[str, str]]] = []
        #: Answers the next POSTs give instead, first first: (status, Retry-After).
        self.write_failures: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()

    def fail_writes(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """The next `times` subscription updates answer `status` (500, 429...)."""
        with self._lock:
            self.write_failures += [(status, retry_after)] * times

    def codes_written(self, subscription: str) -> list[list[str]]:
        """Each `activation_codes` written to `subscription`, as lists of codes."""
        with self._lock:
            return [
                [c for c in metadata.get("activation_codes", "").split(",") if c]
                for sub, metadata in self.writes
                if sub == subscription
            ]

    def _page(self, request: Request, items: list[dict[str, Any]], url: str) -> JSONResponse:
        limit = int(request.query_params.get("limit", "10"))
        after = request.query_params.get("starting_after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        return JSONResponse(
            {"object": "list", "url": url, "has_more": len(items) > limit, "data": items[:limit]}
        )

    async def list_events(self, request: Request) -> JSONResponse:
        self.requests.append(str(request.url))
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.api_keys.add(f"Bearer {key}")
        if self.valid_keys is not None and key not in self.valid_keys:
            return JSONResponse(
                {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}},
                status_code=401,
            )
        since = int(request.query_params.get("created[gte]", "0"))
        newest_first = sorted(
            (e for e in self.events if e["created"] >= since),
            key=lambda e: (e["created"], e["id"]),
            reverse=True,
        )
        return self._page(request, newest_first, "/v1/events")

    async def invoice_lines(self, request: Request) -> JSONResponse:
        self.requests.append(str(request.url))
        invoice = request.path_params["invoice"]
        if invoice not in self.lines:
            return JSONResponse(
                {"error": {"type": "invalid_request_error", "message": "No such invoice"}},
                status_code=404,
            )
        return self._page(request, self.lines[invoice], f"/v1/invoices/{invoice}/lines")

    async def subscription(self, request: Request) -> JSONResponse:
        self.requests.append(str(request.url))
        found = self.subscriptions.get(request.path_params["subscription"])
        if found is None:
            return JSONResponse(
                {"error": {"type": "invalid_request_error", "message": "No such subscription"}},
                status_code=404,
            )
        return JSONResponse(found)

    async def update_subscription(self, request: Request) -> JSONResponse:
        """Stripe's subscription update, for its `metadata[...]` fields only
        (form-encoded; an empty value deletes the key)."""
        self.requests.append(f"POST {request.url}")
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.api_keys.add(f"Bearer {key}")
        if self.valid_keys is not None and key not in self.valid_keys:
            return _error(401, "authentication_error", f"Invalid API Key provided: {key[:8]}***")
        if key in self.read_only_keys:
            return _error(
                403,
                "invalid_request_error",
                f"The provided key '{key[:8]}***' does not have the required permissions",
            )
        with self._lock:
            failure = self.write_failures.pop(0) if self.write_failures else None
        if failure is not None:
            status, retry_after = failure
            answer = _error(status, "api_error", "An unknown error occurred")
            if retry_after is not None:
                answer.headers["Retry-After"] = retry_after
            return answer
        subscription = request.path_params["subscription"]
        found = self.subscriptions.get(subscription)
        if found is None:
            return _error(404, "invalid_request_error", f"No such subscription: '{subscription}'")
        form = urllib.parse.parse_qsl((await request.body()).decode(), keep_blank_values=True)
        metadata = {
            name.removeprefix("metadata[").removesuffix("]"): value
            for name, value in form
            if name.startswith("metadata[")
        }
        with self._lock:
            self.writes.append((subscription, metadata))
            kept = {**found.get("metadata", {}), **metadata}
            found["metadata"] = {k: v for k, v in kept.items() if v != ""}
        return JSONResponse(found)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/events", self.list_events),
                Route("/v1/subscriptions/{subscription}", self.subscription, methods=["GET"]),
                Route(
                    "/v1/subscriptions/{subscription}",
                    self.update_subscription,
                    methods=["POST"],
                ),
                Route("/v1/invoices/{invoice}/lines", self.invoice_lines),
            ]
        )


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


@contextmanager
def fake_stripe() -> Iterator[tuple[FakeStripe, str]]:
    """A running FakeStripe and its base URL."""
    fake = FakeStripe()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake Stripe did not start")
        time.sleep(0.02)
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
