"""Per-operation latency distribution of DynamicAttention: the "amortized" fold schedule against "spread".

With the default ("amortized") schedule every ``threshold``-th update pays a
whole fold (an O(n*e*T) GEMM) and stalls; with ``schedule="spread"`` the fold
is split into row slices done one per update. Mean times (bench_paths,
bench_policy) cannot tell the two apart; this benchmark times **every single
call** (``time.perf_counter_ns`` around the call) and reports the
distribution: mean, p50, p99, p99.9, max, max/mean and p99.9/mean.

a. paper regime: n = m = d = e = N in {1024, 2048}, float64, scale 1,
   ``dynattn.testing.random_problem`` inputs (the generator of ``dynattn bench``
   and bench_policy: Q, K of standard deviation d**-0.25, so logits have
   standard deviation 1; V standard normal), tau in {0.5, 0.75, 0.875};
   4000 random ``update_k(i, j, delta)`` (delta ~ N(0, 0.1^2)), each followed
   by one ``query(i, j)`` at a random (i, j), the update and the query timed
   separately.
b. LLM regime: 8 heads, Q, K, V of shape (8, N, 64), N = 16384, float32,
   scale 1/8, standard normal inputs, tau = 0.5, storage "auto" (implicit at
   this size: the dense weights would take 8 GiB); 2000 token edits
   ``set_key(c, k)`` + ``set_value(c, v)`` of a random token c with fresh
   standard normal rows (8, 64), the pair timed as one edit.

Method
------
For every configuration both schedules are built from the same inputs and
walk the **same seeded operation sequence**. Each first runs an untimed
warm-up of the sequence's first W operations, W = max(2 * threshold, 2 x the
expected number of random updates that fill the threshold with distinct rows),
so at least two whole fold cycles (the number of folds it saw is recorded).
Then the timed operations run **interleaved** in blocks of ``block`` (200)
operations: block 1 on one schedule, the same block on the other, the order
swapped every block, so a slow phase of the machine hits both alike. Python's
garbage collector is collected before and disabled during each block (its
pauses are not the schedule's). BLAS runs with one thread: with
``threadpoolctl`` when it is installed, else ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = 1 set before numpy is imported
(when run as a script) and OpenBLAS's ``set_num_threads(1)`` at run time (the
helper of bench_streams.py that bench_policy.py uses).

Percentiles are nearest-rank: pXX is the smallest measured latency with at
least XX% of the samples at or below it (numpy's ``method="inverted_cdf"``),
so every reported value is a latency that was observed (p50 of 1..100 is 50,
p99.9 of 4000 samples is the 5th largest).

Targets (``schedule="spread"``; recorded with ``dynattn._timing.target``):
a. update p99.9 <= 3x its mean, update max <= 10x its mean, mean update <=
   1.3x the amortized mean of the same run, query p99.9 <= 2x the amortized
   query p99.9; b. max edit <= 3x the mean edit.

    python benchmarks/bench_latency.py                         # full: N = 1024, 2048 and LLM N = 16384
    python benchmarks/bench_latency.py --quick                 # < 60 s: N = 256, 512 and LLM N = 1024
    python benchmarks/bench_latency.py --quick --sections a --out-dir /tmp/latency

Writes ``latency.json``, ``latency.txt`` (tables, targets, command line, git
commit, machine) and, with matplotlib, ``latency.png`` (the CDF of the
latencies per schedule, log-x, one panel per configuration) into
``--out-dir`` (default docs/figures).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Environment variables that set BLAS / OpenMP thread counts.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: BLAS threads during the run.
BLAS_THREADS = 1
HAVE_THREADPOOLCTL = importlib.util.find_spec("threadpoolctl") is not None
if __name__ == "__main__" and not HAVE_THREADPOOLCTL and "numpy" not in sys.modules:
    # no threadpoolctl: the environment is read once, when numpy loads its BLAS
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(BLAS_THREADS)))

# numpy (and everything that imports it) only after the environment is set
import numpy as np  # noqa: E402

from dynattn import DynamicAttention  # noqa: E402
from dynattn._timing import (  # noqa: E402
    LoadMonitor,
    add_output_options,
    fmt_ratio,
    fmt_seconds,
    format_table,
    git_commit,
    machine_info,
    target,
    targets_summary,
    write_report,
)
from dynattn.structure import SCHEDULES  # noqa: E402
from dynattn.testing import random_problem  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy import expected_cycle, src_diff  # noqa: E402  (reused helpers)
from bench_streams import blas_threads, thread_settings  # noqa: E402  (the thread helpers)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "dynattn-latency/1"
#: percentiles reported in the tables (nearest rank)
PERCENTILES = (50.0, 99.0, 99.9)
#: percentiles recorded in the JSON (enough to redraw a coarse CDF)
JSON_PERCENTILES = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0)
#: targets for schedule="spread"
P999_OVER_MEAN_MAX = 3.0
MAX_OVER_MEAN_MAX = 10.0
MEAN_OVER_AMORTIZED_MAX = 1.3
QUERY_P999_OVER_AMORTIZED_MAX = 2.0
EDIT_MAX_OVER_MEAN_MAX = 3.0


@dataclass
class LatencyConfig:
    """Sizes and effort of one run (``preset`` gives the command line's choices)."""

    paper_sizes: list[int] = field(default_factory=lambda: [1024, 2048])
    taus: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875])
    paper_updates: int = 4000
    llm_sizes: list[int] = field(default_factory=lambda: [16384])
    heads: int = 8
    head_dim: int = 64
    llm_tau: float = 0.5
    llm_edits: int = 2000
    block: int = 200  # operations per interleaved block
    warmup_cycles: float = 2.0  # fold cycles (at least this many thresholds) before timing
    disable_gc: bool = True
    seed: int = 0
    memory_budget: int = 1 << 30

    @classmethod
    def preset(cls, *, quick: bool = False) -> LatencyConfig:
        if quick:
            return cls(paper_sizes=[256, 512], paper_updates=1000, llm_sizes=[1024], llm_edits=400)
        return cls()

    @classmethod
    def tiny(cls) -> LatencyConfig:
        """Second-long sizes, for the smoke test (structure of the output only)."""
        return cls(
            paper_sizes=[64],
            taus=[0.5],
            paper_updates=60,
            llm_sizes=[64],
            heads=2,
            head_dim=8,
            llm_edits=40,
            block=20,
        )


# ---------------------------------------------------------------------- statistics
def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``p`` percent of the
    samples at or below it (``p`` in [0, 100]; p = 0 gives the minimum)."""
    data = np.sort(np.asarray(values, dtype=np.float64))
    if data.size == 0:
        return math.nan
    rank = math.ceil(p / 100.0 * data.size - 1e-9)  # 1-based; the epsilon absorbs 99.9/100 rounding
    return float(data[min(max(rank, 1), data.size) - 1])


def latency_stats(ns: Sequence[int] | np.ndarray, *, slowest: int = 5) -> dict[str, Any]:
    """Mean, percentiles, max and their ratios of latencies given in nanoseconds (result in
    seconds), the ``slowest`` largest with their positions in the timed sequence."""
    x = np.asarray(ns, dtype=np.float64) * 1e-9
    if x.size == 0:
        return {"count": 0}
    mean = float(x.mean())
    order = np.argsort(x, kind="stable")[::-1][:slowest]
    stats: dict[str, Any] = {
        "count": int(x.size),
        "mean_s": mean,
        "min_s": float(x.min()),
        "p50_s": percentile(x, 50.0),
        "p99_s": percentile(x, 99.0),
        "p999_s": percentile(x, 99.9),
        "max_s": float(x.max()),
        "total_s": float(x.sum()),
    }
    stats["p999_over_mean"] = stats["p999_s"] / mean if mean > 0 else math.nan
    stats["max_over_mean"] = stats["max_s"] / mean if mean > 0 else math.nan
    stats["percentiles_s"] = {f"{p:g}": percentile(x, p) for p in JSON_PERCENTILES}
    stats["slowest"] = [{"op": int(i), "seconds": float(x[i])} for i in order]
    return stats


# ---------------------------------------------------------------------- schedules and threads
def build(Q: Any, K: Any, V: Any, schedule: str, **kwargs: Any) -> DynamicAttention:
    """A structure with fold ``schedule``."""
    return DynamicAttention(Q, K, V, schedule=schedule, **kwargs)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[dict[str, Any]]:
    """BLAS limited to :data:`BLAS_THREADS` threads: threadpoolctl if installed, else
    OpenBLAS's set_num_threads (and the environment set before numpy when run as a script)."""
    if HAVE_THREADPOOLCTL:
        import threadpoolctl

        with threadpoolctl.threadpool_limits(limits=BLAS_THREADS):
            yield {
                "mechanism": "threadpoolctl",
                "pools": [
                    {k: info.get(k) for k in ("internal_api", "num_threads")}
                    for info in threadpoolctl.threadpool_info()
                ],
            }
        return
    with blas_threads(BLAS_THREADS) as settings:
        yield {"mechanism": "environment before numpy + OpenBLAS set_num_threads", **settings}


# ---------------------------------------------------------------------- workloads
class PaperOps:
    """``update_k(i, j, delta)`` then ``query(i, j)``, both timed, from one seeded sequence."""

    kinds = ("update", "query")

    def __init__(self, n: int, count: int, seed: int):
        rng = np.random.default_rng([seed, 1, n])
        self.rows = rng.integers(0, n, count).tolist()
        self.cols = rng.integers(0, n, count).tolist()
        self.deltas = rng.normal(0.0, 0.1, count).tolist()
        self.qrows = rng.integers(0, n, count).tolist()
        self.qcols = rng.integers(0, n, count).tolist()

    def run(self, att: Any, lo: int, hi: int, out: dict[str, list[int]], at: int) -> None:
        """Operations ``lo .. hi-1``; their latencies (ns) go to ``out[kind][op - at]``."""
        clock = time.perf_counter_ns
        update_k, query = att.update_k, att.query
        rows, cols, deltas, qrows, qcols = self.rows, self.cols, self.deltas, self.qrows, self.qcols
        updates, queries = out["update"], out["query"]
        for u in range(lo, hi):
            t0 = clock()
            update_k(rows[u], cols[u], deltas[u])
            t1 = clock()
            query(qrows[u], qcols[u])
            t2 = clock()
            updates[u - at] = t1 - t0
            queries[u - at] = t2 - t1


class EditOps:
    """Token edits ``set_key(c, k)`` + ``set_value(c, v)``, the pair timed as one edit."""

    kinds = ("edit",)

    def __init__(self, heads: int, n: int, d: int, count: int, seed: int, dtype: Any):
        rng = np.random.default_rng([seed, 2, n])
        self.tokens = rng.integers(0, n, count).tolist()
        self.keys = list(rng.standard_normal((count, heads, d)).astype(dtype))
        self.values = list(rng.standard_normal((count, heads, d)).astype(dtype))

    def run(self, att: Any, lo: int, hi: int, out: dict[str, list[int]], at: int) -> None:
        clock = time.perf_counter_ns
        set_key, set_value = att.set_key, att.set_value
        tokens, keys, values = self.tokens, self.keys, self.values
        edits = out["edit"]
        for u in range(lo, hi):
            t0 = clock()
            set_key(tokens[u], keys[u])
            set_value(tokens[u], values[u])
            edits[u - at] = clock() - t0


def warmup_ops(m: int, threshold: int, cycles: float) -> int:
    """Untimed operations before timing: ``cycles`` fold cycles of random rows (at least
    ``cycles * threshold`` operations)."""
    return math.ceil(cycles * max(threshold, expected_cycle(m, threshold)))


def measure(
    structures: dict[str, Any], ops: Any, warmup: int, timed: int, block: int, disable_gc: bool = True
) -> dict[str, dict[str, Any]]:
    """Warm up every structure on operations ``0 .. warmup-1``, then time operations
    ``warmup .. warmup+timed-1`` in interleaved blocks of ``block`` (order swapped every
    block). Returns per structure: the latencies (ns) per kind, warm-up folds, timed stats."""
    out: dict[str, dict[str, Any]] = {}
    for name, att in structures.items():
        folds = att.stats["folds"]
        scratch = {kind: [0] * warmup for kind in ops.kinds}
        ops.run(att, 0, warmup, scratch, 0)
        out[name] = {
            "samples": {kind: [0] * timed for kind in ops.kinds},
            "warmup_folds": att.stats["folds"] - folds,
            "stats_before": att.stats,
        }
    names = list(structures)
    for b, lo in enumerate(range(warmup, warmup + timed, max(1, block))):
        hi = min(lo + block, warmup + timed)
        for name in names if b % 2 == 0 else names[::-1]:
            gc.collect()
            if disable_gc:
                gc.disable()
            try:
                ops.run(structures[name], lo, hi, out[name]["samples"], warmup)
            finally:
                gc.enable()
    for name, att in structures.items():
        before, after = out[name].pop("stats_before"), att.stats
        out[name]["stats_timed"] = {
            k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)
        }
    return out


def _schedule_attr(att: Any) -> Any:
    value = getattr(att, "schedule", None)
    return value if isinstance(value, str) else None


def _records(
    section: str,
    case: dict[str, Any],
    structures: dict[str, Any],
    measured: dict[str, dict[str, Any]],
    warmup: int,
    timed: int,
    samples: dict[str, Any],
) -> list[dict[str, Any]]:
    """One record per schedule; the raw samples go to ``samples`` (for the figure only)."""
    out = []
    for schedule, m in measured.items():
        att = structures[schedule]
        rec: dict[str, Any] = {
            "section": section,
            **case,
            "schedule": schedule,
            "schedule_attribute": _schedule_attr(att),
            "storage": att.storage,
            "threshold": int(att.threshold),
            "warmup_ops": warmup,
            "warmup_folds": m["warmup_folds"],
            "timed_ops": timed,
            "stats_timed": m["stats_timed"],
        }
        for kind, ns in m["samples"].items():
            rec[kind] = latency_stats(ns)
        samples.setdefault(_label(section, case), {})[schedule] = {
            kind: np.asarray(ns, dtype=np.int64) for kind, ns in m["samples"].items()
        }
        out.append(rec)
    return out


def _label(section: str, case: dict[str, Any]) -> str:
    if section == "a_paper":
        return f"paper n={case['n']} tau={case['tau']:g}"
    return f"llm H={case['heads']} n={case['n']} tau={case['tau']:g}"


# ---------------------------------------------------------------------- sections
def section_paper(
    cfg: LatencyConfig, out: dict[str, Any], schedules: list[str], samples: dict[str, Any]
) -> list[list[Any]]:
    """a. paper regime: update_k and query latencies, per (n, tau)."""
    table: list[list[Any]] = []
    for n in cfg.paper_sizes:
        Q, K, V = random_problem(n, n, n, n, seed=cfg.seed + n, dtype=np.float64)
        for tau in cfg.taus:
            structures = {
                s: build(Q, K, V, s, tau=tau, dtype=np.float64, memory_budget=cfg.memory_budget)
                for s in schedules
            }
            T = int(structures[schedules[0]].threshold)
            warmup = warmup_ops(n, T, cfg.warmup_cycles)
            ops = PaperOps(n, warmup + cfg.paper_updates, cfg.seed)
            measured = measure(structures, ops, warmup, cfg.paper_updates, cfg.block, cfg.disable_gc)
            case = {"n": n, "tau": tau, "dtype": "float64"}
            recs = _records("a_paper", case, structures, measured, warmup, cfg.paper_updates, samples)
            out["records"] += recs
            table += _paper_rows(recs)
            _paper_targets(out, recs, {"section": "a", "n": n, "tau": tau})
            del structures, measured
            gc.collect()
    return table


def _paper_rows(recs: list[dict[str, Any]]) -> list[list[Any]]:
    by = {r["schedule"]: r for r in recs}
    base = by.get("amortized")
    rows = []
    for r in recs:
        u, q = r["update"], r["query"]
        vs = "-"
        qvs = "-"
        if base is not None and r is not base:
            vs = fmt_ratio(u["mean_s"] / base["update"]["mean_s"])
            qvs = fmt_ratio(q["p999_s"] / base["query"]["p999_s"])
        rows.append(
            [
                r["n"],
                f"{r['tau']:g}",
                r["threshold"],
                r["schedule"],
                *_dist(u),
                vs,
                r["stats_timed"].get("folds", 0),
                fmt_seconds(q["mean_s"]),
                fmt_seconds(q["p999_s"]),
                fmt_seconds(q["max_s"]),
                qvs,
            ]
        )
    return rows


def _dist(s: dict[str, Any]) -> list[str]:
    return [
        fmt_seconds(s["mean_s"]),
        fmt_seconds(s["p50_s"]),
        fmt_seconds(s["p99_s"]),
        fmt_seconds(s["p999_s"]),
        fmt_seconds(s["max_s"]),
        fmt_ratio(s["max_over_mean"]),
        fmt_ratio(s["p999_over_mean"]),
    ]


def _paper_targets(out: dict[str, Any], recs: list[dict[str, Any]], where: dict[str, Any]) -> None:
    by = {r["schedule"]: r for r in recs}
    if "spread" not in by or "amortized" not in by:
        return
    sp, am = by["spread"], by["amortized"]
    out["targets"] += [
        target(
            f"spread: update p99.9 <= {P999_OVER_MEAN_MAX:g}x its mean",
            sp["update"]["p999_over_mean"],
            P999_OVER_MEAN_MAX,
            "max",
            where,
        ),
        target(
            f"spread: update max <= {MAX_OVER_MEAN_MAX:g}x its mean",
            sp["update"]["max_over_mean"],
            MAX_OVER_MEAN_MAX,
            "max",
            where,
        ),
        target(
            f"spread: mean update <= {MEAN_OVER_AMORTIZED_MAX:g}x the amortized mean",
            sp["update"]["mean_s"] / am["update"]["mean_s"],
            MEAN_OVER_AMORTIZED_MAX,
            "max",
            where,
        ),
        target(
            f"spread: query p99.9 <= {QUERY_P999_OVER_AMORTIZED_MAX:g}x the amortized query p99.9",
            sp["query"]["p999_s"] / am["query"]["p999_s"],
            QUERY_P999_OVER_AMORTIZED_MAX,
            "max",
            where,
        ),
    ]


def section_llm(
    cfg: LatencyConfig, out: dict[str, Any], schedules: list[str], samples: dict[str, Any]
) -> list[list[Any]]:
    """b. LLM regime: token edit latencies, per n."""
    table: list[list[Any]] = []
    H, d = cfg.heads, cfg.head_dim
    for n in cfg.llm_sizes:
        rng = np.random.default_rng([cfg.seed, 3, n])
        Q, K, V = (rng.standard_normal((H, n, d)).astype(np.float32) for _ in range(3))
        common = {
            "tau": cfg.llm_tau,
            "scale": d**-0.5,
            "dtype": np.float32,
            "memory_budget": cfg.memory_budget,
        }
        structures = {s: build(Q, K, V, s, **common) for s in schedules}
        del Q, K, V
        T = int(structures[schedules[0]].threshold)
        warmup = warmup_ops(n, T, cfg.warmup_cycles)
        ops = EditOps(H, n, d, warmup + cfg.llm_edits, cfg.seed, np.float32)
        measured = measure(structures, ops, warmup, cfg.llm_edits, cfg.block, cfg.disable_gc)
        case = {"n": n, "heads": H, "head_dim": d, "tau": cfg.llm_tau, "dtype": "float32"}
        recs = _records("b_llm", case, structures, measured, warmup, cfg.llm_edits, samples)
        out["records"] += recs
        by = {r["schedule"]: r for r in recs}
        for r in recs:
            vs = "-"
            if "amortized" in by and r is not by["amortized"]:
                vs = fmt_ratio(r["edit"]["mean_s"] / by["amortized"]["edit"]["mean_s"])
            table.append(
                [
                    n,
                    H,
                    r["threshold"],
                    r["schedule"],
                    r["storage"],
                    *_dist(r["edit"]),
                    vs,
                    r["stats_timed"].get("folds", 0),
                ]
            )
        if "spread" in by:
            out["targets"].append(
                target(
                    f"spread: max edit <= {EDIT_MAX_OVER_MEAN_MAX:g}x the mean edit",
                    by["spread"]["edit"]["max_over_mean"],
                    EDIT_MAX_OVER_MEAN_MAX,
                    "max",
                    {"section": "b", "n": n, "heads": H},
                )
            )
        del structures, measured
        gc.collect()
    return table


DIST_HEADERS = ["mean", "p50", "p99", "p99.9", "max", "max/mean", "p99.9/mean"]
SECTIONS: list[tuple[str, str, Callable[..., list[list[Any]]], list[str]]] = [
    (
        "a",
        "paper regime (n = m = d = e, float64): update_k latency per call, then one query per update "
        "(mean vs amortized = spread mean / amortized mean; query p99.9 vs amortized likewise)",
        section_paper,
        [
            "n",
            "tau",
            "T",
            "schedule",
            *DIST_HEADERS,
            "mean vs amortized",
            "folds",
            "query mean",
            "query p99.9",
            "query max",
            "query p99.9 vs amortized",
        ],
    ),
    (
        "b",
        "LLM regime (8 heads, d = e = 64, float32, tau = 0.5): token edit (set_key + set_value) latency",
        section_llm,
        ["n", "heads", "T", "schedule", "storage", *DIST_HEADERS, "mean vs amortized", "folds"],
    ),
]


# ---------------------------------------------------------------------- figure
def plot(samples: dict[str, Any], path: Path, echo: Callable[[str], None]) -> bool:
    """One panel per configuration: the CDF of each schedule's latencies (update/edit solid,
    query dashed), log-x, logit-y (so p50 and p99.9 are both readable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        echo("matplotlib is not installed: no figure (pip install 'dynattn[plot]')")
        return False
    if not samples:
        return False
    cols = min(3, len(samples))
    rows = math.ceil(len(samples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    colors = {"amortized": "tab:blue", "spread": "tab:orange"}
    for ax, (label, by_schedule) in zip(axes.flat, samples.items(), strict=False):
        for schedule, kinds in by_schedule.items():
            for kind, ns in kinds.items():
                x = np.sort(ns.astype(np.float64) * 1e-9)
                y = (np.arange(x.size) + 0.5) / x.size
                style = "--" if kind == "query" else "-"
                ax.plot(
                    x, y, style, color=colors.get(schedule, "gray"), linewidth=1.3, label=f"{schedule} {kind}"
                )
                ax.plot([percentile(x, 99.9)], [0.999], "o", color=colors.get(schedule, "gray"), markersize=3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges would label every minor tick
        ax.set_yscale("logit")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds per call")
        ax.set_ylabel("fraction of calls <= x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(samples) :]:
        ax.set_visible(False)
    fig.suptitle("per-call latency CDF, fold schedules (dots: p99.9)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- driver
def run_latency(
    cfg: LatencyConfig,
    *,
    sections: str = "ab",
    out_dir: Path | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen sections; return the result and write ``latency.json``/``.txt``/``.png``
    into ``out_dir`` (nothing written when None)."""
    threads_at_start = thread_settings()
    with one_blas_thread() as during:
        return _run(cfg, sections, out_dir, command, echo, {"at_start": threads_at_start, "during": during})


def _run(
    cfg: LatencyConfig,
    sections: str,
    out_dir: Path | None,
    command: str,
    echo: Callable[[str], None],
    threads: dict[str, Any],
) -> dict[str, Any]:
    schedules = list(SCHEDULES)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "git_commit": git_commit(),
        "src_diff": src_diff(),
        "machine": machine_info(),
        "threads": threads,
        "config": asdict(cfg),
        "sections": sections,
        "schedules": schedules,
        "percentile_method": "nearest rank (numpy inverted_cdf)",
        "loadavg_start": list(os.getloadavg()),
        "records": [],
        "targets": [],
        "tables": {},
    }
    machine = result["machine"]
    diff = result["src_diff"]
    text = [
        f"# {command}",
        f"# commit {result['git_commit']}"
        + (
            f"; uncommitted src changes in {', '.join(diff['files'])} (diff sha256 {diff['sha256'][:12]})"
            if diff["files"]
            else ""
        ),
        f"# {machine['cpu_model']}, {machine['cores']} cores, numpy {machine['numpy']} ({machine['blas']})",
        f"# BLAS threads: {BLAS_THREADS} ({threads['during'].get('mechanism')})",
        f"# schedules measured: {', '.join(schedules)}",
        f"# every call timed with perf_counter_ns; warm-up >= {cfg.warmup_cycles:g} fold cycles per "
        f"structure; interleaved blocks of {cfg.block} operations (order swapped every block); "
        f"gc {'disabled' if cfg.disable_gc else 'enabled'} during blocks; percentiles nearest-rank",
    ]
    samples: dict[str, Any] = {}
    monitor = LoadMonitor().start()
    started = time.perf_counter()
    for letter, title, fn, headers in SECTIONS:
        if letter not in sections:
            continue
        t0 = time.perf_counter()
        rows = [[str(x) for x in r] for r in fn(cfg, result, schedules, samples)]
        block = f"\n## {letter}. {title}\n" + format_table(headers, rows)
        result["tables"][letter] = {"title": title, "headers": headers, "rows": rows}
        text.append(block)
        echo(block + f"\n({time.perf_counter() - t0:.1f} s)")
    summary = targets_summary(result["targets"])
    text.append(summary)
    echo(summary)
    result["elapsed_s"] = time.perf_counter() - started
    load = monitor.stop()
    result["other_load_cores"] = load  # None where /proc/stat is not readable
    result["loadavg_end"] = list(os.getloadavg())
    text.append(
        f"\nelapsed {result['elapsed_s']:.0f} s; other load during the run (cores other processes kept "
        "busy): " + ("-" if load is None else f"{load:.2f}") + "; loadavg (1 min) "
        f"{result['loadavg_start'][0]:.2f} at the start, {result['loadavg_end'][0]:.2f} at the end"
    )
    result["text"] = "\n".join(text) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["figure"] = "latency.png" if plot(samples, out_dir / "latency.png", echo) else None
        write_report(result, out_dir, "latency")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer operations (< 60 s)")
    parser.add_argument("--sections", default="a,b", help="which sections to run, e.g. 'a,b' or 'a'")
    add_output_options(parser, "latency", ROOT / "docs" / "figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sections = "".join(sorted(set(args.sections.replace(",", "").replace(" ", ""))))
    unknown = set(sections) - {letter for letter, *_ in SECTIONS}
    if unknown:
        parser.error(f"--sections: unknown section(s) {', '.join(sorted(unknown))} (expected a, b)")
    cfg = LatencyConfig.preset(quick=args.quick)
    cfg.seed = args.seed
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_latency.py", *given])
    return run_latency(
        cfg, sections=sections, out_dir=None if args.no_write else args.out_dir, command=command
    )


if __name__ == "__main__":
    main()
