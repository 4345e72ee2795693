"""Storage strategies for the snapshot attention weights (SPEC section 2).

The structure needs, when a key/value row ``c`` first becomes pending, the
stabilized weight column ``a0_c = exp(s * Q K_c^T - mu)`` *as it was folded*
into the snapshot ``N = A0 V0``. A strategy decides where that column comes
from:

``dense``
    Keep ``A`` itself, column-contiguous (stored as ``A^T: (m, n)`` in the
    structure's dtype). Getting a column is an O(n) copy, and it is bit-for-bit
    the column that was folded, so taking it out again cancels exactly.
    Memory O(n*m).
``implicit``
    Keep nothing: recompute the column from ``Q`` and ``K_c`` (an O(n*d)
    matrix-vector product). Memory O((n+m)*d + n*T) for the whole structure.
    The recomputation can differ from the folded column by rounding, which the
    structure charges to its per-row error bound.

Strategies live in :data:`STORAGES`, a plain name -> class registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class DenseStorage:
    """Keep the stabilized weights ``A^T: (H, m, n)`` (the paper's O(n*m) space per head).

    The arrays are owned by the structure's buffer registry (they grow with
    ``append``); :attr:`LAYOUT` names their axes. Runtime complexity:
    ``snapshot_column`` O(H*n); ``commit_columns`` O(H*n*t); ``rescale_rows`` /
    ``set_rows`` O(m) per row.
    """

    name = "dense"
    #: a column taken out is exactly the column that was folded in
    exact_snapshot = True
    #: arrays the structure allocates on this object: name -> (axes, dtype or None for the
    #: structure's dtype, on the backend's device?). ``column_error`` bounds each stored
    #: column's relative error (host bookkeeping).
    LAYOUT = {"weights_t": ("Hmn", None, True), "column_error": ("Hm", np.float64, False)}

    weights_t: Any
    column_error: np.ndarray

    def __init__(self, xp: Any):
        self.xp = xp

    def snapshot_column(self, c: int, compute: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Column ``c`` of every head's snapshot weights as float64 ``(H, n)``, and
        each head's relative error bound ``(H,)``."""
        return self.xp.astype(self.weights_t[:, c], np.float64), self.column_error[:, c].copy()

    def commit_columns(self, key_rows: np.ndarray, columns: np.ndarray, errors: np.ndarray) -> None:
        """Store new snapshot columns ``columns: (H, t, n)`` of ``key_rows: (t,)`` at a fold."""
        self.weights_t[:, key_rows] = self.xp.astype(columns, self.weights_t.dtype)
        self.column_error[:, key_rows] = errors

    def rescale_rows(self, heads: np.ndarray, rows: np.ndarray, factors: np.ndarray) -> None:
        """Multiply weight rows ``(heads[k], rows[k])`` by ``factors[k]``."""
        block = self.weights_t[heads, :, rows] * factors[:, None]  # (k, m), float64
        self.weights_t[heads, :, rows] = self.xp.astype(block, self.weights_t.dtype)

    def set_rows(self, head: int, rows: np.ndarray, weights: np.ndarray) -> None:
        """Overwrite weight rows ``rows`` of ``head`` with ``weights: (len(rows), m)``."""
        self.weights_t[head][:, rows] = self.xp.astype(self.xp.swap_last(weights), self.weights_t.dtype)


class ImplicitStorage:
    """Keep no weights; recompute a snapshot column when it is needed.

    Runtime complexity: ``snapshot_column`` O(H*n*d); everything else O(1).
    """

    name = "implicit"
    exact_snapshot = False
    LAYOUT: dict[str, tuple[str, Any, bool]] = {}

    def __init__(self, xp: Any):
        self.xp = xp

    def snapshot_column(self, c: int, compute: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        column = compute(c)
        return column, np.zeros(column.shape[0])

    def commit_columns(self, key_rows: np.ndarray, columns: np.ndarray, errors: np.ndarray) -> None:
        pass

    def rescale_rows(self, heads: np.ndarray, rows: np.ndarray, factors: np.ndarray) -> None:
        pass

    def set_rows(self, head: int, rows: np.ndarray, weights: np.ndarray) -> None:
        pass


#: Storage strategies by name. ``"auto"`` is resolved by :func:`choose_storage`.
STORAGES: dict[str, type[DenseStorage] | type[ImplicitStorage]] = {
    "dense": DenseStorage,
    "implicit": ImplicitStorage,
}


def choose_storage(name: str, n: int, m: int, dtype: np.dtype, memory_budget: int) -> str:
    """Resolve ``"auto"``: dense when the ``heads*n*m`` weights fit ``memory_budget`` bytes."""
    if name != "auto":
        return name
    return "dense" if n * m * dtype.itemsize <= memory_budget else "implicit"
