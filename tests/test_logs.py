"""`entitle dev` with JSON logs: every line one JSON object, one line per
request with its route and request id, webhook receipts with their ids,
and never a secret or a whole code."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_dev import ADMIN, AUTH, CONFIG, YEAR, entitlements, post

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def collected(name: str, formatter: logging.Formatter | None = None) -> Iterator[list[str]]:
    """The lines logger `name` writes at info level and above while inside,
    through `MaskCodes` as `configure` installs it, formatted by
    `formatter` (by default the message alone)."""
    from services.http import MaskCodes

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(formatter or logging.Formatter("%(message)s"))
    handler.addFilter(MaskCodes())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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

    from services.logs import NOTED, RequestLog

    code = "7K3QD-ABCDE-FGHJK-MNPQR-STVWX"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope[NOTED] = {"provider_event_id": f"evt_{code}"}
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(RequestLog(app, lambda scope: "/webhooks/{source}"))

    async def post(headers: dict[str, str]) -> httpx.Headers:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return (await http.post("/webhooks/x", headers=headers)).headers

    with collected("entitle.access") as lines:
        ours = asyncio.run(post({}))["x-request-id"]
        theirs = asyncio.run(post({"X-Request-Id": code}))
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

    from services.logs import JsonLines, LineBudget, RequestLog

    statuses = iter([202] * 9 + [503, 401, 401])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": next(statuses), "headers": []})
        await send({"type": "http.response.body", "body": b""})

    # 50 ms before a second ends: its summary comes 50 ms later.
    logged = RequestLog(app, lambda scope: "/webhooks/{source}", LineBudget(3, lambda: 100.95))
    transport = httpx.ASGITransport(logged)

    async def run(lines: list[str]) -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            for _ in range(12):
                await http.post("/webhooks/x")
            assert len(lines) == 4  # three, and the 503
            await asyncio.sleep(0.3)

    with collected("entitle.access", JsonLines()) as lines:
        asyncio.run(run(lines))
    records = [json.loads(line) for line in lines]
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


CODE = "04J91-2Q6TH-EC6PV-F1B4Z-7Z003"


@pytest.mark.parametrize(
    "text",
    [
        "/x/o4j9i-2q6th-ec6pv-fib4z-7zoo3",  # O for 0, I for 1, any case
        "/x/04J91 2Q6TH EC6PV F1B4Z 7Z003",  # a path as uvicorn decodes it
        "/x/04J91%202Q6TH%20EC6PV%20F1B4Z%207Z003",
        "/x/%2504J91-2Q6TH-EC6PV-F1B4Z-7Z003",  # a round of decoding makes "\x04J91"
        "/x/%04J91%2D2Q6TH%2DEC6PV%2DF1B4Z%2D7Z003",
        "/x/%2504J91%252D2Q6TH%252DEC6PV%252DF1B4Z%252D7Z003",
        "/x/y04J91-2Q6TH-EC6PV-F1B4Z-7Z003",
        "req-o4j9i-2q6th-ec6pv-fib4z-7zoo3",
        "evt_o4j9i2q6thec6pvfib4z7zoo3",
        "04J912Q6THEC6PVF1B4Z7Z003.json",
        "dead letter 'stripe-main'/'evt_04j91-2q6th-ec6pv-f1b4z-7z003': no offering",
        "04J91--2Q6TH--EC6PV--F1B4Z--7Z003",  # hyphens and spaces between groups
        "04J91 - 2Q6TH - EC6PV - F1B4Z - 7Z003",
        "04J91-\t2Q6TH-\tEC6PV-\tF1B4Z-\t7Z003",
        "04J9-12Q6-THEC-6PVF-1B4Z-7Z00-3",  # hyphens anywhere
        "-".join("04J912Q6THEC6PVF1B4Z7Z003"),
        "seen 04J91 - 2Q6TH - EC6PV - F1B4Z - 7Z003 today",  # gaps, then prose
        "04J91\t\t2Q6TH\t\tEC6PV\t\tF1B4Z\t\t7Z003\tvalid",
        repr("04J91\u30002Q6TH\u3000EC6PV\u3000F1B4Z\u30007Z003"),  # as %r shows it
        "04J91-2Q6TH-EC6PV-\ufb01B4Z-7Z003",  # "ﬁ" upper-cases to "FI", read as F1
    ],
)
def test_every_form_of_a_code_validation_accepts_is_masked(text: str) -> None:
    # The form is one validation takes for the code (the test's own check).
    from urllib.parse import unquote

    from domain.entitlement import normalize_code
    from services.http import mask

    forms = [re.sub("%2[0dD]", "", f) for f in [text, unquote(text), unquote(unquote(text))]]
    forms += [f.encode().decode("unicode_escape") for f in forms if "\\u" in f]
    assert any(
        normalize_code(CODE) in normalize_code("".join(c for c in f if c.isalnum())) for f in forms
    )
    masked = mask(text)
    assert "…" in masked, masked
    # Nothing of the code past its first five characters is left, in any form.
    plain = normalize_code(CODE)
    squeezed = normalize_code(
        "".join(c for c in masked.replace("%2D", "").replace("%20", "") if c.isalnum())
    )
    assert plain[5:10] not in squeezed and plain[-5:] not in squeezed, masked


@pytest.mark.parametrize(
    "text",
    [
        "4bf92f3577b34da6a3ce929d0e0e4736",  # a uuid4().hex, a W3C trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # traceparent
        "evt_01h04vsc0qhwtsbsxh3422wjs4",  # Paddle's ids: a prefix and a ULID
        "3f2a1c9e-8d7b-4e6f-a5c4-b3d2e1f0a9b8",
        "Root=1-6371c655-7e3a94e835e7bd8219a0be36",  # an AWS trace id
        "price 'price_nope' maps to no offering in the catalog",
    ],
)
def test_ids_that_are_no_code_are_logged_whole(text: str) -> None:
    from services.http import mask

    assert mask(text) == text


def test_what_is_held_is_logged_as_the_server_stops() -> None:
    """Stopped inside a second, the requests held back in it are said as
    the lifespan ends, not lost with the timer that would have said them."""
    import asyncio

    from services.logs import LineBudget, RequestLog

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    logged = RequestLog(app, lambda scope: "/webhooks/{source}", LineBudget(1, lambda: 100.0))

    async def run() -> None:
        inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        lifespan = asyncio.create_task(
            logged({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
        )
        await inbox.put({"type": "lifespan.startup"})
        transport = httpx.ASGITransport(logged)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            for _ in range(3):
                await http.post("/webhooks/x")
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        assert sent[-1] == {"type": "lifespan.shutdown.complete"}

    with collected("entitle.access") as lines:
        asyncio.run(run())  # ends before the second would
    assert len(lines) == 2, lines
    assert lines[1].startswith("2 more requests in the last second"), lines
    assert "(at most 1 line a second" in lines[1], lines


def test_a_refused_signature_is_said_on_its_request_line_only(tmp_path: Path) -> None:
    """A bad signature is one line (the request's, within the budget)
    naming why, not a second line anyone could multiply."""
    import asyncio

    from services.config import load_config
    from services.http import Shortcut
    from services.ingress import PREFIX, Ingress
    from services.logs import RequestLog, route_of

    (tmp_path / "entitle.yaml").write_text(
        "sources: {stripe-main: {provider: stripe, secret: whsec_x}}\n"
    )

    async def publish(value: bytes, key: bytes) -> None:
        raise AssertionError("nothing is published")

    ingress = Ingress(load_config(tmp_path / "entitle.yaml"), publish)
    app = RequestLog(Shortcut(None, "POST", PREFIX, ingress.asgi, prefix=True), route_of())  # type: ignore[arg-type]

    async def run() -> int:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            answer = await http.post(
                "/webhooks/stripe-main", content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"}
            )
            return answer.status_code

    with collected("entitle", logging.Formatter("%(name)s %(message)s")) as lines:
        status = asyncio.run(run())
    assert status == 401
    assert len(lines) == 1, lines
    assert lines[0].startswith("entitle.access POST /webhooks/{source} 401"), lines
    assert "source=stripe-main rejected=" in lines[0] and "tolerance" in lines[0], lines


def test_every_line_is_masked_however_it_was_logged() -> None:
    """A message without arguments, an exception or a mapping as argument,
    a traceback and structured fields (JSON): codes are cut in each."""
    from services.logs import JsonLines

    lines: list[str] = []
    logger = logging.getLogger("entitle.test-masking")
    for formatter in (logging.Formatter("%(message)s"), JsonLines()):
        with collected(logger.name, formatter) as these:
            logger.warning("no arguments " + CODE)
            logger.warning("%r", ValueError(CODE))
            logger.warning("%(a)s", {"a": CODE})
            logger.warning("fields", extra={"fields": {"provider_event_id": CODE, "l": [CODE]}})
            try:
                raise KeyError(CODE)
            except KeyError:
                logger.exception("failed")
        lines += these
    assert len(lines) == 10
    for line in lines:
        assert "2Q6TH" not in line, line
    assert '"provider_event_id": "04J91…"' in lines[8], lines[8]
    assert "KeyError: '04J91…'" in lines[4], lines[4]


def test_masking_is_linear_and_a_long_path_is_cut_without_a_partial_code() -> None:
    """A client's 32 KB path must not hold the event loop (masking was
    quadratic: seconds); shown cut, no beginning of a code is left."""
    import time

    from services.http import mask, mask_short

    began = time.process_time()
    for text in ("/" + "A" * 32_000, "/" + "A-" * 16_000, "/" + "A%2D" * 8_000):
        mask(text)
    assert time.process_time() - began < 1.0  # quadratic took 5-10 s
    cut = mask_short("/" + "x" * 495 + "/" + CODE)
    assert cut.startswith("/xxx") and "(29 more characters)" in cut, cut
    assert "04J91" not in cut and "2Q6TH" not in cut


def test_a_log_call_that_cannot_format_is_no_crash() -> None:
    from services.logs import JsonLines

    logger = logging.getLogger("entitle.test-bad-call")
    with collected(logger.name) as lines:
        logger.warning("100% done %s", CODE)  # raised TypeError in the caller
    assert lines[0].startswith("100% done %s (arguments it could not take:"), lines
    assert "2Q6TH" not in lines[0]
    # Fields JSON writes as their text (a set, bytes) are masked as text.
    with collected(logger.name, JsonLines()) as lines:
        logger.warning("fields", extra={"fields": {"codes": {CODE}, "raw": CODE.encode()}})
    fields = json.loads(lines[0])
    assert "04J91…" in fields["codes"] and "04J91…" in fields["raw"], fields
    assert "2Q6TH" not in lines[0]
