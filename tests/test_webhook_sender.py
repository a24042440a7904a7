"""The Standard Webhooks sender against a local receiver: signatures the
official package accepts, what each answer means, and where it refuses to
send."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from standardwebhooks import Webhook

from services.codes import CodeBook
from services.outbound.outbox import Job, Outcome
from services.outbound.rules import public, url_problem
from services.outbound.webhooks import (
    EndpointInfo,
    Resolver,
    WebhookSender,
    _retry_after,
    endpoint_secret,
    message_body,
    sign,
)
from tests.receiver import receiver

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
CODES = CodeBook("test-code-secret-0123456789")


class Book:
    """The sender's view of endpoints (the real one reads the database)."""

    def __init__(self, *endpoints: EndpointInfo) -> None:
        self.all = {e.id: e for e in endpoints}

    async def get(self, endpoint_id: UUID, seq: int = 0) -> EndpointInfo | None:
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
        # An endpoint the sender does not know (yet) is retried, not given up;
        # a deleted one is given up.
        unknown = send(sender_for(), job(target))
        assert not unknown.permanent and "not known yet" in (unknown.error or "")
        deleted = endpoint(local.url + "/inside", secret=SECRET, deleted=True)
        gone = send(sender_for(deleted), job(deleted))
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
        ("https://hooks.example.com/a?b=c", False, None),
        ("https://bücher.example/x", False, None),
        ("https://[2001:4860:4860::8888]/x", False, None),
        # What a sender would change, or could not send to, is refused.
        ("http://127.0.0.1:19101/x\r\nX-Injected: 1", True, "control"),
        ("https://hooks.example.com/a b", False, "whitespace"),
        ("https://hooks.example.com/x\t", False, "whitespace"),
        ("https://hooks.example.com/x\x00", False, "control"),
        ("https://" + "a" * 300 + ".example/x", False, "labels of 1 to 63"),
        ("https://" + "a." * 130 + "example/x", False, "253 in all"),
        ("https://a..example/x", False, "labels of 1 to 63"),
        ("https://ex\u202eample.com/x", False, "formatting"),
        ("https://ex\u200bample.com/x", False, "formatting"),
        ("https://" + "ü" * 70 + ".example/x", False, "IDNA"),
        ("https://hooks.example.com/x#", False, "fragment"),
        ("https://@hooks.example.com/x", False, "credentials"),
        ("https://ho$t.example/x", False, "letters, digits"),
        ("https://%65xample.com/x", False, "percent"),
        ("https://[fe80::1%25eth0]/x", False, "zone"),
        ("https://0x7f.1/x", False, "IPv4"),
        ("https://2130706433/x", False, "IPv4"),
        ("https://hooks.example.com/" + "x" * 2000, False, "longer than"),
    ],
)
def test_url_rules(url: str, allow_http: bool, problem: str | None) -> None:
    found = url_problem(url, allow_http)
    assert (found is None) if problem is None else (problem in (found or ""))


@pytest.mark.parametrize(
    ("address", "is_public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        # NAT64, 6to4 and Teredo carry an IPv4 address that is the one reached.
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a00:1", False),
        ("64:ff9b::808:808", True),
        ("64:ff9b:1::808:808", False),  # NAT64 for local use: wherever the site says
        ("2002:7f00:1::", False),
        ("2002:a00:1::1", False),
        ("2002:808:808::1", True),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo to 127.0.0.1
        ("2001:0:808:808:8000:63bf:f7f7:f7f7", False),  # Teredo, public both ends
        ("::7f00:1", False),  # IPv4-compatible (deprecated)
        ("::ffff:0:7f00:1", False),  # IPv4-translated (SIIT)
        ("fe80::1%eth0", False),
    ],
)
def test_addresses_that_carry_a_private_ipv4_address_are_not_public(
    address: str, is_public: bool
) -> None:
    assert public(address) is is_public


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::ffff:0:7f00:1]"])
def test_ipv6_literals_that_reach_loopback_are_refused_at_creation_and_at_send(host: str) -> None:
    problem = asyncio.run(Resolver(allow_private=False).problem(host))
    assert problem is not None and "non-public" in problem
    target = endpoint(f"https://{host}:9/x", secret=SECRET)
    outcome = send(sender_for(target, private=False), job(target))
    assert not outcome.ok and "non-public" in (outcome.error or "")


def test_a_url_a_sender_would_refuse_is_refused_when_sending_too() -> None:
    with receiver() as local:
        target = endpoint(local.url + "/x\r\nX-Injected: 1", secret=SECRET)
        outcome = send(sender_for(target), job(target))
        assert not outcome.ok and "control" in (outcome.error or "")
        assert local.requests == []


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


def test_a_copy_of_the_endpoints_older_than_the_job_is_read_again(database_url: str) -> None:
    """The copy of the endpoints is kept a second, but a job from further
    along the log than the copy gets the endpoint as of then: a secret
    rotated just before a ping signs it (a read that began before the
    rotation was saved must not win)."""
    from services.outbound.outbox import Outbox
    from services.outbound.webhooks import PROJECTION, Endpoints
    from services.projections.webhooks import WebhooksProjection
    from services.readmodel import ReadModel

    read_model = ReadModel(database_url)
    try:
        endpoints = Endpoints(Outbox(read_model), [])
        first = endpoint("https://x.example/h")
        rotated = dataclasses.replace(first, generation=2, rotated_at=datetime.now(UTC))

        # Saved as the webhooks projection saves them: the row, then its position.
        projection = WebhooksProjection(Outbox(read_model), [])

        def save(info: EndpointInfo, position: int) -> None:
            with read_model.transaction() as cur:
                projection._write(cur, info)
                read_model.save_position(cur, PROJECTION, position)

        save(first, 5)
        assert asyncio.run(endpoints.get(first.id, 5)) == first
        save(rotated, 6)
        # Within the second, a job from the copy's position keeps the copy...
        assert asyncio.run(endpoints.get(first.id, 5)) == first
        # ... and one from after it reads the rotation.
        got = asyncio.run(endpoints.get(first.id, 6))
        assert got is not None and got.generation == 2
    finally:
        read_model.close()
