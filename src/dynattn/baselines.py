"""Baselines with the :class:`~dynattn.DynamicAttention` interface.

The alternatives ``DynamicAttention`` is measured against (README.md,
"Performance"; docs/bench.md), each an
:class:`~dynattn.interface.AttentionMaintainer`:

==========  =======================  ==================  ==================
name        update_k / update_v      query (one entry)   memory
==========  =======================  ==================  ==================
Recompute   O(n*m*(d+e))             O(1)                O(n*e + (n+m)*d)
OnDemand    O(1)                     O(m*(d+e))          O((n+m)*d + m*e)
Eager       O(n*e) (rank-1 fold)     O(1)                as DynamicAttention
==========  =======================  ==================  ==================

``Recompute`` applies each change and recomputes the whole output (what a
model does without this library); ``OnDemand`` stores the inputs and computes
the rows a query needs; ``Eager`` is ``DynamicAttention`` with ``tau = 0``,
folding every change at once (the paper's structure without laziness).

All three accept the same constructor as :class:`~dynattn.DynamicAttention`
(``tau``, ``storage``, ``memory_budget``, ``tol`` and ``certify`` are accepted
and ignored where they do not apply), so benchmarks and users can swap them.
``Recompute`` and ``OnDemand`` take a single problem (no head axes) and
compute in the working dtype, as a user recomputing attention would; they
share :class:`Baseline`, which validates every argument and calls a small
set of hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dynattn._base import ValidatedInputs
from dynattn._validation import check_index, check_index_array
from dynattn.interface import AttentionMaintainer
from dynattn.structure import DynamicAttention

__all__ = ["BASELINES", "Baseline", "Eager", "OnDemand", "Recompute"]


def _softmax_rows(xp: Any, logits: Any) -> Any:
    """Row-wise stable softmax in the dtype of ``logits`` (a new array), on backend ``xp``."""
    weights = xp.exp(logits - xp.amax(logits, 1)[:, None])
    return weights / xp.sum(weights, 1)[:, None]


class Baseline(ValidatedInputs):
    """Base of the from-scratch baselines: public operations over a few hooks.

    Keeps ``Q, K, V`` as arrays of the chosen backend (numpy or torch) and
    implements the :class:`~dynattn.interface.AttentionMaintainer` operations:
    each validates its arguments, then calls a hook that subclasses implement
    and that therefore never sees bad input.

    Hooks
    -----
    ``_apply_k(i, j, new_value)``, ``_apply_v(i, j, new_value)``
        Set ``K[i, j]`` / ``V[i, j]`` to ``new_value`` (already checked finite
        in the dtype).
    ``_answer_entries(rows, cols)``
        ``O[rows[k], cols[k]]``, a ``(k,)`` array; ``rows``, ``cols`` are valid
        int64 index arrays.
    ``_answer_rows(rows)``
        ``O[rows]``, a ``(k, e)`` array.
    ``_answer_entry(i, j)``
        ``O[i, j]`` as a float; defaults to ``_answer_entries``.
    """

    #: DynamicAttention options that a baseline accepts and ignores (swappable constructors)
    IGNORED = ("tau", "storage", "memory_budget", "tol", "certify")

    def __init__(self, Q: Any, K: Any, V: Any, **options: Any):
        for name in self.IGNORED:
            options.pop(name, None)
        super().__init__(Q, K, V, **options)
        xp = self._xp
        self._Q, self._K, self._V = (xp.asarray(x) for x in (self._Q, self._K, self._V))
        self._typed_scale = float(self._dtype.type(self._scale))

    # ------------------------------------------------------------------ the paper's operations
    def update_k(self, i: int, j: int, delta: float) -> None:
        """Paper's UpdateK: ``K[i, j] += delta``."""
        i = check_index("i", i, self.m, axis="key rows, m")
        j = check_index("j", j, self.d, axis="key columns, d")
        new = self._checked_sum("delta", float(self._K[i, j]), delta, "K")
        self._apply_k(i, j, new)

    def update_v(self, i: int, j: int, delta: float) -> None:
        """Paper's UpdateV: ``V[i, j] += delta``."""
        i = check_index("i", i, self.m, axis="value rows, m")
        j = check_index("j", j, self.e, axis="value columns, e")
        new = self._checked_sum("delta", float(self._V[i, j]), delta, "V")
        self._apply_v(i, j, new)

    def query(self, i: int, j: int) -> float:
        """Paper's Query: ``O[i, j]`` as a Python float."""
        i = check_index("i", i, self.n, axis="query rows, n")
        j = check_index("j", j, self.e, axis="output columns, e")
        return float(self._answer_entry(i, j))

    # ------------------------------------------------------------------ more answers
    def query_row(self, i: int) -> Any:
        """``O[i, :]`` as a new ``(e,)`` array of the structure's dtype."""
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._xp.astype(self._answer_rows(np.array([i]))[0], self._output_dtype)

    def query_many(self, rows: Any, cols: Any) -> Any:
        """``O[rows[k], cols[k]]`` for every k, as a new ``(len(rows),)`` array."""
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols: expected the same length, got {rows.shape[0]} and {cols.shape[0]}"
            )
        return self._xp.astype(self._answer_entries(rows, cols), self._output_dtype)

    def output(self) -> Any:
        """The whole attention output ``O: (n, e)``, as a new array."""
        return self._xp.astype(self._answer_rows(np.arange(self.n)), self._output_dtype)

    # ------------------------------------------------------------------ hooks
    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        raise NotImplementedError

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        raise NotImplementedError

    def _answer_entry(self, i: int, j: int) -> float:
        return float(self._answer_entries(np.array([i]), np.array([j]))[0])

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> Any:
        raise NotImplementedError

    def _answer_rows(self, rows: np.ndarray) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _logits(self, rows: Any) -> Any:
        return (self._Q[rows] @ self._xp.swap_last(self._K)) * self._typed_scale


class Recompute(Baseline):
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


class OnDemand(Baseline):
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


#: Baselines by name, for benchmarks and parametrized tests: each is called as
#: ``BASELINES[name](Q, K, V, **options)`` with DynamicAttention's options.
BASELINES: dict[str, Callable[..., AttentionMaintainer]] = {
    "recompute": Recompute,
    "ondemand": OnDemand,
    "eager": Eager,
}
