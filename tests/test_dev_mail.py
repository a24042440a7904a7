"""End to end: `entitle dev` mails the buyer the activation code of a paid
Stripe invoice, once, through a real SMTP server (aiosmtpd, in this
process), or, with no SMTP settings, writes it under `.entitle/outbox/`."""

from __future__ import annotations

import email
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from services.kafka import free_port
from tests import stripe_events as se
from tests.harness import Entitle, eventually
from tests.test_mail import Inbox, body

pytestmark = pytest.mark.e2e

CONFIG = f"""
sources:
  stripe-main: {{provider: stripe, secret: {se.SECRET}}}
offerings:
  - {{sku: better_annual, product: Acme Studio, period: P1Y, seats: 3}}
"""
MAIL = """
notifications:
  email:
    host: 127.0.0.1
    port: {port}
    security: none
    from_address: "Acme Licenses <licenses@acme.example>"
    portal_url: https://acme.example/license
"""
CODE = re.compile(r"\b[0-9A-Z]{5}(?:-[0-9A-Z]{5}){4}\b")
YEAR = 365 * 86400
AUTH = {"Authorization": "Bearer ek_test_admin_key"}
ENV = {"ENTITLE_ADMIN_KEYS": "ops:ek_test_admin_key"}


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def pay(entitle: Entitle, subscription: str, buyer: str) -> int:
    """Send a paid invoice for a year from now; returns its period end."""
    now = int(time.time())
    event = se.invoice_paid(
        subscription=subscription,
        email=buyer,
        shape=se.LEGACY,
        lines=[{"price": "price_annual", "sku": "better_annual", "start": now, "end": now + YEAR}],
    )
    body_bytes = se.body(event)
    response = httpx.post(
        f"{entitle.url}/webhooks/stripe-main",
        content=body_bytes,
        headers=se.signed_headers(body_bytes),
    )
    assert response.status_code == 202, response.text
    return now + YEAR


def mails_sent(entitle: Entitle) -> list[dict[str, Any]]:
    """GET /v1/mails: those that succeeded."""
    response = httpx.get(f"{entitle.url}/v1/mails", headers=AUTH)
    assert response.status_code == 200, response.text
    return [m for m in response.json()["items"] if m["status"] == "succeeded"]


def validate(entitle: Entitle, code: str) -> dict[str, Any]:
    response = httpx.post(f"{entitle.url}/v1/validate", json={"activation_code": code})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_paid_invoice_mails_a_code_that_validates_once(
    smtp: tuple[Inbox, int], tmp_path: Path
) -> None:
    inbox, port = smtp
    (tmp_path / "entitle.yaml").write_text(CONFIG + MAIL.format(port=port))
    with Entitle(["dev"], tmp_path, ENV) as entitle:
        assert f"smtp://127.0.0.1:{port}" in entitle.text
        end = pay(entitle, "sub_mail_1", "ada@example.com")
        eventually(lambda: inbox.messages, timeout=20)
        [(envelope, message)] = inbox.messages
        assert envelope.rcpt_tos == ["ada@example.com"]
        assert "Acme Studio" in message["Subject"]
        text, html = body(message, "plain"), body(message, "html")
        assert "Acme Studio" in text and "better_annual" in text
        [code] = CODE.findall(text)
        assert code in html
        # The invoice that created the license also paid for it: the mail says until when.
        paid_through = f"Paid through: {datetime.fromtimestamp(end, UTC).date().isoformat()}"
        assert paid_through in text and paid_through in html
        assert "Seats: 3" in text and "Your license: https://acme.example/license" in text
        result = validate(entitle, code)
        assert (result["valid"], result["status"]) == (True, "ACTIVE"), result
        # Operators see the mail, its status and its attempts (no code).
        mails = eventually(lambda: mails_sent(entitle), timeout=5)
        [mail] = mails
        assert mail["type"] == "entitlement.created" and mail["attempts"][0]["status_code"] == 250
        assert code not in json.dumps(mails)

    # A restart sends nothing again; a new purchase is mailed, so the
    # dispatcher is running when we look.
    with Entitle(["dev"], tmp_path, ENV) as entitle:
        pay(entitle, "sub_mail_2", "grace@example.com")
        eventually(lambda: len(inbox.messages) >= 2, timeout=20)
        time.sleep(1.0)  # the dispatcher polls twice a second: room for a duplicate
        recipients = [envelope.rcpt_tos for envelope, _ in inbox.messages]
        assert recipients == [["ada@example.com"], ["grace@example.com"]]
        ids = {m["Message-ID"] for _, m in inbox.messages}
        assert len(ids) == 2
        eventually(lambda: len(mails_sent(entitle)) == 2)


def test_without_smtp_settings_dev_writes_eml_files(tmp_path: Path) -> None:
    (tmp_path / "entitle.yaml").write_text(CONFIG)
    with Entitle(["dev"], tmp_path, ENV) as entitle:
        printed = entitle.printed(r"mail:\s+(\S+)")
        outbox = tmp_path / ".entitle" / "outbox"
        assert (tmp_path / printed).resolve() == outbox.resolve()
        pay(entitle, "sub_mail_eml", "ada@example.com")
        [path] = eventually(lambda: list(outbox.glob("*.eml")), timeout=20)
        message = email.message_from_bytes(path.read_bytes(), policy=default_policy)
        assert isinstance(message, EmailMessage)
        assert message["To"] == "ada@example.com"
        [code] = CODE.findall(body(message, "plain"))
        assert validate(entitle, code)["valid"] is True
        assert str(path) in entitle.text or path.name in entitle.text
        assert code not in entitle.text  # the log names the file, never the code
