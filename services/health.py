"""What keeps this process's long-running loops alive, and what `/readyz`
says about them.

Every loop (the fold, each projection, the scheduler, the validation index,
the log listener) runs under `supervise`: an exception is logged once per
attempt and the loop starts again after a capped exponential backoff, so no
error, transient or not, leaves a dead task behind. Each loop reports to a
`Health`, and `/readyz` answers 503 while any part is failing or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from eventsourcing.persistence import InterfaceError, OperationalError

log = logging.getLogger("entitle.health")

# Errors that say "the database or the broker is not answering", after which
# the same work should be tried again later, never skipped.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlite3.OperationalError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def transient(exc: BaseException) -> bool:
    """Whether `exc` means "unavailable, retry" rather than "this input is bad"."""
    if isinstance(exc, KafkaError):
        return not isinstance(exc, MessageSizeTooLargeError)
    return isinstance(exc, _TRANSIENT)


class Backoff:
    """Capped exponential delays: 0.5 s, 1 s, 2 s … up to `cap`."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap = first, cap
        self.attempts = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True)
class Part:
    state: str  # "ok", "starting", "failing" or "stopped"
    detail: str | None = None


class Health:
    """The state of each part of this process, by name."""

    def __init__(self) -> None:
        self._parts: dict[str, Part] = {}

    def _set(self, name: str, state: str, detail: str | None = None) -> None:
        self._parts[name] = Part(state, detail)

    def starting(self, name: str) -> None:
        self._set(name, "starting")

    def ok(self, name: str) -> None:
        self._set(name, "ok")

    def failing(self, name: str, error: BaseException | str) -> None:
        self._set(name, "failing", error if isinstance(error, str) else describe(error))

    def stopped(self, name: str, detail: str) -> None:
        self._set(name, "stopped", detail)

    def parts(self) -> dict[str, Part]:
        return dict(self._parts)

    def ready(self) -> bool:
        return all(part.state == "ok" for part in self._parts.values())


def describe(exc: BaseException) -> str:
    """`ClassName: message`, on one line and short enough for a log or a body."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    health: Health,
    stop: asyncio.Event,
    backoff: Backoff | None = None,
) -> None:
    """Run `run()` until `stop` is set, starting it again after any
    exception (one log line per attempt, capped exponential backoff). `run`
    reports `health.ok(name)` itself once it works; a return while `stop`
    is unset counts as a failure too."""
    backoff = backoff or Backoff()
    health.starting(name)
    while not stop.is_set():
        try:
            await run()
            if stop.is_set():
                break
            raise RuntimeError("the loop returned")
        except asyncio.CancelledError:
            health.stopped(name, "cancelled")
            raise
        except Exception as exc:
            if name in health.parts() and health.parts()[name].state == "ok":
                backoff.reset()  # it worked in between: a new run of failures
            delay = backoff.next()
            health.failing(name, exc)
            log.error(
                "%s failed (%s); starting it again in %.1f s",
                name,
                describe(exc),
                delay,
                exc_info=None if transient(exc) or backoff.attempts > 1 else exc,
            )
            await sleep_unless(stop, delay)
    health.stopped(name, "stopped")
