"""`entitle dev` with JSON logs: every line one JSON object, one line per
request with its route and request id, webhook receipts with their ids,
and never a secret or a whole code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, AUTH, CONFIG, YEAR, entitlements, post

pytestmark = pytest.mark.e2e


def test_json_logs_name_each_request_and_webhook_and_hide_secrets(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    env = {"ENTITLE_ADMIN_KEYS": ADMIN, "ENTITLE_LOG_FORMAT": "json"}
    with Entitle(["dev"], tmp_path, env) as stack:
        now = int(time.time())
        paid = se.invoice_paid(
            subscription="sub_logs",
            shape=se.BASIL,
            lines=[{"price": "price_basic", "start": now, "end": now + YEAR}],
        )
        accepted = post(stack, paid)
        assert accepted.status_code == 202
        receipt = accepted.json()["receipt_id"]
        [item] = eventually(lambda: entitlements(stack, order_ref="sub_logs"), timeout=10)
        code = item["activation_code"]
        mine = httpx.get(
            f"{stack.url}/v1/entitlements/{item['id']}",
            headers={**AUTH, "X-Request-Id": "ticket-4711"},
        )
        assert mine.headers["x-request-id"] == "ticket-4711"
        generated = httpx.get(f"{stack.url}/v1/portal", params={"activation_code": code})
        assert len(generated.headers["x-request-id"]) == 32
        # A request id that could forge a log line is replaced, not echoed.
        odd = httpx.get(f"{stack.url}/healthz", headers={"X-Request-Id": 'x" id=forged'})
        assert odd.headers["x-request-id"] != 'x" id=forged'
        eventually(lambda: generated.headers["x-request-id"] in stack.text, timeout=5)

    records: list[dict[str, Any]] = []
    for line in stack.output:
        if line.startswith("{"):
            records.append(json.loads(line))  # every log line is one JSON object
        else:  # what `entitle dev` prints for a person: its banner
            assert line.startswith(("entitle dev", "  ")), line
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    requests = {r["request_id"]: r for r in records if r["logger"] == "entitle.access"}
    one = requests["ticket-4711"]
    assert (one["method"], one["route"], one["status"]) == ("GET", "/v1/entitlements/{id}", 200)
    assert one["duration_ms"] >= 0
    portal = requests[generated.headers["x-request-id"]]
    assert (portal["route"], portal["status"]) == ("/v1/portal", 200)
    [stored] = [r for r in records if r.get("receipt_id") == receipt]
    assert (stored["source"], stored["provider_event_id"]) == ("stripe-main", paid["id"])
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's too
    text = "\n".join(stack.output)
    assert code not in text and code.replace("-", "") not in text
    assert se.SECRET not in text and "ek_test_admin_key" not in text


def test_text_access_lines_keep_our_request_id_and_mask_what_a_client_chose() -> None:
    """A request id `entitle` made is 32 hex digits, which an activation
    code's pattern matches: the line must still show it whole, or it cannot
    be found from the answer's header. A client's id and what a handler
    noted (a provider's event id) are masked like any path."""
    import asyncio
    import logging

    from services.http import MaskCodes
    from services.logs import NOTED, RequestLog

    code = "7K3QD-ABCDE-FGHJK-MNPQR-STVWX"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope[NOTED] = {"provider_event_id": f"evt_{code}"}
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(MaskCodes())
    access = logging.getLogger("entitle.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    transport = httpx.ASGITransport(RequestLog(app, lambda scope: "/webhooks/{source}"))

    async def post(headers: dict[str, str]) -> httpx.Headers:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return (await http.post("/webhooks/x", headers=headers)).headers

    try:
        ours = asyncio.run(post({}))["x-request-id"]
        theirs = asyncio.run(post({"X-Request-Id": code}))
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert len(ours) == 32
    assert f"id={ours} " in lines[0], lines
    assert theirs["x-request-id"] == code  # echoed to the client that sent it
    assert "id=7K3QD… " in lines[1], lines
    for line in lines:
        assert "ABCDE" not in line and "evt_7K3QD…" in line, line


def test_request_lines_beyond_the_budget_are_counted_in_one_line_a_second() -> None:
    """ENTITLE_ACCESS_LINES: past the budget a second, requests are not
    lost from the log: one line after that second counts them by method,
    route and status; a 5xx still gets a line of its own."""
    import asyncio
    import logging

    from services.logs import JsonLines, RequestLog

    statuses = iter([202] * 9 + [503, 401, 401])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": next(statuses), "headers": []})
        await send({"type": "http.response.body", "body": b""})

    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(JsonLines().format(record)))

    handler = Collect()
    access = logging.getLogger("entitle.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    # 50 ms before a second ends: its summary comes 50 ms later.
    logged = RequestLog(app, lambda scope: "/webhooks/{source}", 3, clock=lambda: 100.95)
    transport = httpx.ASGITransport(logged)

    async def run() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            for _ in range(12):
                await http.post("/webhooks/x")
            assert len(records) == 4  # three, and the 503
            await asyncio.sleep(0.3)

    try:
        asyncio.run(run())
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert [r.get("status") for r in records[:4]] == [202, 202, 202, 503]
    summary = records[4]
    assert summary["not_logged"] == 8
    assert summary["requests"] == [
        {"method": "POST", "route": "/webhooks/{source}", "status": 202, "count": 6},
        {"method": "POST", "route": "/webhooks/{source}", "status": 401, "count": 2},
    ]
    assert "8 more requests" in summary["message"]
    assert "6 POST /webhooks/{source} 202, 2 POST" in summary["message"]
    assert len(records) == 5
