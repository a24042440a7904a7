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
