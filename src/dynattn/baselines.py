"""Baselines with the :class:`~dynattn.DynamicAttention` interface (SPEC section 5).

==========  =======================  ==================  ==================
name        update_k / update_v      query (one entry)   memory
==========  =======================  ==================  ==================
Recompute   O(n*m*(d+e))             O(1)                O(n*e + (n+m)*d)
OnDemand    O(1)                     O(m*(d+e))          O((n+m)*d + m*e)
Eager       O(n*e) (rank-1 fold)     O(1) + O(tau=0)     as DynamicAttention
==========  =======================  ==================  ==================

All three accept the same constructor as :class:`~dynattn.DynamicAttention`
(``tau``, ``storage``, ``memory_budget`` and ``tol`` are accepted and ignored
where they do not apply), so benchmarks and users can swap them. They compute
in the working dtype, as a user recomputing attention would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynattn._base import AttentionMaintainer
from dynattn.structure import DynamicAttention


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise stable softmax in the dtype of ``logits`` (a new array)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


class Recompute(AttentionMaintainer):
    """Apply each change, then recompute the whole output from scratch.

    Runtime complexity: update O(n*m*(d+e)) (two GEMMs), query O(1).
    """

    def __init__(self, Q: Any, K: Any, V: Any, *, scale: float = 1.0, dtype: Any = np.float64,
                 **ignored: Any):
        super().__init__(Q, K, V, scale=scale, dtype=dtype)
        self._recompute()

    def _recompute(self) -> None:
        weights = _softmax_rows((self._Q @ self._K.T) * self._dtype.type(self._scale))
        self._O = weights @ self._V

    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        self._K[i, j] = new_value
        self._recompute()

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        self._V[i, j] = new_value
        self._recompute()

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self._O[rows, cols].astype(np.float64)

    def _answer_entry(self, i: int, j: int) -> float:
        return float(self._O[i, j])

    def _answer_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._O[rows].astype(np.float64)


class OnDemand(AttentionMaintainer):
    """Store Q, K, V only; compute the needed output rows at query time.

    Runtime complexity: update O(1), query O(m*(d+e)) per row asked for.
    """

    def __init__(self, Q: Any, K: Any, V: Any, *, scale: float = 1.0, dtype: Any = np.float64,
                 **ignored: Any):
        super().__init__(Q, K, V, scale=scale, dtype=dtype)

    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        self._K[i, j] = new_value

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        self._V[i, j] = new_value

    def _weights(self, rows: np.ndarray) -> np.ndarray:
        return _softmax_rows((self._Q[rows] @ self._K.T) * self._dtype.type(self._scale))

    def _answer_entry(self, i: int, j: int) -> float:
        logits = (self._K @ self._Q[i]) * self._dtype.type(self._scale)
        weights = np.exp(logits - logits.max())
        return float(weights @ self._V[:, j] / weights.sum())

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(rows, return_inverse=True)
        weights = self._weights(unique)
        return np.einsum("km,mk->k", weights[inverse], self._V[:, cols]).astype(np.float64)

    def _answer_rows(self, rows: np.ndarray) -> np.ndarray:
        return (self._weights(rows) @ self._V).astype(np.float64)


class Eager(DynamicAttention):
    """``DynamicAttention`` with ``tau = 0``: every change is folded at once.

    The threshold is 1, so each update ends with a rank-1 fold of its column
    into the snapshot ``N = A V`` (BLAS-2, O(n*e)) and queries never see a
    pending column. Runtime complexity: update O(n*e), query O(1).
    """

    def __init__(self, Q: Any, K: Any, V: Any, *, tau: Any = None, **options: Any):
        super().__init__(Q, K, V, tau=0.0, **options)


#: Baselines by name, for benchmarks and parametrized tests.
BASELINES: dict[str, type[AttentionMaintainer]] = {
    "recompute": Recompute,
    "ondemand": OnDemand,
    "eager": Eager,
}
