"""LLM regime: token edits followed by full-row queries, multi-head, against the baselines.

Workload (one "edit"): a random token c gets a new key row and value row in
every head (``set_token(c, k=..., v=...)``), then ``--rows`` random query rows
are read in full (``query_row``, all heads). Contenders, measured in one run
with interleaved repeats (median per edit, min-max in brackets):

* ``dynattn``   -- DynamicAttention(tau), storage "auto" (dense if the weights fit 1 GiB)
* ``eager``     -- the same structure with tau = 0 (every edit folded at once)
* ``ondemand``  -- keep Q, K, V; each row query recomputes that row in every head
* ``recompute`` -- recompute the whole output after each edit (numpy, stable softmax)
* ``sdpa``      -- torch.nn.functional.scaled_dot_product_attention recomputation
                   after each edit (only when torch is installed; CPU here)
* ``sdpa-rows`` -- the practitioner's path: write the new key/value rows into the
                   cache, then SDPA of just the queried rows (all heads, one call)

    python benchmarks/bench_llm.py                    # n = 4096, 16384; float32 and float64
    python benchmarks/bench_llm.py --sizes 4096 --dtypes float32 --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import fmt_ratio, fmt_seconds, format_table, interleaved, machine_info

HEADERS = [
    "case",
    "storage",
    "dynattn",
    "eager (ratio)",
    "ondemand (ratio)",
    "recompute (ratio)",
    "sdpa (ratio)",
    "sdpa-rows (ratio)",
    "fallbacks",
]


def softmax_attention(Q, K, V, scale):
    """Batched numpy attention (the Recompute baseline's work), ``(H, n, e)``, one head at a
    time so the ``n x m`` logits of only one head are in memory."""
    out = np.empty((*Q.shape[:-1], V.shape[-1]), dtype=Q.dtype)
    for h in range(Q.shape[0]):
        logits = (Q[h] @ K[h].T) * Q.dtype.type(scale)
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=-1, keepdims=True)
        out[h] = logits @ V[h]
    return out


class Workload:
    def __init__(self, heads, n, d, rows, dtype, seed):
        rng = np.random.default_rng(seed)
        self.scale = 1 / np.sqrt(d)
        self.Q, self.K, self.V = (rng.standard_normal((heads, n, d)).astype(dtype) for _ in range(3))
        self.edits = [
            (
                int(rng.integers(n)),
                rng.standard_normal((heads, d)).astype(dtype),
                rng.standard_normal((heads, d)).astype(dtype),
            )
            for _ in range(4096)
        ]
        self.queries = rng.integers(n, size=(4096, rows))
        self.cursor = 0

    def take(self, count):
        start = self.cursor
        self.cursor = (self.cursor + count) % (len(self.edits) - count)
        return [(self.edits[k], self.queries[k]) for k in range(start, start + count)]


def make_contenders(work, tau, edits_fast, edits_slow, use_torch):
    Q, K, V, scale = work.Q, work.K, work.V, work.scale
    att = DynamicAttention(Q, K, V, tau=tau, scale=scale, dtype=Q.dtype)
    eager = DynamicAttention(Q, K, V, tau=0.0, scale=scale, dtype=Q.dtype)
    batch = max(att.threshold, edits_fast)  # whole fold cycles

    def structure_sample(structure, count):
        def sample():
            plan = work.take(count)
            start = time.perf_counter()
            for (c, k, v), rows in plan:
                structure.set_token(c, k=k, v=v)
                for i in rows:
                    structure.query_row(int(i))
            return (time.perf_counter() - start) / count

        return sample

    state = {"K": K.copy(), "V": V.copy()}

    def ondemand_sample():
        plan = work.take(edits_fast)
        start = time.perf_counter()
        for (c, k, v), rows in plan:
            state["K"][:, c], state["V"][:, c] = k, v
            for i in rows:
                softmax_attention(Q[:, i : i + 1], state["K"], state["V"], scale)
        return (time.perf_counter() - start) / edits_fast

    def recompute_sample():
        plan = work.take(edits_slow)
        start = time.perf_counter()
        for (c, k, v), rows in plan:
            state["K"][:, c], state["V"][:, c] = k, v
            out = softmax_attention(Q, state["K"], state["V"], scale)
            for i in rows:
                out[:, i].copy()
        return (time.perf_counter() - start) / edits_slow

    contenders = {
        "dynattn": structure_sample(att, batch),
        "eager": structure_sample(eager, edits_fast),
        "ondemand": ondemand_sample,
        "recompute": recompute_sample,
    }
    if use_torch:
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(x.copy()) for x in (Q, K, V))

        def sdpa_sample():
            plan = work.take(edits_slow)
            start = time.perf_counter()
            for (c, k, v), rows in plan:
                tk[:, c], tv[:, c] = torch.from_numpy(k), torch.from_numpy(v)
                # one head at a time: the math path materializes the n x m logits
                outs = [
                    F.scaled_dot_product_attention(tq[h], tk[h], tv[h], scale=scale) for h in range(len(tq))
                ]
                for i in rows:
                    [out[int(i)].clone() for out in outs]
            return (time.perf_counter() - start) / edits_slow

        contenders["sdpa"] = sdpa_sample
        rk, rv = tk.clone(), tv.clone()

        def sdpa_rows_sample():
            plan = work.take(edits_fast)
            start = time.perf_counter()
            for (c, k, v), rows in plan:
                rk[:, c], rv[:, c] = torch.from_numpy(k), torch.from_numpy(v)
                F.scaled_dot_product_attention(tq[:, torch.from_numpy(rows)], rk, rv, scale=scale)
            return (time.perf_counter() - start) / edits_fast

        contenders["sdpa-rows"] = sdpa_rows_sample
    return contenders, att


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d", type=int, default=64, help="d = e")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--rows", type=int, default=4, help="full-row queries per edit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer edits")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401

        use_torch = True
    except ImportError:
        use_torch = False
    info = machine_info()
    print(
        f"machine: {info['cpu_model']}, {info['cores']} cores, numpy {info['numpy']}, "
        f"torch {'yes' if use_torch else 'not installed (no sdpa column)'}"
    )
    print(
        f"{args.heads} heads, d = e = {args.d}, tau = {args.tau}, {args.rows} full-row "
        f"queries per token edit; time per edit (median of {args.repeats} interleaved repeats)\n"
    )
    rows = []
    for dtype in args.dtypes:
        for n in args.sizes:
            work = Workload(args.heads, n, args.d, args.rows, np.dtype(dtype), seed=n)
            slow = 1 if n >= 8192 or args.quick else 2
            contenders, att = make_contenders(work, args.tau, 16 if args.quick else 64, slow, use_torch)
            timings = interleaved(contenders, repeats=1 if args.quick else args.repeats, warmup=1)
            ours = timings["dynattn"].median
            row = [f"{dtype} n={n}", att.storage, fmt_seconds(ours)]
            for name in ("eager", "ondemand", "recompute", "sdpa", "sdpa-rows"):
                if name in timings:
                    row.append(
                        f"{fmt_seconds(timings[name].median)} ({fmt_ratio(timings[name].median / ours)})"
                    )
                else:
                    row.append("-")
            row.append(f"{att.stats['query_fallbacks']}")
            rows.append(row)
            print(format_table(HEADERS, rows[-1:]))
    print()
    print(format_table(HEADERS, rows))
    print("\nratio = contender's time per edit / dynattn's time per edit (higher: dynattn faster)")


if __name__ == "__main__":
    main()
