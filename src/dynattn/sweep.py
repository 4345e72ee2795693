"""The ``dynattn bench`` sweep: every implementation timed over sizes and tau.

:func:`run_bench` runs a :class:`BenchConfig`; :mod:`dynattn.report` prints
and ranks the records, ``docs/bench.md`` describes the method and the
reference results.

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
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from dynattn._timing import (
    GemmProbe,
    LoadMonitor,
    Sample,
    Timing,
    blas3_bound,
    gemm_rate,
    interleaved,
    machine_info,
    wait_for_quiet,
)
from dynattn._validation import check_choice
from dynattn.baselines import BASELINES
from dynattn.progress import make_progress
from dynattn.testing import random_problem

SCHEMA = "dynattn-bench/1"
#: Baselines in measuring and display order (the registry's order).
BASELINE_ORDER = tuple(BASELINES)
#: ``dtype`` choices of the benchmarks and the demo.
DTYPES = ("float64", "float32")
#: Paper regime: entry updates of K, of V, or alternating.
UPDATE_KINDS = ("k", "v", "kv")
#: Environment variables that set the BLAS thread count (recorded with a run).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class Grid(TypedDict):
    """Sizes and taus of a sweep."""

    sizes: list[int]
    taus: list[float]


#: Sizes and taus of a full sweep, per regime.
DEFAULTS: dict[str, Grid] = {
    "paper": {"sizes": [256, 512, 1024, 2048], "taus": [0.25, 0.5, 0.75, 1.0]},
    "llm": {"sizes": [2048, 4096, 8192, 16384], "taus": [0.25, 0.5, 0.75]},
}
#: Regimes (see the module docstring).
REGIMES = tuple(DEFAULTS)
#: ``dynattn bench --quick`` (under 2 minutes): sizes and taus per regime ...
QUICK: dict[str, Grid] = {
    "paper": {"sizes": [128, 256, 512, 1024], "taus": [0.5, 1.0]},
    "llm": {"sizes": [1024, 2048, 4096], "taus": [0.25, 0.5]},
}
#: ... and the :class:`BenchConfig` settings it changes: fewer, shorter samples, shorter burn-in.
QUICK_SETTINGS = {
    "repeats": 3,
    "warmup": 0,
    "sample_s": 0.03,
    "recompute_updates": 1,
    "burn_in": 4.0,
    "burn_in_s": 1.0,
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
    schedules : list of str
        DynamicAttention fold schedules (``amortized``, ``spread``; docs/latency.md).
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
    schedules: list[str] = field(default_factory=lambda: ["amortized"])
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

    @classmethod
    def preset(cls, *, quick: bool = False, **changes: Any) -> BenchConfig:
        """The default run of ``changes["regime"]`` (``"paper"`` if absent), then ``changes``.

        ``quick=True`` starts from ``dynattn bench --quick`` instead: the sizes
        and taus of :data:`QUICK` and the settings of :data:`QUICK_SETTINGS`.
        """
        regime = changes.get("regime", "paper")
        check_choice("regime", regime, REGIMES)
        grid = (QUICK if quick else DEFAULTS)[regime]
        settings: dict[str, Any] = {"sizes": list(grid["sizes"]), "taus": list(grid["taus"])}
        if quick:
            settings.update(QUICK_SETTINGS)
        return cls(**{**settings, **changes})

    def dims(self, size: int) -> tuple[int, int, int, int]:
        """``(n, m, d, e)`` for one size."""
        if self.regime == "paper":
            return size, size, size, size
        return size, size, self.head_dim, self.head_dim


# ---------------------------------------------------------------------- subjects
def resolve_dtype(name: str) -> np.dtype:
    """The numpy dtype called ``name``, one of :data:`DTYPES`."""
    try:
        resolved: Any = np.dtype(name).name  # also np.float32, "f8", ...
    except TypeError:
        resolved = name
    return np.dtype(check_choice("dtype", resolved, DTYPES))


def make_problem(config: BenchConfig, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ``Q, K, V`` for one size (logits of standard deviation about 1)."""
    n, m, d, e = config.dims(size)
    return random_problem(n, m, d, e, seed=config.seed + size, dtype=resolve_dtype(config.dtype))


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
        schedule: str = "amortized",
    ):
        self.name = name
        self.obj = obj
        self.config = config
        self.tau = tau
        self.storage_requested = storage
        self.schedule = schedule
        #: every timed update and query call, in seconds (the latency distribution)
        self.update_latencies: list[float] = []
        self.query_latencies: list[float] = []
        self._timing_calls = False
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
            spread = " spread" if self.schedule == "spread" else ""
            return f"dynamic t={self.tau:g} {self.storage}{spread}"
        return self.name

    @property
    def storage(self) -> str | None:
        """Storage strategy in use (as reported by the object), else as requested."""
        got = getattr(self.obj, "storage", None)
        return got if isinstance(got, str) else self.storage_requested

    # .................................................................. workload
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
                started = time.perf_counter()
                if kind == "k" or (kind == "kv" and (idx + self._kind_flip) % 2 == 0):
                    obj.update_k(i, j % self.d, delta)
                else:
                    obj.update_v(i, j % self.e, delta)
                if self._timing_calls:
                    self.update_latencies.append(time.perf_counter() - started)
            self._kind_flip += count
            return
        keys = rng.normal(0.0, self._key_std, (count, self.d))
        values = rng.standard_normal((count, self.e))
        for idx in range(count):
            started = time.perf_counter()
            self._row_edit(int(rows[idx]), keys[idx], values[idx])
            if self._timing_calls:
                self.update_latencies.append(time.perf_counter() - started)

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
        self._timing_calls = True
        self._apply_updates(count, rows)
        self._timing_calls = False
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
        query, latencies = self.obj.query, self.query_latencies
        start = time.perf_counter()
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            started = time.perf_counter()
            query(i, j)
            latencies.append(time.perf_counter() - started)
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

    Q, K, V = make_problem(config, size)
    dtype = resolve_dtype(config.dtype)
    common: dict[str, Any] = {"scale": config.scale, "dtype": dtype, "memory_budget": config.memory_budget}
    seed = config.seed * 7919 + size
    subjects = []
    for schedule in config.schedules:
        for storage in config.storages:
            for tau in config.taus:
                dynamic = DynamicAttention(Q, K, V, tau=tau, storage=storage, schedule=schedule, **common)
                subject = Subject(
                    "dynamic", dynamic, config, tau=tau, storage=storage, seed=seed, schedule=schedule
                )
                subjects.append(subject)
    for name in config.baselines:
        check_choice("baselines", name, BASELINES)
        baseline = BASELINES[name](Q, K, V, **common)
        baseline_tau = 0.0 if name == "eager" else None
        subjects.append(Subject(name, baseline, config, tau=baseline_tau, storage=None, seed=seed))
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
        s.update_latencies.clear()  # only the timed rounds' calls count
        s.query_latencies.clear()
        progress.advance(f"n={size} calibrating {s.label}")
    fns: dict[str, Sample] = {}
    for idx, s in enumerate(subjects):
        fns[f"{idx}:update"] = s.update_sample
        fns[f"{idx}:query"] = s.query_sample
        if s.lazy and s.threshold > 1:
            fns[f"{idx}:rebuild"] = s.rebuild_sample

    probe = GemmProbe(resolve_dtype(config.dtype))
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
            "schedule": s.schedule if s.name == "dynamic" else None,
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
                "update_latency": latency_summary(s.update_latencies),
                "query_latency": latency_summary(s.query_latencies),
            }
        )
        records.append(rec)
    add_ratios(records)
    return records


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Distribution of single-call latencies: count, mean, p50, p99, p99.9 and max, in
    seconds (nearest-rank percentiles: each is a measured latency; None when empty)."""
    if not seconds:
        return dict.fromkeys(("count", "mean", "p50", "p99", "p99.9", "max"))
    ordered = np.sort(np.asarray(seconds, dtype=np.float64))
    count = ordered.size

    def rank(fraction: float) -> float:
        return float(ordered[max(0, math.ceil(fraction * count) - 1)])

    return {
        "count": count,
        "mean": float(ordered.mean()),
        "p50": rank(0.5),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": float(ordered[-1]),
    }


def add_ratios(records: list[dict[str, Any]], by: tuple[str, ...] = ("regime", "n")) -> None:
    """Set ``rec["ratios"][baseline] = {"update": b/x, "query": b/x}`` in place.

    Each record is compared with the baselines' records that agree with it on
    the fields ``by`` (by default: the same regime and size).
    """
    groups: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = {}
    for rec in records:
        if rec["impl"] in BASELINE_ORDER:
            groups.setdefault(tuple(rec[k] for k in by), {})[rec["impl"]] = rec
    for rec in records:
        ratios = {}
        for name, base in groups.get(tuple(rec[k] for k in by), {}).items():
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
    n_dyn = len(config.taus) * len(config.storages) * len(config.schedules)
    lazy = sum(1 for t in config.taus if t > 0) * len(config.storages) * len(config.schedules)
    per_round = 2 * n_dyn + lazy + 2 * len(config.baselines)
    return len(config.sizes) * (n_dyn + len(config.baselines) + config.repeats * per_round)


def source_info() -> dict[str, Any]:
    """The code a run measured: ``{"commit", "src_modified", "env"}``.

    ``commit`` is ``git rev-parse HEAD`` of the checkout the package was
    imported from and ``src_modified`` whether ``src/`` differed from it
    (both ``None`` outside a git checkout, e.g. an installed package);
    ``env`` holds the BLAS thread settings of the environment, if any.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", root, *argv], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "src") if commit else None
    env = {k: os.environ[k] for k in BLAS_THREAD_VARIABLES if k in os.environ}
    return {"commit": commit, "src_modified": bool(status) if status is not None else None, "env": env}


def run_bench(config: BenchConfig, progress_mode: str = "auto") -> dict[str, Any]:
    """Run a whole sweep.

    Returns
    -------
    dict
        ``{"schema", "source", "machine", "settings", "elapsed_s", "records",
        "fits"}``; ``source`` is :func:`source_info`.
    """
    from dynattn.theory import fit_records

    dtype = resolve_dtype(config.dtype)
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
        "source": source_info(),
        "machine": machine,
        "settings": asdict(config),
        "elapsed_s": time.time() - started,
        "records": records,
        "fits": fit_records(records) if config.regime == "paper" else [],
    }
