"""Run `entitle` as a real subprocess and talk to it over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from services.kafka import free_port

T = TypeVar("T")
ENTITLE = str(Path(sys.executable).with_name("entitle"))


SHARED_CODE_SECRET = "test-code-secret-0123456789"


class Entitle:
    """`entitle <args>` in `cwd`, with its output collected for assertions."""

    def __init__(
        self, args: list[str], cwd: Path, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [ENTITLE, *args, "--port", str(self.port)]
        self.cwd = cwd
        # Split roles need the shared code secret; `entitle dev` keeps its own
        # in .entitle/, and the tests let it.
        shared = {} if args[:1] == ["dev"] else {"ENTITLE_CODE_SECRET": SHARED_CODE_SECRET}
        self.env = {**shared, **os.environ, **(env or {})}
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> Entitle:
        self.output = []
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"entitle exited {self.process.returncode}:\n{self.text}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"entitle did not answer /healthz in {timeout} s:\n{self.text}")

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def text(self) -> str:
        return "".join(self.output)

    def printed(self, pattern: str) -> str:
        match = re.search(pattern, self.text)
        assert match, f"{pattern!r} not in output:\n{self.text}"
        return match.group(1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout)
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Entitle:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()


def eventually(probe: Callable[[], T | None], timeout: float = 10.0, every: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s; last result: {last!r}")
