"""Strings and times in request bodies and the configuration file: text
without control characters, and times as RFC 3339 strings with an offset
(not a number, which would silently be seconds since 1970)."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

#: Bidirectional embeddings, overrides and isolates: text holding them shows
#: in another order than it is stored (CVE-2021-42574, "Trojan Source").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text_problem(value: str) -> str | None:
    """Why `value` is no text to keep and show (a control character, a NUL
    or a CR among them, half a surrogate pair, or a bidirectional override),
    or None."""
    if value.isprintable():  # the fast answer for almost every string
        return None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        return "must not contain control characters"
    if not _BIDI.isdisjoint(value):
        return "must not contain bidirectional override characters"
    return None


def _text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: Text as people write it: no control characters.
Text = Annotated[str, AfterValidator(_text)]

#: RFC 3339's date-time (section 5.6; a space for the T as its note allows),
#: in ASCII digits: no ISO week or ordinal date, no "," fraction.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def _rfc3339(value: object) -> datetime:
    """An RFC 3339 time with its offset, as a string only (no number of
    seconds, no time without an offset), in UTC."""
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        try:
            text = value.upper().replace("Z", "+00:00")
            whole, dot, rest = text.partition(".")
            if dot:  # Python takes at most 6 digits of a second
                digits = re.match(r"\d+", rest)
                assert digits is not None
                text = f"{whole}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end() :]}"
            return datetime.fromisoformat(text).astimezone(UTC)
        except (ValueError, OverflowError):
            pass
    raise ValueError("must be an RFC 3339 time with an offset, e.g. 2026-11-30T00:00:00Z")


def rfc3339_time(value: str) -> datetime | None:
    """`value` as an RFC 3339 time with its offset, in UTC, or None: the one
    parser of times in bodies, query parameters and command lines."""
    try:
        return _rfc3339(value)
    except ValueError:
        return None


#: An RFC 3339 time with an offset, given as a string.
Moment = Annotated[datetime, BeforeValidator(_rfc3339)]
