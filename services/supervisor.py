"""`entitle dev`'s processes: the roles run as separate processes under one
supervisor, so the one-command stack uses more than one core (in one
process the roles share one interpreter lock).

- web: ingress and API (and the console and portal) on the public port; its
  `/readyz` and `/metrics` also speak for the others (`Peers`);
- domain: the fold and the scheduler;
- projector: the read model, public topics and outbound notifications.

Ctrl-C (or SIGTERM) reaches only the supervisor, which stops them in order:
the web process first, so nothing is accepted after it; then the domain
service, which folds everything on the raw topic before it exits (the
embedded broker keeps nothing); then the projector. A process that exits
by itself is started again, with a line saying so; one that exits 3 times
within a minute stops the stack with a line saying which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("entitle.dev")

#: A process that exits this many times within `WINDOW` seconds stops the stack.
RESTARTS, WINDOW = 3, 60.0


def _die_with_parent() -> None:
    """Linux: the child is killed if the supervisor dies, even by SIGKILL,
    so a killed stack leaves no process holding its port."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One role process: `name` (web, domain, projector), its command, and
    the URL that answers once it serves (`health`). `stop_timeout`: seconds
    a clean stop may take (None: as long as it needs); `failed_stop`: what
    an exit status after a stop means, for the line saying so."""

    name: str
    command: list[str]
    env: Mapping[str, str]
    health: str | None = None
    stop_timeout: float | None = 30.0
    failed_stop: Mapping[int, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # Its own process group: Ctrl-C in the terminal reaches the
            # supervisor only, which stops the processes in order.
            start_new_session=True,
        )

    def exited(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def serving(self, timeout: float = 60.0) -> None:
        """Wait until it answers `health` (or exits, or `timeout` passes): a
        process stopped before its signal handlers are in place dies with a
        traceback instead of stopping cleanly (folding what it must)."""
        process = self.process
        deadline = time.monotonic() + timeout
        while self.health and process is not None and process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(self.health, timeout=1):
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def stop(self) -> int | None:
        """A clean stop (SIGINT, once it serves), SIGKILL after
        `stop_timeout`; its exit status (None if it was not running)."""
        process = self.process
        if process is None or process.poll() is not None:
            return None
        self.serving()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            return process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "the %s process did not stop within %.0f s; killing it",
                self.name,
                self.stop_timeout,
            )
            process.kill()
            return process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Supervisor:
    """Runs `children` until Ctrl-C/SIGTERM (exit 0), a child that keeps
    exiting (exit 1), or `broken()` returning a reason (exit 1: the
    embedded broker died). Stops them in the order given."""

    def __init__(
        self, children: Sequence[Child], broken: Callable[[], str | None] = lambda: None
    ) -> None:
        self.children = list(children)
        self.broken = broken
        self.forced = False

    def run(self) -> int:
        for child in self.children:
            child.start()
        try:
            while True:
                reason = self.broken()
                if reason is not None:
                    log.critical("%s", reason)
                    # Nothing can be stored or folded any more: stop at once.
                    for child in self.children:
                        child.kill()
                    return 1
                for child in self.children:
                    code = child.exited()
                    if code is not None and not self._again(child, code):
                        self.stop()
                        return 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            # One Ctrl-C stops it in order; a second, at once.
            signal.signal(signal.SIGINT, self._at_once)
            signal.signal(signal.SIGTERM, self._at_once)
            clean = self.stop()
            return 0 if clean and not self.forced else 1

    def _again(self, child: Child, code: int) -> bool:
        """Start `child` again after it exited with `code`; False when it
        has exited too often to go on."""
        now = time.monotonic()
        child.exits = [t for t in child.exits if now - t < WINDOW] + [now]
        if len(child.exits) >= RESTARTS:
            log.critical(
                "the %s process exited (code %s) %d times within %.0f s; stopping the stack",
                child.name,
                code,
                len(child.exits),
                WINDOW,
            )
            return False
        log.error("the %s process exited (code %s); starting it again", child.name, code)
        child.start()
        return True

    def stop(self) -> bool:
        """Stop the children in order; False if one said it left work undone."""
        clean = True
        for child in self.children:
            code = child.stop()
            if code and code in child.failed_stop:
                log.error("the %s process stopped: %s", child.name, child.failed_stop[code])
                clean = False
        return clean

    def _at_once(self, signum: int, frame: object) -> None:
        log.warning("stopping at once: what is not yet folded or projected waits, or is lost")
        self.forced = True
        for child in self.children:
            # No wait here: a signal handler, maybe inside `Popen.wait` on it.
            if child.process is not None and child.process.poll() is None:
                child.process.kill()


# -- one stack's readiness and metrics, served by the web process -------------


class Peers:
    """The other processes of the stack (name -> base URL), whose `/readyz`
    parts and `/metrics` the web process adds to its own: one address
    answers for the whole stack, as the one-process stack did."""

    # A process's own /readyz takes up to 5 s when its broker or database is
    # slow to answer: not answering for longer means it is stuck.
    def __init__(self, urls: Mapping[str, str], timeout: float = 6.0) -> None:
        self.urls = dict(urls)
        self.timeout = timeout

    async def _get(self, path: str) -> dict[str, tuple[int, str] | None]:
        """(status, body text) of each, or None for one that did not answer;
        asked at once, so one that hangs costs its timeout once, not per peer."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(url: str) -> tuple[int, str] | None:
                try:
                    async with session.get(url + path) as response:
                        return response.status, await response.text()
                except (aiohttp.ClientError, TimeoutError):
                    return None

            answers = await asyncio.gather(*(one(url) for url in self.urls.values()))
        return dict(zip(self.urls, answers, strict=True))

    async def readiness(self) -> tuple[list[str], dict[str, str]]:
        """(roles, parts) of the others; a process that does not answer is
        one part, failing."""
        roles: list[str] = []
        parts: dict[str, str] = {}
        for name, answer in (await self._get("/readyz")).items():
            body: Any = None
            if answer is not None:
                with contextlib.suppress(ValueError):
                    body = json.loads(answer[1])
            if not isinstance(body, dict) or not isinstance(body.get("parts"), dict):
                parts[f"process:{name}"] = "failing: not answering"
                continue
            roles += [r for r in body.get("roles", []) if isinstance(r, str)]
            parts.update({str(k): str(v) for k, v in body["parts"].items()})
        return roles, parts

    async def metrics(self, own: bytes) -> bytes:
        """`own` exposition text (the web process's) with the others' added
        (`merge_metrics`), and `entitle_part_up{part="process:NAME"}`, 0
        while one does not answer (its samples are missing meanwhile)."""
        texts = [("web", own.decode())]
        up = [
            "# HELP entitle_part_up 1 while a part of this process works (as /readyz)",
            "# TYPE entitle_part_up gauge",
        ]
        for name, answer in (await self._get("/metrics")).items():
            answered = answer is not None and answer[0] == 200
            if answer is not None and answered:
                texts.append((name, answer[1]))
            up.append(f'entitle_part_up{{part="process:{name}"}} {float(answered)}')
        texts.append(("web", "\n".join(up) + "\n"))
        return merge_metrics(texts)


def merge_parts(own: Mapping[str, str], theirs: Mapping[str, str]) -> dict[str, str]:
    """Parts of several processes as one: a part two of them have (the
    database, the broker) is ok only if it is ok in both."""
    merged = dict(theirs)
    for name, state in own.items():
        if merged.get(name, "ok") == "ok":
            merged[name] = state
    return merged


def merge_metrics(texts: Sequence[tuple[str, str]]) -> bytes:
    """Prometheus text expositions of the stack's processes ((process name,
    text) each) as one: each family once. The engine's own (`entitle_*`)
    are the stack's: a sample with the same name and labels in several
    processes is summed (counters count for the stack). Every other family
    (the client library's `process_*`, `python_*`) keeps each process's
    samples apart, with a `process` label: a start time or a file limit
    adds up to nothing. `_created` samples are left out."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            summed = values.setdefault(merged.name, {})
            ours = family.name.startswith("entitle_")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = dict(sample.labels) if ours else {**sample.labels, "process": process}
                key = (sample.name, tuple(sorted(labels.items())))
                summed[key] = summed.get(key, 0.0) + sample.value
    for name in [n for n, v in values.items() if not v]:
        del families[name]  # only `_created` samples
    for name, merged in families.items():
        merged.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]

    class Merged:
        def collect(self) -> Any:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def role_command(
    roles: Sequence[str], args: Sequence[str], peers: Mapping[str, str] | None = None
) -> list[str]:
    """The command that runs `roles` in a process of the dev stack."""
    command = [sys.executable, "-m", "services.cli", "serve", *roles, *args, "--dev-stack"]
    for name, url in (peers or {}).items():
        command += ["--peer", f"{name}={url}"]
    return command
