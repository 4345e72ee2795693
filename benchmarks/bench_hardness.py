"""Time the Hinted Mv reduction's phases as n grows and fit log-log exponents.

For each tau and n this builds a random Boolean instance (M, V with density
``--density``, P with exactly ``ceil(n**tau)`` nonzeros), runs the reduction of
:mod:`dynattn.hardness` through the chosen attention black box and times

* phase 2: ``hint(P)`` -- ``ceil(n**tau)`` calls of ``update_k`` (timed alone, and
  with the reduction's O(n^2) scan of the dense input P);
* fold:    ``attention.rebuild()`` right after phase 3, the deferred work that
  an amortized analysis charges to the phase-2 updates (DynamicAttention only);
* phase 3: ``column(i)`` -- ``n`` calls of ``query`` (mean over ``--columns``).

It then prints fitted exponents (slope of log time against log n) next to the
bounds of the conditional lower bound (van den Brand, Song, Zhou, arXiv
2304.02207; see ``docs/hardness.md``): amortized update time
``n^(omega(1,1,tau) - tau)`` and phase-3 time ``n^(1 + tau)``. omega(1,1,tau) is
the best known upper bound of :func:`dynattn.theory.omega_rect` (2 for
tau <= alpha, the published tables in between, omega(1,1,1) < 2.371339).

Usage::

    python benchmarks/bench_hardness.py --quick
    python benchmarks/bench_hardness.py --storage dense implicit
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from dynattn import DynamicAttention
from dynattn.baselines import BASELINES, Eager
from dynattn.hardness import HintedMvViaAttention, hinted_mv_direct, max_hint_nonzeros
from dynattn.storage import STORAGES
from dynattn.sweep import DTYPES
from dynattn.theory import ALPHA, OMEGA_TABLES, omega_rect

ATTENTIONS = {"dynamic": DynamicAttention, **BASELINES}


def instance(n: int, tau: float, density: float, seed: int):
    rng = np.random.default_rng(seed)
    M = (rng.random((n, n)) < density).astype(np.int8)
    V = (rng.random((n, n)) < density).astype(np.int8)
    P = np.zeros((n, n), dtype=np.int8)
    P.flat[rng.choice(n * n, size=max_hint_nonzeros(n, tau), replace=False)] = 1
    return M, V, P


class Timed:
    """Wraps a black box and adds up the seconds spent inside ``update_k`` and ``query``."""

    def __init__(self, inner):
        self.inner = inner
        self.update_seconds = 0.0
        self.query_seconds = 0.0

    def update_k(self, i, j, delta):
        start = time.perf_counter()
        self.inner.update_k(i, j, delta)
        self.update_seconds += time.perf_counter() - start

    def query(self, i, j):
        start = time.perf_counter()
        answer = self.inner.query(i, j)
        self.query_seconds += time.perf_counter() - start
        return answer

    def __getattr__(self, name):
        return getattr(self.inner, name)


def measure(n, tau, *, attention, storage, dtype, density, columns, repeats, seed):
    """Best-of-``repeats`` seconds for phase 1, phase 2 (whole and updates only),
    phase 3 (per column) and the fold."""
    best = {
        "phase1": math.inf,
        "phase2": math.inf,
        "updates_s": math.inf,
        "phase3": math.inf,
        "fold": math.inf,
    }
    M, V, P = instance(n, tau, density, seed)
    rng = np.random.default_rng(seed + 1)
    cols = rng.choice(n, size=min(columns, n), replace=False)
    options = {"dtype": dtype}
    if attention in (DynamicAttention, Eager):
        options["storage"] = storage
    for _ in range(repeats):
        start = time.perf_counter()
        solver = HintedMvViaAttention(
            M, V, tau=tau, attention=lambda *a, **k: Timed(attention(*a, **k)), **options
        )
        best["phase1"] = min(best["phase1"], time.perf_counter() - start)
        start = time.perf_counter()
        solver.hint(P)
        best["phase2"] = min(best["phase2"], time.perf_counter() - start)
        best["updates_s"] = min(best["updates_s"], solver.attention.update_seconds)
        start = time.perf_counter()
        answers = [solver.column(int(i)) for i in cols]
        best["phase3"] = min(best["phase3"], (time.perf_counter() - start) / len(cols))
        if hasattr(solver.attention, "rebuild"):
            start = time.perf_counter()
            solver.attention.rebuild()
            best["fold"] = min(best["fold"], time.perf_counter() - start)
        for i, got in zip(cols, answers, strict=True):  # a benchmark of wrong answers is worthless
            if not np.array_equal(got, hinted_mv_direct(M, V, P, int(i))):
                raise AssertionError(f"wrong column {i} at n={n}, tau={tau}")
    best["updates"] = max_hint_nonzeros(n, tau)
    return best


def slope(sizes, times) -> float:
    times = np.asarray(times, dtype=float)
    if len(sizes) < 2 or not np.all(np.isfinite(times)) or np.any(times <= 0):
        return math.nan
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (~20 s)")
    parser.add_argument("--sizes", type=int, nargs="+", help="values of n (default 256..2048)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--attention", choices=list(ATTENTIONS), default="dynamic")
    parser.add_argument(
        "--storage",
        nargs="+",
        choices=[*STORAGES, "auto"],
        default=["dense"],
        help="DynamicAttention storage mode(s)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument("--density", type=float, default=0.1, help="density of M and V")
    parser.add_argument("--columns", type=int, default=4, help="phase-3 columns timed per size")
    parser.add_argument("--repeats", type=int, default=None, help="best of this many (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sizes = args.sizes or ([128, 256, 512, 1024] if args.quick else [256, 512, 1024, 2048])
    repeats = args.repeats or (1 if args.quick else 3)
    attention = ATTENTIONS[args.attention]
    dtype = np.dtype(args.dtype)
    storages = args.storage if attention in (DynamicAttention, Eager) else ["-"]

    print(
        f"# bench_hardness: numpy {np.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, sizes {sizes}, best of {repeats}, dtype {dtype}, "
        f"M/V density {args.density}, P with ceil(n^tau) nonzeros"
    )
    print(
        f"# omega(1,1,tau): best known upper bound (dynattn.theory: {', '.join(OMEGA_TABLES)}), "
        f"2 for tau <= alpha = {ALPHA}, omega(1,1,1) = {omega_rect(1.0)}"
    )
    for storage in storages:
        print(f"\n## attention = {args.attention}, storage = {storage}")
        header = (
            f"{'tau':>5} {'n':>6} {'updates':>7} {'phase1 s':>9} {'phase2 s':>9} "
            f"{'updates s':>9} {'us/update':>9} {'fold s':>8} {'phase3 s/col':>12} "
            f"{'us/query':>9}"
        )
        print(header)
        summary = []
        for tau in args.taus:
            rows = []
            for n in sizes:
                r = measure(
                    n,
                    tau,
                    attention=attention,
                    storage=storage,
                    dtype=dtype,
                    density=args.density,
                    columns=args.columns,
                    repeats=repeats,
                    seed=args.seed + n,
                )
                rows.append(r)
                print(
                    f"{tau:5.2f} {n:6d} {r['updates']:7d} {r['phase1']:9.4f} {r['phase2']:9.5f} "
                    f"{r['updates_s']:9.5f} {1e6 * r['updates_s'] / r['updates']:9.2f} "
                    f"{r['fold']:8.5f} "
                    f"{r['phase3']:12.5f} {1e6 * r['phase3'] / n:9.2f}",
                    flush=True,
                )
            per_update = [r["updates_s"] / r["updates"] for r in rows]
            charged = [(r["updates_s"] + r["fold"]) / r["updates"] for r in rows]
            phase2 = [r["phase2"] for r in rows]
            phase3 = [r["phase3"] for r in rows]
            summary.append(
                (
                    tau,
                    slope(sizes, per_update),
                    slope(sizes, charged),
                    omega_rect(tau) - tau,
                    slope(sizes, phase2),
                    omega_rect(tau),
                    slope(sizes, phase3),
                    1 + tau,
                )
            )
        print(
            "\nfitted exponents (slope of log time vs log n); 'update' = one update_k call, "
            "'+fold' = with the deferred fold charged, phase 2 = whole hint(P), "
            "phase 3 = one column (n queries):"
        )
        print(
            f"{'tau':>5} {'update':>7} {'+fold':>6} {'w(1,1,t)-t':>10} {'phase2':>7} "
            f"{'w(1,1,t)':>8} {'phase3':>7} {'1+tau':>6}"
        )
        for tau, up, ch, b_up, p2, b_p2, p3, b_p3 in summary:
            print(f"{tau:5.2f} {up:7.2f} {ch:6.2f} {b_up:10.3f} {p2:7.2f} {b_p2:8.3f} {p3:7.2f} {b_p3:6.2f}")


if __name__ == "__main__":
    main()
