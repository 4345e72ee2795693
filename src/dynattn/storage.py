"""Storage strategies for the snapshot attention weights (docs/accuracy.md).

The structure needs, when a key/value row ``c`` first becomes pending, the
stabilized weight column ``a0_c = exp(s * Q K_c^T - mu)`` *as it was folded*
into the snapshot ``N = A0 V0``. A strategy decides where that column comes
from, owns whatever arrays it keeps for that (declared as
:class:`~dynattn.state.StateArray`, allocated and grown by
:class:`~dynattn.state.AttentionState`), and says what its choice costs in the
certificate (:meth:`mismatch_error`):

``dense``
    Keep ``A`` itself, column-contiguous (stored as ``A^T: (H, m, n)`` in the
    structure's dtype). Getting a column is an O(n) copy, and it is bit-for-bit
    the column that was folded, so taking it out again cancels exactly: no
    mismatch term. Memory O(n*m) per head.
``implicit``
    Keep nothing: recompute the column from ``Q`` and ``K_c`` (an O(n*d)
    matrix-vector product, done in one pass with the new key's logits when a
    key row is replaced). The recomputation can differ from the folded column
    by rounding, which is charged to the per-row bound for the slots opened
    since the row was last recomputed exactly. Memory O((n+m)*d + n*T).

Strategies live in :data:`STORAGES`, a plain name -> class registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dynattn.state import FOLDING, FREE, AttentionState, StateArray

#: ``compute(c, new_key)``: column c of every head as folded ``(H, n)`` and, when
#: ``new_key: (H, d)`` is given, the masked logits of that new key ``(H, n)`` (else None).
ColumnFunction = Callable[[int, Any], tuple[Any, Any]]
#: ``rate(heads, rows)``: relative mismatch of a recomputed column at those (head, row) pairs.
RateFunction = Callable[[Any, Any], Any]


class DenseStorage:
    """Keep the stabilized weights ``A^T: (H, m, n)`` (the paper's O(n*m) space per head).

    Runtime complexity: ``snapshot_column`` O(H*n); ``commit_columns`` O(H*n*t);
    ``rescale_rows`` / ``set_rows`` O(m) per row; ``append_column`` O(H*n).
    """

    name = "dense"
    weights_t = StateArray("Hmn")  # A^T in the storage dtype
    column_error = StateArray("Hm", np.float64, device=False)  # relative error of each stored column
    column_growth = StateArray("Hm", np.float64, device=False)  # its log-growth since computed fresh

    def __init__(self, xp: Any):
        self.xp = xp

    def snapshot_column(
        self, c: int, compute: ColumnFunction, new_key: Any = None
    ) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """Column ``c`` of every head's snapshot weights as float64 ``(H, n)``, each head's
        relative error bound and log-growth since fresh ``(H,)`` each, and None (no logits
        computed here)."""
        column = self.xp.astype(self.weights_t[:, c], np.float64)
        return column, self.column_error[:, c].copy(), self.column_growth[:, c].copy(), None

    def commit_columns(
        self, key_rows: np.ndarray, columns: Any, errors: np.ndarray, growths: np.ndarray, rows: Any
    ) -> None:
        """Store new snapshot columns ``columns: (H, t, len(rows))`` of ``key_rows: (t,)`` at
        query rows ``rows`` (a slice) at a fold (exact: they are already rounded to the dtype)."""
        self.weights_t[:, key_rows, rows] = self.xp.astype(columns, self.weights_t.dtype)
        self.column_error[:, key_rows] = errors
        self.column_growth[:, key_rows] = growths

    def rescale_rows(self, heads: np.ndarray, rows: np.ndarray, factors: Any) -> None:
        """Multiply weight rows ``(heads[k], rows[k])`` by ``factors[k]`` (rounded to the dtype)."""
        block = self.weights_t[heads, :, rows] * factors[:, None]  # (k, m), float64
        self.weights_t[heads, :, rows] = self.xp.astype(block, self.weights_t.dtype)

    def set_rows(self, heads: slice, rows: Any, weights_t: Any) -> None:
        """Overwrite weight rows ``rows`` (an index array or a slice) of the heads ``heads``
        with the transposed ``weights_t: (H', m, len(rows))``, already rounded to the dtype."""
        target = self.weights_t[heads]
        # a slice assignment casts; an indexed one (torch's index_put) needs the dtype to match
        target[:, :, rows] = weights_t if isinstance(rows, slice) else self.xp.astype(weights_t, target.dtype)

    def append_column(self, c: int) -> None:
        """A new key row ``c``: its folded weights are zero."""
        self.weights_t[:, c] = 0
        self.column_error[:, c] = 0
        self.column_growth[:, c] = 0

    def mismatch_error(
        self,
        state: Any,
        old_weights: Any,
        slot_axis: int,
        rate: RateFunction,
        heads: Any,
        rows: Any,
        slots: Any,
    ) -> Any:
        """A stored column cancels exactly what was folded: no mismatch."""
        return 0.0

    def check(self, state: Any, fresh_weights: np.ndarray, slack: np.ndarray, floor: float) -> None:
        """Invariants (numpy state): stored weights agree with a fresh computation, and the
        pending old columns are exactly the stored ones."""
        t, folded = state.t, state.folded_rows
        stored = self.weights_t.astype(np.float64)
        kinds = state.slot_kind[:t]
        expected = stored[:, state.pending_rows[:t]]  # (H, t, n)
        # a row that also has a folding slot: where that slot is not folded yet, the row's
        # folded weights are the folding slot's (frozen) new ones, not yet in A
        for c, folding_slot in state.folding_slot_of.items():
            if c in state.slot_of:
                expected[:, state.slot_of[c], folded:] = state.pending_new_columns[:, folding_slot, folded:]
        expected[:, kinds == FOLDING, :folded] = 0.0  # folded and cleared
        expected[:, kinds == FREE] = 0.0
        old = state.pending_old_columns[:, :t]
        assert np.array_equal(old, expected), "pending old columns differ from stored A"
        limit = float(np.finfo(self.weights_t.dtype).max) ** 0.25 * (1 + 1e-12)
        assert np.all(stored >= 0) and np.all(stored <= limit), "stored weights out of range"
        stable = np.ones(stored.shape[1], dtype=bool)
        stable[list(state.slot_of)] = False
        stable[list(state.folding_slot_of)] = False
        stored_rows = stored.transpose(0, 2, 1)  # (H, n, m)
        allowed = (self.column_error[:, None, :] + slack) * np.maximum(fresh_weights, stored_rows)
        diff = np.abs(stored_rows - fresh_weights)
        bad = diff[:, :, stable] > allowed[:, :, stable] * 1.01 + floor
        assert not bad.any(), f"stored weights drifted: (head, row, key) {np.argwhere(bad)[:3].tolist()}"


class ImplicitStorage:
    """Keep no weights; recompute a snapshot column when it is needed.

    Runtime complexity: ``snapshot_column`` O(H*n*d); everything else O(1)
    (``mismatch_error`` O(size of ``old_weights``)).
    """

    name = "implicit"

    def __init__(self, xp: Any):
        self.xp = xp

    def snapshot_column(
        self, c: int, compute: ColumnFunction, new_key: Any = None
    ) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        column, new_logits = compute(c, new_key)
        return column, np.zeros(column.shape[0]), np.zeros(column.shape[0]), new_logits

    def commit_columns(
        self, key_rows: np.ndarray, columns: Any, errors: np.ndarray, growths: np.ndarray, rows: Any
    ) -> None:
        pass

    def rescale_rows(self, heads: np.ndarray, rows: np.ndarray, factors: Any) -> None:
        pass

    def set_rows(self, heads: slice, rows: Any, weights_t: Any) -> None:
        pass

    def append_column(self, c: int) -> None:
        pass

    def mismatch_error(
        self,
        state: Any,
        old_weights: Any,
        slot_axis: int,
        rate: RateFunction,
        heads: Any,
        rows: Any,
        slots: Any,
    ) -> Any:
        """``rate(heads, rows)`` times the pending old weights ``old_weights`` of the (head,
        row) pairs (of ``slots``, along ``slot_axis``) in the slots opened since the row's
        last exact refresh (``state.refreshed_at``): those were recomputed, not folded."""
        t = old_weights.shape[slot_axis]
        if t == 0:
            return 0.0
        shape = [1] * old_weights.ndim
        shape[slot_axis] = t
        opened = state.slot_sequence[slots].reshape(shape)
        recomputed = opened >= np.expand_dims(state.refreshed_at[heads, rows], slot_axis)
        mass = self.xp.sum(old_weights * self.xp.asarray(recomputed, np.float64), slot_axis)
        return rate(heads, rows) * mass

    def check(self, state: Any, fresh_weights: np.ndarray, slack: np.ndarray, floor: float) -> None:
        pass


#: Storage strategies by name. ``"auto"`` is resolved by :func:`choose_storage`.
STORAGES: dict[str, type[DenseStorage] | type[ImplicitStorage]] = {
    "dense": DenseStorage,
    "implicit": ImplicitStorage,
}


def choose_storage(name: str, sizes: dict[str, int], dtype: np.dtype, memory_budget: float) -> str:
    """Resolve ``"auto"``: dense when the whole state with dense weights, at ``sizes``
    (axes as in :mod:`dynattn.state`), fits ``memory_budget`` bytes."""
    if name != "auto":
        return name
    dense_bytes = AttentionState.bytes_for(sizes, np.dtype(dtype), DenseStorage)
    return "dense" if dense_bytes <= memory_budget else "implicit"
