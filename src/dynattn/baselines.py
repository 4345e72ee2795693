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


def _softmax_rows(xp: Any, logits: Any) -> Any:
    """Row-wise stable softmax in the dtype of ``logits`` (a new array), on backend ``xp``."""
    weights = xp.exp(logits - xp.amax(logits, 1)[:, None])
    return weights / xp.sum(weights, 1)[:, None]


class _BackendInputs(AttentionMaintainer):
    """Keeps Q, K, V as arrays of the chosen backend (numpy or torch)."""

    #: DynamicAttention options that a baseline accepts and ignores (swappable constructors)
    IGNORED = ("tau", "storage", "memory_budget", "tol", "certify")

    def __init__(self, Q: Any, K: Any, V: Any, **options: Any):
        for name in self.IGNORED:
            options.pop(name, None)
        super().__init__(Q, K, V, **options)
        xp = self._xp
        self._Q, self._K, self._V = (xp.asarray(x) for x in (self._Q, self._K, self._V))
        self._typed_scale = float(self._dtype.type(self._scale))

    def _logits(self, rows: Any) -> Any:
        return (self._Q[rows] @ self._xp.swap_last(self._K)) * self._typed_scale


class Recompute(_BackendInputs):
    """Apply each change, then recompute the whole output from scratch.

    Runtime complexity: update O(n*m*(d+e)) (two GEMMs), query O(1).
    """

    def __init__(self, Q: Any, K: Any, V: Any, **options: Any):
        super().__init__(Q, K, V, **options)
        self._recompute()

    def _recompute(self) -> None:
        self._O = _softmax_rows(self._xp, self._logits(slice(None))) @ self._V

    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        self._K[i, j] = float(new_value)
        self._recompute()

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        self._V[i, j] = float(new_value)
        self._recompute()

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> Any:
        return self._O[rows, cols]

    def _answer_entry(self, i: int, j: int) -> float:
        return float(self._O[i, j])

    def _answer_rows(self, rows: np.ndarray) -> Any:
        return self._O[rows]


class OnDemand(_BackendInputs):
    """Store Q, K, V only; compute the needed output rows at query time.

    Runtime complexity: update O(1), query O(m*(d+e)) per row asked for.
    """

    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        self._K[i, j] = float(new_value)

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        self._V[i, j] = float(new_value)

    def _answer_entry(self, i: int, j: int) -> float:
        logits = (self._K @ self._Q[i]) * self._typed_scale
        weights = self._xp.exp(logits - self._xp.amax(logits, 0))
        # normalized before the product: a convex combination of finite values stays finite
        return float((weights / self._xp.sum(weights, 0)) @ self._V[:, j])

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> Any:
        unique, inverse = np.unique(rows, return_inverse=True)
        weights = _softmax_rows(self._xp, self._logits(unique))
        return self._xp.einsum("km,mk->k", weights[inverse], self._V[:, cols])

    def _answer_rows(self, rows: np.ndarray) -> Any:
        return _softmax_rows(self._xp, self._logits(rows)) @ self._V


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
