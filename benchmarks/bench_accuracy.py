"""What certification costs: fallback rates and slowdown, random and adversarial workloads.

For each workload the same stream of updates and queries is replayed on
``DynamicAttention(certify=True)`` and ``certify=False`` (interleaved repeats,
median times), and the certified run's counters are reported: the fraction of
queries answered by an exact row recomputation and the rows refreshed per fold.
The worst error of the certified answers against the float64 reference is
printed too (the uncertified one, where it is wrong, shows why it matters).

    python benchmarks/bench_accuracy.py            # n = m = d = e = 512
    python benchmarks/bench_accuracy.py --n 256 --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import fmt_ratio, fmt_seconds, format_table, interleaved, machine_info
from dynattn.testing import reference_attention, value_scale


def random_workload(n, rng):
    Q, K, V = (rng.standard_normal((n, n)) / n**0.25 for _ in range(3))
    ops = []
    for _ in range(3 * n):
        kind = "k" if rng.random() < 0.7 else "v"
        ops.append((kind, int(rng.integers(n)), int(rng.integers(n)), float(rng.normal(0, 0.1))))
        ops.append(("q", int(rng.integers(n)), int(rng.integers(n)), 0.0))
    return Q, K, V, ops


def cancellation_workload(n, rng):
    """Row i's weight sits on key i (logit 40); key i is moved away and back."""
    Q = np.eye(n)
    K = 40.0 * np.eye(n) + rng.standard_normal((n, n)) * 0.05
    V = rng.standard_normal((n, n))
    ops = []
    for rep in range(2):
        for c in rng.permutation(n):
            ops.append(("k", int(c), int(c), -80.0 if rep == 0 else 80.0))
            ops.append(("q", int(c), int(rng.integers(n)), 0.0))
            ops.append(("q", int(rng.integers(n)), int(rng.integers(n)), 0.0))
    return Q, K, V, ops


def huge_logit_workload(n, rng):
    """Logits of magnitude ~1e3; key steps of ~1e2 logits."""
    Q = rng.standard_normal((n, n)) / n**0.5
    K = rng.standard_normal((n, n)) * 1e3
    V = rng.standard_normal((n, n))
    ops = []
    for _ in range(2 * n):
        ops.append(("k", int(rng.integers(n)), int(rng.integers(n)), float(rng.normal(0, 1e2))))
        ops.append(("q", int(rng.integers(n)), int(rng.integers(n)), 0.0))
    return Q, K, V, ops


def value_range_workload(n, rng):
    """Values spanning 1e-8..1e8; the largest are then shrunk by 1e8."""
    Q, K = (rng.standard_normal((n, n)) / n**0.25 for _ in range(2))
    V = rng.standard_normal((n, n)) * np.logspace(-8, 8, n)[:, None]
    ops = []
    for c in range(n - n // 8, n):
        for j in rng.choice(n, size=4, replace=False):
            ops.append(("v", c, int(j), -float(V[c, j]) * (1 - 1e-8)))
            ops.append(("q", int(rng.integers(n)), int(j), 0.0))
    return Q, K, V, ops


WORKLOADS = {
    "random": random_workload,
    "cancellation": cancellation_workload,
    "huge logits": huge_logit_workload,
    "value range": value_range_workload,
}


def replay(Q, K, V, ops, *, tau, certify, record=False):
    att = DynamicAttention(Q, K, V, tau=tau, certify=certify, storage="dense")
    answers = []
    start = time.perf_counter()
    for kind, a, b, x in ops:
        if kind == "k":
            att.update_k(a, b, x)
        elif kind == "v":
            att.update_v(a, b, x)
        else:
            answers.append(att.query(a, b))
    elapsed = time.perf_counter() - start
    return elapsed, att, np.array(answers)


def worst_error(Q, K, V, ops, answers):
    """Worst |answer - exact| / max|V[:, j]| over the queries (reference at query time)."""
    K, V = K.copy(), V.copy()
    worst, k = 0.0, 0
    checkpoints = set(range(len(ops)))  # every query
    for step, (kind, a, b, x) in enumerate(ops):
        if kind == "k":
            K[a, b] += x
        elif kind == "v":
            V[a, b] += x
        else:
            if step in checkpoints:
                exact = reference_attention(Q[a : a + 1], K, V, precise=True)[0, b]
                worst = max(worst, abs(answers[k] - exact) / value_scale(V)[b])
            k += 1
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="n = m = d = e (default 512)")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n = 128, 1 repeat")
    args = parser.parse_args(argv)
    n, repeats = (128, 1) if args.quick else (args.n, args.repeats)
    info = machine_info()
    print(f"machine: {info.get('cpu_model')}, {info.get('cores')} cores, numpy {info.get('numpy')}")
    print(f"n = m = d = e = {n}, float64, tau = {args.tau}, dense storage, {repeats} repeats\n")
    rows = []
    for name, make in WORKLOADS.items():
        Q, K, V, ops = make(n, np.random.default_rng(1))
        queries = sum(kind == "q" for kind, *_ in ops)
        problem = (Q, K, V, ops)
        timings = interleaved(
            {
                "on": lambda p=problem: replay(*p, tau=args.tau, certify=True)[0],
                "off": lambda p=problem: replay(*p, tau=args.tau, certify=False)[0],
            },
            repeats=repeats,
            warmup=1,
        )
        _, att, answers = replay(Q, K, V, ops, tau=args.tau, certify=True)
        _, _, unchecked = replay(Q, K, V, ops, tau=args.tau, certify=False)
        stats = att.stats
        folds = max(1, stats["folds"])
        rows.append(
            [
                name,
                len(ops) - queries,
                queries,
                f"{stats['query_fallbacks'] / max(1, queries):.1%}",
                f"{(stats['rows_refreshed'] - n * stats['full_refreshes']) / folds:.2f}",
                stats["full_refreshes"] - 1,
                fmt_seconds(timings["on"].median / len(ops)),
                fmt_ratio(timings["on"].median / timings["off"].median),
                f"{worst_error(Q, K, V, ops, answers):.1e}",
                f"{worst_error(Q, K, V, ops, unchecked):.1e}",
            ]
        )
    print(
        format_table(
            [
                "workload",
                "updates",
                "queries",
                "fallback",
                "refresh/fold",
                "full refr.",
                "per op",
                "on/off",
                "worst err",
                "uncertified err",
            ],
            rows,
        )
    )
    print(
        "\nfallback: queries answered by an exact row recomputation; refresh/fold: rows "
        "recomputed per fold (drift or cancellation); on/off: time with certification over "
        "time without; errors relative to max|V[:, j]| against an extended-precision "
        "reference, every query."
    )


if __name__ == "__main__":
    main()
