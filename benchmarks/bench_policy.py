"""Measured mixed workloads: ``DynamicAttention(tau="auto")`` against fixed tau and the baselines.

The mix maps of ``dynattn bench --policy`` (docs/figures/paper_mix.png) are
*modelled* from separately measured update and query times. An adaptive fold
schedule cannot be modelled that way, so this benchmark **measures**
interleaved workloads directly.

Workload at queries-per-update ratio r
--------------------------------------
A seeded sequence of updates; after update number g (counting from 0) the
number of queries issued is ``floor((g + 1) * r) - floor(g * r)`` (exactly the
``acc += r; while acc >= 1: query; acc -= 1`` rule, without float drift), so
r = 0.01 is one query every 100 updates and r = 100 is 100 queries per update.
Update g and query q are the same for every contender: they are generated in
blocks of 256 from ``default_rng([seed, stream, block])``, indexed by their
global position, and every contender walks the same sequence from its start.

* ``--regime paper``: n = m = d = e = N (default 1024), float64, scale 1,
  ``dynattn.testing.random_problem`` inputs (logits of standard deviation 1);
  even g: ``update_k(i, j, delta)``, odd g: ``update_v(i, j, delta)``, random
  (i, j), delta ~ N(0, 0.1^2); a query is ``query(i, j)`` at a random (i, j).
* ``--regime llm``: 8 heads, Q, K, V of shape (8, N, 64) (default N = 4096),
  float32, scale 1/8, standard normal inputs; an update is a token edit
  ``set_token(c, k=k, v=v)`` of a random token c with fresh standard normal
  rows k, v of shape (8, 64); a query is ``query_row(i)`` (all heads) at a
  random i.

Contenders, built fresh for every r from the same Q, K, V: ``OnDemand``,
``Eager`` (storage "auto") and ``Recompute`` from ``dynattn.baselines``
(Recompute is skipped where one cell would take more than
``recompute_cell_limit_s``, 10 s), ``DynamicAttention`` with tau in {0.25,
0.5, 0.75, 1} x storage in {dense, implicit} (llm: storage "auto" only,
labelled with what it picked), and ``DynamicAttention(tau="auto")`` (storage
"auto").

Timing
------
For each r: every contender first runs an untimed **probe** (at least
``probe_updates`` updates and 2/r of them, at most ``probe_s`` seconds),
which estimates its cost per update. Its segment length U (updates, with their
queries) is then the largest of: 4/r (at least four queries per segment), the
updates that take ``min_segment_s`` (0.2 s) at the probed rate, and -- for a
fixed tau -- the expected number of random updates that fill its fold
threshold ``ceil(m**tau)`` with distinct rows (one whole fold cycle), for
``tau="auto"`` that of its largest possible cycle (its threshold, m rows), and
once its warm-up segment folded at least twice, two observed cycles (warm-up
updates / folds) instead. A segment stops early once it has run
``max_segment_s`` (1 s), or ``long_segment_s`` (3 s) for a contender whose
cycle alone would take longer than 1 s (tau = 1 and auto at small r); a
fixed-tau cell with a timed segment shorter than one expected cycle is marked
``partial_cycle`` (its folds were not all paid inside the samples; auto: such a
segment that also did not fold). Then ``dynattn._timing.interleaved`` runs one
untimed warm-up round and ``repeats`` (3) timed rounds, one segment per
contender per round, the order rotated every round. So the warm-up W of a
contender is its probe plus one segment (recorded as ``warmup_updates``), and
contenders consume the common sequence at their own pace: each timed segment
is the next stretch of it. Only the calls to the structure are timed (the events of a segment are
prepared in chunks of 256 updates, between the timed stretches).

BLAS runs with ``--threads`` threads (default 1, set through OpenBLAS's
``set_num_threads`` and torch, with the helpers of ``bench_streams.py``), and
the policy's rates (``dynattn.policy.rates``) are measured under that setting
before anything is timed. On this 2-core machine shared with other work, two
BLAS threads next to one busy foreign process made a float64 GEMV 20x and a
GEMM 12x slower than one thread (measured before the reference run), and the
slowdown comes and goes with the neighbour; one thread keeps the contenders'
times about the work they do.

Reported per cell: median seconds per update (a segment's time / its updates,
queries included), min and max, and the pooled time (all timed seconds / all
timed updates: a segment of about one cycle holds 0, 1 or 2 folds, so for
long cycles the pooled value is the steadier amortized cost); per r: the
winner, ``auto_over_best`` (auto's median / the best *other* contender's
median: below 1 means auto wins) and ``ondemand_over_auto`` (above 1: auto
faster than OnDemand), and the
``att.stats`` counters of every ``DynamicAttention`` contender that changed
during its timed segments (folds, columns_materialized, columns_deferred,
...). Targets: auto within 1.25x of the best in every r; OnDemand / auto >=
0.95 in every r (on the medians; the pooled ratios are reported next to
them).

Run time on the shared 2-core machine of docs/figures (one BLAS thread, one
core busy with other work): about 6 min for the paper regime at N = 1024 (9
ratios x 12 contenders x (probe + 4 segments of 0.2-1 s, 3 s for the
long-cycle ones), 22-48 s per ratio) and about 12 min for the llm regime at
N = 4096 (8 contenders, but six dense (8, 4096, 4096) float32 weight arrays
built per ratio and a 1.3 s Recompute per update; 64-87 s per ratio). To
shorten a run, lower ``max_segment_s``/``long_segment_s`` or pass fewer
``--ratios``.

    python benchmarks/bench_policy.py --regime paper                # N = 1024
    python benchmarks/bench_policy.py --regime llm                  # N = 4096
    python benchmarks/bench_policy.py --quick --out /tmp/policy     # smoke test, seconds
    python benchmarks/bench_policy.py --regime paper --size 512 --ratios 0.1,10

Writes ``policy_<regime>.json``, ``policy_<regime>.txt`` and (with
matplotlib) ``policy_<regime>.png`` into ``--out`` (default docs/figures),
with the command line, the git commit, the machine, the policy's rates and the
load from other processes (per ratio and for the whole run).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from dynattn import DynamicAttention, policy
from dynattn._timing import (
    LoadMonitor,
    fmt_seconds,
    format_table,
    gemm_rate,
    git_commit,
    interleaved,
    machine_info,
    target,
    targets_summary,
    write_report,
)
from dynattn.baselines import Eager, OnDemand, Recompute
from dynattn.testing import random_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streams import blas_threads, thread_settings  # noqa: E402  (the thread helpers, reused)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "dynattn-policy/1"
REGIMES = ("paper", "llm")
TAUS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_RATIOS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
AUTO = "auto"
#: updates (and queries) generated per block of the seeded sequence
BLOCK = 256
#: targets: auto's median within this factor of the best other contender, and OnDemand / auto above
AUTO_OVER_BEST_MAX = 1.25
ONDEMAND_OVER_AUTO_MIN = 0.95


@dataclass
class PolicyConfig:
    """Sizes and effort of one run (``preset`` gives the command line's choices)."""

    regime: str = "paper"
    size: int = 1024
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    repeats: int = 3
    heads: int = 8  # llm regime
    head_dim: int = 64  # llm regime
    seed: int = 0
    probe_updates: int = 20
    probe_s: float = 0.3
    min_queries: int = 4  # per segment
    min_segment_s: float = 0.2
    max_segment_s: float = 1.0
    long_segment_s: float = 3.0
    recompute_cell_limit_s: float = 10.0
    gemm_size: int = 512
    threads: int = 1  # BLAS threads (see the module docstring)

    @classmethod
    def preset(cls, regime: str = "paper", *, quick: bool = False) -> PolicyConfig:
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")
        if quick:
            return cls(
                regime=regime,
                size=48 if regime == "paper" else 64,
                ratios=[0.1, 10.0],
                repeats=1,
                probe_updates=4,
                probe_s=0.02,
                min_queries=2,
                min_segment_s=0.01,
                max_segment_s=0.05,
                long_segment_s=0.1,
                gemm_size=64,
            )
        return cls(regime=regime, size=1024 if regime == "paper" else 4096)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.regime == "paper" else np.float32)

    @property
    def scale(self) -> float:
        return 1.0 if self.regime == "paper" else self.head_dim**-0.5


# ---------------------------------------------------------------------- the workload
def ratio_fraction(ratio: float) -> Fraction:
    """``ratio`` as an exact fraction of its decimal spelling (0.03 -> 3/100)."""
    return Fraction(repr(float(ratio))).limit_denominator(10**6)


class Workload:
    """The seeded update and query sequence, by global index (the same for every contender).

    Parameters
    ----------
    cfg : PolicyConfig
    ratio : float
        Queries per update.
    shape : (H, n, m, d, e)
    """

    def __init__(self, cfg: PolicyConfig, ratio: float, shape: tuple[int, int, int, int, int]):
        self.cfg = cfg
        self.ratio = ratio_fraction(ratio)
        self.H, self.n, self.m, self.d, self.e = shape
        self._updates: dict[int, tuple[Any, ...]] = {}
        self._queries: dict[int, tuple[Any, ...]] = {}

    def queries_before(self, g: int) -> int:
        """Queries issued after updates 0 .. g-1: ``floor(g * r)``."""
        return (g * self.ratio.numerator) // self.ratio.denominator

    def _update_block(self, b: int) -> tuple[Any, ...]:
        if b not in self._updates:
            if len(self._updates) > 64:
                self._updates.clear()
            rng = np.random.default_rng([self.cfg.seed, 0, b])
            if self.cfg.regime == "paper":
                rows = rng.integers(0, self.m, BLOCK).tolist()
                kcols = rng.integers(0, self.d, BLOCK).tolist()
                vcols = rng.integers(0, self.e, BLOCK).tolist()
                deltas = rng.normal(0.0, 0.1, BLOCK).tolist()
                self._updates[b] = (rows, kcols, vcols, deltas)
            else:
                tokens = rng.integers(0, self.m, BLOCK).tolist()
                keys = rng.standard_normal((BLOCK, self.H, self.d)).astype(self.cfg.dtype)
                values = rng.standard_normal((BLOCK, self.H, self.e)).astype(self.cfg.dtype)
                self._updates[b] = (tokens, list(keys), list(values))
        return self._updates[b]

    def _query_block(self, b: int) -> tuple[Any, ...]:
        if b not in self._queries:
            if len(self._queries) > 1024:
                self._queries.clear()
            rng = np.random.default_rng([self.cfg.seed, 1, b])
            rows = rng.integers(0, self.n, BLOCK).tolist()
            cols = rng.integers(0, self.e, BLOCK).tolist()
            self._queries[b] = (rows, cols)
        return self._queries[b]

    def chunk(self, start: int, count: int) -> dict[str, Any]:
        """Updates ``start .. start+count-1`` (within one block) and their queries, as lists."""
        b, offset = divmod(start, BLOCK)
        count = min(count, BLOCK - offset)
        block = self._update_block(b)
        events = [list(part[offset : offset + count]) for part in block]
        q0 = self.queries_before(start)
        bounds = [self.queries_before(start + u + 1) - q0 for u in range(count)]
        total = bounds[-1] if bounds else 0
        qrows: list[int] = []
        qcols: list[int] = []
        q = q0
        while q < q0 + total:
            qb, qoff = divmod(q, BLOCK)
            take = min(BLOCK - qoff, q0 + total - q)
            rows, cols = self._query_block(qb)
            qrows += rows[qoff : qoff + take]
            qcols += cols[qoff : qoff + take]
            q += take
        return {"count": count, "events": events, "bounds": bounds, "qrows": qrows, "qcols": qcols}


def run_chunk(
    regime: str, obj: Any, chunk: dict[str, Any], start: int, limit_s: float
) -> tuple[int, int, float]:
    """Apply one chunk to ``obj``, timed; stop after the update that brings the time past
    ``limit_s``. Returns (updates done, queries done, seconds)."""
    bounds, qrows, qcols = chunk["bounds"], chunk["qrows"], chunk["qcols"]
    clock = time.perf_counter
    done = 0
    lo = 0
    if regime == "paper":
        rows, kcols, vcols, deltas = chunk["events"]
        update_k, update_v, query = obj.update_k, obj.update_v, obj.query
        parity = start % 2
        t0 = clock()
        for u in range(chunk["count"]):
            if (u + parity) % 2 == 0:
                update_k(rows[u], kcols[u], deltas[u])
            else:
                update_v(rows[u], vcols[u], deltas[u])
            hi = bounds[u]
            for x in range(lo, hi):
                query(qrows[x], qcols[x])
            lo = hi
            done = u + 1
            if clock() - t0 > limit_s:
                break
    else:
        tokens, keys, values = chunk["events"]
        set_token, query_row = obj.set_token, obj.query_row
        t0 = clock()
        for u in range(chunk["count"]):
            set_token(tokens[u], k=keys[u], v=values[u])
            hi = bounds[u]
            for x in range(lo, hi):
                query_row(qrows[x])
            lo = hi
            done = u + 1
            if clock() - t0 > limit_s:
                break
    elapsed = clock() - t0
    return done, lo, elapsed


# ---------------------------------------------------------------------- contenders
def expected_cycle(m: int, threshold: int) -> float:
    """Expected random updates (uniform rows) until ``threshold`` distinct rows of m are pending."""
    return float(sum(m / (m - k) for k in range(min(threshold, m))))


class Contender:
    """One structure under measurement with its own cursor in the common sequence."""

    def __init__(self, label: str, kind: str, obj: Any, workload: Workload, regime: str, tau: Any = None):
        self.label, self.kind, self.obj, self.workload, self.regime = label, kind, obj, workload, regime
        self.tau = tau
        self.cursor = 0
        self.updates_per_segment = 1
        self.limit_s = 1.0
        self.cycle = 0.0
        self.observed_cycle: float | None = None  # tau="auto": updates per fold in the warm-up
        self.minimum_updates = 1
        self.probe: dict[str, Any] = {}
        self.segments: list[dict[str, Any]] = []  # timed segments (after the warm-up round)
        self.warmup_updates = 0
        self.timing: Any = None
        self.stats_before: dict[str, int] | None = None
        self.stats_after: dict[str, int] | None = None

    @property
    def dynamic(self) -> bool:
        return isinstance(self.obj, DynamicAttention)

    def run(self, updates: int, limit_s: float) -> dict[str, Any]:
        """The next ``updates`` updates of the sequence (fewer once ``limit_s`` is spent)."""
        stats0 = self.obj.stats if self.dynamic else None
        done = queries = 0
        elapsed = 0.0
        while done < updates and (done == 0 or elapsed <= limit_s):
            chunk = self.workload.chunk(self.cursor, updates - done)
            d, q, t = run_chunk(self.regime, self.obj, chunk, self.cursor, limit_s - elapsed)
            self.cursor += d
            done += d
            queries += q
            elapsed += t
        seg: dict[str, Any] = {"updates": done, "queries": queries, "seconds": elapsed}
        if stats0 is not None:
            stats1 = self.obj.stats
            seg["folds"] = stats1["folds"] - stats0["folds"]
        return seg

    def sample(self, cfg: PolicyConfig) -> Callable[[], float]:
        def run() -> float:
            seg = self.run(self.updates_per_segment, self.limit_s)
            self.segments.append(seg)
            if self.kind == "auto" and len(self.segments) == 1:
                self.after_warmup(cfg, seg)
            return seg["seconds"] / max(1, seg["updates"])

        return run

    def after_warmup(self, cfg: PolicyConfig, warm: dict[str, Any]) -> None:
        """``tau="auto"``: once the warm-up segment folded at least twice, time segments of
        two observed fold cycles (still at least the query and time minimums)."""
        folds = warm.get("folds", 0)
        if folds >= 2:
            cycle = warm["updates"] / folds
            per_update = warm["seconds"] / max(1, warm["updates"])
            self.observed_cycle = cycle
            self.updates_per_segment = max(self.minimum_updates, math.ceil(2 * cycle))
            self.limit_s = (
                cfg.long_segment_s if 2 * cycle * per_update > cfg.max_segment_s else cfg.max_segment_s
            )


def build_contenders(cfg: PolicyConfig, Q: Any, K: Any, V: Any, workload: Workload) -> list[Contender]:
    """Every contender, built from the same Q, K, V (copied by each constructor)."""
    common: dict[str, Any] = {"scale": cfg.scale, "dtype": cfg.dtype}
    out = [
        Contender("OnDemand", "baseline", OnDemand(Q, K, V, **common), workload, cfg.regime),
        Contender("Eager", "baseline", Eager(Q, K, V, **common), workload, cfg.regime),
        Contender("Recompute", "baseline", Recompute(Q, K, V, **common), workload, cfg.regime),
    ]
    storages = ("dense", "implicit") if cfg.regime == "paper" else ("auto",)
    for storage in storages:
        for tau in TAUS:
            att = DynamicAttention(Q, K, V, tau=tau, storage=storage, **common)
            label = f"tau={tau:g} {att.storage}" + (" (auto)" if storage == "auto" else "")
            out.append(Contender(label, "fixed", att, workload, cfg.regime, tau))
    att = DynamicAttention(Q, K, V, tau=AUTO, storage="auto", **common)
    out.append(Contender(f"tau=auto {att.storage}", "auto", att, workload, cfg.regime, AUTO))
    return out


def choose_segment(cfg: PolicyConfig, c: Contender, ratio: float) -> None:
    """Segment length and time limit of ``c`` at this ratio, from its probe."""
    per_update = c.probe["seconds_per_update"]
    by_queries = math.ceil(cfg.min_queries / ratio) if ratio < cfg.min_queries else 1
    by_time = math.ceil(cfg.min_segment_s / max(per_update, 1e-9))
    if c.kind in ("fixed", "auto"):
        c.cycle = expected_cycle(c.obj.m, int(c.obj.threshold))
    c.minimum_updates = max(1, by_queries, by_time)
    c.updates_per_segment = max(c.minimum_updates, math.ceil(c.cycle))
    long_cycle = c.cycle * per_update > cfg.max_segment_s
    c.limit_s = cfg.long_segment_s if long_cycle else cfg.max_segment_s


# ---------------------------------------------------------------------- one ratio
def measure_ratio(
    cfg: PolicyConfig,
    ratio: float,
    problem: tuple[Any, Any, Any],
    shape: tuple[int, int, int, int, int],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """All contenders at one ratio: probe, segment choice, warm-up round, timed rounds."""
    monitor = LoadMonitor().start()
    load_before = os.getloadavg()
    started = time.perf_counter()
    workload = Workload(cfg, ratio, shape)
    t0 = time.perf_counter()
    contenders = build_contenders(cfg, *problem, workload)
    build_s = time.perf_counter() - t0
    skipped: dict[str, str] = {}
    for c in contenders:
        probe_count = max(cfg.probe_updates, math.ceil(2 / ratio))
        seg = c.run(probe_count, cfg.probe_s)
        c.probe = {**seg, "seconds_per_update": seg["seconds"] / max(1, seg["updates"])}
        choose_segment(cfg, c, ratio)
        if c.label == "Recompute":
            # a cell: the probe, a warm-up segment and `repeats` segments of >= 1 update each
            cell_s = (
                c.probe["seconds_per_update"]
                * (1 + cfg.repeats)
                * max(1, min(c.updates_per_segment, math.ceil(c.limit_s / c.probe["seconds_per_update"])))
            )
            if cell_s + c.probe["seconds"] > cfg.recompute_cell_limit_s:
                skipped[c.label] = (
                    f"one cell would take about {cell_s:.0f} s (> {cfg.recompute_cell_limit_s:g} s): "
                    f"{fmt_seconds(c.probe['seconds_per_update'])} per update"
                )
    contenders = [c for c in contenders if c.label not in skipped]
    for c in contenders:
        c.stats_before = c.obj.stats if c.dynamic else None

    # interleaved: one untimed warm-up round, then `repeats` timed rounds (rotating order);
    # every sample appends its segment, so segments[0] is the warm-up round's
    fns = {c.label: c.sample(cfg) for c in contenders}
    timings = interleaved(fns, repeats=cfg.repeats, warmup=1)
    cells: dict[str, Any] = {}
    for c in contenders:
        warm, timed = c.segments[0], c.segments[1:]
        c.warmup_updates = c.probe["updates"] + warm["updates"]
        t = timings[c.label]
        cell: dict[str, Any] = {
            "kind": c.kind,
            "tau": c.tau,
            "storage": getattr(c.obj, "storage", None),
            **t.as_dict("seconds_per_update"),
            "pooled_seconds_per_update": sum(x["seconds"] for x in timed)
            / max(1, sum(x["updates"] for x in timed)),
            "updates_per_segment": c.updates_per_segment,
            "segment_limit_s": c.limit_s,
            "segments": timed,
            "warmup_updates": c.warmup_updates,
            "probe": c.probe,
        }
        if c.kind in ("fixed", "auto"):
            cell["threshold"] = int(c.obj.threshold)
            cell["expected_cycle_updates"] = c.cycle
            short = min(s["updates"] for s in timed) < c.cycle
            if c.kind == "auto":  # its cycle is its own choice: partial when a short segment did not fold
                short = short and min(s["folds"] for s in timed) == 0
            cell["partial_cycle"] = bool(short)
            cell["observed_cycle_updates"] = c.observed_cycle
            after = c.obj.stats
            before = c.stats_before or {}
            cell["stats_timed"] = {k: after[k] - before.get(k, 0) for k in after}
            cell["policy"] = c.obj.policy
        cells[c.label] = cell
    auto_label = next(c.label for c in contenders if c.kind == "auto")
    others = {k: v["seconds_per_update"] for k, v in cells.items() if k != auto_label}
    best_other = min(others, key=lambda k: others[k])
    medians = {k: v["seconds_per_update"] for k, v in cells.items()}
    pooled = {k: v["pooled_seconds_per_update"] for k, v in cells.items() if k != auto_label}
    winner = min(medians, key=lambda k: medians[k])
    auto_t = medians[auto_label]
    load = monitor.stop()
    record = {
        "ratio": ratio,
        "ratio_fraction": str(workload.ratio),
        "cells": cells,
        "skipped": skipped,
        "auto": auto_label,
        "winner": winner,
        "best_other": best_other,
        "auto_over_best": auto_t / others[best_other],
        "ondemand_over_auto": medians["OnDemand"] / auto_t,
        "auto_over_best_pooled": cells[auto_label]["pooled_seconds_per_update"] / min(pooled.values()),
        "ondemand_over_auto_pooled": cells["OnDemand"]["pooled_seconds_per_update"]
        / cells[auto_label]["pooled_seconds_per_update"],
        "auto_stats_timed": {
            k: cells[auto_label]["stats_timed"][k]
            for k in (
                "folds",
                "columns_materialized",
                "columns_deferred",
                "updates",
                "reads",
                "dormant_periods",
                "wakes",
            )
        },
        "build_s": build_s,
        "elapsed_s": time.perf_counter() - started,
        "other_load_cores": load,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    echo(
        f"r = {ratio:g}: winner {winner} ({fmt_seconds(medians[winner])}/update), auto "
        f"{fmt_seconds(auto_t)} = {record['auto_over_best']:.2f}x best other ({best_other}), "
        f"OnDemand/auto {record['ondemand_over_auto']:.2f}; "
        f"auto folds {record['auto_stats_timed']['folds']}, "
        f"materialized {record['auto_stats_timed']['columns_materialized']}, deferred "
        f"{record['auto_stats_timed']['columns_deferred']}, dormant "
        f"{record['auto_stats_timed']['dormant_periods']}, woke {record['auto_stats_timed']['wakes']}; "
        f"{record['elapsed_s']:.0f} s, other load " + ("-" if load is None else f"{load:.2f}")
    )
    del contenders, fns
    gc.collect()
    return record


# ---------------------------------------------------------------------- report
def src_diff() -> dict[str, Any]:
    """Uncommitted changes under ``src/`` when the run started: the files, and a sha256 of
    ``git diff HEAD -- src`` (so a run against a working tree can be matched to it later)."""
    import hashlib
    import subprocess

    try:
        diff = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "HEAD", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"files": None, "sha256": None}
    files = sorted({line[6:] for line in diff.splitlines() if line.startswith("+++ b/")})
    return {"files": files, "sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def make_problem(cfg: PolicyConfig) -> tuple[tuple[Any, Any, Any], tuple[int, int, int, int, int]]:
    N = cfg.size
    if cfg.regime == "paper":
        return random_problem(N, N, N, N, seed=cfg.seed, dtype=cfg.dtype), (1, N, N, N, N)
    rng = np.random.default_rng(cfg.seed)
    H, d = cfg.heads, cfg.head_dim
    Q, K, V = (rng.standard_normal((H, N, d)).astype(cfg.dtype) for _ in range(3))
    return (Q, K, V), (H, N, N, d, d)


def report_text(cfg: PolicyConfig, result: dict[str, Any]) -> str:
    records = result["records"]
    labels: list[str] = []
    for rec in records:
        labels += [k for k in rec["cells"] if k not in labels]
    rows = []
    for rec in records:
        cells = rec["cells"]
        row: list[Any] = [f"{rec['ratio']:g}"]
        for label in labels:
            t = cells.get(label)
            if t is None:
                row.append("skip")
                continue
            mark = "*" if label == rec["winner"] else ""
            mark += "~" if t.get("partial_cycle") else ""
            row.append(fmt_seconds(t["seconds_per_update"]) + mark)
        row += [
            rec["winner"],
            f"{rec['auto_over_best']:.2f}",
            f"{rec['ondemand_over_auto']:.2f}",
            f"{rec['auto_over_best_pooled']:.2f}",
            f"{rec['ondemand_over_auto_pooled']:.2f}",
        ]
        rows.append(row)
    table = format_table(
        ["r", *labels, "winner", "auto/best", "OnDemand/auto", "pooled: auto/best", "OnDemand/auto"], rows
    )
    spread_rows = []
    for rec in records:
        for label, t in rec["cells"].items():
            segs = t["segments"]
            spread_rows.append(
                [
                    f"{rec['ratio']:g}",
                    label,
                    fmt_seconds(t["seconds_per_update"]),
                    f"{fmt_seconds(t['seconds_per_update_min'])}-{fmt_seconds(t['seconds_per_update_max'])}",
                    fmt_seconds(t["pooled_seconds_per_update"]),
                    t["updates_per_segment"],
                    "/".join(str(s["updates"]) for s in segs),
                    "/".join(str(s["queries"]) for s in segs),
                    "/".join(str(s.get("folds", "-")) for s in segs),
                    "-" if "threshold" not in t else t["threshold"],
                    "-" if "partial_cycle" not in t else ("yes" if t["partial_cycle"] else "no"),
                    t["warmup_updates"],
                ]
            )
    spread = format_table(
        [
            "r",
            "contender",
            "median",
            "min-max",
            "pooled",
            "U target",
            "updates/segment",
            "queries/segment",
            "folds/segment",
            "threshold",
            "partial",
            "warm-up",
        ],
        spread_rows,
    )
    stat_rows = []
    for rec in records:
        s = rec["cells"][rec["auto"]]["stats_timed"]
        stat_rows.append(
            [
                f"{rec['ratio']:g}",
                s["updates"],
                s["reads"],
                s["folds"],
                s["columns_deferred"],
                s["columns_materialized"],
                s["fresh_columns"],
                s["rows_refreshed"],
                s["query_fallbacks"],
                f"{rec['auto_over_best']:.2f}",
                rec["best_other"],
                "-" if rec["other_load_cores"] is None else f"{rec['other_load_cores']:.2f}",
                f"{rec['loadavg_before'][0]:.2f}/{rec['loadavg_after'][0]:.2f}",
            ]
        )
    stats = format_table(
        [
            "r",
            "updates",
            "reads",
            "folds",
            "cols deferred",
            "cols materialized",
            "fresh cols",
            "rows refreshed",
            "fallbacks",
            "auto/best",
            "best other",
            "other load",
            "loadavg 1m",
        ],
        stat_rows,
    )
    s = result["summary"]
    machine = result["machine"]
    H, n, m, d, e = result["shape"]
    lines = [
        f"# {result['command']}",
        f"# commit {result['git_commit']}"
        + (
            f"; uncommitted src changes in {', '.join(result['src_diff']['files'])} "
            f"(diff sha256 {result['src_diff']['sha256'][:12]})"
            if result["src_diff"]["files"]
            else ""
        ),
        f"# {machine['cpu_model']}, {machine['cores']} cores, numpy {machine['numpy']} ({machine['blas']}); "
        f"GEMM {cfg.gemm_size}^3: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in machine.get("gemm_gflops", {}).items()),
        f"# policy rates: {result['policy_rates']}",
        f"# BLAS threads: {cfg.threads} (settings during the run: {result['threads']['during']})",
        f"# regime {cfg.regime}: H = {H}, n = {n}, m = {m}, d = {d}, e = {e}, {cfg.dtype.name}, "
        f"scale {cfg.scale:g}; {cfg.repeats} timed rounds after 1 warm-up round (and a probe)",
        "# other load during the run (cores other processes kept busy, LoadMonitor): "
        + ("-" if result["other_load_cores"] is None else f"{result['other_load_cores']:.2f}")
        + "; loadavg (1 min) "
        f"{result['loadavg_start'][0]:.2f} at the start, {result['loadavg_end'][0]:.2f} at the end",
        "",
        "## seconds per update (queries included), median over the timed segments",
        "(* winner; ~ partial_cycle: a timed segment was shorter than one expected fold cycle (auto: and",
        " did not fold); auto/best = auto / best other contender; OnDemand/auto > 1: auto faster;",
        " pooled: the same ratios of all timed seconds / all timed updates of each cell)",
        table,
        "",
        f"worst auto/best over all r: {s['worst_auto_over_best']:.2f} "
        f"(r = {s['worst_auto_over_best_ratio']:g}); target auto/best <= {AUTO_OVER_BEST_MAX} in every r: "
        f"{'holds' if s['auto_within_target'] else 'FAILS'}",
        f"worst OnDemand/auto over all r: {s['worst_ondemand_over_auto']:.2f} "
        f"(r = {s['worst_ondemand_over_auto_ratio']:g}); target OnDemand/auto >= {ONDEMAND_OVER_AUTO_MIN} "
        f"in every r: {'holds' if s['ondemand_within_target'] else 'FAILS'}",
        "",
        "## tau=auto: att.stats counters changed during its timed segments",
        stats,
        "",
        "## every cell: median, min-max, segment lengths, queries and folds per timed segment",
        spread,
    ]
    skipped = [(rec["ratio"], k, v) for rec in records for k, v in rec["skipped"].items()]
    if skipped:
        lines.append("")
        lines += [f"skipped at r = {r:g}: {k}: {why}" for r, k, why in skipped]
    lines.append(targets_summary(result["targets"]))
    lines.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, echo: Callable[[str], None]) -> bool:
    """x = r (log), y = seconds per update (log), one line per contender, auto highlighted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        echo("matplotlib is not installed: no figure (pip install 'dynattn[plot]')")
        return False
    records = result["records"]
    labels: list[str] = []
    for rec in records:
        labels += [k for k in rec["cells"] if k not in labels]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    cmap = plt.get_cmap("tab10")
    colors = {"OnDemand": cmap(0), "Eager": cmap(7), "Recompute": cmap(5)}
    colors.update({f"{tau:g}": cmap(1 + i) for i, tau in enumerate(TAUS)})
    for label in labels:
        xs = [rec["ratio"] for rec in records if label in rec["cells"]]
        ys = [rec["cells"][label]["seconds_per_update"] for rec in records if label in rec["cells"]]
        if label.startswith("tau=auto"):
            ax.plot(xs, ys, color="black", linewidth=3, marker="o", label=label, zorder=5)
        elif label in colors:  # a baseline
            ax.plot(xs, ys, ":", color=colors[label], linewidth=1.6, marker="s", markersize=3, label=label)
        else:  # tau=<t> <storage>: one colour per tau, dashed when implicit
            color = colors.get(label.split()[0].removeprefix("tau="), "gray")
            style = "--" if "implicit" in label else "-"
            ax.plot(xs, ys, style, color=color, linewidth=1.3, marker=".", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queries per update r")
    ax.set_ylabel("seconds per update (queries included)")
    H, n, m, d, e = result["shape"]
    ax.set_title(
        f"measured mixed workloads, {result['config']['regime']} regime "
        f"(H={H}, n=m={n}, d=e={d}, {result['config']['dtype']})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- driver
def run_policy(
    cfg: PolicyConfig,
    *,
    out_dir: Path | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every ratio; return the result and write ``policy_<regime>.*`` into ``out_dir``."""
    threads_at_start = thread_settings()
    with blas_threads(cfg.threads) as settings:
        return _run_policy(cfg, out_dir, command, echo, {"at_start": threads_at_start, "during": settings})


def _run_policy(
    cfg: PolicyConfig,
    out_dir: Path | None,
    command: str,
    echo: Callable[[str], None],
    threads: dict[str, Any],
) -> dict[str, Any]:
    rates = {cfg.dtype.name: gemm_rate(cfg.dtype, cfg.gemm_size, 3)}
    pr = policy.rates()  # measured once per process, before anything is timed
    problem, shape = make_problem(cfg)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "git_commit": git_commit(),
        "src_diff": src_diff(),
        "machine": machine_info(rates),
        "policy_rates": {"gemm": pr.gemm, "gemv": pr.gemv, "call": pr.call},
        "dynattn_rates_env": os.environ.get("DYNATTN_RATES"),
        "threads": threads,
        "config": {**asdict(cfg), "dtype": cfg.dtype.name, "scale": cfg.scale},
        "shape": list(shape),
        "loadavg_start": list(os.getloadavg()),
        "records": [],
        "targets": [],
    }
    monitor = LoadMonitor().start()
    started = time.perf_counter()
    for ratio in cfg.ratios:
        result["records"].append(measure_ratio(cfg, ratio, problem, shape, echo))
    result["elapsed_s"] = time.perf_counter() - started
    load = monitor.stop()
    result["other_load_cores"] = load  # None where /proc/stat is not readable
    result["loadavg_end"] = list(os.getloadavg())
    records = result["records"]
    worst = max(records, key=lambda rec: rec["auto_over_best"])
    worst_od = min(records, key=lambda rec: rec["ondemand_over_auto"])
    result["summary"] = {
        "per_ratio": [
            {
                k: rec[k]
                for k in ("ratio", "winner", "best_other", "auto_over_best", "ondemand_over_auto", "auto")
            }
            for rec in records
        ],
        "worst_auto_over_best": worst["auto_over_best"],
        "worst_auto_over_best_ratio": worst["ratio"],
        "worst_ondemand_over_auto": worst_od["ondemand_over_auto"],
        "worst_ondemand_over_auto_ratio": worst_od["ratio"],
        "auto_within_target": all(rec["auto_over_best"] <= AUTO_OVER_BEST_MAX for rec in records),
        "ondemand_within_target": all(rec["ondemand_over_auto"] >= ONDEMAND_OVER_AUTO_MIN for rec in records),
    }
    for rec in records:
        where = {"regime": cfg.regime, "ratio": rec["ratio"]}
        result["targets"].append(
            target(
                f"auto / best other <= {AUTO_OVER_BEST_MAX}",
                rec["auto_over_best"],
                AUTO_OVER_BEST_MAX,
                "max",
                where,
            )
        )
        result["targets"].append(
            target(
                f"OnDemand / auto >= {ONDEMAND_OVER_AUTO_MIN}",
                rec["ondemand_over_auto"],
                ONDEMAND_OVER_AUTO_MIN,
                "min",
                where,
            )
        )
    result["text"] = report_text(cfg, result)
    echo(result["text"])
    if out_dir is not None:
        stem = f"policy_{cfg.regime}"
        out_dir.mkdir(parents=True, exist_ok=True)
        result["figure"] = f"{stem}.png" if plot(result, out_dir / f"{stem}.png", echo) else None
        write_report(result, out_dir, stem)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the result dictionary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--regime", choices=REGIMES, default="paper")
    parser.add_argument("--size", type=int, help="N (default 1024 paper, 4096 llm)")
    parser.add_argument("--ratios", help="queries per update, comma-separated (default 0.01,...,100)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="BLAS (OpenBLAS, torch) threads during the run (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 ratios, 1 repeat (smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="output folder")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cfg = PolicyConfig.preset(args.regime, quick=args.quick)
    if args.size is not None:
        cfg.size = args.size
    if args.ratios:
        cfg.ratios = [float(x) for x in args.ratios.split(",")]
    if args.repeats:
        cfg.repeats = args.repeats
    cfg.seed = args.seed
    cfg.threads = args.threads
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_policy.py", *given])
    return run_policy(cfg, out_dir=None if args.no_write else args.out, command=command)


if __name__ == "__main__":
    main()
