"""Update exponents with an explicit linear term: ``t(n) = c0 + c1*n + c2*n**x``.

``dynattn theory`` fits ``c0 + c1*n**x`` (docs/bench.md, "Fitted exponents vs
theory"). An entry update of the dense structure also does O(n) work of its
own (the weight column it updates in place), which that model can only absorb
into ``x``, pulling it below the fold's 2. This script refits a saved paper
run with the linear term made explicit, for the dense update times:

* the point fit profiles ``x`` over a grid of step 0.01 on [1, 3.5]; for each
  ``x`` the best ``(c0, c1, c2)`` is a 3-column linear least-squares problem in
  relative error, and grid points where a coefficient comes out negative are
  skipped (every coefficient is a cost);
* the interval resamples the rounds of every size with replacement (as
  ``dynattn.theory.fit_cost_model`` does) and refits on a grid of step 0.02.

    python benchmarks/fit_linear_term.py docs/figures/exponents_quiet.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _fit(n: np.ndarray, t: np.ndarray, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """Best ``x`` on ``grid`` and its ``(c0, c1, c2)`` for times ``t`` at sizes ``n`` (nan if none)."""
    scale = n / n.max()
    best, best_x, best_c = np.inf, np.nan, np.full(3, np.nan)
    for x in grid:
        design = np.stack([np.ones_like(scale), scale, scale**x], axis=1) / t[:, None]
        coef = np.linalg.lstsq(design, np.ones_like(t), rcond=None)[0]
        if (coef < 0).any():
            continue
        rss = float(np.sum((design @ coef - 1.0) ** 2))
        if rss < best:
            best, best_x, best_c = rss, float(x), coef
    return best_x, best_c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a run saved by dynattn bench --json (paper regime)")
    parser.add_argument("--reps", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--storage", default="dense")
    args = parser.parse_args()
    result = json.load(open(args.json, encoding="utf-8"))
    records = [
        r for r in result["records"] if r["impl"].startswith("dynamic") and r["storage"] == args.storage
    ]
    rng = np.random.default_rng(0)
    print("tau   x of c0 + c1*n + c2*n^x [95% CI]   c0        c1*n at the largest n   c2*n^x there")
    for tau in sorted({r["tau"] for r in records}):
        rows = sorted((r for r in records if r["tau"] == tau), key=lambda r: r["n"])
        n = np.array([r["n"] for r in rows], dtype=float)
        samples = [np.asarray(r["update_s_samples"], dtype=float) for r in rows]
        medians = np.array([np.median(s) for s in samples])
        x, coef = _fit(n, medians, np.arange(1.0, 3.5001, 0.01))
        coarse = np.arange(1.0, 3.5001, 0.02)
        boot = [
            _fit(n, np.array([np.median(rng.choice(s, s.size)) for s in samples]), coarse)[0]
            for _ in range(args.reps)
        ]
        low, high = np.nanquantile(boot, [0.025, 0.975])
        c0, c1, c2 = coef * 1e6
        interval = f"{x:.2f} [{low:.2f}, {high:.2f}]"
        print(f"{tau:<5} {interval:<36} {c0:6.1f} us  {c1:8.1f} us{'':14} {c2:8.1f} us")


if __name__ == "__main__":
    main()
