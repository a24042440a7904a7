"""The mail channel: sends a buyer one templated mail per job, by SMTP
(`aiosmtplib`) or, with no SMTP host configured, as an `.eml` file.

A job's payload (built by `payload`, JSON-able, never holding a code):

    {
      "to": "buyer@example.com",             # the recipient
      "template": "entitlement.created",     # which configured template
      "entitlement": {
        "id": "<uuid>", "product": str, "offering": str (the SKU),
        "seats": int, "status": str, "reason": str | null,
        "period_end": "<ISO 8601>" | null,
        "trial": bool                        # the period is a free trial
      },
      "code_indexes": [0, ...]               # which activation codes to show
    }

The codes are derived when the mail is sent (`CodeBook.code(id, index)`),
so the outbox holds nothing a reader could activate with. The mail's
`Message-ID` is derived from the job id, so a mail sent twice (a crash
between the server's 250 and its record) is recognisably the same mail.

Outcomes (never an exception for the server's fault):
- 250 → ok;
- a recipient refused with 5xx, or the message refused after DATA with 5xx
  → permanent (retrying sends the same mail to the same refusal);
- anything else (4xx, a refused sender or login, which a fixed
  configuration cures, no STARTTLS, connection errors, timeouts) → retry;
- a payload or template that cannot make a mail → permanent.

A refusal's status code is the server's reply code, and its error names
the step, the code and the server's text (its first 200 characters), e.g.
"the recipient was refused: SMTP 451 4.7.1 greylisted", so a 451 and a
550 read differently in the attempt log. The configured password is
removed from anything recorded, as typed or as AUTH sent it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import Policy, compat32
from email.utils import make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import aiosmtplib
import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.codes import CodeBook
from services.config import MAIL_POLICY, EmailSettings, address_header
from services.mail_templates import MailTemplateError, context, render
from services.outbound.outbox import Job, Outcome

if TYPE_CHECKING:
    from contracts.api import EntitlementView

log = logging.getLogger("entitle.mail")

KIND = "mail"
CHANNEL = "mail"
_ANSWER_LIMIT = 1024
#: How much of the server's text a failed attempt's error keeps.
_TEXT_LIMIT = 200
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class _Entitlement(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    product: str
    offering: str
    seats: int
    status: str
    reason: str | None = None
    period_end: datetime | None = None
    trial: bool = False  # not in jobs written before it was


class _Payload(BaseModel):
    # Jobs outlive the code that wrote them: ignore what a newer version adds.
    model_config = ConfigDict(extra="ignore", frozen=True)

    to: str
    template: str
    entitlement: _Entitlement
    code_indexes: list[Annotated[int, Field(ge=0, lt=2**32)]]  # as CodeBook takes them


def payload(to: str, template: str, entitlement: EntitlementView) -> dict[str, Any]:
    """A mail job's payload (shape in the module docstring) for `entitlement`
    as it is after the event that causes the mail."""
    return {
        "to": to,
        "template": template,
        "entitlement": {
            "id": str(entitlement.id),
            "product": entitlement.product,
            "offering": entitlement.offering,
            "seats": entitlement.seats,
            "status": entitlement.status,
            "reason": entitlement.status_reason,
            "period_end": entitlement.period_end.isoformat() if entitlement.period_end else None,
            "trial": entitlement.trial,
        },
        "code_indexes": [code.index for code in entitlement.activation_codes],
    }


#: Where `entitle dev` writes mails when no SMTP host is configured.
DEV_OUTBOX = Path(".entitle") / "outbox"


def mail_settings(email: EmailSettings | None, dev: bool) -> EmailSettings | None:
    """The mail settings a process uses: the file's (None: no mail), but in
    `entitle dev` always some, and without an SMTP host or outbox_dir, .eml
    files under `DEV_OUTBOX`."""
    if email is None and not dev:
        return None
    email = email or EmailSettings()
    if dev and email.host is None and email.outbox_dir is None:
        email = replace(email, outbox_dir=DEV_OUTBOX)
    return email


class Mailer:
    """The `Sender` of kind "mail" (services.outbound.outbox.Sender)."""

    kind = KIND

    def __init__(
        self,
        settings: EmailSettings,
        codes: CodeBook,
        tls_context: ssl.SSLContext | None = None,
        current_codes: Callable[[UUID], list[int] | None] | None = None,
    ) -> None:
        """`tls_context`: whom to trust for starttls/tls (default: the
        system's roots, with host names checked). `current_codes`: the
        entitlement's active code indexes now (the read model), so a mail
        sent late or again never shows a code revoked meanwhile; None
        where the entitlement is not known (the job's own are shown)."""
        self.settings = settings
        self._codes = codes
        self._current_codes = current_codes
        self._tls = tls_context
        # The dispatcher runs many sends at once; mail servers limit connections.
        self._connections = asyncio.Semaphore(settings.max_connections)
        if settings.host is None and settings.outbox_dir is None:
            raise ValueError("mail needs an SMTP host or an outbox directory")
        # Parsed once: see _headed.
        self._from = MAIL_POLICY.header_factory("From", settings.from_address)
        # RFC 3834: no out-of-office answers to a machine's mail.
        self._auto_submitted = MAIL_POLICY.header_factory("Auto-Submitted", "auto-generated")

    @property
    def outbox_dir(self) -> Path | None:
        """Where mails are written as files (no SMTP host), else None."""
        return self.settings.outbox_dir if self.settings.host is None else None

    async def send(self, job: Job) -> Outcome:
        indexes = None
        entitlement_id = job.payload.get("entitlement", {}).get("id")
        if self._current_codes is not None and isinstance(entitlement_id, str):
            with contextlib.suppress(ValueError):
                indexes = await anyio.to_thread.run_sync(self._current_codes, UUID(entitlement_id))
        try:
            message = self.message(job, indexes)
        except _Unsendable as exc:
            return Outcome(ok=False, error=str(exc), permanent=True)
        return await self.send_now(message, job.id)

    def message(self, job: Job, code_indexes: list[int] | None = None) -> EmailMessage:
        """The mail `job` stands for, codes included (`code_indexes`, else
        the job's); _Unsendable if its payload or template cannot make one."""
        try:
            data = _Payload.model_validate(job.payload)
        except ValidationError as exc:
            raise _Unsendable(f"not a mail payload: {exc.error_count()} problem(s)") from None
        template = self.settings.templates.get(data.template)
        if template is None:
            raise _Unsendable(f"no template for {data.template!r} is configured")
        to, _ = address_header(data.to)
        if to is None:
            # Not shown: the buyer's address is theirs, and the log is ours.
            raise _Unsendable("the recipient's address is unusable")
        entitlement = data.entitlement
        variables = context(
            to=data.to,
            entitlement_id=str(entitlement.id),
            product=entitlement.product,
            offering=entitlement.offering,
            seats=entitlement.seats,
            status=entitlement.status,
            reason=entitlement.reason,
            period_end=entitlement.period_end,
            trial=entitlement.trial,
            codes=[
                self._codes.code(entitlement.id, i)
                for i in (data.code_indexes if code_indexes is None else code_indexes)
            ],
            portal_url=self.settings.portal_url,
        )
        try:
            rendered = render(template, variables)
        except MailTemplateError as exc:
            raise _Unsendable(f"template {data.template}: {exc}") from None
        # The same mail sent twice (a crash before its 250 was saved) has the
        # same id; a deliberate resend a new one, or receivers may drop it.
        resent = f".{job.retry_base}" if job.retry_base else ""
        message = self._headed(rendered.subject, to, f"<{job.id}{resent}@{self._domain()}>")
        message.set_content(rendered.text)
        message.add_alternative(rendered.html, subtype="html")
        return message

    def _headed(self, subject: str, to: AddressHeader, message_id: str) -> EmailMessage:
        """A new mail with the headers every mail has.

        Mails were 62 % of the projector's CPU in `entitle dev` under load
        (py-spy), most of it the email package parsing headers. So the
        headers that never change are parsed once, in __init__, the
        recipient's once (`address_header` checks it), each header class
        is made once (config.MAIL_POLICY), and the mail is built in the
        policy it is written with. Building and writing a license mail:
        1.85 / 2.46 / 2.87 ms before, 1.11 / 1.49 / 1.70 ms after (9 runs
        alternated, min / median / max). The bytes are the same, but for a
        part the package encodes in base64 (a line over 78 characters):
        its text now has CRLF line ends (RFC 2045's canonical form)."""
        message = EmailMessage(policy=MAIL_POLICY)
        message["Subject"] = subject
        message["From"] = self._from
        message["To"] = to
        message["Date"] = datetime.now(UTC)
        message["Message-ID"] = message_id
        message["Auto-Submitted"] = self._auto_submitted
        return message

    def _domain(self) -> str:
        _, _, domain = self.settings.from_address.rstrip(">").rpartition("@")
        return domain or "entitle.invalid"

    async def _smtp(self, message: EmailMessage) -> Outcome:
        settings = self.settings
        try:
            async with self._connections:
                _, answer = await aiosmtplib.send(
                    message,
                    hostname=settings.host,
                    port=settings.port,
                    username=settings.user,
                    password=settings.password.get_secret_value() if settings.password else None,
                    timeout=settings.timeout_seconds,
                    use_tls=settings.security == "tls",
                    # True: refuse to go on in the clear if the server cannot upgrade.
                    start_tls=settings.security == "starttls",
                    tls_context=self._tls,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # A mail goes to one recipient: the refused one is that.
            if not exc.recipients:
                return Outcome(ok=False, error="the recipient was refused")
            return self._refused(exc.recipients[0])
        except aiosmtplib.SMTPResponseException as exc:
            return self._refused(exc)
        except aiosmtplib.SMTPNotSupported:
            # aiosmtplib raises it only for SMTPUTF8: a non-ASCII address
            # (RFC 6531) this server cannot take; the same mail meets it again.
            return Outcome(
                ok=False,
                error="the server cannot take a non-ASCII address (no SMTPUTF8)",
                permanent=True,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # OSError: refused, unreachable, TLS handshake or certificate.
            return Outcome(ok=False, error=self._scrub(_what(exc)))
        return Outcome(ok=True, status_code=250, answer=self._scrub(answer)[:_ANSWER_LIMIT])

    def _refused(self, exc: aiosmtplib.SMTPResponseException) -> Outcome:
        """The outcome of a reply that refused a step: its code as the
        status code, and in the error which step, the code and the
        server's text (the first `_TEXT_LIMIT` characters)."""
        text = self._scrub(" ".join(exc.message.split()))
        # The recipient or the message refused for good: the same mail gets
        # the same refusal. Anything else (a sender or login refused) a
        # fixed configuration cures, and a 4xx is for now.
        permanent = isinstance(exc, _FINAL) and 500 <= exc.code < 600
        return Outcome(
            ok=False,
            status_code=exc.code,
            answer=text[:_ANSWER_LIMIT],
            error=f"{_step(exc)}: SMTP {exc.code} {text[:_TEXT_LIMIT]}".rstrip(),
            permanent=permanent,
        )

    def _scrub(self, text: str) -> str:
        """`text` without the password, as typed or as AUTH sent it
        (base64, alone or in PLAIN's user-and-password)."""
        settings = self.settings
        if settings.password is None:
            return text
        password = settings.password.get_secret_value()
        if not password:
            return text
        forms = {password, _b64(password)}
        if settings.user is not None:
            forms.add(_b64(f"\0{settings.user}\0{password}"))
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "***")
        return text

    async def send_now(self, message: EmailMessage, name: str) -> Outcome:
        """Send a mail by SMTP, or as `<name>.eml` in the outbox directory,
        once it is checked to be written whole (`_written`): a job's (`send`)
        or one that is not an outbox job (a portal sign-in link: it is worth
        nothing later, so it is not retried)."""
        try:
            data = _written(message, smtp=self.settings.host is not None)
        except _Unsendable as exc:
            return Outcome(ok=False, error=str(exc), permanent=True)
        if self.settings.host is None:
            return await self._write_file(name, data)
        return await self._smtp(message)

    def new_message(self, to: str, subject: str, text: str, html: str) -> EmailMessage:
        """A mail from the configured sender, with the headers every mail
        has; ValueError if `to` is not one usable address (`address_header`)."""
        header, _ = address_header(to)
        if header is None:
            raise ValueError("the recipient's address is unusable")
        message = self._headed(subject, header, make_msgid(domain=self._domain()))
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        return message

    async def _write_file(self, name: str, data: bytes) -> Outcome:
        folder = self.settings.outbox_dir
        assert folder is not None  # checked in __init__
        if not _SAFE_NAME.fullmatch(name):
            return Outcome(ok=False, error="the job id is no file name", permanent=True)
        path = folder / f"{name}.eml"
        try:
            await anyio.to_thread.run_sync(_write_atomically, path, data)
        except OSError as exc:
            return Outcome(ok=False, error=f"cannot write {path}: {exc.strerror or exc}")
        log.info("mail %s written to %s", name, path)
        return Outcome(ok=True, answer=str(path))


#: Refusals that a retry of the same mail meets again, when 5xx.
_FINAL = (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError)
_STEPS: tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...] = (
    (aiosmtplib.SMTPConnectResponseError, "the server refused the connection"),
    (aiosmtplib.SMTPHeloError, "the server refused EHLO"),
    (aiosmtplib.SMTPAuthenticationError, "the login was refused"),
    (aiosmtplib.SMTPSenderRefused, "the sender was refused"),
    (aiosmtplib.SMTPRecipientRefused, "the recipient was refused"),
    (aiosmtplib.SMTPDataError, "the message was refused"),
)


def _step(exc: aiosmtplib.SMTPResponseException) -> str:
    """Which step of sending the server refused."""
    return next((step for kind, step in _STEPS if isinstance(exc, kind)), "the server refused")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class _Unsendable(Exception):
    """A job no retry can turn into a mail; the message says why (no code, no address)."""


def _what(exc: BaseException) -> str:
    """What went wrong, for the attempt log, when the server gave no reply
    code (a lost connection, a timeout, no STARTTLS): the exception's own
    words (the caller removes the password, should they hold it)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:_ANSWER_LIMIT]


def _written(message: EmailMessage, smtp: bool = False) -> bytes:
    """`message` as written to a file (SMTPUTF8), checked that its header
    block reads back as the headers set: _Unsendable where it does not, or
    where the email package cannot write it at all. CPython's folding of
    some crafted display names (encoded words, parentheses, non-ASCII) can
    start a continuation line without white space, which ends the header
    block early (To without its domain, the rest read as body), or raise
    IndexError; such a mail is refused for good instead of retried.
    `smtp`: also as aiosmtplib writes it for a server without SMTPUTF8
    (non-ASCII as RFC 2047 encoded words, where the folding goes wrong
    differently), which it does itself when it sends."""
    data = _checked(message, MAIL_POLICY)
    if smtp:
        _checked(message, _ASCII_POLICY)
    return data


#: As aiosmtplib writes a mail for a server without SMTPUTF8 (its
#: `flatten_message`), with this module's header classes.
_ASCII_POLICY = MAIL_POLICY.clone(utf8=False)


def _checked(message: EmailMessage, policy: Policy) -> bytes:
    try:
        data = message.as_bytes(policy=policy)
    except Exception as exc:  # the email package's IndexError, ValueError, ...
        raise _Unsendable(f"the mail cannot be written: {type(exc).__name__}") from None
    read = BytesHeaderParser(policy=compat32).parsebytes(data)
    if read.defects or [k.lower() for k in read] != [k.lower() for k in message]:
        raise _Unsendable("the mail's headers cannot be written whole (an address folded badly)")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all; readable by its owner only
    (the mail holds activation codes)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
