"""Validated inputs: the one constructor behind every attention implementation.

:class:`ValidatedInputs` checks ``Q``, ``K``, ``V``, ``scale``, ``dtype`` and the
backend once, at the public boundary, and holds the validated arrays with their
read-only accessors. It has no update or query methods: the public operations
belong to the implementations, :class:`~dynattn.DynamicAttention` and the
baselines' own base in :mod:`dynattn.baselines`, and what they share is
described by the :class:`~dynattn.interface.AttentionMaintainer` protocol.

Notation (van den Brand, Song and Zhou, arXiv 2304.02207; README.md):
``Q: (n, d)``, ``K: (m, d)``, ``V: (m, e)``, ``A = exp(scale * Q K^T)``,
``O = D^-1 A V`` with ``D = diag(A 1)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynattn._validation import (
    as_index,
    check_dtype,
    check_index,
    check_index_array,
    check_matrix,
    check_scalar,
)
from dynattn.backends import resolve_backend


class ValidatedInputs:
    """Validated ``Q``, ``K``, ``V`` and options, with read-only accessors.

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
    #: the number of heads (the product of ``batch_shape``), set by subclasses
    _H: int

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
        queries = check_matrix("Q", Q, dtype=self._dtype, batch=None if self._batched else ())
        batch = queries.shape[:-2]
        n, d = queries.shape[-2:]
        keys = check_matrix("K", K, dtype=self._dtype, cols=d, col_name="columns (d, as Q has)", batch=batch)
        m = keys.shape[-2]
        values = check_matrix("V", V, dtype=self._dtype, rows=m, row_name="rows (m, as K has)", batch=batch)
        #: the inputs: host numpy arrays here; subclasses may replace them with backend arrays
        self._Q: Any = queries
        self._K: Any = keys
        self._V: Any = values
        #: leading head/batch axes (``()`` for a single head)
        self.batch_shape: tuple[int, ...] = batch
        self._scale = check_scalar("scale", scale)
        self._dtype_max = float(np.finfo(self._dtype).max)
        #: sizes: n queries, m keys, key width d, value width e
        self.n: int = n
        self.d: int = d
        self.m: int = m
        self.e: int = values.shape[-1]

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

    def _head_index(self, head: Any) -> int:
        """The flat head index named by ``head=``.

        Without a head axis: None or the integer index 0. With one: an integer
        index into the flattened leading axes, or a tuple of one integer index
        per leading axis. Integer indices follow :func:`check_index`.
        """
        if not self.batch_shape:
            if head is None:
                return 0
            index = as_index("head", head)
            if index != 0:
                raise IndexError(
                    f"head={index} is out of range: this structure has no head axis, so its only "
                    "head is 0; pass head=None (or head=0)"
                )
            return 0
        if head is None:
            raise TypeError(
                f"head: expected an index into the leading axes {self.batch_shape}, got None; "
                f"pass an int below {self._H} or a {len(self.batch_shape)}-tuple"
            )
        if isinstance(head, tuple):
            if len(head) != len(self.batch_shape):
                raise IndexError(
                    f"head: expected a {len(self.batch_shape)}-tuple (one index per leading axis of "
                    f"{self.batch_shape}), got {head!r}"
                )
            parts = [
                check_index(f"head[{k}]", x, s, axis=f"leading axis {k} of {self.batch_shape}")
                for k, (x, s) in enumerate(zip(head, self.batch_shape, strict=True))
            ]
            return int(np.ravel_multi_index(parts, self.batch_shape))
        return check_index("head", head, self._H, axis=f"flattened leading axes {self.batch_shape}")

    def _head_indices(self, heads: Any, size: int) -> np.ndarray:
        """``heads=`` as an int64 array of ``size`` flat head indices (None: head 0, without a head axis)."""
        if heads is None:
            if self.batch_shape:
                raise TypeError(
                    f"heads: expected head indices for leading axes {self.batch_shape}, got None; "
                    f"pass one flat head index (below {self._H}) per entry"
                )
            return np.zeros(size, dtype=np.int64)
        heads = check_index_array("heads", heads, self._H, axis=f"flattened leading axes {self.batch_shape}")
        if heads.size != size:
            raise ValueError(f"heads: expected {size} head indices, got {heads.size}")
        return heads

    def __repr__(self) -> str:
        heads = f"batch_shape={self.batch_shape}, " if self.batch_shape else ""
        return (
            f"{type(self).__name__}({heads}n={self.n}, m={self.m}, d={self.d}, e={self.e}, "
            f"dtype={self._dtype.name}, scale={self._scale:g})"
        )
