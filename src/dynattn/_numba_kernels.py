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
    C-contiguous; x and out float64)."""
    heads, count, columns = out.shape
    width = rows.shape[1]
    for h in range(heads):
        for i in range(count):
            row = rows[h * head_stride + i]
            for j in range(columns):
                total = 0.0
                for k in range(width):
                    total += np.float64(row[k]) * x[h, j, k]
                out[h, i, j] = total


@numba.njit(**_OPTIONS)
def weighted_rows(w: Any, rows: Any, head_stride: int, out: Any) -> None:  # pragma: no cover - compiled
    """``out[h, j, :] = sum_c w[h, j, c] * rows[h * head_stride + c, :]`` (rows float32,
    C-contiguous; w and out float64)."""
    heads, columns, count = w.shape
    width = rows.shape[1]
    for h in range(heads):
        for j in range(columns):
            total = np.zeros(width, np.float64)
            for c in range(count):
                weight = w[h, j, c]
                row = rows[h * head_stride + c]
                for k in range(width):
                    total[k] += weight * np.float64(row[k])
            out[h, j] = total
