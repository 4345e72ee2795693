"""The interface shared by :class:`~dynattn.DynamicAttention` and the baselines.

:class:`AttentionMaintainer` validates every argument at the public boundary
and then calls a private ``_apply_*`` / ``_answer_*`` method that subclasses
implement. Subclasses therefore never see bad input, and a rejected call can
never leave a half-applied change behind.

Notation (SPEC section 1): ``Q: (n, d)``, ``K: (m, d)``, ``V: (m, e)``,
``A = exp(scale * Q K^T)``, ``O = D^-1 A V`` with ``D = diag(A 1)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynattn._validation import (
    check_dtype,
    check_index,
    check_index_array,
    check_matrix,
    check_scalar,
)
from dynattn.backends import resolve_backend


class AttentionMaintainer:
    """Common constructor, validation and read-only accessors.

    Parameters
    ----------
    Q : (n, d) array_like
        Queries. Copied; the caller's array is never modified.
    K : (m, d) array_like
        Keys. Copied.
    V : (m, e) array_like
        Values. Copied.
    scale : float, keyword-only
        Softmax scale ``s`` in ``exp(s * Q K^T)``; 1.0 is the paper's,
        ``1/sqrt(d)`` the transformer's.
    dtype : float32 or float64, keyword-only
        Storage dtype of the inputs and of the maintained state (default:
        float64, or a torch tensor's own dtype).
    backend : {"auto", "numpy", "torch"} or None, keyword-only
        Array backend (:mod:`dynattn.backends`); ``"auto"`` follows the inputs.
    device : optional, keyword-only
        Device for the torch backend.

    After ``__init__`` the validated inputs ``_Q, _K, _V`` are host numpy
    arrays; subclasses move what they keep onto ``self._xp``.
    """

    #: whether Q, K, V may carry leading head/batch axes ``(*batch, rows, cols)``
    _batched = False

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        scale: float = 1.0,
        dtype: Any = None,
        backend: str | None = None,
        device: Any = None,
    ):
        self._xp = xp = resolve_backend(backend, Q, K, V, device=device)
        dtype, output_dtype = xp.dtypes_for(dtype, Q)
        Q, K, V = (xp.to_numpy(x) for x in (Q, K, V))
        self._dtype = check_dtype(dtype)
        #: dtype of the arrays handed back (the storage dtype, or a torch half dtype)
        self._output_dtype = output_dtype if output_dtype is not None else xp.storage_dtype(self._dtype)
        self._Q = check_matrix("Q", Q, dtype=self._dtype, batch=None if self._batched else ())
        batch = self._Q.shape[:-2]
        n, d = self._Q.shape[-2:]
        self._K = check_matrix(
            "K", K, dtype=self._dtype, cols=d, col_name="columns (d, as Q has)", batch=batch
        )
        m = self._K.shape[-2]
        self._V = check_matrix("V", V, dtype=self._dtype, rows=m, row_name="rows (m, as K has)", batch=batch)
        #: leading head/batch axes (``()`` for a single head)
        self.batch_shape: tuple[int, ...] = batch
        self._scale = check_scalar("scale", scale)
        self._dtype_max = float(np.finfo(self._dtype).max)
        self.n, self.d = n, d
        self.m, self.e = m, self._V.shape[-1]

    # ------------------------------------------------------------------ accessors
    @property
    def Q(self) -> Any:
        """Current queries ``(..., n, d)``: a read-only view (numpy) or a copy (torch)."""
        return self._xp.public(self._Q)

    @property
    def K(self) -> Any:
        """Current keys ``(..., m, d)``: a read-only view (numpy) or a copy (torch)."""
        return self._xp.public(self._K)

    @property
    def V(self) -> Any:
        """Current values ``(..., m, e)``: a read-only view (numpy) or a copy (torch)."""
        return self._xp.public(self._V)

    @property
    def backend(self) -> str:
        """Array backend in use (``"numpy"`` or ``"torch"``)."""
        return self._xp.name

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype (float32 or float64)."""
        return self._dtype

    @property
    def scale(self) -> float:
        """Softmax scale ``s``."""
        return self._scale

    # ------------------------------------------------------------------ paper operations
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

    def query_row(self, i: int) -> Any:
        """``O[i, :]`` as a new ``(e,)`` array of the structure's dtype."""
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._xp.astype(self._answer_rows(np.array([i]))[0], self._output_dtype)

    def query_many(self, rows: Any, cols: Any) -> np.ndarray:
        """``O[rows[k], cols[k]]`` for every k, as a new ``(len(rows),)`` array."""
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols: expected the same length, got {rows.shape[0]} and {cols.shape[0]}"
            )
        return self._xp.astype(self._answer_entries(rows, cols), self._output_dtype)

    def output(self) -> np.ndarray:
        """The whole attention output ``O: (n, e)``, as a new array."""
        return self._xp.astype(self._answer_rows(np.arange(self.n)), self._output_dtype)

    # ------------------------------------------------------------------ hooks
    def _apply_k(self, i: int, j: int, new_value: Any) -> None:
        raise NotImplementedError

    def _apply_v(self, i: int, j: int, new_value: Any) -> None:
        raise NotImplementedError

    def _answer_entry(self, i: int, j: int) -> float:
        return float(self._answer_entries(np.array([i]), np.array([j]))[0])

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _answer_rows(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _checked_sum(self, name: str, current: Any, delta: Any, target: str) -> Any:
        """Return ``current + delta`` in the storage dtype, rejecting non-finite results."""
        step = check_scalar(name, delta)
        limit = self._dtype_max / 2
        if abs(step) < limit and abs(float(current)) < limit:
            return self._dtype.type(current) + self._dtype.type(step)  # cannot overflow
        with np.errstate(over="ignore", invalid="ignore"):
            new = self._dtype.type(current) + self._dtype.type(step)
        if not math.isfinite(float(new)):
            raise ValueError(
                f"{name}={step!r} would make {target} entry {float(current)!r} overflow "
                f"{self._dtype}; expected a delta keeping it finite"
            )
        return new

    def __repr__(self) -> str:
        heads = f"batch_shape={self.batch_shape}, " if self.batch_shape else ""
        return (
            f"{type(self).__name__}({heads}n={self.n}, m={self.m}, d={self.d}, e={self.e}, "
            f"dtype={self._dtype.name}, scale={self._scale:g})"
        )
