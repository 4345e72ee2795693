"""The dynamic attention structure: lazy updates with certified answers.

Math (SPEC sections 1-3). With stabilized weights ``a_c[i] = exp(s*Q_i.K_c - mu_i)``
(``mu_i`` the row's stabilizer; 0 where a mask hides key c from query i), the
structure keeps a *snapshot*

    N = A0 V0  (n, e),   Z = A0 1  (n,)      -- float64, as of the last fold

and, for each *pending* key/value row ``c`` changed since then, its weight
column as folded (``a0_c``) and as it is now (``a_c``), and its value row as
folded (``v0_c``) and now (``v_c``). Every answer is

    O[i, j] = (N[i, j] + sum_c a_c[i] v_c[j] - a0_c[i] v0_c[j])
              / (Z[i] + sum_c a_c[i] - a0_c[i])

which costs O(t) for t pending rows. When t reaches the threshold
``T = ceil(m**tau)`` a *fold* adds the pending columns into N and Z with two
BLAS-3 products, ``(a - a0)^T V_C`` over key-changed rows and
``a0^T (v - v0)`` over value-changed rows: 2*n*e flops per pending change.

Heads. Inputs may carry leading axes ``(*batch, n, d)`` (heads, batches): they
are flattened to H independent problems that share the pending-row bookkeeping,
so a token edit is one vectorized operation over all heads.

Certification. Each row carries ``drift``, a bound on the rounding error that
incremental maintenance has accumulated in ``N`` and ``Z`` (in units of ``Z``
times the column's value scale). Every answer is checked against a first-order
bound built from it; when the bound exceeds ``tol`` (cancellation: a key that
held most of a row's weight moved away; values that shrank by orders of
magnitude; drift after many folds), the row is recomputed exactly instead.
See ``docs/accuracy.md``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np

from dynattn._base import AttentionMaintainer
from dynattn._validation import (
    as_index,
    check_choice,
    check_flag,
    check_index,
    check_index_array,
    check_rows,
    check_scalar,
)
from dynattn.backends import NumpyBackend
from dynattn.storage import STORAGES, choose_storage

UNIT_ROUNDOFF = 2.0**-53
#: Default certification tolerance (relative to max|V[:, j]|), a tenth of SPEC's target.
DEFAULT_TOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-5}
#: Rows are refreshed at a fold once drift exceeds this fraction of ``tol`` (the rest is
#: headroom for the pending terms of the answers until the next fold).
DRIFT_FRACTION = 0.5
#: A stabilizer jump beyond this (natural log) would make the rescale factor exp(-jump) a
#: float64 subnormal, losing its relative precision: such rows are recomputed instead.
FAR_SHIFT = 700.0
#: Refresh block: at most this many float64 weights are materialized at once.
REFRESH_BLOCK_ENTRIES = 1 << 22
#: Pending slots allocated up front; more are added by doubling, up to the threshold.
INITIAL_SLOTS = 64
#: Saved-file format version (``save`` / ``load``).
FORMAT_VERSION = 2

#: Every state array: its axes (H heads, n queries, m keys, d, e, T pending slots),
#: dtype (None: the structure's storage dtype) and whether it lives on the backend's
#: device (True) or in host numpy (bookkeeping). n, m and T can grow.
LAYOUT: dict[str, tuple[str, Any, bool]] = {
    "_Qh": ("Hnd", None, True),
    "_Kh": ("Hmd", None, True),
    "_Vh": ("Hme", None, True),
    "_QT64": ("Hdn", np.float64, True),
    "_q_norm": ("Hn", np.float64, True),
    "_mu": ("Hn", np.float64, True),
    "_Z": ("Hn", np.float64, True),
    "_drift": ("Hn", np.float64, True),
    "_N": ("Hne", np.float64, True),
    "_pending_new_columns": ("HTn", np.float64, True),
    "_pending_old_columns": ("HTn", np.float64, True),
    "_pending_new_values": ("HTe", np.float64, True),
    "_pending_old_values": ("HTe", np.float64, True),
    "_query_pos": ("n", np.int64, False),
    "_exact_slots": ("Hn", np.int64, False),
    "_k_norms": ("Hm", np.float64, False),
    "_visible_keys": ("n", np.int64, False),
    "_key_visible": ("m", bool, False),
    "_key_pos": ("m", np.int64, False),
    "_pending_rows": ("T", np.int64, False),
    "_key_changed": ("T", bool, False),
    "_value_changed": ("T", bool, False),
    "_column_error": ("HT", np.float64, False),
    "_column_max": ("HT", np.float64, False),
}
#: float64 working copies, separate arrays only when the storage dtype is float32.
FLOAT64_COPIES = {"_Q64": "_Qh", "_K64": "_Kh", "_V64": "_Vh"}
#: Fixed-size host arrays (no growable axis).
FIXED_STATE = ("_q_col_absmax", "_value_max", "_value_max_stale", "_value_scale", "_value_unit")
GROWABLE = "nmT"
#: host-side operations (bookkeeping arrays are always numpy)
HOST = NumpyBackend()


def _gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u) for float64 arithmetic."""
    ku = k * UNIT_ROUNDOFF
    return ku / (1.0 - ku)


def _norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norms along the last axis, without overflow or underflow of the squares."""
    x = np.asarray(x, dtype=np.float64)
    biggest = np.abs(x).max(axis=-1, keepdims=True, initial=0.0)
    safe = np.where(biggest > 0, biggest, 1.0)
    scaled = x / safe
    return np.sqrt(np.einsum("...d,...d->...", scaled, scaled)) * safe[..., 0]


def _updated_norm(norm: float, old: float, new: float) -> float:
    """An upper bound on ``|k'|`` when one entry of ``k`` (``|k| = norm``) moves from ``old`` to
    ``new``: O(1), scaled so that no square overflows, with the float64 rounding of the
    update (which can cancel) added. Folds recompute the norms of pending rows exactly."""
    biggest = max(norm, abs(old), abs(new))
    if biggest == 0:
        return 0.0
    a, b, c = norm / biggest, old / biggest, new / biggest
    square = a * a - b * b + c * c + 4 * UNIT_ROUNDOFF * (a * a + b * b + c * c)
    return biggest * math.sqrt(max(square, 0.0))


def _power_of_two_units(scale: np.ndarray) -> np.ndarray:
    """The power of two ``2**k <= scale < 2**(k+1)`` per entry (1 where ``scale`` is 0)."""
    exponent = np.frexp(scale)[1]
    return np.where(scale > 0, np.ldexp(1.0, exponent - 1), 1.0)


def _slots(flags: np.ndarray) -> Any:
    """Index for the flagged pending slots: a slice (a view, no copy) when all are flagged."""
    return slice(None) if flags.all() else flags


def _threshold(m: int, tau: float) -> int:
    return min(m, max(1, math.ceil(m**tau * (1 - 1e-12))))


class DynamicAttention(AttentionMaintainer):
    """Softmax attention ``O = D^-1 exp(scale * Q K^T) V`` kept current under edits.

    Parameters
    ----------
    Q : (n, d) or (*batch, n, d) array_like
        Queries (copied). Leading axes (heads, batches) are independent problems.
    K : (m, d) or (*batch, m, d) array_like
        Keys (copied).
    V : (m, e) or (*batch, m, e) array_like
        Values (copied).
    tau : float in [0, 1], keyword-only
        Laziness exponent: pending key/value rows are folded when their number
        reaches ``threshold = ceil(m**tau)``. 0 folds every change at once
        (the ``Eager`` baseline); 1 lets up to m rows wait.
    scale : float, keyword-only
        Softmax scale (1.0 as in the paper; transformers use ``1/sqrt(d)``).
    dtype : float64 or float32, keyword-only
        Storage dtype of Q, K, V and of the stored weights (default float64 for
        numpy inputs; a torch tensor's own dtype, float16/bfloat16 stored as
        float32 and answered in their dtype). Logits, sums and
        the snapshot are always accumulated in float64, so float32 saves the
        memory of the weights and is never less accurate than float64 rounding
        of float32 data.
    storage : {"auto", "dense", "implicit"}, keyword-only
        ``dense`` keeps the n*m weights (O(n) per entry update of K);
        ``implicit`` keeps none (O(n*d) per first touch of a key row);
        ``auto`` is dense when ``heads*n*m*itemsize <= memory_budget``.
    memory_budget : int, keyword-only
        Bytes allowed for dense weights under ``storage="auto"`` (default 1 GiB).
    tol : float, keyword-only
        Certification tolerance on the incremental error, relative to
        ``max|V[:, j]|`` (default 1e-11 for float64, 1e-5 for float32).
    certify : bool, keyword-only
        Check every answer's error bound and recompute doubtful rows exactly
        (default). ``False`` skips the checks and the drift refreshes: answers
        are then uncertified (for measuring what certification costs).
    causal : bool, keyword-only
        Query i attends only keys at positions <= its own (positions start as
        ``0..n-1`` for queries and ``0..m-1`` for keys, so with ``n == m`` this is
        the decoder mask; ``append`` gives new tokens the next position).
    key_mask : (m,) bool array_like, keyword-only
        Key padding mask shared by all heads: False hides a key from every query.
        A query row that sees no key (masked, or causal with no key at or before
        its position) answers exactly 0, with an error bound of 0.
    backend : {"auto", "numpy", "torch"} or None, keyword-only
        Where the state lives and the arithmetic runs. ``"auto"`` follows the
        inputs (torch tensors in, torch tensors out, on their device); None uses
        the default set by :class:`dynattn.backends.use_backend` ("auto").
    device : optional, keyword-only
        Device for the torch backend (default: the inputs' device, else CPU).

    Runtime complexity: construction O(H*n*m*(d+e)); see each method.
    """

    _batched = True

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        tau: float = 0.5,
        scale: float = 1.0,
        dtype: Any = None,
        storage: str = "auto",
        memory_budget: int = 1 << 30,
        tol: float | None = None,
        certify: bool = True,
        causal: bool = False,
        key_mask: Any = None,
        backend: str | None = None,
        device: Any = None,
    ):
        super().__init__(Q, K, V, scale=scale, dtype=dtype, backend=backend, device=device)
        xp = self._xp
        self._tau = check_scalar("tau", tau, low=0.0, high=1.0)
        budget = check_scalar("memory_budget", memory_budget, low=0.0)
        check_choice("storage", storage, (*STORAGES, "auto"))
        self._tol = DEFAULT_TOL[self._dtype] if tol is None else check_scalar("tol", tol, low=0.0)
        if self._tol <= 0:
            raise ValueError(f"tol: expected a positive number, got {tol!r}")
        certify = check_flag("certify", certify)
        causal = check_flag("causal", causal)
        n, m, d, e = self.n, self.m, self.d, self.e
        visible = np.ones(m, dtype=bool)
        if key_mask is not None:
            mask = np.asarray(key_mask)
            if mask.dtype != bool or mask.shape != (m,):
                raise ValueError(
                    f"key_mask: expected a boolean array of shape ({m},), got "
                    f"{mask.dtype} array of shape {mask.shape}"
                )
            visible = mask.copy()
        self._certify = certify
        self._causal = causal
        self._H = H = int(np.prod(self.batch_shape, dtype=np.int64))

        self._storage_name = choose_storage(storage, H * n, m, self._dtype, int(budget))
        self._storage = STORAGES[self._storage_name](xp)
        self._unit = float(np.finfo(self._dtype).eps) / 2
        self._log_weight_limit = float(np.log(np.finfo(self._dtype).max)) / 4
        self._weight_limit = math.exp(self._log_weight_limit)
        #: relative error a weight column may carry from multiplicative updates before it is
        #: recomputed from its logits (it enters every bound times the row's weight mass)
        self._column_error_limit = max(8 * self._unit + 64 * UNIT_ROUNDOFF, self._tol / 32)

        # state arrays live in growable buffers; attributes are views of them
        self._threshold = _threshold(m, self._tau)
        # pending slots are allocated as they fill (capacity doubles up to the threshold)
        slots = min(self._threshold, INITIAL_SLOTS)
        self._size = {"H": H, "n": n, "m": m, "d": d, "e": e, "T": slots}
        self._capacity = {"n": n, "m": m, "T": slots}
        given = {"Q": self._Q, "K": self._K, "V": self._V}
        self._buffers: dict[str, tuple[Any, Any]] = {}
        for name, (axes, kind, on_device) in self._layout().items():
            owner = self._storage if name in self._storage.LAYOUT else self
            shape = tuple(self._size[a] for a in axes)
            zeros = xp.zeros if on_device else np.zeros
            self._buffers[name] = (owner, zeros(shape, kind or self._dtype))
        self._reslice()
        host = {k: v.reshape(H, *v.shape[-2:]) for k, v in given.items()}
        self._Qh[...] = xp.asarray(host["Q"])
        self._Kh[...] = xp.asarray(host["K"])
        self._Vh[...] = xp.asarray(host["V"])
        self._sync_float64_copies(Q=slice(None), K=slice(None), V=slice(None))
        self._QT64[...] = xp.swap_last(self._Q64)
        q64, k64 = host["Q"].astype(np.float64), host["K"].astype(np.float64)
        q_norm = _norms(q64)
        self._q_norm[...] = xp.asarray(q_norm)
        self._q_col_absmax = np.abs(q64).max(axis=1)  # (H, d), an upper bound
        self._q_norm_max = float(q_norm.max())
        self._k_norms[...] = _norms(k64)
        self._k_norm_max = float(self._k_norms.max())
        self._check_logit_range("K", self._k_norm_max)
        self._key_visible[...] = visible
        self._all_keys_visible = bool(visible.all())
        self._query_pos[...] = np.arange(n)
        self._key_pos[...] = np.arange(m)
        self._visible_keys[...] = self._count_visible_keys(np.arange(n))
        self._next_position = max(n, m)
        self._slot_of: dict[int, int] = {}
        self._t = 0
        self._stats = {
            "folds": 0,
            "rows_refreshed": 0,
            "query_fallbacks": 0,
            "full_refreshes": 0,
            "rows_rescaled": 0,
            "fresh_columns": 0,
        }
        self._full_refresh()

    # ------------------------------------------------------------------ buffers
    def _layout(self) -> dict[str, tuple[str, Any, bool]]:
        layout = dict(LAYOUT)
        if self._dtype != np.float64:
            layout.update({copy: (LAYOUT[src][0], np.float64, True) for copy, src in FLOAT64_COPIES.items()})
        layout.update(self._storage.LAYOUT)
        return layout

    def _reslice(self) -> None:
        """Point every state attribute at the live part of its buffer."""
        layout = self._layout()
        for name, (owner, buffer) in self._buffers.items():
            index = tuple(slice(0, self._size[a]) for a in layout[name][0])
            setattr(owner, name, buffer[index])
        if self._dtype == np.float64:
            for copy, src in FLOAT64_COPIES.items():
                setattr(self, copy, getattr(self, src))
        n, m = self._size["n"], self._size["m"]
        self.n, self.m = n, m
        #: absolute error of weights that underflow the dtype, summed over a row
        self._underflow_error = 2 * (m + 1) * float(np.finfo(self._dtype).tiny)
        #: absolute error of re-rounding a row's stored weights when they are subnormal
        self._subnormal_error = (m + 2 * self._size["T"]) * float(np.finfo(self._dtype).smallest_subnormal)
        self._Q = self._Qh.reshape(*self.batch_shape, n, self.d)
        self._K = self._Kh.reshape(*self.batch_shape, m, self.d)
        self._V = self._Vh.reshape(*self.batch_shape, m, self.e)

    def _resize(self, **sizes: int) -> None:
        """Set sizes of growable axes, doubling buffers that are too small (amortized O(1))."""
        grow = {a: max(s, 2 * self._capacity[a]) for a, s in sizes.items() if s > self._capacity[a]}
        if grow:
            layout = self._layout()
            self._capacity.update(grow)
            for name, (owner, buffer) in self._buffers.items():
                axes, _, on_device = layout[name]
                if not any(a in grow for a in axes):
                    continue
                shape = tuple(self._capacity.get(a, self._size[a]) for a in axes)
                bigger = (self._xp.zeros if on_device else np.zeros)(shape, buffer.dtype)
                bigger[tuple(slice(0, k) for k in buffer.shape)] = buffer
                self._buffers[name] = (owner, bigger)
        self._size.update(sizes)
        self._reslice()

    def _sync_float64_copies(self, **where: Any) -> None:
        """Refresh the float64 copies of Q/K/V at ``where`` (no-op for float64 storage)."""
        if self._dtype == np.float64:
            return
        for letter, index in where.items():
            src = getattr(self, f"_{letter}h")
            getattr(self, f"_{letter}64")[:, index] = src[:, index]

    # ------------------------------------------------------------------ properties
    @property
    def tau(self) -> float:
        """Laziness exponent."""
        return self._tau

    @property
    def threshold(self) -> int:
        """Pending key/value rows that trigger a fold, ``ceil(m**tau)``."""
        return self._threshold

    @property
    def pending(self) -> int:
        """Key/value rows changed since the last fold."""
        return self._t

    @property
    def storage(self) -> str:
        """Storage strategy in use (``"dense"`` or ``"implicit"``)."""
        return self._storage_name

    @property
    def tol(self) -> float:
        """Certification tolerance, relative to ``max|V[:, j]|``."""
        return self._tol

    @property
    def heads(self) -> int:
        """Number of independent problems (product of the leading axes; 1 without them)."""
        return self._H

    @property
    def causal(self) -> bool:
        return self._causal

    @property
    def key_mask(self) -> np.ndarray:
        """Which keys are visible ``(m,)`` (a copy)."""
        return self._key_visible.copy()

    @property
    def stats(self) -> dict[str, int]:
        """Counters: folds, rows refreshed exactly, query fallbacks, full refreshes,
        rows rescaled (stabilizer moved), fresh column computations."""
        return dict(self._stats)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state buffers (including spare capacity)."""
        return int(sum(self._xp.nbytes(buffer) for _, buffer in self._buffers.values()))

    # ------------------------------------------------------------------ public operations
    def rebuild(self) -> None:
        """Fold all pending rows into the snapshot now.

        Runtime complexity: O(H*n*e*t) for t pending rows (batched GEMMs), plus
        O(m*(d+e)) per row whose error bound forces an exact refresh.
        """
        self._fold()

    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateK: ``K[head][i, j] += delta``.

        Runtime complexity: O(n) amortized plus the fold's 2*n*e flops per
        pending row (dense storage); O(n*d) on a row's first touch (implicit).
        """
        h = self._check_head(head)
        i = check_index("i", i, self.m, axis="key rows, m")
        j = check_index("j", j, self.d, axis="key columns, d")
        self._apply_k(h, i, j, self._checked_sum("delta", self._Kh[h, i, j], delta, "K"))

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateV: ``V[head][i, j] += delta``.

        Runtime complexity: O(1) (O(H*n) or O(H*n*d) on a row's first touch), plus the fold.
        """
        h = self._check_head(head)
        i = check_index("i", i, self.m, axis="value rows, m")
        j = check_index("j", j, self.e, axis="value columns, e")
        self._apply_v(h, i, j, self._checked_sum("delta", self._Vh[h, i, j], delta, "V"))

    def update_k_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``K[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order.

        All-or-nothing: every index and delta is checked before anything changes.
        Runtime complexity: that of ``len(rows)`` single updates, without their
        per-call validation.
        """
        for h, c, j, new in self._checked_batch("K", rows, cols, deltas, heads, self.d):
            self._apply_k(h, c, j, new)

    def update_v_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``V[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order (all-or-nothing)."""
        for h, c, j, new in self._checked_batch("V", rows, cols, deltas, heads, self.e):
            self._apply_v(h, c, j, new)

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """Paper's Query: ``O[head][i, j]`` as a Python float.

        Runtime complexity: O(t); O(m*(d+e)) when certification falls back.
        """
        h = self._check_head(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        j = check_index("j", j, self.e, axis="output columns, e")
        return float(self._answer_entry(h, i, j))

    def query_row(self, i: int) -> np.ndarray:
        """``O[..., i, :]`` for every head, a new ``(*batch, e)`` array.

        Runtime complexity: O(H*t*e).
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._rows_all_heads(np.array([i]))[..., 0, :]

    def query_rows(self, rows: Any) -> np.ndarray:
        """``O[..., rows, :]`` for every head, a new ``(*batch, len(rows), e)`` array.

        Runtime complexity: O(H*len(rows)*t*e), vectorized.
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        return self._rows_all_heads(rows)

    def _rows_all_heads(self, rows: np.ndarray) -> np.ndarray:
        out = self._answer_rows(rows)
        return self._xp.astype(out.reshape(*self.batch_shape, rows.size, self.e), self._output_dtype)

    def query_many(self, rows: Any, cols: Any, *, heads: Any = None) -> np.ndarray:
        """``O[heads[k]][rows[k], cols[k]]`` for every k, a new ``(len(rows),)`` array.

        Runtime complexity: O(len(rows)*t), vectorized.
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols: expected the same length, got {rows.shape[0]} and {cols.shape[0]}"
            )
        head_index = self._check_heads(heads, rows.size)
        return self._xp.astype(self._answer_entries(head_index, rows, cols), self._output_dtype)

    def output(self) -> np.ndarray:
        """The whole attention output ``O: (*batch, n, e)``, as a new array.

        Runtime complexity: O(H*n*t*e).
        """
        return self._rows_all_heads(np.arange(self.n))

    def error_bound(self, i: int, *, head: Any = None) -> float:
        """Bound on ``|answer - exact| / max|V[:, j]|`` for answers about row ``i``.

        It is what :meth:`query` certifies: the incremental part is at most
        ``tol`` (otherwise the row is answered exactly), plus the error that a
        from-scratch float64 evaluation of the row from the stored inputs has
        (logit rounding, ``m``-term sums, rounding of weights to the dtype).
        Runtime complexity: O(t + e).
        """
        h = self._check_head(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        if self._visible_keys[i] == 0:
            return 0.0  # the row sees no key: its answer is exactly 0
        row_bound = float(self._row_bounds(np.array([h]), np.array([i]))[0][0])
        ratio = float(self._column_ratio(np.full(self.e, h), np.arange(self.e)).max())
        incremental = row_bound * (ratio + 1)
        if incremental > self._tol:
            incremental = 0.0  # queries would answer from an exact recomputation
        # answers returned as arrays are rounded once more, to the output dtype
        output_rounding = self._xp.unit_roundoff(self._output_dtype)
        return (incremental + self._fresh_error(h, i)) * (1 + output_rounding) + output_rounding

    # ------------------------------------------------------------------ row / token operations
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head; ``k: (*batch, d)``.

        Runtime complexity: O(H*n*d) (one column of scores per head), plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        k = self._checked_row("k", k, self.d).reshape(self._H, self.d)
        self._check_logit_range("k", float(_norms(k).max()))
        self._apply_key_row(c, k)
        self._fold_if_full()

    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head; ``v: (*batch, e)``.

        Runtime complexity: O(H*e) (O(H*n) or O(H*n*d) on a row's first touch), plus the fold.
        """
        c = check_index("c", c, self.m, axis="value rows, m")
        v = self._checked_row("v", v, self.e).reshape(self._H, self.e)
        self._apply_value_row(c, v)
        self._fold_if_full()

    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head; ``q: (*batch, d)``. Row i is recomputed exactly.

        Runtime complexity: O(H*m*(d+e)).
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        q = self._checked_row("q", q, self.d).reshape(self._H, self.d)
        self._check_query_range(q)
        self._apply_query_row(i, q)

    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows.

        All given rows are checked before anything changes. Runtime complexity:
        O(H*n*d) for k, O(H*e) for v, O(H*m*(d+e)) for q.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        rows = {}
        if k is not None or v is not None:
            i = check_index("i", i, self.m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self.n, axis="query rows, n")
            rows["q"] = self._checked_row("q", q, self.d).reshape(self._H, self.d)
            self._check_query_range(rows["q"])
        if k is not None:
            rows["k"] = self._checked_row("k", k, self.d).reshape(self._H, self.d)
            self._check_logit_range("k", float(_norms(rows["k"]).max()))
        if v is not None:
            rows["v"] = self._checked_row("v", v, self.e).reshape(self._H, self.e)
        if "k" in rows:
            self._apply_key_row(i, rows["k"])
        if "v" in rows:
            self._apply_value_row(i, rows["v"])
        if "q" in rows:
            self._apply_query_row(i, rows["q"])
        self._fold_if_full()

    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``.

        The new rows get the next position (for ``causal``). With ``causal=True``
        a token is all three rows. Capacity grows by doubling (amortized O(1)
        reallocation). Returns ``(query_index, key_index)`` (None for what was
        not added). Runtime complexity: O(H*n*d) for a key (one column of
        scores, folded later), O(H*m*(d+e)) for a query (its row, exactly).
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        if self._causal and (q is None or k is None):
            raise ValueError("append: a causal structure appends whole tokens; expected q, k and v")
        q_row = None if q is None else self._checked_row("q", q, self.d).reshape(self._H, self.d)
        if q_row is not None:
            self._check_query_range(q_row)
        if k is not None:
            k_row = self._checked_row("k", k, self.d).reshape(self._H, self.d)
            v_row = self._checked_row("v", v, self.e).reshape(self._H, self.e)
            self._check_logit_range("k", float(_norms(k_row).max()))
        position = self._next_position
        self._next_position += 1
        key_index = None
        if k is not None:
            key_index = self.m
            self._append_key(k_row, v_row, position)
        query_index = None
        if q_row is not None:
            query_index = self.n
            self._resize(n=self.n + 1)
            self._query_pos[query_index] = position
            self._visible_keys[query_index] = self._count_visible_keys(np.array([query_index]))[0]
            self._apply_query_row(query_index, q_row)
        self._fold_if_full()
        return query_index, key_index

    def delete_key(self, c: int) -> None:
        """Hide key c from every query (its mask bit off); other indices do not move.

        Runtime complexity: O(H*n), plus the fold.
        """
        self.set_key_mask(c, False)

    def set_key_mask(self, c: int, visible: bool) -> None:
        """Show or hide key c (a key padding mask update). Runtime complexity: O(H*n*d), plus the fold."""
        c = check_index("c", c, self.m, axis="key rows, m")
        visible = check_flag("visible", visible)
        if bool(self._key_visible[c]) == bool(visible):
            return
        slot = self._slot_for(c)
        self._key_visible[c] = visible
        self._all_keys_visible = bool(self._key_visible.all())
        self._visible_keys[self._rows_seeing_position(int(self._key_pos[c]))] += 1 if visible else -1
        self._set_fresh_columns(slot, c, np.arange(self._H))
        self._key_changed[slot] = True
        self._fold_if_full()

    def delete_query(self, i: int) -> None:
        """Remove query row i; rows after it move up by one.

        Runtime complexity: O(H*n*(d+e+T)) (plus O(H*n*m) in dense storage) of
        memory moves; nothing is recomputed.
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        if self.n == 1:
            raise ValueError("delete_query: the structure needs at least one query row")
        layout = self._layout()
        for name, (owner, _buffer) in self._buffers.items():
            axes, _, on_device = layout[name]
            if "n" not in axes:
                continue
            ops = self._xp if on_device else HOST
            view = ops.move_to_front(getattr(owner, name), axes.index("n"))
            view[i:-1] = ops.copy(view[i + 1 :])
        self._resize(n=self.n - 1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole structure to ``path`` (``.npz``), atomically.

        The file is written to a temporary file in the same folder and renamed
        over ``path``, so a crash never leaves a half-written file. Temporary
        files left by killed writers (on this host) are removed; see
        :func:`dynattn.persistence.save`.
        Runtime complexity: O(size of the state).
        """
        from dynattn import persistence

        persistence.save(self, path)

    _SCALARS = (
        "tau",
        "scale",
        "tol",
        "certify",
        "causal",
        "threshold",
        "t",
        "unit",
        "log_weight_limit",
        "weight_limit",
        "column_error_limit",
        "q_norm_max",
        "k_norm_max",
        "all_keys_visible",
        "next_position",
        "H",
    )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, backend: str | None = None, device: Any = None
    ) -> DynamicAttention:
        """Read a structure written by :meth:`save` onto ``backend`` (and ``device``);
        it answers exactly as the saved one.

        The whole file is checked before anything is built.
        Raises :class:`dynattn.persistence.SnapshotError` (a ValueError) saying
        what is wrong when ``path`` is not a valid snapshot, OSError when it
        cannot be opened. Runtime complexity: O(size of the state).
        """
        from dynattn import persistence

        return persistence.load(cls, path, backend=backend, device=device)

    # ------------------------------------------------------------------ updates (validated)
    def _apply_k(self, h: int, c: int, j: int, new_value: Any) -> None:
        """K[h, c, j] = new_value. Runtime complexity: O(n) (dense; O(H*n*d) on a
        first touch in implicit storage), plus an amortized fold."""
        old = float(self._K64[h, c, j])
        new = float(new_value)
        row_norm = _updated_norm(float(self._k_norms[h, c]), old, new)
        self._check_logit_range("delta", row_norm)
        slot = self._slot_for(c)
        self._Kh[h, c, j] = new
        self._K64[h, c, j] = new
        self._k_norms[h, c] = row_norm
        if row_norm > self._k_norm_max:
            self._k_norm_max = row_norm
        step = self._scale * (new - old)
        growth = abs(step) * float(self._q_col_absmax[h, j])
        error = float(self._column_error[h, slot]) + (2 * growth + 4) * UNIT_ROUNDOFF + self._unit
        if growth > self._log_weight_limit / 2 or error > self._column_error_limit:
            self._set_fresh_columns(slot, c, np.array([h]))
        else:
            column = self._pending_new_columns[h, slot]
            column *= self._xp.exp(self._QT64[h, j] * step)
            self._round_to_dtype(column)
            self._column_error[h, slot] = error
            self._column_max[h, slot] *= math.exp(growth) * (1 + 4 * self._unit)
            if self._column_max[h, slot] > self._weight_limit:
                self._restabilize_column(h, slot)
        self._key_changed[slot] = True
        self._fold_if_full()

    def _apply_v(self, h: int, c: int, j: int, new_value: Any) -> None:
        """V[h, c, j] = new_value. Runtime complexity: O(1) (O(H*n) or O(H*n*d) on a
        first touch), plus an amortized fold."""
        slot = self._slot_for(c)
        old = abs(float(self._V64[h, c, j]))
        new = float(new_value)
        self._Vh[h, c, j] = new
        self._V64[h, c, j] = new
        magnitude = abs(new)
        if magnitude >= self._value_max[h, j]:
            self._value_max[h, j] = magnitude
            self._value_max_stale[h, j] = False
        elif old >= self._value_max[h, j]:
            self._value_max_stale[h, j] = True
        if magnitude > self._value_scale[h, j]:
            self._value_scale[h, j] = magnitude
            if magnitude >= 2 * float(self._value_unit[h, j]):
                self._raise_value_units()
        self._pending_new_values[h, slot, j] = new / self._value_unit[h, j]
        self._value_changed[slot] = True
        self._fold_if_full()

    def _apply_key_row(self, c: int, k: np.ndarray) -> None:
        """K[:, c] = k (validated ``(H, d)``): one fresh weight column per head."""
        xp, heads = self._xp, np.arange(self._H)
        new_logits = None
        if c in self._slot_of or self._storage.exact_snapshot:
            slot = self._slot_for(c)
        else:
            # implicit storage, first touch: one pass over Q gives the folded column and the new one
            pair = xp.zeros((self._H, 2, self.d), np.float64)
            pair[:, 0] = self._K64[:, c]
            pair[:, 1] = xp.asarray(k.astype(np.float64))
            logits = self._hide_from_masked_rows((pair @ self._QT64) * self._scale, c)
            old_column = xp.exp(logits[:, 0] - self._mu)
            self._round_to_dtype(old_column)
            slot = self._open_slot(c, old_column, np.zeros(self._H))
            new_logits = logits[:, 1]
        self._Kh[:, c] = xp.asarray(k)
        self._sync_float64_copies(K=c)
        self._note_key_row(c, k)
        self._set_fresh_columns(slot, c, heads, new_logits)
        self._key_changed[slot] = True

    def _apply_value_row(self, c: int, v: np.ndarray) -> None:
        """V[:, c] = v (validated ``(H, e)``)."""
        slot = self._slot_for(c)
        old = np.abs(self._xp.to_numpy(self._V64[:, c]))
        self._Vh[:, c] = self._xp.asarray(v)
        self._sync_float64_copies(V=c)
        self._note_new_values(old, np.abs(v.astype(np.float64)))
        self._pending_new_values[:, slot] = self._scaled_values(c)
        self._value_changed[slot] = True

    def _note_key_row(self, c: int, k: np.ndarray) -> None:
        """Host bookkeeping after key row c became ``k: (H, d)``: squared norms and their max."""
        self._k_norms[:, c] = _norms(k)
        self._k_norm_max = max(self._k_norm_max, float(self._k_norms[:, c].max()))

    def _note_new_values(self, old: np.ndarray, new: np.ndarray) -> None:
        """Keep ``value_max`` (exact or marked stale) and ``value_scale`` after a value row
        changed from ``|old|`` to ``|new|`` ``(H, e)``."""
        rises = new >= self._value_max
        falls = ~rises & (old >= self._value_max)
        self._value_max = np.where(rises, new, self._value_max)
        self._value_max_stale = (self._value_max_stale & ~rises) | falls
        np.maximum(self._value_scale, new, out=self._value_scale)
        if np.any(self._value_scale / 2 >= self._value_unit):
            self._raise_value_units()

    def _scaled_values(self, c: int) -> Any:
        """Value row ``c`` of every head in units of :attr:`_value_unit`, ``(H, e)`` float64."""
        return self._V64[:, c] / self._xp.asarray(self._value_unit)

    def _raise_value_units(self) -> None:
        """Move each column's value unit up to the power of two below its ``value_scale``.

        The value side of the state (``N`` and the pending values) is kept in units of
        a per-column power of two ``2**k <= value_scale < 2**(k+1)``, so no product or
        sum of weights and values can overflow for any finite ``V``. Rescaling by a
        power of two is exact except for results in float64's subnormal range, whose
        rounding (half a subnormal step) is added to the drift of the head's rows.
        Runtime complexity: O(H*(n + T)*e).
        """
        units = np.maximum(self._value_unit, _power_of_two_units(self._value_scale))
        moved = units != self._value_unit
        if not moved.any():
            return
        factors = self._xp.asarray(self._value_unit / units)  # powers of two <= 1
        self._N *= factors[:, None, :]
        self._pending_new_values *= factors[:, None, :]
        self._pending_old_values *= factors[:, None, :]
        for h in np.flatnonzero(moved.any(axis=1)).tolist():
            self._drift[h] += float(np.finfo(np.float64).smallest_subnormal)
        self._value_unit = units

    def _apply_query_row(self, i: int, q: np.ndarray) -> None:
        """Q[:, i] = q (validated ``(H, d)``); the row is recomputed exactly."""
        xp = self._xp
        self._Qh[:, i] = xp.asarray(q)
        self._sync_float64_copies(Q=i)
        self._QT64[:, :, i] = self._Q64[:, i]
        q64 = q.astype(np.float64)
        q_norm = np.sqrt(np.einsum("hd,hd->h", q64, q64))
        self._q_norm[:, i] = xp.asarray(q_norm)
        np.maximum(self._q_col_absmax, np.abs(q64), out=self._q_col_absmax)
        self._q_norm_max = max(self._q_norm_max, float(q_norm.max()))
        self._refresh(np.arange(self._H), np.full(self._H, i))

    def _count_visible_keys(self, rows: np.ndarray) -> np.ndarray:
        """How many keys each query row in ``rows`` sees, ``(len(rows),)``."""
        visible = self._visibility(rows)
        return np.full(rows.size, self.m) if visible is None else visible.sum(axis=1)

    def _rows_seeing_position(self, position: int) -> Any:
        """Index of the query rows that the causal mask lets see a key at ``position``."""
        return self._query_pos >= position if self._causal else slice(None)

    def _append_key(self, k: np.ndarray, v: np.ndarray, position: int) -> None:
        """A new key-value row: a pending row whose folded column and values are zero."""
        c = self.m
        self._resize(m=c + 1)
        self._threshold = max(self._threshold, _threshold(c + 1, self._tau))
        xp = self._xp
        self._Kh[:, c] = xp.asarray(k)
        self._Vh[:, c] = xp.asarray(v)
        self._sync_float64_copies(K=c, V=c)
        self._note_key_row(c, k)
        self._key_visible[c] = True
        self._key_pos[c] = position
        self._visible_keys[self._rows_seeing_position(position)] += 1
        if self._storage.exact_snapshot:
            self._storage.weights_t[:, c] = 0
            self._storage.column_error[:, c] = 0
        H = self._H
        slot = self._open_slot(c, xp.zeros((H, self.n), np.float64), np.zeros(H), new_row=True)
        self._note_new_values(np.zeros((H, self.e)), np.abs(v.astype(np.float64)))
        self._pending_new_values[:, slot] = self._scaled_values(c)
        self._set_fresh_columns(slot, c, np.arange(self._H))
        self._key_changed[slot] = self._value_changed[slot] = True

    # ------------------------------------------------------------------ validation helpers
    def _check_head(self, head: Any) -> int:
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

    def _check_heads(self, heads: Any, size: int) -> np.ndarray:
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

    def _checked_row(self, name: str, value: Any, width: int) -> np.ndarray:
        """A validated host copy of a row argument (one row per head)."""
        return check_rows(name, self._xp.to_numpy(value), dtype=self._dtype, shape=(*self.batch_shape, width))

    def _check_query_range(self, q: np.ndarray) -> None:
        self._check_reach("q", float(_norms(q).max()), self._k_norm_max)

    def _checked_batch(self, target: str, rows: Any, cols: Any, deltas: Any, heads: Any, width: int):
        """Validate a batch of entry updates; return ``[(h, c, j, new_value), ...]`` to apply."""
        rows = check_index_array("rows", rows, self.m, axis="key/value rows, m")
        cols = check_index_array("cols", cols, width, axis="columns")
        values = np.asarray(deltas)
        if values.shape != rows.shape or cols.shape != rows.shape:
            raise ValueError(
                f"rows, cols, deltas: expected equal lengths, got {rows.shape}, {cols.shape}, {values.shape}"
            )
        heads = self._check_heads(heads, rows.size)
        if values.size and not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            raise TypeError(f"deltas: expected real numbers, got dtype {values.dtype}")
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise ValueError("deltas: expected finite values, got NaN or inf")
        array = self._Kh if target == "K" else self._Vh
        current: dict[tuple[int, int, int], Any] = {}
        plan = []
        for h, c, j, delta in zip(heads.tolist(), rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            key = (h, c, j)
            new = self._checked_sum("deltas", current.get(key, array[h, c, j]), delta, target)
            current[key] = new
            plan.append((h, c, j, new))
        if target == "K" and plan:
            touched = np.unique(rows)
            trial = self._xp.to_numpy(self._K64[:, touched]).copy()
            where = np.searchsorted(touched, rows)
            for (h, _c, j, new), w in zip(plan, where, strict=True):
                trial[h, w, j] = float(new)
            self._check_logit_range("deltas", float(_norms(trial).max()))
        return plan

    # ------------------------------------------------------------------ answers
    def _answer_entry(self, h: int, i: int, j: int) -> float:
        """O[h, i, j]. Runtime complexity: O(t); O(m*(d+e)) when certification falls back."""
        if self._visible_keys[i] == 0:
            return 0.0  # the row sees no key
        t = self._t
        numerator = float(self._N[h, i, j])
        z = float(self._Z[h, i])
        new_sum = old_sum = 0.0
        if t:
            new_weights = self._pending_new_columns[h, :t, i]
            old_weights = self._pending_old_columns[h, :t, i]
            numerator += float(new_weights @ self._pending_new_values[h, :t, j]) - float(
                old_weights @ self._pending_old_values[h, :t, j]
            )
            new_sum = float(new_weights.sum())
            old_sum = float(old_weights.sum())
        denominator = z + new_sum - old_sum
        if self._certify:
            recomputed = old_sum
            exact = int(self._exact_slots[h, i])
            if exact and not self._storage.exact_snapshot:
                recomputed = float(self._pending_old_columns[h, exact:t, i].sum())
            error = float(self._row_error(h, i, z + new_sum + old_sum, recomputed))
            relative = error / denominator if denominator > 0 else math.inf
            if not relative < 0.5 or (
                relative / (1 - relative) * (self._column_ratio_of(h, j) + 1) > self._tol
            ):
                return float(self._fallback(np.array([h]), np.array([i]))[0, j])
        return float(self._value_unit[h, j]) * (numerator / denominator) if denominator > 0 else 0.0

    def _answer_entries(self, heads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """O[heads[k], rows[k], cols[k]]. Runtime complexity: O(k*t), vectorized."""
        t = self._t
        xp = self._xp
        numerator = xp.copy(self._N[heads, rows, cols])
        if t:
            new_w = self._pending_new_columns[heads, :t, rows]  # (k, t)
            old_w = self._pending_old_columns[heads, :t, rows]
            numerator += xp.einsum("kt,kt->k", new_w, self._pending_new_values[heads, :t, cols])
            numerator -= xp.einsum("kt,kt->k", old_w, self._pending_old_values[heads, :t, cols])
        row_bound, denominator = self._row_bounds(heads, rows)
        bound = xp.to_numpy(row_bound) * (self._column_ratio(heads, cols) + 1)
        seen = xp.asarray(self._visible_keys[rows] > 0)
        units = xp.asarray(self._value_unit[heads, cols])
        answer = xp.where(seen, units * (numerator / xp.where(denominator > 0, denominator, 1.0)), 0.0)
        doubtful = ~(bound <= self._tol)
        if doubtful.any():
            pairs, where = np.unique(np.stack([heads[doubtful], rows[doubtful]]), axis=1, return_inverse=True)
            exact = self._fallback(pairs[0], pairs[1])
            answer[xp.index(np.flatnonzero(doubtful))] = exact[where.ravel(), cols[doubtful]]
        return answer

    def _answer_rows(self, rows: np.ndarray) -> np.ndarray:
        """O[:, rows, :] for every head, ``(H, k, e)``. Runtime complexity: O(H*k*t*e):
        one einsum for few rows, one BLAS-3 GEMM per head for many."""
        t, H, k = self._t, self._H, rows.size
        numerator = self._N[:, rows]
        if t:
            new_w = self._pending_new_columns[:, :t][:, :, rows]  # (H, t, k)
            old_w = self._pending_old_columns[:, :t][:, :, rows]
            new_v, old_v = self._pending_new_values[:, :t], self._pending_old_values[:, :t]
            if H * k * t * self.e < 1 << 20:
                numerator = numerator + self._xp.einsum("htk,hte->hke", new_w, new_v)
                numerator -= self._xp.einsum("htk,hte->hke", old_w, old_v)
            else:
                numerator = self._xp.copy(numerator)
                for h in range(H):
                    numerator[h] += new_w[h].T @ new_v[h]
                    numerator[h] -= old_w[h].T @ old_v[h]
        heads = np.repeat(np.arange(H), k)
        row_bound, denominator = self._row_bounds(heads, np.tile(rows, H))
        xp = self._xp
        answer = numerator / xp.where(denominator > 0, denominator, 1.0).reshape(H, k, 1)
        answer *= xp.asarray(self._value_unit)[:, None, :]
        if not self._visible_keys[rows].all():
            answer[:, xp.index(np.flatnonzero(self._visible_keys[rows] == 0))] = 0.0
        row_bound = xp.to_numpy(row_bound).reshape(H, k)
        doubtful = ~(row_bound * (self._head_ratios()[:, None] + 1) <= self._tol)
        if doubtful.any():
            bad_heads, bad_rows = np.nonzero(doubtful)
            answer[bad_heads, bad_rows] = self._fallback(bad_heads, rows[bad_rows])
        return answer

    # ------------------------------------------------------------------ error bounds
    def _row_bounds(self, heads: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``r/(1-r)`` with ``r = E/den`` (inf when not certifiable), and ``den``, per (head, row).
        Multiplied by ``rho_j + 1`` this bounds the error relative to max|V[:, j]|."""
        t, xp = self._t, self._xp
        z = self._Z[heads, rows]
        new_sum = xp.sum(self._pending_new_columns[heads, :t, rows], 1)
        old_weights = self._pending_old_columns[heads, :t, rows]  # (k, t)
        old_sum = xp.sum(old_weights, 1)
        denominator = z + new_sum - old_sum
        recomputed = old_sum
        if not self._storage.exact_snapshot:
            mask = np.arange(t)[None, :] >= self._exact_slots[heads, rows][:, None]
            recomputed = xp.sum(old_weights * xp.asarray(mask, np.float64), 1)
        error = self._row_error(heads, rows, z + new_sum + old_sum, recomputed)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = xp.where(denominator > 0, error / denominator, math.inf)
            bound = xp.where(relative < 0.5, relative / (1 - relative), math.inf)
        if not self._certify:
            bound = bound * 0
        elif not self._visible_keys[rows].all():
            bound = xp.where(xp.asarray(self._visible_keys[rows] > 0), bound, 0.0)
        return bound, denominator

    def _row_error(self, h: Any, i: Any, mass: Any, recomputed: Any) -> Any:
        """E (docs/accuracy.md) for (head, row) pairs given the summed weight ``mass`` and the
        pending old weights that were recomputed rather than taken from storage
        (``recomputed``: implicit storage, slots opened since the row was last exact);
        works on scalars and arrays alike."""
        error = self._drift[h, i] + self._persistent_error(self._t) * mass + self._underflow_error
        if not self._storage.exact_snapshot:
            error = error + self._mismatch_error(self._q_norm[h, i]) * recomputed
        return error

    def _persistent_error(self, t: int) -> float:
        """Relative error per unit of weight mass that is not drift: stored
        weights against a fresh computation, and the O(t) sums of an answer."""
        # 2**-1074: values divided by their column unit may round in the subnormal range
        return self._column_error_limit + self._unit + _gamma(2 * t + 4) + 2.0**-1074

    def _logit_error(self, q_norm: Any) -> Any:
        """Bound on |computed - exact| float64 logit for query rows of norm ``q_norm``."""
        # an infinite key norm passes the range checks only when every query row is 0
        # (then every logit is exactly 0)
        k_norm = self._k_norm_max if math.isfinite(self._k_norm_max) else 0.0
        return _gamma(self.d + 2) * abs(self._scale) * q_norm * k_norm

    def _mismatch_error(self, q_norm: Any) -> Any:
        """Implicit storage: a recomputed old column against the folded one."""
        return 4 * self._unit + self._column_error_limit + 2 * self._logit_error(q_norm)

    def _fresh_error(self, h: int, i: int) -> float:
        return float(2 * (self._logit_error(self._q_norm[h, i]) + self._unit + _gamma(self.m + 2)))

    def _column_ratio_of(self, h: int, j: int) -> float:
        """Scalar :meth:`_column_ratio` for the entry-query hot path."""
        if self._value_max_stale[h, j]:
            return float(self._column_ratio(np.array([h]), np.array([j]))[0])
        current = float(self._value_max[h, j])
        scale = float(self._value_scale[h, j])
        return scale / current if current > 0 else (math.inf if scale > 0 else 1.0)

    def _column_ratio(self, heads: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``value_scale / max|V[:, j]|`` per (head, column): how much bigger than today's
        values the values summed into the snapshot may have been."""
        stale = self._value_max_stale[heads, cols]
        if stale.any():
            for h, j in set(zip(heads[stale].tolist(), cols[stale].tolist(), strict=True)):
                self._value_max[h, j] = float(self._xp.amax(self._xp.abs(self._V64[h, :, j]), 0))
                self._value_max_stale[h, j] = False
        current = self._value_max[heads, cols]
        scale = self._value_scale[heads, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(current > 0, scale / current, np.where(scale > 0, np.inf, 1.0))

    def _head_ratios(self) -> np.ndarray:
        """Worst column ratio of each head ``(H,)``."""
        if self._value_max_stale.any():
            heads, cols = np.nonzero(self._value_max_stale)
            self._column_ratio(heads, cols)  # recomputes the stale maxima
        current, scale = self._value_max, self._value_scale
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(current > 0, scale / current, np.where(scale > 0, np.inf, 1.0))
        return ratios.max(axis=1)

    # ------------------------------------------------------------------ internals
    def _check_logit_range(self, name: str, k_norm: float) -> None:
        self._check_reach(name, self._q_norm_max, k_norm)

    def _check_reach(self, name: str, q_norm: float, k_norm: float) -> None:
        """Reject inputs whose dot products ``q.k`` or logits ``scale*q.k`` could leave
        float64's range (a zero norm gives exact zeros, whatever the other norm is)."""
        reach = 0.0 if q_norm == 0 or k_norm == 0 else q_norm * k_norm * max(1.0, abs(self._scale))
        if reach > 1e300:
            raise ValueError(
                f"{name}: dot products |Q_i||K_c| times max(1, |scale|) could reach {reach:.3g}, "
                "beyond float64's range; expected inputs whose (scaled) dot products stay below 1e300"
            )

    def _round_to_dtype(self, array: Any) -> None:
        if self._dtype != np.float64:
            array[...] = self._xp.astype(self._xp.astype(array, self._dtype), np.float64)

    def _masked_logits(self, heads: np.ndarray, c: int) -> np.ndarray:
        """``s * Q K_c^T`` for ``heads`` as ``(len(heads), n)``, -inf where key c is hidden."""
        if heads.size == 1:
            logits = (self._K64[heads[0], c] @ self._QT64[heads[0]])[None] * self._scale
        else:
            columns = self._QT64 if heads.size == self._H else self._QT64[heads]
            logits = (self._K64[heads, c][:, None, :] @ columns)[:, 0] * self._scale
        return self._hide_from_masked_rows(logits, c)

    def _hide_from_masked_rows(self, logits: Any, c: int) -> Any:
        """Set to -inf the logits ``(..., n)`` of the query rows that may not see key c."""
        if not self._key_visible[c]:
            logits[...] = -np.inf
        elif self._causal:
            logits[..., self._query_pos < self._key_pos[c]] = -np.inf
        return logits

    def _set_fresh_columns(self, slot: int, c: int, heads: np.ndarray, logits: Any = None) -> None:
        """Pending column of row c for ``heads``, from its (masked) logits against the current
        ``mu`` (computed here unless given); moves ``mu`` up first where a weight would exceed
        the limit."""
        xp = self._xp
        if logits is None:
            logits = self._masked_logits(heads, c)
        exponent = logits - self._mu[heads]
        too_big = exponent > self._log_weight_limit
        if bool(too_big.any()):
            which, rows = xp.nonzero(too_big)
            self._rescale_rows(heads[which], rows, logits[which, rows])
            exponent = logits - self._mu[heads]
        weights = xp.exp(exponent)
        self._round_to_dtype(weights)
        self._pending_new_columns[heads, slot] = weights
        self._column_error[heads, slot] = 0.0
        self._column_max[heads, slot] = xp.to_numpy(xp.amax(weights, 1))
        self._stats["fresh_columns"] += 1

    def _snapshot_column(self, c: int) -> np.ndarray:
        """Implicit storage: recompute column ``c`` of every head as folded ``(H, n)``."""
        column = self._xp.exp(self._masked_logits(np.arange(self._H), c) - self._mu)
        self._round_to_dtype(column)
        return column

    def _restabilize_column(self, h: int, slot: int) -> None:
        """A multiplicatively updated column may hold weights above the limit: move those rows' mu."""
        xp = self._xp
        column = self._pending_new_columns[h, slot]
        (rows,) = xp.nonzero(column > self._weight_limit)
        if rows.size:
            self._rescale_rows(np.full(rows.size, h), rows, self._mu[h, rows] + xp.log(column[rows]))
        self._column_max[h, slot] = float(xp.amax(column, 0))

    def _rescale_rows(self, heads: np.ndarray, rows: np.ndarray, new_mu: np.ndarray) -> None:
        """Raise the stabilizer of (head, row) pairs to ``new_mu``; everything stored for them
        is multiplied by ``exp(mu - new_mu) <= 1``. Runtime complexity: O(m + e + T) per row;
        O(m*(d+e)) for a row whose stabilizer jumps so far that the factor would be subnormal
        (its old weights are then negligible, and the row is recomputed exactly instead)."""
        xp = self._xp
        shift = new_mu - self._mu[heads, rows]  # >= 0
        far = xp.to_numpy(shift) > FAR_SHIFT
        if far.any():
            self._refresh(heads[far], rows[far])
            heads, rows, new_mu, shift = heads[~far], rows[~far], new_mu[~far], shift[~far]
        factors = xp.exp(-shift)
        self._N[heads, rows] *= factors[:, None]
        self._Z[heads, rows] *= factors
        z = self._Z[heads, rows]
        pending_mass = 0
        for block in (self._pending_new_columns, self._pending_old_columns):
            part = block[heads, :, rows] * factors[:, None]  # (k, T)
            self._round_to_dtype(part)
            block[heads, :, rows] = part
            pending_mass = pending_mass + xp.sum(part, 1)
        self._storage.rescale_rows(heads, rows, factors)
        drift = self._drift[heads, rows] * factors * (1 + 4 * UNIT_ROUNDOFF)
        # (docs/accuracy.md, "Stabilizers"): the computed factor is off by the rounding of
        # the shift and of exp; N and Z took one more rounding each; every stored weight
        # of the row (dense storage, pending columns) was rounded again to the dtype and no
        # longer cancels exactly what N and Z hold, by u relative or half a subnormal step.
        factor_error = 2 * UNIT_ROUNDOFF * (shift + 4)
        restored = (self._unit + UNIT_ROUNDOFF) * (z + drift + pending_mass)
        self._drift[heads, rows] = (
            drift + (factor_error + 2 * UNIT_ROUNDOFF) * z + restored + self._subnormal_error
        )
        self._mu[heads, rows] = new_mu
        self._stats["rows_rescaled"] += int(rows.size)

    def _slot_for(self, c: int) -> int:
        """The pending slot of key/value row ``c``, opening one (O(H*n) / O(H*n*d)) if needed."""
        slot = self._slot_of.get(c)
        if slot is not None:
            return slot
        column, error = self._storage.snapshot_column(c, self._snapshot_column)
        return self._open_slot(c, column, error)

    def _open_slot(self, c: int, column: Any, error: np.ndarray, *, new_row: bool = False) -> int:
        """A pending slot for row ``c`` whose folded weights are ``column: (H, n)`` (relative
        error ``error: (H,)``) and whose folded values are today's (zero for a ``new_row``)."""
        slot = self._t
        values = self._xp.zeros((self._H, self.e), np.float64) if new_row else self._scaled_values(c)
        if slot == self._size["T"]:
            self._resize(T=min(self._threshold, 2 * slot))
        self._pending_old_columns[:, slot] = column
        self._pending_new_columns[:, slot] = column
        self._pending_old_values[:, slot] = values
        self._pending_new_values[:, slot] = values
        self._pending_rows[slot] = c
        self._key_changed[slot] = False
        self._value_changed[slot] = False
        self._column_error[:, slot] = error
        self._column_max[:, slot] = self._xp.to_numpy(self._xp.amax(column, 1))
        self._slot_of[c] = slot
        self._t += 1
        return slot

    def _fold_if_full(self) -> None:
        if self._t >= self._threshold:
            self._fold()

    def _fold(self) -> None:
        """Fold pending rows into N and Z (batched BLAS-3), then refresh rows whose drift is too big."""
        t, xp = self._t, self._xp
        if t == 0:
            return
        rows = self._pending_rows[:t]
        self._k_norms[:, rows] = _norms(xp.to_numpy(self._K64[:, rows]))
        key_changed = self._key_changed[:t]
        value_changed = self._value_changed[:t]
        new_columns = self._pending_new_columns[:, :t]
        old_columns = self._pending_old_columns[:, :t]
        new_values = self._pending_new_values[:, :t]
        old_sum = xp.sum(old_columns, 1)
        mass = xp.sum(new_columns, 1) + old_sum
        drift = 2 * _gamma(t + 3) * mass
        if not self._storage.exact_snapshot:
            recomputed = old_sum
            if self._exact_slots.any():
                mask = np.arange(t)[None, :, None] >= self._exact_slots[:, None, :]  # (H, t, n)
                recomputed = xp.sum(old_columns * xp.asarray(mask, np.float64), 1)
            drift += self._mismatch_error(self._q_norm) * recomputed
        old_values = self._pending_old_values[:, :t]
        if key_changed.any():
            which = _slots(key_changed)
            delta = new_columns[:, which] - old_columns[:, which]
            self._add_transposed_products(delta, new_values[:, which])
            self._Z += xp.sum(delta, 1)
            self._storage.commit_columns(
                rows[which], new_columns[:, which], self._column_error[:, :t][:, which]
            )
        values_moved = bool(value_changed.any())
        if values_moved:
            which = _slots(value_changed)
            self._add_transposed_products(old_columns[:, which], new_values[:, which] - old_values[:, which])
        self._drift += drift + 2 * UNIT_ROUNDOFF * xp.abs(self._Z)
        self._slot_of.clear()
        self._t = 0
        self._exact_slots[...] = 0
        self._stats["folds"] += 1
        if values_moved:
            self._value_max = xp.to_numpy(xp.amax(xp.abs(self._V64), 1))
            self._value_max_stale[:] = False
            if np.any(self._value_scale / 2 > self._value_max):
                self._full_refresh()
                return
        if self._certify:
            heads, doubtful = xp.nonzero(~(self._drift <= DRIFT_FRACTION * self._tol * self._Z))
            if doubtful.size:
                self._refresh(heads, doubtful)

    def _add_transposed_products(self, columns: Any, values: Any) -> None:
        """``N[h] += columns[h]^T @ values[h]`` for every head: one BLAS-3 GEMM per head
        (numpy's stacked matmul does not call BLAS for a transposed operand)."""
        for h in range(self._H):
            self._N[h] += columns[h].T @ values[h]

    def _full_refresh(self) -> None:
        """Recompute every row exactly and reset the value scales (init, or values shrank)."""
        xp = self._xp
        self._value_max = xp.to_numpy(xp.amax(xp.abs(self._V64), 1))
        self._value_max_stale = np.zeros((self._H, self.e), dtype=bool)
        self._value_scale = self._value_max.copy()
        # every row is recomputed below (and nothing is pending), so the units may move down too
        self._value_unit = _power_of_two_units(self._value_scale)
        self._k_norms[...] = _norms(xp.to_numpy(self._K64))
        self._k_norm_max = float(self._k_norms.max())
        H, n = self._H, self.n
        self._refresh(np.repeat(np.arange(H), n), np.tile(np.arange(n), H))
        self._stats["full_refreshes"] += 1

    def _fallback(self, heads: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self._stats["query_fallbacks"] += int(rows.size)
        return self._refresh(heads, rows)

    def _refresh(self, heads: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Recompute (head, row) pairs exactly from Q, K, V; return their outputs ``(k, e)``.

        The snapshot of each row is rebuilt so that the pending terms cancel
        (old and new weight columns both set to today's weights; values as
        folded). Runtime complexity: O(m*(d+e)) per row.
        """
        t, xp = self._t, self._xp
        pending_rows = self._pending_rows[:t]
        value_changed = self._value_changed[:t]
        value_rows = pending_rows[value_changed]
        out = xp.zeros((rows.size, self.e), np.float64)
        block = max(1, REFRESH_BLOCK_ENTRIES // self.m)
        for h in np.unique(heads).tolist():
            (positions,) = np.nonzero(heads == h)
            value_delta = (
                self._pending_new_values[h, :t][value_changed]
                - self._pending_old_values[h, :t][value_changed]
            )
            units = xp.asarray(self._value_unit[h])
            values = self._V64[h] / units  # the value side is kept in units (no overflow)
            for start in range(0, positions.size, block):
                where = positions[start : start + block]
                part = rows[where]
                logits = (self._Q64[h, part] @ xp.swap_last(self._K64[h])) * self._scale
                visible = self._visibility(part)
                if visible is not None:
                    logits = xp.where(visible, logits, -math.inf)
                mu = xp.amax(logits, 1)
                mu = xp.where(xp.isfinite(mu), mu, 0.0)
                weights = xp.exp(logits - mu[:, None])
                self._round_to_dtype(weights)
                z = xp.sum(weights, 1)
                full = weights @ values
                out[xp.index(where)] = full / xp.where(z > 0, z, 1.0)[:, None] * units
                if value_rows.size:
                    full -= weights[:, value_rows] @ value_delta
                self._mu[h, part] = mu
                self._Z[h, part] = z
                self._N[h, part] = full
                self._drift[h, part] = 4 * UNIT_ROUNDOFF * z
                self._exact_slots[h, part] = t
                if t:
                    current = weights[:, pending_rows].T
                    self._pending_new_columns[h, :t][:, part] = current
                    self._pending_old_columns[h, :t][:, part] = current
                    np.maximum(
                        self._column_max[h, :t],
                        xp.to_numpy(xp.amax(current, 1)),
                        out=self._column_max[h, :t],
                    )
                self._storage.set_rows(h, part, weights)
        self._stats["rows_refreshed"] += int(rows.size)
        return out

    def _visibility(self, rows: np.ndarray) -> np.ndarray | None:
        """Which keys each query row in ``rows`` sees, ``(len(rows), m)``; None if all of them."""
        if self._all_keys_visible and not self._causal:
            return None
        visible = np.broadcast_to(self._key_visible, (rows.size, self.m))
        if self._causal:
            visible = visible & (self._key_pos[None, :] <= self._query_pos[rows][:, None])
        return visible

    # ------------------------------------------------------------------ invariants
    def _on_backend(self, xp: Any) -> DynamicAttention:
        """A shallow twin whose device arrays are copies on backend ``xp`` (host arrays shared)."""
        twin = copy.copy(self)
        twin._xp = xp
        twin._storage = copy.copy(self._storage)
        twin._storage.xp = xp
        layout = self._layout()
        twin._buffers = {}
        for name, (owner, buffer) in self._buffers.items():
            moved = xp.asarray(self._xp.to_numpy(buffer)) if layout[name][2] else buffer
            twin._buffers[name] = (twin._storage if owner is self._storage else twin, moved)
        twin._reslice()
        return twin

    def _check(self, *, deep: bool = True) -> None:
        """Assert every invariant (for tests; O(H*n*m*d) when ``deep``)."""
        if self._xp.name != "numpy":
            self._on_backend(HOST)._check(deep=deep)
            return
        t, T, n, m = self._t, self._threshold, self.n, self.m
        assert 0 <= t < T or (T == 1 and t == 0), (t, T)
        assert t <= self._size["T"] <= T and self._size["n"] == n and self._size["m"] == m
        assert len(self._slot_of) == t
        for c, slot in self._slot_of.items():
            assert self._pending_rows[slot] == c
        assert np.array_equal(self._K64, self._Kh.astype(np.float64))
        assert np.array_equal(self._V64, self._Vh.astype(np.float64))
        assert np.array_equal(self._Q64, self._Qh.astype(np.float64))
        assert np.array_equal(self._QT64, self._Q64.transpose(0, 2, 1))
        assert np.shares_memory(self._Q, self._Qh) and self._Q.shape == (
            *self.batch_shape,
            n,
            self.d,
        )
        for name in ("_mu", "_N", "_Z", "_drift"):
            assert np.all(np.isfinite(getattr(self, name))), name
        assert np.all(self._drift >= 0)
        assert self._all_keys_visible == bool(self._key_visible.all())
        new, old = self._pending_new_columns[:, :t], self._pending_old_columns[:, :t]
        for block in (new, old):
            assert np.all(block >= 0) and np.all(block <= self._weight_limit * (1 + 1e-12))
            assert np.array_equal(block, block.astype(self._dtype).astype(np.float64))
        assert np.all(self._column_max[:, :t] >= new.max(axis=2, initial=0) * (1 - 1e-12))
        assert np.all(self._column_error[:, :t] <= self._column_error_limit)
        units = self._value_unit
        assert np.array_equal(units, _power_of_two_units(units)) and np.all(self._value_scale / 2 < units)
        scaled = self._V64[:, self._pending_rows[:t]] / units[:, None, :]
        assert np.array_equal(self._pending_new_values[:, :t], scaled)
        assert np.array_equal(self._visible_keys, self._count_visible_keys(np.arange(n)))
        true_max = np.abs(self._V64).max(axis=1)
        fresh = ~self._value_max_stale
        assert np.array_equal(self._value_max[fresh], true_max[fresh])
        assert np.all(self._value_max >= true_max)
        assert np.all(self._value_scale >= true_max)
        assert self._k_norm_max >= _norms(self._K64).max() * (1 - 1e-12)
        q_norms = _norms(self._Q64)
        assert np.allclose(self._q_norm, q_norms, rtol=1e-12, atol=0)
        assert np.all(self._q_col_absmax >= np.abs(self._Q64).max(axis=1))
        if self._storage.exact_snapshot:
            stored = self._storage.weights_t
            assert np.array_equal(old, stored[:, self._pending_rows[:t]].astype(np.float64))
            assert np.all(stored >= 0) and np.all(stored <= self._weight_limit * (1 + 1e-12))
        if not deep:
            return
        # pending (and, for dense storage, all stored) weights agree with a fresh computation
        logits = np.matmul(self._Q64, self._K64.transpose(0, 2, 1)) * self._scale
        visible = self._visibility(np.arange(n))
        if visible is not None:
            logits = np.where(visible[None], logits, -np.inf)
        fresh_weights = np.exp(logits - self._mu[:, :, None])  # (H, n, m)
        slack = 2 * self._logit_error(self._q_norm)[:, :, None] + 4 * self._unit
        floor = float(np.finfo(self._dtype).tiny)
        if t:
            expected = fresh_weights[:, :, self._pending_rows[:t]].transpose(0, 2, 1)
            allowed = (self._column_error[:, :t, None] + slack.transpose(0, 2, 1)) * np.maximum(expected, new)
            assert np.all(np.abs(new - expected) <= allowed * 1.01 + floor)
        if self._storage.exact_snapshot:
            stored = self._storage.weights_t.transpose(0, 2, 1).astype(np.float64)
            stable = np.ones(m, dtype=bool)
            stable[self._pending_rows[:t]] = False
            allowed = (self._storage.column_error[:, None, :] + slack) * np.maximum(fresh_weights, stored)
            diff = np.abs(stored - fresh_weights)
            assert np.all(diff[:, :, stable] <= allowed[:, :, stable] * 1.01 + floor)
