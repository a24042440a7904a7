"""Codes back into Stripe: the sender of the outbox's `stripe` jobs, which
writes a subscription's activation codes into its Stripe metadata
(`activation_codes`, see `services.stripe_api.StripeAPI.write_codes`) for
sources with `write_back_codes: true`.

A job's payload (built by `payload`, by the `stripe-codes` projection) is
the subscription's whole set of codes at one point of the log, as indexes:

    {"source": "stripe-main",            # the source's name in the config
     "subscription": "sub_1Nx…",         # the Stripe subscription id
     "entitlements": [                   # in the order they were created
         {"id": "5f0c…-…", "code_indexes": [0, 2]},   # active codes only
         …]}

Never the codes themselves: they are derived when sent, with
`services.codes.CodeBook.code(entitlement id, index)`. Since every job holds
the whole set, the last one written is right whatever came of earlier ones,
and jobs of one subscription are ordered (one channel `stripe:<source>`,
ordering key the subscription id).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import anyio
import stripe

from services.codes import CodeBook
from services.outbound.outbox import Job, Outcome
from services.stripe_api import StripeAPI, codes_metadata

log = logging.getLogger("entitle.outbound.stripe")

KIND = "stripe"
#: Writes in flight to Stripe per source. Stripe allows 100 requests a
#: second in live mode and 25 in a sandbox (https://docs.stripe.com/rate-limits);
#: a write takes a few hundred ms, so 8 stay under both.
CONCURRENCY = 8
#: Stripe's keys, as they could appear in an answer (it masks most of one).
_KEY = re.compile(r"\b[a-z]{2,4}_(?:test|live)_[A-Za-z0-9*]+")


def channel(source: str) -> str:
    """The outbox channel of one source's write-back."""
    return f"stripe:{source}"


def payload(
    source: str, subscription: str, entitlements: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, Any]:
    """A job's payload: `entitlements` is (entitlement id, active code
    indexes) for every entitlement of the subscription, in order."""
    return {
        "source": source,
        "subscription": subscription,
        "entitlements": [
            {"id": entitlement, "code_indexes": sorted(indexes)}
            for entitlement, indexes in entitlements
        ],
    }


class StripeCodes:
    """Sends `stripe` jobs: one subscription update each, through the
    source's `StripeAPI` (`apis`, by source name), with codes from `codes`."""

    kind = KIND

    def __init__(self, apis: Mapping[str, StripeAPI], codes: CodeBook) -> None:
        self.apis = apis
        self.codes = codes
        self._limits: dict[str, anyio.CapacityLimiter] = {}

    def codes_of(self, job: Job) -> tuple[str, str, list[str]]:
        """(source, subscription id, codes) of a job; KeyError, TypeError,
        ValueError or OverflowError if its payload is not the shape above."""
        body = job.payload
        source, subscription = body["source"], body["subscription"]
        if not isinstance(source, str) or not isinstance(subscription, str) or not subscription:
            raise ValueError("source and subscription must be strings")
        codes = [
            self.codes.code(UUID(entitlement["id"]), int(index))
            for entitlement in body["entitlements"]
            for index in entitlement["code_indexes"]
        ]
        return source, subscription, codes

    async def send(self, job: Job) -> Outcome:
        try:
            source, subscription, codes = self.codes_of(job)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return Outcome(ok=False, permanent=True, error=f"not a stripe job's payload: {exc!r}")
        api = self.apis.get(source)
        if api is None:
            # The source lost its api_key (or write_back_codes) since the job was made.
            return Outcome(
                ok=False,
                permanent=True,
                error=f"source {source!r} has no api_key now: nothing to write to Stripe with",
            )
        limit = self._limits.get(source)
        if limit is None:
            limit = self._limits[source] = anyio.CapacityLimiter(CONCURRENCY)
        try:
            await anyio.to_thread.run_sync(api.write_codes, subscription, codes, limiter=limit)
        except stripe.StripeError as exc:
            return outcome_of(exc, subscription)
        written = len(codes) - len(codes_metadata(codes)[1])
        return Outcome(ok=True, status_code=200, answer=f"{written} codes in {subscription}")


def outcome_of(exc: stripe.StripeError, subscription: str) -> Outcome:
    """A failed write as an `Outcome`: Stripe unreachable, 409 (a lock),
    429 (rate limited) and 5xx are retried, after Stripe's Retry-After if it
    gave one; any other answer (401, 403, 404, 400: a bad key, a key that may
    not write subscriptions, no such subscription, a refused update) is
    permanent, as retrying would get the same. Errors and answers never hold
    the API key (https://docs.stripe.com/error-handling)."""
    status = exc.http_status
    headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
    answer = _KEY.sub("<key>", exc.http_body or "")[:1024]
    # Stripe may say a 4xx is worth retrying (a lock timeout); a 5xx is
    # retried whatever it says, since our next try is a new request.
    retryable = (
        status is None
        or status in (409, 429)
        or status >= 500
        or headers.get("stripe-should-retry") == "true"
    )
    if status is None:
        error = f"Stripe could not be reached: {type(exc).__name__}"
    elif status == 401:
        error = "Stripe refused the source's api_key (401)"
    elif status == 403:
        error = (
            "the source's api_key may not write subscriptions (403);"
            " a restricted key needs Subscriptions: Write"
        )
    elif status == 404:
        error = f"Stripe has no subscription {subscription} (404)"
    else:
        message = _KEY.sub("<key>", exc.user_message or type(exc).__name__)
        error = f"Stripe answered {status}: {message[:300]}"
    return Outcome(
        ok=False,
        status_code=status,
        answer=answer,
        error=error,
        retry_after=_seconds(headers.get("retry-after")),
        permanent=not retryable,
    )


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (Stripe gives none today; an HTTP date is ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None
