"""The mail channel against a real SMTP server (aiosmtpd, in-process), its
.eml outbox, and the `notifications.email` configuration."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import email
import ipaddress
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from domain.entitlement import code_hash, event_type
from services.codes import CodeBook
from services.config import ConfigError, EmailSettings, parse_config
from services.kafka import free_port
from services.mail_templates import TEMPLATE_TYPES, shipped
from services.outbound.mail import Mailer
from services.outbound.outbox import Dispatcher, Job, Outbox, Outcome
from services.projections import Follower, project_batch
from services.projections.mail import MailProjection
from services.readmodel import ReadModel

SECRET = "a-code-secret-for-the-mail-tests"
CODES = CodeBook(SECRET)
ENTITLEMENT = UUID("7d1b7a8e-52a4-4a3c-9f53-1d6b1c1a2b3c")


def job(
    to: str = "buyer@example.com",
    product: str = "Acme Studio",
    template: str = "entitlement.created",
    indexes: tuple[int, ...] = (0,),
) -> Job:
    payload = {
        "to": to,
        "template": template,
        "entitlement": {
            "id": str(ENTITLEMENT),
            "product": product,
            "offering": "studio_annual",
            "seats": 3,
            "status": "ACTIVE",
            "reason": None,
            "period_end": "2031-05-01T00:00:00+00:00",
        },
        "code_indexes": list(indexes),
    }
    return Job.of(
        "mail", "mail", f"{ENTITLEMENT}/{template}", template, str(ENTITLEMENT), 7, payload
    )


class Inbox:
    """An aiosmtpd handler that keeps what it receives, or refuses as told
    (the sender, a recipient, or the message after DATA)."""

    def __init__(self, rcpt_answer: str | None = None) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.rcpt_answer = rcpt_answer
        self.mail_answer: str | None = None
        self.data_answer: str | None = None

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_answer:
            return self.mail_answer
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_answer:
            return self.rcpt_answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.data_answer:
            return self.data_answer
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=default_policy)
        assert isinstance(message, EmailMessage)
        self.messages.append((envelope, message))
        return "250 2.0.0 queued as 1234"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def settings(port: int, **changes: Any) -> EmailSettings:
    base = EmailSettings(
        host="127.0.0.1",
        port=port,
        security="none",
        from_address="Acme Licenses <licenses@acme.example>",
        portal_url="https://acme.example/license",
        timeout_seconds=5,
    )
    return replace(base, **changes)


def send(mailer: Mailer, the_job: Job) -> Outcome:
    return asyncio.run(mailer.send(the_job))


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None and part.get_content_type() == f"text/{kind}"
    content = part.get_content()
    assert isinstance(content, str)
    return content


# -- SMTP --------------------------------------------------------------------


def test_a_mail_arrives_with_the_code_the_code_book_derives(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    the_job = job(product="<script>alert(1)</script> Studio", indexes=(0, 1))
    outcome = send(Mailer(settings(port), CODES), the_job)
    assert outcome.ok and outcome.status_code == 250, outcome
    assert "queued as 1234" in outcome.answer

    [(envelope, message)] = inbox.messages
    assert envelope.rcpt_tos == ["buyer@example.com"]
    assert envelope.mail_from == "licenses@acme.example"
    assert message["To"] == "buyer@example.com"
    assert message["Message-ID"] == f"<{the_job.id}@acme.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    assert "<script>alert(1)</script> Studio" in message["Subject"]

    codes = [CODES.code(ENTITLEMENT, 0), CODES.code(ENTITLEMENT, 1)]
    text, html = body(message, "plain"), body(message, "html")
    for code in codes:
        assert code in text and code in html
    assert "studio_annual" in text and "studio_annual" in html
    assert "2031-05-01" in text and "https://acme.example/license" in html
    # The product name is the vendor's, but HTML is escaped whatever it holds.
    assert "<script>" in text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; Studio" in html
    # Nothing of the codes is in the job: they are derived as the mail is made.
    assert not any(code in str(the_job.payload) for code in codes)


def test_a_trial_is_not_called_paid(tmp_path: Path) -> None:
    mailer = Mailer(EmailSettings(outbox_dir=tmp_path), CODES)
    paid, trial = job(), job()
    trial.payload["entitlement"]["trial"] = True
    for the_job, line in (
        (paid, "Paid through: 2031-05-01"),
        (trial, "Free trial through: 2031-05-01"),
    ):
        message = mailer.message(the_job)
        assert line in body(message, "plain") and line in body(message, "html")


def test_the_same_job_makes_the_same_message_id(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    templates = {t: shipped(t) for t in ("entitlement.created", "entitlement.canceled")}
    mailer = Mailer(settings(port, templates=templates), CODES)
    assert send(mailer, job()).ok and send(mailer, job()).ok
    assert send(mailer, job(template="entitlement.canceled")).ok
    first, again, other = (message["Message-ID"] for _, message in inbox.messages)
    assert first == again != other


def test_starttls_to_a_server_without_it_is_retried(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    outcome = send(Mailer(settings(port, security="starttls"), CODES), job())
    assert not outcome.ok and not outcome.permanent
    assert outcome.error is not None and "STARTTLS" in outcome.error
    assert inbox.messages == []  # nothing went out in the clear


def test_tls_to_a_plain_server_is_retried(smtp: tuple[Inbox, int]) -> None:
    _, port = smtp
    outcome = send(Mailer(settings(port, security="tls", timeout_seconds=2), CODES), job())
    assert not outcome.ok and not outcome.permanent and outcome.error


def test_a_recipient_refused_with_5xx_is_permanent(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    inbox.rcpt_answer = "550 5.1.1 no such mailbox"
    outcome = send(Mailer(settings(port), CODES), job())
    assert not outcome.ok and outcome.permanent
    assert outcome.status_code == 550 and "no such mailbox" in outcome.answer
    assert inbox.messages == []


def test_a_non_ascii_address_a_server_without_smtputf8_cannot_take_is_given_up() -> None:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        mailer = Mailer(settings(port), CODES)
        outcome = send(mailer, job(to="j\u00fcrgen@example.de"))
        assert not outcome.ok and outcome.permanent, outcome
        assert outcome.error == "the server cannot take a non-ASCII address (no SMTPUTF8)"
        # An ASCII address with a non-ASCII name goes, its name encoded.
        assert send(mailer, job(to="J\u00fcrgen <juergen@example.de>")).ok
        [(envelope, message)] = inbox.messages
        assert envelope.rcpt_tos == ["juergen@example.de"]
        assert str(message["To"]) == "J\u00fcrgen <juergen@example.de>"
    finally:
        controller.stop()


def test_a_recipient_refused_with_4xx_is_retried(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    inbox.rcpt_answer = "451 4.7.1 greylisted, try again later"
    outcome = send(Mailer(settings(port), CODES), job())
    assert not outcome.ok and not outcome.permanent and outcome.status_code == 451


@pytest.mark.parametrize(
    ("answer", "status"),
    [("451 4.7.1 greylisted, try again later", "pending"), ("550 5.1.1 no such mailbox", "failed")],
)
def test_the_attempt_log_tells_a_451_from_a_550(
    smtp: tuple[Inbox, int], tmp_path: Path, answer: str, status: str
) -> None:
    """Each attempt records the server's reply code as its status code, and
    the code and the server's words in its error."""
    inbox, port = smtp
    inbox.rcpt_answer = answer
    outbox = Outbox(ReadModel(f"sqlite:///{tmp_path / 'outbox.db'}"))
    outbox.add([job()])

    async def run() -> None:
        stop = asyncio.Event()
        dispatcher = Dispatcher(outbox, [Mailer(settings(port), CODES)], poll_interval=0.05)
        task = asyncio.create_task(dispatcher.run(stop))
        deadline = time.monotonic() + 10
        while not outbox.jobs(channel="mail")[0].attempts and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(run())
    [record] = outbox.jobs(channel="mail")
    [attempt] = record.attempts
    code = int(answer[:3])
    assert (attempt.status_code, record.last_status_code, record.status) == (code, code, status)
    assert attempt.error == record.last_error == f"the recipient was refused: SMTP {answer}"


@pytest.mark.parametrize(
    ("where", "answer", "what", "permanent"),
    [
        ("mail", "421 4.3.2 shutting down, come back later", "the sender was refused", False),
        ("mail", "553 5.7.1 sender not allowed", "the sender was refused", False),
        ("data", "452 4.3.1 insufficient system storage", "the message was refused", False),
        ("data", "554 5.7.1 message rejected as spam", "the message was refused", True),
    ],
)
def test_every_refusal_names_its_reply_code_and_text(
    smtp: tuple[Inbox, int], where: str, answer: str, what: str, permanent: bool
) -> None:
    """Whatever step the server refuses (a refused sender is ours to fix, so
    retried): the error says which, with the reply code and the server's text."""
    inbox, port = smtp
    setattr(inbox, f"{where}_answer", answer)
    outcome = send(Mailer(settings(port), CODES), job())
    code = int(answer[:3])
    assert (outcome.ok, outcome.permanent, outcome.status_code) == (False, permanent, code)
    assert outcome.error == f"{what}: SMTP {answer}"
    assert answer[4:] in outcome.answer
    assert inbox.messages == []


def test_a_refusal_keeps_the_first_200_characters_of_the_servers_text(
    smtp: tuple[Inbox, int],
) -> None:
    inbox, port = smtp
    text = "4.7.1 " + "very long explanation " * 20
    inbox.rcpt_answer = f"451 {text}"
    outcome = send(Mailer(settings(port), CODES), job())
    assert outcome.error == f"the recipient was refused: SMTP 451 {text[:200]}"
    assert outcome.status_code == 451


def test_a_server_that_refuses_the_connection_is_retried_with_its_reply() -> None:
    async def run() -> Outcome:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"421 4.3.2 too busy, try later\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await Mailer(settings(port), CODES).send(job())

    outcome = asyncio.run(run())
    assert (outcome.ok, outcome.permanent, outcome.status_code) == (False, False, 421)
    assert outcome.error == "the server refused the connection: SMTP 421 4.3.2 too busy, try later"


def test_no_server_is_retried() -> None:
    outcome = send(Mailer(settings(free_port()), CODES), job())
    assert not outcome.ok and not outcome.permanent and outcome.error


#: Addresses the email package (CPython 3.11) accepts but cannot write: a
#: continuation line without white space, which ends the header block; an
#: IndexError while folding.
BADLY_FOLDED = (
    "a" + "x" * 80 + "0a(=\u00a0<.?=?utf-8?q?;_\u2039\u20ac?[)?= ?=a\u00fc <u@example.com>",
    "''\U0001f600=?utf-8?q?" + "\u00c4" * 30 + "a\u200b" + "\u00c4" * 30 + "() <u2@example.com>",
)
#: The same faults where the mail is written with ASCII headers (RFC 2047
#: encoded words), as aiosmtplib does for a server without SMTPUTF8.
BADLY_FOLDED_AS_ASCII = (
    "''\U0001f600=?utf-8?q?" + "\u00c4" * 38 + "( ) <u@example.com>",
    "''\U0001f600=utf-8?\u200bq?" + "\u00c4" * 36 + "() <u@example.com>",
)


def test_a_mail_the_email_package_cannot_write_whole_is_not_written(tmp_path: Path) -> None:
    """Written as a file, such a mail lost its Date, Message-ID and body
    (or was retried forever on an IndexError): refused for good, no file."""
    mailer = Mailer(EmailSettings(outbox_dir=tmp_path), CODES)
    for crafted in BADLY_FOLDED:
        outcome = send(mailer, job(to=crafted))
        assert not outcome.ok and outcome.permanent, outcome
        assert "cannot be written" in (outcome.error or "")
    assert list(tmp_path.iterdir()) == []
    assert send(mailer, job(to="J\u00fcrgen <j\u00fcrgen@example.de>")).ok
    [written] = tmp_path.glob("*.eml")
    message = email.message_from_bytes(written.read_bytes(), policy=default_policy)
    assert str(message["To"]) == "J\u00fcrgen <j\u00fcrgen@example.de>"
    assert message["Message-ID"] and message["Date"] and message.get_body(("plain",))


def test_a_job_that_cannot_make_a_mail_fails_at_once(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mailer = Mailer(settings(port), CODES)
    for bad in (
        job(to="not an address"),
        job(to="buyer@example.com\r\nBcc: everyone@example.com"),
        job(to="buyer@example.com\nBcc: everyone@example.com"),
        *(job(to=crafted) for crafted in BADLY_FOLDED + BADLY_FOLDED_AS_ASCII),
        job(template="entitlement.suspended"),  # not configured
        replace(job(), payload={"to": "buyer@example.com"}),
        job(indexes=(-1,)),
    ):
        outcome = send(mailer, bad)
        assert not outcome.ok and outcome.permanent, (bad.payload, outcome)
        assert "everyone@" not in (outcome.error or "")
    assert inbox.messages == []


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_starttls_with_a_login_delivers(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(
        server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        if data.password == b"s3cret":
            return AuthResult(success=True, handled=False)
        # A careless server that repeats what it was sent, in plain and in base64.
        echoed = f"{data.password.decode()} {base64.b64encode(data.password).decode()}"
        plain = base64.b64encode(b"\0" + data.login + b"\0" + data.password).decode()
        return AuthResult(success=False, handled=False, message=f"535 5.7.8 no: {echoed} {plain}")

    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    controller.start()
    try:
        client_tls = ssl.create_default_context(cafile=str(cert))
        good = settings(port, security="starttls", user="mailer", password=SecretStr("s3cret"))
        assert send(Mailer(good, CODES, tls_context=client_tls), job()).ok
        assert len(inbox.messages) == 1 and logins == [(b"mailer", b"s3cret")]

        wrong = replace(good, password=SecretStr("wrong"))
        outcome = send(Mailer(wrong, CODES, tls_context=client_tls), job())
        # A refused login is ours to fix: retried, so a fixed config sends it.
        assert not outcome.ok and not outcome.permanent and outcome.status_code == 535
        assert (outcome.error or "").startswith("the login was refused: SMTP 535 5.7.8 no: ")
        told = (outcome.error or "") + outcome.answer
        assert "wrong" not in told and base64.b64encode(b"wrong").decode() not in told
        assert base64.b64encode(b"\0mailer\0wrong").decode() not in told

        untrusted = send(Mailer(good, CODES), job())  # the system's roots: no
        assert not untrusted.ok and not untrusted.permanent
        assert len(inbox.messages) == 1
    finally:
        controller.stop()


# -- the .eml outbox ---------------------------------------------------------------


def test_without_a_host_the_mail_is_written_as_an_eml_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = tmp_path / "outbox"
    mailer = Mailer(EmailSettings(outbox_dir=outbox), CODES)
    assert mailer.outbox_dir == outbox
    the_job = job()
    with caplog.at_level("INFO", logger="entitle.mail"):
        outcome = send(mailer, the_job)
    path = outbox / f"{the_job.id}.eml"
    assert outcome.ok and outcome.answer == str(path)
    assert [p.name for p in outbox.iterdir()] == [path.name]  # no temporary left
    assert path.stat().st_mode & 0o077 == 0  # it holds a code: the owner's only

    message = email.message_from_bytes(path.read_bytes(), policy=default_policy)
    assert isinstance(message, EmailMessage)
    assert message["To"] == "buyer@example.com"
    assert message["Message-ID"] == f"<{the_job.id}@localhost>"
    code = CODES.code(ENTITLEMENT, 0)
    assert code in body(message, "plain") and code in body(message, "html")

    logged = [r.getMessage() for r in caplog.records if r.name == "entitle.mail"]
    assert len(logged) == 1 and str(path) in logged[0]
    assert code not in caplog.text

    # Sent again (a crash before its success was recorded): the same file.
    assert send(mailer, the_job).ok
    assert [p.name for p in outbox.iterdir()] == [path.name]


def test_a_mailer_needs_somewhere_to_send() -> None:
    with pytest.raises(ValueError, match="outbox"):
        Mailer(EmailSettings(), CODES)


# -- configuration -------------------------------------------------------------


def test_the_email_section_is_read() -> None:
    config = parse_config(
        """
notifications:
  email:
    host: smtp.acme.example
    user: mailer
    password_env: ACME_SMTP_PASSWORD
    from_address: "Acme Licenses <licenses@acme.example>"
    portal_url: https://acme.example/license
    templates:
      entitlement.overdue:
      entitlement.canceled: {subject: "{{ product }} is over"}
""",
        {"ACME_SMTP_PASSWORD": "s3cret"},
    )
    mail = config.email
    assert mail is not None
    assert (mail.host, mail.port, mail.security, mail.user) == (
        "smtp.acme.example",
        587,
        "starttls",
        "mailer",
    )
    assert mail.password is not None and mail.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(mail) and "s3cret" not in repr(config)
    assert sorted(mail.templates) == [
        "entitlement.canceled",
        "entitlement.created",
        "entitlement.overdue",
    ]
    canceled = mail.templates["entitlement.canceled"]
    assert canceled.subject == "{{ product }} is over"
    assert canceled.text == shipped("entitlement.canceled").text


def test_ports_default_by_security_and_no_section_means_no_mail() -> None:
    assert parse_config("{}", {}).email is None
    for security, port in (("starttls", 587), ("tls", 465), ("none", 25)):
        section = f"{{host: h, from_address: a@b.example, security: {security}}}"
        mail = parse_config(f"notifications: {{email: {section}}}", {}).email
        assert mail is not None and mail.port == port
    outbox = parse_config("notifications: {email: {outbox_dir: /tmp/x}}", {}).email
    assert outbox is not None and outbox.host is None and outbox.outbox_dir == Path("/tmp/x")
    assert list(outbox.templates) == ["entitlement.created"]
    off = parse_config(
        "notifications: {email: {outbox_dir: x, templates: {entitlement.created: false}}}", {}
    ).email
    assert off is not None and dict(off.templates) == {}


@pytest.mark.parametrize(
    ("email_section", "message"),
    [
        ("{host: h, from_address: a@b.example, security: ssl}", "security"),
        ("{host: h, from_address: a@b.example, port: 0}", "port"),
        ("{host: h}", "from_address is needed"),
        ("{host: '', from_address: a@b.example}", "host is empty"),
        ("{host: h, from_address: nobody}", "from_address 'nobody'"),
        ("{host: h, from_address: 'a@b.example, c@d.example'}", "one address"),
        ("{host: h, from_address: a@b.example, password: x}", "never the password in the file"),
        ("{host: h, from_address: a@b.example, user: u}", "both user and password_env"),
        ("{host: h, from_address: a@b.example, password_env: P}", "both user and password_env"),
        ("{host: h, from_address: a@b.example, user: u, password_env: UNSET}", r"\$UNSET"),
        (
            "{host: h, from_address: a@b.example, user: u, password_env: P, security: none}",
            "in the clear",
        ),
        ("{outbox_dir: x, portal_url: 'javascript:alert(1)'}", "portal_url"),
        ("{outbox_dir: x, templates: {entitlement.renewed: true}}", "no mail for"),
        (
            "{outbox_dir: x, templates: {entitlement.created: {subject: '{{ prodcut }}'}}}",
            "prodcut",
        ),
        ("{outbox_dir: x, templates: {entitlement.created: {html: '{% if %}'}}}", "html, line 1"),
        ("{outbox_dir: x, templates: {entitlement.created: {subject: '  '}}}", "renders empty"),
        (
            "{outbox_dir: x, templates: {entitlement.created: {text: '{{ period_end.year }}'}}}",
            "no period end",
        ),
        ("{outbox_dir: x, templates: {entitlement.created: {body: x}}}", "body"),
        ("{outbox_dir: x, timeout_seconds: 0}", "timeout_seconds"),
        ("{outbox_dir: x, surprise: 1}", "surprise"),
    ],
)
def test_email_mistakes_are_reported_clearly(email_section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"notifications: {{email: {email_section}}}", {"P": "pw"})


def test_every_shipped_template_renders(tmp_path: Path) -> None:
    mailer = Mailer(
        EmailSettings(outbox_dir=tmp_path, templates={t: shipped(t) for t in TEMPLATE_TYPES}),
        CODES,
    )
    for template in TEMPLATE_TYPES:
        message = mailer.message(job(template=template, product=f"P-{uuid4().hex[:6]}"))
        product = message["Subject"].split("P-")[1][:6]
        assert product in body(message, "plain") and product in body(message, "html")


# -- the projection, with the real store, outbox and dispatcher -----------------


class MailWorld:
    """A domain service on a real store, with the mail projection and a dispatcher
    whose mailer talks to `port`."""

    def __init__(self, database_url: str, port: int, templates: tuple[str, ...]) -> None:
        from tests.test_receipts import CODES as SERVICE_CODES
        from tests.test_receipts import World

        self.world = World(database_url)
        self.codes = SERVICE_CODES
        self.outbox = Outbox(self.world.read_model)
        self.templates = templates
        self.mailer = Mailer(
            settings(port, templates={t: shipped(t) for t in templates}), self.codes
        )
        self.position = 0

    def projection(self) -> MailProjection:
        store = self.world.store
        return MailProjection(
            self.outbox, self.templates, lambda: store.process_recorder.max_notification_id() or 0
        )

    def send(self, event: dict[str, Any], receipt: str) -> None:
        self.world.send(event, receipt)

    def project(self, projection: MailProjection, batch: int = 10_000) -> None:
        """Project the log up to its end, `batch` notifications at a time."""
        follower = Follower(self.world.store)
        while True:
            changes, last = follower.read(projection.position(), batch)
            if last is None:
                return
            asyncio.run(project_batch(projection, changes, last))

    def dispatch(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Run the dispatcher until `until()` (checked between its polls)."""

        async def run() -> None:
            stop = asyncio.Event()
            dispatcher = Dispatcher(self.outbox, [self.mailer], poll_interval=0.05)
            task = asyncio.create_task(dispatcher.run(stop))
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await task

        asyncio.run(run())

    def mail_jobs(self) -> list[Any]:
        return self.outbox.jobs(channel="mail")

    def close(self) -> None:
        self.world.close()


def paid_invoice(
    subscription: str, email_address: str = "ada@example.com", period: int = 0, **kw: Any
) -> Any:
    """The invoice of the subscription's `period`th year (0: the first)."""
    from tests import stripe_events as se
    from tests.test_store import NOW, YEAR

    start = NOW + period * YEAR
    return se.invoice_paid(
        subscription=subscription,
        email=email_address,
        shape=se.LEGACY,
        lines=[{"price": "p", "sku": "better_annual", "start": start, "end": start + YEAR}],
        **kw,
    )


def test_a_paid_invoice_mails_its_code_once(smtp: tuple[Inbox, int], database_url: str) -> None:
    inbox, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created", "entitlement.overdue"))
    try:
        projection = mail.projection()
        mail.send(paid_invoice("sub_mail"), "r1")
        mail.send(paid_invoice("sub_quiet", email_address=""), "r2")  # no address: no mail
        mail.project(projection)
        [record] = mail.mail_jobs()
        the_job = record.job
        entitlement = UUID(the_job.ordering_key)
        assert the_job.message_id == f"{entitlement}/entitlement.created"
        assert (the_job.channel, the_job.kind, the_job.ordered) == ("mail", "mail", False)

        mail.dispatch(lambda: mail.mail_jobs()[0].status == "succeeded")
        [(envelope, message)] = inbox.messages
        assert envelope.rcpt_tos == ["ada@example.com"]
        code = mail.codes.code(entitlement, 0)
        assert code in body(message, "plain")
        # The code in the mail is one the engine knows as the entitlement's.
        found = mail.world.read_model.by_code(code_hash(code))
        assert found is not None and found.id == entitlement

        # The renewal fails, is paid, fails again: one overdue mail.
        failed = paid_invoice("sub_mail", period=1, kind="invoice.payment_failed")
        mail.send(failed, "f1")
        mail.send(paid_invoice("sub_mail", period=1), "p1")
        mail.send(paid_invoice("sub_mail", period=2, kind="invoice.payment_failed"), "f2")
        events = [event_type(e) for e in mail.world.store.history(entitlement)]
        assert events.count("entitlement.overdue") == 2, events
        # A rebuild from zero and a restart (a new projection): nothing twice.
        with mail.world.read_model.transaction() as cur:
            cur.execute("DELETE FROM entitle_read_positions WHERE name = 'mail'")
        mail.project(MailProjection(mail.outbox, mail.templates, lambda: 0))
        mail.project(mail.projection())
        types = sorted(r.job.type for r in mail.mail_jobs())
        assert types == ["entitlement.created", "entitlement.overdue"]
        mail.dispatch(lambda: all(r.status == "succeeded" for r in mail.mail_jobs()))
        assert [m["Subject"] for _, m in inbox.messages][1:] == ["Payment for acme failed"]
    finally:
        mail.close()


def test_a_new_mail_projection_starts_at_the_end_of_the_log(
    smtp: tuple[Inbox, int], database_url: str
) -> None:
    _, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created",))
    try:
        mail.send(paid_invoice("sub_before"), "r1")  # before mail was turned on
        projection = mail.projection()
        assert projection.position() > 0
        mail.send(paid_invoice("sub_after"), "r2")
        mail.project(projection)
        assert [r.job.payload["entitlement"]["seats"] for r in mail.mail_jobs()] == [3]
        [record] = mail.mail_jobs()
        assert mail.projection().position() == projection.position()  # saved: kept
        found = mail.world.read_model.entitlements(order_ref="sub_after")
        assert [str(e.id) for e in found] == [record.job.ordering_key]
    finally:
        mail.close()


# -- what a mail says: the entitlement once its change is complete ---------------


def _day(timestamp: int) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date().isoformat()


def _described(record: Any) -> tuple[str, dt.datetime | None]:
    """(status, period end) of the entitlement a mail job describes."""
    entitlement = record.job.payload["entitlement"]
    end = entitlement["period_end"]
    return entitlement["status"], dt.datetime.fromisoformat(end) if end else None


@pytest.mark.parametrize("batch", [10_000, 1], ids=["one-batch", "event-by-event"])
def test_the_purchase_mail_says_how_long_the_license_is_paid_for(
    smtp: tuple[Inbox, int], database_url: str, batch: int
) -> None:
    """One invoice creates and activates the entitlement (two events): the
    mail describes it as the invoice left it, whether the projection reads
    both events in one batch or each in its own."""
    from tests.test_store import NOW, YEAR

    inbox, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created",))
    try:
        projection = mail.projection()
        mail.send(paid_invoice("sub_paid"), "r1")
        mail.project(projection, batch)
        [record] = mail.mail_jobs()
        assert _described(record) == ("ACTIVE", dt.datetime.fromtimestamp(NOW + YEAR, dt.UTC))
        entitlement = record.job.ordering_key
        assert record.job.message_id == f"{entitlement}/entitlement.created"
        shown = mail.world.read_model.entitlement(entitlement)
        assert shown is not None and shown.period_end == _described(record)[1]

        mail.dispatch(lambda: mail.mail_jobs()[0].status == "succeeded")
        [(_, message)] = inbox.messages
        paid_through = f"Paid through: {_day(NOW + YEAR)}"
        assert paid_through in body(message, "plain") and paid_through in body(message, "html")
    finally:
        mail.close()


def test_a_license_is_mailed_when_it_is_first_paid_and_never_if_it_is_not(
    smtp: tuple[Inbox, int], database_url: str
) -> None:
    """A PENDING entitlement (its first payment failed) gets no "your
    license" mail, nor an "it has ended" one when it is canceled unpaid;
    paid later, it gets the license mail then, with its period end."""
    from tests import stripe_events as se
    from tests.test_store import NOW, YEAR

    _, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created", "entitlement.canceled"))
    try:
        projection = mail.projection()
        mail.send(paid_invoice("sub_late", kind="invoice.payment_failed"), "f1")
        mail.send(paid_invoice("sub_never", kind="invoice.payment_failed"), "f2")
        mail.send(se.subscription_deleted(subscription="sub_never", shape=se.LEGACY), "d2")
        mail.project(projection)
        read_model = mail.world.read_model
        statuses = {e.order_ref: e.status for e in read_model.entitlements()}
        assert statuses == {"sub_late": "PENDING", "sub_never": "CANCELED"}
        assert mail.mail_jobs() == []

        mail.send(paid_invoice("sub_late"), "p1")
        mail.project(projection)
        [record] = mail.mail_jobs()
        assert record.job.type == "entitlement.created"
        assert _described(record) == ("ACTIVE", dt.datetime.fromtimestamp(NOW + YEAR, dt.UTC))
        [late] = read_model.entitlements(order_ref="sub_late")
        assert record.job.message_id == f"{late.id}/entitlement.created"
    finally:
        mail.close()


def test_a_license_that_lapsed_before_it_was_ever_active_is_mailed_when_it_is_paid(
    smtp: tuple[Inbox, int], database_url: str
) -> None:
    """An invoice for a period already over (a backfill, a late delivery)
    creates the entitlement EXPIRED: no mail. Paid again, it is ACTIVE for
    the first time, and its buyer gets the license mail then, once: not
    again when it lapses and comes back (shared cases 05, 06, 10)."""
    from tests.test_store import NOW, YEAR

    inbox, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created",))
    try:
        projection = mail.projection()
        mail.send(paid_invoice("sub_back", period=-2), "p0")
        mail.project(projection)
        [view] = mail.world.read_model.entitlements(order_ref="sub_back")
        assert view.status == "EXPIRED"
        assert mail.mail_jobs() == []

        mail.send(paid_invoice("sub_back"), "p1")
        mail.project(projection)
        [record] = mail.mail_jobs()
        assert record.job.message_id == f"{view.id}/entitlement.created"
        assert _described(record) == ("ACTIVE", dt.datetime.fromtimestamp(NOW + YEAR, dt.UTC))

        # It lapses (its year runs out unpaid) and is paid again: the
        # license mail is not sent twice.
        mail.world.settle(dt.datetime.fromtimestamp(NOW + YEAR + 60 * 86400, dt.UTC))
        [lapsed] = mail.world.read_model.entitlements(order_ref="sub_back")
        assert lapsed.status == "EXPIRED"
        mail.send(paid_invoice("sub_back", period=1), "p2")
        mail.project(projection)
        [again] = mail.world.read_model.entitlements(order_ref="sub_back")
        events = [event_type(e) for e in mail.world.store.history(UUID(str(view.id)))]
        assert again.status == "ACTIVE" and events.count("entitlement.reinstated") == 2, events
        assert [r.job.type for r in mail.mail_jobs()] == ["entitlement.created"]
        mail.dispatch(lambda: mail.mail_jobs()[0].status == "succeeded")
        assert [m["Subject"] for _, m in inbox.messages] == ["Your acme activation code"]
    finally:
        mail.close()


@pytest.mark.parametrize("status", ["active", "trialing"])
def test_a_subscription_seen_before_its_invoice_is_mailed_when_the_address_arrives(
    smtp: tuple[Inbox, int], database_url: str, status: str
) -> None:
    """Stripe usually says `customer.subscription.created` (no e-mail
    address) before `invoice.paid`. Active, it vouches for nothing: the
    entitlement waits PENDING. Trialing, it is ACTIVE (in trial) before
    anyone can be mailed. Either way the license mail goes out when the
    invoice brings the address, and says what the period is."""
    from tests import stripe_events as se
    from tests.test_store import NOW, YEAR

    inbox, port = smtp
    mail = MailWorld(database_url, port, ("entitlement.created",))
    try:
        projection = mail.projection()
        trial = status == "trialing"
        created = se.subscription_event(
            "customer.subscription.created",
            subscription="sub_first",
            items=[{"price": "p", "sku": "better_annual"}],
            status=status,
            start=NOW,
            end=NOW + YEAR,
            trial_end=NOW + YEAR if trial else None,
            shape=se.LEGACY,
        )
        mail.send(created, "s1")
        mail.project(projection)
        [view] = mail.world.read_model.entitlements(order_ref="sub_first")
        assert view.customer.email is None
        assert (view.status, view.trial) == (("ACTIVE", True) if trial else ("PENDING", False))
        assert mail.mail_jobs() == []

        mail.send(paid_invoice("sub_first"), "p1")
        mail.project(projection)
        [record] = mail.mail_jobs()
        assert record.job.message_id == f"{view.id}/entitlement.created"
        assert _described(record) == ("ACTIVE", dt.datetime.fromtimestamp(NOW + YEAR, dt.UTC))
        assert record.job.payload["entitlement"]["trial"] is trial

        mail.dispatch(lambda: mail.mail_jobs()[0].status == "succeeded")
        [(envelope, message)] = inbox.messages
        assert envelope.rcpt_tos == ["ada@example.com"]
        through = "Free trial through" if trial else "Paid through"
        line = f"{through}: {_day(NOW + YEAR)}"
        assert line in body(message, "plain") and line in body(message, "html")
    finally:
        mail.close()


def test_a_late_or_resent_mail_shows_the_codes_active_now_under_a_new_message_id(
    tmp_path: Path,
) -> None:
    """Code 0 was revoked and code 1 issued after the job was made: the mail
    shows code 1 only. A deliberate resend gets its own Message-ID."""
    asked: list[UUID] = []

    def current(entitlement_id: UUID) -> list[int] | None:
        asked.append(entitlement_id)
        return [1]

    mailer = Mailer(EmailSettings(outbox_dir=tmp_path), CODES, current_codes=current)
    first = job(indexes=(0,))
    assert send(mailer, first).ok
    text = next(tmp_path.glob("*.eml")).read_text()
    assert CODES.code(ENTITLEMENT, 1) in text and CODES.code(ENTITLEMENT, 0) not in text
    assert asked == [ENTITLEMENT]
    again = dataclasses.replace(first, retry_base=1)
    assert mailer.message(first)["Message-ID"] != mailer.message(again)["Message-ID"]
    # An entitlement the read model does not know yet: the job's own codes.
    unknown = Mailer(EmailSettings(outbox_dir=tmp_path), CODES, current_codes=lambda _: None)
    assert CODES.code(ENTITLEMENT, 0) in body(unknown.message(first, None), "plain")
