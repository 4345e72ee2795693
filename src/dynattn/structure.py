"""The dynamic attention structure: lazy updates with certified answers.

After van den Brand, Song and Zhou, *Algorithm and Hardness for Dynamic
Attention Maintenance in Large Language Models* (arXiv 2304.02207). With
stabilized weights ``a_c[i] = exp(s*Q_i.K_c - mu_i)`` (``mu_i`` the row's
stabilizer; 0 where a mask hides key c from query i), the structure keeps a
*snapshot*

    N = A0 V0  (n, e),   Z = A0 1  (n,)      -- float64, as of the last fold

and, for each *pending* key/value row ``c`` changed since then, its weight
column as folded (``a0_c``) and as it is now (``a_c``), and its value row as
folded (``v0_c``) and now (``v_c``). Every answer is

    O[i, j] = (N[i, j] + sum_c a_c[i] v_c[j] - a0_c[i] v0_c[j])
              / (Z[i] + sum_c a_c[i] - a0_c[i])

which costs O(t) for t pending rows. When t reaches the *threshold*
``ceil(m**tau)`` a *fold* (the paper's rebuild) adds the pending columns into N
and Z with two BLAS-3 products, ``(a - a0)^T V_C`` over key-changed rows and
``a0^T (v - v0)`` over value-changed rows: 2*n*e flops per pending change.

Where things live: every state array is declared in :mod:`dynattn.state`; the
error terms of the certificate are in :mod:`dynattn.certificate` (derivation
in ``docs/accuracy.md``); where folded weight columns come from is the storage
strategy's business (:mod:`dynattn.storage`); snapshots on disk are
:mod:`dynattn.persistence`. This module keeps the public operations and the
lazy algorithm, read top-down: the paper's operations and the fold first, then
answers, token edits, weight maintenance, persistence and invariants.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from dynattn import certificate as cert
from dynattn import kernels, policy
from dynattn._base import ValidatedInputs
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
from dynattn.certificate import UNIT_ROUNDOFF
from dynattn.state import FOLDING, FREE, LIVE, AttentionState
from dynattn.storage import STORAGES, DenseStorage, ImplicitStorage, choose_storage

#: Pending slots allocated up front; more are added by doubling, up to the threshold.
INITIAL_SLOTS = 64
#: A stabilizer jump beyond this (natural log) would make the rescale factor exp(-jump) a
#: float64 subnormal, losing its relative precision: such rows are recomputed instead.
FAR_SHIFT = 700.0
#: A weight column updated in place may grow by at most e**MAX_COLUMN_GROWTH since it was
#: computed fresh: a weight below the dtype's normal range carries an absolute rounding
#: error (half a subnormal step, or all of it when it underflowed) that growth magnifies,
#: so every stored weight's absolute error stays below ``tiny * e**MAX_COLUMN_GROWTH``.
MAX_COLUMN_GROWTH = 32.0
#: Value units within this range let an exact row recomputation scale its product by the
#: units instead of the m value rows: no product or sum can overflow, and an underflowing
#: product errs by at most 2**-1015 of a unit, below the weight floor the bound charges.
UNIT_RANGE = (2.0**-60, 2.0**60)
#: tau="auto" averages the head reads per update over about this many updates.
READ_RATE_HORIZON = 32.0
#: A fold works on blocks of pending slots of at most this many float64 weights at once.
FOLD_BLOCK_ENTRIES = 1 << 21
#: schedule="spread" folds enough query rows at once for about this many flops (at most n/8
#: rows; the last slice may be thinner): every slice re-reads the folding values and pays
#: a fixed cost, which thin slices would repeat for little work.
MIN_SLICE_FLOPS = 1 << 24
#: Exact row recomputations materialize at most this many float64 weights at once.
REFRESH_BLOCK_ENTRIES = 1 << 22
#: _refresh_rows keeps its working memory between calls up to this many float64s (2 MiB)
SCRATCH_ENTRIES = 1 << 18
#: _refresh_rows stores the weights of up to this many rows row by row for its reductions
#: (measured: the max and sum over m = 4096 of 8 heads and 4 rows took 94 us so, copy
#: included, against 1.4 ms on the key-major layout; the copy stops paying above 16 rows)
ROW_MAJOR_ROWS = 16
#: Fold schedules: a whole fold at once, or spread over the updates that follow (docs/latency.md).
SCHEDULES = ("amortized", "spread")
#: Saved-file format version (``save`` / ``load``).
FORMAT_VERSION = 5
#: Host-side operations (bookkeeping arrays are always numpy).
HOST = NumpyBackend()


class OperationMeter:
    """One public operation timed for Rule 4 (``tau="auto"`` with measured rates): when
    it started, the state it started in, the model's balance change it made (used where
    the other state has no measurement of this operation yet), its units (1 for an
    update, the (head, row) pairs of a read) and the seconds a switch inside it took."""

    __slots__ = ("started", "dormant", "model_delta", "units", "switch_seconds")

    def __init__(self, dormant: bool):
        self.started = policy.now()
        self.dormant = dormant
        self.model_delta = 0.0
        self.units = 1
        self.switch_seconds = 0.0


def _metered(method: Callable[..., Any]) -> Callable[..., Any]:
    """A public operation that Rule 4 times under ``tau="auto"`` with measured rates (not
    when called from another public operation, nor with rates fixed by
    ``policy.use_rates``: then Rule 4 compares the model's prices, as before). Row, token
    and batch operations only: timing one costs about a microsecond, a third of an entry
    update's, so entry operations keep the model's prices."""
    name = method.__name__

    @functools.wraps(method)
    def metered(self: DynamicAttention, *args: Any, **kwargs: Any) -> Any:
        if not self._adaptive or self._meter is not None or not policy.rates().measured:
            return method(self, *args, **kwargs)
        self._meter = OperationMeter(self._state.dormant)
        try:
            result = method(self, *args, **kwargs)
        except BaseException:
            self._meter = None
            raise
        self._end_meter(name)
        return result

    return metered


class FoldPlan(NamedTuple):
    """What a fold adds up, gathered once: its ``slots`` (ascending); the key-changed ones
    ``key_slots: (k,)`` with their new values ``key_values: (H, k, e)``; the value-changed ones
    ``value_slots: (v,)`` with their value changes ``value_deltas: (H, v, e)``. A spread fold
    keeps its plan for all its slices (its slots are frozen)."""

    slots: np.ndarray
    key_slots: np.ndarray
    key_values: Any
    value_slots: np.ndarray
    value_deltas: Any
    #: ``slots`` as a slice where it is a run (:func:`_as_slice`), and where ``key_slots`` and
    #: ``value_slots`` are among ``slots``
    every: Any
    key_positions: np.ndarray
    value_positions: np.ndarray


def _parts(count: int, size: int) -> list[slice]:
    """``0..count-1`` in consecutive parts of at most ``size``."""
    return [slice(start, start + size) for start in range(0, count, size)]


def _every_head_of_the_same_rows(heads: np.ndarray, rows: np.ndarray, H: int) -> bool:
    """Whether (head, row) pairs are the same rows of every head, head by head (cheap
    tests first: most pairs that are not fail on their first or last head)."""
    per_head = rows.size // H
    return (
        rows.size == H * per_head > 0
        and heads[0] == 0
        and heads[-1] == H - 1
        and np.array_equal(heads, np.repeat(np.arange(H), per_head))
        and np.array_equal(rows.reshape(H, per_head), np.broadcast_to(rows[:per_head], (H, per_head)))
    )


def _as_slice(rows: np.ndarray) -> Any:
    """``rows`` as a slice when they are consecutive and ascending (indexing then gives
    views, not copies), else unchanged."""
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and (rows.size < 3 or np.all(np.diff(rows) == 1)):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def reserve_sizes(n: Any, m: Any) -> dict[str, int]:
    """``reserve``'s arguments checked: ``{"n": n, "m": m}`` without those that are None."""
    wanted = {axis: as_index(axis, size) for axis, size in (("n", n), ("m", m)) if size is not None}
    for axis, size in wanted.items():
        if size < 0:
            raise ValueError(f"{axis}: expected a number of rows >= 0 to reserve, got {size}")
    return wanted


def fold_threshold(m: int, tau: float) -> int:
    """Pending rows that trigger a fold: ``ceil(m**tau)``, between 1 and m."""
    return min(m, max(1, math.ceil(m**tau * (1 - 1e-12))))


def adaptive_threshold(m: int, H: int, n: int, e: int, memory_budget: float) -> int:
    """Pending rows at which ``tau="auto"`` must fold: ``m + 1`` (never) when the pending
    buffers of all m rows (``H*(2n + 2e)`` float64 per row) fit a quarter of
    ``memory_budget``, else as many as fit, and never fewer than ``ceil(sqrt(m))``."""
    fitting = int(memory_budget / 4 // (8 * H * (2 * n + 2 * e)))
    return m + 1 if fitting >= m else max(fold_threshold(m, 0.5), fitting)


class DynamicAttention(ValidatedInputs):
    """Softmax attention ``O = D^-1 exp(scale * Q K^T) V`` kept current under edits.

    Parameters
    ----------
    Q : (n, d) or (*batch, n, d) array_like
        Queries (copied). Leading axes (heads, batches) are independent problems.
    K : (m, d) or (*batch, m, d) array_like
        Keys (copied).
    V : (m, e) or (*batch, m, e) array_like
        Values (copied).
    tau : float in [0, 1] or "auto", keyword-only
        Laziness exponent: pending key/value rows are folded when their number
        reaches ``threshold = ceil(m**tau)``. 0 folds every change at once
        (the ``Eager`` baseline); 1 lets up to m rows wait. ``"auto"`` lets an
        online policy decide (``docs/policy.md``): while reads are rare, a changed
        key's weight column is *deferred* (queries compute its logits at the rows
        they read) until reading it lazily has cost as much as computing it;
        pending rows are folded once the work they add to queries reaches the
        cost of the fold (at most ``adaptive_threshold`` rows wait, for memory);
        and while reads are rarer still it keeps no snapshot at all (*dormant*:
        reads recompute what they read) until reads make keeping one pay. It
        starts dormant: construction computes no row, and ``fold()`` builds the
        snapshot at once where many reads are known to follow.
    schedule : {"amortized", "spread"}, keyword-only
        When a fold's work is done. ``"amortized"`` (the paper's): all at once,
        when the pending rows reach the threshold, so that update stalls.
        ``"spread"``: a fold starts when the threshold is pending, and its query
        rows are folded a slice at a time by the updates that follow, so that it
        is done when the next one starts (pending rows meanwhile wait in a second
        generation; answers add up both); no single update pays a whole fold
        (``docs/latency.md``). Answers and their certificate are the same.
        Not with ``tau="auto"``.
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
        ``auto`` is dense while the whole state (``nbytes``, spare capacity
        included) fits ``memory_budget``, and switches to implicit when growth
        (``append``) would take it past the budget.
    memory_budget : int, keyword-only
        Bytes the state may take with dense storage under ``storage="auto"``
        (default 1 GiB); it decides between the strategies and is re-applied
        whenever the state grows. Implicit storage is used whatever its size.
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

    Runtime complexity: construction O(H*n*m*(d+e)) (``tau="auto"``: the inputs' norms
    and value scales, no row); see each method.
    """

    _batched = True
    #: the array backend (numpy or torch): its arrays are typed loosely on purpose
    _xp: Any

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        tau: float | str = 0.5,
        schedule: str = "amortized",
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
        adaptive = isinstance(tau, str)
        if adaptive and tau != "auto":
            raise TypeError(f'tau: expected a real number in [0, 1] or "auto", got {tau!r}')
        tau = 1.0 if adaptive else check_scalar("tau", tau, low=0.0, high=1.0)
        budget = check_scalar("memory_budget", memory_budget, low=0.0)
        check_choice("storage", storage, (*STORAGES, "auto"))
        check_choice("schedule", schedule, SCHEDULES)
        if adaptive and schedule == "spread":
            raise ValueError(
                'schedule: "spread" works with a fixed tau, got tau="auto" (its policy decides '
                'when to fold); use schedule="amortized" with tau="auto"'
            )
        if tol is not None:
            tol = check_scalar("tol", tol, low=0.0)
            if tol <= 0:
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
        H = int(np.prod(self.batch_shape, dtype=np.int64))
        threshold = adaptive_threshold(m, H, n, e, budget) if adaptive else fold_threshold(m, tau)
        # pending slots are allocated as they fill (capacity doubles up to the threshold)
        sizes = {"H": H, "n": n, "m": m, "d": d, "e": e, "S": min(threshold, INITIAL_SLOTS)}
        self._configure(
            tau=tau,
            adaptive=adaptive,
            schedule=schedule,
            tol=tol,
            certify=certify,
            causal=causal,
            storage=choose_storage(storage, sizes, self._dtype, budget),
            batch_shape=self.batch_shape,
            memory_budget=budget,
            auto_storage=storage == "auto",
        )
        given = [x.reshape(H, *x.shape[-2:]) for x in (self._Q, self._K, self._V)]
        self._state = s = AttentionState(self._xp, self._dtype, sizes, self._storage)
        self._after_resize()
        s.threshold = threshold
        xp = self._xp
        s.Q[...], s.K[...], s.V[...] = (xp.asarray(x) for x in given)
        s.sync_float64_copies(Q=slice(None), K=slice(None), V=slice(None))
        s.Q64_T[...] = xp.swap_last(s.Q64)
        q_norm = cert.norms(given[0])
        s.q_norm[...] = xp.asarray(q_norm)
        s.q_col_absmax[...] = np.abs(given[0].astype(np.float64)).max(axis=1)
        s.q_norm_max = float(q_norm.max())
        s.k_norms[...] = cert.norms(given[1])
        s.k_norm_max = float(s.k_norms.max())
        self._guard_key_norm("K", s.k_norm_max)
        s.key_visible[...] = visible
        s.all_keys_visible = bool(visible.all())
        s.query_pos[...] = np.arange(n)
        s.key_pos[...] = np.arange(m)
        s.next_position = max(n, m)  # (every position is below it; _visibility relies on that)
        s.visible_keys[...] = self._count_visible_keys(np.arange(n))
        if adaptive:  # Rule 4 from the start: no snapshot until reads make one pay
            self._reset_value_tables()
            self._go_dormant()
        else:
            self._full_refresh()

    def _configure(
        self,
        *,
        tau: float,
        adaptive: bool,
        schedule: str,
        tol: float | None,
        certify: bool,
        causal: bool,
        storage: str,
        batch_shape: tuple[int, ...],
        memory_budget: float,
        auto_storage: bool,
    ) -> None:
        """Options and the constants derived from them (shared by ``__init__`` and ``load``)."""
        self._tau, self._certify, self._causal = tau, certify, causal
        #: tau="auto": deferred key columns and the online fold policy (docs/policy.md)
        self._adaptive = adaptive
        #: schedule="spread": folds are done a slice of query rows per update
        self._spread = schedule == "spread"
        #: bytes the state may take with dense storage under storage="auto" (which
        #: ``_auto_storage`` says), and that bounds tau="auto"'s pending buffers
        self._memory_budget, self._auto_storage = memory_budget, auto_storage
        self._tol = cert.DEFAULT_TOL[self._dtype] if tol is None else tol
        self.batch_shape = tuple(batch_shape)
        self._H = int(np.prod(self.batch_shape, dtype=np.int64))
        self._storage = STORAGES[storage](self._xp)
        info = np.finfo(self._dtype)
        self._unit = float(info.eps) / 2
        #: weights are kept below e^L: L = ln(max)/4 (177 for float64, 22 for float32)
        self._log_weight_limit = float(np.log(info.max)) / 4
        self._weight_limit = math.exp(self._log_weight_limit)
        self._column_error_limit = cert.column_error_limit(self._unit, self._tol)
        self._mass_rates: dict[int, float] = {}  # cert.mass_rate by pending count t
        #: measured over predicted time of this structure's folds and column computations
        #: (tau="auto" with measured rates, docs/policy.md)
        self._fold_correction = self._column_correction = 1.0
        self._dtype_max = float(info.max)
        self._subnormal_step = float(info.smallest_subnormal)
        #: absolute error of any stored weight from the dtype's underflow, magnified by growth
        self._weight_floor = float(info.tiny) * math.exp(MAX_COLUMN_GROWTH)
        #: Rule 4 on measured time: the operation being timed, and per (dormant, operation
        #: name) the seconds and units of the last stretch in that state (not saved: a
        #: loaded structure measures again); the measured over predicted price of waking
        self._meter: OperationMeter | None = None
        self._operation_costs: dict[tuple[bool, str], list[float]] = {}
        self._wake_correction = 1.0
        #: float64 memory _refresh_rows works in, kept between calls (fresh memory of that
        #: size would be faulted in page by page on every call)
        self._refresh_scratch: Any = None
        #: schedule="spread": the fold in progress, gathered once (None: gather it again)
        self._folding_plan: FoldPlan | None = None
        #: during update_k_many/update_v_many: pending rows allowed before a fold (None:
        #: the threshold)
        self._batch_limit: int | None = None

    def _threshold_for_size(self, n: int | None = None, m: int | None = None) -> int:
        """The fold threshold for the current sizes, or for ``n`` queries and ``m`` keys
        (``append`` raises it, never lowers it)."""
        n, m = self.n if n is None else n, self.m if m is None else m
        if self._adaptive:
            return adaptive_threshold(m, self._H, n, self.e, self._memory_budget)
        return fold_threshold(m, self._tau)

    def _after_resize(self) -> None:
        """Sizes and size-dependent constants after the state grew or shrank."""
        #: tau="auto": the deferred slots and the fold's predicted price, kept between updates
        self._read_plan: tuple[np.ndarray, float] | None = None
        sizes = self._state.sizes
        self.n, self.m, self.d, self.e = sizes["n"], sizes["m"], sizes["d"], sizes["e"]
        #: the underflow error of a stored weight summed over what an answer adds up: the
        #: snapshot's m weights, the pending old and new weights, and a fresh evaluation's m
        self._underflow_error = 2 * (self.m + sizes["S"] + 1) * self._weight_floor
        #: absolute error of re-rounding a row's stored weights when they are subnormal
        self._subnormal_error = (self.m + 2 * sizes["S"]) * self._subnormal_step
        s = self._state
        self._Q = s.Q.reshape(*self.batch_shape, self.n, self.d)
        self._K = s.K.reshape(*self.batch_shape, self.m, self.d)
        self._V = s.V.reshape(*self.batch_shape, self.m, self.e)

    def _resize(self, **sizes: int) -> None:
        """Grow or shrink axes; under ``storage="auto"``, switch dense storage to implicit
        before growing past ``memory_budget`` (the dense weights are dropped, not copied)."""
        s = self._state
        sizes = {axis: size for axis, size in sizes.items() if size != s.sizes[axis]}
        if not sizes:
            return
        capacity, allocated = s.capacity_after(**sizes), s.capacity_after()
        if any(capacity[axis] > allocated[axis] for axis in sizes):
            self._fit_budget(capacity)
        s.resize(**sizes)
        self._after_resize()

    def _fit_budget(self, capacity: dict[str, int]) -> None:
        """Under ``storage="auto"``, switch dense storage to implicit when its buffers at
        ``capacity`` would not fit ``memory_budget`` (before they are allocated)."""
        if self._auto_storage and self._storage.name == "dense":
            if AttentionState.bytes_for(capacity, self._dtype, DenseStorage) > self._memory_budget:
                self._switch_to_implicit()

    def _switch_to_implicit(self) -> None:
        """Drop the dense weights. The pending rows' folded columns came from them exactly,
        so no slot opened so far counts as recomputed (``refreshed_at = slots_opened``)."""
        s = self._state
        self._storage = ImplicitStorage(self._xp)
        s.replace_storage(self._storage)
        if not s.dormant:  # (dormant, refreshed_at says which rows are current)
            s.refreshed_at[...] = s.slots_opened
        s.stats["storage_switches"] += 1

    # ================================================================== the paper's operations
    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateK: ``K[head][i, j] += delta``.

        Runtime complexity: O(n) amortized plus the fold's 2*n*e flops per
        pending row (dense storage); O(n*d) on a row's first touch (implicit).
        """
        h = self._head_index(head)
        i = check_index("i", i, self.m, axis="key rows, m")
        j = check_index("j", j, self.d, axis="key columns, d")
        self._apply_k(h, i, j, self._checked_sum("delta", self._state.K[h, i, j], delta, "K"))

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """Paper's UpdateV: ``V[head][i, j] += delta``.

        Runtime complexity: O(1) (O(H*n) or O(H*n*d) on a row's first touch), plus the fold.
        """
        h = self._head_index(head)
        i = check_index("i", i, self.m, axis="value rows, m")
        j = check_index("j", j, self.e, axis="value columns, e")
        self._apply_v(h, i, j, self._checked_sum("delta", self._state.V[h, i, j], delta, "V"))

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """Paper's Query: ``O[head][i, j]`` as a Python float.

        Runtime complexity: O(t); O(m*(d+e)) when certification falls back.
        """
        h = self._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        j = check_index("j", j, self.e, axis="output columns, e")
        return float(self._answer_entry(h, i, j))

    def fold(self) -> None:
        """Fold all pending rows into the snapshot now (the paper's rebuild).

        Runtime complexity: O(H*n*e*t) for t pending rows (batched GEMMs), plus
        O(m*(d+e)) per row whose error bound forces an exact refresh; O(H*n*m*(d+e))
        for a dormant structure (``tau="auto"``), which this wakes.
        """
        if self._state.dormant:
            self._wake()
        self._fold()

    #: The paper's name for :meth:`fold`.
    rebuild = fold

    # ------------------------------------------------------------------ the lazy core
    def _apply_k(self, h: int, c: int, j: int, new_value: Any) -> None:
        """K[h, c, j] = new_value (validated). Runtime complexity: O(n) (dense; O(H*n*d) on
        a first touch in implicit storage), plus an amortized fold."""
        s = self._state
        old = float(s.K64[h, c, j])
        new = float(new_value)
        row_norm = cert.updated_norm(float(s.k_norms[h, c]), old, new)
        self._guard_key_norm("delta", row_norm)
        slot = None if s.dormant else self._slot_for(c)
        s.K[h, c, j] = new
        s.K64[h, c, j] = new
        s.k_norms[h, c] = row_norm
        if row_norm > s.k_norm_max:
            s.k_norm_max = row_norm
        if slot is None:  # dormant: the inputs are all there is to change
            self._fold_if_full()
            return
        if self._adaptive and (
            s.column_deferred[slot] or self._reads_are_rare(policy.hadamard_price(self.n))
        ):
            self._defer_column(slot)  # O(1): reads compute the column's logits they need
            s.key_changed[slot] = True
            self._fold_if_full()
            return
        if self._adaptive:
            s.upkeep_pending += policy.hadamard_price(self.n)
        step = self._scale * (new - old)
        growth = abs(step) * float(s.q_col_absmax[h, j])
        error = float(s.column_error[h, slot]) + (2 * growth + 4) * UNIT_ROUNDOFF + self._unit
        grown = float(s.column_growth[h, slot]) + growth
        if (
            growth > self._log_weight_limit / 2
            or error > self._column_error_limit
            or grown > MAX_COLUMN_GROWTH
        ):
            self._set_fresh_columns(slot, c, np.array([h]))
        else:
            # the paper's Hadamard update of one column: a[:, c] *= exp(s * delta * Q[:, j])
            column = s.pending_new_columns[h, slot]
            column *= self._xp.exp(s.Q64_T[h, j] * step)
            self._round_to_dtype(column)
            s.column_error[h, slot] = error
            s.column_growth[h, slot] = grown
            # relative growth, plus one subnormal step: a weight that rounds into the dtype's
            # subnormal range can round up by half a step, more than the relative 4 units
            grown_max = s.column_max[h, slot] * math.exp(growth) * (1 + 4 * self._unit)
            s.column_max[h, slot] = grown_max + self._subnormal_step
            if s.column_max[h, slot] > self._weight_limit:
                self._restabilize_column(h, slot)
        s.key_changed[slot] = True
        self._fold_if_full()

    def _apply_v(self, h: int, c: int, j: int, new_value: Any) -> None:
        """V[h, c, j] = new_value (validated). Runtime complexity: O(1) (O(H*n) or O(H*n*d)
        on a first touch), plus an amortized fold."""
        s = self._state
        slot = None if s.dormant else self._slot_for(c)
        old = abs(float(s.V64[h, c, j]))
        new = float(new_value)
        s.V[h, c, j] = new
        s.V64[h, c, j] = new
        if cert.note_new_value(s, h, j, old, abs(new)):
            self._raise_value_units()
        if slot is not None:
            s.pending_new_values[h, slot, j] = new / s.value_unit[h, j]
            s.value_changed[slot] = True
        self._fold_if_full()

    def _slot_for(self, c: int) -> int:
        """The pending slot of key/value row ``c``, opening one (O(H*n) / O(H*n*d)) if needed."""
        slot = self._state.slot_of.get(c)
        if slot is None:
            slot, _ = self._open_pending(c, None)
        return slot

    def _open_pending(self, c: int, new_key: Any) -> tuple[int, Any]:
        """Open a pending slot for row ``c`` with its folded column from the storage; with
        ``new_key: (H, d)`` the storage may compute that key's masked logits ``(H, n)`` in the
        same pass (else None is returned for them)."""
        column, error, growth, logits = self._storage.snapshot_column(c, self._snapshot_column, new_key)
        return self._open_slot(c, column, error, growth), logits

    def _open_slot(
        self, c: int, column: Any, error: np.ndarray, growth: np.ndarray, *, new_row: bool = False
    ) -> int:
        """A pending slot for row ``c`` whose folded weights are ``column: (H, n)`` (relative
        error ``error: (H,)``, growth since fresh ``growth: (H,)``) and whose folded values
        are today's (zero for a ``new_row``). Where a folding slot of row ``c`` is not folded
        yet, what is folded there is that slot's new column, which replaces ``column``."""
        s = self._state
        slot = self._free_slot()
        folding = s.folding_slot_of.get(c)
        if folding is not None:
            not_yet = slice(s.folded_rows, None)
            column[:, not_yet] = s.pending_new_columns[:, folding, not_yet]
            error = np.maximum(error, s.column_error[:, folding])
            growth = np.maximum(growth, s.column_growth[:, folding])
        values = self._xp.zeros((self._H, self.e), np.float64) if new_row else self._scaled_values(c)
        s.pending_old_columns[:, slot] = column
        s.pending_new_columns[:, slot] = column
        s.pending_old_values[:, slot] = values
        s.pending_new_values[:, slot] = values
        s.pending_rows[slot] = c
        s.key_changed[slot] = False
        s.value_changed[slot] = False
        s.column_deferred[slot] = False
        s.column_rent[slot] = 0.0
        s.column_error[:, slot] = error
        s.column_growth[:, slot] = growth
        s.column_max[:, slot] = self._xp.to_numpy(self._xp.amax(column, 1))
        s.slot_kind[slot] = LIVE
        s.slot_sequence[slot] = s.slots_opened
        s.slots_opened += 1
        if self._adaptive:
            s.upkeep_pending += policy.open_price(self._H, self.n)
        s.slot_of[c] = slot
        return slot

    def _free_slot(self) -> int:
        """The lowest free slot (one a spread fold released, else the next one, growing the
        slot buffers by doubling up to their capacity)."""
        s = self._state
        t = s.t
        if self._spread:  # only a spread fold leaves free slots below t
            free = np.flatnonzero(s.slot_kind[:t] == FREE)
            if free.size:
                return int(free[0])
        if t == s.sizes["S"]:
            self._resize(S=min(self._slot_capacity(), 2 * t))
        s.t = t + 1
        return t

    def _slot_capacity(self, threshold: int | None = None) -> int:
        """Slots that can be in use at once with the current threshold (or ``threshold``):
        the threshold; twice that under ``schedule="spread"`` (a folding generation and a
        pending one, each below the threshold when an update ends), plus room for the
        slots one operation opens before it checks the schedule."""
        threshold = self._state.threshold if threshold is None else threshold
        if self._batch_limit is not None:
            return max(threshold, self._batch_limit)
        return 2 * threshold + 2 if self._spread else threshold

    def _fold_if_full(self) -> None:
        """After each update operation: fold when the pending rows reach the threshold
        (``schedule="spread"``: advance the fold in progress, start the next one)."""
        s = self._state
        s.stats["updates"] += 1
        self._read_plan = None
        # head reads per update, averaged over about the last READ_RATE_HORIZON updates
        s.read_rate += (s.reads_since_update - s.read_rate) / READ_RATE_HORIZON
        s.reads_since_update = 0
        if self._adaptive and self._dormancy_rule():
            return
        self._apply_policy()
        if self._spread:
            self._spread_step()
        elif s.t >= (s.threshold if self._batch_limit is None else self._batch_limit):
            self._fold()

    def _fold(self) -> None:
        """Fold every pending row into N and Z (batched BLAS-3), then refresh rows whose
        drift is too big; a spread fold in progress is finished first. Runtime complexity:
        O(H*n*e*t) plus O(m*(d+e)) per refreshed row."""
        s, xp = self._state, self._xp
        if s.spread_length:
            self._fold_slice(self.n)
        slots = np.flatnonzero(s.slot_kind[: s.t] == LIVE)
        if not slots.size:
            return
        started = time.perf_counter()
        predicted = 0.0
        if self._adaptive:
            deferred, predicted = self._policy_plan()
            self._materialize(deferred)
        keys = s.pending_rows[slots]
        s.k_norms[:, keys] = cert.norms(xp.to_numpy(s.K64[:, keys]))
        values_moved = self._fold_rows(self._fold_plan(slots), slice(0, self.n))
        if self._adaptive:
            elapsed = time.perf_counter() - started
            self._fold_correction = policy.corrected(self._fold_correction, predicted, elapsed)
            s.upkeep_pending += predicted  # (the model's price, as every price Rule 4 compares)
        self._clear_pending()
        s.stats["folds"] += 1
        if values_moved:
            self._recompute_stale_maxima()
            if np.any(s.value_scale / 2 > s.value_max):
                self._full_refresh()  # values shrank: reset the value scales
                return
        self._refresh_drifted(slice(0, self.n))

    def _clear_pending(self) -> None:
        """No pending row any more (after a fold, or when going dormant): every slot free."""
        s = self._state
        s.slot_of.clear()
        s.slot_kind[: s.t] = FREE
        s.t = 0
        self._read_plan = None
        s.pending_rent = 0.0

    def _fold_plan(self, slots: np.ndarray) -> FoldPlan:
        """The :class:`FoldPlan` of ``slots`` (ascending)."""
        s = self._state
        keyed, valued = np.flatnonzero(s.key_changed[slots]), np.flatnonzero(s.value_changed[slots])
        key_slots, value_slots = slots[keyed], slots[valued]
        key_values = s.pending_new_values[:, _as_slice(key_slots)]
        value_deltas = s.pending_new_values[:, value_slots] - s.pending_old_values[:, value_slots]
        return FoldPlan(
            slots, key_slots, key_values, value_slots, value_deltas, _as_slice(slots), keyed, valued
        )

    def _fold_rows(self, plan: FoldPlan, rows: slice, *, clear: bool = False) -> bool:
        """Add the pending terms of ``plan``'s slots at query rows ``rows`` into N and Z,
        charge the rounding to the drift, and store their new columns there (dense storage);
        ``clear`` then zeroes their weights at those rows (a spread fold's slice: the slots
        stay in use for the other rows). Returns whether any value row moved.
        Runtime complexity: O(H*len(rows)*e*len(slots))."""
        s, xp = self._state, self._xp
        # parts of the slots keep every temporary below FOLD_BLOCK_ENTRIES float64s
        block = max(1, FOLD_BLOCK_ENTRIES // (self._H * max(rows.stop - rows.start, 1)))
        key_parts = _parts(plan.key_slots.size, block)
        value_parts = _parts(plan.value_slots.size, block)
        # each part beyond the first of its kind is one more rounded addition into N and Z
        extra = max(len(key_parts) - 1, 0) + max(len(value_parts) - 1, 0)
        # the folded slots' weights at these rows, (H, slots, rows): views where the slots
        # are a run, else gathered once here
        new_columns = s.pending_new_columns[:, plan.every, rows]
        old_columns = s.pending_old_columns[:, plan.every, rows]
        mass = xp.sum(new_columns, 1) + xp.sum(old_columns, 1)
        drift = 2 * cert.gamma(plan.slots.size + 3 + 2 * extra) * mass
        mismatch = self._storage.mismatch_error(
            s, old_columns, 1, self._mismatch_rate, slice(None), rows, plan.every
        )
        if not isinstance(mismatch, float) or mismatch:  # dense storage: exactly 0
            drift = drift + mismatch
        for positions in key_parts:
            part, slots = _as_slice(plan.key_positions[positions]), plan.key_slots[positions]
            delta = new_columns[:, part] - old_columns[:, part]
            self._add_transposed_products(delta, plan.key_values[:, positions], rows)
            s.Z[:, rows] += xp.sum(delta, 1)
            self._storage.commit_columns(
                s.pending_rows[slots],
                new_columns[:, part],
                s.column_error[:, slots],
                s.column_growth[:, slots],
                rows,
            )
        for positions in value_parts:
            part = _as_slice(plan.value_positions[positions])
            self._add_transposed_products(old_columns[:, part], plan.value_deltas[:, positions], rows)
        s.drift[:, rows] += drift + 2 * (1 + extra) * UNIT_ROUNDOFF * xp.abs(s.Z[:, rows])
        if clear:
            s.pending_new_columns[:, plan.every, rows] = 0.0
            s.pending_old_columns[:, plan.every, rows] = 0.0
        return bool(value_parts)

    def _refresh_drifted(self, rows: slice) -> None:
        """Recompute exactly the (head, row) pairs among ``rows`` whose drift is too big."""
        if self._certify:
            s = self._state
            heads, doubtful = self._xp.nonzero(
                ~(s.drift[:, rows] <= cert.DRIFT_FRACTION * self._tol * s.Z[:, rows])
            )
            if doubtful.size:
                self._refresh(heads, doubtful + rows.start)

    def _add_transposed_products(self, columns: Any, values: Any, rows: slice) -> None:
        """``N[h, rows] += columns[h]^T @ values[h]`` for every head: one BLAS-3 GEMM per head
        (numpy's stacked matmul does not call BLAS for a transposed operand)."""
        for h in range(self._H):
            self._state.N[h, rows] += columns[h].T @ values[h]

    # ------------------------------------------------------------------ spread folds
    def _spread_step(self) -> None:
        """``schedule="spread"``, after each update: fold the query rows of the fold in
        progress that are due (``n/spread_length`` per update, so that it ends after
        ``spread_length`` updates; gathered into slices of ``_slice_rows``); start a fold
        when the threshold is pending; fold everything at once only if twice the threshold
        is pending (operations that open several rows at once). Runtime complexity:
        O(H*e*t*n/spread_length) per update, amortized O(H*n*e)."""
        s = self._state
        if s.spread_length:
            s.spread_updates += 1
            due = min(self.n, -(-self.n * s.spread_updates // s.spread_length))
            if due - s.folded_rows >= self._slice_rows() or due == self.n:
                self._fold_slice(due)
        live = len(s.slot_of)
        if live >= 2 * s.threshold:
            self._fold()
        elif not s.spread_length and live >= s.threshold:
            self._start_spread()

    def _slice_rows(self) -> int:
        """Fewest query rows a slice of the fold in progress folds (``MIN_SLICE_FLOPS``)."""
        flops_per_row = 2 * self._H * self.e * self._state.spread_length
        return max(1, min(-(-MIN_SLICE_FLOPS // flops_per_row), self.n // 8))

    def _start_spread(self) -> None:
        """Freeze the pending rows as the folding generation: later changes to their key and
        value rows open new (live) slots, whose folded columns are these slots' new ones."""
        s = self._state
        live = np.flatnonzero(s.slot_kind[: s.t] == LIVE)
        s.slot_kind[live] = FOLDING
        s.folding_slot_of, s.slot_of = s.slot_of, {}
        s.folded_rows = s.spread_updates = 0
        s.spread_length = int(live.size)
        self._folding_plan = self._fold_plan(live)

    def _fold_slice(self, end: int) -> None:
        """Fold the folding slots into query rows ``folded_rows..end-1``; at ``end == n`` the
        fold is complete and its slots are released."""
        s, xp = self._state, self._xp
        rows = slice(s.folded_rows, end)
        if self._folding_plan is None:  # after a load, or values moved to new units
            self._folding_plan = self._fold_plan(np.flatnonzero(s.slot_kind[: s.t] == FOLDING))
        slots = self._folding_plan.slots
        values_moved = self._fold_rows(self._folding_plan, rows, clear=True)
        # the folded keys' norms, recomputed exactly (their bounds only grow between folds),
        # a share per slice rather than all at the last one: an exact norm is a sound bound
        # whenever it is taken, and a key changed later bounds its norm from this one
        keys = s.pending_rows[slots[slots.size * rows.start // self.n : slots.size * end // self.n]]
        s.k_norms[:, keys] = cert.norms(xp.to_numpy(s.K64[:, keys]))
        s.folded_rows = end
        s.stats["fold_slices"] += 1
        self._refresh_drifted(rows)
        if end < self.n:
            return
        s.slot_kind[slots] = FREE
        while s.t and s.slot_kind[s.t - 1] == FREE:
            s.t -= 1
        s.folding_slot_of = {}
        s.folded_rows = s.spread_updates = s.spread_length = 0
        self._folding_plan = None
        s.stats["folds"] += 1
        if values_moved:
            self._recompute_stale_maxima()
            if np.any(s.value_scale / 2 > s.value_max):
                # values shrank: the value scales are reset by a full refresh, which needs
                # nothing pending (the units may move down), so the pending rows fold first
                self._fold()
                if np.any(s.value_scale / 2 > s.value_max):  # that fold did not reset them
                    self._full_refresh()

    # ================================================================== answers
    @_metered
    def query_row(self, i: int) -> np.ndarray:
        """``O[..., i, :]`` for every head, a new ``(*batch, e)`` array.

        Runtime complexity: O(H*t*e).
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._rows_all_heads(np.array([i]))[..., 0, :]

    @_metered
    def query_rows(self, rows: Any, *, return_lse: bool = False) -> Any:
        """``O[..., rows, :]`` for every head, a new ``(*batch, len(rows), e)`` array.

        With ``return_lse=True``, also each row's log-sum-exp (natural log) of its
        visible scaled logits, ``(*batch, len(rows))`` (-inf for a row that sees no
        key): the ``(O, LSE)`` state that :func:`dynattn.merge_states` combines with
        attention over other keys. It is certified with the row: its absolute error is
        at most the row's relative denominator bound plus the logit rounding.
        Runtime complexity: O(H*len(rows)*t*e), vectorized.
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        return self._rows_all_heads(rows, check_flag("return_lse", return_lse))

    @_metered
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
        head_index = self._head_indices(heads, rows.size)
        return self._xp.astype(self._answer_entries(head_index, rows, cols), self._output_dtype)

    @_metered
    def output(self, *, return_lse: bool = False) -> Any:
        """The whole attention output ``O: (*batch, n, e)``, as a new array (with
        ``return_lse=True`` also ``LSE: (*batch, n)``, as in :meth:`query_rows`).

        Runtime complexity: O(H*n*t*e).
        """
        return self._rows_all_heads(np.arange(self.n), check_flag("return_lse", return_lse))

    def error_bound(self, i: int, *, head: Any = None) -> float:
        """Bound on ``|answer - exact| / max|V[:, j]|`` for answers about row ``i``.

        It is what :meth:`query` certifies: the incremental part is at most
        ``tol`` (otherwise the row is answered exactly), plus the error that a
        from-scratch float64 evaluation of the row from the stored inputs has
        (logit rounding, ``m``-term sums, rounding of weights to the dtype),
        plus the rounding of answers returned in the output dtype. 0 for a row
        that sees no key. Runtime complexity: O(t + e).
        """
        h = self._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        s = self._state
        if s.visible_keys[i] == 0:
            return 0.0  # the row sees no key: its answer is exactly 0
        self._prepare_read(h, i, 1, self.e)
        row_bound = float(self._row_bounds(np.array([h]), np.array([i]))[0][0])
        # per column, as entry queries decide: a column whose bound exceeds tol is answered
        # from an exact recomputation (error 0 here), the others incrementally
        incremental_by_column = cert.column_bound(
            np.float64(row_bound), self._column_ratio(np.full(self.e, h), np.arange(self.e))
        )
        incremental = float(np.where(incremental_by_column <= self._tol, incremental_by_column, 0.0).max())
        fresh = float(cert.fresh_error(self._logit_error(float(s.q_norm[h, i])), self._unit, self.m))
        output_rounding = self._xp.unit_roundoff(self._output_dtype)
        return (incremental + fresh) * (1 + output_rounding) + output_rounding

    def _rows_all_heads(self, rows: np.ndarray, return_lse: bool = False) -> Any:
        xp = self._xp
        out, lse = self._answer_rows(rows, return_lse)
        out = xp.astype(out.reshape(*self.batch_shape, rows.size, self.e), self._output_dtype)
        if not return_lse:
            return out
        return out, xp.astype(lse.reshape(*self.batch_shape, rows.size), self._output_dtype)

    def _answer_entry(self, h: int, i: int, j: int) -> float:
        """O[h, i, j]. Runtime complexity: O(t); O(m*(d+e)) when certification falls back;
        O(m*d) when dormant and the row is out of date."""
        s = self._state
        if s.visible_keys[i] == 0:
            return 0.0  # the row sees no key
        if s.dormant and s.refreshed_at[h, i] != s.slots_opened:
            return self._entry_from_scratch(h, i, j)
        self._prepare_read(h, i, 1, 1)
        t = s.t
        numerator = float(s.N[h, i, j])
        z = float(s.Z[h, i])
        new_sum = old_sum = 0.0
        if t:
            new_weights = s.pending_new_columns[h, :t, i]
            old_weights = s.pending_old_columns[h, :t, i]
            numerator += float(new_weights @ s.pending_new_values[h, :t, j]) - float(
                old_weights @ s.pending_old_values[h, :t, j]
            )
            new_sum = float(new_weights.sum())
            old_sum = float(old_weights.sum())
        denominator = z + new_sum - old_sum
        if self._certify:
            mismatch = 0.0
            if t:
                mismatch = float(
                    self._storage.mismatch_error(s, old_weights, 0, self._mismatch_rate, h, i, slice(0, t))
                )
            error = self._row_error(float(s.drift[h, i]), z + new_sum + old_sum, mismatch)
            bound = cert.row_bound(error, denominator, None) * (self._column_ratio_of(h, j) + 1)
            if not bound <= self._tol:
                return float(self._fallback(np.array([h]), np.array([i]))[0, j])
        return float(s.value_unit[h, j]) * (numerator / denominator) if denominator > 0 else 0.0

    def _entry_from_scratch(self, h: int, i: int, j: int) -> float:
        """O[h, i, j] of a dormant structure whose row i is out of date, computed as OnDemand
        does (one row of logits, one column of values) and left out of date: a float64
        evaluation of the stored inputs, which is what the certificate compares with.
        Runtime complexity: O(m*d)."""
        s, xp = self._state, self._xp
        self._count_read()
        self._charge_balance(policy.entry_price(self.m, self.d))
        logits = kernels.rows_dot(s.K[h : h + 1], s.Q64[h, i][None, :, None])
        logits = s.K64[h] @ s.Q64[h, i] if logits is None else logits[0, :, 0]  # (m,)
        logits *= self._scale
        visible = self._visibility(np.array([i]))
        if visible is not None:
            xp.fill_where_not_(logits, visible[0], -math.inf)
        weights = xp.exp_(logits - xp.amax(logits, 0))
        weights /= xp.sum(weights, 0)  # a convex combination of values: no overflow
        return float(weights @ s.V64[h, :, j])

    def _answer_entries(self, heads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """O[heads[k], rows[k], cols[k]]. Runtime complexity: O(k*t), vectorized."""
        s, xp = self._state, self._xp
        self._prepare_read(heads, rows, rows.size, 1)
        t = s.t
        numerator = xp.copy(s.N[heads, rows, cols])
        if t:
            new_w = s.pending_new_columns[heads, :t, rows]  # (k, t)
            old_w = s.pending_old_columns[heads, :t, rows]
            numerator += xp.einsum("kt,kt->k", new_w, s.pending_new_values[heads, :t, cols])
            numerator -= xp.einsum("kt,kt->k", old_w, s.pending_old_values[heads, :t, cols])
        row_bound, denominator = self._row_bounds(heads, rows)
        bound = cert.column_bound(xp.to_numpy(row_bound), self._column_ratio(heads, cols))
        seen = xp.asarray(s.visible_keys[rows] > 0)
        units = xp.asarray(s.value_unit[heads, cols])
        answer = xp.where(seen, units * (numerator / xp.where(denominator > 0, denominator, 1.0)), 0.0)
        doubtful = ~(bound <= self._tol)
        if doubtful.any():
            pairs, where = np.unique(np.stack([heads[doubtful], rows[doubtful]]), axis=1, return_inverse=True)
            exact = self._fallback(pairs[0], pairs[1])
            answer[xp.index(np.flatnonzero(doubtful))] = exact[where.ravel(), cols[doubtful]]
        return answer

    def _answer_rows(self, rows: np.ndarray, return_lse: bool = False) -> tuple[Any, Any]:
        """O[:, rows, :] for every head, ``(H, k, e)``, and (when asked, else None) each
        row's log-sum-exp ``(H, k)``. Runtime complexity: O(H*k*t*e): one einsum for few
        rows, one BLAS-3 GEMM per head for many."""
        s, xp = self._state, self._xp
        # a run of consecutive rows (all of them, for output()) is read through views
        index = _as_slice(rows)
        recomputed = self._prepare_read(slice(None), index, self._H * rows.size, self.e)
        if recomputed is not None:  # (dormant) every row read was recomputed just now
            return recomputed, self._lse(rows, s.Z[:, rows]) if return_lse else None
        t, H, k = s.t, self._H, rows.size
        numerator = s.N[:, index]
        if t:
            new_w = s.pending_new_columns[:, :t][:, :, index]  # (H, t, k)
            old_w = s.pending_old_columns[:, :t][:, :, index]
            new_v, old_v = s.pending_new_values[:, :t], s.pending_old_values[:, :t]
            if H * k * t * self.e < 1 << 20:
                numerator = numerator + xp.einsum("htk,hte->hke", new_w, new_v)
                numerator -= xp.einsum("htk,hte->hke", old_w, old_v)
            else:
                numerator = xp.copy(numerator)
                for h in range(H):
                    numerator[h] += new_w[h].T @ new_v[h]
                    numerator[h] -= old_w[h].T @ old_v[h]
        row_bound, denominator = self._row_bounds(slice(None), index)  # (H, k) each
        answer = numerator / xp.where(denominator > 0, denominator, 1.0)[:, :, None]
        answer *= xp.asarray(s.value_unit)[:, None, :]
        if not s.visible_keys[rows].all():
            answer[:, xp.index(np.flatnonzero(s.visible_keys[rows] == 0))] = 0.0
        row_bound = xp.to_numpy(row_bound).reshape(H, k)
        doubtful = ~(cert.column_bound(row_bound, self._head_ratios()[:, None]) <= self._tol)
        if doubtful.any():
            bad_heads, bad_rows = np.nonzero(doubtful)
            answer[bad_heads, bad_rows] = self._fallback(bad_heads, rows[bad_rows])
        if not return_lse:
            return answer, None
        if doubtful.any():  # recomputed rows: the pending terms cancel, the sum is Z
            denominator[bad_heads, bad_rows] = s.Z[bad_heads, rows[bad_rows]]
        return answer, self._lse(rows, denominator)

    def _lse(self, rows: np.ndarray, denominator: Any) -> Any:
        """Log-sum-exp of ``rows`` of every head ``(H, k)``, from their weight sums against
        ``mu`` (``denominator: (H, k)``); -inf for a row that sees no key."""
        s, xp = self._state, self._xp
        seen = xp.asarray(s.visible_keys[rows] > 0)[None, :]
        lse = s.mu[:, rows] + xp.log(xp.where(seen, denominator, 1.0))
        return xp.where(seen, lse, -math.inf)

    # ------------------------------------------------------------------ the certificate
    def _row_bounds(self, heads: Any, rows: Any) -> tuple[Any, Any]:
        """``r/(1-r)`` with ``r = E/den`` (inf when not certifiable) and ``den``, per (head,
        row); multiplied by ``rho_j + 1`` this bounds the error relative to max|V[:, j]|
        (:func:`dynattn.certificate.row_bound`). Rows that see no key are exact (0).

        ``heads, rows`` are index arrays of (head, row) pairs, shape ``(k,)`` out; or
        ``slice(None)`` and a row index (array or slice) for every head, ``(H, k)`` out."""
        s, xp = self._state, self._xp
        t = s.t
        z = s.Z[heads, rows]
        if t:
            new_sum = xp.sum(s.pending_new_columns[heads, :t, rows], 1)
            old_weights = s.pending_old_columns[heads, :t, rows]  # (k, t)
            old_sum = xp.sum(old_weights, 1)
            denominator, mass = z + new_sum - old_sum, z + new_sum + old_sum
            mismatch = self._storage.mismatch_error(
                s, old_weights, 1, self._mismatch_rate, heads, rows, slice(0, t)
            )
        else:  # nothing pending: the same sums over no slot, exactly 0 (a copy: z may be a view)
            denominator, mass, mismatch = xp.copy(z), z, 0.0
        error = self._row_error(s.drift[heads, rows], mass, mismatch)
        bound = cert.row_bound(error, denominator, xp.where)
        if not self._certify:  # (not bound * 0: an infinite bound would give NaN)
            bound = xp.zeros(tuple(bound.shape), np.float64)
        elif not s.visible_keys[rows].all():
            bound = xp.where(xp.asarray(s.visible_keys[rows] > 0), bound, 0.0)
        return bound, denominator

    def _row_error(self, drift: Any, mass: Any, mismatch: Any) -> Any:
        t = self._state.t
        rate = self._mass_rates.get(t)
        if rate is None:
            rate = self._mass_rates[t] = cert.mass_rate(self._column_error_limit, self._unit, t)
        return cert.row_error(drift, rate, mass, self._underflow_error, mismatch)

    def _logit_error(self, q_norm: Any) -> Any:
        return cert.logit_error(self.d, self._scale, q_norm, self._state.k_norm_max)

    def _mismatch_rate(self, heads: Any, rows: Any) -> Any:
        """The mismatch rate of (head, row) pairs (implicit storage; indices or slices)."""
        q_norm = self._state.q_norm[heads, rows]
        return cert.mismatch_rate(self._unit, self._column_error_limit, self._logit_error(q_norm))

    def _column_ratio_of(self, h: int, j: int) -> float:
        """Scalar :meth:`_column_ratio` for the entry-query hot path."""
        s = self._state
        if s.value_max_stale[h, j]:
            return float(self._column_ratio(np.array([h]), np.array([j]))[0])
        return float(cert.value_ratio(float(s.value_scale[h, j]), float(s.value_max[h, j]), None))

    def _column_ratio(self, heads: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``rho_j`` per (head, column) (:func:`dynattn.certificate.value_ratio`), after
        recomputing the stale maxima among them."""
        s = self._state
        stale = s.value_max_stale[heads, cols]
        if stale.any():
            for h, j in set(zip(heads[stale].tolist(), cols[stale].tolist(), strict=True)):
                s.value_max[h, j] = float(self._xp.amax(self._xp.abs(s.V64[h, :, j]), 0))
                s.value_max_stale[h, j] = False
        return cert.value_ratio(s.value_scale[heads, cols], s.value_max[heads, cols], np.where)

    def _head_ratios(self) -> np.ndarray:
        """Worst column ratio of each head ``(H,)``."""
        self._recompute_stale_maxima()
        s = self._state
        return cert.value_ratio(s.value_scale, s.value_max, np.where).max(axis=1)

    def _recompute_stale_maxima(self) -> None:
        """Make every ``value_max`` exact again (only the stale ones are recomputed; the
        others are exact, as :meth:`_check` asserts)."""
        s = self._state
        if s.value_max_stale.any():
            heads, cols = np.nonzero(s.value_max_stale)
            self._column_ratio(heads, cols)  # recomputes the stale maxima

    # ------------------------------------------------------------------ value units
    def _scaled_values(self, c: int) -> Any:
        """Value row ``c`` of every head in units of ``value_unit``, ``(H, e)`` float64."""
        return self._state.V64[:, c] / self._xp.asarray(self._state.value_unit)

    def _raise_value_units(self) -> None:
        """Move each column's value unit up to the power of two below its ``value_scale``.

        The value side of the state (``N`` and the pending values) is kept in units of
        a per-column power of two ``2**k <= value_scale < 2**(k+1)``, so no product or
        sum of weights and values can overflow for any finite ``V``. Rescaling by a
        power of two is exact except for results in float64's subnormal range, whose
        rounding (half a subnormal step) is added to the drift of the head's rows.
        Runtime complexity: O(H*(n + S)*e).
        """
        s = self._state
        units = np.maximum(s.value_unit, cert.power_of_two_units(s.value_scale))
        moved = units != s.value_unit
        if not moved.any():
            return
        if s.dormant:  # nothing is kept in units, and no row is current after an update
            s.value_unit[...] = units
            return
        factors = self._xp.asarray(s.value_unit / units)  # powers of two <= 1
        self._folding_plan = None  # it holds values in the old units
        s.pending_new_values *= factors[:, None, :]
        s.pending_old_values *= factors[:, None, :]
        for h in np.flatnonzero(moved.any(axis=1)).tolist():
            # only the moved heads' snapshot (usually one column moves, in one head)
            s.N[h] *= factors[h][None, :]
            s.drift[h] += float(np.finfo(np.float64).smallest_subnormal)
        s.value_unit[...] = units

    # ================================================================== row / token operations
    @_metered
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head; ``k: (*batch, d)``.

        Runtime complexity: O(H*n*d) (one column of scores per head), plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        k = self._valid_key_row("k", k)
        self._apply_key_row(c, k)
        self._fold_if_full()

    @_metered
    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head; ``v: (*batch, e)``.

        Runtime complexity: O(H*e) (O(H*n) or O(H*n*d) on a row's first touch), plus the fold.
        """
        c = check_index("c", c, self.m, axis="value rows, m")
        v = self._valid_row("v", v, self.e).reshape(self._H, self.e)
        self._apply_value_row(c, v)
        self._fold_if_full()

    @_metered
    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head; ``q: (*batch, d)``. Row i is recomputed exactly.

        Runtime complexity: O(H*m*(d+e)).
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        q = self._valid_query_row("q", q)
        self._apply_query_row(i, q)

    @_metered
    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows.

        All given rows are checked before anything changes. Runtime complexity:
        O(H*n*d) for k, O(H*e) for v, O(H*m*(d+e)) for q.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        if k is not None or v is not None:
            i = check_index("i", i, self.m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self.n, axis="query rows, n")
        q_row = None if q is None else self._valid_query_row("q", q)
        k_row = None if k is None else self._valid_key_row("k", k)
        v_row = None if v is None else self._valid_row("v", v, self.e).reshape(self._H, self.e)
        if k_row is not None:
            self._apply_key_row(i, k_row)
        if v_row is not None:
            self._apply_value_row(i, v_row)
        if q_row is not None:
            self._apply_query_row(i, q_row)
        self._fold_if_full()

    @_metered
    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``.

        The new rows get the next position (for ``causal``). With ``causal=True``
        a token is all three rows. A key takes the lowest index that
        ``delete_key`` released, else a new one at the end (capacity doubles:
        amortized O(1) reallocation). Returns ``(query_index, key_index)`` (None
        for what was not added). Runtime complexity: O(H*n*d) for a key that
        earlier queries see (one column of scores, folded later), O(H*d) for one
        they cannot see (causal), O(H*m*(d+e)) for a query (its row, exactly).
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        if self._causal and (q is None or k is None):
            raise ValueError("append: a causal structure appends whole tokens; expected q, k and v")
        q_row = None if q is None else self._valid_query_row("q", q)
        k_row = None if k is None else self._valid_key_row("k", k)
        v_row = None if v is None else self._valid_row("v", v, self.e).reshape(self._H, self.e)
        return self._append(q_row, k_row, v_row)

    def reserve(self, *, n: int | None = None, m: int | None = None) -> None:
        """Allocate room for ``n`` query rows and ``m`` keys in all (a size below today's
        is ignored), so that ``append`` up to them reallocates nothing: a decoding loop
        that knows its length pays for the memory here, not with one long append when
        the capacity doubles (docs/bench.md, "Decoding"). Under ``storage="auto"``,
        dense storage that would not fit ``memory_budget`` at that capacity switches to
        implicit first, as growth does. ``nbytes`` counts the room reserved.
        Runtime complexity: O(size of the state at the new capacity).
        """
        wanted = reserve_sizes(n, m)
        s = self._state
        capacity = s.capacity_after()
        # the slot buffers, which grow as slots open, in proportion to the slot capacity
        # at those sizes (so reserving never allocates slots no operation asked for)
        threshold = max(s.threshold, self._threshold_for_size(wanted.get("n"), wanted.get("m")))
        wanted["S"] = -(-capacity["S"] * self._slot_capacity(threshold) // self._slot_capacity())
        grow = {axis: size for axis, size in wanted.items() if size > capacity[axis]}
        if not grow:
            return
        self._fit_budget({**capacity, **grow})
        s.reserve(**grow)
        self._after_resize()

    @_metered
    def slide(self, k: Any, v: Any, *, window: int, sinks: int = 0, q: Any = None) -> tuple[int | None, int]:
        """One step of a sliding window: delete the oldest live keys so that, with the
        new key, ``window`` keys remain besides the first ``sinks`` live keys (attention
        sinks, never evicted); then append the key-value pair ``k, v`` (and the query row
        ``q``, required when ``causal``) into an evicted index.

        Everything is checked before anything changes. Memory stays bounded by the
        window plus the sinks. Returns ``append``'s ``(query_index, key_index)``.
        Runtime complexity: that of ``append``, plus O(H*n) per evicted key and
        O(m log m) to find the oldest.
        """
        window, sinks = as_index("window", window), as_index("sinks", sinks)
        if window < 1 or sinks < 0:
            raise ValueError(f"window, sinks: expected window >= 1 and sinks >= 0, got {window} and {sinks}")
        if self._causal and q is None:
            raise ValueError("slide: a causal structure appends whole tokens; expected q, k and v")
        q_row = None if q is None else self._valid_query_row("q", q)
        k_row = self._valid_key_row("k", k)
        v_row = self._valid_row("v", v, self.e).reshape(self._H, self.e)
        s = self._state
        live = np.flatnonzero(~s.key_free)
        # evict first, so that the new key reuses an evicted index (the capacity stays put)
        evict = live.size + 1 - window - sinks
        if evict > 0:
            by_age = live[np.argsort(s.key_pos[live], kind="stable")]
            for c in by_age[sinks : sinks + evict].tolist():
                self._hide_key(c, free=True)
                self._fold_if_full()
        query_index, key_index = self._append(q_row, k_row, v_row)
        assert key_index is not None
        return query_index, key_index

    def _append(
        self, q: np.ndarray | None, k: np.ndarray | None, v: np.ndarray | None
    ) -> tuple[int | None, int | None]:
        """``append`` after validation: a freed key index is reused before the state grows."""
        s = self._state
        position = s.next_position
        s.next_position += 1
        free = np.flatnonzero(s.key_free) if k is not None else np.zeros(0, np.int64)
        reuse = int(free[0]) if free.size else None
        # both axes grow in one pass (a new query row's state is set by its refresh below)
        self._resize(**{"m": self.m + (k is not None and reuse is None), "n": self.n + (q is not None)})
        key_index = query_index = None
        if k is not None and v is not None:
            key_index = self.m - 1 if reuse is None else reuse
            if reuse is None:
                self._append_key(k, v, position)
            else:
                self._reuse_key(reuse, k, v, position)
        if q is not None:
            query_index = self.n - 1
            s.query_pos[query_index] = position
            s.visible_keys[query_index] = self._count_visible_keys(np.array([query_index]))[0]
            self._apply_query_row(query_index, q)
        self._fold_if_full()
        return query_index, key_index

    @_metered
    def delete_key(self, c: int) -> None:
        """Delete key c: hide it from every query and release index c, which a later
        ``append`` may reuse for a new key (other indices never move; a key's causal
        position is not its index). Runtime complexity: O(H*n) (O(H*n*d) on a first touch
        in implicit storage), plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        self._hide_key(c, free=True)
        self._fold_if_full()

    @_metered
    def set_key_mask(self, c: int, visible: bool) -> None:
        """Show or hide key c (a key padding mask update; showing a deleted key keeps it).

        Runtime complexity: O(H*n*d) to show, O(H*n) to hide, plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        visible = check_flag("visible", visible)
        s = self._state
        if not visible:
            self._hide_key(c, free=bool(s.key_free[c]))
        elif not s.key_visible[c]:
            s.key_free[c] = False
            self._show_key(c, True)
        self._fold_if_full()

    def _hide_key(self, c: int, *, free: bool) -> None:
        """Hide key c (its weights become 0); ``free`` releases its index for reuse."""
        s = self._state
        s.key_free[c] = free
        if s.key_visible[c]:
            self._show_key(c, False)

    def _show_key(self, c: int, visible: bool) -> None:
        """Show or hide key c, renewing its pending column, whose folded weights are those of
        the old mask (dormant: the mask only)."""
        s = self._state
        slot = None if s.dormant else self._slot_for(c)
        self._set_key_visible(c, visible)
        if slot is not None:
            self._renew_column(slot, c)
            s.key_changed[slot] = True

    def _set_key_visible(self, c: int, visible: bool) -> None:
        s = self._state
        s.key_visible[c] = visible
        s.all_keys_visible = bool(s.key_visible.all())
        s.visible_keys[self._rows_seeing_position(int(s.key_pos[c]))] += 1 if visible else -1

    def delete_query(self, i: int) -> None:
        """Remove query row i; rows after it move up by one.

        Runtime complexity: O(H*n*(d+e+S)) (plus O(H*n*m) in dense storage) of
        memory moves; nothing is recomputed.
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        if self.n == 1:
            raise ValueError("delete_query: the structure needs at least one query row")
        s = self._state
        if i < s.folded_rows:
            s.folded_rows -= 1
        s.remove_index("n", i)
        self._after_resize()

    def _apply_key_row(self, c: int, k: np.ndarray) -> None:
        """K[:, c] = k (validated ``(H, d)``): one fresh weight column per head (dormant:
        the key only)."""
        s = self._state
        if s.dormant:
            self._write_key_row(c, k)
            return
        slot, new_logits = s.slot_of.get(c), None
        if slot is None:
            slot, new_logits = self._open_pending(c, None if self._adaptive else k)
        self._write_key_row(c, k)
        self._renew_column(slot, c, new_logits)
        s.key_changed[slot] = True

    def _apply_value_row(self, c: int, v: np.ndarray) -> None:
        """V[:, c] = v (validated ``(H, e)``)."""
        s = self._state
        if s.dormant:
            self._write_value_row(c, v)
            return
        slot = self._slot_for(c)
        self._write_value_row(c, v)
        s.pending_new_values[:, slot] = self._scaled_values(c)
        s.value_changed[slot] = True

    def _write_key_row(self, c: int, k: np.ndarray) -> None:
        """Store key row c of every head, ``k: (H, d)``, with its float64 copy and norms
        (no weights: the callers decide what the new key does to them)."""
        self._state.K[:, c] = self._xp.asarray(k)
        self._state.sync_float64_copies(K=c)
        self._note_key_row(c, k)

    def _write_value_row(self, c: int, v: np.ndarray) -> None:
        """Store value row c of every head, ``v: (H, e)``, with its float64 copy and the
        value-scale bookkeeping (no pending values: the callers decide)."""
        s = self._state
        old = np.abs(self._xp.to_numpy(s.V64[:, c]))
        s.V[:, c] = self._xp.asarray(v)
        s.sync_float64_copies(V=c)
        self._note_new_values(old, np.abs(v.astype(np.float64)))

    def _apply_query_row(self, i: int, q: np.ndarray) -> None:
        """Q[:, i] = q (validated ``(H, d)``); the row is recomputed exactly (dormant: when
        it is read)."""
        s, xp = self._state, self._xp
        s.Q[:, i] = xp.asarray(q)
        s.sync_float64_copies(Q=i)
        s.Q64_T[:, :, i] = s.Q64[:, i]
        q_norm = cert.norms(q)
        s.q_norm[:, i] = xp.asarray(q_norm)
        np.maximum(s.q_col_absmax, np.abs(q.astype(np.float64)), out=s.q_col_absmax)
        s.q_norm_max = max(s.q_norm_max, float(q_norm.max()))
        if s.dormant:
            s.refreshed_at[:, i] = s.slots_opened - 1  # out of date
            return
        self._refresh(None, np.array([i]))

    def _append_key(self, k: np.ndarray, v: np.ndarray, position: int) -> None:
        """A new key-value row: a pending row whose folded column and values are zero.

        When no query row can see it yet (``causal``: every row has an earlier
        position), its weight column is exactly zero and the snapshot is already
        exact without it: no pending row is opened and nothing of size n is
        computed; a query row appended later is computed exactly, key included.
        """
        s, H = self._state, self._H
        c = self.m - 1  # the caller made room (a new row: its stored key and value are 0)
        s.threshold = max(s.threshold, self._threshold_for_size())
        self._write_key_row(c, k)
        self._write_value_row(c, v)
        s.key_pos[c] = position
        self._set_key_visible(c, True)
        self._storage.append_column(c)
        if s.dormant or (self._causal and not np.any(self._rows_seeing_position(position))):
            return
        zero_column = self._xp.zeros((H, self.n), np.float64)
        slot = self._open_slot(c, zero_column, np.zeros(H), np.zeros(H), new_row=True)
        s.pending_new_values[:, slot] = self._scaled_values(c)
        self._renew_column(slot, c)
        s.key_changed[slot] = s.value_changed[slot] = True

    def _reuse_key(self, c: int, k: np.ndarray, v: np.ndarray, position: int) -> None:
        """A new key-value pair in the freed (hidden) index ``c`` at ``position``."""
        s = self._state
        # the folded column of a hidden key is 0; a pending slot must be opened under the old
        # mask (before the key shows again) so that it records exactly that
        slot = s.slot_of.get(c)
        s.key_free[c] = False
        s.key_pos[c] = position
        if s.dormant or (self._causal and not np.any(self._rows_seeing_position(position))):
            # no row sees it (its weights stay 0, pending or folded), or nothing is kept
            # (dormant): only the inputs change
            self._set_key_visible(c, True)
            self._write_key_row(c, k)
            if slot is None:
                self._write_value_row(c, v)
            else:
                self._apply_value_row(c, v)
            return
        if slot is None:
            self._slot_for(c)
        self._set_key_visible(c, True)
        self._apply_key_row(c, k)
        self._apply_value_row(c, v)

    def _note_key_row(self, c: int, k: np.ndarray) -> None:
        """Host bookkeeping after key row c became ``k: (H, d)``: norms and their max."""
        s = self._state
        norms = cert.norms(k)
        s.k_norms[:, c] = norms
        s.k_norm_max = max(s.k_norm_max, float(norms.max()))

    def _note_new_values(self, old: np.ndarray, new: np.ndarray) -> None:
        """Value-scale bookkeeping after a value row changed from ``|old|`` to ``|new|`` ``(H, e)``."""
        if cert.note_new_values(self._state, old, new):
            self._raise_value_units()

    def _count_visible_keys(self, rows: np.ndarray) -> np.ndarray:
        """How many keys each query row in ``rows`` sees, ``(len(rows),)``."""
        visible = self._visibility(rows)
        return np.full(rows.size, self.m) if visible is None else visible.sum(axis=1)

    def _rows_seeing_position(self, position: int) -> Any:
        """Index of the query rows that the causal mask lets see a key at ``position``."""
        return self._state.query_pos >= position if self._causal else slice(None)

    def _visibility(self, rows: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray | None:
        """Which keys (all, or ``keys``) each query row in ``rows`` sees, ``(len(rows),
        len(keys))``; None if all of them."""
        s = self._state
        if s.all_keys_visible and not self._causal:
            return None
        # every key's position is below next_position: rows at the latest one see them all
        if keys is None and s.all_keys_visible and rows.size:
            if s.query_pos[rows].min() >= s.next_position - 1:
                return None
        if keys is None:
            keys = np.arange(self.m)
        visible = np.broadcast_to(s.key_visible[keys], (rows.size, keys.size))
        if self._causal:
            visible = visible & (s.key_pos[keys][None, :] <= s.query_pos[rows][:, None])
        return None if visible.all() else visible

    # ================================================================== weight maintenance
    def _round_to_dtype(self, array: Any) -> None:
        """Round a float64 array to the storage dtype, in place (stays float64)."""
        if self._dtype != np.float64:
            array[...] = self._xp.astype(array, self._dtype)

    def _masked_logits(self, heads: np.ndarray, c: int) -> Any:
        """``s * Q K_c^T`` for ``heads`` as ``(len(heads), n)``, -inf where key c is hidden."""
        s = self._state
        whole = heads.size == self._H
        queries = s.Q if whole else s.Q[heads[0] : heads[0] + 1] if heads.size == 1 else None
        logits = None if queries is None else kernels.rows_dot(queries, s.K64[heads, c][:, :, None])
        if logits is not None:
            logits = logits[:, :, 0]
            logits *= self._scale
        elif heads.size == 1:
            logits = (s.K64[heads[0], c] @ s.Q64_T[heads[0]])[None] * self._scale
        else:
            columns = s.Q64_T if whole else s.Q64_T[heads]
            logits = (s.K64[heads, c][:, None, :] @ columns)[:, 0] * self._scale
        return self._hide_from_masked_rows(logits, c)

    def _hide_from_masked_rows(self, logits: Any, c: int) -> Any:
        """Set to -inf the logits ``(..., n)`` of the query rows that may not see key c."""
        s = self._state
        if not s.key_visible[c]:
            logits[...] = -np.inf
        elif self._causal:
            logits[..., s.query_pos < s.key_pos[c]] = -np.inf
        return logits

    def _snapshot_column(self, c: int, new_key: Any = None) -> tuple[Any, Any]:
        """Column ``c`` of every head as folded ``(H, n)``, recomputed from its logits; with
        ``new_key: (H, d)`` also that key's masked logits ``(H, n)``, in the same pass over Q."""
        s, xp = self._state, self._xp
        if new_key is None:
            old_logits, new_logits = self._masked_logits(np.arange(self._H), c), None
        else:
            keys = xp.zeros((self._H, 2, self.d), np.float64)
            keys[:, 0] = s.K64[:, c]
            keys[:, 1] = xp.asarray(new_key.astype(np.float64))
            logits_t = kernels.rows_dot(s.Q, xp.swap_last(keys))  # (H, n, 2)
            logits = keys @ s.Q64_T if logits_t is None else xp.swap_last(logits_t)
            logits *= self._scale
            logits = self._hide_from_masked_rows(logits, c)
            old_logits, new_logits = logits[:, 0], logits[:, 1]
        column = xp.exp(old_logits - s.mu)
        self._round_to_dtype(column)
        return column, new_logits

    def _set_fresh_columns(self, slot: int, c: int, heads: np.ndarray, logits: Any = None) -> None:
        """Pending column of row c for ``heads``, from its (masked) logits against the current
        ``mu`` (computed here unless given); moves ``mu`` up first where a weight would exceed
        the limit."""
        s, xp = self._state, self._xp
        assert heads.size == self._H or not s.column_deferred[slot], "a deferred column is computed whole"
        s.column_deferred[slot] = False
        if not s.key_visible[c]:  # a hidden key weighs 0 for every row
            s.pending_new_columns[heads, slot] = 0.0
            s.column_error[heads, slot] = s.column_growth[heads, slot] = s.column_max[heads, slot] = 0.0
            return
        if logits is None:
            logits = self._masked_logits(heads, c)
        exponent = logits - s.mu[heads]
        if float(xp.amax(xp.amax(exponent, 1), 0)) > self._log_weight_limit:
            which, rows = xp.nonzero(exponent > self._log_weight_limit)
            self._rescale_rows(heads[which], rows, logits[which, rows])
            exponent = logits - s.mu[heads]
        weights = xp.exp_(exponent)  # in place: no second (H, n) temporary
        self._round_to_dtype(weights)
        s.pending_new_columns[heads, slot] = weights
        s.column_error[heads, slot] = 0.0
        s.column_growth[heads, slot] = 0.0
        s.column_max[heads, slot] = xp.to_numpy(xp.amax(weights, 1))
        s.stats["fresh_columns"] += 1

    def _renew_column(self, slot: int, c: int, logits: Any = None) -> None:
        """The pending column of row c after its key or visibility changed: under
        ``tau="auto"`` deferred (O(1)) while reads are rare, else computed now from
        ``logits`` (or fresh, O(H*n*d))."""
        if self._adaptive:
            price = policy.column_price(self._H, self.n, self.d)
            if self._reads_are_rare(price):
                self._defer_column(slot)
                return
            self._state.upkeep_pending += price
        self._set_fresh_columns(slot, c, np.arange(self._H), logits)

    def _reads_are_rare(self, price_now: float) -> bool:
        """Rule 3 (docs/policy.md): whether a changed key's column should be deferred rather
        than kept current at ``price_now`` (an entry update in place, or the whole column of
        a replaced key): when the head reads expected per update (``read_rate``) would
        pay less for the deferred columns, one more included, than that costs now."""
        s = self._state
        deferred = int(np.count_nonzero(s.column_deferred[: s.t])) + 1
        read_price = policy.deferred_read_price(deferred, self.m, self.d) / deferred
        return s.read_rate * read_price < price_now

    def _defer_column(self, slot: int) -> None:
        """Stop storing the slot's new column: reads compute its weights where they need
        them, and pay for that in ``column_rent`` (kept if it was deferred already)."""
        s = self._state
        if not s.column_deferred[slot]:
            s.column_deferred[slot] = True
            s.column_rent[slot] = 0.0
            s.stats["columns_deferred"] += 1

    def _materialize(self, slots: np.ndarray) -> None:
        """Compute the deferred new columns of ``slots`` for every head, one GEMM per head
        (``K_C Q^T``), moving ``mu`` up first where a weight would exceed the limit.
        Runtime complexity: O(H*n*d*len(slots))."""
        if not slots.size:
            return
        s, xp = self._state, self._xp
        started = time.perf_counter()
        keys = s.pending_rows[slots]
        every_row = np.arange(self.n)
        visible = self._visibility(every_row, keys)
        for h in range(self._H):
            logits = s.K64[h, keys] @ s.Q64_T[h]  # (len(slots), n)
            logits *= self._scale
            if visible is not None:
                xp.fill_where_not_(logits, visible.T, -math.inf)
            weights = self._stabilized_weights(logits, np.full(self.n, h), every_row)
            s.pending_new_columns[h, xp.index(slots)] = weights
            s.column_max[h, slots] = xp.to_numpy(xp.amax(weights, 1))
        s.column_error[:, slots] = s.column_growth[:, slots] = 0.0
        s.column_deferred[slots] = False
        self._read_plan = None
        s.stats["columns_materialized"] += int(slots.size)
        predicted = slots.size * policy.column_price(self._H, self.n, self.d)
        s.upkeep_pending += predicted
        self._column_correction = policy.corrected(
            self._column_correction, predicted, time.perf_counter() - started
        )

    def _count_read(self, heads: int = 1) -> None:
        """An answer call reading ``heads`` heads: one read in the stats, ``heads`` in the
        head reads per update (``read_rate``: the policy prices deferred columns per head
        read, as a read computes them head by head)."""
        s = self._state
        s.stats["reads"] += 1
        s.reads_since_update += heads

    def _prepare_read(self, heads: Any, rows: Any, pairs: int, width: int) -> Any:
        """Before a read of ``pairs`` (head, row) pairs and ``width`` output columns (``heads,
        rows`` as in :meth:`_row_bounds`, or two ints for one pair), under ``tau="auto"``:
        charge the read's rents (to the pending rows and to each deferred column) and
        compute the deferred columns' weights at the rows read. A read decides nothing:
        what the rents buy is done at the next update (:meth:`_apply_policy`), so that no
        read changes what ``error_bound`` promised for another row (docs/policy.md).
        Returns the rows read, ``(H, k, e)``, where a dormant structure recomputed every
        one of them (the answer, exactly as the snapshot would give it), else None."""
        s = self._state
        if not self._adaptive:  # (read_rate is the policy's: a fixed tau only counts the read)
            self._count_read()
            return None
        if isinstance(heads, slice):
            head_count = len(range(*heads.indices(self._H)))
        else:
            head_count = 1 if isinstance(heads, int) else int(np.unique(heads).size)
        self._count_read(head_count)
        if self._meter is not None:
            self._meter.units = pairs
        t = s.t
        recomputed = self._charge_dormancy(heads, rows, pairs, width)
        if t == 0:
            return recomputed
        deferred, _ = self._policy_plan()
        rent = policy.pending_rent(pairs, t, width, deferred.size, self.d)
        s.pending_rent += rent
        self._charge_balance(rent)  # what the pending rows cost this read is upkeep too
        if deferred.size:
            s.column_rent[deferred] += policy.column_rent(pairs, self.d, deferred.size, head_count)
            if isinstance(heads, int):  # an entry read: one (head, row) pair
                heads, rows = np.array([heads]), np.array([rows])
            self._fill_deferred(heads, rows, deferred)
        return None

    # ------------------------------------------------------------------ dormancy (tau="auto")
    def _charge_dormancy(self, heads: Any, rows: Any, pairs: int, width: int) -> Any:
        """A read's part in Rule 4 (docs/policy.md): dormant, it recomputes the rows it
        reads that are out of date and charges their price to the balance; awake, it saves
        what recomputing its ``pairs`` rows would cost, which the balance loses (the rent
        the pending rows charge the read is added back by :meth:`_prepare_read`). Returns
        the recomputed rows ``(H, k, e)`` where every head of every row read was out of
        date (the usual dormant row read), else None."""
        s = self._state
        if not s.dormant:
            if isinstance(heads, int) and width == 1:  # dormant, an entry is computed alone
                saved = policy.entry_price(self.m, self.d)
            else:
                saved = policy.row_price(pairs, self.m, self.d, self.e)
            self._charge_balance(-saved)
            return None
        recomputed = None
        if isinstance(heads, slice):  # every head, rows an index array or a slice
            row_array = np.arange(self.n)[rows]
            stale = s.refreshed_at[:, row_array] != s.slots_opened
            count = int(np.count_nonzero(stale))
            if count == stale.size:  # one batched pass, whose outputs are the answer
                recomputed = self._refresh(None, row_array).reshape(self._H, row_array.size, self.e)
            elif count:
                stale_heads, where = np.nonzero(stale)
                self._refresh(stale_heads, row_array[where])
        else:  # (head, row) pairs, or one pair as two ints
            heads, rows = np.atleast_1d(heads), np.atleast_1d(rows)
            stale = s.refreshed_at[heads, rows] != s.slots_opened
            stale_heads, stale_rows = np.unique(np.stack([heads[stale], rows[stale]]), axis=1)
            count = stale_heads.size
            if count:
                self._refresh(stale_heads, stale_rows)
        if count:
            self._charge_balance(policy.row_price(count, self.m, self.d, self.e))
        return recomputed

    def _dormancy_rule(self) -> bool:
        """Rule 4 at an update (docs/policy.md): keeping the snapshot current costs upkeep
        (slot openings, in-place column updates, whole columns, folds, the pending rows'
        rent at reads), which reads may save many times over. The balance adds up what
        the current choice has cost more than the other since it last paid off (never
        below 0); when it reaches the price of a full refresh, the structure switches:
        awake, it drops its pending rows and goes dormant; dormant, it wakes with a full
        refresh. A dormant update saves the upkeep per update of the last awake stretch (its
        whole length: folds are rare and dear, so a short average would be mostly noise).
        Returns whether the structure is dormant after the update (then nothing else is to
        be done for it)."""
        s = self._state
        if s.dormant:
            s.slots_opened += 1  # every row's snapshot is out of date now
            if s.dormancy_balance > 0.0:  # (the common case, 0, costs nothing more)
                upkeep_rate = (  # frozen while dormant; the model's until the structure was awake
                    s.upkeep_total / s.awake_updates
                    if s.awake_updates
                    else policy.awake_update_estimate(self._H, self.n, self.d, self.e)
                )
                self._charge_balance(-upkeep_rate)
                if s.dormancy_balance >= self._switch_price():
                    self._wake()
            return s.dormant
        upkeep, s.upkeep_pending = s.upkeep_pending + policy.awake_update_price(), 0.0
        s.upkeep_total += upkeep
        s.awake_updates += 1
        self._charge_balance(upkeep)
        if s.dormancy_balance >= self._switch_price():
            self._go_dormant()
            return True
        return False

    def _go_dormant(self) -> None:
        """Drop the pending rows and keep no snapshot: updates change only the inputs, and
        reads recompute the rows they read (O(m*(d+e)) each, as OnDemand does)."""
        s = self._state
        self._clear_pending()
        s.dormant = True
        s.dormancy_balance = 0.0
        s.slots_opened += 1  # no row's snapshot is current
        s.stats["dormant_periods"] += 1
        self._start_stretch(dormant=True)

    def _wake(self) -> None:
        """End dormancy: every row recomputed exactly. Runtime complexity: O(H*n*m*(d+e))."""
        s = self._state
        s.dormant = False
        s.dormancy_balance = s.upkeep_total = 0.0
        s.awake_updates = 0
        started, predicted = policy.now(), policy.wake_price(self._H, self.n, self.m, self.d, self.e)
        self._full_refresh()
        elapsed = policy.now() - started
        self._wake_correction = policy.corrected(self._wake_correction, predicted, elapsed)
        if self._meter is not None:
            self._meter.switch_seconds += elapsed
        self._start_stretch(dormant=False)
        s.stats["wakes"] += 1

    def _switch_price(self) -> float:
        """Rule 4's price of switching: a full refresh, corrected by the measured wakes."""
        return policy.wake_price(self._H, self.n, self.m, self.d, self.e) * self._wake_correction

    def _charge_balance(self, delta: float) -> None:
        """Add the model's price difference ``delta`` (seconds) to Rule 4's balance, or,
        while a public operation is timed, to its model delta (:meth:`_end_meter`)."""
        if self._meter is not None:
            self._meter.model_delta += delta
        else:
            s = self._state
            s.dormancy_balance = max(0.0, s.dormancy_balance + delta)

    def _start_stretch(self, *, dormant: bool) -> None:
        """A new stretch in one state: its operations are measured from now on (the other
        state's, from its last stretch, stay as they were)."""
        for key in [key for key in self._operation_costs if key[0] == dormant]:
            del self._operation_costs[key]

    def _end_meter(self, name: str) -> None:
        """Rule 4 after the timed public operation ``name``: the balance gains its measured
        seconds in this state less what the other state took for the same operation (per
        unit, over its last stretch), or the model's difference where the other state has
        not run it on ``policy.MIN_METERED_UNITS`` units. An operation that switched state
        changes nothing (the balance restarted)."""
        meter, s = self._meter, self._state
        assert meter is not None
        self._meter = None
        if s.dormant != meter.dormant:
            return
        elapsed = policy.now() - meter.started - meter.switch_seconds
        mine = self._operation_costs.setdefault((meter.dormant, name), [0.0, 0.0])
        mine[0] += elapsed
        mine[1] += meter.units
        other = self._operation_costs.get((not meter.dormant, name))
        if other is not None and other[1] >= policy.MIN_METERED_UNITS:
            delta = elapsed - other[0] / other[1] * meter.units
        else:
            delta = meter.model_delta
        s.dormancy_balance = max(0.0, s.dormancy_balance + delta)

    def _policy_plan(self) -> tuple[np.ndarray, float]:
        """The deferred slots and the fold's predicted price (before the measured
        correction), kept until they change."""
        if self._read_plan is None:
            s, t = self._state, self._state.t
            deferred = np.flatnonzero(s.column_deferred[:t])
            products = int(np.count_nonzero(s.key_changed[:t]) + np.count_nonzero(s.value_changed[:t]))
            price = policy.fold_price(self._H, self.n, self.d, self.e, products, deferred.size)
            self._read_plan = deferred, price
        return self._read_plan

    def _apply_policy(self) -> None:
        """At an update, under ``tau="auto"``: fold when the rent that reads charged the
        pending rows since the last fold has reached the fold's price; else compute whole
        the deferred columns whose rent has reached their price (docs/policy.md)."""
        s = self._state
        if not self._adaptive or s.t == 0:
            return
        deferred, price = self._policy_plan()
        if s.pending_rent >= price * self._fold_correction:
            self._fold()
            return
        if deferred.size:
            column_price = policy.column_price(self._H, self.n, self.d) * self._column_correction
            bought = deferred[s.column_rent[deferred] >= column_price]
            if bought.size:
                self._materialize(bought)

    def _fill_deferred(self, heads: Any, rows: Any, slots: np.ndarray) -> None:
        """Write the current weights of the deferred columns ``slots`` at the (head, row)
        pairs read into ``pending_new_columns`` (the rest of those columns is left stale).
        Runtime complexity: O(pairs*len(slots)*d)."""
        s, xp = self._state, self._xp
        keys = s.pending_rows[slots]
        if isinstance(heads, slice):
            row_array = np.arange(self.n)[rows]
            groups = [(h, row_array) for h in range(self._H)]
        elif heads.size == 1:  # an entry query
            groups = [(int(heads[0]), rows)]
        else:
            groups = [(h, np.unique(rows[heads == h])) for h in np.unique(heads).tolist()]
        # many deferred keys: one product with all of K (as OnDemand does) instead of a gather
        whole = 3 * keys.size >= self.m
        for h, part in groups:
            if whole:
                logits_t = kernels.rows_dot(s.K[h : h + 1], xp.swap_last(s.Q64[h, part])[None])
                if logits_t is not None:  # (1, m, len(part))
                    logits = logits_t[0, keys].T
                else:
                    logits = (s.Q64[h, part] @ xp.swap_last(s.K64[h]))[:, xp.index(keys)]
            else:
                logits = s.Q64[h, part] @ xp.swap_last(s.K64[h, keys])  # (len(part), len(slots))
            logits *= self._scale
            visible = self._visibility(part, keys)
            if visible is not None:
                xp.fill_where_not_(logits, visible, -math.inf)
            weights = self._stabilized_weights(xp.swap_last(logits), np.full(part.size, h), part)
            where = xp.index(slots[:, None]), xp.index(part[None, :])
            s.pending_new_columns[h, where[0], where[1]] = weights

    def _stabilized_weights(self, logits: Any, heads: np.ndarray, rows: np.ndarray) -> Any:
        """``exp(logits - mu)`` rounded to the dtype, for ``logits: (k, p)``: k logits of each
        of the p (head, row) pairs ``heads, rows: (p,)``. A pair whose weight would exceed
        the limit has its stabilizer moved up first (:meth:`_rescale_rows`)."""
        s, xp = self._state, self._xp
        exponent = logits - s.mu[heads, rows][None, :]
        top = xp.to_numpy(xp.amax(exponent, 0))
        if top.max(initial=-math.inf) > self._log_weight_limit:
            over = np.flatnonzero(top > self._log_weight_limit)
            self._rescale_rows(heads[over], rows[over], xp.amax(logits[:, xp.index(over)], 0))
            exponent = logits - s.mu[heads, rows][None, :]
        weights = xp.exp_(exponent)
        self._round_to_dtype(weights)
        return weights

    def _restabilize_column(self, h: int, slot: int) -> None:
        """A multiplicatively updated column may hold weights above the limit: move those rows' mu."""
        s, xp = self._state, self._xp
        column = s.pending_new_columns[h, slot]
        (rows,) = xp.nonzero(column > self._weight_limit)
        if rows.size:
            self._rescale_rows(np.full(rows.size, h), rows, s.mu[h, rows] + xp.log(column[rows]))
        s.column_max[h, slot] = float(xp.amax(column, 0))

    def _rescale_rows(self, heads: np.ndarray, rows: np.ndarray, new_mu: Any) -> None:
        """Raise the stabilizer of (head, row) pairs to ``new_mu``; everything stored for them
        is multiplied by ``exp(mu - new_mu) <= 1`` and the roundings this does are charged to
        the drift (:func:`dynattn.certificate.rescale_drift`). Runtime complexity:
        O(m + e + S) per row; O(m*(d+e)) for a row whose stabilizer jumps so far that the
        factor would be subnormal (its old weights are negligible: it is recomputed)."""
        s, xp = self._state, self._xp
        shift = new_mu - s.mu[heads, rows]  # >= 0
        far = xp.to_numpy(shift) > FAR_SHIFT
        if far.any():
            self._refresh(heads[far], rows[far])
            heads, rows, new_mu, shift = heads[~far], rows[~far], new_mu[~far], shift[~far]
        factors = xp.exp(-shift)
        s.N[heads, rows] *= factors[:, None]
        s.Z[heads, rows] *= factors
        pending_mass: Any = 0
        for block in (s.pending_new_columns, s.pending_old_columns):
            part = block[heads, :, rows] * factors[:, None]  # (k, S)
            self._round_to_dtype(part)
            block[heads, :, rows] = part
            pending_mass = pending_mass + xp.sum(part, 1)
        self._storage.rescale_rows(heads, rows, factors)
        s.drift[heads, rows] = cert.rescale_drift(
            s.drift[heads, rows],
            s.Z[heads, rows],
            pending_mass,
            factors,
            shift,
            self._unit,
            self._subnormal_error,
        )
        s.mu[heads, rows] = new_mu
        s.stats["rows_rescaled"] += int(rows.size)

    def _full_refresh(self) -> None:
        """Recompute every row exactly and reset the value scales (init, or values shrank)."""
        self._reset_value_tables()
        self._refresh(None, np.arange(self.n))
        self._state.stats["full_refreshes"] += 1

    def _reset_value_tables(self) -> None:
        """Value maxima, scales and units, and key norms, exact for today's inputs (with no
        pending row, and every row about to be recomputed or out of date). O(H*m*(d+e))."""
        s, xp = self._state, self._xp
        s.value_max[...] = xp.to_numpy(xp.amax(xp.abs(s.V64), 1))
        s.value_max_stale[...] = False
        s.value_scale[...] = s.value_max
        # every row is recomputed or out of date (and nothing is pending): units may move down
        s.value_unit[...] = cert.power_of_two_units(s.value_scale)
        s.k_norms[...] = cert.norms(xp.to_numpy(s.K64))
        s.k_norm_max = float(s.k_norms.max())

    def _fallback(self, heads: np.ndarray, rows: np.ndarray) -> Any:
        self._state.stats["query_fallbacks"] += int(rows.size)
        return self._refresh(heads, rows)

    def _refresh(self, heads: np.ndarray | None, rows: np.ndarray) -> Any:
        """Recompute (head, row) pairs exactly from Q, K, V; return their outputs ``(k, e)``
        (``heads=None``: every head of ``rows``, in one batched pass, as ``(H * k, e)``).

        The snapshot of each row is rebuilt so that the pending terms cancel
        (old and new weight columns both set to today's weights; values as
        folded), in every slot in use at the row (a folding slot is not, where it
        is folded already). Runtime complexity: O(m*(d+e)) per row.
        """
        s, xp = self._state, self._xp
        t, H = s.t, self._H
        in_use = np.flatnonzero(s.slot_kind[:t] != FREE)
        live = np.flatnonzero(s.slot_kind[:t] == LIVE) if s.spread_length else in_use
        if heads is not None and _every_head_of_the_same_rows(heads, rows, H):
            heads, rows = None, rows[: rows.size // H]  # (fallbacks, drift refreshes)
        # (heads, positions in the output (H', k), their rows (k,))
        groups: list[tuple[slice, np.ndarray, np.ndarray]] = []
        if heads is None:  # every head of the same rows: one batched pass
            pairs = H * rows.size
            groups.append((slice(None), np.arange(pairs).reshape(H, rows.size), rows))
        else:
            pairs = rows.size
            for h in np.unique(heads).tolist():
                positions = np.nonzero(heads == h)[0]
                groups.append((slice(h, h + 1), positions[None], rows[positions]))
        out = xp.zeros((pairs, self.e), np.float64)
        for head_block, positions, part in groups:
            folded = part < s.folded_rows
            for group, slots in ((~folded, in_use), (folded, live)):
                if group.any():
                    where, slots_used = positions[:, group], _as_slice(slots)
                    self._refresh_rows(head_block, where, part[group], slots_used, slots.size, out)
        s.stats["rows_refreshed"] += pairs
        return out

    def _refresh_rows(
        self, head_block: slice, positions: np.ndarray, rows: np.ndarray, slots: Any, count: int, out: Any
    ) -> None:
        """:meth:`_refresh` of rows ``rows: (k,)`` of every head in ``head_block`` (a slice of
        heads, H' of them), whose pending terms are those of ``slots`` (``count`` of them; a
        slice or an index array); their outputs go to ``out[positions]``, ``positions:
        (H', k)``."""
        s, xp = self._state, self._xp
        hs = head_block
        heads = len(range(*hs.indices(self._H)))
        pending_rows = s.pending_rows[slots]
        # every slot in use, flagged or not (an appended row is pending before its flags
        # are set, and its folded values are 0): exactly 0 where the values did not change
        value_delta = s.pending_new_values[hs, slots] - s.pending_old_values[hs, slots]  # (H', count, e)
        units = xp.asarray(s.value_unit[hs])  # (H', e)
        # the value side is kept in units of value_unit (no overflow for any finite V);
        # for units in a moderate range the product is divided instead of all m rows,
        # which is the same float64 computation scaled by powers of two
        moderate = UNIT_RANGE[0] <= s.value_unit[hs].min() and s.value_unit[hs].max() <= UNIT_RANGE[1]
        values = s.V64[hs] if moderate else s.V64[hs] / units[:, None, :]
        block = max(1, REFRESH_BLOCK_ENTRIES // (self.m * heads))
        # transposed, (H', m, rows): one key's weights at these rows are contiguous, as the
        # dense weights and the pending columns store them; one buffer, worked on in place
        # and kept between calls, since a block is up to REFRESH_BLOCK_ENTRIES float64s and
        # every temporary of that size is fresh memory to fault in
        buffer = self._scratch((heads, self.m, min(block, rows.size)))
        for start in range(0, rows.size, block):
            where = positions[:, start : start + block]
            part = rows[start : start + block]
            columns = _as_slice(part)
            queries_t, into = s.Q64_T[hs][:, :, columns], buffer[:, :, : part.size]
            weights_t = kernels.rows_dot(s.K[hs], queries_t, into)
            if weights_t is None:
                weights_t = xp.matmul_into(s.K64[hs], queries_t, into)
            weights_t *= self._scale
            visible = self._visibility(part)
            if visible is not None:
                xp.fill_where_not_(weights_t, visible.T[None], -math.inf)
            if 1 < part.size <= ROW_MAJOR_ROWS:
                # the same (H', m, rows) values, stored row after row: the passes over m below
                # then run along contiguous memory (numpy's reductions over a long axis with a
                # short contiguous one are an order of magnitude slower)
                weights_t = xp.swap_last(xp.copy(xp.swap_last(weights_t)))
            mu = xp.amax(weights_t, 1)  # (H', rows)
            mu = xp.where(xp.isfinite(mu), mu, 0.0)
            weights_t -= mu[:, None, :]
            xp.exp_(weights_t)
            self._round_to_dtype(weights_t)
            z = xp.sum(weights_t, 1)
            full = kernels.weighted_rows(weights_t, s.V[hs]) if moderate else None
            if full is None:
                full = xp.swap_last(weights_t) @ values  # (H', rows, e)
            if moderate:
                full /= units[:, None, :]
            out[xp.index(where)] = full / xp.where(z > 0, z, 1.0)[:, :, None] * units[:, None, :]
            if count:
                current = weights_t[:, xp.index(pending_rows)]  # (H', count, rows)
                full -= xp.swap_last(current) @ value_delta
            s.mu[hs, part] = mu
            s.Z[hs, part] = z
            s.N[hs, part] = full
            s.drift[hs, part] = 4 * UNIT_ROUNDOFF * z
            s.refreshed_at[hs, part] = s.slots_opened
            if count:
                if isinstance(slots, slice):
                    s.pending_new_columns[hs, slots][:, :, columns] = current
                    s.pending_old_columns[hs, slots][:, :, columns] = current
                else:
                    where_slots, where_rows = xp.index(slots[:, None]), xp.index(part[None, :])
                    s.pending_new_columns[hs, where_slots, where_rows] = current
                    s.pending_old_columns[hs, where_slots, where_rows] = current
                largest = xp.to_numpy(xp.amax(current, 2))
                s.column_max[hs, slots] = np.maximum(s.column_max[hs, slots], largest)
            if not s.dormant:  # (dormant, stored weights wait for the wake's full refresh)
                self._storage.set_rows(hs, columns, weights_t)

    def _scratch(self, shape: tuple[int, ...]) -> Any:
        """A float64 array of ``shape`` (contents undefined) over the reused refresh
        memory, valid until the next call; fresh memory beyond ``SCRATCH_ENTRIES``."""
        size = math.prod(shape)
        if size > SCRATCH_ENTRIES:
            return self._xp.zeros(shape, np.float64)
        if self._refresh_scratch is None or self._refresh_scratch.shape[0] < size:
            self._refresh_scratch = self._xp.zeros((size,), np.float64)
        return self._refresh_scratch[:size].reshape(shape)

    # ================================================================== properties
    @property
    def tau(self) -> float | str:
        """Laziness exponent, or ``"auto"`` for the online policy."""
        return "auto" if self._adaptive else self._tau

    @property
    def threshold(self) -> int:
        """Pending key/value rows that trigger a fold, ``ceil(m**tau)``."""
        return self._state.threshold

    @property
    def pending(self) -> int:
        """Key/value rows changed since the last fold (since the fold in progress started,
        under ``schedule="spread"``)."""
        return len(self._state.slot_of)

    @property
    def schedule(self) -> str:
        """``"amortized"`` or ``"spread"`` (when a fold's work is done)."""
        return "spread" if self._spread else "amortized"

    @property
    def storage(self) -> str:
        """Storage strategy in use (``"dense"`` or ``"implicit"``)."""
        return self._storage.name

    @property
    def tol(self) -> float:
        """Certification tolerance, relative to ``max|V[:, j]|``."""
        return self._tol

    @property
    def certify(self) -> bool:
        """Whether answers are certified (and doubtful rows recomputed)."""
        return self._certify

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
        return self._state.key_visible.copy()

    @property
    def stats(self) -> dict[str, int]:
        """Counters since construction: folds, rows refreshed exactly, query fallbacks,
        full refreshes, rows rescaled (stabilizer moved), fresh column computations,
        storage switches, columns deferred and columns materialized (``tau="auto"``),
        update operations, reads (answer calls), fold slices (``schedule="spread"``), and
        the periods the structure was dormant and the times it woke (``tau="auto"``)."""
        return dict(self._state.stats)

    @property
    def policy(self) -> str:
        """What the fold schedule is doing now and why, in words (``docs/policy.md``)."""
        s = self._state
        t, reads, updates = len(s.slot_of), s.stats["reads"], s.stats["updates"]
        ratio = f"{reads / updates:.3g}" if updates else "no updates yet"
        if self._spread:
            folding = (
                f"a fold of {len(s.folding_slot_of)} rows is {s.folded_rows} of {self.n} query rows done"
                if s.spread_length
                else "no fold in progress"
            )
            return (
                f"fixed tau={self._tau:g}, spread: a fold starts at {s.threshold} pending rows and "
                f"is done a slice of query rows per update ({t} pending now; {folding}); "
                f"reads per update so far: {ratio}"
            )
        if not self._adaptive:
            return (
                f"fixed tau={self._tau:g}: fold every {s.threshold} pending rows ({t} pending now); "
                f"reads per update so far: {ratio}"
            )
        wake = policy.wake_price(self._H, self.n, self.m, self.d, self.e) * 1e6
        if s.dormant:
            current = int(np.count_nonzero(s.refreshed_at == s.slots_opened))
            return (
                f'tau="auto", dormant: no snapshot is kept (updates change only the inputs; reads '
                f"recompute the rows they read, {current} of {self._H * self.n} (head, row) pairs "
                f"are current); reads have cost {s.dormancy_balance * 1e6:.3g} us more than the "
                f"updates saved, and it wakes with a full refresh when that reaches {wake:.3g} us; "
                f"reads per update so far: {ratio}"
            )
        deferred_slots, predicted = self._policy_plan()
        deferred, price = deferred_slots.size, predicted * self._fold_correction
        return (
            f'tau="auto": {t} pending rows ({deferred} with deferred columns, read lazily); '
            f"reads since the last fold were charged {s.pending_rent * 1e6:.3g} us for them, the fold "
            f"would cost {price * 1e6:.3g} us, so it folds when the charge reaches that (or at "
            f"{s.threshold} pending rows); keeping the snapshot has cost {s.dormancy_balance * 1e6:.3g} us "
            f"more than reads saved, and it goes dormant when that reaches {wake:.3g} us; "
            f"reads per update so far: {ratio}"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the state buffers (including spare capacity)."""
        return self._state.nbytes

    # ================================================================== persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole structure to ``path`` (``.npz``), atomically.

        The file is written to a temporary file in the same folder and renamed
        over ``path``, so a crash never leaves a half-written file; temporary
        files of writers that were killed (on this host) are removed by later
        saves and loads in that folder. See :func:`dynattn.persistence.save`.
        Runtime complexity: O(size of the state).
        """
        from dynattn import persistence

        persistence.save(self, path)

    def config(self) -> dict[str, Any]:
        """The options that, with the state, make up the structure (saved with it)."""
        return {
            "tau": self._tau,
            "adaptive": self._adaptive,
            "schedule": "spread" if self._spread else "amortized",
            "scale": self._scale,
            "tol": self._tol,
            "certify": self._certify,
            "causal": self._causal,
            "dtype": self._dtype.name,
            "storage": self._storage.name,
            "batch_shape": list(self.batch_shape),
            "auto_storage": self._auto_storage,
            "memory_budget": float(self._memory_budget),
        }

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, backend: str | None = None, device: Any = None
    ) -> DynamicAttention:
        """Read a structure written by :meth:`save` onto ``backend`` (and ``device``);
        it answers exactly as the saved one.

        The whole file is checked before anything is built. Raises
        :class:`dynattn.persistence.SnapshotError` (a ValueError) saying what is
        wrong for a file that is not a valid snapshot, and ``OSError`` when it
        cannot be opened. Runtime complexity: O(size of the state).
        """
        from dynattn import persistence

        return persistence.load(cls, path, backend=backend, device=device)

    @classmethod
    def _restore(cls, xp: Any, config: dict[str, Any], arrays: dict[str, np.ndarray], numbers: dict) -> Any:
        """A structure from a checked snapshot (:mod:`dynattn.persistence`)."""
        self = cls.__new__(cls)
        self._xp = xp
        self._dtype = np.dtype(config["dtype"])
        self._output_dtype = xp.storage_dtype(self._dtype)
        self._scale = float(config["scale"])
        self._configure(
            tau=float(config["tau"]),
            adaptive=bool(config["adaptive"]),
            schedule=str(config["schedule"]),
            tol=float(config["tol"]),
            certify=bool(config["certify"]),
            causal=bool(config["causal"]),
            storage=config["storage"],
            batch_shape=tuple(config["batch_shape"]),
            memory_budget=float(config["memory_budget"]),
            auto_storage=bool(config["auto_storage"]),
        )
        self._state = AttentionState.restore(xp, self._dtype, self._storage, arrays, numbers)
        self._after_resize()
        return self

    # ================================================================== argument validation and range guards
    def _valid_row(self, name: str, value: Any, width: int) -> np.ndarray:
        """A validated host copy of a row argument (one row per head)."""
        return check_rows(name, self._xp.to_numpy(value), dtype=self._dtype, shape=(*self.batch_shape, width))

    def _valid_key_row(self, name: str, value: Any) -> np.ndarray:
        """A validated key row ``(H, d)`` whose logits stay in float64's range."""
        k = self._valid_row(name, value, self.d).reshape(self._H, self.d)
        # one product bounds every head's |k|^2 (the 1e-3 covers its rounding); the exact
        # norms, which _note_key_row computes anyway, only where that bound is too coarse
        if not self._key_norm_in_range(math.sqrt(float(np.vdot(k, k))) * 1.001):
            self._guard_key_norm(name, float(cert.norms(k).max()))
        return k

    def _valid_query_row(self, name: str, value: Any) -> np.ndarray:
        """A validated query row ``(H, d)`` whose logits stay in float64's range."""
        q = self._valid_row(name, value, self.d).reshape(self._H, self.d)
        self._guard_logit_reach(name, float(cert.norms(q).max()), self._state.k_norm_max)
        return q

    def _key_norm_in_range(self, k_norm: float) -> bool:
        """Whether a key of norm ``k_norm`` keeps every logit with today's queries within
        float64's range (False also for an infinite norm)."""
        return self._state.q_norm_max * k_norm * max(1.0, abs(self._scale)) <= 1e300

    def _guard_key_norm(self, name: str, k_norm: float) -> None:
        if not self._key_norm_in_range(k_norm):
            self._guard_logit_reach(name, self._state.q_norm_max, k_norm)

    def _guard_logit_reach(self, name: str, q_norm: float, k_norm: float) -> None:
        """Reject inputs whose dot products ``q.k`` or logits ``scale*q.k`` could leave
        float64's range (a zero norm gives exact zeros, whatever the other norm is)."""
        reach = 0.0 if q_norm == 0 or k_norm == 0 else q_norm * k_norm * max(1.0, abs(self._scale))
        if reach > 1e300:
            raise ValueError(
                f"{name}: dot products |Q_i||K_c| times max(1, |scale|) could reach {reach:.3g}, "
                "beyond float64's range; expected inputs whose (scaled) dot products stay below 1e300"
            )

    @_metered
    def update_k_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``K[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order.

        All-or-nothing: every index and delta is checked before anything changes.
        With a fixed τ and ``schedule="amortized"`` the batch folds once for all the
        rows it touches (as far as ``memory_budget`` leaves room for their pending
        columns) instead of every ``threshold`` rows: the same products, in larger
        GEMMs, and one exact refresh of drifted rows instead of one per fold.
        Runtime complexity: O(n) per update, plus 2*n*e flops per distinct row
        touched (one batched fold).
        """
        plan = self._valid_batch("K", rows, cols, deltas, heads, self.d)
        with self._one_fold_per_batch(plan):
            for h, c, j, new in plan:
                self._apply_k(h, c, j, new)

    @_metered
    def update_v_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``V[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order (all-or-nothing;
        folds as :meth:`update_k_many` does)."""
        plan = self._valid_batch("V", rows, cols, deltas, heads, self.e)
        with self._one_fold_per_batch(plan):
            for h, c, j, new in plan:
                self._apply_v(h, c, j, new)

    @contextlib.contextmanager
    def _one_fold_per_batch(self, plan: list[tuple[int, int, int, Any]]) -> Iterator[None]:
        """Within the block, fold only once the batch's rows are pending (or the memory
        room is used); after it, fold if the threshold is reached and give the slot
        axis back its usual size. Only for a fixed τ with amortized folds and an awake
        structure (tau="auto" and spread folds decide each fold themselves)."""
        s = self._state
        if self._meter is not None:  # Rule 4 compares batches per update
            self._meter.units = max(1, len(plan))
        wanted = s.t + len({c for _, c, _, _ in plan})
        if self._adaptive or self._spread or s.dormant or wanted <= s.threshold:
            yield
            return
        # bytes of one more slot in every slot array; the slot buffers grow by doubling up to
        # twice the limit, which may take half of what the budget has left (so that
        # storage="auto" never switches storage for a batch)
        capacity = s.capacity_after()
        per_slot = AttentionState.bytes_for(
            {**capacity, "S": 1}, self._dtype, type(self._storage)
        ) - AttentionState.bytes_for({**capacity, "S": 0}, self._dtype, type(self._storage))
        room = max(0, int(self._memory_budget) - self.nbytes) // 2 // per_slot
        limit = min(wanted + 1, (capacity["S"] + room) // 2)  # + 1: no fold before the end
        if limit <= s.threshold:
            yield
            return
        self._batch_limit = limit
        try:
            yield
        finally:  # (also after an error: the invariants of _check hold again)
            self._batch_limit = None
            if s.t >= s.threshold:
                self._fold()
            if s.sizes["S"] > self._slot_capacity():
                self._resize(S=max(s.t, self._slot_capacity()))

    def _valid_batch(
        self, target: str, rows: Any, cols: Any, deltas: Any, heads: Any, width: int
    ) -> list[tuple[int, int, int, Any]]:
        """Validate a batch of entry updates; return ``[(h, c, j, new_value), ...]`` to apply."""
        rows = check_index_array("rows", rows, self.m, axis="key/value rows, m")
        cols = check_index_array("cols", cols, width, axis="columns")
        values = np.asarray(deltas)
        if values.shape != rows.shape or cols.shape != rows.shape:
            raise ValueError(
                f"rows, cols, deltas: expected equal lengths, got {rows.shape}, {cols.shape}, {values.shape}"
            )
        heads = self._head_indices(heads, rows.size)
        if values.size and not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            raise TypeError(f"deltas: expected real numbers, got dtype {values.dtype}")
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise ValueError("deltas: expected finite values, got NaN or inf")
        s = self._state
        array = s.K if target == "K" else s.V
        current: dict[tuple[int, int, int], Any] = {}
        plan = []
        for h, c, j, delta in zip(heads.tolist(), rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            key = (h, c, j)
            new = self._checked_sum("deltas", current.get(key, array[h, c, j]), delta, target)
            current[key] = new
            plan.append((h, c, j, new))
        if target == "K" and plan:
            touched = np.unique(rows)
            trial = self._xp.to_numpy(s.K64[:, touched]).copy()
            where = np.searchsorted(touched, rows)
            for (h, _c, j, new), w in zip(plan, where, strict=True):
                trial[h, w, j] = float(new)
            self._guard_key_norm("deltas", float(cert.norms(trial).max()))
        return plan

    # ================================================================== invariants
    def _on_backend(self, xp: Any) -> DynamicAttention:
        """A copy whose state lives on backend ``xp`` (for checking a torch structure)."""
        twin = self.__class__.__new__(self.__class__)
        twin.__dict__.update(self.__dict__)
        twin._xp = xp
        twin._storage = type(self._storage)(xp)
        twin._state = self._state.on_backend(xp, twin._storage)
        twin._folding_plan = None
        twin._after_resize()
        return twin

    def _check(self, *, deep: bool = True) -> None:
        """Assert every invariant (for tests; O(H*n*m*d) when ``deep``), sortedcontainers
        style: each block states what it checks, and a failure names the offending state."""
        if self._xp.name != "numpy":
            self._on_backend(HOST)._check(deep=deep)
            return
        s = self._state
        t, threshold, n = s.t, s.threshold, self.n
        s.check_fields()
        # slots 0..t-1: pending (live) rows fewer than the threshold (twice that while a spread
        # fold is in progress), each row in at most one live and one folding slot; free and
        # folding slots only under schedule="spread"
        kinds = s.slot_kind[:t]
        live, folding, free = kinds == LIVE, kinds == FOLDING, kinds == FREE
        pending, limit = int(live.sum()), threshold * (2 if self._spread else 1)
        assert 0 <= pending < limit or (threshold == 1 and pending == 0), f"{pending=}, {limit=}"
        capacity = self._slot_capacity()
        assert t <= s.sizes["S"] <= capacity, f"slots allocated {s.sizes['S']}, {t=}, {capacity=}"
        assert not s.slot_kind[t:].any() and (t == 0 or not free[-1]), (
            f"t={t} is not the end of the slots in use"
        )
        assert self._spread or live.all(), "a free or folding slot under schedule='amortized'"
        assert not s.dormant or (self._adaptive and t == 0), "dormant: pending rows, or not tau='auto'"
        assert s.dormancy_balance >= 0, "negative dormancy balance"
        assert self._meter is None, "a public operation's Rule 4 meter was left open"
        for slot_map, kind in ((s.slot_of, live), (s.folding_slot_of, folding)):
            assert sorted(slot_map.values()) == np.flatnonzero(kind).tolist(), f"{slot_map} != {kinds}"
            assert all(s.pending_rows[slot] == c for c, slot in slot_map.items()), (
                f"{slot_map}, pending_rows={s.pending_rows[:t]}"
            )
        # a spread fold in progress: query rows 0..folded_rows-1 are folded
        assert bool(s.spread_length) == bool(s.folding_slot_of), "spread_length without folding slots"
        assert 0 <= s.folded_rows <= n and (s.spread_length or s.folded_rows == 0), (
            f"folded_rows={s.folded_rows}"
        )
        assert s.spread_updates <= s.spread_length, f"{s.spread_updates=} > {s.spread_length=}"
        assert np.all(s.slot_sequence[:t] < s.slots_opened) and np.all(s.refreshed_at <= s.slots_opened)
        # float64 copies equal the stored inputs
        for name in ("Q", "K", "V"):
            stored, copy64 = getattr(s, name), getattr(s, f"{name}64")
            assert np.array_equal(copy64, stored.astype(np.float64)), f"{name}64 differs from {name}"
        assert np.array_equal(s.Q64_T, s.Q64.transpose(0, 2, 1)), "Q64_T is not Q64 transposed"
        # key norms bound the keys' (up to the rounding of computing a norm)
        short = np.argwhere(s.k_norms < cert.norms(s.K64) * (1 - 1e-12))
        assert not short.size, f"k_norms below the key's norm at (head, key) {short[:3].tolist()}"
        assert np.shares_memory(self._Q, s.Q) and self._Q.shape == (*self.batch_shape, n, self.d)
        # the snapshot is finite, drift bounds are non-negative
        for name in ("mu", "N", "Z", "drift"):
            bad = ~np.isfinite(getattr(s, name))
            assert not bad.any(), f"{name} not finite at {np.argwhere(bad)[:3].tolist()}"
        assert np.all(s.drift >= 0), f"negative drift at {np.argwhere(s.drift < 0)[:3].tolist()}"
        # masks and positions
        assert s.all_keys_visible == bool(s.key_visible.all())
        assert not np.any(s.key_free & s.key_visible), "a deleted key is visible"
        assert np.array_equal(s.visible_keys, self._count_visible_keys(np.arange(n))), "visible_keys"
        # pending weight columns: in range, rounded to the dtype, bounded by column_max
        new, old = s.pending_new_columns[:, :t], s.pending_old_columns[:, :t]
        for label, block in (("new", new), ("old", old)):
            assert np.all(block >= 0) and np.all(block <= self._weight_limit * (1 + 1e-12)), label
            assert np.array_equal(block, block.astype(self._dtype).astype(np.float64)), f"{label} not rounded"
            # free slots, and folding slots where they are folded, contribute nothing
            assert not block[:, free].any(), f"{label} weights in a free slot"
            assert not block[:, folding, : s.folded_rows].any(), f"{label} weights where a slot is folded"
        # deferred columns (tau="auto" only) are not stored: their slots hold stale weights
        deferred = s.column_deferred[:t]
        assert self._adaptive or not deferred.any(), "a deferred column without tau='auto'"
        assert np.all(s.column_rent[:t] >= 0) and s.pending_rent >= 0, "negative rent"
        if self._read_plan is not None:
            assert np.array_equal(self._read_plan[0], np.flatnonzero(deferred)), "stale read plan"
        stored = ~deferred
        column_max = s.column_max[:, :t][:, stored]
        assert np.all(column_max >= new[:, stored].max(axis=2, initial=0) * (1 - 1e-12)), "column_max"
        assert np.all(s.column_error[:, :t] <= self._column_error_limit), "column_error over its limit"
        assert np.all(s.column_growth[:, :t] <= MAX_COLUMN_GROWTH), "column_growth over its limit"
        # value side: units are powers of two at the value scale, pending values in units
        units = s.value_unit
        assert np.array_equal(units, cert.power_of_two_units(units)) and np.all(s.value_scale / 2 < units)
        # (a folding slot's values are the row's as of the start of the fold)
        scaled = s.V64[:, s.pending_rows[:t][live]] / units[:, None, :]
        assert np.array_equal(s.pending_new_values[:, :t][:, live], scaled), (
            "pending values differ from V / unit"
        )
        true_max = np.abs(s.V64).max(axis=1)
        fresh = ~s.value_max_stale
        assert np.array_equal(s.value_max[fresh], true_max[fresh]), "value_max"
        assert np.all(s.value_max >= true_max) and np.all(s.value_scale >= true_max), "value_scale"
        # norms are upper bounds (query norms exact)
        assert s.k_norm_max >= cert.norms(s.K64).max() * (1 - 1e-12), "k_norm_max"
        assert np.allclose(s.q_norm, cert.norms(s.Q64), rtol=1e-12, atol=0), "q_norm"
        assert np.all(s.q_col_absmax >= np.abs(s.Q64).max(axis=1)), "q_col_absmax"
        if not deep:
            return
        # pending (and, in dense storage, all stored) weights agree with a fresh computation
        logits = np.matmul(s.Q64, s.K64.transpose(0, 2, 1)) * self._scale
        visible = self._visibility(np.arange(n))
        if visible is not None:
            logits = np.where(visible[None], logits, -np.inf)
        with np.errstate(over="ignore"):  # a deferred key may outgrow mu until it is read
            fresh_weights = np.exp(logits - s.mu[:, :, None])  # (H, n, m)
        if s.dormant:
            # only the current rows hold a snapshot: of today's inputs, with nothing pending
            current = s.refreshed_at == s.slots_opened
            fresh_sum = fresh_weights.sum(axis=2)
            # each weight as for a fresh column: the logits' rounding and the dtype's, summed
            slack = 2 * self._logit_error(s.q_norm) + (self.m + 8) * 4 * self._unit
            allowed = slack * fresh_sum + self._underflow_error
            close = np.abs(s.Z - fresh_sum) <= allowed
            assert np.all(close[current]), f"a current Z is off at {np.argwhere(current & ~close)[:3]}"
            return
        stored_keys = np.ones(self.m, dtype=bool)
        stored_keys[s.pending_rows[:t][deferred]] = False
        assert np.isfinite(fresh_weights[:, :, stored_keys]).all(), "a stored weight overflows against mu"
        slack = 2 * self._logit_error(s.q_norm)[:, :, None] + 4 * self._unit
        floor = self._weight_floor
        if t:
            # the new weights of live slots, and of folding slots where they are not folded yet
            # and their row did not change since
            compared = np.repeat((stored & live)[:, None], n, axis=1)
            compared[folding & ~np.isin(s.pending_rows[:t], list(s.slot_of)), s.folded_rows :] = True
            expected = fresh_weights[:, :, s.pending_rows[:t]].transpose(0, 2, 1)
            allowed = (s.column_error[:, :t, None] + slack.transpose(0, 2, 1)) * np.maximum(expected, new)
            bad = (np.abs(new - expected) > allowed * 1.01 + floor) & compared[None]
            assert not bad.any(), (
                f"pending columns drifted: (head, slot, row) {np.argwhere(bad)[:3].tolist()}"
            )
        self._storage.check(s, fresh_weights, slack, floor)
