"""Baselines with the :class:`~dynattn.DynamicAttention` interface.

The alternatives ``DynamicAttention`` is measured against (README.md,
"Performance"; docs/bench.md), each an
:class:`~dynattn.interface.AttentionMaintainer`. H is the number of heads
(the product of the leading axes), k the number of rows asked for:

=========  =================  ==============  ==========  ===============  ====================
name       update_k/update_v  token edit      query       query_rows (k)   memory
=========  =================  ==============  ==========  ===============  ====================
Recompute  O(H*n*m*(d+e))     O(H*n*m*(d+e))  O(1)        O(H*k*e)         O(H*(n+m)*(d+e))
OnDemand   O(1)               O(H*(d+e))      O(m*(d+e))  O(H*k*m*(d+e))   O(H*(n+m)*d + H*m*e)
Rows       O(1)               O(H*(d+e))      O(m*(d+e))  O(H*k*m*(d+e))   as OnDemand
Eager      O(n*(d+e)) / O(n)  O(H*n*(d+e))    O(1)        O(H*k*e)         O(H*n*m) dense,
                                                                           O(H*(n+m)*(d+e))
                                                                           implicit
=========  =================  ==============  ==========  ===============  ====================

A token edit is ``set_key`` plus ``set_value`` of one row in every head;
``Eager``'s ``update_v`` is O(n) dense, O(n*d) implicit.

``Recompute`` applies each change and recomputes the whole output (what a
model does without this library). ``OnDemand`` stores the inputs and computes
the rows a query needs; ``Rows`` does the same with the practitioner's kernel:
torch's ``scaled_dot_product_attention`` over just the requested rows (on the
torch backend, or with ``kernel="sdpa"``), a numpy stable softmax otherwise.
``Eager`` keeps the unnormalized weights ``W = exp(s*Q K^T - mu)`` with a
per-row stabilizer ``mu``, their row sums ``Z`` and the numerator ``N = W V``:
a change to key row c recomputes that key's weight column and applies a rank-1
update to ``N`` and ``Z`` (BLAS-2), a change to value row c a rank-1 update to
``N``; a row whose new logit would overflow its stabilizer, or whose
accumulated rounding could exceed the accuracy target (a dominant key moved
away, values shrank by orders of magnitude), is recomputed exactly.

All accept the constructor of :class:`~dynattn.DynamicAttention`, with leading
head axes ``Q: (*batch, n, d)``, ``K: (*batch, m, d)``, ``V: (*batch, m, e)``
(options that do not apply -- ``tau``, ``tol``, ``certify``, and ``storage``,
``memory_budget`` except for ``Eager`` -- are accepted and ignored), and the
same operations: entry updates and queries name their head with ``head=``
(``heads=`` for ``query_many``), row operations (``set_key``, ``set_value``,
``set_query``, ``set_token``, ``append``, ``query_row``, ``query_rows``,
``output``) apply to every head. Masks (``causal``, ``key_mask``) are not
supported. They share :class:`Baseline`, which validates every argument before
anything changes and calls a small set of hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dynattn._base import ValidatedInputs
from dynattn._validation import (
    check_choice,
    check_flag,
    check_index,
    check_index_array,
    check_rows,
    check_scalar,
)
from dynattn.interface import AttentionMaintainer

__all__ = ["BASELINES", "Baseline", "Eager", "OnDemand", "Recompute", "Rows"]

#: logits of at most this many bytes are materialized at once (rows are chunked)
_CHUNK_BYTES = 1 << 26


def _softmax_attention(xp: Any, q: Any, K: Any, V: Any, scale: float) -> Any:
    """``softmax(scale * q K^T) V`` of one head: ``q: (k, d)``, ``K: (m, d)``, ``V: (m, e)``.

    Stable (row maxima subtracted) and normalized before the product, so any
    finite ``V`` gives a finite answer; in the dtype of the inputs; rows are
    chunked so that at most ``_CHUNK_BYTES`` of logits exist at once.
    """
    k, m = q.shape[0], K.shape[0]
    itemsize = 8 if xp.name == "numpy" and q.dtype == np.float64 else 4
    step = max(1, _CHUNK_BYTES // max(1, m * itemsize))
    if k > step:
        return _concat(xp, [_softmax_attention(xp, q[a : a + step], K, V, scale) for a in range(0, k, step)])
    logits = q @ xp.swap_last(K)
    if xp.name == "numpy":  # in place: one (k, m) buffer
        logits *= logits.dtype.type(scale)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        return logits @ V
    logits = logits * scale
    weights = xp.exp(logits - xp.amax(logits, 1)[:, None])
    return (weights / xp.sum(weights, 1)[:, None]) @ V


def _concat(xp: Any, parts: list[Any]) -> Any:
    if xp.name == "numpy":
        return np.concatenate(parts, axis=0)
    return xp.torch.cat(parts, dim=0)


class Baseline(ValidatedInputs):
    """Base of the baselines: public operations, validated, over a few hooks.

    Keeps ``Q: (H, n, d)``, ``K: (H, m, d)``, ``V: (H, m, e)`` (the leading
    axes flattened into H heads) as arrays of the chosen backend, with room to
    grow (``append`` doubles the capacity), and implements the
    :class:`~dynattn.interface.AttentionMaintainer` operations plus the token
    operations of :class:`~dynattn.DynamicAttention`. Every public method
    validates all of its arguments first, so a rejected call changes nothing;
    the hooks that subclasses implement never see bad input.

    Hooks
    -----
    ``_apply_k(h, i, j, new)``, ``_apply_v(h, i, j, new)``
        Set ``K[h, i, j]`` / ``V[h, i, j]`` to ``new`` (finite in the dtype).
    ``_apply_token(i, q, k, v)``
        Replace query row i and/or key/value row i of every head (each an
        ``(H, width)`` host array or None); the default stores them and calls
        ``_changed()``.
    ``_append_token(q, k, v)``
        Add a query row and/or a key-value pair (sizes already grown).
    ``_answer_rows(rows)``
        ``O[:, rows]``, an ``(H, k, e)`` array.
    ``_answer_entries(heads, rows, cols)``
        ``O[heads[b], rows[b], cols[b]]``, a ``(k,)`` array.
    ``_answer_entry(h, i, j)``
        ``O[h, i, j]`` as a float; defaults to ``_answer_entries``.
    """

    #: DynamicAttention options that a baseline accepts and ignores (swappable constructors)
    IGNORED: tuple[str, ...] = ("tau", "storage", "memory_budget", "tol", "certify")
    _batched = True
    #: the in-use parts of the buffers (set by ``_views``): Q (H, n, d), K (H, m, d), V (H, m, e)
    _Qf: Any
    _Kf: Any
    _Vf: Any

    def __init__(self, Q: Any, K: Any, V: Any, *, causal: Any = False, key_mask: Any = None, **options: Any):
        for name in self.IGNORED:
            options.pop(name, None)
        if check_flag("causal", causal):
            raise ValueError(f"causal: {type(self).__name__} supports no mask; expected causal=False")
        if key_mask is not None:
            raise ValueError(f"key_mask: {type(self).__name__} supports no mask; expected key_mask=None")
        super().__init__(Q, K, V, **options)
        self._H = int(np.prod(self.batch_shape, dtype=np.int64))
        self._typed_scale = float(self._dtype.type(self._scale))
        self._axes: dict[str, tuple[str, ...]] = {}
        self._buffers: dict[str, Any] = {}
        self._capacity = {"H": self._H, "n": self.n, "m": self.m, "d": self.d, "e": self.e}
        flat = {"Q": ("H", "n", "d"), "K": ("H", "m", "d"), "V": ("H", "m", "e")}
        for name, axes in flat.items():
            given = getattr(self, f"_{name}").reshape(self._H, *getattr(self, f"_{name}").shape[-2:])
            self._allocate(name, axes, self._dtype)
            self._buffers[name][...] = self._xp.asarray(given)
        self._Q = self._K = self._V = None  # the flat views below are the inputs now
        self._views()

    # ------------------------------------------------------------------ arrays with room to grow
    def _allocate(self, name: str, axes: tuple[str, ...], dtype: Any) -> None:
        """A zeroed backend array ``name`` with the given axes, at the current capacity."""
        self._axes[name] = axes
        self._buffers[name] = self._xp.zeros(tuple(self._capacity[a] for a in axes), dtype)

    def _sizes(self) -> dict[str, int]:
        return {"H": self._H, "n": self.n, "m": self.m, "d": self.d, "e": self.e}

    def _views(self) -> None:
        """Set ``self._<name>f`` to the in-use part of every buffer (views, no copies)."""
        sizes = self._sizes()
        for name, axes in self._axes.items():
            setattr(self, f"_{name}f", self._buffers[name][tuple(slice(0, sizes[a]) for a in axes)])

    def _grow(self, axis: str, size: int) -> None:
        """Make room for ``size`` along ``axis`` (``"n"`` or ``"m"``): capacity doubles."""
        if size > self._capacity[axis]:
            self._capacity[axis] = max(size, 2 * self._capacity[axis])
            sizes = self._sizes()
            for name, axes in self._axes.items():
                old = self._buffers[name]
                new = self._xp.zeros(tuple(self._capacity[a] for a in axes), old.dtype)
                used = tuple(slice(0, sizes[a]) for a in axes)
                new[used] = old[used]
                self._buffers[name] = new
        setattr(self, axis, size)
        self._views()

    # ------------------------------------------------------------------ accessors
    def _public(self, flat: Any) -> Any:
        return self._xp.public(flat.reshape(*self.batch_shape, *flat.shape[1:]))

    @property
    def Q(self) -> Any:
        """Current queries ``(*batch, n, d)``: a read-only view (numpy) or a copy (torch)."""
        return self._public(self._Qf)

    @property
    def K(self) -> Any:
        """Current keys ``(*batch, m, d)``: a read-only view (numpy) or a copy (torch)."""
        return self._public(self._Kf)

    @property
    def V(self) -> Any:
        """Current values ``(*batch, m, e)``: a read-only view (numpy) or a copy (torch)."""
        return self._public(self._Vf)

    @property
    def heads(self) -> int:
        """Number of heads H (the product of ``batch_shape``; 1 without head axes)."""
        return self._H

    # ------------------------------------------------------------------ the paper's operations
    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateK: ``K[head][i, j] += delta``.

        Runtime complexity: that of the subclass (see the module table).
        """
        h = self._head_index(head)
        i = check_index("i", i, self.m, axis="key rows, m")
        j = check_index("j", j, self.d, axis="key columns, d")
        self._apply_k(h, i, j, self._checked_sum("delta", self._Kf[h, i, j], delta, "K"))

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateV: ``V[head][i, j] += delta``.

        Runtime complexity: that of the subclass (see the module table).
        """
        h = self._head_index(head)
        i = check_index("i", i, self.m, axis="value rows, m")
        j = check_index("j", j, self.e, axis="value columns, e")
        self._apply_v(h, i, j, self._checked_sum("delta", self._Vf[h, i, j], delta, "V"))

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """Paper's Query: ``O[head][i, j]`` as a Python float.

        Runtime complexity: that of the subclass (see the module table).
        """
        h = self._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        j = check_index("j", j, self.e, axis="output columns, e")
        return float(self._answer_entry(h, i, j))

    # ------------------------------------------------------------------ more answers
    def query_row(self, i: int) -> Any:
        """``O[..., i, :]`` for every head, a new ``(*batch, e)`` array.

        Runtime complexity: that of ``query_rows`` with one row.
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._rows_public(np.array([i]))[..., 0, :]

    def query_rows(self, rows: Any) -> Any:
        """``O[..., rows, :]`` for every head, a new ``(*batch, k, e)`` array.

        Runtime complexity: that of the subclass (see the module table).
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        return self._rows_public(rows)

    def query_many(self, rows: Any, cols: Any, *, heads: Any = None) -> Any:
        """``O[heads[b]][rows[b], cols[b]]`` for every b, a new ``(k,)`` array.

        Runtime complexity: that of the subclass per distinct (head, row).
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols: expected the same length, got {rows.shape[0]} and {cols.shape[0]}"
            )
        head_index = self._head_indices(heads, rows.size)
        return self._xp.astype(self._answer_entries(head_index, rows, cols), self._output_dtype)

    def output(self) -> Any:
        """The whole attention output ``O: (*batch, n, e)``, as a new array.

        Runtime complexity: that of ``query_rows`` of all n rows.
        """
        return self._rows_public(np.arange(self.n))

    def _rows_public(self, rows: np.ndarray) -> Any:
        answer = self._answer_rows(rows)
        return self._xp.astype(answer, self._output_dtype).reshape(*self.batch_shape, rows.size, self.e)

    # ------------------------------------------------------------------ token operations
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head; ``k: (*batch, d)``.

        Runtime complexity: that of the subclass (see the module table).
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        self._apply_token(c, None, self._valid_row("k", k, self.d), None)

    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head; ``v: (*batch, e)``.

        Runtime complexity: that of the subclass (see the module table).
        """
        c = check_index("c", c, self.m, axis="value rows, m")
        self._apply_token(c, None, None, self._valid_row("v", v, self.e))

    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head; ``q: (*batch, d)``.

        Runtime complexity: O(H*m*(d+e)) (the row is recomputed) or less.
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        self._apply_token(i, self._valid_row("q", q, self.d), None, None)

    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows (all heads).

        All given rows are checked before anything changes. Runtime
        complexity: the sum of ``set_query``, ``set_key`` and ``set_value``.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        if k is not None or v is not None:
            i = check_index("i", i, self.m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self.n, axis="query rows, n")
        rows = [
            None if x is None else self._valid_row(name, x, w) for name, x, w in self._token_args(q, k, v)
        ]
        self._apply_token(i, *rows)

    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``.

        Returns ``(query_index, key_index)`` (None for what was not added).
        Capacity doubles when full (amortized O(1) reallocation). Runtime
        complexity: O(H*m*(d+e)) for a query row, a key-value pair as
        ``set_token`` (``Recompute``: one recomputation).
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        q_row, k_row, v_row = (
            None if x is None else self._valid_row(name, x, w) for name, x, w in self._token_args(q, k, v)
        )
        query_index = None if q_row is None else self.n
        key_index = None if k_row is None else self.m
        if k_row is not None:
            self._grow("m", self.m + 1)
        if q_row is not None:
            self._grow("n", self.n + 1)
        self._append_token(q_row, k_row, v_row)
        return query_index, key_index

    def _token_args(self, q: Any, k: Any, v: Any) -> list[tuple[str, Any, int]]:
        return [("q", q, self.d), ("k", k, self.d), ("v", v, self.e)]

    # ------------------------------------------------------------------ hooks
    def _apply_k(self, h: int, i: int, j: int, new: Any) -> None:
        self._Kf[h, i, j] = float(new)
        self._changed()

    def _apply_v(self, h: int, i: int, j: int, new: Any) -> None:
        self._Vf[h, i, j] = float(new)
        self._changed()

    def _apply_token(self, i: int, q: Any, k: Any, v: Any) -> None:
        xp: Any = self._xp
        for target, row in ((self._Qf, q), (self._Kf, k), (self._Vf, v)):
            if row is not None:
                target[:, i] = xp.asarray(row)
        self._changed()

    def _append_token(self, q: Any, k: Any, v: Any) -> None:
        xp: Any = self._xp
        if k is not None:
            self._Kf[:, self.m - 1] = xp.asarray(k)
            self._Vf[:, self.m - 1] = xp.asarray(v)
        if q is not None:
            self._Qf[:, self.n - 1] = xp.asarray(q)
        self._changed()

    def _changed(self) -> None:
        """Called after the inputs changed (nothing by default)."""

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        return float(self._answer_entries(np.array([h]), np.array([i]), np.array([j]))[0])

    def _answer_entries(self, heads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Any:
        """Default: the distinct (head, row) pairs computed as rows, then gathered."""
        xp: Any = self._xp
        if rows.size == 0:
            return xp.zeros((0,), self._dtype)
        pairs, where = np.unique(np.stack([heads, rows]), axis=1, return_inverse=True)
        answers = self._pair_rows(pairs[0], pairs[1])  # (p, e)
        return answers[xp.index(where.ravel()), xp.index(cols)]

    def _pair_rows(self, heads: np.ndarray, rows: np.ndarray) -> Any:
        """``O[heads[b], rows[b], :]`` for distinct pairs, ``(p, e)``."""
        out = self._xp.zeros((rows.size, self.e), self._dtype)
        for h in np.unique(heads).tolist():
            which = np.flatnonzero(heads == h)
            out[self._xp.index(which)] = self._head_rows(h, rows[which])
        return out

    def _head_rows(self, h: int, rows: np.ndarray) -> Any:
        """``O[h, rows, :]``, ``(k, e)``."""
        raise NotImplementedError

    def _answer_rows(self, rows: np.ndarray) -> Any:
        xp: Any = self._xp
        return _stack(xp, [self._head_rows(h, rows) for h in range(self._H)])

    # ------------------------------------------------------------------ validation
    def _valid_row(self, name: str, value: Any, width: int) -> np.ndarray:
        """A validated host copy of a row argument ``(*batch, width)``, as ``(H, width)``."""
        row = check_rows(name, self._xp.to_numpy(value), dtype=self._dtype, shape=(*self.batch_shape, width))
        return row.reshape(self._H, width)


def _stack(xp: Any, parts: list[Any], axis: int = 0) -> Any:
    if xp.name == "numpy":
        return np.stack(parts, axis=axis)
    return xp.torch.stack(parts, dim=axis)


class Recompute(Baseline):
    """Apply each change, then recompute the whole output from scratch.

    Runtime complexity: any change O(H*n*m*(d+e)) (two GEMMs per head, in
    the working dtype); query O(1), query_rows O(H*k*e).
    """

    def __init__(self, Q: Any, K: Any, V: Any, **options: Any):
        super().__init__(Q, K, V, **options)
        self._changed()

    def _changed(self) -> None:
        xp: Any = self._xp
        self._O = _stack(
            xp,
            [
                _softmax_attention(xp, self._Qf[h], self._Kf[h], self._Vf[h], self._typed_scale)
                for h in range(self._H)
            ],
        )

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        return float(self._O[h, i, j])

    def _answer_entries(self, heads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Any:
        xp: Any = self._xp
        return self._O[xp.index(heads), xp.index(rows), xp.index(cols)]

    def _answer_rows(self, rows: np.ndarray) -> Any:
        return self._O[:, self._xp.index(rows)]


class OnDemand(Baseline):
    """Store Q, K, V only; compute the needed output rows at query time.

    Runtime complexity: changes O(1) per entry, O(H*(d+e)) per token; query
    O(m*(d+e)); query_rows O(H*k*m*(d+e)).
    """

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        xp: Any = self._xp
        logits = (self._Kf[h] @ self._Qf[h, i]) * self._typed_scale
        weights = xp.exp(logits - xp.amax(logits, 0))
        # normalized before the product: a convex combination of finite values stays finite
        return float((weights / xp.sum(weights, 0)) @ self._Vf[h, :, j])

    def _head_rows(self, h: int, rows: np.ndarray) -> Any:
        xp: Any = self._xp
        return _softmax_attention(
            xp, self._Qf[h, xp.index(rows)], self._Kf[h], self._Vf[h], self._typed_scale
        )


class Rows(OnDemand):
    """Recompute only the requested rows with the practitioner's kernel.

    Like :class:`OnDemand`, but every answer is a row computation: torch's
    ``scaled_dot_product_attention`` of the requested rows against the whole
    key/value cache (all heads in one call), or a numpy stable softmax.

    Parameters
    ----------
    Q, K, V, **options
        As :class:`~dynattn.DynamicAttention`.
    kernel : {"auto", "sdpa", "numpy"}, keyword-only
        ``"auto"``: SDPA on the torch backend, numpy otherwise. ``"sdpa"``
        with numpy inputs runs torch on zero-copy views of the stored arrays
        (torch must be installed) and answers numpy arrays.

    Runtime complexity: changes O(1) per entry, O(H*(d+e)) per token; query
    O(m*(d+e)) (its row); query_rows O(H*k*m*(d+e)).
    """

    def __init__(self, Q: Any, K: Any, V: Any, *, kernel: str = "auto", **options: Any):
        super().__init__(Q, K, V, **options)
        kernel = check_choice("kernel", kernel, ("auto", "sdpa", "numpy"))
        if kernel == "auto":
            kernel = "sdpa" if self._xp.name == "torch" else "numpy"
        if kernel == "numpy" and self._xp.name != "numpy":
            raise ValueError(
                "kernel: 'numpy' needs the numpy backend; use kernel='sdpa' or 'auto' with torch"
            )
        self._kernel = kernel
        self._sdpa: Any = None
        if kernel == "sdpa":
            try:
                import torch
                import torch.nn.functional as F
            except ImportError as exc:  # pragma: no cover - torch is a test dependency
                raise ImportError("kernel='sdpa' needs PyTorch: pip install 'dynattn[torch]'") from exc
            self._from_numpy, self._sdpa = torch.from_numpy, F.scaled_dot_product_attention

    @property
    def kernel(self) -> str:
        """The kernel in use, ``"sdpa"`` or ``"numpy"``."""
        return self._kernel

    def _tensor(self, value: Any) -> Any:
        return value if self._xp.name == "torch" else self._from_numpy(value)

    def _sdpa_rows(self, q: Any, K: Any, V: Any) -> Any:
        out = self._sdpa(self._tensor(q), self._tensor(K), self._tensor(V), scale=self._scale)
        return out if self._xp.name == "torch" else out.numpy()

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        return float(self._head_rows(h, np.array([i]))[0, j])

    def _head_rows(self, h: int, rows: np.ndarray) -> Any:
        if self._sdpa is None:
            return super()._head_rows(h, rows)
        xp: Any = self._xp
        return self._sdpa_rows(self._Qf[h, xp.index(rows)], self._Kf[h], self._Vf[h])

    def _answer_rows(self, rows: np.ndarray) -> Any:
        if self._sdpa is None:
            return super()._answer_rows(rows)
        return self._sdpa_rows(self._Qf[:, self._xp.index(rows)], self._Kf, self._Vf)


class Eager(Baseline):
    """Every change folded at once: weights, row sums and numerator kept current.

    State per head: the weights ``W = exp(s*Q K^T - mu)`` (``dense``, in the
    working dtype; ``implicit`` keeps none and recomputes a key's column from
    float64 copies of Q and K when it changes), the per-row stabilizer ``mu``
    (the row's largest logit when it was last computed exactly), and in
    float64 the row sums ``Z = W 1`` and the numerator ``N = W V / u`` (values
    in per-column power-of-two units ``u >= max|V[:, j]|``, so no finite ``V``
    overflows). A change to key row c computes the new weight column (one GEMV
    per head) and applies the rank-1 update ``N += (w_new - w_old) v_c^T``,
    ``Z += w_new - w_old``; a change to value row c applies ``N += w_c dv^T``.

    Stable and accurate: a new logit more than ``ln(max)/4`` above its row's
    stabilizer (weights would overflow), or a row whose accumulated rounding
    bound ``drift`` could exceed ``tol`` relative to its row sum (a dominant key
    moved away, values shrank by orders of magnitude, weights underflowed), is
    recomputed exactly; so every answer stays within the accuracy targets.

    Parameters
    ----------
    Q, K, V, scale, dtype, backend, device
        As :class:`~dynattn.DynamicAttention`.
    storage : {"auto", "dense", "implicit"}, keyword-only
        ``"auto"``: dense when ``H*n*m`` weights fit ``memory_budget`` bytes.
    memory_budget : int, keyword-only
        Bytes for the dense weights under ``"auto"`` (default 2**30).

    Runtime complexity: update_k O(n*(d+e)) (GEMV and rank-1), update_v O(n)
    (O(n*d) implicit), set_key/set_value/set_token O(H*n*(d+e)), query O(1),
    query_rows O(H*k*e); plus O(m*(d+e)) per row recomputed exactly.
    """

    IGNORED = ("tau", "tol", "certify")
    _WTf: Any  # (H, m, n) weights, key-major (a key's column is contiguous), dense storage
    _Nf: Any  # (H, n, e) numerator in value units, float64
    _Zf: Any  # (H, n) row sums, float64
    _muf: Any  # (H, n) stabilizers, float64
    _driftf: Any  # (H, n) rounding bounds in weight-mass units, float64
    _Q64f: Any  # (H, n, d) float64 copy of Q, implicit storage
    _K64f: Any  # (H, m, d) float64 copy of K, implicit storage
    _qnormf: Any  # (H, n) norms of the query rows, implicit storage

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        storage: str = "auto",
        memory_budget: int = 2**30,
        **options: Any,
    ):
        storage = check_choice("storage", storage, ("auto", "dense", "implicit"))
        budget = check_scalar("memory_budget", memory_budget, low=0)
        super().__init__(Q, K, V, **options)
        if storage == "auto":
            dense_bytes = self._H * self.n * self.m * self._dtype.itemsize
            storage = "dense" if dense_bytes <= budget else "implicit"
        self._storage = storage
        info = np.finfo(self._dtype)
        self._u64 = float(np.finfo(np.float64).eps) / 2
        #: weights are kept below e^L (L = ln(max)/4: 177 for float64, 22 for float32)
        self._limit = float(np.log(info.max)) / 4
        #: a row is recomputed when its relative rounding bound could exceed this
        self._tol = 1e-11 if self._dtype == np.float64 else 1e-5
        #: smallest weight with full relative precision (below it, weights are subnormal)
        self._tiny = float(info.tiny) if storage == "dense" else float(np.finfo(np.float64).tiny)
        f64 = self._xp.float64
        for name, axes, dtype in (
            ("mu", ("H", "n"), f64),
            ("Z", ("H", "n"), f64),
            ("drift", ("H", "n"), f64),
            ("N", ("H", "n", "e"), f64),
        ):
            self._allocate(name, axes, dtype)
        if storage == "dense":
            self._allocate("WT", ("H", "m", "n"), self._dtype)
        else:
            self._allocate("Q64", ("H", "n", "d"), f64)
            self._allocate("K64", ("H", "m", "d"), f64)
            self._allocate("qnorm", ("H", "n"), f64)
        self._views()
        if storage == "implicit":
            self._Q64f[...] = self._xp.astype(self._Qf, f64)
            self._K64f[...] = self._xp.astype(self._Kf, f64)
            self._qnormf[...] = self._xp.sum(self._Q64f * self._Q64f, 2) ** 0.5
        # per (head, value column), on the host: the unit, the current and the peak max|V[:, j]|
        self._vmax = np.zeros((self._H, self.e))
        self._unit = np.ones((self._H, self.e))
        self._vpeak = np.zeros((self._H, self.e))
        self._rows_refreshed = 0
        for h in range(self._H):
            self._refresh_head(h)

    # ------------------------------------------------------------------ accessors
    @property
    def storage(self) -> str:
        """Weight storage in use: ``"dense"`` or ``"implicit"``."""
        return self._storage

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``rows_refreshed`` (rows recomputed exactly since construction)."""
        return {"rows_refreshed": self._rows_refreshed}

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays (at their current capacity)."""
        return sum(self._xp.nbytes(b) for b in self._buffers.values())

    # ------------------------------------------------------------------ exact recomputation
    def _logits(self, h: int, rows: Any) -> Any:
        """Logits ``s * Q[h, rows] K[h]^T`` (working dtype dense, float64 implicit)."""
        if self._storage == "dense":
            return (self._Qf[h, rows] @ self._xp.swap_last(self._Kf[h])) * self._typed_scale
        return (self._Q64f[h, rows] @ self._xp.swap_last(self._K64f[h])) * self._scale

    def _scaled_values(self, h: int) -> Any:
        xp: Any = self._xp
        return xp.astype(self._Vf[h], xp.float64) / xp.asarray(self._unit[h])

    def _refresh_rows(self, h: int, rows: np.ndarray) -> None:
        """Recompute rows of head h exactly (new stabilizers, weights, Z, N); O(k*m*(d+e))."""
        xp: Any = self._xp
        step = max(1, _CHUNK_BYTES // max(1, 8 * self.m))
        values = self._scaled_values(h)
        contiguous = (
            rows.size > 0 and rows[-1] - rows[0] == rows.size - 1 and bool(np.all(np.diff(rows) == 1))
        )
        for a in range(0, rows.size, step):
            part = rows[a : a + step]
            # a range of rows as a slice: strided block copies instead of a gather
            chunk = slice(int(part[0]), int(part[-1]) + 1) if contiguous else xp.index(part)
            logits = self._logits(h, chunk)
            mu = xp.amax(logits, 1)
            weights = xp.exp(logits - mu[:, None])
            if self._storage == "dense":
                stored = self._WTf[h]
                stored[:, chunk] = xp.swap_last(weights)
                weights = xp.astype(xp.swap_last(stored[:, chunk]), xp.float64)
            elif weights.dtype != xp.float64:  # pragma: no cover - implicit logits are float64
                weights = xp.astype(weights, xp.float64)
            self._muf[h, chunk] = xp.astype(mu, xp.float64)
            self._Zf[h, chunk] = xp.sum(weights, 1)
            self._Nf[h, chunk] = weights @ values
            self._driftf[h, chunk] = 0.0
        self._rows_refreshed += int(rows.size)

    def _refresh_head(self, h: int) -> None:
        """Recompute head h: value units and maxima from V, then every row."""
        xp: Any = self._xp
        self._vmax[h] = self._vpeak[h] = xp.to_numpy(xp.amax(xp.abs(xp.astype(self._Vf[h], xp.float64)), 0))
        self._unit[h] = _power_of_two_at_least(self._vmax[h])
        self._refresh_rows(h, np.arange(self.n))

    def _check_rows(self, hs: slice, forced: Any = None) -> None:
        """Recompute the rows of heads ``hs`` whose rounding bound fails, or ``forced`` ones
        (a logit over the limit): ``(h', n)`` booleans or None."""
        xp: Any = self._xp
        peak = self._vpeak[hs] / np.maximum(self._vmax[hs], np.finfo(np.float64).tiny)
        ratio = np.minimum(np.maximum(peak.max(axis=1), 1.0), 1e300)  # (h',) values shrank by
        slack = 2 * (self._driftf[hs] + self.m * self._tiny) * xp.asarray(ratio)[:, None]
        bad = slack > self._tol * self._Zf[hs]
        if forced is not None:
            bad = bad | forced
        if not bool(bad.any()):
            return
        which, rows = xp.nonzero(bad)
        heads = np.arange(self._H)[hs]
        for b in np.unique(which).tolist():
            mine = rows[which == b]
            if mine.size > self.n // 4:
                self._refresh_head(int(heads[b]))
            else:
                self._refresh_rows(int(heads[b]), mine)

    # ------------------------------------------------------------------ the rank-1 updates
    def _column(self, hs: slice, keys: Any) -> tuple[Any, Any]:
        """Weights of key rows ``keys: (h', d)`` (one per head of ``hs``) against every query:
        ``(h', n)`` float64 ``exp(min(l - mu, L))`` as stored, and the rows over the limit L."""
        xp: Any = self._xp
        heads = range(self._H)[hs]
        if self._storage == "dense":
            logits = _stack(xp, [self._Qf[h] @ xp.asarray(keys[b]) for b, h in enumerate(heads)])
            logits = xp.astype(logits, xp.float64) * self._typed_scale
        else:
            logits = _stack(xp, [self._Q64f[h] @ xp.asarray(keys[b]) for b, h in enumerate(heads)])
            logits *= self._scale
        excess = logits - self._muf[hs]
        over = excess > self._limit
        if bool(over.any()):
            excess = xp.where(over, self._limit, excess)
        weights = xp.exp(excess)
        if self._storage == "dense":
            weights = xp.astype(xp.astype(weights, self._dtype), xp.float64)  # as stored
        return weights, over

    def _old_column(self, hs: slice, c: int) -> tuple[Any, Any]:
        """The weights ``(h', n)`` of key c as they are in N and Z, and the bound on their
        difference from those (implicit storage recomputes them: rounding of the logits)."""
        xp: Any = self._xp
        if self._storage == "dense":
            column = self._WTf[hs, c]
            # a copy even when the weights are float64 (torch's .to() would alias them)
            return (xp.copy(column) if self._dtype == np.float64 else xp.astype(column, xp.float64)), 0.0
        keys = self._K64f[hs, c]
        weights, _ = self._column(hs, keys)
        k_norm = xp.sum(keys * keys, 1) ** 0.5
        gamma = self.d * self._u64 / (1 - self.d * self._u64)
        rate = 4 * gamma * abs(self._scale) * k_norm[:, None] * self._qnormf[hs] + 4 * self._u64
        return weights, weights * rate

    def _change(self, hs: slice, c: int, keys: Any = None, values: Any = None, old: Any = None) -> None:
        """Key and/or value row c of heads ``hs`` become ``keys: (h', d)`` / ``values: (h', e)``
        (host rows in the working dtype); ``old``: the (weights, mismatch) of the old column
        (default: read). N, Z and the rounding bounds follow by rank-1 updates."""
        xp: Any = self._xp
        w_old, mismatch = self._old_column(hs, c) if old is None else old
        if values is not None:
            self._raise_units(hs, values)
        v_old = self._scaled_row(hs, c)
        if values is not None:
            previous = xp.to_numpy(self._Vf[hs, c]).astype(np.float64)
            self._Vf[hs, c] = xp.asarray(values)
            self._note_values(hs, previous, values)
        v_new = self._scaled_row(hs, c) if values is not None else v_old
        N, Z, over, w_new = self._Nf[hs], self._Zf[hs], None, w_old
        if keys is not None:
            self._Kf[hs, c] = xp.asarray(keys)
            if self._storage == "implicit":
                self._K64f[hs, c] = xp.asarray(keys.astype(np.float64))
            w_new, over = self._column(hs, keys if self._storage == "dense" else keys.astype(np.float64))
            if self._storage == "dense":
                self._WTf[hs, c] = xp.astype(w_new, self._dtype)
            Z += w_new - w_old
        if keys is not None and values is not None:  # N += w_new v_new^T - w_old v_old^T
            N += _stack(xp, [w_new, -w_old], 2) @ _stack(xp, [v_new, v_old], 1)
        elif keys is not None:
            N += (w_new - w_old)[:, :, None] * v_new[:, None, :]
        else:
            N += w_old[:, :, None] * (v_new - v_old)[:, None, :]
        self._driftf[hs] += 2 * self._u64 * (Z + w_new + 2 * w_old) + mismatch
        self._check_rows(hs, over)

    def _scaled_row(self, hs: slice, c: int) -> Any:
        """Value row c of heads ``hs`` in units, ``(h', e)`` float64."""
        xp: Any = self._xp
        return xp.astype(self._Vf[hs, c], xp.float64) / xp.asarray(self._unit[hs])

    def _raise_units(self, hs: slice, values: np.ndarray) -> None:
        """Raise the value units of heads ``hs`` to cover ``values: (h', e)`` (N rescaled by
        powers of two)."""
        peak = np.maximum(self._vpeak[hs], np.abs(values.astype(np.float64)))
        units = np.maximum(self._unit[hs], _power_of_two_at_least(peak))
        self._vpeak[hs] = peak
        if np.array_equal(units, self._unit[hs]):
            return
        N = self._Nf[hs]
        N *= self._xp.asarray(self._unit[hs] / units)[:, None, :]
        self._driftf[hs] += float(np.finfo(np.float64).smallest_subnormal)
        self._unit[hs] = units

    def _note_values(self, hs: slice, previous: np.ndarray, values: np.ndarray) -> None:
        """Keep ``max|V[h, :, j]|`` current after a value row of heads ``hs`` went from
        ``previous`` to ``values`` (already stored), both ``(h', e)``."""
        new, old = np.abs(values.astype(np.float64)), np.abs(previous)
        vmax = self._vmax[hs]
        shrunk = (old >= vmax) & (new < old)  # the row held the column's maximum
        np.maximum(vmax, new, out=vmax)
        if shrunk.any():  # recompute those columns' maxima
            xp: Any = self._xp
            heads = np.arange(self._H)[hs]
            for b in np.flatnonzero(shrunk.any(axis=1)).tolist():
                cols = np.flatnonzero(shrunk[b])
                column = xp.astype(self._Vf[int(heads[b])][:, xp.index(cols)], xp.float64)
                vmax[b, cols] = xp.to_numpy(xp.amax(xp.abs(column), 0))

    # ------------------------------------------------------------------ hooks
    def _apply_k(self, h: int, i: int, j: int, new: Any) -> None:
        key = self._xp.to_numpy(self._Kf[h, i]).copy()
        key[j] = new
        self._change(slice(h, h + 1), i, keys=key[None])

    def _apply_v(self, h: int, i: int, j: int, new: Any) -> None:
        """One value entry: O(n) dense (one column of N), O(n*d) implicit."""
        xp: Any = self._xp
        hs = slice(h, h + 1)
        value = xp.to_numpy(self._Vf[h, i]).astype(np.float64)
        previous = value.copy()
        value[j] = float(new)
        self._raise_units(hs, value[None])
        w_old, mismatch = self._old_column(hs, i)
        self._Vf[h, i, j] = float(new)
        self._note_values(hs, previous[None], value[None])
        step = (float(new) - float(previous[j])) / float(self._unit[h, j])
        column = self._Nf[h, :, j]
        column += w_old[0] * step
        self._driftf[hs] += 2 * self._u64 * (self._Zf[hs] + 2 * w_old) + mismatch
        self._check_rows(hs)

    def _apply_token(self, i: int, q: Any, k: Any, v: Any) -> None:
        if k is not None or v is not None:
            self._change(slice(None), i, keys=k, values=v)
        if q is not None:
            xp: Any = self._xp
            self._Qf[:, i] = xp.asarray(q)
            if self._storage == "implicit":
                self._Q64f[:, i] = xp.asarray(q.astype(np.float64))
                self._qnormf[:, i] = xp.asarray(np.sqrt((q.astype(np.float64) ** 2).sum(1)))
            for h in range(self._H):
                self._refresh_rows(h, np.array([i]))

    def _append_token(self, q: Any, k: Any, v: Any) -> None:
        xp: Any = self._xp
        if k is not None:
            c = self.m - 1
            self._Kf[:, c] = 0  # a new key: its old weights and values are 0
            self._Vf[:, c] = 0
            if self._storage == "implicit":
                self._K64f[:, c] = 0
            zero = xp.zeros((self._H, self.n), xp.float64)
            self._change(slice(None), c, keys=k, values=v, old=(zero, 0.0))
        if q is not None:
            self._apply_token(self.n - 1, q, None, None)

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        return float(self._Nf[h, i, j]) / float(self._Zf[h, i]) * float(self._unit[h, j])

    def _answer_entries(self, heads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Any:
        xp: Any = self._xp
        hs, rs, cs = xp.index(heads), xp.index(rows), xp.index(cols)
        return self._Nf[hs, rs, cs] / self._Zf[hs, rs] * xp.asarray(self._unit[heads, cols])

    def _answer_rows(self, rows: np.ndarray) -> Any:
        xp: Any = self._xp
        index = xp.index(rows)
        answer = self._Nf[:, index] / self._Zf[:, index][:, :, None]
        answer *= xp.asarray(self._unit)[:, None, :]
        return answer


def _power_of_two_at_least(x: np.ndarray) -> np.ndarray:
    """Smallest power of two ``>= x`` elementwise (1 where ``x`` is 0)."""
    x = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(np.where(x > 0, x, 1.0))
    # x = mantissa * 2**exponent with 0.5 <= mantissa < 1: 2**exponent >= x; exact powers stay
    exponent = np.where(mantissa == 0.5, exponent - 1, exponent)
    return np.ldexp(1.0, np.minimum(exponent, 1023))  # 2**1023: the largest power of two


#: Baselines by name, for benchmarks and parametrized tests: each is called as
#: ``BASELINES[name](Q, K, V, **options)`` with DynamicAttention's options.
BASELINES: dict[str, Callable[..., AttentionMaintainer]] = {
    "recompute": Recompute,
    "ondemand": OnDemand,
    "rows": Rows,
    "eager": Eager,
}
