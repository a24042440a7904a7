"""The Standard Webhooks sender against a local receiver: signatures the
official package accepts, what each answer means, and where it refuses to
send."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from standardwebhooks import Webhook

from services.codes import CodeBook
from services.outbound.outbox import Job, Outcome
from services.outbound.webhooks import (
    EndpointInfo,
    WebhookSender,
    _retry_after,
    endpoint_secret,
    message_body,
    sign,
    url_problem,
)
from tests.receiver import receiver

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
CODES = CodeBook("test-code-secret-0123456789")


class Book:
    """The sender's view of endpoints (the real one reads the database)."""

    def __init__(self, *endpoints: EndpointInfo) -> None:
        self.all = {e.id: e for e in endpoints}

    async def get(self, endpoint_id: UUID) -> EndpointInfo | None:
        return self.all.get(endpoint_id)


def endpoint(url: str, **more: Any) -> EndpointInfo:
    return EndpointInfo(uuid4(), url, [], None, more.pop("include_codes", False), True, **more)


def job(target: EndpointInfo, entitlement: UUID | None = None) -> Job:
    entitlement = entitlement or uuid4()
    payload = {
        "type": "entitlement.created",
        "timestamp": "2026-11-30T10:00:00+00:00",
        "data": {"entitlement_id": str(entitlement), "sequence": 1},
        "code_indexes": {str(entitlement): [0, 1]},
    }
    return Job.of(str(target.id), "webhook", "msg_1", "entitlement.created", "k", 1, payload)


def send(sender: WebhookSender, the_job: Job) -> Outcome:
    async def go() -> Outcome:
        try:
            return await sender.send(the_job)
        finally:
            await sender.aclose()

    return asyncio.run(go())


def sender_for(*targets: EndpointInfo, private: bool = True) -> WebhookSender:
    return WebhookSender(Book(*targets), "server-secret", CODES, True, private)  # type: ignore[arg-type]


def test_our_signature_is_the_official_packages() -> None:
    at = datetime(2026, 11, 30, tzinfo=UTC)
    body = b'{"type":"ping"}'
    ours = sign([SECRET], "msg_1", int(at.timestamp()), body)
    assert ours == Webhook(SECRET).sign("msg_1", at, body.decode())
    derived = endpoint_secret("server-secret", uuid4(), 1)
    assert derived.startswith("whsec_") and len(base64.b64decode(derived[6:])) == 32


def test_a_delivery_verifies_and_codes_go_only_where_asked() -> None:
    with receiver() as local:
        plain = endpoint(local.url + "/plain", secret=SECRET)
        coded = endpoint(local.url + "/coded", secret=SECRET, include_codes=True)
        entitlement = uuid4()
        assert send(sender_for(plain), job(plain, entitlement)).ok
        assert send(sender_for(coded), job(coded, entitlement)).ok
        [p] = local.at("/plain")
        [c] = local.at("/coded")
        headers = {k: v for k, v in c.headers.items() if k.startswith("webhook-")}
        message = Webhook(SECRET).verify(c.body, headers)
        assert message["data"]["activation_codes"] == [
            CODES.code(entitlement, 0),
            CODES.code(entitlement, 1),
        ]
        assert "activation_codes" not in p.json["data"]
        assert p.headers["webhook-id"] == "msg_1"


@pytest.mark.parametrize(
    ("status", "expect"),
    [
        (302, {"ok": False, "disable": False, "error": "redirects are not followed"}),
        (410, {"ok": False, "disable": True}),
        (500, {"ok": False, "disable": False, "error": "answered 500"}),
        (204, {"ok": True}),
    ],
)
def test_what_each_answer_means(status: int, expect: dict[str, Any]) -> None:
    with receiver() as local:
        local.status["/x"] = status
        target = endpoint(local.url + "/x", secret=SECRET)
        outcome = send(sender_for(target), job(target))
        assert outcome.ok is expect["ok"] and outcome.status_code == status
        assert outcome.disable is expect.get("disable", False)
        assert expect.get("error", "") in (outcome.error or "")
        assert len(local.at("/x")) == 1  # a redirect is not followed


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    with receiver() as local:
        local.status["/busy"] = 429
        local.retry_after["/busy"] = "7"
        target = endpoint(local.url + "/busy", secret=SECRET)
        assert send(sender_for(target), job(target)).retry_after == 7
    later = (datetime.now(UTC) + timedelta(seconds=120)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 100 < (_retry_after(later) or 0) <= 120
    assert _retry_after("soon") is None


def test_a_private_address_is_refused_when_sending_not_only_when_created() -> None:
    with receiver() as local:
        target = endpoint(local.url + "/inside", secret=SECRET)
        outcome = send(sender_for(target, private=False), job(target))
        assert not outcome.ok and "non-public" in (outcome.error or "")
        assert local.at("/inside") == []
        gone = send(sender_for(), job(target))
        assert gone.permanent and "no longer exists" in (gone.error or "")


@pytest.mark.parametrize(
    ("url", "allow_http", "problem"),
    [
        ("https://hooks.example.com/x", False, None),
        ("http://hooks.example.com/x", False, "must be https"),
        ("http://hooks.example.com/x", True, "loopback"),
        ("http://127.0.0.1:9/x", True, None),
        ("http://localhost:9/x", True, None),
        ("https://u:p@hooks.example.com/x", False, "credentials"),
        ("https://hooks.example.com/x#frag", False, "fragment"),
        ("https://hooks.example.com:99999/x", False, "not valid"),
        ("/relative", False, "absolute"),
    ],
)
def test_url_rules(url: str, allow_http: bool, problem: str | None) -> None:
    found = url_problem(url, allow_http)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_message_body_for_an_order_maps_codes_per_entitlement() -> None:
    target = endpoint("https://x.example/h", secret=SECRET, include_codes=True)
    a, b = uuid4(), uuid4()
    order = Job.of(
        str(target.id),
        "webhook",
        "m",
        "order.created",
        "o",
        1,
        {
            "type": "order.created",
            "timestamp": "2026-11-30T10:00:00+00:00",
            "data": {"entitlement_ids": [str(a), str(b)]},
            "code_indexes": {str(a): [0], str(b): [0]},
        },
    )
    body = json.loads(message_body(order, target, CODES))
    assert body["data"]["activation_codes"] == {
        str(a): [CODES.code(a, 0)],
        str(b): [CODES.code(b, 0)],
    }
