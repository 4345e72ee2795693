"""Measurement helpers shared by ``dynattn demo``, ``dynattn bench`` and ``benchmarks/``.

Method
------
* **Warm-up, then repeats.** Every measured callable runs ``warmup`` times
  untimed, then ``repeats`` times; :class:`Timing` reports the median and the
  min-max range.
* **Interleaving.** :func:`interleaved` runs one sample of every contender per
  round, rotating the order each round, so a slow phase of a noisy machine
  hits all of them alike and the *ratios* stay meaningful even when absolute
  times drift.
* **The BLAS-3 bound.** :func:`gemm_rate` measures the machine's GEMM rate
  once per run; :func:`blas3_bound` turns it into the rebuild's lower bound on
  the amortized update time, ``2 * n * e`` flops per pending column.
* **Machine record.** :func:`machine_info` records the CPU model, core count,
  numpy version and BLAS so reference results say where they came from.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynattn import kernels

#: A sample function: runs the work and returns its duration in seconds
#: (``None`` means "time the whole call").
Sample = Callable[[], "float | None"]


@dataclass
class Timing:
    """Repeated measurements of one quantity, in seconds.

    Attributes
    ----------
    samples : list of float
        One value per repeat (already divided by the work count, e.g. per update).
    """

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median sample (``nan`` when empty)."""
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        """Fastest sample."""
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        """Slowest sample."""
        return max(self.samples) if self.samples else float("nan")

    def as_dict(self, prefix: str) -> dict[str, Any]:
        """``{prefix: median, prefix_min, prefix_max, prefix_samples}`` for JSON records."""
        return {
            prefix: self.median,
            f"{prefix}_min": self.min,
            f"{prefix}_max": self.max,
            f"{prefix}_samples": list(self.samples),
        }


def time_call(fn: Sample) -> float:
    """Run ``fn`` once; return its own duration if it reports one, else the wall time."""
    start = time.perf_counter()
    reported = fn()
    elapsed = time.perf_counter() - start
    return float(reported) if reported is not None else elapsed


def measure(fn: Sample, *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Warm up ``warmup`` times, then collect ``repeats`` samples of ``fn``.

    Parameters
    ----------
    fn : callable
        Returns the duration in seconds, or ``None`` to be timed as a whole.
    repeats, warmup : int

    Returns
    -------
    Timing
    """
    for _ in range(warmup):
        fn()
    return Timing([time_call(fn) for _ in range(max(1, repeats))])


def interleaved(
    fns: Mapping[str, Sample],
    *,
    repeats: int = 5,
    warmup: int = 1,
    on_sample: Callable[[str, int], None] | None = None,
) -> dict[str, Timing]:
    """Measure several contenders round-robin, rotating the order every round.

    Parameters
    ----------
    fns : mapping name -> sample function
    repeats : int
        Timed rounds; each round takes one sample of every contender.
    warmup : int
        Untimed rounds first.
    on_sample : callable(name, round), optional
        Called after every timed sample (progress reporting).

    Returns
    -------
    dict name -> Timing
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Timing() for name in names}
    for r in range(max(1, repeats)):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            out[name].samples.append(time_call(fns[name]))
            if on_sample is not None:
                on_sample(name, r)
    return out


class GemmProbe:
    """One square GEMM, usable as a sample in :func:`interleaved`.

    Measuring the GEMM rate inside the same rounds as the contenders means the
    BLAS-3 bound sees the same machine load as the times it is compared with.

    Parameters
    ----------
    dtype : float32 or float64
    size : int
        Side of the square matrices (``2 * size**3`` flops per product).
    """

    def __init__(self, dtype: Any = np.float64, size: int = 1024):
        rng = np.random.default_rng(0)
        self.size = int(size)
        self.a = rng.standard_normal((size, size)).astype(dtype)
        self.b = rng.standard_normal((size, size)).astype(dtype)
        self.out = np.empty((size, size), dtype=dtype)

    @property
    def flops(self) -> float:
        """Flops of one product."""
        return 2.0 * self.size**3

    def sample(self) -> None:
        """Run one product (timed as a whole by :func:`time_call`)."""
        np.matmul(self.a, self.b, out=self.out)

    def rate(self, timing: Timing) -> float:
        """flop/s from a :class:`Timing` of :meth:`sample` (median)."""
        return self.flops / timing.median


def gemm_rate(dtype: Any = np.float64, size: int = 1024, repeats: int = 5) -> float:
    """The machine's GEMM rate in flop/s: median over ``repeats`` square products.

    Parameters
    ----------
    dtype : float32 or float64
    size : int
        Side of the square matrices (``2 * size**3`` flops per product).
    repeats : int

    Returns
    -------
    float
        flop/s (median sample).
    """
    probe = GemmProbe(dtype, size)
    return probe.rate(measure(probe.sample, repeats=repeats, warmup=1))


def blas3_bound(n: int, e: int, rate: float) -> float:
    """Lower bound on the amortized update time: ``2 * n * e`` flops at ``rate`` flop/s.

    One pending column costs one rank-1 slice of the rebuild's ``(n x T)(T x e)``
    product, so no lazy scheme that folds columns with BLAS-3 can amortize
    below this.
    """
    return 2.0 * n * e / rate


class LoadMonitor:
    """How busy the machine was with *other* processes during a measurement.

    Compares the CPU time all processes used (``/proc/stat``) with this
    process's own (``os.times``), over the wall time between :meth:`start`
    and :meth:`stop`. Linux only; elsewhere the result is ``None``.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = fh.readline().split()[1:]
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        values = [int(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values[:8]) - idle) / ticks

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> LoadMonitor:
        """Start (or restart) the window; returns self."""
        busy = self._busy_seconds()
        self._start = None if busy is None else (time.monotonic(), busy, self._own_seconds())
        return self

    def stop(self) -> float | None:
        """Average number of cores other processes kept busy since :meth:`start`."""
        busy = self._busy_seconds()
        if self._start is None or busy is None:
            return None
        t0, busy0, own0 = self._start
        wall = time.monotonic() - t0
        if wall <= 0:
            return None
        foreign = (busy - busy0) - (self._own_seconds() - own0)
        return max(0.0, foreign / wall)


def wait_for_quiet(max_load: float, timeout_s: float, window_s: float = 3.0) -> float | None:
    """Wait until other processes keep fewer than ``max_load`` cores busy.

    Samples :class:`LoadMonitor` over windows of ``window_s`` seconds, up to
    ``timeout_s`` seconds in all. Returns the last measured load (``None``
    where the load cannot be measured, which returns at once).
    """
    deadline = time.monotonic() + timeout_s
    load = None
    while True:
        monitor = LoadMonitor().start()
        time.sleep(window_s)
        load = monitor.stop()
        if load is None or load < max_load or time.monotonic() >= deadline:
            return load


def cpu_model() -> str:
    """CPU model string from ``/proc/cpuinfo`` (Linux) or :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def blas_name() -> str:
    """Name and version of numpy's BLAS, as far as numpy reports it."""
    try:
        config = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = config.get("Build Dependencies", {}).get("blas", {})
        name = blas.get("name", "unknown")
        version = blas.get("version", "")
        return f"{name} {version}".strip()
    except Exception:  # pragma: no cover - older numpy
        return "unknown"


def source_version() -> str:
    """``dynattn`` version, plus the git commit (and ``+dirty``) when run from a checkout."""
    import subprocess

    from dynattn import __version__

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--", here],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} ({commit}{'+dirty' if dirty else ''})" if commit else __version__


def git_commit() -> str:
    """The checkout's full commit, with ``+dirty`` when ``src/`` has uncommitted changes
    ("unknown" outside a git checkout): what a benchmark output records."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head, dirty = (
            subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no", "src"])
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty (src/ has uncommitted changes)" if dirty else "")


def target(description: str, value: float, bound: float, kind: str, where: dict[str, Any]) -> dict[str, Any]:
    """A benchmark target record: ``value`` against ``bound`` (``kind`` "min" or "max")."""
    met = value >= bound if kind == "min" else value <= bound
    return {"target": description, "measured": value, "bound": bound, "kind": kind, "met": bool(met), **where}


def targets_summary(targets: Sequence[dict[str, Any]]) -> str:
    """``targets met: k of n`` and one checkbox line per :func:`target` record."""
    met = sum(t["met"] for t in targets)
    summary = f"\ntargets met: {met} of {len(targets)}"
    for t in targets:
        where = ", ".join(
            f"{k}={v}" for k, v in t.items() if k not in ("target", "measured", "bound", "kind", "met")
        )
        summary += f"\n  [{'x' if t['met'] else ' '}] {t['target']}: {t['measured']:.3g} ({where})"
    return summary


def add_output_options(parser: Any, stem: str, out_dir: Any) -> None:
    """The options of a benchmark that writes ``{stem}.json`` and ``{stem}.txt`` with
    :func:`write_report`: ``--out-dir`` (a ``Path``, default ``out_dir``) and ``--no-write``."""
    from pathlib import Path

    parser.add_argument("--out-dir", type=Path, default=Path(out_dir), help=f"where {stem}.* go")
    parser.add_argument("--no-write", action="store_true", help="print only")


def write_report(result: dict[str, Any], out_dir: Any, stem: str) -> None:
    """Write a benchmark's ``result`` as ``{stem}.json`` (all but its text) and its
    ``result["text"]`` as ``{stem}.txt`` in the folder ``out_dir`` (a ``Path``; created)."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "text"}, indent=1)
    )
    (out_dir / f"{stem}.txt").write_text(result["text"])


def machine_info(rates: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Where a measurement came from: CPU, cores, numpy/BLAS, Python, GEMM rates.

    Parameters
    ----------
    rates : mapping dtype name -> flop/s, optional
        Measured GEMM rates to record.
    """
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "numpy": np.__version__,
        "blas": blas_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dynattn": source_version(),
        "kernels": kernels.active(),
    }
    if rates:
        info["gemm_gflops"] = {k: v / 1e9 for k, v in rates.items()}
    return info


def report_header(command: str, info: Mapping[str, Any]) -> list[str]:
    """The first lines of a benchmark's text report: the command, the git commit, and the
    machine (``info`` from :func:`machine_info`)."""
    return [
        f"# {command}",
        f"# commit {git_commit()}",
        f"# {info['cpu_model']}, {info['cores']} cores, numpy {info['numpy']} ({info['blas']}), "
        f"kernels {info.get('kernels', 'numpy')}",
    ]


def fmt_seconds(seconds: float | None) -> str:
    """Human-readable duration: ``"12.3 us"``, ``"4.56 ms"``, ``"1.23 s"``."""
    if seconds is None or not np.isfinite(seconds):
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float | None) -> str:
    """``"12.3x"`` (``"-"`` when missing)."""
    if ratio is None or not np.isfinite(ratio):
        return "-"
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left-aligned, others right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)
