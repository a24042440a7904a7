"""Progress of a long command (replay, verify, redrive, export, publish,
backfill) on stderr: a tqdm bar when stderr is a terminal, nothing
otherwise (each command prints its own summary line at the end)."""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm


class Bar:
    """`Bar("replay")(done, total)` as work goes on, then `end()`; `total`
    may be None when it is not known (a count and a rate, no bar)."""

    def __init__(self, label: str, stream: IO[str] | None = None, unit: str = " events") -> None:
        stream = stream or sys.stderr
        self._bar = tqdm(
            desc=label,
            unit=unit,
            file=stream,
            disable=not stream.isatty(),
            mininterval=0.1,  # at most ten redraws a second
            dynamic_ncols=True,
        )

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None and self._bar.total != total:
            self._bar.total = total
        if done != self._bar.n:
            self._bar.update(done - self._bar.n)

    def end(self) -> None:
        self._bar.close()
