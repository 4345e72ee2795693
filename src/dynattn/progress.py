"""Progress reporting for ``dynattn bench``, ``dynattn demo`` and ``benchmarks/``.

:func:`make_progress` returns a context manager with one method,
``advance(description, steps=1)``. The kinds (:data:`PROGRESS_KINDS`, the
``--progress`` choices): ``rich`` (a bar on stderr; needs the optional
``rich`` package), ``plain`` (a text line on stderr at most every two
seconds), ``none``, and ``auto`` (``rich`` when importable, else ``plain``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from dynattn._validation import check_choice

#: Accepted ``mode`` values of :func:`make_progress` (the ``--progress`` choices).
PROGRESS_KINDS = ("auto", "rich", "plain", "none")


class _PlainProgress:
    """Text progress on stderr: a line at most every ``interval`` seconds."""

    def __init__(self, total: int, stream: Any = None, interval: float = 2.0):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = -math.inf

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stream.write(f"[{self.done}/{self.total}] done\n")
        self.stream.flush()

    def advance(self, description: str, steps: int = 1) -> None:
        self.done += steps
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.stream.write(f"[{self.done}/{self.total}] {description}\n")
            self.stream.flush()


class _RichProgress:
    """``rich.progress`` bar on stderr."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("starting", total=max(1, total))

    def __enter__(self) -> _RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, description: str, steps: int = 1) -> None:
        self._progress.update(self._task, advance=steps, description=description)


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def advance(self, description: str, steps: int = 1) -> None:
        return None


def make_progress(total: int, mode: str = "auto") -> Any:
    """A progress reporter: ``rich`` if importable (``mode="auto"``), else plain text.

    Parameters
    ----------
    total : int
        Number of steps.
    mode : {"auto", "rich", "plain", "none"}
        One of :data:`PROGRESS_KINDS`.
    """
    check_choice("mode", mode, PROGRESS_KINDS)
    if mode == "none":
        return _NoProgress()
    if mode in ("auto", "rich"):
        try:
            return _RichProgress(total)
        except ImportError:
            if mode == "rich":
                raise
    return _PlainProgress(total)
