"""Mail templates: the shipped ones (the files beside this module) and how
any template, shipped or from the configuration, is checked and rendered.

A template is three jinja2 sources: the subject, the plain-text body and
the HTML body. The HTML body is autoescaped; all three run sandboxed and
with `StrictUndefined`, so a misspelt variable is an error, found when the
configuration is loaded (`check`), not when a buyer should get a mail.

Every template sees these variables (`context` builds them):

- `product`, `offering` (the offering's SKU): str
- `seats`: int
- `status`: "PENDING", "ACTIVE", "SUSPENDED", "CANCELED" or "EXPIRED"
- `reason`: why the status is not ACTIVE/PENDING (e.g. "refunded"), or None
- `period_end`: paid through, an aware UTC datetime, or None
- `period_end_date`: the same as "YYYY-MM-DD", or None
- `trial`: bool, whether that period is a free trial (not paid for)
- `codes`: the activation codes, list[str] (may be empty)
- `code`: the first of them, or None
- `portal_url`: the configured portal address, or None
- `entitlement_id`: str (a UUID)
- `to`: the recipient's address
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache, partial
from importlib import resources
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

#: The event types a mail can be sent for, and the one on by default.
TEMPLATE_TYPES = (
    "entitlement.created",
    "entitlement.overdue",
    "entitlement.suspended",
    "entitlement.canceled",
)
DEFAULT_ON = ("entitlement.created",)


class MailTemplateError(ValueError):
    """A template that does not compile or render; the message says which part and why."""


@dataclass(frozen=True)
class MailTemplate:
    """jinja2 sources of one mail."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Rendered:
    subject: str  # one line
    text: str
    html: str


def shipped(event_type: str) -> MailTemplate:
    """The template shipped for `event_type` (one of TEMPLATE_TYPES); KeyError otherwise."""
    if event_type not in TEMPLATE_TYPES:
        raise KeyError(event_type)
    folder = resources.files(__name__)
    return MailTemplate(
        subject=(folder / f"{event_type}.subject.txt").read_text("utf-8"),
        text=(folder / f"{event_type}.txt").read_text("utf-8"),
        html=(folder / f"{event_type}.html").read_text("utf-8"),
    )


def _environment(html: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


_TEXT = _environment(html=False)
_HTML = _environment(html=True)


@lru_cache(maxsize=64)
def _compiled(source: str, html: bool) -> Template:
    return (_HTML if html else _TEXT).from_string(source)


def context(
    *,
    to: str,
    entitlement_id: str,
    product: str,
    offering: str,
    seats: int,
    status: str,
    reason: str | None,
    period_end: datetime | None,
    codes: Sequence[str],
    portal_url: str | None,
    trial: bool = False,
) -> dict[str, Any]:
    """The variables a template sees (listed in the module's docstring)."""
    end = period_end.astimezone(UTC) if period_end is not None else None
    return {
        "to": to,
        "entitlement_id": entitlement_id,
        "product": product,
        "offering": offering,
        "seats": seats,
        "status": status,
        "reason": reason,
        "period_end": end,
        "period_end_date": end.date().isoformat() if end is not None else None,
        "trial": trial,
        "codes": list(codes),
        "code": codes[0] if codes else None,
        "portal_url": portal_url,
    }


def render(template: MailTemplate, variables: Mapping[str, Any]) -> Rendered:
    """The mail `template` makes of `variables`; MailTemplateError naming
    the part (subject, text, html) that fails."""
    parts = {}
    for part, source, html in (
        ("subject", template.subject, False),
        ("text", template.text, False),
        ("html", template.html, True),
    ):
        try:
            parts[part] = _compiled(source, html).render(variables)
        except TemplateSyntaxError as exc:
            raise MailTemplateError(f"{part}, line {exc.lineno}: {exc.message}") from None
        except Exception as exc:  # TemplateError, or a TypeError of `{{ seats + 'x' }}`
            detail = exc.message if isinstance(exc, TemplateError) else str(exc)
            raise MailTemplateError(f"{part}: {detail or type(exc).__name__}") from None
    # A header is one line, whatever the template's line breaks.
    subject = " ".join(parts["subject"].split())
    if not subject:
        raise MailTemplateError("subject: renders empty")
    return Rendered(subject, parts["text"], parts["html"])


def check(template: MailTemplate, portal_url: str | None) -> None:
    """Render `template` for a sample entitlement, with and without a
    period end (paid for, or a trial) and a reason; MailTemplateError if either fails."""
    sample = partial(
        context,
        to="buyer@example.com",
        entitlement_id="00000000-0000-0000-0000-000000000000",
        product="Sample product",
        offering="sample_annual",
        seats=3,
        status="ACTIVE",
        portal_url=portal_url,
    )
    codes = ["ABCDE-FGHJK-MNPQR-STVWX-YZ012"]
    end = datetime(2030, 1, 31, tzinfo=UTC)
    for trial in (False, True):
        render(template, sample(reason="refunded", period_end=end, codes=codes, trial=trial))
    try:
        render(template, sample(reason=None, period_end=None, codes=[]))
    except MailTemplateError as exc:
        raise MailTemplateError(
            f"{exc} (with no period end, reason or code, which happens: guard with {{% if %}})"
        ) from None
