"""The state of a :class:`~dynattn.DynamicAttention`: every array and number, declared once.

Every array is declared as a :class:`StateArray` in the body of
:class:`AttentionState` (or of a storage strategy, :mod:`dynattn.storage`) with
its axes, dtype and home:

=====  ==========================================================
axis   meaning
=====  ==========================================================
``H``  heads (the product of the leading axes of Q, K, V)
``n``  query rows (grows with ``append``, shrinks with ``delete_query``)
``m``  key/value rows (grows with ``append``)
``d``  key width
``e``  value width
``S``  pending slots allocated (grows by doubling up to the slot capacity)
=====  ==========================================================

Arrays live in buffers whose growable axes have spare capacity (doubling, as a
list does); each declared name is a view of the live part of its buffer,
re-pointed by :meth:`AttentionState.resize`. Device arrays live on the
backend's device; host arrays (bookkeeping) are always numpy. Saving is
:meth:`AttentionState.export`, loading :meth:`AttentionState.restore`: a field
declared here is saved, checked and restored without being named anywhere
else. See ``docs/accuracy.md`` for what each quantity means.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from dynattn.backends import NumpyBackend

#: Axes that can grow; the others are fixed at construction.
GROWABLE = "nmS"
#: Host-side operations (bookkeeping arrays are always numpy).
HOST = NumpyBackend()


class StateArray:
    """Declaration of one state array (a class attribute of a state holder).

    Parameters
    ----------
    axes : str
        One letter per axis (module docstring).
    dtype : numpy dtype or None
        None: the structure's storage dtype (float32 or float64).
    device : bool, keyword-only
        True: on the backend's device; False: host numpy (bookkeeping).
    float64_copy_of : str, keyword-only
        This array is the float64 working copy of that array: the same array when
        the storage dtype is float64, a separate float64 one otherwise.

    The holder's instance attribute of the same name is a view of the live part of
    the buffer (this non-data descriptor only answers on the class).
    """

    def __init__(self, axes: str, dtype: Any = None, *, device: bool = True, float64_copy_of: str = ""):
        self.axes = axes
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.device = device
        self.float64_copy_of = float64_copy_of
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        raise AttributeError(f"state array {self.name!r} is not allocated")

    def resolved_dtype(self, storage_dtype: np.dtype) -> np.dtype:
        return storage_dtype if self.dtype is None else self.dtype

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[axis] for axis in self.axes)


def declared_arrays(holder: type) -> dict[str, StateArray]:
    """The :class:`StateArray` declarations of a holder class, base classes first."""
    found: dict[str, StateArray] = {}
    for klass in reversed(holder.__mro__):
        found.update({k: v for k, v in vars(klass).items() if isinstance(v, StateArray)})
    return found


class AttentionState:
    """All arrays and numbers of one structure, in growable buffers.

    Runtime complexity: construction O(size); :meth:`resize` amortized O(1) per
    added row (capacity doubles); :meth:`export` O(size).
    """

    # -- inputs, in the storage dtype, and their float64 working copies --------------
    Q = StateArray("Hnd")  # queries
    K = StateArray("Hmd")  # keys
    V = StateArray("Hme")  # values
    Q64 = StateArray("Hnd", np.float64, float64_copy_of="Q")
    K64 = StateArray("Hmd", np.float64, float64_copy_of="K")
    V64 = StateArray("Hme", np.float64, float64_copy_of="V")
    Q64_T = StateArray("Hdn", np.float64)  # Q64 transposed: one key's logits are k @ Q64_T
    q_norm = StateArray("Hn", np.float64)  # |Q_i|
    # -- the snapshot as of the last fold (float64) ----------------------------------
    mu = StateArray("Hn", np.float64)  # row stabilizers: weights are exp(logit - mu)
    Z = StateArray("Hn", np.float64)  # A0 1
    N = StateArray("Hne", np.float64)  # A0 (V0 / value_unit)
    drift = StateArray("Hn", np.float64)  # bound on the rounding error accumulated in N and Z
    # -- pending rows: weights and values as folded (old) and as they are now (new) --
    pending_new_columns = StateArray("HSn", np.float64)
    pending_old_columns = StateArray("HSn", np.float64)
    pending_new_values = StateArray("HSe", np.float64)  # in value units
    pending_old_values = StateArray("HSe", np.float64)
    pending_rows = StateArray("S", np.int64, device=False)  # key/value row of each slot
    # what each slot of 0..t-1 holds: FREE (a hole: zero weights, contributes nothing),
    # LIVE (a pending row, in slot_of) or FOLDING (frozen, being folded row block by row
    # block under schedule="spread": zero weights at the rows folded so far)
    slot_kind = StateArray("S", np.int8, device=False)
    slot_sequence = StateArray("S", np.int64, device=False)  # when the slot was opened
    key_changed = StateArray("S", bool, device=False)
    value_changed = StateArray("S", bool, device=False)
    column_error = StateArray("HS", np.float64, device=False)  # relative error of each new column
    column_growth = StateArray("HS", np.float64, device=False)  # log-growth since computed fresh
    column_max = StateArray("HS", np.float64, device=False)  # upper bound of each new column
    # tau="auto" (docs/policy.md): a deferred new column is not stored; reads compute its
    # weights at the rows they read, and the seconds they spent doing so are its rent
    column_deferred = StateArray("S", bool, device=False)
    column_rent = StateArray("S", np.float64, device=False)
    # -- masks and positions -----------------------------------------------------------
    query_pos = StateArray("n", np.int64, device=False)
    key_pos = StateArray("m", np.int64, device=False)
    key_visible = StateArray("m", bool, device=False)
    key_free = StateArray("m", bool, device=False)  # deleted: a later append may reuse the index
    visible_keys = StateArray("n", np.int64, device=False)  # how many keys each query row sees
    # -- certificate bookkeeping (docs/accuracy.md) ---------------------------------------
    # slots opened before the row's last exact refresh (slot_sequence < this) hold weights
    # that refresh computed or that came from dense storage; later ones were recomputed
    refreshed_at = StateArray("Hn", np.int64, device=False)
    k_norms = StateArray("Hm", np.float64, device=False)  # upper bounds of |K_c|
    q_col_absmax = StateArray("Hd", np.float64, device=False)  # upper bound of max_i |Q[i, j]|
    value_max = StateArray("He", np.float64, device=False)  # max|V[:, j]| (exact unless stale)
    value_max_stale = StateArray("He", bool, device=False)
    value_scale = StateArray("He", np.float64, device=False)  # largest |V[c, j]| since a full refresh
    value_unit = StateArray("He", np.float64, device=False)  # power of two <= value_scale

    #: Numbers saved with the arrays, with their types (checked by :meth:`_check` to be
    #: exactly the public non-array attributes, so none can be forgotten).
    SCALARS: dict[str, type] = {
        "t": int,
        "threshold": int,
        "slots_opened": int,
        "folded_rows": int,
        "spread_updates": int,
        "spread_length": int,
        "next_position": int,
        "k_norm_max": float,
        "q_norm_max": float,
        "all_keys_visible": bool,
        "pending_rent": float,
        "read_rate": float,
        "reads_since_update": int,
        "dormant": bool,
        "dormancy_balance": float,
        "upkeep_pending": float,
        "upkeep_total": float,
        "awake_updates": int,
    }

    def __init__(self, xp: Any, dtype: np.dtype, sizes: dict[str, int], storage: Any):
        self._xp = xp
        self._dtype = np.dtype(dtype)
        self._storage = storage
        #: current sizes of every axis, and allocated sizes of the growable ones
        self.sizes = dict(sizes)
        self._capacity = {axis: self.sizes[axis] for axis in GROWABLE}
        #: spare capacity of each growable axis is zero from this index on (entries that
        #: :meth:`remove_index` moved past the live part lie below it)
        self._stale_until = dict.fromkeys(GROWABLE, 0)
        self.t = 0  # slots 0..t-1 are in use (answers add up their terms)
        self.threshold = 1  # pending rows that trigger a fold: ceil(m**tau)
        self.slots_opened = 0  # slots opened since construction (the next slot_sequence)
        # schedule="spread": query rows 0..folded_rows-1 hold the FOLDING slots' terms in
        # N and Z; spread_updates of the spread_length updates the fold may take have passed
        self.folded_rows = 0
        self.spread_updates = 0
        self.spread_length = 0
        self.next_position = 0  # position (causal mask) of the next appended token
        self.k_norm_max = 0.0  # upper bound of every |K_c| (does not decrease between full refreshes)
        self.q_norm_max = 0.0
        self.all_keys_visible = True
        self.pending_rent = 0.0  # seconds pending rows added to reads since the last fold
        self.read_rate = 0.0  # head reads per update, averaged over recent updates (tau="auto")
        self.reads_since_update = 0
        # tau="auto" may keep no snapshot (dormant: a row is current only while its
        # refreshed_at equals slots_opened); the balance is the rent-or-buy counter of
        # that choice, in seconds (docs/policy.md)
        self.dormant = False
        self.dormancy_balance = 0.0
        self.upkeep_pending = 0.0  # seconds of snapshot upkeep done since the last update
        self.upkeep_total = 0.0  # upkeep since the structure last woke (or was built)
        self.awake_updates = 0  # and the updates it was spread over (both frozen while dormant)
        self.slot_of: dict[int, int] = {}  # key/value row -> its LIVE pending slot
        self.folding_slot_of: dict[int, int] = {}  # key/value row -> its FOLDING slot
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._buffers: dict[str, tuple[Any, StateArray, Any]] = {}
        for key, owner, spec in self._declarations():
            self._buffers[key] = (owner, spec, self._zeros(spec, spec.shape(self.sizes)))
        self._reslice()

    # ------------------------------------------------------------------ layout
    def _declarations(self) -> list[tuple[str, Any, StateArray]]:
        """(key, owner, declaration) of every array that has a buffer of its own; the key is
        the name, prefixed ``storage.`` for the storage strategy's arrays."""
        out = []
        for prefix, owner in (("", self), ("storage.", self._storage)):
            for name, spec in declared_arrays(type(owner)).items():
                if spec.float64_copy_of and self._dtype == np.float64:
                    continue  # the same array as its source
                out.append((prefix + name, owner, spec))
        return out

    @classmethod
    def expected_arrays(
        cls, sizes: dict[str, int], dtype: np.dtype, storage_class: type
    ) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
        """Name -> (axes, shape, dtype) of every array :meth:`export` writes for these sizes."""
        out = {}
        for prefix, holder in (("", cls), ("storage.", storage_class)):
            for name, spec in declared_arrays(holder).items():
                if spec.float64_copy_of and np.dtype(dtype) == np.float64:
                    continue
                out[prefix + name] = (spec.axes, spec.shape(sizes), spec.resolved_dtype(np.dtype(dtype)))
        return out

    @classmethod
    def bytes_for(cls, sizes: dict[str, int], dtype: np.dtype, storage_class: type) -> int:
        """Bytes that buffers of exactly ``sizes`` would hold with this storage strategy."""
        arrays = cls.expected_arrays(sizes, dtype, storage_class).values()
        return int(sum(int(np.prod(shape)) * dtype.itemsize for _axes, shape, dtype in arrays))

    def capacity_after(self, **sizes: int) -> dict[str, int]:
        """Allocated sizes of every axis after :meth:`resize` to ``sizes``."""
        grown = {a: max(s, 2 * self._capacity[a]) for a, s in sizes.items() if s > self._capacity[a]}
        return {**self.sizes, **self._capacity, **grown}

    def replace_storage(self, storage: Any) -> None:
        """Drop the current storage strategy's arrays and allocate ``storage``'s."""
        self._buffers = {k: v for k, v in self._buffers.items() if not k.startswith("storage.")}
        self._storage = storage
        allocated = {**self.sizes, **self._capacity}
        for key, owner, spec in self._declarations():
            if key.startswith("storage."):
                self._buffers[key] = (owner, spec, self._zeros(spec, spec.shape(allocated)))
        self._reslice()

    def _zeros(self, spec: StateArray, shape: tuple[int, ...]) -> Any:
        zeros = self._xp.zeros if spec.device else np.zeros
        return zeros(shape, spec.resolved_dtype(self._dtype))

    def _reslice(self, axes: str = "") -> None:
        """Point every declared attribute (or those with an axis in ``axes``) at the live
        part of its buffer."""
        live = {a: slice(0, size) for a, size in self.sizes.items()}
        changed = set(axes)
        for owner, spec, buffer in self._buffers.values():
            if not changed or not changed.isdisjoint(spec.axes):
                owner.__dict__[spec.name] = buffer[tuple([live[a] for a in spec.axes])]
        if self._dtype == np.float64:
            for name, spec in declared_arrays(type(self)).items():
                if spec.float64_copy_of:
                    self.__dict__[name] = self.__dict__[spec.float64_copy_of]

    def resize(self, **sizes: int) -> None:
        """Set the sizes of growable axes, doubling buffers that are too small. Entries that
        a growing axis brings into view are zero (spare capacity may hold stale entries,
        left by :meth:`remove_index`)."""
        allocated = self.capacity_after(**sizes)
        grow = {a: allocated[a] for a in sizes if allocated[a] > self._capacity[a]}
        self._grow_buffers(grow)
        exposed = {}  # the stale entries a growing axis brings into view
        for a, size in sizes.items():
            if size < self.sizes[a]:
                self._stale_until[a] = max(self._stale_until[a], self.sizes[a])
            elif a not in grow and self.sizes[a] < self._stale_until[a]:
                exposed[a] = (self.sizes[a], min(size, self._stale_until[a]))
        self.sizes.update(sizes)
        # only the live part of the other axes: an entry in their spare capacity is zeroed
        # when that axis grows over it (then this one is live)
        for axis, (old, new) in exposed.items():
            for _owner, spec, buffer in self._buffers.values():
                if axis in spec.axes:
                    live = (slice(old, new) if a == axis else slice(0, self.sizes[a]) for a in spec.axes)
                    buffer[tuple(live)] = 0
        self._reslice("".join(sizes))

    def reserve(self, **capacities: int) -> None:
        """Allocate growable axes to at least ``capacities`` (sizes unchanged), so that
        :meth:`resize` up to them moves nothing."""
        self._grow_buffers({a: c for a, c in capacities.items() if c > self._capacity[a]})
        self._reslice()

    def _grow_buffers(self, grow: dict[str, int]) -> None:
        """Reallocate every buffer with an axis in ``grow`` to the capacities ``grow``
        gives (the others as they are), copying the live part: the spare capacity of the
        new buffer is zero (no stale entry of :meth:`remove_index` survives a regrowth)."""
        if not grow:
            return
        self._capacity.update(grow)
        self._stale_until.update(dict.fromkeys(grow, 0))
        allocated = {**self.sizes, **self._capacity}
        for key, (owner, spec, buffer) in self._buffers.items():
            if any(a in grow for a in spec.axes):
                bigger = self._zeros(spec, spec.shape(allocated))
                live = tuple(slice(0, self.sizes[a]) for a in spec.axes)
                bigger[live] = buffer[live]
                self._buffers[key] = (owner, spec, bigger)

    def remove_index(self, axis: str, index: int) -> None:
        """Delete entry ``index`` of ``axis`` from every array (later entries move down one)."""
        for owner, spec, _buffer in self._buffers.values():
            if axis in spec.axes:
                ops = self._xp if spec.device else HOST
                view = ops.move_to_front(owner.__dict__[spec.name], spec.axes.index(axis))
                view[index:-1] = ops.copy(view[index + 1 :])
        self.resize(**{axis: self.sizes[axis] - 1})

    def sync_float64_copies(self, **where: Any) -> None:
        """Refresh the float64 copies of Q/K/V at ``where`` (no-op for float64 storage)."""
        if self._dtype == np.float64:
            return
        for letter, index in where.items():
            self.__dict__[f"{letter}64"][:, index] = self.__dict__[letter][:, index]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (including spare capacity)."""
        buffers = self._buffers.values()
        return int(sum((self._xp if spec.device else HOST).nbytes(buffer) for _, spec, buffer in buffers))

    # ------------------------------------------------------------------ export / restore
    def export(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Host copies of every array (storage arrays prefixed ``storage.``) and the numbers:
        ``SCALARS``, ``sizes``, ``slot_of``, ``folding_slot_of`` and ``stats``."""
        arrays = {}
        for key, (owner, spec, _buffer) in self._buffers.items():
            arrays[key] = np.array(self._xp.to_numpy(owner.__dict__[spec.name]))
        numbers = {name: getattr(self, name) for name in self.SCALARS}
        numbers.update(
            sizes=dict(self.sizes),
            slot_of=dict(self.slot_of),
            folding_slot_of=dict(self.folding_slot_of),
            stats=dict(self.stats),
        )
        return arrays, numbers

    @classmethod
    def restore(
        cls, xp: Any, dtype: np.dtype, storage: Any, arrays: dict[str, np.ndarray], numbers: dict[str, Any]
    ) -> AttentionState:
        """A state holding ``arrays`` and ``numbers`` as written by :meth:`export`
        (checked by the caller: :mod:`dynattn.persistence`)."""
        state = cls.__new__(cls)
        state._xp, state._dtype, state._storage = xp, np.dtype(dtype), storage
        state.sizes = dict(numbers["sizes"])
        state._capacity = {axis: state.sizes[axis] for axis in GROWABLE}
        state._stale_until = dict.fromkeys(GROWABLE, 0)
        for name, kind in cls.SCALARS.items():
            setattr(state, name, kind(numbers[name]))
        state.slot_of = {int(c): int(s) for c, s in numbers["slot_of"].items()}
        state.folding_slot_of = {int(c): int(s) for c, s in numbers["folding_slot_of"].items()}
        state.stats = {name: int(numbers["stats"][name]) for name in STAT_NAMES}
        state._buffers = {}
        for key, owner, spec in state._declarations():
            array = arrays[key]
            state._buffers[key] = (owner, spec, xp.asarray(array) if spec.device else np.array(array))
        state._reslice()
        return state

    def on_backend(self, xp: Any, storage: Any) -> AttentionState:
        """A copy whose device arrays live on backend ``xp`` (host arrays copied too)."""
        twin = copy.copy(self)
        twin._xp, twin._storage = xp, storage
        twin.slot_of, twin.stats, twin.sizes = dict(self.slot_of), dict(self.stats), dict(self.sizes)
        twin.folding_slot_of = dict(self.folding_slot_of)
        twin._buffers = {}
        for key, (owner, spec, buffer) in self._buffers.items():
            moved = xp.asarray(self._xp.to_numpy(buffer)) if spec.device else buffer.copy()
            twin._buffers[key] = (twin if owner is self else storage, spec, moved)
        twin._reslice()
        return twin

    def check_fields(self) -> None:
        """Assert that every array is a live view of its buffer and that the public numbers
        are exactly the declared ones (so a new field cannot be left out of a snapshot)."""
        for key, (owner, spec, buffer) in self._buffers.items():
            view = owner.__dict__[spec.name]
            assert tuple(view.shape) == spec.shape(self.sizes), (key, view.shape, self.sizes)
            assert self._xp.shares_memory(view, buffer), f"{key} was rebound instead of written in place"
        arrays = set(declared_arrays(type(self)))
        public = {k for k in vars(self) if not k.startswith("_")} - arrays
        assert public == {*self.SCALARS, "sizes", "slot_of", "folding_slot_of", "stats"}, public
        for name, kind in self.SCALARS.items():
            assert type(getattr(self, name)) is kind, (name, type(getattr(self, name)))


#: Counters of ``DynamicAttention.stats``.
STAT_NAMES = (
    "folds",
    "rows_refreshed",
    "query_fallbacks",
    "full_refreshes",
    "rows_rescaled",
    "fresh_columns",
    "storage_switches",
    "columns_deferred",
    "columns_materialized",
    "updates",
    "reads",
    "fold_slices",
    "dormant_periods",
    "wakes",
)

#: ``slot_kind`` values.
FREE, LIVE, FOLDING = 0, 1, 2
