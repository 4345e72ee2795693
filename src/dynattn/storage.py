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

import numpy as np


class DenseStorage:
    """Keep the stabilized weights ``A^T: (m, n)`` (the paper's O(n*m) space).

    Runtime complexity: ``snapshot_column`` O(n); ``commit_columns`` O(n*t);
    ``rescale_rows`` / ``set_rows`` O(m) per row.
    """

    name = "dense"
    #: a column taken out is exactly the column that was folded in
    exact_snapshot = True

    def __init__(self, n: int, m: int, dtype: np.dtype):
        self.weights_t = np.zeros((m, n), dtype=dtype)
        #: relative error bound of each stored column against a fresh computation
        self.column_error = np.zeros(m)

    def snapshot_column(self, c: int, compute: Callable[[int], np.ndarray]) -> tuple[np.ndarray, float]:
        """Column ``c`` of the snapshot weights as float64 ``(n,)``, and its relative error bound."""
        return self.weights_t[c].astype(np.float64), float(self.column_error[c])

    def commit_columns(self, key_rows: np.ndarray, columns: np.ndarray, errors: np.ndarray) -> None:
        """Store new snapshot columns ``columns: (t, n)`` for ``key_rows: (t,)`` at a fold."""
        self.weights_t[key_rows] = columns
        self.column_error[key_rows] = errors

    def rescale_rows(self, rows: np.ndarray, factors: np.ndarray) -> None:
        """Multiply weight rows ``rows`` by ``factors`` (a stabilizer moved up)."""
        block = self.weights_t[:, rows]
        block *= factors
        self.weights_t[:, rows] = block

    def set_rows(self, rows: np.ndarray, weights: np.ndarray) -> None:
        """Overwrite weight rows ``rows`` with freshly computed ``weights: (len(rows), m)``."""
        self.weights_t[:, rows] = weights.T

    @property
    def nbytes(self) -> int:
        return int(self.weights_t.nbytes + self.column_error.nbytes)


class ImplicitStorage:
    """Keep no weights; recompute a snapshot column when it is needed.

    Runtime complexity: ``snapshot_column`` O(n*d); everything else O(1).
    """

    name = "implicit"
    exact_snapshot = False

    def __init__(self, n: int, m: int, dtype: np.dtype):
        pass

    def snapshot_column(self, c: int, compute: Callable[[int], np.ndarray]) -> tuple[np.ndarray, float]:
        return compute(c), 0.0

    def commit_columns(self, key_rows: np.ndarray, columns: np.ndarray, errors: np.ndarray) -> None:
        pass

    def rescale_rows(self, rows: np.ndarray, factors: np.ndarray) -> None:
        pass

    def set_rows(self, rows: np.ndarray, weights: np.ndarray) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0


#: Storage strategies by name. ``"auto"`` is resolved by :func:`choose_storage`.
STORAGES: dict[str, type[DenseStorage] | type[ImplicitStorage]] = {
    "dense": DenseStorage,
    "implicit": ImplicitStorage,
}


def choose_storage(name: str, n: int, m: int, dtype: np.dtype, memory_budget: int) -> str:
    """Resolve ``"auto"``: dense when ``n*m`` weights fit ``memory_budget`` bytes, else implicit."""
    if name != "auto":
        return name
    return "dense" if n * m * dtype.itemsize <= memory_budget else "implicit"
