"""``dynattn demo``: a short mixed workload, timed and checked answer by answer.

:func:`run_demo` runs the same stream of entry updates of K and V, interleaved
with queries (:func:`demo_workload`), on DynamicAttention and the baselines
Recompute, OnDemand and Eager, and compares every answer with a float64
recomputation; :func:`format_demo` prints the table and the PASS/FAIL verdict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
    machine_info,
    time_call,
)
from dynattn.baselines import Eager, OnDemand, Recompute, Rows
from dynattn.progress import make_progress
from dynattn.report import format_machine
from dynattn.sweep import add_ratios, resolve_dtype
from dynattn.testing import TARGET, random_problem, reference_attention


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
        kind = "k" if u % 2 == 0 else "v"
        row = int(rng.integers(m))
        col = int(rng.integers(d if kind == "k" else e))
        ops.append((kind, row, col, float(rng.normal(0, cfg.delta_std))))
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
        pending = getattr(self.obj, "pending", 0)
        if hasattr(self.obj, "rebuild") and pending:
            t0 = time.perf_counter()
            self.obj.rebuild()
            self.update_time += time.perf_counter() - t0


def run_demo(cfg: DemoConfig, progress_mode: str = "auto") -> dict[str, Any]:
    """The README's demo: a short mixed workload, timed and checked answer by answer.

    Every implementation (DynamicAttention at ``cfg.tau`` and the four
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
    from dynattn import DynamicAttention  # looked up now: tests substitute a faulty one

    dtype = resolve_dtype(cfg.dtype)
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
        _DemoRunner("rows", Rows(Q, K, V, dtype=dtype), ops, cfg.updates),
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
        for rnd in range(rounds):
            for idx in range(len(runners)):
                runner = runners[(idx + rnd) % len(runners)]
                runner.run(math.ceil(runner.max_updates / rounds))
                progress.advance(f"round {rnd + 1}/{rounds} {runner.name}")
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
    rows: list[dict[str, Any]] = []
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
    add_ratios(rows, by=())
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
    rows: list[list[Any]] = []
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
