"""Streams: a sliding-window soak and a window step at scale against recomputation.

a. **Soak.** ``DynamicAttention`` with static queries (``causal=False``) and a
   sliding window of ``window`` keys, advanced by ``att.slide(k, v, window=)``
   with random ``k, v`` for ``--steps`` steps. Records ``nbytes`` and ``m``
   every ``record_every`` steps and the time of the ``slide`` calls per block of
   ``block`` steps (nothing else is inside the timed region). Reports

   * memory: the largest ``nbytes`` after the first block over ``nbytes`` at the
     end of the first block (target <= 1.10);
   * flatness: the mean step time of the last block over that of the second
     block (the first block is the warm-up; target <= 1.2), in wall time and
     in this process's CPU time (less sensitive to other processes' load);
     and, robust to load drift, the soaked structure against a fresh one
     warmed up for one block, measured interleaved (``aged/fresh``);
   * accuracy: at ``checkpoints`` evenly spaced steps, ``att.output()`` against
     the float64 reference (:func:`dynattn.testing.reference_attention`) over
     the live keys only (mask ``att.key_mask``); the error of each output
     column relative to ``max|V[live, j]|``, worst over heads, rows and
     columns, against the accuracy target of the dtype (``TARGET``).

b. **Window step at scale.** One step = ``slide`` (evict the oldest key,
   append a new one) + ``query_rows`` of every query row. Contenders, each on
   its own copy of the same stream, measured round-robin
   (:func:`dynattn._timing.interleaved`: warm-up rounds, then ``repeats``
   timed rounds in rotating order):

   * ``dynattn``: one sample = ``cycle`` consecutive steps (one fold cycle:
     ``cycle`` = the fold threshold), divided by ``cycle``;
   * ``torch SDPA``: a ``(H, W, d)`` key and value tensor; the new key and value
     are written into the evicted slot, then
     ``torch.nn.functional.scaled_dot_product_attention`` of all query rows;
   * ``numpy``: the same cache, a stable softmax per head in the working dtype.

   Run once per BLAS thread count in ``--threads`` (OpenBLAS through its
   ``set_num_threads`` entry point, and ``torch.set_num_threads``), because
   on a machine shared with other work, multi-threaded BLAS can make the
   small products of a step much slower than one thread does. Reports
   medians, min-max, the ratios (target: SDPA / dynattn >= 20), the
   counters of ``att.stats`` that changed while timing (folds, query
   fallbacks, rows refreshed), and dynattn's answer against SDPA over its
   live keys.

    python benchmarks/bench_streams.py              # ~15 minutes on 2 busy cores
    python benchmarks/bench_streams.py --quick      # 3000 soak steps, small part b
    python benchmarks/bench_streams.py --steps 20000 --parts a

Writes ``docs/figures/streams.json`` and ``docs/figures/streams.txt``
(``--out-dir`` to change), with the command line, the git commit, the machine,
the BLAS thread settings and the load from other processes during each part.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import io
import math
import os
import pstats
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import (
    LoadMonitor,
    add_output_options,
    fmt_ratio,
    fmt_seconds,
    format_table,
    gemm_rate,
    git_commit,
    interleaved,
    machine_info,
    target,
    targets_summary,
    usable_cores,
    write_report,
)
from dynattn.testing import TARGET, reference_attention

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "dynattn-streams/1"
#: Environment variables that set BLAS / OpenMP thread counts (recorded with a run).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class StreamsConfig:
    """Sizes and effort of one run (``preset`` gives the command line's choices)."""

    # a. soak
    soak_heads: int = 4
    soak_queries: int = 256
    soak_window: int = 512
    soak_dim: int = 32
    soak_steps: int = 100_000
    soak_dtypes: list[str] = field(default_factory=lambda: ["float64"])
    record_every: int = 1000
    block: int = 10_000
    checkpoints: int = 10
    aged_repeats: int = 9  # interleaved rounds of the aged-vs-fresh comparison
    # b. window step at scale
    step_heads: int = 8
    step_queries: int = 1024
    step_window: int = 4096
    step_dim: int = 64
    step_dtype: str = "float32"
    repeats: int = 10
    warmup: int = 1
    threads: list[int] = field(default_factory=lambda: [1, usable_cores()])
    tau: float = 0.5
    seed: int = 0
    gemm_size: int = 512  # side of the GEMM whose rate is recorded with the machine

    @classmethod
    def preset(cls, *, quick: bool = False, tiny: bool = False) -> StreamsConfig:
        if tiny:
            return cls.tiny()
        if quick:
            return cls(
                soak_steps=3000,
                record_every=100,
                block=1000,
                checkpoints=4,
                step_queries=256,
                step_window=1024,
                repeats=3,
            )
        return cls()

    @classmethod
    def tiny(cls) -> StreamsConfig:
        """Second-long sizes, for the smoke test (structure of the output only)."""
        return cls(
            soak_heads=2,
            soak_queries=8,
            soak_window=16,
            soak_dim=4,
            soak_steps=120,
            soak_dtypes=["float64", "float32"],
            record_every=10,
            block=40,
            checkpoints=3,
            aged_repeats=2,
            step_heads=2,
            step_queries=16,
            step_window=32,
            step_dim=8,
            repeats=2,
            warmup=1,
            threads=[1],
            gemm_size=64,
        )

    def with_steps(self, steps: int) -> StreamsConfig:
        """This configuration with ``steps`` soak steps; shorter runs get shorter blocks
        (at least three blocks) and records (at least ten per block)."""
        self.soak_steps = int(steps)
        self.block = max(1, min(self.block, self.soak_steps // 3))
        self.record_every = max(1, min(self.record_every, self.block // 10))
        return self


# ---------------------------------------------------------------------- threads
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """OpenBLAS's ``get/set_num_threads`` of the library numpy loaded (None if not found)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                setter.argtypes = [ctypes.c_int]
                return (lambda g=getter: int(g())), (lambda n, s=setter: s(int(n)))
    return None


def thread_settings() -> dict[str, Any]:
    """The thread counts in effect: environment, OpenBLAS (if reachable), torch."""
    blas = _openblas()
    torch = _torch()
    return {
        "environment": {k: os.environ.get(k) for k in THREAD_VARIABLES},
        "openblas_threads": None if blas is None else blas[0](),
        "torch_threads": None if torch is None else torch.get_num_threads(),
    }


@contextlib.contextmanager
def blas_threads(count: int) -> Iterator[dict[str, Any]]:
    """Run the block with ``count`` OpenBLAS and torch threads; restore them afterwards."""
    blas, torch = _openblas(), _torch()
    before = (None if blas is None else blas[0](), None if torch is None else torch.get_num_threads())
    if blas is not None:
        blas[1](count)
    if torch is not None:
        torch.set_num_threads(count)
    try:
        yield thread_settings()
    finally:
        if blas is not None and before[0] is not None:
            blas[1](before[0])
        if torch is not None and before[1] is not None:
            torch.set_num_threads(before[1])


# ---------------------------------------------------------------------- helpers
def _torch() -> Any:
    try:
        import torch

        return torch
    except ImportError:
        return None


def live_window_error(att: DynamicAttention) -> float:
    """Worst ``|O - O_ref| / max|V[live, j]|`` of ``att.output()`` against the float64
    reference over the live keys only, over heads, rows and columns."""
    out = np.asarray(att.output(), dtype=np.float64)
    live = att.key_mask
    Q = np.asarray(att.Q, dtype=np.float64)
    K = np.asarray(att.K, dtype=np.float64)[:, live]
    V = np.asarray(att.V, dtype=np.float64)[:, live]
    worst = 0.0
    for h in range(Q.shape[0]):
        ref = reference_attention(Q[h], K[h], V[h], scale=att.scale)
        scale = np.max(np.abs(V[h]), axis=0)
        err = np.abs(out[h] - ref) / np.where(scale > 0, scale, 1.0)
        worst = max(worst, float(err.max()))
    return worst


# ---------------------------------------------------------------------- a. soak
def soak(cfg: StreamsConfig, dtype_name: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """One soak run; returns its record (series, blocks, checkpoints, summary)."""
    dtype = np.dtype(dtype_name)
    H, n, W, d = cfg.soak_heads, cfg.soak_queries, cfg.soak_window, cfg.soak_dim
    rng = np.random.default_rng(cfg.seed)
    Q, K, V = (rng.standard_normal((H, rows, d)).astype(dtype) for rows in (n, W, W))
    att = DynamicAttention(Q, K, V, tau=cfg.tau, scale=d**-0.5, dtype=dtype)
    steps, block, every = cfg.soak_steps, cfg.block, cfg.record_every
    check_at = set(np.linspace(0, steps, cfg.checkpoints + 1, dtype=np.int64)[1:].tolist())
    series: list[dict[str, int]] = [{"step": 0, "nbytes": att.nbytes, "m": att.m}]
    blocks: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    chunk = 1000
    block_time, block_cpu, block_start = 0.0, 0.0, 0
    monitor = LoadMonitor().start()
    started = time.perf_counter()
    step = 0
    while step < steps:
        count = min(chunk, steps - step)
        ks = rng.standard_normal((count, H, d)).astype(dtype)
        vs = rng.standard_normal((count, H, d)).astype(dtype)
        for i in range(count):
            t0, c0 = time.perf_counter(), time.process_time()
            att.slide(ks[i], vs[i], window=W)
            block_time += time.perf_counter() - t0
            block_cpu += time.process_time() - c0
            step += 1
            if step % every == 0 or step == steps:
                series.append({"step": step, "nbytes": att.nbytes, "m": att.m})
            if step % block == 0 or step == steps:
                done = step - block_start
                blocks.append(
                    {
                        "first": block_start + 1,
                        "last": step,
                        "per_step_s": block_time / done,
                        "cpu_per_step_s": block_cpu / done,
                    }
                )
                block_time, block_cpu, block_start = 0.0, 0.0, step
            if step in check_at:
                err = live_window_error(att)
                checks.append({"step": step, "error": err, "live_keys": int(att.key_mask.sum())})
    elapsed = time.perf_counter() - started
    load = monitor.stop()
    aged = aged_vs_fresh(cfg, att, dtype)
    first_block_end = blocks[0]["last"]
    at_first = next(r["nbytes"] for r in series if r["step"] == first_block_end)
    later = [r["nbytes"] for r in series if r["step"] > first_block_end] or [at_first]
    full_blocks = [b for b in blocks if b["last"] - b["first"] + 1 == block]
    enough = len(full_blocks) >= 3
    flat = full_blocks[-1]["per_step_s"] / full_blocks[1]["per_step_s"] if enough else math.nan
    flat_cpu = full_blocks[-1]["cpu_per_step_s"] / full_blocks[1]["cpu_per_step_s"] if enough else math.nan
    worst = max((c["error"] for c in checks), default=math.nan)
    summary = {
        "dtype": dtype.name,
        "steps": steps,
        "block": block,
        "nbytes_at_first_block": at_first,
        "nbytes_max_after": max(later),
        "memory_ratio": max(later) / at_first,
        "m_max": max(r["m"] for r in series),
        "flatness_ratio": flat,
        "flatness_ratio_cpu": flat_cpu,
        "aged_over_fresh": aged["ratio"],
        "worst_error": worst,
        "accuracy_target": TARGET[dtype],
        "stats": att.stats,
        "elapsed_s": elapsed,
        "other_load_cores": load,
    }
    echo(
        f"soak {dtype.name}: {steps} steps in {elapsed:.0f} s, nbytes {at_first} -> max {max(later)} "
        f"({summary['memory_ratio']:.3f}x), m <= {summary['m_max']}, last/second block "
        f"{flat:.3f}, worst error {worst:.2e}"
    )
    return {"summary": summary, "series": series, "blocks": blocks, "checkpoints": checks, "aged": aged}


def aged_vs_fresh(cfg: StreamsConfig, aged: DynamicAttention, dtype: np.dtype) -> dict[str, Any]:
    """Per-step time of the soaked structure against a fresh one after one warm-up block,
    interleaved (so that the machine's load hits both alike): the load-independent check
    that the step cost does not grow with the number of steps taken."""
    H, n, W, d = cfg.soak_heads, cfg.soak_queries, cfg.soak_window, cfg.soak_dim
    rng = np.random.default_rng(cfg.seed + 7)
    Q, K, V = (rng.standard_normal((H, rows, d)).astype(dtype) for rows in (n, W, W))
    fresh = DynamicAttention(Q, K, V, tau=cfg.tau, scale=d**-0.5, dtype=dtype)
    count = max(1, min(1000, cfg.block // 5))
    ks = rng.standard_normal((count, H, d)).astype(dtype)
    vs = rng.standard_normal((count, H, d)).astype(dtype)
    for i in range(cfg.block):
        fresh.slide(ks[i % count], vs[i % count], window=W)

    def sample(att: DynamicAttention) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for i in range(count):
                att.slide(ks[i], vs[i], window=W)
            return (time.perf_counter() - start) / count

        return run

    timings = interleaved({"aged": sample(aged), "fresh": sample(fresh)}, repeats=cfg.aged_repeats, warmup=1)
    return {
        "steps_per_sample": count,
        "aged_steps": cfg.soak_steps,
        "fresh_steps": cfg.block,
        **timings["aged"].as_dict("aged_s"),
        **timings["fresh"].as_dict("fresh_s"),
        "ratio": timings["aged"].median / timings["fresh"].median,
    }


def part_a(cfg: StreamsConfig, result: dict[str, Any], echo: Callable[[str], None]) -> str:
    runs = [soak(cfg, name, echo) for name in cfg.soak_dtypes]
    result["soak"] = runs
    H, n, W, d = cfg.soak_heads, cfg.soak_queries, cfg.soak_window, cfg.soak_dim
    title = (
        f"\n## a. soak: slide with window W = {W}, {H} heads, {n} static query rows (causal=False), "
        f"d = e = {d}, tau = {cfg.tau}, {cfg.soak_steps} steps, blocks of {cfg.block}; "
        f"{cfg.threads[0]} BLAS thread(s)"
    )
    rows = []
    for run in runs:
        s = run["summary"]
        where = {"part": "a", "dtype": s["dtype"]}
        result["targets"].append(
            target(
                f"soak max nbytes after step {s['block']} / nbytes at step {s['block']} <= 1.10",
                s["memory_ratio"],
                1.10,
                "max",
                where,
            )
        )
        result["targets"].append(
            target(
                "soak last block / second block per-step time <= 1.2", s["flatness_ratio"], 1.2, "max", where
            )
        )
        result["targets"].append(
            target(
                f"soak per-step time after {s['steps']} steps / after {s['block']} steps, interleaved <= 1.2",
                s["aged_over_fresh"],
                1.2,
                "max",
                where,
            )
        )
        result["targets"].append(
            target(
                f"soak worst error / max|V[live, j]| <= {s['accuracy_target']:g}",
                s["worst_error"],
                s["accuracy_target"],
                "max",
                where,
            )
        )
        blocks = run["blocks"]
        rows.append(
            [
                s["dtype"],
                f"{s['nbytes_at_first_block'] / 1e6:.2f} MB",
                f"{s['nbytes_max_after'] / 1e6:.2f} MB",
                f"{s['memory_ratio']:.3f}",
                s["m_max"],
                fmt_seconds(blocks[1]["per_step_s"] if len(blocks) > 1 else math.nan),
                fmt_seconds(blocks[-1]["per_step_s"]),
                f"{s['flatness_ratio']:.3f}",
                f"{s['flatness_ratio_cpu']:.3f}",
                f"{s['aged_over_fresh']:.3f}",
                f"{s['worst_error']:.2e} (target {s['accuracy_target']:g})",
                s["stats"]["folds"],
                s["stats"]["query_fallbacks"],
                s["stats"]["rows_refreshed"],
                "-" if s["other_load_cores"] is None else f"{s['other_load_cores']:.1f}",
            ]
        )
    table = format_table(
        [
            "dtype",
            "nbytes@block1",
            "max after",
            "ratio",
            "max m",
            "step, block 2",
            "step, last",
            "last/2nd",
            "CPU last/2nd",
            "aged/fresh",
            "worst error",
            "folds",
            "fallbacks",
            "rows refreshed",
            "other load",
        ],
        rows,
    )
    block_lines = []
    for run in runs:
        per = "  ".join(fmt_seconds(b["per_step_s"]) for b in run["blocks"])
        cpu = "  ".join(fmt_seconds(b["cpu_per_step_s"]) for b in run["blocks"])
        errs = "  ".join(f"{c['step']}:{c['error']:.1e}" for c in run["checkpoints"])
        block_lines.append(f"{run['summary']['dtype']} per-step wall time per block: {per}")
        block_lines.append(f"{run['summary']['dtype']} per-step CPU time (this process) per block: {cpu}")

        def span(key: str, a: dict[str, Any] = run["aged"]) -> str:
            return f"{fmt_seconds(a[key])} [{fmt_seconds(a[key + '_min'])}-{fmt_seconds(a[key + '_max'])}]"

        block_lines.append(
            f"{run['summary']['dtype']} aged/fresh: the soaked structure against a fresh one warmed up "
            f"for {run['aged']['fresh_steps']} steps, {run['aged']['steps_per_sample']} steps per sample, "
            f"{cfg.aged_repeats} interleaved rounds: {span('aged_s')} vs {span('fresh_s')} per step"
        )
        block_lines.append(f"{run['summary']['dtype']} error at checkpoints (step:error): {errs}")
    return title + "\n" + table + "\n" + "\n".join(block_lines)


# ---------------------------------------------------------------------- b. window step
def numpy_attention(Q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float) -> np.ndarray:
    """Plain numpy attention per head, ``(H, n, e)`` (stable softmax, in the inputs' dtype)."""
    out = np.empty((*Q.shape[:-1], V.shape[-1]), dtype=Q.dtype)
    for h in range(Q.shape[0]):
        logits = Q[h] @ K[h].T
        logits *= Q.dtype.type(scale)
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=-1, keepdims=True)
        out[h] = logits @ V[h]
    return out


class KeyStream:
    """A cycled bank of random ``(k, v)`` rows, one cursor per consumer."""

    def __init__(self, heads: int, d: int, dtype: Any, seed: int, count: int = 256):
        rng = np.random.default_rng(seed)
        self.keys = rng.standard_normal((count, heads, d)).astype(dtype)
        self.values = rng.standard_normal((count, heads, d)).astype(dtype)
        self.cursor = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        b = self.cursor % len(self.keys)
        self.cursor += 1
        return self.keys[b], self.values[b]


def part_b(cfg: StreamsConfig, result: dict[str, Any], echo: Callable[[str], None], profile: bool) -> str:
    torch = _torch()
    dtype = np.dtype(cfg.step_dtype)
    H, n, W, d = cfg.step_heads, cfg.step_queries, cfg.step_window, cfg.step_dim
    scale = d**-0.5
    rng = np.random.default_rng(cfg.seed + 1)
    Q, K, V = (rng.standard_normal((H, rows, d)).astype(dtype) for rows in (n, W, W))
    t0 = time.perf_counter()
    att = DynamicAttention(Q, K, V, tau=cfg.tau, scale=scale, dtype=dtype)
    build_s = time.perf_counter() - t0
    rows_all = np.arange(n)
    cycle = att.threshold
    streams = {name: KeyStream(H, d, dtype, cfg.seed + 2) for name in ("dynattn", "sdpa", "numpy")}
    # the caches of the recomputing contenders: the oldest key sits in slot (step % W)
    np_cache = [K.copy(), V.copy()]
    np_step = [0]
    sink: list[Any] = [None]

    def run_dynattn() -> float:
        stream = streams["dynattn"]
        start = time.perf_counter()
        for _ in range(cycle):
            k, v = stream.next()
            att.slide(k, v, window=W)
            sink[0] = att.query_rows(rows_all)
        return (time.perf_counter() - start) / cycle

    def run_numpy() -> None:
        k, v = streams["numpy"].next()
        slot = np_step[0] % W
        np_step[0] += 1
        np_cache[0][:, slot], np_cache[1][:, slot] = k, v
        sink[0] = numpy_attention(Q, np_cache[0], np_cache[1], scale)

    contenders: dict[str, Callable[[], float | None]] = {"dynattn": run_dynattn}
    if torch is not None:
        tQ, tK, tV = (torch.from_numpy(x.copy()) for x in (Q, K, V))
        t_step = [0]

        def run_sdpa() -> None:
            k, v = streams["sdpa"].next()
            slot = t_step[0] % W
            t_step[0] += 1
            tK[:, slot] = torch.from_numpy(k)
            tV[:, slot] = torch.from_numpy(v)
            with torch.inference_mode():
                sink[0] = torch.nn.functional.scaled_dot_product_attention(tQ, tK, tV, scale=scale)

        contenders["torch SDPA"] = run_sdpa
    contenders["numpy"] = run_numpy

    text = [
        f"\n## b. window step at scale: slide (evict 1 + append 1) + query_rows of all {n} rows; "
        f"W = {W} keys, {H} heads, d = e = {d}, {dtype.name}, tau = {cfg.tau} (fold threshold {cycle}); "
        f"{att.storage} storage, nbytes {att.nbytes / 1e6:.1f} MB, built in {build_s:.1f} s",
        f"median [min-max] per step over {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up "
        f"round(s); one dynattn sample = {cycle} consecutive steps (one fold cycle) / {cycle}; "
        "(ratio) = contender / dynattn",
    ]
    runs = []
    table_rows = []
    for threads in cfg.threads:
        with blas_threads(threads) as settings:
            before = att.stats
            monitor = LoadMonitor().start()
            timings = interleaved(contenders, repeats=cfg.repeats, warmup=cfg.warmup)
            load = monitor.stop()
            after = att.stats
        changed = {k: after[k] - before.get(k, 0) for k in after}
        ours = timings["dynattn"].median
        record: dict[str, Any] = {
            "threads": threads,
            "settings": settings,
            "other_load_cores": load,
            "timed_steps_dynattn": (cfg.repeats + cfg.warmup) * cycle,
            "stats_during": changed,
            "contenders": {
                name: {**t.as_dict("median_s"), "ratio_to_dynattn": t.median / ours if ours > 0 else math.nan}
                for name, t in timings.items()
            },
        }
        runs.append(record)
        where = {"part": "b", "threads": threads}
        if "torch SDPA" in timings:
            result["targets"].append(
                target(
                    "window step: torch SDPA recompute / dynattn >= 20",
                    record["contenders"]["torch SDPA"]["ratio_to_dynattn"],
                    20.0,
                    "min",
                    where,
                )
            )
        cells: list[Any] = [threads]
        for name in contenders:
            t = timings[name]
            ratio = "" if name == "dynattn" else f" ({fmt_ratio(t.median / ours)})"
            cells.append(f"{fmt_seconds(t.median)} [{fmt_seconds(t.min)}-{fmt_seconds(t.max)}]{ratio}")
        cells += [
            changed.get("folds", 0),
            changed.get("query_fallbacks", 0),
            changed.get("rows_refreshed", 0),
            "-" if load is None else f"{load:.1f}",
        ]
        table_rows.append(cells)
        echo(f"part b, {threads} thread(s): " + ", ".join(str(c) for c in cells[1:]))
    headers = ["threads", *contenders, "folds", "fallbacks", "rows refreshed", "other load"]
    text.append(format_table(headers, table_rows))
    # correctness: dynattn's answer against SDPA (or the float64 reference) over its live keys
    live = att.key_mask
    ours_out = np.asarray(att.query_rows(rows_all), dtype=np.float64)
    ref = np.stack(
        [
            reference_attention(Q[h], np.asarray(att.K)[h, live], np.asarray(att.V)[h, live], scale=scale)
            for h in range(H)
        ]
    )
    value_scale = np.abs(np.asarray(att.V, dtype=np.float64)[:, live]).max(axis=1)[:, None, :]
    error = float((np.abs(ours_out - ref) / value_scale).max())
    text.append(
        f"dynattn after the run vs float64 reference over its {int(live.sum())} live keys: worst error "
        f"{error:.2e} of max|V[live, j]| (target {TARGET[dtype]:g}); live keys = W: {int(live.sum()) == W}; "
        f"m = {att.m}"
    )
    result["window_step"] = {
        "config": {"heads": H, "queries": n, "window": W, "dim": d, "dtype": dtype.name, "tau": cfg.tau},
        "cycle": cycle,
        "storage": att.storage,
        "nbytes": att.nbytes,
        "build_s": build_s,
        "runs": runs,
        "final_error": error,
        "final_m": att.m,
        "stats_total": att.stats,
    }
    if profile:
        result["window_step"]["profile"] = {}
        for threads in cfg.threads:
            with blas_threads(threads):
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(2):
                    run_dynattn()
                profiler.disable()
            buffer = io.StringIO()
            pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(12)
            summary = buffer.getvalue()
            result["window_step"]["profile"][str(threads)] = summary
            text.append(f"cProfile of {2 * cycle} dynattn steps ({threads} thread(s)), by own time:")
            text.append("\n".join(line for line in summary.splitlines() if line.strip()))
    return "\n".join(text)


# ---------------------------------------------------------------------- driver
def run_streams(
    cfg: StreamsConfig,
    *,
    parts: str = "ab",
    out_dir: Path | None = None,
    command: str = "",
    profile: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen parts; return the result and write ``streams.json``/``streams.txt``
    into ``out_dir`` (not written when None)."""
    torch = _torch()
    rates = {name: gemm_rate(np.dtype(name), cfg.gemm_size, 3) for name in ("float64", "float32")}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "git_commit": git_commit(),
        "machine": machine_info(rates),
        "threads_at_start": thread_settings(),
        "torch": None if torch is None else torch.__version__,
        "config": asdict(cfg),
        "targets": [],
    }
    started = time.perf_counter()
    machine = result["machine"]
    text = [
        f"# {command}",
        f"# commit {result['git_commit']}",
        f"# {machine['cpu_model']}, {machine['cores']} cores, numpy {machine['numpy']} ({machine['blas']}), "
        f"torch {result['torch']}; GEMM {cfg.gemm_size}^3 at the start: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()),
        f"# threads at start: {result['threads_at_start']}",
        "# other load = cores kept busy by other processes during the part (from /proc/stat)",
    ]
    if "a" in parts:
        with blas_threads(cfg.threads[0]):
            text.append(part_a(cfg, result, echo))
    if "b" in parts:
        text.append(part_b(cfg, result, echo, profile))
    summary = targets_summary(result["targets"])
    text.append(summary)
    echo(summary)
    result["elapsed_s"] = time.perf_counter() - started
    text.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    result["text"] = "\n".join(text) + "\n"
    if out_dir is not None:
        write_report(result, out_dir, "streams")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the result dictionary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3000 soak steps, smaller part b")
    parser.add_argument("--tiny", action="store_true", help="seconds-long sizes (smoke test)")
    parser.add_argument("--steps", type=int, help="soak steps (default 100000; --quick 3000)")
    parser.add_argument("--dtypes", help="soak dtypes, comma-separated (default float64)")
    parser.add_argument("--repeats", type=int, help="timed rounds in part b (default 10)")
    parser.add_argument(
        "--threads",
        help="BLAS/torch thread counts, comma-separated; part b runs once per count, the soak with the "
        "first (default: 1 and all usable cores)",
    )
    parser.add_argument("--parts", default="ab", help="which parts to run, e.g. 'a'")
    parser.add_argument("--profile", action="store_true", help="cProfile dynattn's window steps (part b)")
    add_output_options(parser, "streams", ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    cfg = StreamsConfig.preset(quick=args.quick, tiny=args.tiny)
    if args.steps is not None:
        cfg.with_steps(args.steps)
    if args.dtypes:
        cfg.soak_dtypes = [name.strip() for name in args.dtypes.split(",")]
    if args.repeats:
        cfg.repeats = args.repeats
    if args.threads:
        cfg.threads = [int(x) for x in args.threads.split(",")]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_streams.py", *given])
    return run_streams(
        cfg,
        parts=args.parts,
        out_dir=None if args.no_write else args.out_dir,
        command=command,
        profile=args.profile,
    )


if __name__ == "__main__":
    main()
