"""The numba kernels of :mod:`dynattn.kernels` (imported only when numba is there).

Every product widens float32 to float64 exactly and accumulates in float64.
``fastmath`` allows only reassociation and contraction: sums in any order and
fused multiply-adds, both within the ``gamma_k`` bounds the certificate uses;
no assumption about NaN, inf or signed zeros. Single-threaded: these products are
memory-bound, and a parallel region would compete for the cores with BLAS threads
that still spin after the structure's last GEMM (measured on 2 cores: a token
edit's logit column took 1.05 ms in parallel against 0.24 ms on one thread).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_OPTIONS: dict[str, Any] = {"parallel": False, "cache": True, "fastmath": {"reassoc", "contract"}}


@numba.njit(**_OPTIONS)
def rows_dot(rows: Any, head_stride: int, x: Any, out: Any) -> None:  # pragma: no cover - compiled
    """``out[h, i, j] = sum_k rows[h * head_stride + i, k] * x[h, j, k]`` (rows float32,
    C-contiguous; x and out float64). Rows go four at a time (each
    ``x[h, j]`` element loaded once for four products), each read once for every j."""
    heads, count, columns = out.shape
    width = rows.shape[1]
    for h in range(heads):
        base = h * head_stride
        i = 0
        while i + 4 <= count:
            r0, r1, r2, r3 = rows[base + i], rows[base + i + 1], rows[base + i + 2], rows[base + i + 3]
            for j in range(columns):
                xj = x[h, j]
                t0 = t1 = t2 = t3 = 0.0
                for k in range(width):
                    xk = xj[k]
                    t0 += np.float64(r0[k]) * xk
                    t1 += np.float64(r1[k]) * xk
                    t2 += np.float64(r2[k]) * xk
                    t3 += np.float64(r3[k]) * xk
                out[h, i, j], out[h, i + 1, j], out[h, i + 2, j], out[h, i + 3, j] = t0, t1, t2, t3
            i += 4
        while i < count:
            row = rows[base + i]
            for j in range(columns):
                total = 0.0
                for k in range(width):
                    total += np.float64(row[k]) * x[h, j, k]
                out[h, i, j] = total
            i += 1


@numba.njit(**_OPTIONS)
def weighted_rows(w: Any, rows: Any, head_stride: int, out: Any) -> None:  # pragma: no cover - compiled
    """``out[h, j, :] = sum_c w[h, j, c] * rows[h * head_stride + c, :]`` (rows float32,
    C-contiguous; w and out float64). Each row is read once for every j (the
    accumulators of all j stay in cache), two rows per step into each accumulator."""
    heads, columns, count = w.shape
    width = rows.shape[1]
    for h in range(heads):
        base = h * head_stride
        total = np.zeros((columns, width), np.float64)
        if columns == 1:  # a flat loop (views of the accumulator cost more than they save)
            _accumulate(w[h, 0], rows, base, count, total[0])
        else:
            c = 0
            while c + 2 <= count:
                r0, r1 = rows[base + c], rows[base + c + 1]
                for j in range(columns):
                    w0, w1 = w[h, j, c], w[h, j, c + 1]
                    accumulator = total[j]
                    for k in range(width):
                        accumulator[k] += w0 * np.float64(r0[k]) + w1 * np.float64(r1[k])
                c += 2
            if c < count:
                row = rows[base + c]
                for j in range(columns):
                    weight = w[h, j, c]
                    accumulator = total[j]
                    for k in range(width):
                        accumulator[k] += weight * np.float64(row[k])
        out[h] = total


@numba.njit(**_OPTIONS)
def _accumulate(weights: Any, rows: Any, base: int, count: int, total: Any) -> None:  # pragma: no cover
    """``total += sum_c weights[c] * rows[base + c]``, two rows per step (the one-column
    case of :func:`weighted_rows`, in the same order)."""
    width = rows.shape[1]
    c = 0
    while c + 2 <= count:
        w0, w1 = weights[c], weights[c + 1]
        r0, r1 = rows[base + c], rows[base + c + 1]
        for k in range(width):
            total[k] += w0 * np.float64(r0[k]) + w1 * np.float64(r1[k])
        c += 2
    if c < count:
        weight, row = weights[c], rows[base + c]
        for k in range(width):
            total[k] += weight * np.float64(row[k])
