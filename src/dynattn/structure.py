"""The dynamic attention structure: lazy updates with certified answers.

Math (SPEC sections 1-3). With stabilized weights ``a_c[i] = exp(s*Q_i.K_c - mu_i)``
(``mu_i`` the row's stabilizer), the structure keeps a *snapshot*

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

Certification. Each row carries ``drift[i]``, a bound on the rounding error
that incremental maintenance has accumulated in ``N[i]`` and ``Z[i]`` (in units
of ``Z`` times the column's value scale). Every answer is checked against a
first-order bound built from it; when the bound exceeds ``tol`` (cancellation:
a key that held most of a row's weight moved away; values that shrank by orders
of magnitude; drift after many folds), the row is recomputed exactly instead.
See ``docs/accuracy.md``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynattn._base import AttentionMaintainer
from dynattn._validation import check_choice, check_scalar
from dynattn.storage import STORAGES, choose_storage

UNIT_ROUNDOFF = 2.0**-53
#: Default certification tolerance (relative to max|V[:, j]|), a tenth of SPEC's target.
DEFAULT_TOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-5}
#: Rows are refreshed at a fold once drift exceeds this fraction of ``tol``.
DRIFT_FRACTION = 0.125
#: Refresh block: at most this many float64 weights are materialized at once.
REFRESH_BLOCK_ENTRIES = 1 << 22


def _gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u) for float64 arithmetic."""
    ku = k * UNIT_ROUNDOFF
    return ku / (1.0 - ku)


class DynamicAttention(AttentionMaintainer):
    """Softmax attention ``O = D^-1 exp(scale * Q K^T) V`` kept current under edits.

    Parameters
    ----------
    Q : (n, d) array_like
        Queries (copied).
    K : (m, d) array_like
        Keys (copied).
    V : (m, e) array_like
        Values (copied).
    tau : float in [0, 1], keyword-only
        Laziness exponent: pending key/value rows are folded when their number
        reaches ``threshold = ceil(m**tau)``. 0 folds every change at once
        (the ``Eager`` baseline); 1 lets up to m rows wait.
    scale : float, keyword-only
        Softmax scale (1.0 as in the paper; transformers use ``1/sqrt(d)``).
    dtype : float64 (default) or float32, keyword-only
        Storage dtype of Q, K, V and of the stored weights. Logits, sums and
        the snapshot are always accumulated in float64, so float32 saves the
        memory of the weights and is never less accurate than float64 rounding
        of float32 data.
    storage : {"auto", "dense", "implicit"}, keyword-only
        ``dense`` keeps the n*m weights (O(n) per entry update of K);
        ``implicit`` keeps none (O(n*d) per first touch of a key row);
        ``auto`` is dense when ``n*m*itemsize <= memory_budget``.
    memory_budget : int, keyword-only
        Bytes allowed for dense weights under ``storage="auto"`` (default 1 GiB).
    tol : float, keyword-only
        Certification tolerance on the incremental error, relative to
        ``max|V[:, j]|`` (default 1e-11 for float64, 1e-5 for float32).
    certify : bool, keyword-only
        Check every answer's error bound and recompute doubtful rows exactly
        (default). ``False`` skips the checks and the drift refreshes: answers
        are then uncertified (for measuring what certification costs).

    Runtime complexity: construction O(n*m*(d+e)); see each method.
    """

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        tau: float = 0.5,
        scale: float = 1.0,
        dtype: Any = np.float64,
        storage: str = "auto",
        memory_budget: int = 1 << 30,
        tol: float | None = None,
        certify: bool = True,
    ):
        super().__init__(Q, K, V, scale=scale, dtype=dtype)
        self._tau = check_scalar("tau", tau, low=0.0, high=1.0)
        budget = check_scalar("memory_budget", memory_budget, low=0.0)
        check_choice("storage", storage, (*STORAGES, "auto"))
        default_tol = DEFAULT_TOL[self._dtype]
        self._tol = default_tol if tol is None else check_scalar("tol", tol, low=0.0)
        if self._tol <= 0:
            raise ValueError(f"tol: expected a positive number, got {tol!r}")
        if not isinstance(certify, bool):
            raise TypeError(f"certify: expected True or False, got {certify!r}")
        self._certify = certify
        n, m, d, e = self.n, self.m, self.d, self.e
        self._threshold = min(m, max(1, math.ceil(m**self._tau * (1 - 1e-12))))

        self._Q64 = self._Q.astype(np.float64)
        self._QT64 = np.ascontiguousarray(self._Q64.T)  # (d, n): column j of Q is contiguous
        self._K64 = self._K.astype(np.float64)
        self._V64 = self._V.astype(np.float64)
        self._q_norm = np.sqrt(np.einsum("ij,ij->i", self._Q64, self._Q64))
        self._q_col_absmax = np.abs(self._Q64).max(axis=0)
        self._q_norm_max = float(self._q_norm.max())
        self._k_sq_norms = np.einsum("ij,ij->i", self._K64, self._K64)
        self._k_norm_max = float(np.sqrt(self._k_sq_norms.max()))
        self._check_logit_range("K", self._k_norm_max)

        self._storage_name = choose_storage(storage, n, m, self._dtype, int(budget))
        self._storage = STORAGES[self._storage_name](n, m, self._dtype)
        self._unit = float(np.finfo(self._dtype).eps) / 2
        self._log_weight_limit = float(np.log(np.finfo(self._dtype).max)) / 4
        self._weight_limit = math.exp(self._log_weight_limit)
        #: relative error allowed in a pending column from multiplicative updates
        self._column_error_limit = 8 * self._unit + 64 * UNIT_ROUNDOFF
        #: absolute error of weights that underflow the dtype, summed over a row
        self._underflow_error = 2 * (m + 1) * float(np.finfo(self._dtype).tiny)

        # snapshot (float64)
        self._mu = np.zeros(n)
        self._N = np.zeros((n, e))
        self._Z = np.zeros(n)
        self._drift = np.zeros(n)
        # pending key/value rows, one slot each
        T = self._threshold
        self._slot_of: dict[int, int] = {}
        self._t = 0
        self._pending_rows = np.zeros(T, dtype=np.int64)
        self._pending_new_columns = np.zeros((T, n))
        self._pending_old_columns = np.zeros((T, n))
        self._pending_new_values = np.zeros((T, e))
        self._pending_old_values = np.zeros((T, e))
        self._key_changed = np.zeros(T, dtype=bool)
        self._value_changed = np.zeros(T, dtype=bool)
        self._column_error = np.zeros(T)
        self._column_max = np.zeros(T)
        self._stats = {
            "folds": 0,
            "rows_refreshed": 0,
            "query_fallbacks": 0,
            "full_refreshes": 0,
            "rows_rescaled": 0,
            "fresh_columns": 0,
        }
        self._full_refresh()

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
    def stats(self) -> dict[str, int]:
        """Counters: folds, rows refreshed exactly, query fallbacks, full refreshes,
        rows rescaled (stabilizer moved), fresh column computations."""
        return dict(self._stats)

    @property
    def nbytes(self) -> int:
        """Bytes held by the structure's arrays (inputs, their float64 copies, state)."""
        arrays = [v for v in vars(self).values() if isinstance(v, np.ndarray)]
        shared = {id(self._Q64), id(self._K64), id(self._V64)} & {id(self._Q), id(self._K), id(self._V)}
        return int(sum(a.nbytes for a in arrays if id(a) not in shared) + self._storage.nbytes)

    # ------------------------------------------------------------------ public operations
    def rebuild(self) -> None:
        """Fold all pending rows into the snapshot now.

        Runtime complexity: O(n*e*t) for t pending rows (two GEMMs), plus
        O(m*(d+e)) per row whose error bound forces an exact refresh.
        """
        self._fold()

    def error_bound(self, i: int) -> float:
        """Bound on ``|answer - exact| / max|V[:, j]|`` for answers about row ``i``.

        It is what :meth:`query` certifies: the incremental part is at most
        ``tol`` (otherwise the row is answered exactly), plus the error that a
        from-scratch float64 evaluation of the row from the stored inputs has
        (logit rounding, ``m``-term sums, rounding of weights to the dtype).
        Runtime complexity: O(t + e).
        """
        from dynattn._validation import check_index

        i = check_index("i", i, self.n, axis="query rows, n")
        row_bound = float(self._row_bounds(np.array([i]))[0][0])
        incremental = row_bound * (float(self._column_ratio(np.arange(self.e)).max()) + 1)
        if incremental > self._tol:
            incremental = 0.0  # queries would answer from an exact recomputation
        return incremental + self._fresh_error(i)

    # ------------------------------------------------------------------ updates
    def _apply_k(self, c: int, j: int, new_value: Any) -> None:
        """K[c, j] = new_value. Runtime complexity: O(n) (dense; O(n*d) on a
        first touch in implicit storage), plus an amortized fold."""
        old = float(self._K64[c, j])
        new = float(new_value)
        # |K_c|^2 kept incrementally (recomputed exactly at each fold); 1e-9 covers its rounding
        sq_norm = max(0.0, float(self._k_sq_norms[c]) - old * old + new * new)
        row_norm = math.sqrt(sq_norm) * (1 + 1e-9)
        self._check_logit_range("delta", row_norm)
        slot = self._slot_for(c)
        self._K[c, j] = new_value
        self._K64[c, j] = new
        self._k_sq_norms[c] = sq_norm
        if row_norm > self._k_norm_max:
            self._k_norm_max = row_norm
        step = self._scale * (new - old)
        growth = abs(step) * float(self._q_col_absmax[j])
        error = float(self._column_error[slot]) + (2 * growth + 4) * UNIT_ROUNDOFF + self._unit
        if growth > self._log_weight_limit / 2 or error > self._column_error_limit:
            self._set_fresh_column(slot, c)
        else:
            column = self._pending_new_columns[slot]
            column *= np.exp(self._QT64[j] * step)
            self._round_to_dtype(column)
            self._column_error[slot] = error
            self._column_max[slot] *= math.exp(growth) * (1 + 4 * self._unit)
            if self._column_max[slot] > self._weight_limit:
                self._restabilize_column(slot)
        self._key_changed[slot] = True
        self._fold_if_full()

    def _apply_v(self, c: int, j: int, new_value: Any) -> None:
        """V[c, j] = new_value. Runtime complexity: O(1) (O(n) or O(n*d) on a
        first touch), plus an amortized fold."""
        slot = self._slot_for(c)
        old = abs(float(self._V64[c, j]))
        new = float(new_value)
        self._V[c, j] = new_value
        self._V64[c, j] = new
        self._pending_new_values[slot, j] = new
        self._value_changed[slot] = True
        magnitude = abs(new)
        if magnitude >= self._value_max[j]:
            self._value_max[j] = magnitude
            self._value_max_stale[j] = False
        elif old >= self._value_max[j]:
            self._value_max_stale[j] = True
        if magnitude > self._value_scale[j]:
            self._value_scale[j] = magnitude
        self._fold_if_full()

    # ------------------------------------------------------------------ answers
    def _answer_entry(self, i: int, j: int) -> float:
        """O[i, j]. Runtime complexity: O(t); O(m*(d+e)) when certification falls back."""
        t = self._t
        numerator = float(self._N[i, j])
        z = float(self._Z[i])
        new_sum = old_sum = 0.0
        if t:
            new_weights = self._pending_new_columns[:t, i]
            old_weights = self._pending_old_columns[:t, i]
            numerator += float(new_weights @ self._pending_new_values[:t, j]) - float(
                old_weights @ self._pending_old_values[:t, j]
            )
            new_sum = float(new_weights.sum())
            old_sum = float(old_weights.sum())
        denominator = z + new_sum - old_sum
        if self._certify:
            error = float(self._row_error(i, z + new_sum + old_sum, old_sum))
            relative = error / denominator if denominator > 0 else math.inf
            if not relative < 0.5 or (
                relative / (1 - relative) * (self._column_ratio_of(j) + 1) > self._tol
            ):
                return float(self._fallback(np.array([i]))[0, j])
        return numerator / denominator

    def _answer_entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """O[rows[k], cols[k]]. Runtime complexity: O(k*t), vectorized."""
        t = self._t
        numerator = self._N[rows, cols].copy()
        if t:
            new_w = self._pending_new_columns[:t, rows]
            old_w = self._pending_old_columns[:t, rows]
            numerator += np.einsum("tk,tk->k", new_w, self._pending_new_values[:t, cols])
            numerator -= np.einsum("tk,tk->k", old_w, self._pending_old_values[:t, cols])
        row_bound, denominator = self._row_bounds(rows)
        bound = row_bound * (self._column_ratio(cols) + 1)
        answer = numerator / np.where(denominator > 0, denominator, 1.0)
        doubtful = ~(bound <= self._tol)
        if doubtful.any():
            bad_rows, where = np.unique(rows[doubtful], return_inverse=True)
            exact = self._fallback(bad_rows)
            answer[doubtful] = exact[where, cols[doubtful]]
        return answer

    def _answer_rows(self, rows: np.ndarray) -> np.ndarray:
        """O[rows, :]. Runtime complexity: O(len(rows)*t*e), vectorized."""
        t = self._t
        numerator = self._N[rows].copy()
        if t:
            numerator += self._pending_new_columns[:t, rows].T @ self._pending_new_values[:t]
            numerator -= self._pending_old_columns[:t, rows].T @ self._pending_old_values[:t]
        row_bound, denominator = self._row_bounds(rows)
        answer = numerator / np.where(denominator > 0, denominator, 1.0)[:, None]
        worst_ratio = float(self._column_ratio(np.arange(self.e)).max())
        doubtful = ~(row_bound * (worst_ratio + 1) <= self._tol)
        if doubtful.any():
            answer[doubtful] = self._fallback(rows[doubtful])
        return answer

    # ------------------------------------------------------------------ error bounds
    def _row_bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``r/(1-r)`` with ``r = E_i/den_i`` (inf when not certifiable), and ``den_i``, for ``rows``.
        Multiplied by ``rho_j + 1`` this bounds the error relative to max|V[:, j]|."""
        t = self._t
        z = self._Z[rows]
        new_sum = self._pending_new_columns[:t, rows].sum(axis=0)
        old_sum = self._pending_old_columns[:t, rows].sum(axis=0)
        denominator = z + new_sum - old_sum
        error = self._row_error(rows, z + new_sum + old_sum, old_sum)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(denominator > 0, error / denominator, np.inf)
            bound = np.where(relative < 0.5, relative / (1 - relative), np.inf)
        if not self._certify:
            bound = np.zeros_like(bound)
        return bound, denominator

    def _row_error(self, i: Any, mass: Any, old_sum: Any) -> Any:
        """E_i (docs/accuracy.md) for row(s) ``i`` given the summed weight ``mass`` and the
        pending old weights ``old_sum``; works on scalars and arrays alike."""
        error = self._drift[i] + self._persistent_error(self._t) * mass + self._underflow_error
        if not self._storage.exact_snapshot:
            error = error + self._mismatch_error(self._q_norm[i]) * old_sum
        return error

    def _persistent_error(self, t: int) -> float:
        """Relative error per unit of weight mass that is not drift: stored
        weights against a fresh computation, and the O(t) sums of an answer."""
        return self._column_error_limit + self._unit + _gamma(2 * t + 4)

    def _logit_error(self, q_norm: Any) -> Any:
        """Bound on |computed - exact| float64 logit for query rows of norm ``q_norm``."""
        return _gamma(self.d + 2) * abs(self._scale) * q_norm * self._k_norm_max

    def _mismatch_error(self, q_norm: Any) -> Any:
        """Implicit storage: a recomputed old column against the folded one."""
        return 4 * self._unit + self._column_error_limit + 2 * self._logit_error(q_norm)

    def _fresh_error(self, i: int) -> float:
        return float(2 * (self._logit_error(self._q_norm[i]) + self._unit + _gamma(self.m + 2)))

    def _column_ratio_of(self, j: int) -> float:
        """Scalar :meth:`_column_ratio` for the entry-query hot path."""
        if self._value_max_stale[j]:
            return float(self._column_ratio(np.array([j]))[0])
        current = float(self._value_max[j])
        scale = float(self._value_scale[j])
        return scale / current if current > 0 else (math.inf if scale > 0 else 1.0)

    def _column_ratio(self, cols: np.ndarray) -> np.ndarray:
        """``value_scale[j] / max|V[:, j]|`` for ``cols``: how much bigger than today's
        values the values summed into the snapshot may have been."""
        stale = self._value_max_stale[cols]
        if stale.any():
            for j in np.unique(cols[stale]):
                self._value_max[j] = np.abs(self._V64[:, j]).max()
                self._value_max_stale[j] = False
        current = self._value_max[cols]
        scale = self._value_scale[cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(current > 0, scale / current, np.where(scale > 0, np.inf, 1.0))

    # ------------------------------------------------------------------ internals
    def _check_logit_range(self, name: str, k_norm: float) -> None:
        if abs(self._scale) * self._q_norm_max * k_norm > 1e300:
            raise ValueError(
                f"{name}: logits scale*|Q_i||K_c| could reach "
                f"{abs(self._scale) * self._q_norm_max * k_norm:.3g}, beyond float64's range; "
                "expected inputs whose scaled dot products stay below 1e300"
            )

    def _round_to_dtype(self, array: np.ndarray) -> None:
        if self._dtype != np.float64:
            array[...] = array.astype(self._dtype)

    def _fresh_columns(self, key_rows: np.ndarray) -> np.ndarray:
        """Stabilized weights of ``key_rows`` against the current ``mu``: ``(len, n)``,
        rounded to the dtype. Moves ``mu`` up first where a weight would exceed the limit."""
        logits = (self._K64[key_rows] @ self._QT64) * self._scale
        exponent = logits - self._mu
        too_big = exponent > self._log_weight_limit
        if too_big.any():
            rows = np.flatnonzero(too_big.any(axis=0))
            self._rescale_rows(rows, logits[:, rows].max(axis=0))
            exponent = logits - self._mu
        weights = np.exp(exponent)
        self._round_to_dtype(weights)
        return weights

    def _set_fresh_column(self, slot: int, c: int) -> None:
        column = self._fresh_columns(np.array([c]))[0]
        self._pending_new_columns[slot] = column
        self._column_error[slot] = 0.0
        self._column_max[slot] = float(column.max())
        self._stats["fresh_columns"] += 1

    def _restabilize_column(self, slot: int) -> None:
        """A multiplicatively updated column may hold weights above the limit: move those rows' mu."""
        column = self._pending_new_columns[slot]
        rows = np.flatnonzero(column > self._weight_limit)
        if rows.size:
            self._rescale_rows(rows, self._mu[rows] + np.log(column[rows]))
        self._column_max[slot] = float(column.max())

    def _rescale_rows(self, rows: np.ndarray, new_mu: np.ndarray) -> None:
        """Raise the stabilizer of ``rows`` to ``new_mu``; every stored quantity of those
        rows is multiplied by ``exp(mu - new_mu) <= 1``. Runtime complexity: O(m + e + T) per row."""
        factors = np.exp(self._mu[rows] - new_mu)
        self._N[rows] *= factors[:, None]
        self._Z[rows] *= factors
        self._drift[rows] = self._drift[rows] * factors + 4 * UNIT_ROUNDOFF * self._Z[rows]
        for block in (self._pending_new_columns, self._pending_old_columns):
            part = block[:, rows] * factors
            self._round_to_dtype(part)
            block[:, rows] = part
        self._storage.rescale_rows(rows, factors)
        self._mu[rows] = new_mu
        self._stats["rows_rescaled"] += int(rows.size)

    def _slot_for(self, c: int) -> int:
        """The pending slot of key/value row ``c``, opening one (O(n) / O(n*d)) if needed."""
        slot = self._slot_of.get(c)
        if slot is not None:
            return slot
        slot = self._t
        column, error = self._storage.snapshot_column(c, self._snapshot_column)
        self._pending_old_columns[slot] = column
        self._pending_new_columns[slot] = column
        self._pending_old_values[slot] = self._V64[c]
        self._pending_new_values[slot] = self._V64[c]
        self._pending_rows[slot] = c
        self._key_changed[slot] = False
        self._value_changed[slot] = False
        self._column_error[slot] = error
        self._column_max[slot] = float(column.max())
        self._slot_of[c] = slot
        self._t += 1
        return slot

    def _snapshot_column(self, c: int) -> np.ndarray:
        """Implicit storage: recompute column ``c`` as folded (no stabilizer move)."""
        column = np.exp((self._K64[c] @ self._QT64) * self._scale - self._mu)
        self._round_to_dtype(column)
        return column

    def _fold_if_full(self) -> None:
        if self._t >= self._threshold:
            self._fold()

    def _fold(self) -> None:
        """Fold pending rows into N and Z (BLAS-3), then refresh rows whose drift is too big."""
        t = self._t
        if t == 0:
            return
        rows = self._pending_rows[:t]
        key_rows = self._K64[rows]
        self._k_sq_norms[rows] = np.einsum("ij,ij->i", key_rows, key_rows)
        key_changed = self._key_changed[:t]
        value_changed = self._value_changed[:t]
        new_columns = self._pending_new_columns[:t]
        old_columns = self._pending_old_columns[:t]
        new_values = self._pending_new_values[:t]
        mass = new_columns.sum(axis=0) + old_columns.sum(axis=0)
        drift = 2 * _gamma(t + 3) * mass
        if not self._storage.exact_snapshot:
            drift += self._mismatch_error(self._q_norm) * old_columns.sum(axis=0)
        if key_changed.any():
            delta = new_columns[key_changed] - old_columns[key_changed]
            self._N += delta.T @ new_values[key_changed]
            self._Z += delta.sum(axis=0)
            self._storage.commit_columns(
                rows[key_changed], new_columns[key_changed], self._column_error[:t][key_changed]
            )
        values_moved = bool(value_changed.any())
        if values_moved:
            value_delta = new_values[value_changed] - self._pending_old_values[:t][value_changed]
            self._N += old_columns[value_changed].T @ value_delta
        self._drift += drift + 2 * UNIT_ROUNDOFF * np.abs(self._Z)
        self._slot_of.clear()
        self._t = 0
        self._stats["folds"] += 1
        if values_moved:
            self._value_max = np.abs(self._V64).max(axis=0)
            self._value_max_stale[:] = False
            if np.any(self._value_scale > 2 * self._value_max):
                self._full_refresh()
                return
        doubtful = np.flatnonzero(~(self._drift <= DRIFT_FRACTION * self._tol * self._Z))
        if doubtful.size and self._certify:
            self._refresh_rows(doubtful)

    def _full_refresh(self) -> None:
        """Recompute every row exactly and reset the value scales (init, or values shrank)."""
        self._value_max = np.abs(self._V64).max(axis=0)
        self._value_max_stale = np.zeros(self.e, dtype=bool)
        self._value_scale = self._value_max.copy()
        self._k_sq_norms = np.einsum("ij,ij->i", self._K64, self._K64)
        self._k_norm_max = float(np.sqrt(self._k_sq_norms.max()))
        self._refresh_rows(np.arange(self.n))
        self._stats["full_refreshes"] += 1

    def _fallback(self, rows: np.ndarray) -> np.ndarray:
        self._stats["query_fallbacks"] += int(rows.size)
        return self._refresh_rows(rows)

    def _refresh_rows(self, rows: np.ndarray) -> np.ndarray:
        """Recompute rows exactly from Q, K, V; return their current outputs ``(len, e)``.

        The snapshot of each row is rebuilt so that the pending terms cancel
        (old and new weight columns both set to today's weights; values as
        folded). Runtime complexity: O(len(rows)*m*(d+e)).
        """
        t = self._t
        pending_rows = self._pending_rows[:t]
        value_changed = self._value_changed[:t]
        value_rows = pending_rows[value_changed]
        value_delta = self._pending_new_values[:t][value_changed] - self._pending_old_values[:t][value_changed]
        out = np.empty((rows.size, self.e))
        block = max(1, REFRESH_BLOCK_ENTRIES // self.m)
        for start in range(0, rows.size, block):
            part = rows[start : start + block]
            logits = (self._Q64[part] @ self._K64.T) * self._scale
            mu = logits.max(axis=1)
            weights = np.exp(logits - mu[:, None])
            self._round_to_dtype(weights)
            z = weights.sum(axis=1)
            full = weights @ self._V64
            out[start : start + part.size] = full / z[:, None]
            if value_rows.size:
                full -= weights[:, value_rows] @ value_delta
            self._mu[part] = mu
            self._Z[part] = z
            self._N[part] = full
            self._drift[part] = 4 * UNIT_ROUNDOFF * z
            if t:
                current = weights[:, pending_rows].T
                self._pending_new_columns[:t, part] = current
                self._pending_old_columns[:t, part] = current
                np.maximum(self._column_max[:t], current.max(axis=1), out=self._column_max[:t])
            self._storage.set_rows(part, weights)
        self._stats["rows_refreshed"] += int(rows.size)
        return out

    # ------------------------------------------------------------------ invariants
    def _check(self, *, deep: bool = True) -> None:
        """Assert every invariant (for tests; O(n*m*d) when ``deep``)."""
        t, T, n = self._t, self._threshold, self.n
        assert 0 <= t < T or (T == 1 and t == 0), (t, T)
        assert len(self._slot_of) == t
        for c, slot in self._slot_of.items():
            assert self._pending_rows[slot] == c
        assert np.array_equal(self._K64, self._K.astype(np.float64))
        assert np.array_equal(self._V64, self._V.astype(np.float64))
        assert np.array_equal(self._QT64, self._Q64.T)
        for name in ("_mu", "_N", "_Z", "_drift"):
            assert np.all(np.isfinite(getattr(self, name))), name
        assert np.all(self._drift >= 0)
        new, old = self._pending_new_columns[:t], self._pending_old_columns[:t]
        for block in (new, old):
            assert np.all(block >= 0) and np.all(block <= self._weight_limit * (1 + 1e-12))
            assert np.array_equal(block, block.astype(self._dtype).astype(np.float64))
        assert np.all(self._column_max[:t] >= new.max(axis=1, initial=0) * (1 - 1e-12))
        assert np.all(self._column_error[:t] <= self._column_error_limit)
        assert np.array_equal(self._pending_new_values[:t], self._V64[self._pending_rows[:t]])
        true_max = np.abs(self._V64).max(axis=0)
        fresh = ~self._value_max_stale
        assert np.array_equal(self._value_max[fresh], true_max[fresh])
        assert np.all(self._value_max >= true_max)
        assert np.all(self._value_scale >= true_max)
        k_norms = np.sqrt(np.einsum("ij,ij->i", self._K64, self._K64))
        assert self._k_norm_max >= k_norms.max() * (1 - 1e-12)
        if self._storage.exact_snapshot:
            stored = self._storage.weights_t
            assert np.array_equal(old, stored[self._pending_rows[:t]].astype(np.float64))
            assert np.all(stored >= 0) and np.all(stored <= self._weight_limit * (1 + 1e-12))
        if not deep:
            return
        # pending (and, for dense storage, all stored) weights agree with a fresh computation
        fresh_weights = np.exp((self._Q64 @ self._K64.T) * self._scale - self._mu[:, None])
        slack = 2 * self._logit_error(self._q_norm)[:, None] + 4 * self._unit
        floor = float(np.finfo(self._dtype).tiny)
        if t:
            expected = fresh_weights[:, self._pending_rows[:t]].T
            allowed = (self._column_error[:t, None] + slack.T) * np.maximum(expected, new)
            assert np.all(np.abs(new - expected) <= allowed * 1.01 + floor)
        if self._storage.exact_snapshot:
            stored = self._storage.weights_t.T.astype(np.float64)
            stable = np.ones(self.m, dtype=bool)
            stable[self._pending_rows[:t]] = False
            allowed = (self._storage.column_error[None, :] + slack) * np.maximum(fresh_weights, stored)
            diff = np.abs(stored - fresh_weights)
            assert np.all(diff[:, stable] <= allowed[:, stable] * 1.01 + floor)
        assert n == self._Z.shape[0]
