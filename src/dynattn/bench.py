"""Benchmarks behind ``dynattn bench`` and ``dynattn demo`` (SPEC section 6).

Two regimes:

``paper``
    ``n = m = d = e`` (the paper's ODAMV), random entry updates
    ``K[i, j] += delta`` (``--update-kind k``, default), ``V[i, j] += delta``
    (``v``) or alternating (``kv``), ``delta ~ N(0, 0.1**2)``.
``llm``
    ``d = e = head_dim`` (64-128), ``n = m`` long; each update is a token edit:
    key row ``c`` and value row ``c`` replaced by fresh rows. Done with
    ``set_key`` / ``set_value`` when the implementation has them, otherwise as
    ``d`` entry updates of K plus ``e`` of V.

Measured per implementation (DynamicAttention for every tau x storage, and the
baselines Recompute, OnDemand, Eager), all interleaved round by round on the
same machine (see :mod:`dynattn._timing`):

``update_s``
    Amortized time per update over whole fold cycles: the structure starts a
    sample freshly folded, runs a multiple (at least 2) of its threshold of
    updates, and the sample ends with a timed ``rebuild()`` of whatever is
    still pending, so every pending column's fold is paid for inside the
    sample (repeated rows make cycles longer than the threshold; the flush
    covers that). When one cycle would take far longer than a sample (large
    tau at large n) a long partial cycle is timed instead, its fold paid by
    the same flush; ``update_cycles`` (updates per sample / threshold) says
    which.
``query_s``
    Time of one ``query(i, j)`` at random ``(i, j)`` with half the threshold
    of rows pending (distinct rows, updated untimed before the sample).
``rebuild_s``
    Time of one ``rebuild()`` with ``threshold - 1`` rows pending.

Before any timing, DynamicAttention and Eager run ``burn_in`` untimed updates
per key row (capped in time, ``burn_in_updates`` records the count): the
structure's safeguards (fresh recomputation of a column whose error bound
grew, exact refresh of drifting rows) start only after several updates per
row, and the steady state includes their cost.

Ratios are ``baseline_time / impl_time`` (above 1: the implementation is
faster). ``update_over_bound`` is ``update_s`` divided by the BLAS-3 bound
``2 * n * e / gemm_rate``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dynattn._timing import (
    GemmProbe,
    LoadMonitor,
    Timing,
    blas3_bound,
    fmt_ratio,
    fmt_seconds,
    format_table,
    gemm_rate,
    interleaved,
    machine_info,
    time_call,
    wait_for_quiet,
)

SCHEMA = "dynattn-bench/1"
BASELINE_ORDER = ("recompute", "ondemand", "eager")
DEFAULT_MIXES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

DEFAULTS = {
    "paper": {"sizes": [256, 512, 1024, 2048], "taus": [0.25, 0.5, 0.75, 1.0]},
    "llm": {"sizes": [2048, 4096, 8192, 16384], "taus": [0.25, 0.5, 0.75]},
}
QUICK = {
    "paper": {"sizes": [128, 256, 512, 1024], "taus": [0.5, 1.0]},
    "llm": {"sizes": [1024, 2048, 4096], "taus": [0.25, 0.5]},
}


@dataclass
class BenchConfig:
    """Settings of one ``dynattn bench`` run (see the module docstring).

    Attributes
    ----------
    regime : {"paper", "llm"}
    sizes : list of int
        ``n`` (= ``m``; = ``d`` = ``e`` in the paper regime).
    taus : list of float
        DynamicAttention laziness exponents.
    dtype : {"float64", "float32"}
    storages : list of str
        DynamicAttention storage modes (``dense``, ``implicit``, ``auto``).
    baselines : list of str
        Names from :data:`dynattn.baselines.BASELINES` to measure.
    repeats, warmup : int
        Timed and untimed interleaved rounds.
    sample_s : float
        Target duration of one update or query sample (sets the work count).
    recompute_updates : int
        At most this many updates per Recompute sample (it is very slow).
    burn_in, burn_in_s : float
        Before timing, DynamicAttention and Eager run ``burn_in * m`` untimed
        updates (at most ``burn_in_s`` seconds): the structure's numerical
        safeguards (fresh recomputation of a column whose error bound grew,
        exact refresh of drifting rows) only start after several updates per
        key row, and the steady state includes them.
    update_kind : {"k", "v", "kv"}
        Paper regime: which entry updates.
    head_dim : int
        LLM regime: ``d = e``.
    scale, delta_std, seed : float, float, int
    memory_budget : int
        Passed to DynamicAttention (``storage="auto"`` uses it).
    quiet_wait_s, quiet_load, noisy_retries : float, float, int
        For shared machines: before each size wait up to ``quiet_wait_s``
        seconds until other processes use fewer than ``quiet_load`` cores, and
        measure a size again (up to ``noisy_retries`` times) when they used
        more than ``3 * quiet_load`` during it, keeping the quietest attempt.
        Every record has ``foreign_load``, the cores other processes used while
        its size was measured.
    """

    regime: str = "paper"
    sizes: list[int] = field(default_factory=lambda: list(DEFAULTS["paper"]["sizes"]))
    taus: list[float] = field(default_factory=lambda: list(DEFAULTS["paper"]["taus"]))
    dtype: str = "float64"
    storages: list[str] = field(default_factory=lambda: ["auto"])
    baselines: list[str] = field(default_factory=lambda: list(BASELINE_ORDER))
    repeats: int = 5
    warmup: int = 1
    sample_s: float = 0.15
    recompute_updates: int = 2
    burn_in: float = 16.0
    burn_in_s: float = 6.0
    update_kind: str = "k"
    head_dim: int = 64
    scale: float = 1.0
    delta_std: float = 0.1
    seed: int = 0
    memory_budget: int = 1 << 30
    quiet_wait_s: float = 0.0
    quiet_load: float = 0.1
    noisy_retries: int = 0

    def dims(self, size: int) -> tuple[int, int, int, int]:
        """``(n, m, d, e)`` for one size."""
        if self.regime == "paper":
            return size, size, size, size
        return size, size, self.head_dim, self.head_dim


# ---------------------------------------------------------------------- progress
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
    """
    if mode == "none":
        return _NoProgress()
    if mode in ("auto", "rich"):
        try:
            return _RichProgress(total)
        except ImportError:
            if mode == "rich":
                raise
    return _PlainProgress(total)


# ---------------------------------------------------------------------- subjects
def _resolve_dtype(name: str) -> np.dtype:
    dt = np.dtype(name)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype: expected float32 or float64, got {name!r}")
    return dt


def make_problem(config: BenchConfig, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ``Q, K, V`` for one size (logits of standard deviation about 1)."""
    from dynattn.testing import random_problem

    n, m, d, e = config.dims(size)
    return random_problem(n, m, d, e, seed=config.seed + size, dtype=_resolve_dtype(config.dtype))


class Subject:
    """One implementation under measurement, with its own workload stream.

    Parameters
    ----------
    name : str
        ``"dynamic"`` or a baseline name.
    obj : object
        The DynamicAttention-like instance.
    config : BenchConfig
    tau, storage : float or None, str or None
        As requested (baselines: None, except Eager's tau 0).
    seed : int
        Seed of the update/query stream (the same for every subject of a size).
    """

    def __init__(
        self,
        name: str,
        obj: Any,
        config: BenchConfig,
        *,
        tau: float | None,
        storage: str | None,
        seed: int,
    ):
        self.name = name
        self.obj = obj
        self.config = config
        self.tau = tau
        self.storage_requested = storage
        self.rng = np.random.default_rng(seed)
        self.n, self.m, self.d, self.e = obj.n, obj.m, obj.d, obj.e
        self.lazy = hasattr(obj, "rebuild") and hasattr(obj, "pending")
        self.threshold = int(getattr(obj, "threshold", 1)) if self.lazy else 1
        self.row_api = hasattr(obj, "set_key")
        self.updates_per_sample = 1
        self.queries_per_sample = 8
        self.extrapolated = False  # Recompute in the llm regime without a row API
        self.burned_in = 0
        self._kind_flip = 0
        # row-update scale: fresh key rows like the originals
        self._key_std = float(np.std(np.asarray(obj.K, dtype=np.float64))) or 1.0

    @property
    def label(self) -> str:
        """Short display name, e.g. ``dynamic t=0.50 dense``."""
        if self.name == "dynamic":
            return f"dynamic t={self.tau:g} {self.storage}"
        return self.name

    @property
    def storage(self) -> str | None:
        """Storage strategy in use (as reported by the object), else as requested."""
        got = getattr(self.obj, "storage", None)
        return got if isinstance(got, str) else self.storage_requested

    # .................................................................. workload
    def _entry_calls_per_update(self) -> int:
        if self.config.regime == "paper" or self.row_api:
            return 1
        return self.d + self.e

    def _apply_updates(self, count: int, rows: np.ndarray | None = None) -> None:
        """Apply ``count`` updates (untimed helper and timed body alike)."""
        obj, rng, cfg = self.obj, self.rng, self.config
        if rows is None:
            rows = rng.integers(0, self.m, count)
        if cfg.regime == "paper":
            cols = rng.integers(0, self.d if cfg.update_kind != "v" else self.e, count)
            deltas = rng.normal(0.0, cfg.delta_std, count)
            kind = cfg.update_kind
            for idx in range(count):
                i, j, delta = int(rows[idx]), int(cols[idx]), float(deltas[idx])
                if kind == "k" or (kind == "kv" and (idx + self._kind_flip) % 2 == 0):
                    obj.update_k(i, j % self.d, delta)
                else:
                    obj.update_v(i, j % self.e, delta)
            self._kind_flip += count
            return
        keys = rng.normal(0.0, self._key_std, (count, self.d))
        values = rng.standard_normal((count, self.e))
        for idx in range(count):
            self._row_edit(int(rows[idx]), keys[idx], values[idx])

    def _row_edit(self, c: int, key: np.ndarray, value: np.ndarray) -> None:
        obj = self.obj
        if self.row_api:
            obj.set_key(c, key)
            if hasattr(obj, "set_value"):
                obj.set_value(c, value)
                return
        else:
            dk = key - np.asarray(obj.K[c], dtype=np.float64)
            for j in range(self.d):
                obj.update_k(c, j, float(dk[j]))
        dv = value - np.asarray(obj.V[c], dtype=np.float64)
        for j in range(self.e):
            obj.update_v(c, j, float(dv[j]))

    def _settle(self) -> None:
        if self.lazy and self.obj.pending:
            self.obj.rebuild()

    def _distinct_rows(self, count: int) -> np.ndarray:
        return self.rng.choice(self.m, size=min(count, self.m), replace=False)

    # .................................................................. samples
    def update_sample(self) -> float:
        """Amortized seconds per update over ``updates_per_sample`` updates plus the final fold."""
        self._settle()
        count = self.updates_per_sample
        if self.extrapolated:
            # Recompute without a row API: time `count` entry calls, scale to a row edit
            rows = self.rng.integers(0, self.m, count)
            cols = self.rng.integers(0, self.d, count)
            start = time.perf_counter()
            for i, j in zip(rows, cols, strict=True):
                self.obj.update_k(int(i), int(j), 0.0)
            elapsed = time.perf_counter() - start
            return elapsed / count * (self.d + self.e)
        rows = self.rng.integers(0, self.m, count)
        start = time.perf_counter()
        self._apply_updates(count, rows)
        if self.lazy and self.obj.pending:
            self.obj.rebuild()
        return (time.perf_counter() - start) / count

    def prepare_query_state(self) -> int:
        """Fold, then leave ``threshold // 2`` distinct rows pending (untimed). Returns pending."""
        if not self.lazy:
            return 0
        self._settle()
        half = self.threshold // 2
        if half:
            self._apply_updates(half, self._distinct_rows(half))
        return int(self.obj.pending)

    def query_sample(self) -> float:
        """Seconds per ``query(i, j)`` with half the threshold pending."""
        self.prepare_query_state()
        count = self.queries_per_sample
        rows = self.rng.integers(0, self.n, count)
        cols = self.rng.integers(0, self.e, count)
        query = self.obj.query
        start = time.perf_counter()
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            query(i, j)
        return (time.perf_counter() - start) / count

    def rebuild_sample(self) -> float:
        """Seconds for one ``rebuild()`` with ``threshold - 1`` rows pending."""
        self._settle()
        fill = self.threshold - 1
        if fill:
            self._apply_updates(fill, self._distinct_rows(fill))
        start = time.perf_counter()
        self.obj.rebuild()
        return time.perf_counter() - start

    # .................................................................. calibration
    def burn_in(self, updates: int, max_s: float) -> int:
        """Run up to ``updates`` untimed updates (at most ``max_s`` seconds); return the count."""
        if not self.lazy or updates <= 0:
            return 0
        done = 0
        chunk = max(1, min(self.threshold, 256))
        deadline = time.perf_counter() + max_s
        while done < updates and time.perf_counter() < deadline:
            step = min(chunk, updates - done)
            self._apply_updates(step)
            done += step
        self._settle()
        self.burned_in = done
        return done

    def calibrate(self, sample_s: float) -> None:
        """Pick work counts so one sample lasts about ``sample_s`` (also warms up)."""
        cfg = self.config
        if self.name == "recompute":
            if cfg.regime == "llm" and not self.row_api:
                self.extrapolated = True
            self.updates_per_sample = 1
            per_update = self.update_sample()
            self.updates_per_sample = max(
                1, min(cfg.recompute_updates, int(sample_s / max(per_update, 1e-9)))
            )
        else:
            T = self.threshold if self.lazy else 1
            self.updates_per_sample = min(T, 64)
            per_update = max(self.update_sample(), 1e-9)
            want = max(1, math.ceil(sample_s / per_update))
            if T > 1 and T * per_update <= 4 * sample_s:
                # whole fold cycles: at least two, about sample_s in all
                want = max(2, math.ceil(want / T)) * T
                while want > 2 * T and want * per_update > 4 * sample_s:
                    want -= T
            elif T > 1:
                # a cycle takes far longer than a sample: time a long partial cycle
                # (its fold is paid by the flush at the end of the sample)
                want = max(want, math.ceil(4 * sample_s / per_update))
            self.updates_per_sample = min(want, 200_000)
        self.queries_per_sample = 4
        per_query = self.query_sample()
        self.queries_per_sample = int(min(20_000, max(4, sample_s / 2 / max(per_query, 1e-9))))

    def stats(self) -> dict[str, Any]:
        """The object's counters, if it keeps any."""
        got = getattr(self.obj, "stats", None)
        return dict(got) if isinstance(got, Mapping) else {}


def build_subjects(config: BenchConfig, size: int) -> list[Subject]:
    """DynamicAttention for every tau x storage, then the requested baselines."""
    from dynattn import DynamicAttention
    from dynattn.baselines import BASELINES

    Q, K, V = make_problem(config, size)
    dtype = _resolve_dtype(config.dtype)
    common = {"scale": config.scale, "dtype": dtype, "memory_budget": config.memory_budget}
    seed = config.seed * 7919 + size
    subjects = []
    for storage in config.storages:
        for tau in config.taus:
            obj = DynamicAttention(Q, K, V, tau=tau, storage=storage, **common)
            subjects.append(Subject("dynamic", obj, config, tau=tau, storage=storage, seed=seed))
    for name in config.baselines:
        if name not in BASELINES:
            raise ValueError(f"baselines: unknown {name!r}; expected some of {', '.join(BASELINES)}")
        obj = BASELINES[name](Q, K, V, **common)
        tau = 0.0 if name == "eager" else None
        subjects.append(Subject(name, obj, config, tau=tau, storage=None, seed=seed))
    return subjects


# ---------------------------------------------------------------------- the run
def measure_size(config: BenchConfig, size: int, rate: float, progress: Any) -> list[dict[str, Any]]:
    """Measure every subject at one size, interleaved; return one record per subject.

    ``rate`` is the GEMM rate measured at the start of the run (recorded as
    ``gemm_gflops_at_start``); the bound uses the rate of a square GEMM timed
    in the same interleaved rounds as the contenders (``gemm_gflops``).
    """
    subjects = build_subjects(config, size)
    n, m, d, e = config.dims(size)
    for s in subjects:
        s.burn_in(int(config.burn_in * m), config.burn_in_s)
        s.calibrate(config.sample_s)
        progress.advance(f"n={size} calibrating {s.label}")
    fns: dict[str, Callable[[], float]] = {}
    for idx, s in enumerate(subjects):
        fns[f"{idx}:update"] = s.update_sample
        fns[f"{idx}:query"] = s.query_sample
        if s.lazy and s.threshold > 1:
            fns[f"{idx}:rebuild"] = s.rebuild_sample

    probe = GemmProbe(_resolve_dtype(config.dtype))
    fns["gemm"] = probe.sample

    def on_sample(name: str, rnd: int) -> None:
        if name == "gemm":
            return
        idx, what = name.split(":")
        progress.advance(f"n={size} round {rnd + 1}/{config.repeats} {subjects[int(idx)].label} {what}")

    timings = interleaved(fns, repeats=config.repeats, warmup=config.warmup, on_sample=on_sample)
    # the bound uses the GEMM rate measured in the same rounds (same machine load)
    start_rate = rate
    rate = probe.rate(timings["gemm"])
    bound = blas3_bound(n, e, rate)
    records = []
    for idx, s in enumerate(subjects):
        upd, qry = timings[f"{idx}:update"], timings[f"{idx}:query"]
        reb = timings.get(f"{idx}:rebuild", Timing())
        rec: dict[str, Any] = {
            "impl": s.name,
            "label": s.label,
            "regime": config.regime,
            "n": n,
            "m": m,
            "d": d,
            "e": e,
            "tau": s.tau,
            "dtype": config.dtype,
            "storage": s.storage,
            "storage_requested": s.storage_requested,
            "threshold": s.threshold if s.lazy else None,
        }
        rec.update(upd.as_dict("update_s"))
        rec.update(qry.as_dict("query_s"))
        if reb.samples:
            rec.update(reb.as_dict("rebuild_s"))
        else:
            rec.update(
                {
                    "rebuild_s": None,
                    "rebuild_s_min": None,
                    "rebuild_s_max": None,
                    "rebuild_s_samples": [],
                }
            )
        rec.update(
            {
                "updates_per_sample": s.updates_per_sample,
                "update_cycles": s.updates_per_sample / s.threshold if s.lazy else None,
                "burn_in_updates": s.burned_in,
                "queries_per_sample": s.queries_per_sample,
                "pending_at_query": s.threshold // 2 if s.lazy else 0,
                "row_api": s.row_api,
                "update_extrapolated": s.extrapolated,
                "bound_s": bound,
                "update_over_bound": upd.median / bound,
                "gemm_gflops": rate / 1e9,
                "gemm_gflops_at_start": start_rate / 1e9,
                "stats": s.stats(),
            }
        )
        records.append(rec)
    add_ratios(records)
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Set ``rec["ratios"][baseline] = {"update": b/x, "query": b/x}`` per size, in place."""
    by_size: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for rec in records:
        if rec["impl"] in BASELINE_ORDER:
            by_size.setdefault((rec["regime"], rec["n"]), {})[rec["impl"]] = rec
    for rec in records:
        ratios = {}
        for name, base in by_size.get((rec["regime"], rec["n"]), {}).items():
            ratios[name] = {
                "update": _ratio(base.get("update_s"), rec.get("update_s")),
                "query": _ratio(base.get("query_s"), rec.get("query_s")),
            }
        rec["ratios"] = ratios


def _ratio(num: float | None, den: float | None) -> float | None:
    if not num or not den:
        return None
    return float(num) / float(den)


def total_steps(config: BenchConfig) -> int:
    """Progress steps of a run (calibrations plus timed samples)."""
    n_dyn = len(config.taus) * len(config.storages)
    lazy = sum(1 for t in config.taus if t > 0) * len(config.storages)
    per_round = 2 * n_dyn + lazy + 2 * len(config.baselines)
    return len(config.sizes) * (n_dyn + len(config.baselines) + config.repeats * per_round)


def run_bench(config: BenchConfig, progress_mode: str = "auto") -> dict[str, Any]:
    """Run a whole sweep; return ``{"schema", "machine", "settings", "records", "fits"}``."""
    from dynattn.theory import fit_records

    dtype = _resolve_dtype(config.dtype)
    rates = {"float64": gemm_rate(np.float64), "float32": gemm_rate(np.float32)}
    rate = rates[dtype.name]
    records: list[dict[str, Any]] = []
    started = time.time()
    attempts = 1 + max(0, config.noisy_retries)
    with make_progress(total_steps(config), progress_mode) as progress:
        for size in config.sizes:
            best: list[dict[str, Any]] | None = None
            for attempt in range(attempts):
                if config.quiet_wait_s > 0:
                    progress.advance(f"n={size} waiting for a quiet machine", 0)
                    wait_for_quiet(config.quiet_load, config.quiet_wait_s)
                monitor = LoadMonitor().start()
                size_start = time.time()
                size_records = measure_size(config, size, rate, progress)
                foreign = monitor.stop()
                for rec in size_records:
                    rec["foreign_load"] = foreign
                    rec["attempt"] = attempt + 1
                    rec["size_elapsed_s"] = time.time() - size_start
                if best is None or (foreign or 0.0) < (best[0]["foreign_load"] or 0.0):
                    best = size_records
                if foreign is None or foreign <= config.quiet_load * 3:
                    break
            records.extend(best or [])
    loads = [r["foreign_load"] for r in records if r.get("foreign_load") is not None]
    machine = machine_info(rates)
    machine["foreign_load_max"] = max(loads) if loads else None
    return {
        "schema": SCHEMA,
        "machine": machine,
        "settings": asdict(config),
        "elapsed_s": time.time() - started,
        "records": records,
        "fits": fit_records(records) if config.regime == "paper" else [],
    }


# ---------------------------------------------------------------------- reporting
def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Per size: every implementation's update, query, rebuild times and ratios."""
    baselines = [b for b in BASELINE_ORDER if any(r["impl"] == b for r in records)]
    headers = ["impl", "n", "d", "T", "update", "(min-max)", "/bound", "query", "rebuild"]
    headers += [f"upd vs {b}" for b in baselines] + [f"qry vs {b}" for b in baselines]
    rows = []
    for rec in sorted(records, key=lambda r: (r["regime"], r["n"], _order(r))):
        ratios = rec.get("ratios", {})
        rows.append(
            [
                rec["label"],
                rec["n"],
                rec["d"],
                rec["threshold"] or "-",
                fmt_seconds(rec["update_s"]),
                f"{fmt_seconds(rec['update_s_min'])}-{fmt_seconds(rec['update_s_max'])}",
                f"{rec['update_over_bound']:.1f}x",
                fmt_seconds(rec["query_s"]),
                fmt_seconds(rec.get("rebuild_s")),
            ]
            + [fmt_ratio(ratios.get(b, {}).get("update")) for b in baselines]
            + [fmt_ratio(ratios.get(b, {}).get("query")) for b in baselines]
        )
    note = (
        "update: amortized per update over whole fold cycles (median of repeats); "
        "/bound: update time over the BLAS-3 bound 2*n*e/GEMM rate; query: one entry with "
        "threshold/2 rows pending; ratios: baseline time / this time (>1 = faster)."
    )
    return format_table(headers, rows) + "\n" + note


def _order(rec: Mapping[str, Any]) -> tuple[int, float, str]:
    if rec["impl"] == "dynamic":
        return (0, rec["tau"], str(rec["storage"]))
    return (1, BASELINE_ORDER.index(rec["impl"]) if rec["impl"] in BASELINE_ORDER else 9, "")


def mix_cost(rec: Mapping[str, Any], mix: float) -> float:
    """Time per update of a workload with ``mix`` queries per update."""
    return float(rec["update_s"]) + mix * float(rec["query_s"])


def policy(records: Sequence[Mapping[str, Any]], mixes: Iterable[float]) -> list[dict[str, Any]]:
    """For each workload mix and size: the best tau and storage, and the best overall.

    Parameters
    ----------
    records : benchmark records
    mixes : queries per update

    Returns
    -------
    list of dict with ``mix``, ``n``, ``best`` (tau, storage, cost per update),
    ``best_overall`` (label), ``runner_up`` and ``speedup`` of the best DynamicAttention
    configuration over the fastest baseline.
    """
    out = []
    sizes = sorted({(r["regime"], r["n"]) for r in records})
    for mix in mixes:
        for regime, n in sizes:
            group = [r for r in records if r["regime"] == regime and r["n"] == n]
            dyn = [r for r in group if r["impl"] == "dynamic"]
            base = [r for r in group if r["impl"] != "dynamic"]
            ranked = sorted(group, key=lambda r: mix_cost(r, mix))
            entry: dict[str, Any] = {
                "mix": mix,
                "regime": regime,
                "n": n,
                "best_overall": ranked[0]["label"],
                "best_overall_cost_s": mix_cost(ranked[0], mix),
            }
            if dyn:
                best = min(dyn, key=lambda r: mix_cost(r, mix))
                entry.update({"tau": best["tau"], "storage": best["storage"], "cost_s": mix_cost(best, mix)})
                if base:
                    fb = min(base, key=lambda r: mix_cost(r, mix))
                    entry["fastest_baseline"] = fb["label"]
                    entry["speedup_vs_fastest_baseline"] = mix_cost(fb, mix) / mix_cost(best, mix)
            out.append(entry)
    return out


def format_policy(entries: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`policy`."""
    rows = []
    for p in entries:
        rows.append(
            [
                f"{p['mix']:g}",
                p["regime"],
                p["n"],
                f"{p['tau']:.2f}" if p.get("tau") is not None else "-",
                p.get("storage") or "-",
                fmt_seconds(p.get("cost_s")),
                p.get("fastest_baseline", "-"),
                fmt_ratio(p.get("speedup_vs_fastest_baseline")),
                p["best_overall"],
            ]
        )
    return format_table(
        [
            "queries/update",
            "regime",
            "n",
            "best tau",
            "storage",
            "cost/update",
            "fastest baseline",
            "speedup",
            "best overall",
        ],
        rows,
    )


def format_machine(machine: Mapping[str, Any]) -> str:
    """One-line description of the machine a result came from."""
    rates = machine.get("gemm_gflops", {})
    rate_txt = ", ".join(f"{k} GEMM {v:.1f} GFLOP/s" for k, v in rates.items())
    load = machine.get("foreign_load_max")
    if load is not None:
        rate_txt += f"; other processes used up to {load:.2f} cores while measuring"
    return (
        f"{machine.get('cpu_model')} ({machine.get('cores')} cores), numpy {machine.get('numpy')}"
        f" [{machine.get('blas')}], {rate_txt}"
    )


# ---------------------------------------------------------------------- demo
@dataclass
class DemoConfig:
    """Settings of ``dynattn demo`` (see :func:`run_demo`)."""

    size: int = 1024
    updates: int = 4096
    queries_per_update: float = 1.0
    tau: float = 0.75
    storage: str = "auto"
    dtype: str = "float64"
    rounds: int = 8
    recompute_updates: int = 32
    eager_updates: int = 1024
    seed: int = 0
    delta_std: float = 0.1


def demo_workload(cfg: DemoConfig, n: int, m: int, d: int, e: int) -> list[tuple[str, int, int, float]]:
    """Random ``update_k`` / ``update_v`` entry updates interleaved with queries.

    Returns a list of ``(kind, i, j, delta)`` with kind ``"k"``, ``"v"`` or ``"q"``
    (delta 0 for queries). Queries follow each update at rate ``queries_per_update``.
    """
    rng = np.random.default_rng(cfg.seed)
    ops: list[tuple[str, int, int, float]] = []
    owed = 0.0
    for u in range(cfg.updates):
        if u % 2 == 0:
            ops.append(
                (
                    "k",
                    int(rng.integers(m)),
                    int(rng.integers(d)),
                    float(rng.normal(0, cfg.delta_std)),
                )
            )
        else:
            ops.append(
                (
                    "v",
                    int(rng.integers(m)),
                    int(rng.integers(e)),
                    float(rng.normal(0, cfg.delta_std)),
                )
            )
        owed += cfg.queries_per_update
        while owed >= 1.0:
            ops.append(("q", int(rng.integers(n)), int(rng.integers(e)), 0.0))
            owed -= 1.0
    return ops


class _DemoRunner:
    """Runs a prefix of the workload on one implementation, timing updates and queries."""

    def __init__(self, name: str, obj: Any, ops: list[tuple[str, int, int, float]], max_updates: int):
        self.name, self.obj, self.ops = name, obj, ops
        self.max_updates = max_updates
        self.cursor = 0
        self.updates = 0
        self.queries = 0
        self.update_time = 0.0
        self.query_time = 0.0
        self.answers: dict[int, float] = {}

    def run(self, budget: int) -> None:
        """Process ops until ``budget`` more updates are done (queries in between included)."""
        obj, ops = self.obj, self.ops
        target = min(self.max_updates, self.updates + budget)
        clock = time.perf_counter
        while self.cursor < len(ops):
            kind, i, j, delta = ops[self.cursor]
            if kind == "q":
                t0 = clock()
                ans = obj.query(i, j)
                self.query_time += clock() - t0
                self.answers[self.cursor] = ans
                self.queries += 1
            else:
                if self.updates >= target:
                    break
                t0 = clock()
                if kind == "k":
                    obj.update_k(i, j, delta)
                else:
                    obj.update_v(i, j, delta)
                self.update_time += clock() - t0
                self.updates += 1
            self.cursor += 1

    def finish(self) -> None:
        """Fold what is still pending, charged to the updates."""
        if hasattr(self.obj, "rebuild") and getattr(self.obj, "pending", 0):
            t0 = time.perf_counter()
            self.obj.rebuild()
            self.update_time += time.perf_counter() - t0


def run_demo(cfg: DemoConfig, progress_mode: str = "auto") -> dict[str, Any]:
    """The README's demo: a short mixed workload, timed and checked answer by answer.

    Every implementation (DynamicAttention at ``cfg.tau`` and the three
    baselines) runs the same sequence of entry updates of K and V interleaved
    with queries; Recompute and Eager run a prefix of it (they are slow). The
    runs are interleaved in ``cfg.rounds`` rounds so machine noise hits all of
    them alike. Afterwards every answer is compared with a float64
    recomputation from scratch (:func:`dynattn.testing.reference_attention` of
    the queried row with the inputs as they were at that moment).

    Returns
    -------
    dict with ``rows`` (per implementation: updates, queries, update_s,
    query_s, worst_error, ratios), ``tolerance``, ``passed``, ``machine``.
    """
    from dynattn import DynamicAttention
    from dynattn.baselines import Eager, OnDemand, Recompute
    from dynattn.testing import TARGET, random_problem, reference_attention

    dtype = _resolve_dtype(cfg.dtype)
    n = m = d = e = cfg.size
    Q, K, V = random_problem(n, m, d, e, seed=cfg.seed, dtype=dtype)
    ops = demo_workload(cfg, n, m, d, e)
    probe = GemmProbe(dtype, size=1024)
    gemm_times = Timing()
    runners = [
        _DemoRunner(
            "dynamic",
            DynamicAttention(Q, K, V, tau=cfg.tau, storage=cfg.storage, dtype=dtype),
            ops,
            cfg.updates,
        ),
        _DemoRunner(
            "recompute",
            Recompute(Q, K, V, dtype=dtype),
            ops,
            min(cfg.updates, cfg.recompute_updates),
        ),
        _DemoRunner("ondemand", OnDemand(Q, K, V, dtype=dtype), ops, cfg.updates),
        _DemoRunner(
            "eager",
            Eager(Q, K, V, dtype=dtype, storage=cfg.storage),
            ops,
            min(cfg.updates, cfg.eager_updates),
        ),
    ]
    rounds = max(1, cfg.rounds)
    monitor = LoadMonitor().start()
    with make_progress(rounds * len(runners) + 1, progress_mode) as progress:
        for r in range(rounds):
            for idx in range(len(runners)):
                runner = runners[(idx + r) % len(runners)]
                runner.run(math.ceil(runner.max_updates / rounds))
                progress.advance(f"round {r + 1}/{rounds} {runner.name}")
            gemm_times.samples.append(time_call(probe.sample))
        rate = probe.rate(gemm_times)
        foreign = monitor.stop()
        for runner in runners:
            runner.finish()
        # ---- check every answer against a float64 recomputation, replaying the updates
        k_ref = np.asarray(K, dtype=np.float64).copy()
        v_ref = np.asarray(V, dtype=np.float64).copy()
        q_ref = np.asarray(Q, dtype=np.float64)
        asked = sorted(set().union(*(r.answers for r in runners)))
        last = max(asked) if asked else -1
        worst = {r.name: 0.0 for r in runners}
        for pos, (kind, i, j, delta) in enumerate(ops[: last + 1]):
            if kind == "k":
                k_ref[i, j] = dtype.type(dtype.type(k_ref[i, j]) + dtype.type(delta))
            elif kind == "v":
                v_ref[i, j] = dtype.type(dtype.type(v_ref[i, j]) + dtype.type(delta))
            else:
                holders = [r for r in runners if pos in r.answers]
                if not holders:
                    continue
                ref = reference_attention(q_ref[i : i + 1], k_ref, v_ref[:, j : j + 1])[0, 0]
                scale = float(np.abs(v_ref[:, j]).max()) or 1.0
                for r in holders:
                    err = abs(r.answers[pos] - ref) / scale
                    if not err <= worst[r.name]:  # also catches NaN
                        worst[r.name] = err if math.isfinite(err) else math.inf
        progress.advance("checked answers")
    tolerance = TARGET[dtype]
    rows = []
    for r in runners:
        rows.append(
            {
                "impl": r.name,
                "updates": r.updates,
                "queries": r.queries,
                "update_s": r.update_time / r.updates if r.updates else None,
                "query_s": r.query_time / r.queries if r.queries else None,
                "worst_error": worst[r.name],
            }
        )
    base = {row["impl"]: row for row in rows if row["impl"] != "dynamic"}
    for row in rows:
        row["ratios"] = {
            name: {
                "update": _ratio(b["update_s"], row["update_s"]),
                "query": _ratio(b["query_s"], row["query_s"]),
            }
            for name, b in base.items()
        }
    dyn = runners[0].obj
    return {
        "size": cfg.size,
        "tau": cfg.tau,
        "dtype": dtype.name,
        "storage": getattr(dyn, "storage", cfg.storage),
        "threshold": getattr(dyn, "threshold", None),
        "stats": dict(getattr(dyn, "stats", {}) or {}),
        "rows": rows,
        "tolerance": tolerance,
        "passed": all(row["worst_error"] <= tolerance for row in rows),
        "bound_s": blas3_bound(n, e, rate),
        "gemm_gflops": rate / 1e9,
        "machine": {**machine_info({dtype.name: rate}), "foreign_load_max": foreign},
    }


def format_demo(result: Mapping[str, Any]) -> str:
    """The demo's table and verdict."""
    headers = [
        "impl",
        "updates",
        "queries",
        "update",
        "/bound",
        "query",
        "upd: recompute/x",
        "upd: eager/x",
        "qry: ondemand/x",
        "worst err / max|V[:,j]|",
    ]
    rows = []
    for row in result["rows"]:
        ratios = row["ratios"]
        rows.append(
            [
                row["impl"],
                row["updates"],
                row["queries"],
                fmt_seconds(row["update_s"]),
                f"{row['update_s'] / result['bound_s']:.1f}x" if row["update_s"] else "-",
                fmt_seconds(row["query_s"]),
                fmt_ratio(ratios.get("recompute", {}).get("update")),
                fmt_ratio(ratios.get("eager", {}).get("update")),
                fmt_ratio(ratios.get("ondemand", {}).get("query")),
                f"{row['worst_error']:.1e}",
            ]
        )
    size = result["size"]
    lines = [
        f"dynattn demo: n = m = d = e = {size}, {result['dtype']}, random entry updates of K and V "
        f"(delta ~ N(0, 0.1^2)) interleaved with queries",
        f"DynamicAttention: tau = {result['tau']:g} (threshold {result['threshold']}), storage "
        f"{result['storage']}; machine: {format_machine(result['machine'])}",
        "",
        format_table(headers, rows),
        "",
        "update: amortized over the run incl. folds; /bound: over the BLAS-3 bound 2*n*e/GEMM rate "
        f"= {fmt_seconds(result['bound_s'])}; ratios: baseline time / row's time.",
    ]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(
        f"{verdict}: every answer checked against a float64 recomputation; worst error "
        f"{max(r['worst_error'] for r in result['rows']):.2e} x max|V[:,j]| (allowed "
        f"{result['tolerance']:.0e})."
    )
    return "\n".join(lines)
