"""Hot paths of DynamicAttention against what a practitioner would write, in one run.

Every section measures its contenders round-robin (``dynattn._timing.interleaved``:
one warm-up round, then ``--repeats`` timed rounds in rotating order) and
reports the median with the min-max over the rounds, the ratio to dynattn and
the target it is held to:

a. token edit (``set_key`` + ``set_value`` of a random token) + ``query_rows`` of
   k random rows, 8 heads, d = e = 64, float32, tau = 0.5: dynattn, ``Rows``
   (numpy), torch SDPA over just those rows (the new key/value written into a
   cache first), ``Eager``, and ``tau="auto"`` (one structure through every k,
   its policy state after each k reported), which the deferred targets name;
b. causal decode from n0 tokens: ``append`` + query of the new row, dynattn
   (dense, implicit, auto) against a numpy KV-cache attention of the new row and
   torch SDPA; median, slowest single step, ``nbytes`` against ``memory_budget``.
   The KV caches are allocated for every token of the run before it starts, and
   dynattn reserves the same room (``reserve``, timed apart, not in the steps);
   the ``grown`` rows are dynattn without ``reserve``, its capacity doubling
   inside the steps, measured after the others (interleaved among themselves);
c. all rows after a token edit: ``query_rows(all)`` with rows pending against
   ``Eager`` doing the same edit and reading all rows;
d. ``update_k_many`` of 1000 random entry updates against a Python loop of
   ``update_k``, and ``query_many`` against a loop of ``query`` (paper regime,
   n = m = d = e, float64, tau = 0.5);
e. construction against one full numpy recomputation of the output;
f. float32 against float64 amortized ``update_k`` (whole fold cycles), paper
   regime, tau = 0.5 and 0.875;
g. query fallbacks (``stats["query_fallbacks"]``) on random workloads;
h. ``Eager``'s ``update_k`` against a plain numpy rank-1 update (the baseline's
   honesty).

    python benchmarks/bench_paths.py            # a few minutes: n = 4096
    python benchmarks/bench_paths.py --quick    # < 60 s, small sizes
    python benchmarks/bench_paths.py --full     # adds n = 16384 (long)

Writes ``docs/figures/paths.json`` and ``docs/figures/paths.txt`` (``--out-dir``
to change), with the command line and the git commit.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import (
    Timing,
    add_output_options,
    fmt_ratio,
    fmt_seconds,
    format_table,
    git_commit,
    interleaved,
    machine_info,
    target,
    targets_summary,
    write_report,
)
from dynattn.baselines import Eager, Rows

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "dynattn-paths/1"


@dataclass
class PathsConfig:
    """Sizes and effort of one run (``preset`` gives the command line's choices)."""

    heads: int = 8
    head_dim: int = 64
    token_sizes: list[int] = field(default_factory=lambda: [4096])
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    decode_sizes: list[int] = field(default_factory=lambda: [4096])
    decode_steps: int = 64
    allrows_sizes: list[int] = field(default_factory=lambda: [4096])
    batch_n: int = 1024
    batch_updates: int = 1000
    construct_sizes: list[int] = field(default_factory=lambda: [4096])
    dtype_n: int = 2048
    dtype_taus: list[float] = field(default_factory=lambda: [0.5, 0.875])
    fallback_cases: list[tuple[int, float, str]] = field(
        default_factory=lambda: [(2048, 0.875, "1"), (512, 0.5, "1/sqrt(n)")]
    )
    fallback_steps: int = 2000
    eager_n: int = 1024
    repeats: int = 5
    memory_budget: int = 1 << 30

    @classmethod
    def preset(cls, *, quick: bool = False, full: bool = False) -> PathsConfig:
        if quick:
            return cls(
                token_sizes=[1024],
                decode_sizes=[1024],
                decode_steps=16,
                allrows_sizes=[1024],
                batch_n=256,
                construct_sizes=[1024],
                dtype_n=512,
                fallback_cases=[(512, 0.875, "1"), (256, 0.5, "1/sqrt(n)")],
                fallback_steps=300,
                eager_n=512,
                repeats=2,
            )
        if full:
            return cls(
                token_sizes=[4096, 16384],
                decode_sizes=[4096, 16384],
                allrows_sizes=[4096, 16384],
                construct_sizes=[4096, 16384],
            )
        return cls()

    @classmethod
    def tiny(cls) -> PathsConfig:
        """Seconds-long sizes, for the smoke test (structure of the output only)."""
        return cls(
            heads=2,
            head_dim=8,
            token_sizes=[64],
            ks=[1, 4],
            decode_sizes=[32],
            decode_steps=4,
            allrows_sizes=[64],
            batch_n=16,
            batch_updates=50,
            construct_sizes=[64],
            dtype_n=32,
            dtype_taus=[0.5],
            fallback_cases=[(32, 0.875, "1"), (32, 0.5, "1/sqrt(n)")],
            fallback_steps=40,
            eager_n=32,
            repeats=1,
        )


# ---------------------------------------------------------------------- helpers
def _torch() -> Any:
    try:
        import torch

        return torch
    except ImportError:
        return None


def _record(
    section: str, case: dict[str, Any], timings: dict[str, Timing], ours: str
) -> list[dict[str, Any]]:
    """One record per contender: median, min, max and the ratio to ``ours`` (theirs / ours)."""
    base = timings[ours].median
    return [
        {
            "section": section,
            **case,
            "contender": name,
            "median_s": t.median,
            "min_s": t.min,
            "max_s": t.max,
            "ratio_to_ours": t.median / base if base > 0 else math.nan,
        }
        for name, t in timings.items()
    ]


def _without_gc(sample: Callable[[], float]) -> Callable[[], float]:
    """``sample`` run after a garbage collection, with the collector off while it runs."""

    def run() -> float:
        gc.collect()
        gc.disable()
        try:
            return sample()
        finally:
            gc.enable()

    return run


def _heads_problem(heads: int, n: int, d: int, dtype: Any, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((heads, n, d)).astype(dtype) for _ in range(3))


def numpy_attention(Q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float) -> np.ndarray:
    """Plain numpy attention per head, ``(H, n, e)`` (stable softmax)."""
    out = np.empty((*Q.shape[:-1], V.shape[-1]), dtype=Q.dtype)
    for h in range(Q.shape[0]):
        logits = Q[h] @ K[h].T
        logits *= Q.dtype.type(scale)
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=-1, keepdims=True)
        out[h] = logits @ V[h]
    return out


class EditStream:
    """Random token edits (token, key rows, value rows) and query rows, cycled."""

    def __init__(self, heads: int, n: int, d: int, dtype: Any, seed: int, count: int = 512):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(n, size=count)
        self.keys = rng.standard_normal((count, heads, d)).astype(dtype)
        self.values = rng.standard_normal((count, heads, d)).astype(dtype)
        self.rows = [rng.choice(n, size=min(64, n), replace=False) for _ in range(count)]
        self.cursor = 0

    def take(self, count: int) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for _ in range(count):
            b = self.cursor % len(self.tokens)
            self.cursor += 1
            out.append((int(self.tokens[b]), self.keys[b], self.values[b], self.rows[b]))
        return out


# ---------------------------------------------------------------------- sections
def section_token_edits(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """a. token edit + query_rows of k rows."""
    table = []
    for n in cfg.token_sizes:
        table += _token_edits_at(cfg, out, n)
    return table


def _token_edits_at(cfg: PathsConfig, out: dict[str, Any], n: int) -> list[list[Any]]:
    table: list[list[Any]] = []
    torch = _torch()
    H, d = cfg.heads, cfg.head_dim
    Q, K, V = _heads_problem(H, n, d, np.float32, seed=n)
    scale = d**-0.5
    options = {"scale": scale, "dtype": np.float32, "memory_budget": cfg.memory_budget}
    att = DynamicAttention(Q, K, V, tau=0.5, **options)
    # the deferred targets: tau="auto" (deferred columns, folds and dormancy by its policy), one
    # structure through every k, as a long-lived one would be
    auto = DynamicAttention(Q, K, V, tau="auto", **options)
    rows_np = Rows(Q, K, V, scale=scale, dtype=np.float32, kernel="numpy")
    eager = Eager(Q, K, V, **options)
    stream = EditStream(H, n, d, np.float32, seed=n + 1)
    cycle = max(att.threshold, 8)  # dynattn: whole fold cycles

    def structure(obj: Any, count: int, k: int) -> Callable[[], float]:
        def sample() -> float:
            plan = stream.take(count)
            start = time.perf_counter()
            for c, key, value, rows in plan:
                obj.set_key(c, key)
                obj.set_value(c, value)
                obj.query_rows(rows[:k])
            return (time.perf_counter() - start) / count

        return sample

    def sdpa_rows(count: int, k: int) -> Callable[[], float]:
        """The practitioner's path: write the token into the cache, SDPA of the k rows."""
        tq, tk, tv = (torch.from_numpy(x.copy()) for x in (Q, K, V))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def sample() -> float:
            plan = stream.take(count)
            start = time.perf_counter()
            for c, key, value, rows in plan:
                tk[:, c] = torch.from_numpy(key)
                tv[:, c] = torch.from_numpy(value)
                sdpa(tq[:, torch.from_numpy(rows[:k])], tk, tv, scale=scale)
            return (time.perf_counter() - start) / count

        return sample

    for k in cfg.ks:
        few = 4 if k >= 16 else 8
        contenders = {
            "dynattn": structure(att, cycle, k),
            "dynattn-auto": structure(auto, cycle, k),
            "rows-numpy": structure(rows_np, few, k),
            "eager": structure(eager, few, k),
        }
        if torch is not None:
            contenders["sdpa-rows"] = sdpa_rows(few, k)
        timings = interleaved(contenders, repeats=cfg.repeats, warmup=1)
        case = {
            "n": n,
            "k": k,
            "heads": H,
            "d": d,
            "dtype": "float32",
            "tau": 0.5,
            "storage": att.storage,
            "auto_state": "dormant" if auto._state.dormant else "awake",
            "auto_stats": auto.stats,
        }
        out["records"] += _record("a_token_edit", case, timings, "dynattn")
        ours = timings["dynattn"].median
        where = {"section": "a_token_edit", "n": n, "k": k}
        row = [n, k, att.storage, _fmt(timings["dynattn"])]
        for name in ("rows-numpy", "sdpa-rows", "eager"):
            row.append(_vs(timings, name, ours))
        auto_s = timings["dynattn-auto"].median
        row.append(f"{_vs(timings, 'dynattn-auto', ours)}, {case['auto_state']} after")
        if "sdpa-rows" in timings:
            r = timings["sdpa-rows"].median / ours
            out["targets"].append(target(">= 2x SDPA over the k rows (fixed tau)", r, 2.0, "min", where))
            r = timings["sdpa-rows"].median / auto_s
            out["targets"].append(target('>= 10x SDPA over the k rows (tau="auto")', r, 10.0, "min", where))
        r = timings["rows-numpy"].median / auto_s
        out["targets"].append(target('>= 10x numpy Rows (tau="auto")', r, 10.0, "min", where))
        row.append("sdpa >= 2x (tau = 0.5); auto: sdpa >= 10x, Rows >= 10x")
        table.append(row)
    return table


def section_decode(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """b. causal decode: append + query of the new row."""
    table = []
    for n0 in cfg.decode_sizes:
        table += _decode_at(cfg, out, n0)
    return table


def _decode_at(cfg: PathsConfig, out: dict[str, Any], n0: int) -> list[list[Any]]:
    table: list[list[Any]] = []
    torch = _torch()
    H, d = cfg.heads, cfg.head_dim
    Q, K, V = _heads_problem(H, n0, d, np.float32, seed=n0 + 2)
    scale = d**-0.5
    steps = cfg.decode_steps
    total = steps * (cfg.repeats + 1) + 1
    rng = np.random.default_rng(n0)
    tokens = rng.standard_normal((total, 3, H, d)).astype(np.float32)
    storages = ["dense", "implicit", "auto"]
    if H * n0 * n0 * 4 > cfg.memory_budget:
        storages = ["implicit", "auto"]  # dense weights alone would exceed the budget
    variants = [(s, True) for s in storages] + [(s, False) for s in storages]
    structures = {
        f"dynattn-{s}" + ("" if room else " grown"): DynamicAttention(
            Q,
            K,
            V,
            tau=0.5,
            scale=scale,
            dtype=np.float32,
            causal=True,
            storage=s,
            memory_budget=cfg.memory_budget,
        )
        for s, room in variants
    }
    reserve_s: dict[str, float] = {}
    for name, obj in structures.items():
        if not name.endswith("grown"):  # the room the KV caches below are allocated with
            start = time.perf_counter()
            obj.reserve(n=n0 + total, m=n0 + total)
            reserve_s[name] = time.perf_counter() - start
    cursors = dict.fromkeys([*structures, "numpy-kv", "sdpa"], 0)
    worst = dict.fromkeys(cursors, 0.0)
    peak_bytes = dict.fromkeys(structures, 0)

    def structure(name: str) -> Callable[[], float]:
        obj = structures[name]

        def sample() -> float:
            elapsed = 0.0
            for _ in range(steps):
                q, k, v = tokens[cursors[name]]
                cursors[name] += 1
                start = time.perf_counter()
                i, _ = obj.append(q=q, k=k, v=v)
                obj.query_row(i)
                step = time.perf_counter() - start
                elapsed += step
                worst[name] = max(worst[name], step)
                peak_bytes[name] = max(peak_bytes[name], obj.nbytes)
            return elapsed / steps

        return sample

    capacity = n0 + total
    cache_k = np.zeros((H, capacity, d), np.float32)
    cache_v = np.zeros((H, capacity, d), np.float32)
    cache_k[:, :n0], cache_v[:, :n0] = K, V
    lengths = {"numpy-kv": n0, "sdpa": n0}

    def numpy_kv() -> float:
        elapsed = 0.0
        for _ in range(steps):
            q, k, v = tokens[cursors["numpy-kv"]]
            cursors["numpy-kv"] += 1
            start = time.perf_counter()
            t = lengths["numpy-kv"]
            cache_k[:, t], cache_v[:, t] = k, v
            lengths["numpy-kv"] = t = t + 1
            numpy_attention(q[:, None], cache_k[:, :t], cache_v[:, :t], scale)
            step = time.perf_counter() - start
            elapsed += step
            worst["numpy-kv"] = max(worst["numpy-kv"], step)
        return elapsed / steps

    contenders = {name: structure(name) for name in structures}
    contenders["numpy-kv"] = numpy_kv
    if torch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tk, tv = torch.from_numpy(cache_k.copy()), torch.from_numpy(cache_v.copy())

        def sdpa_sample() -> float:
            elapsed = 0.0
            for _ in range(steps):
                q, k, v = tokens[cursors["sdpa"]]
                cursors["sdpa"] += 1
                start = time.perf_counter()
                t = lengths["sdpa"]
                tk[:, t], tv[:, t] = torch.from_numpy(k), torch.from_numpy(v)
                lengths["sdpa"] = t = t + 1
                sdpa(torch.from_numpy(q)[:, None], tk[:, :t], tv[:, :t], scale=scale)
                step = time.perf_counter() - start
                elapsed += step
                worst["sdpa"] = max(worst["sdpa"], step)
            return elapsed / steps

        contenders["sdpa"] = sdpa_sample
    # per-step maxima are per-call latencies: no collection of earlier sections' garbage in a
    # step (as benchmarks/bench_latency.py times its calls)
    contenders = {name: _without_gc(sample) for name, sample in contenders.items()}
    grown = {name: sample for name, sample in contenders.items() if name.endswith("grown")}
    timings = interleaved(
        {name: sample for name, sample in contenders.items() if name not in grown},
        repeats=cfg.repeats,
        warmup=1,
    )
    # the structures without reserve apart: their doublings' memory churn (GBs allocated and
    # freed) would land in the steps of whatever runs next
    timings.update(interleaved(grown, repeats=cfg.repeats, warmup=1))
    reference = timings["numpy-kv"].median
    for rec in _record("b_decode", {"n0": n0, "heads": H, "d": d, "dtype": "float32"}, timings, "numpy-kv"):
        name = rec["contender"]
        rec["max_step_s"] = worst[name]
        if name in structures:
            rec["reserve_s"] = reserve_s.get(name)
            rec["nbytes_peak"] = peak_bytes[name]
            rec["memory_budget"] = cfg.memory_budget
            rec["storage_now"] = structures[name].storage
        out["records"].append(rec)
    for name in structures:
        t = timings[name]
        where = {"section": "b_decode", "n0": n0, "contender": name}
        ratio = t.median / reference
        stall = worst[name] / t.median
        if name in reserve_s:  # (the grown rows are reported, not held to the KV caches' terms)
            out["targets"].append(target("median <= 1.2x numpy KV-cache", ratio, 1.2, "max", where))
            out["targets"].append(target("max single step <= 10x median", stall, 10.0, "max", where))
        if name == "dynattn-auto":
            out["targets"].append(
                target(
                    "nbytes <= memory_budget (auto)",
                    peak_bytes[name] / cfg.memory_budget,
                    1.0,
                    "max",
                    where,
                )
            )
        table.append(
            [
                n0,
                name,
                structures[name].storage,
                _fmt(t),
                f"{ratio:.2f}x",
                fmt_seconds(worst[name]),
                f"{stall:.1f}x",
                fmt_seconds(reserve_s.get(name)),
                f"{peak_bytes[name] / 2**20:.0f} / {cfg.memory_budget / 2**20:.0f} MiB",
                "<= 1.2x; stall <= 10x; auto within budget" if name in reserve_s else "(report)",
            ]
        )
    for name in ("numpy-kv", "sdpa"):
        if name in timings:
            t = timings[name]
            table.append(
                [
                    n0,
                    name,
                    "-",
                    _fmt(t),
                    f"{t.median / reference:.2f}x",
                    fmt_seconds(worst[name]),
                    "",
                    "",
                    "",
                    "",
                ]
            )
    return table


def section_all_rows(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """c. all rows after a token edit, against Eager."""
    table = []
    for n in cfg.allrows_sizes:
        table += _all_rows_at(cfg, out, n)
    return table


def _all_rows_at(cfg: PathsConfig, out: dict[str, Any], n: int) -> list[list[Any]]:
    table: list[list[Any]] = []
    H, d = cfg.heads, cfg.head_dim
    Q, K, V = _heads_problem(H, n, d, np.float32, seed=n + 3)
    scale = d**-0.5
    att = DynamicAttention(Q, K, V, tau=0.5, scale=scale, dtype=np.float32, memory_budget=cfg.memory_budget)
    eager = Eager(Q, K, V, scale=scale, dtype=np.float32, memory_budget=cfg.memory_budget)
    stream = EditStream(H, n, d, np.float32, seed=n + 4)
    everything = np.arange(n)
    count = 4
    pending = []

    def sample(obj: Any) -> Callable[[], float]:
        def run() -> float:
            plan = stream.take(count)
            start = time.perf_counter()
            for c, key, value, _ in plan:
                obj.set_key(c, key)
                obj.set_value(c, value)
                obj.query_rows(everything)
                if obj is att:
                    pending.append(att.pending)
            return (time.perf_counter() - start) / count

        return run

    timings = interleaved({"dynattn": sample(att), "eager": sample(eager)}, repeats=cfg.repeats, warmup=1)
    case = {"n": n, "heads": H, "d": d, "dtype": "float32", "tau": 0.5, "storage": att.storage}
    case["eager_storage"] = eager.storage
    case["mean_pending"] = float(np.mean(pending)) if pending else 0.0
    out["records"] += _record("c_all_rows", case, timings, "dynattn")
    ratio = timings["dynattn"].median / timings["eager"].median
    out["targets"].append(target("<= 1.1x Eager", ratio, 1.1, "max", {"section": "c_all_rows", "n": n}))
    table.append(
        [
            n,
            f"{att.storage} / {eager.storage}",
            f"{case['mean_pending']:.0f}",
            _fmt(timings["dynattn"]),
            _fmt(timings["eager"]),
            f"{ratio:.2f}x",
            "<= 1.1x",
        ]
    )
    return table


def section_batches(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """d. update_k_many and query_many against loops (paper regime)."""
    n = cfg.batch_n
    rng = np.random.default_rng(5)
    Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
    batched = DynamicAttention(Q, K, V, tau=0.5)
    looped = DynamicAttention(Q, K, V, tau=0.5)
    u = cfg.batch_updates
    stream = [
        (rng.integers(n, size=u), rng.integers(n, size=u), rng.normal(0, 0.1, size=u)) for _ in range(16)
    ]
    cursor = {"many": 0, "loop": 0}

    def many() -> float:
        rows, cols, deltas = stream[cursor["many"] % 16]
        cursor["many"] += 1
        start = time.perf_counter()
        batched.update_k_many(rows, cols, deltas)
        return (time.perf_counter() - start) / u

    def loop() -> float:
        rows, cols, deltas = stream[cursor["loop"] % 16]
        cursor["loop"] += 1
        start = time.perf_counter()
        for i, j, x in zip(rows.tolist(), cols.tolist(), deltas.tolist(), strict=True):
            looped.update_k(i, j, x)
        return (time.perf_counter() - start) / u

    updates = interleaved({"update_k_many": many, "update_k loop": loop}, repeats=cfg.repeats, warmup=1)
    # queries with half the threshold pending
    for att in (batched, looped):
        att.fold()
        rows = rng.choice(n, size=att.threshold // 2, replace=False)
        for c in rows.tolist():
            att.update_k(c, 0, 0.05)
    qi, qj = rng.integers(n, size=u), rng.integers(n, size=u)

    def qmany() -> float:
        start = time.perf_counter()
        batched.query_many(qi, qj)
        return (time.perf_counter() - start) / u

    def qloop() -> float:
        query = looped.query
        start = time.perf_counter()
        for i, j in zip(qi.tolist(), qj.tolist(), strict=True):
            query(i, j)
        return (time.perf_counter() - start) / u

    queries = interleaved({"query_many": qmany, "query loop": qloop}, repeats=cfg.repeats, warmup=1)
    case = {"n": n, "dtype": "float64", "tau": 0.5, "batch": u, "pending": batched.pending}
    out["records"] += _record("d_batches", case, updates, "update_k_many")
    out["records"] += _record("d_batches", case, queries, "query_many")
    r_upd = updates["update_k loop"].median / updates["update_k_many"].median
    r_qry = queries["query loop"].median / queries["query_many"].median
    where = {"section": "d_batches", "n": n}
    out["targets"].append(target("update_k_many >= 5x a loop of update_k", r_upd, 5.0, "min", where))
    out["targets"].append(target("query_many faster than a loop (report)", r_qry, 1.0, "min", where))
    return [
        [
            n,
            "update_k_many",
            _fmt(updates["update_k_many"]),
            _fmt(updates["update_k loop"]),
            f"{r_upd:.2f}x",
            ">= 5x",
        ],
        [
            n,
            "query_many",
            _fmt(queries["query_many"]),
            _fmt(queries["query loop"]),
            f"{r_qry:.2f}x",
            "(report)",
        ],
    ]


def section_construction(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """e. construction against one full numpy recomputation."""
    table = []
    for n in cfg.construct_sizes:
        table += _construction_at(cfg, out, n)
    return table


def _construction_at(cfg: PathsConfig, out: dict[str, Any], n: int) -> list[list[Any]]:
    table: list[list[Any]] = []
    H, d = cfg.heads, cfg.head_dim
    Q, K, V = _heads_problem(H, n, d, np.float32, seed=n + 6)
    scale = d**-0.5
    storages: dict[str, dict[str, str]] = {"dynattn": {}}

    def build() -> float:
        start = time.perf_counter()
        att = DynamicAttention(
            Q, K, V, tau=0.5, scale=scale, dtype=np.float32, memory_budget=cfg.memory_budget
        )
        elapsed = time.perf_counter() - start
        storages["dynattn"]["storage"] = att.storage
        return elapsed

    def recompute() -> float:
        start = time.perf_counter()
        numpy_attention(Q, K, V, scale)
        return time.perf_counter() - start

    # the structure computes its logits and snapshot in float64 whatever the storage dtype
    # (docs/accuracy.md), so a float64 recomputation is its arithmetic floor
    wide = [x.astype(np.float64) for x in (Q, K, V)]

    def recompute64() -> float:
        start = time.perf_counter()
        numpy_attention(*wide, scale)
        return time.perf_counter() - start

    repeats = max(1, cfg.repeats // 2) if n > 8192 else max(1, cfg.repeats - 2)
    contenders = {"dynattn": build, "numpy recompute": recompute, "numpy recompute f64": recompute64}
    timings = interleaved(contenders, repeats=repeats, warmup=0)
    storage = storages["dynattn"].get("storage", "?")
    case = {"n": n, "heads": H, "d": d, "dtype": "float32", "storage": storage}
    out["records"] += _record("e_construction", case, timings, "dynattn")
    ratio = timings["dynattn"].median / timings["numpy recompute"].median
    ratio64 = timings["dynattn"].median / timings["numpy recompute f64"].median
    where = {"section": "e", "n": n}
    out["targets"].append(target("construction <= 1.3x a full recompute", ratio, 1.3, "max", where))
    out["targets"].append(target("construction vs a float64 recompute (report)", ratio64, 1.3, "max", where))
    table.append(
        [
            n,
            storage,
            _fmt(timings["dynattn"]),
            _fmt(timings["numpy recompute"]),
            f"{ratio:.2f}x",
            _fmt(timings["numpy recompute f64"]),
            f"{ratio64:.2f}x",
            "<= 1.3x (float32)",
        ]
    )
    return table


def section_dtypes(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """f. float32 against float64 amortized update_k (whole fold cycles)."""
    n = cfg.dtype_n
    rng = np.random.default_rng(7)
    Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
    table = []
    for tau in cfg.dtype_taus:
        table += _dtypes_at(cfg, out, Q, K, V, tau)
    return table


def _dtypes_at(
    cfg: PathsConfig, out: dict[str, Any], Q: np.ndarray, K: np.ndarray, V: np.ndarray, tau: float
) -> list[list[Any]]:
    table: list[list[Any]] = []
    n = cfg.dtype_n
    structures = {dt: DynamicAttention(Q, K, V, tau=tau, dtype=dt) for dt in ("float32", "float64")}
    T = structures["float64"].threshold
    count = 2 * T if T * 2 <= 2000 else T
    streams = {dt: np.random.default_rng(8) for dt in structures}

    def sample(dt: str) -> Callable[[], float]:
        att, r = structures[dt], streams[dt]

        def run() -> float:
            att.fold()
            rows, cols = r.integers(n, size=count).tolist(), r.integers(n, size=count).tolist()
            deltas = r.normal(0, 0.1, size=count).tolist()
            start = time.perf_counter()
            for i, j, x in zip(rows, cols, deltas, strict=True):
                att.update_k(i, j, x)
            att.fold()
            return (time.perf_counter() - start) / count

        return run

    timings = interleaved({dt: sample(dt) for dt in structures}, repeats=cfg.repeats, warmup=1)
    case = {"n": n, "tau": tau, "threshold": T, "updates_per_sample": count}
    for rec in _record("f_dtypes", case, timings, "float32"):
        rec["stats"] = dict(structures[rec["contender"]].stats)
        out["records"].append(rec)
    speedup = timings["float64"].median / timings["float32"].median
    where = {"section": "f_dtypes", "n": n, "tau": tau}
    out["targets"].append(target("float32 >= 1.3x faster than float64", speedup, 1.3, "min", where))
    table.append(
        [n, tau, T, _fmt(timings["float32"]), _fmt(timings["float64"]), f"{speedup:.2f}x", ">= 1.3x"]
    )
    return table


def section_fallbacks(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """g. fraction of queries that fell back to an exact row on random workloads."""
    table = []
    for n, tau, scale_name in cfg.fallback_cases:
        rng = np.random.default_rng(n)
        if scale_name == "1":
            Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
            scale = 1.0
        else:
            Q, K, V = (rng.standard_normal((n, n)) for _ in range(3))
            scale = 1 / math.sqrt(n)
        att = DynamicAttention(Q, K, V, tau=tau, scale=scale)
        steps = cfg.fallback_steps
        rows, cols = rng.integers(n, size=(2, steps)), rng.integers(n, size=(2, steps))
        deltas = rng.normal(0, 0.1, size=steps)
        before = att.stats["query_fallbacks"]
        times = []
        for s in range(steps):
            if s % 2:
                att.update_v(int(rows[0, s]), int(cols[0, s]), float(deltas[s]))
            else:
                att.update_k(int(rows[0, s]), int(cols[0, s]), float(deltas[s]))
            start = time.perf_counter()
            att.query(int(rows[1, s]), int(cols[1, s]))
            times.append(time.perf_counter() - start)
        fallbacks = att.stats["query_fallbacks"] - before
        fraction = fallbacks / steps
        rec = {
            "section": "g_fallbacks",
            "n": n,
            "tau": tau,
            "scale": scale_name,
            "queries": steps,
            "fallbacks": fallbacks,
            "fraction": fraction,
            "query_median_s": float(np.median(times)),
            "query_p99_s": float(np.quantile(times, 0.99)),
            "query_max_s": float(np.max(times)),
            "stats": dict(att.stats),
        }
        out["records"].append(rec)
        where = {"section": "g_fallbacks", "n": n, "tau": tau}
        out["targets"].append(target("fallbacks < 1% of queries", fraction, 0.01, "max", where))
        table.append(
            [
                n,
                tau,
                scale_name,
                f"{fallbacks}/{steps}",
                f"{100 * fraction:.2f}%",
                fmt_seconds(rec["query_median_s"]),
                fmt_seconds(rec["query_p99_s"]),
                "< 1%",
            ]
        )
    return table


def section_eager(cfg: PathsConfig, out: dict[str, Any]) -> list[list[Any]]:
    """h. Eager's update_k against a plain numpy rank-1 update (same arithmetic)."""
    n = cfg.eager_n
    rng = np.random.default_rng(9)
    Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
    eager = Eager(Q, K, V)
    logits = Q @ K.T
    mu = logits.max(axis=1)
    W = np.exp(logits - mu[:, None])
    N, Z, Kp = W @ V, W.sum(axis=1), K.copy()
    del logits
    count = 32
    streams = {name: np.random.default_rng(10) for name in ("eager", "plain numpy")}

    def eager_sample() -> float:
        r = streams["eager"]
        plan = list(
            zip(
                r.integers(n, size=count).tolist(),
                r.integers(n, size=count).tolist(),
                r.normal(0, 0.1, size=count).tolist(),
                strict=True,
            )
        )
        start = time.perf_counter()
        for i, j, x in plan:
            eager.update_k(i, j, x)
        return (time.perf_counter() - start) / count

    def plain_sample() -> float:
        nonlocal N, Z
        r = streams["plain numpy"]
        plan = list(
            zip(
                r.integers(n, size=count).tolist(),
                r.integers(n, size=count).tolist(),
                r.normal(0, 0.1, size=count).tolist(),
                strict=True,
            )
        )
        start = time.perf_counter()
        for i, j, x in plan:
            Kp[i, j] += x
            w = np.exp(Q @ Kp[i] - mu)
            diff = w - W[:, i]
            W[:, i] = w
            N += np.outer(diff, V[i])
            Z += diff
        return (time.perf_counter() - start) / count

    timings = interleaved({"eager": eager_sample, "plain numpy": plain_sample}, repeats=cfg.repeats, warmup=1)
    out["records"] += _record("h_eager", {"n": n, "dtype": "float64"}, timings, "eager")
    ratio = timings["eager"].median / timings["plain numpy"].median
    out["targets"].append(
        target("Eager update_k <= 1.1x plain numpy rank-1", ratio, 1.1, "max", {"section": "h", "n": n})
    )
    return [[n, _fmt(timings["eager"]), _fmt(timings["plain numpy"]), f"{ratio:.2f}x", "<= 1.1x"]]


# ---------------------------------------------------------------------- formatting and the run
def _fmt(t: Timing) -> str:
    return f"{fmt_seconds(t.median)} [{fmt_seconds(t.min)}-{fmt_seconds(t.max)}]"


def _vs(timings: dict[str, Timing], name: str, ours: float) -> str:
    if name not in timings:
        return "-"
    return f"{fmt_seconds(timings[name].median)} ({fmt_ratio(timings[name].median / ours)})"


SECTIONS: list[tuple[str, str, Callable[[PathsConfig, dict[str, Any]], list[list[Any]]], list[str]]] = [
    (
        "a",
        "token edit + query_rows of k rows (8 heads, d = e = 64, float32, tau = 0.5); "
        "(ratio) = contender / dynattn, higher: dynattn faster",
        section_token_edits,
        ["n", "k", "storage", "dynattn", "Rows numpy", "SDPA rows", "Eager", 'tau="auto"', "target"],
    ),
    (
        "b",
        "causal decode: append + query of the new row, per token; ratio = time / numpy KV-cache",
        section_decode,
        [
            *("n0", "contender", "storage", "per token", "vs numpy", "max step", "stall"),
            *("reserve", "nbytes peak", "target"),
        ],
    ),
    (
        "c",
        "query_rows(all) after a token edit (rows pending) vs Eager doing the same; ratio = dynattn / Eager",
        section_all_rows,
        ["n", "storage (ours / Eager)", "pending", "dynattn", "Eager", "ratio", "target"],
    ),
    (
        "d",
        "batch calls vs Python loops, per entry (paper regime, float64, tau = 0.5); ratio = loop / batch",
        section_batches,
        ["n", "call", "batch", "loop", "ratio", "target"],
    ),
    (
        "e",
        "construction vs one full numpy recomputation (8 heads, float32); ratio = construction / recompute",
        section_construction,
        ["n", "storage", "construction", "numpy recompute", "ratio", "float64 recompute", "ratio", "target"],
    ),
    (
        "f",
        "amortized update_k over whole fold cycles, float32 vs float64 (paper regime); ratio = f64 / f32",
        section_dtypes,
        ["n", "tau", "T", "float32", "float64", "speedup", "target"],
    ),
    (
        "g",
        "query fallbacks on a random workload (alternating update_k/update_v and a query)",
        section_fallbacks,
        ["n", "tau", "scale", "fallbacks", "fraction", "query median", "query p99", "target"],
    ),
    (
        "h",
        "Eager update_k vs a plain numpy rank-1 update (paper regime, float64); ratio = Eager / plain",
        section_eager,
        ["n", "Eager", "plain numpy", "ratio", "target"],
    ),
]


def run_paths(
    cfg: PathsConfig,
    *,
    sections: str = "abcdefgh",
    out_dir: Path | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen sections; return the result and write ``paths.json``/``paths.txt``
    into ``out_dir`` (not written when None)."""
    torch = _torch()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "git_commit": git_commit(),
        "machine": machine_info(),
        "torch": None if torch is None else torch.__version__,
        "config": asdict(cfg),
        "records": [],
        "targets": [],
        "tables": {},
    }
    started = time.perf_counter()
    text = [
        f"# {command}",
        f"# commit {result['git_commit']}",
        f"# {result['machine']['cpu_model']}, {result['machine']['cores']} cores, numpy "
        f"{result['machine']['numpy']}, torch {result['torch']}, kernels {result['machine']['kernels']}",
        "# median [min-max] over interleaved rounds; targets from the issues next to each ratio",
    ]
    for letter, title, fn, headers in SECTIONS:
        if letter not in sections:
            continue
        t0 = time.perf_counter()
        rows = fn(cfg, result)
        block = f"\n## {letter}. {title}\n" + format_table(headers, [[str(x) for x in r] for r in rows])
        result["tables"][letter] = {
            "title": title,
            "headers": headers,
            "rows": [[str(x) for x in r] for r in rows],
        }
        text.append(block)
        echo(block + f"\n({time.perf_counter() - t0:.1f} s)")
    summary = targets_summary(result["targets"])
    text.append(summary)
    echo(summary)
    result["elapsed_s"] = time.perf_counter() - started
    text.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    result["text"] = "\n".join(text) + "\n"
    if out_dir is not None:
        write_report(result, out_dir, "paths")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (< 60 s)")
    parser.add_argument("--full", action="store_true", help="add n = 16384 (long)")
    parser.add_argument("--repeats", type=int, help="timed rounds per section (default 5; --quick 2)")
    parser.add_argument("--sections", default="abcdefgh", help="which sections to run, e.g. 'abc'")
    add_output_options(parser, "paths", ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    cfg = PathsConfig.preset(quick=args.quick, full=args.full)
    if args.repeats:
        cfg.repeats = args.repeats
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_paths.py", *given])
    return run_paths(
        cfg, sections=args.sections, out_dir=None if args.no_write else args.out_dir, command=command
    )


if __name__ == "__main__":
    main()
