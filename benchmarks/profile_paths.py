"""Where the time of a hot path goes, next to what its arithmetic and memory traffic cost.

Each path is run many times under ``cProfile``; the report gives its time per
operation (wall, without the profiler), the functions that take most of it
(own time per operation under the profiler, which inflates small Python
functions), and two floors measured in the same run:

* **memory**: the bytes the path must read at least, over the read bandwidth of
  this machine (``numpy.sum`` of a 256 MiB float64 array);
* **arithmetic**: its flops over the float64 GEMM rate (or GEMV rate where the
  product is a matrix-vector one).

The floors count what the structure reads: logits and the snapshot are float64
evaluations whatever the storage dtype (``docs/accuracy.md``). With the numpy
kernels numpy computes them from float64 copies of Q, K and V, twice the bytes
of a float32 KV cache on the paths that stream K, V or Q; with the numba kernels
(:mod:`dynattn.kernels`, named in the report) those paths read the float32 arrays
and widen each element as they go.

Paths:

a. token edit (``set_token(c, k=, v=)``) + ``query_rows`` of one row, 8 heads,
   n = m = 4096, d = e = 64, float32, tau = 0.5, dense storage;
b. causal decode step (``append`` + ``query_row`` of the new row), same shape,
   implicit storage;
c. entry update ``update_k`` and entry ``query`` with half the threshold
   pending, paper regime n = m = d = e = 1024, float64, tau = 0.75, dense.

    python benchmarks/profile_paths.py            # about a minute
    python benchmarks/profile_paths.py --quick    # small sizes (tests)

Writes ``docs/figures/profile.{txt,json}`` (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynattn import DynamicAttention, kernels
from dynattn._timing import (
    add_output_options,
    fmt_seconds,
    format_table,
    gemm_rate,
    machine_info,
    report_header,
    write_report,
)

#: Functions listed per path.
TOP = 6


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second that ``numpy.sum`` streams from memory (best of ``repeats``)."""
    data = np.ones(megabytes * 2**20 // 8)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def gemv_rate(n: int = 4096, d: int = 64, repeats: int = 20) -> float:
    """float64 flop/s of an ``(n, d) @ (d,)`` product (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a, x = rng.standard_normal((n, d)), rng.standard_normal(d)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - start)
    return 2 * n * d / best


def profiled(step: Callable[[int], None], count: int) -> tuple[float, list[tuple[str, float]]]:
    """Run ``step(0..count-1)`` twice: timed (seconds per step) and under cProfile (the
    functions with most own time, seconds per step)."""
    start = time.perf_counter()
    for k in range(count):
        step(k)
    wall = (time.perf_counter() - start) / count
    profile = cProfile.Profile()
    profile.enable()
    for k in range(count, 2 * count):
        step(k)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    own = sorted(((row[2], key) for key, row in stats.items()), reverse=True)[:TOP]
    return wall, [(_name(key), seconds / count) for seconds, key in own]


def _name(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    if filename == "~":
        return function
    return f"{Path(filename).name}:{line}({function})"


def _heads_problem(H: int, n: int, d: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((H, n, d)).astype(np.float32) for _ in range(3))


def path_token_edit(cfg: argparse.Namespace, floors: dict[str, float]) -> dict[str, Any]:
    H, n, d = 8, cfg.n, 64
    Q, K, V = _heads_problem(H, n, d, 1)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=d**-0.5, dtype=np.float32, storage="dense")
    rng = np.random.default_rng(2)
    count = cfg.steps
    edits = [
        (int(rng.integers(n)), *rng.standard_normal((2, H, d)).astype(np.float32), int(rng.integers(n)))
        for _ in range(2 * count + att.threshold)
    ]
    for c, k, v, row in edits[-att.threshold :]:  # warm up, one fold cycle
        att.set_token(c, k=k, v=v)
        att.query_rows([row])

    def step(i: int) -> None:
        c, k, v, row = edits[i]
        att.set_token(c, k=k, v=v)
        att.query_rows([row])

    wall, top = profiled(step, count)
    T = att.threshold
    logit_bytes = H * n * d * 8  # the new key's logits: Q in float64 (numpy kernels)
    fold_flops = 4 * H * n * d  # per edit: its share of the fold's key and value products (e = d)
    return {
        "path": f"token edit + 1 row, H = {H}, n = {n}, d = e = {d}, float32, tau = 0.5, dense (T = {T})",
        "wall": wall,
        "top": top,
        "floors": {
            "memory: Q in float64 (numpy kernels)": logit_bytes / floors["bandwidth"],
            "memory: the same Q in float32 (numba kernels)": logit_bytes / 2 / floors["bandwidth"],
            "arithmetic: logits (GEMV) + fold share (GEMM)": 2 * H * n * d / floors["gemv"]
            + fold_flops / floors["gemm"],
        },
        "stats": att.stats,
    }


def path_decode(cfg: argparse.Namespace, floors: dict[str, float]) -> dict[str, Any]:
    H, n, d = 8, cfg.n, 64
    Q, K, V = _heads_problem(H, n, d, 3)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=d**-0.5, dtype=np.float32, causal=True, storage="implicit")
    rng = np.random.default_rng(4)
    count = cfg.steps
    tokens = rng.standard_normal((2 * count + 16, 3, H, d)).astype(np.float32)
    for q, k, v in tokens[-16:]:
        i, _ = att.append(q=q, k=k, v=v)
        att.query_row(i)

    def step(t: int) -> None:
        q, k, v = tokens[t]
        i, _ = att.append(q=q, k=k, v=v)
        att.query_row(i)

    wall, top = profiled(step, count)
    m = att.m
    kv_bytes = H * m * 2 * d * 8  # e = d
    return {
        "path": f"causal decode step, H = {H}, n0 = {n}, d = e = {d}, float32, implicit",
        "wall": wall,
        "top": top,
        "floors": {
            "memory: K and V in float64 for the new row (numpy kernels)": kv_bytes / floors["bandwidth"],
            "memory: K and V in float32 (numba kernels, a KV cache)": kv_bytes / 2 / floors["bandwidth"],
            "arithmetic: the new row (two GEMVs per head)": 2 * H * m * 2 * d / floors["gemv"],
        },
        "stats": att.stats,
    }


def path_entry(cfg: argparse.Namespace, floors: dict[str, float]) -> list[dict[str, Any]]:
    n = cfg.paper_n
    rng = np.random.default_rng(5)
    Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
    att = DynamicAttention(Q, K, V, tau=0.75, storage="dense")
    T = att.threshold
    count = max(cfg.steps * 4, 2 * T)
    updates = [
        (int(rng.integers(n)), int(rng.integers(n)), float(rng.normal(0, 0.1))) for _ in range(2 * count)
    ]

    def update(k: int) -> None:
        att.update_k(*updates[k])

    wall_u, top_u = profiled(update, count)
    stats_u = att.stats
    att.fold()
    for c in rng.choice(n, size=T // 2, replace=False).tolist():
        att.update_k(c, 0, 0.05)
    queries = [(int(rng.integers(n)), int(rng.integers(n))) for _ in range(2 * count)]

    def query(k: int) -> None:
        att.query(*queries[k])

    wall_q, top_q = profiled(query, count)
    return [
        {
            "path": f"update_k, n = m = d = e = {n}, float64, tau = 0.75, dense (T = {T})",
            "wall": wall_u,
            "top": top_u,
            "floors": {
                "arithmetic: O(n) column update + fold share 2*n*e (GEMM)": 2 * n * n / floors["gemm"],
            },
            "stats": stats_u,
        },
        {
            "path": f"query with T/2 = {T // 2} rows pending, same structure",
            "wall": wall_q,
            "top": top_q,
            "floors": {"arithmetic: O(T) correction, 4*T/2 flops": 4 * (T // 2) / floors["gemv"]},
            "stats": att.stats,
        },
    ]


def report(results: list[dict[str, Any]], floors: dict[str, float], header: list[str]) -> str:
    lines = list(header)
    lines.append(
        f"read bandwidth {floors['bandwidth'] / 1e9:.1f} GB/s, "
        f"float64 GEMM {floors['gemm'] / 1e9:.1f} GFLOP/s, "
        f"GEMV (4096 x 64) {floors['gemv'] / 1e9:.2f} GFLOP/s; kernels: {kernels.active()}"
    )
    for k, result in enumerate(results):
        lines += [
            "",
            f"## {chr(ord('a') + k)}. {result['path']}",
            f"time per operation: {fmt_seconds(result['wall'])}",
        ]
        rows = [
            [name, fmt_seconds(seconds), f"{seconds / result['wall']:.0%}"] for name, seconds in result["top"]
        ]
        lines.append(format_table(["own time under cProfile", "per op", "of wall"], rows))
        floor_rows = [
            [name, fmt_seconds(s), f"{result['wall'] / s:.1f}x"] for name, s in result["floors"].items()
        ]
        lines.append(format_table(["floor", "time", "wall / floor"], floor_rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (tests)")
    add_output_options(parser, "profile", Path(__file__).resolve().parent.parent / "docs" / "figures")
    args = parser.parse_args(argv)
    cfg = argparse.Namespace(
        n=256 if args.quick else 4096, paper_n=128 if args.quick else 1024, steps=10 if args.quick else 150
    )
    floors = {
        "bandwidth": read_bandwidth(16 if args.quick else 256),
        "gemm": gemm_rate(np.float64, 256 if args.quick else 1024),
        "gemv": gemv_rate(),
    }
    results = [path_token_edit(cfg, floors), path_decode(cfg, floors), *path_entry(cfg, floors)]
    info = machine_info({"float64": floors["gemm"]})
    header = report_header(f"python benchmarks/profile_paths.py{' --quick' if args.quick else ''}", info)
    text = report(results, floors, header)
    print(text)
    if not args.no_write:
        write_report(
            {"machine": info, "floors": floors, "results": results, "text": text},
            args.out_dir,
            "profile",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
