"""The edges a public endpoint is attacked at, through `entitle dev`: bad
input of every kind to every source and every route is a 4xx with a JSON
body (never a 5xx), oversized requests are refused, slow clients are cut
off, and a stored webhook keeps only the headers its adapter needs."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.webhooks import RAW_TOPIC, RawWebhookV1
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_dev import consume
from tests.test_dev_providers import CONFIG, SIGN, every_source

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 40
BODY_BUFFER = 3 * 1024 * 1024
SOURCES = sorted(SIGN)
DEEP = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
ENCODED_SURROGATE = b'{"id": "evt_\xed\xa0\x80"}'
ESCAPED_SURROGATE = b'{"id": "evt_\\ud800"}'
#: Bad bodies and what each one is.
BAD_BODIES = {
    "deep": DEEP,
    "encoded surrogate": ENCODED_SURROGATE,
    "escaped surrogate": ESCAPED_SURROGATE,
    "not UTF-8": b'{"id": "\xff\xfe"}',
    "not JSON": b"{'id': 1",
    "array": b"[1, 2]",
    "empty": b"",
    "wrong types": b'{"activation_code": {"a": 1}, "fingerprint": 5, "reason": [1]}',
}


UNLIMITED = """
licensing:
  per_code_per_second: 100000
  per_code_burst: 100000
  per_address_per_second: 100000
  per_address_burst: 100000
  seat_per_address_per_second: 100000
  seat_per_address_burst: 100000
admin:
  failed_auth_per_second: 100000
  failed_auth_burst: 100000
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Entitle]:
    env = {
        "ENTITLE_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "ENTITLE_HTTP_BODY_TIMEOUT": str(HEADER_TIMEOUT),
        "ENTITLE_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "ENTITLE_HTTP_MAX_BODY_BUFFER": str(BODY_BUFFER),
    }
    # Rate limits high enough that no bad request is answered 429 unread.
    with every_source(tmp_path_factory.mktemp("edges"), CONFIG + UNLIMITED, env) as entitle:
        yield entitle


def post(entitle: Entitle, source: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{entitle.url}/webhooks/{source}",
        content=body,
        headers={**SIGN[source](body), **headers},
        timeout=30,
    )


def assert_client_error(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert body["error"] and body["detail"] and body["status"] == response.status_code


# -- bodies of every kind, to every source ----------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", ["deep", "encoded surrogate", "escaped surrogate", "not UTF-8"])
def test_a_signed_body_that_is_no_json_text_is_a_400(
    stack: Entitle, source: str, kind: str
) -> None:
    response = post(stack, source, BAD_BODIES[kind])
    assert_client_error(response, 400)
    assert response.json()["error"] == "invalid_json"


@pytest.mark.parametrize("source", SOURCES)
def test_a_non_ascii_byte_in_any_signature_header_is_a_401(stack: Entitle, source: str) -> None:
    body = b'{"id": "evt_sig"}'
    signed = SIGN[source](body)
    for name in signed:
        if name.lower() in ("content-type", "x-event-name", "paypal-auth-algo", "paypal-cert-url"):
            continue
        headers: dict[str, Any] = {**signed, name: signed[name].encode() + b"\xe9\xff"}
        response = httpx.post(f"{stack.url}/webhooks/{source}", content=body, headers=headers)
        assert_client_error(response, 401)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.paypal.com:99999/x",
        "https://api.paypal.com:abc/x",
        "https://api.paypal.com:-1/x",
        "https://[::1/x",
        "https://api.paypal.com:443/x",
        "http://api.paypal.com/x",
        "https://evil.example/x",
        "\u00e9",
    ],
)
def test_a_paypal_certificate_url_not_on_paypal_is_a_401(stack: Entitle, url: str) -> None:
    body = b'{"id": "WH-1"}'
    headers: dict[str, Any] = {**SIGN["paypal"](body), "PAYPAL-CERT-URL": url.encode()}
    response = httpx.post(f"{stack.url}/webhooks/paypal", content=body, headers=headers)
    assert_client_error(response, 401)


@pytest.mark.parametrize("source", SOURCES)
def test_a_surrogate_pair_is_text_and_accepted(stack: Entitle, source: str) -> None:
    # An emoji escaped as UTF-16 (as JavaScript serializers write it) is fine.
    response = post(stack, source, b'{"id": "evt_pair", "note": "\\ud83d\\ude00"}')
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("source", SOURCES)
def test_a_body_too_large_to_store_is_a_413_not_a_retry(stack: Entitle, source: str) -> None:
    # Under the 1 MB body limit, but each \" doubles once JSON-escaped into
    # the envelope: past the broker's message size. A 503 would have the
    # provider retry for days; a 413 says it will never fit.
    body = b'{"id": "evt_big", "note": "' + b'\\"' * 523_000 + b'"}'
    response = post(stack, source, body)
    assert_client_error(response, 413)
    assert "once stored" in response.json()["detail"]


def test_only_the_headers_the_adapter_needs_are_stored(stack: Entitle) -> None:
    body = se.body(se.subscription_deleted(subscription="sub_headers"))
    extra = {f"x-junk-{n}": "j" * 50 for n in range(90)}
    response = post(stack, "stripe", body, **extra, **{"User-Agent": "Stripe/1.0"})
    assert response.status_code == 202, response.text
    receipt = response.json()["receipt_id"]
    bootstrap = (Path(stack.cwd) / ".entitle" / "broker").read_text().strip()
    envelope = eventually(lambda: stored(bootstrap).get(receipt), timeout=20)
    assert set(envelope.headers) == {"content-type", "user-agent", "stripe-signature"}


def stored(bootstrap: str) -> dict[str, RawWebhookV1]:
    envelopes = (
        RawWebhookV1.model_validate_json(record.value)
        for record in consume(bootstrap, RAW_TOPIC, 10_000, timeout=3)
        if record.value and b"receipt_id" in record.value
    )
    return {envelope.receipt_id: envelope for envelope in envelopes}


# -- heads too large, and slow clients ---------------------------------------


def test_too_many_headers_are_a_431(stack: Entitle) -> None:
    headers = {f"x-h-{n}": "1" for n in range(150)}
    response = httpx.get(f"{stack.url}/healthz", headers=headers)
    assert_client_error(response, 431)
    # The request never reached the app, and still has its request line.
    refused = "- (refused by the server) 431 headers_too_large"
    eventually(lambda: refused in stack.text or None, timeout=5)


def test_a_header_too_large_is_a_431(stack: Entitle) -> None:
    response = httpx.get(f"{stack.url}/healthz", headers={"x-big": "b" * 40_000})
    assert_client_error(response, 431)


def test_an_endless_header_is_cut_off_before_it_ends(stack: Entitle) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        answer = b""
        with pytest.raises(OSError):  # the server closes while we still send
            for _ in range(1000):
                client.sendall(b"a" * 4096)
                time.sleep(0.001)
        answer = _read_all(client)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


def _read_all(client: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = client.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _slow(port: int, head: bytes) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 10)
    client.sendall(head)
    return client


def test_slow_clients_are_answered_408_and_closed(stack: Entitle) -> None:
    started = time.monotonic()
    head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
    clients = [_slow(stack.port, head) for _ in range(MAX_CONNECTIONS - 10)]
    # A slowloris sends a header line now and then, never the end of the head.
    for _ in range(3):
        time.sleep(0.4)
        for client in clients:
            client.sendall(b"X-A: b\r\n")
    # Meanwhile the server still serves everyone else.
    assert httpx.get(f"{stack.url}/healthz").status_code == 200
    idle = _slow(stack.port, b"")  # connects and sends nothing
    body = _slow(
        stack.port,
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
    )
    answers = [_read_all(c) for c in [*clients, idle, body]]
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
    assert time.monotonic() - started < HEADER_TIMEOUT * 3 + 5
    for client in [*clients, idle, body]:
        client.close()


def test_a_slow_second_request_on_a_kept_alive_connection_is_answered_408(
    stack: Entitle,
) -> None:
    client = _slow(stack.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = client.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    client.sendall(b"GET /healthz HTTP/1.1\r\n")
    for _ in range(3):
        time.sleep(0.5)
        client.sendall(b"X-A: b\r\n")
    answer = _read_all(client)
    client.close()
    assert b"HTTP/1.1 408" in answer, answer[:300]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nabc",
        b"GET /v1/\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ],
)
def test_a_request_that_is_not_http_is_a_json_400(stack: Entitle, request_bytes: bytes) -> None:
    client = _slow(stack.port, request_bytes)
    answer = _read_all(client)
    client.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "invalid_request"
    eventually(lambda: "(refused by the server) 400 invalid_request" in stack.text or None)
    assert "Invalid HTTP request received" not in stack.text  # that line, not two


@pytest.mark.parametrize("path", ["/nope", "/healthz", "/v1/validate", "/webhooks/nope"])
def test_a_body_the_server_does_not_read_is_not_taken_for_a_second_request(
    stack: Entitle, path: str
) -> None:
    body = b"x" * 2_000_000
    client = _slow(
        stack.port,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode(),
    )
    with contextlib.suppress(OSError):  # the server may close once it has answered
        client.sendall(body)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = _read_all(client)
    client.close()
    statuses = [line for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses and b"431" not in b"".join(statuses), statuses
    assert statuses[0][9:12] in (b"404", b"405", b"413"), statuses


def test_bodies_read_at_once_are_held_to_a_budget(stack: Entitle) -> None:
    """Clients that send most of a large body and stall hold memory until
    their body timeout: past the process's budget the next one is a 503."""
    head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    stalled = []
    for _ in range(3):
        client = _slow(stack.port, head)
        client.sendall(b"{" + b" " * 899_999)
        stalled.append(client)
        time.sleep(0.3)  # read by the server before the next one
    refused = _slow(stack.port, head)
    refused.sendall(b"{" + b" " * 899_999)
    answer = _read_all(refused)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "busy"
    for client in [*stalled, refused]:
        client.close()
    # Their bodies let go, others are read again.
    body = se.body(se.subscription_deleted(subscription="sub_budget"))
    response = eventually(lambda: post(stack, "stripe", body).status_code == 202 or None)
    assert response


def test_connections_past_the_cap_are_refused_and_the_server_recovers(stack: Entitle) -> None:
    held = [_slow(stack.port, b"") for _ in range(MAX_CONNECTIONS + 5)]
    answers = []
    for client in held[-5:]:
        client.settimeout(5)
        answers.append(_read_all(client))
    assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers
    eventually(lambda: "(refused by the server) 503 too_many_connections" in stack.text or None)
    # The held ones time out; then the server takes connections again.
    eventually(lambda: httpx.get(f"{stack.url}/healthz").status_code == 200 or None, timeout=20)
    for client in held:
        client.close()
