"""A small local stand-in for the few Stripe API endpoints entitle calls
(`GET /v1/events`, `GET /v1/invoices/{id}/lines`), with Stripe's list
pagination, so the official SDK can be pointed at it: no network."""

from __future__ import annotations

import threading
import time
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

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/events", self.list_events),
                Route("/v1/subscriptions/{subscription}", self.subscription),
                Route("/v1/invoices/{invoice}/lines", self.invoice_lines),
            ]
        )


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
