"""One attention state sharded over Ray actors, restored when an actor dies.

:class:`ShardedAttention` answers as one :class:`~dynattn.DynamicAttention`
would, with the state split over ``shards`` Ray actors, each holding a
``DynamicAttention`` over a block of heads and/or query rows.

Layout
------
Heads are independent, and query rows are independent once ``K`` and ``V``
are known, so the shards form a grid ``head_blocks x row_blocks``. Shard
``(a, b)`` holds the heads of head block ``a``, the query rows of row block
``b`` and all keys and values of its heads. ``by="heads"`` splits heads only,
``by="rows"`` query rows only, ``by="auto"`` heads while ``shards <= heads``,
else the most head blocks that divide ``shards`` and rows within them. A
causal structure is split by heads only (a shard's query rows always take
positions ``0..n-1``). Blocks differ in size by at most one; appended query
rows join the last row block.

Calls
-----
The driver keeps a copy of ``Q, K, V`` (``O(H*(n+m)*(d+e))``), so every
argument is checked there, with the checks and messages of
``DynamicAttention`` (:mod:`dynattn._validation`), before anything is sent: a
rejected call reaches no shard and changes nothing. An accepted edit is queued
for the shards it concerns; a shard's queue travels with the next call that
needs an answer from that shard, or on its own once it holds
``edits_per_call`` edits (without waiting for it; a shard has at most two such
calls in flight). So every public call costs at most one actor call per shard,
and answers are gathered with one ``ray.get`` over all the shards involved.
Calls and answers travel pickled as one ``bytes`` argument (cheaper than Ray's
serialization of nested lists of small arrays); the initial inputs go through
the object store.

Fault tolerance
---------------
For every shard the driver keeps the edits sent since the shard's last
checkpoint (its *log*) and the time the shard took to apply them. When the
log's replay cost (those seconds, plus the build time while the shard has no
checkpoint yet) exceeds ``replay_budget`` seconds, or its arrays exceed
``max_log_bytes``, the next call to the shard also asks it to save a
checkpoint (``DynamicAttention.save``, atomic) to ``checkpoint_dir``; once the
shard confirms, the log before it is dropped. The default budget is adaptive:
ten times the shard's last checkpoint time, at least one second.

When Ray reports that an actor died (``RayActorError``), the call that noticed
starts a new actor, restores the checkpoint (or rebuilds from the initial
inputs, kept in the object store until the first checkpoint), replays the log
in one call and then repeats its question. Covered: the death of any shard
actors at any time, including during a checkpoint or a recovery (up to
``max_restarts`` deaths in a row), while the driver lives. Not covered: the
death of the driver (logs live in its memory; :meth:`ShardedAttention.save` is
how to keep a state across driver restarts), the loss of the checkpoint files
(on a multi-node cluster ``checkpoint_dir`` must be shared by the nodes), a
call that hangs rather than fails, and Ray's own failures. An error raised
*inside* a shard (which the driver's checks should make impossible) leaves the
structure unusable, since shards may then disagree.

Ray is an optional dependency (``pip install "dynattn[ray]"``), imported when
first used.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynattn import certificate as cert
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
from dynattn.backends import resolve_backend
from dynattn.persistence import SnapshotError
from dynattn.storage import STORAGES
from dynattn.structure import DynamicAttention, fold_threshold

__all__ = ["INSTALL_HINT", "ShardedAttention"]

#: What to run when Ray is missing.
INSTALL_HINT = 'pip install "dynattn[ray]"'
#: Version of the manifest written by :meth:`ShardedAttention.save`.
MANIFEST_FORMAT = 1
#: Environment variables that limit a shard's BLAS/OpenMP threads.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Calls without answers a shard may have in flight before the driver waits for them.
MAX_IN_FLIGHT = 2
#: One call on a shard's structure: (method or attribute, positional arguments, keyword arguments).
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _count(minimum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        count = as_index(name, value)
        if count < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {count}")
        return count

    return check


def _seconds_or_none(name: str, value: Any) -> float | None:
    return None if value is None else check_scalar(name, value, low=0.0)


def _threads(name: str, value: Any) -> int | str | None:
    return value if value is None or value == "auto" else _count(1)(name, value)


def _folder_or_none(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name}: expected a path or None, got {type(value).__name__}")
    return os.path.abspath(os.fspath(value))


#: The sharding runtime's options, shared by the constructor and :meth:`ShardedAttention.load`:
#: name -> (default, check(name, value) -> value).
RUNTIME_OPTIONS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "edits_per_call": (8, _count(1)),
    "replay_budget": (None, _seconds_or_none),
    "max_log_bytes": (256 << 20, _count(0)),
    "max_restarts": (3, _count(0)),
    "cpus_per_shard": (1.0, lambda name, value: check_scalar(name, value, low=0.0)),
    "blas_threads": ("auto", _threads),
    "checkpoint_dir": (None, _folder_or_none),
}


def _optional_tol(name: str, value: Any) -> float | None:
    if value is None:
        return None
    tol = check_scalar(name, value, low=0.0)
    if tol <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return tol


#: ``DynamicAttention``'s options the shards take (scale and dtype are checked with Q, K, V;
#: key_mask against m): name -> (default, check(name, value) -> value).
ATTENTION_OPTIONS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "tau": (0.5, lambda name, value: check_scalar(name, value, low=0.0, high=1.0)),
    "storage": ("auto", lambda name, value: check_choice(name, value, (*STORAGES, "auto"))),
    "memory_budget": (1 << 30, lambda name, value: check_scalar(name, value, low=0.0)),
    "tol": (None, _optional_tol),
    "certify": (True, check_flag),
    "causal": (False, check_flag),
}


def _import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"dynattn.distributed needs Ray, an optional dependency: {INSTALL_HINT}") from exc
    return ray


def _host(value: Any) -> Any:
    """A host numpy array for a torch tensor; anything else unchanged."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


# ====================================================================== inside the actor
class ShardWorker:
    """What one shard's Ray actor runs: a ``DynamicAttention`` over its heads and rows."""

    def __init__(self) -> None:
        self._att: Any = None

    def build(self, Q: np.ndarray, K: np.ndarray, V: np.ndarray, options: dict[str, Any]) -> float:
        """Build from ``Q: (Hs, ns, d)``, ``K: (Hs, m, d)``, ``V: (Hs, m, e)``; returns the seconds taken.

        Runtime complexity: O(Hs*ns*m*(d+e)).
        """
        start = time.perf_counter()
        self._att = DynamicAttention(Q, K, V, backend="numpy", **options)
        return time.perf_counter() - start

    def restore(self, path: str) -> float:
        """Load the structure saved at ``path``; returns the seconds taken.

        Runtime complexity: O(size of the state).
        """
        start = time.perf_counter()
        self._att = DynamicAttention.load(path, backend="numpy")
        return time.perf_counter() - start

    def run(self, payload: bytes) -> bytes:
        """Apply edits, answer questions, optionally save a checkpoint, in that order.

        ``payload`` is ``pickle((edits, asks, checkpoint_path or None))``; each
        ask names a method (called) or an attribute (read). Returns
        ``pickle((edit_seconds, answers, checkpoint_seconds or None or the
        checkpoint's error message, what the last edit returned))``.
        Runtime complexity: that of the calls, plus O(size of the state) for a checkpoint.
        """
        edits, asks, checkpoint = pickle.loads(payload)
        start = time.perf_counter()
        last = None
        for name, args, kwargs in edits:
            last = getattr(self._att, name)(*args, **kwargs)
        edit_seconds = time.perf_counter() - start
        answers = []
        for name, args, kwargs in asks:
            value = getattr(self._att, name)
            answers.append(value(*args, **kwargs) if callable(value) else value)
        saved: float | str | None = None
        if checkpoint is not None:
            begin = time.perf_counter()
            try:
                self._att.save(checkpoint)
                saved = time.perf_counter() - begin
            except OSError as exc:  # the driver keeps the log and tries again later
                saved = f"{type(exc).__name__}: {exc}"
        return pickle.dumps((edit_seconds, answers, saved, last), protocol=pickle.HIGHEST_PROTOCOL)


# ====================================================================== driver bookkeeping
@dataclass(eq=False)
class _Entry:
    """Edits sent to a shard in one call (kept in its log until a checkpoint covers them)."""

    seq: int
    calls: list[Call]
    nbytes: int
    seconds: float = 0.0


@dataclass(eq=False)
class _Sent:
    """A call to a shard whose result has not been collected."""

    ref: Any
    entry: _Entry | None
    asks: list[Call]
    checkpoint: str | None
    #: the last log sequence number a checkpoint in this call covers
    covers: int


@dataclass(eq=False)
class _Shard:
    index: int
    heads: tuple[int, int]
    rows: list[int]
    actor: Any
    #: checkpoint file the shard restores from (None: build from ``inputs``)
    base: str | None
    inputs: tuple[Any, ...] = ()
    base_seconds: float = 0.0
    log: list[_Entry] = field(default_factory=list)
    unsent: list[Call] = field(default_factory=list)
    in_flight: list[_Sent] = field(default_factory=list)
    next_seq: int = 0
    checkpoint_seconds: float | None = None
    #: what the shard's last edit returned (``append``'s indices)
    last_result: Any = None

    def replay_cost(self) -> float:
        return sum(e.seconds for e in self.log) + (self.base_seconds if self.base is None else 0.0)


def _split(size: int, parts: int) -> list[int]:
    """Edges of ``parts`` contiguous blocks of ``[0, size)`` whose sizes differ by at most one."""
    return [size * k // parts for k in range(parts + 1)]


def _grid(by: str, shards: int, heads: int, n: int, causal: bool) -> tuple[int, int]:
    """``(head_blocks, row_blocks)`` for ``shards`` shards (see the module docstring)."""
    if by == "heads" or (by == "auto" and shards <= heads):
        if shards > heads:
            raise ValueError(
                f"shards={shards}: by='heads' needs at most one shard per head, and there are {heads} "
                "heads; use by='rows' or by='auto' to split query rows too"
            )
        return shards, 1
    head_blocks = 1 if by == "rows" else max(g for g in range(1, heads + 1) if shards % g == 0)
    row_blocks = shards // head_blocks
    if causal and row_blocks > 1:
        raise ValueError(
            f"shards={shards}: a causal structure is split by heads only (at most {heads} shards here); "
            "use shards <= heads"
        )
    if row_blocks > n:
        raise ValueError(
            f"shards={shards}: {row_blocks} row blocks need at least that many query rows, n={n}"
        )
    return head_blocks, row_blocks


def _nbytes(calls: Iterable[Call]) -> int:
    return sum(getattr(x, "nbytes", 8) for _, args, kwargs in calls for x in (*args, *kwargs.values()))


# ====================================================================== the driver
class ShardedAttention(ValidatedInputs):
    """Softmax attention kept current under edits, its state sharded over Ray actors.

    Answers what one :class:`~dynattn.DynamicAttention` given the same inputs
    and calls would, within the accuracy target, and survives the death of
    shard actors (module docstring: layout, calls, fault tolerance).

    Parameters
    ----------
    Q : (n, d) or (*batch, n, d) array_like
        Queries (copied). Leading axes are heads, as for ``DynamicAttention``.
    K : (m, d) or (*batch, m, d) array_like
        Keys (copied).
    V : (m, e) or (*batch, m, e) array_like
        Values (copied).
    shards : int, keyword-only
        Number of shard actors (default 2).
    by : {"heads", "rows", "auto"}, keyword-only
        Split blocks of heads, blocks of query rows, or heads first (default).
    address : str or None, keyword-only
        Ray cluster to join (``ray.init(address=...)``) when Ray is not yet
        initialized in this process; None starts a local one.
    **options
        ``DynamicAttention``'s options (``tau``, ``scale``, ``dtype``,
        ``storage``, ``memory_budget`` per shard, ``tol``, ``certify``,
        ``causal``, ``key_mask``; shards run on numpy, so ``backend`` may
        only be None, "auto" or "numpy") and the runtime's
        (:data:`RUNTIME_OPTIONS`): ``edits_per_call`` (default 8: queued
        edits a shard receives in one call when no answer is due first),
        ``replay_budget`` (seconds of shard compute a recovery may replay;
        None, the default, is adaptive), ``max_log_bytes`` (default 256 MiB),
        ``max_restarts`` (deaths of one shard in a row before a call gives up,
        default 3), ``cpus_per_shard`` (CPUs Ray reserves per actor, default
        1), ``blas_threads`` (the actor's BLAS/OpenMP threads, set in its
        ``runtime_env``: "auto", the default, is ``cpus_per_shard`` rounded
        up; None inherits Ray's defaults and starts actors faster) and
        ``checkpoint_dir`` (default: a temporary folder removed by
        :meth:`close`).

    Runtime complexity: construction O(H*n*m*(d+e)/shards) per shard, in
    parallel, plus moving ``Q, K, V`` to the shards.
    """

    _batched = True

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        shards: int = 2,
        by: str = "auto",
        address: str | None = None,
        **options: Any,
    ):
        runtime, rest = self._runtime_options(options)
        if rest.pop("backend", None) not in (None, "auto", "numpy"):
            raise ValueError("backend: shards run on numpy; expected None, 'auto' or 'numpy'")
        rest.pop("device", None)
        scale, dtype, key_mask = rest.pop("scale", 1.0), rest.pop("dtype", None), rest.pop("key_mask", None)
        unknown = set(rest) - set(ATTENTION_OPTIONS)
        if unknown:
            raise TypeError(f"ShardedAttention: unexpected keyword argument(s) {sorted(unknown)}")
        super().__init__(
            _host(Q),
            _host(K),
            _host(V),
            scale=scale,
            dtype=np.float64 if dtype is None else dtype,
            backend="numpy",
        )
        shard_options = {
            name: check(name, rest.get(name, default)) for name, (default, check) in ATTENTION_OPTIONS.items()
        }
        if key_mask is not None:
            mask = np.asarray(_host(key_mask))
            if mask.dtype != bool or mask.shape != (self.m,):
                raise ValueError(
                    f"key_mask: expected a boolean array of shape ({self.m},), got "
                    f"{mask.dtype} array of shape {mask.shape}"
                )
            key_mask = mask.copy()
        shard_options.update(scale=self._scale, dtype=self._dtype, key_mask=key_mask)
        shards = _count(1)("shards", shards)
        by = check_choice("by", by, ("heads", "rows", "auto"))
        self._H = math.prod(self.batch_shape)
        self._tau, self._causal = shard_options["tau"], shard_options["causal"]
        self._q_norm_max = float(cert.norms(self._Q).max(initial=0.0))
        k_norms = cert.norms(self._K.reshape(self._H, self.m, self.d))
        self._guard("K", self._q_norm_max, float(k_norms.max(initial=0.0)))
        head_blocks, row_blocks = _grid(by, shards, self._H, self.n, self._causal)
        self._buffers = {
            name: np.ascontiguousarray(x.reshape(self._H, *x.shape[-2:]))
            for name, x in (("Q", self._Q), ("K", self._K), ("V", self._V))
        }
        self._buffers["k_norms"] = k_norms
        self._expose()
        self._start(runtime, address, _split(self._H, head_blocks), _split(self.n, row_blocks), by)
        ray = self._ray
        try:
            pending = []
            for shard in self._shards:
                (h0, h1), (r0, r1) = shard.heads, shard.rows
                if shard.index % row_blocks == 0:
                    key_ref = ray.put(self._buffers["K"][h0:h1])
                    value_ref = ray.put(self._buffers["V"][h0:h1])
                query_ref = ray.put(np.ascontiguousarray(self._buffers["Q"][h0:h1, r0:r1]))
                shard.inputs = (query_ref, key_ref, value_ref, shard_options)
                pending.append(shard.actor.build.remote(*shard.inputs))
            for shard, seconds in zip(self._shards, ray.get(pending), strict=True):
                shard.base_seconds = seconds
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _runtime_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``options`` into the runtime's (checked, defaults filled) and the rest."""
        runtime = {
            name: check(name, options.get(name, default))
            for name, (default, check) in RUNTIME_OPTIONS.items()
        }
        return runtime, {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}

    def _start(
        self,
        runtime: dict[str, Any],
        address: str | None,
        head_edges: list[int],
        row_edges: list[int],
        by: str,
    ) -> None:
        """Join or start Ray, prepare the checkpoint folder and spawn one actor per shard."""
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address: expected a string or None, got {type(address).__name__}")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=address)
        self._ray = ray
        self._runtime = runtime
        self._by = by
        self._closed = False
        self._broken: BaseException | None = None
        self._owned_dir = runtime["checkpoint_dir"] is None
        folder = tempfile.mkdtemp(prefix="dynattn-shards-") if self._owned_dir else runtime["checkpoint_dir"]
        os.makedirs(folder, exist_ok=True)
        self._checkpoint_dir = folder
        self._instance = secrets.token_hex(6)
        self._counters = {"restarts": 0, "replayed_edits": 0, "checkpoints": 0, "checkpoint_failures": 0}
        self._last_recovery_seconds: float | None = None
        self._head_edges, self._row_edges = head_edges, row_edges
        self._shards: list[_Shard] = []
        for h0, h1 in zip(head_edges, head_edges[1:], strict=False):
            for r0, r1 in zip(row_edges, row_edges[1:], strict=False):
                self._shards.append(_Shard(len(self._shards), (h0, h1), [r0, r1], self._spawn(), None))
        self._finalizer = weakref.finalize(self, _release, self._shards, folder if self._owned_dir else None)

    def _spawn(self) -> Any:
        cpus, threads = self._runtime["cpus_per_shard"], self._runtime["blas_threads"]
        options: dict[str, Any] = {"num_cpus": cpus, "max_restarts": 0, "max_task_retries": 0}
        if threads is not None:
            count = str(max(1, math.ceil(cpus)) if threads == "auto" else threads)
            options["runtime_env"] = {"env_vars": dict.fromkeys(BLAS_THREAD_VARIABLES, count)}
        return _remote_worker(self._ray).options(**options).remote()

    def _expose(self) -> None:
        """Point ``Q, K, V`` (the base class's read-only accessors) at the used part of the buffers."""
        self._Q = self._buffers["Q"][:, : self.n].reshape(*self.batch_shape, self.n, self.d)
        self._K = self._buffers["K"][:, : self.m].reshape(*self.batch_shape, self.m, self.d)
        self._V = self._buffers["V"][:, : self.m].reshape(*self.batch_shape, self.m, self.e)
        self._k_norms = self._buffers["k_norms"][:, : self.m]

    def _grow(self, name: str, index: int, row: np.ndarray) -> None:
        """Store ``row: (H, width)`` at row ``index`` of buffer ``name`` (capacity doubles)."""
        buffer, used = self._buffers[name], self._buffers[name].shape[1]
        if index == used:
            bigger = np.empty((buffer.shape[0], 2 * used, *buffer.shape[2:]), dtype=buffer.dtype)
            bigger[:, :used] = buffer
            self._buffers[name] = buffer = bigger
        buffer[:, index] = row

    # ================================================================== the paper's operations
    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``K[head][i, j] += delta``, on the shards holding ``head``.

        Runtime complexity: that of ``DynamicAttention.update_k`` on each of
        them (O(ns) amortized, plus the fold), queued (see ``edits_per_call``).
        """
        self._entry("K", i, j, delta, head)

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``V[head][i, j] += delta``, on the shards holding ``head``.

        Runtime complexity: that of ``DynamicAttention.update_v`` on each of them, queued.
        """
        self._entry("V", i, j, delta, head)

    def update_k_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``K[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        Runtime complexity: that of the updates on each shard holding their
        heads, in parallel; one queued call per shard.
        """
        self._entries("K", rows, cols, deltas, heads, "deltas")

    def update_v_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``V[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        Runtime complexity: that of the updates on each shard holding their heads, in parallel.
        """
        self._entries("V", rows, cols, deltas, heads, "deltas")

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """``O[head][i, j]`` as a Python float, from the shard holding it.

        Runtime complexity: O(t) on that shard, plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        j = check_index("j", j, self.e, axis="output columns, e")
        return float(self.query_many([i], [j], heads=[h] if self.batch_shape else None)[0])

    def fold(self) -> None:
        """Fold every shard's pending rows into its snapshot (the paper's rebuild); queued.

        Runtime complexity: O(Hs*ns*e*t) per shard, in parallel.
        """
        self._queue(lambda shard: [("fold", (), {})])

    #: The paper's name for :meth:`fold`.
    rebuild = fold

    # ================================================================== answers
    def query_row(self, i: int) -> np.ndarray:
        """``O[..., i, :]`` for every head: a new ``(*batch, e)`` array.

        Runtime complexity: O(Hs*t*e) on each shard holding row i, in parallel, plus one round trip.
        """
        i = check_index("i", i, self.n, axis="query rows, n")
        return self._rows(np.array([i]))[..., 0, :]

    def query_rows(self, rows: Any) -> np.ndarray:
        """``O[..., rows, :]`` for every head: a new ``(*batch, k, e)`` array for ``k`` rows.

        Runtime complexity: O(Hs*k*t*e) on each shard for its rows, in parallel, plus one round trip.
        """
        return self._rows(check_index_array("rows", rows, self.n, axis="query rows, n"))

    def query_many(self, rows: Any, cols: Any, *, heads: Any = None) -> np.ndarray:
        """``O[heads[k]][rows[k], cols[k]]`` for every k: a new ``(k,)`` array.

        Runtime complexity: O(k*t) over the shards holding the entries, in parallel, plus one round trip.
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols: expected the same length, got {rows.size} and {cols.size}")
        flat = self._head_indices(heads, rows.size)
        owner = self._owners(flat, rows)
        asks, where = {}, {}
        for s in np.unique(owner).tolist():
            shard, mask = self._shards[s], owner == s
            local = (rows[mask] - shard.rows[0], cols[mask])
            asks[s], where[s] = [("query_many", local, {"heads": flat[mask] - shard.heads[0]})], mask
        out = np.empty(rows.size, dtype=self._dtype)
        for s, answers in self._exchange(asks).items():
            out[where[s]] = answers[0]
        return out

    def output(self) -> np.ndarray:
        """The whole output ``O: (*batch, n, e)``, gathered from every shard.

        Runtime complexity: O(Hs*ns*t*e) per shard, in parallel, plus moving O(H*n*e) values.
        """
        return self._rows(np.arange(self.n))

    def error_bound(self, i: int, *, head: Any = None) -> float:
        """The bound on ``|answer - exact| / max|V[:, j]|`` for answers about row ``i`` of ``head``
        (``DynamicAttention.error_bound``), from the shard holding them.

        Runtime complexity: O(t + e) on that shard, plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        s = int(self._owners(np.array([h]), np.array([i]))[0])
        shard = self._shards[s]
        ask = ("error_bound", (i - shard.rows[0],), {"head": h - shard.heads[0]})
        return float(self._exchange({s: [ask]})[s][0])

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """``O[:, rows, :]`` for every head, ``(*batch, k, e)``: one call per shard holding rows."""
        out = np.empty((self._H, rows.size, self.e), dtype=self._dtype)
        block = np.searchsorted(self._row_edges, rows, side="right") - 1
        asks: dict[int, list[Call]] = {}
        where: dict[int, np.ndarray] = {}
        for shard in self._shards:
            mask = block == shard.index % self._row_blocks
            if mask.any():
                asks[shard.index] = [("query_rows", (rows[mask] - shard.rows[0],), {})]
                where[shard.index] = mask
        for s, answers in self._exchange(asks).items():
            h0, h1 = self._shards[s].heads
            out[h0:h1, where[s]] = answers[0]
        return out.reshape(*self.batch_shape, rows.size, self.e)

    # ================================================================== token and row edits
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head; ``k: (*batch, d)``; queued for every shard.

        Runtime complexity: O(Hs*ns*d) per shard, in parallel, plus the fold.
        """
        self.set_token(check_index("c", c, self.m, axis="key rows, m"), k=k)

    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head; ``v: (*batch, e)``; queued for every shard.

        Runtime complexity: O(Hs*e) per shard (O(Hs*ns*d) on a row's first touch), plus the fold.
        """
        self.set_token(check_index("c", c, self.m, axis="value rows, m"), v=v)

    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head; ``q: (*batch, d)``; queued for the shards holding row i,
        which recompute it exactly.

        Runtime complexity: O(Hs*m*(d+e)) on each of them.
        """
        self.set_token(check_index("i", i, self.n, axis="query rows, n"), q=q)

    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows, checked together.

        Keys and values go to every shard, the query row to the shards holding row i.
        Runtime complexity: O(Hs*ns*d) per shard for k, O(Hs*e) for v, O(Hs*m*(d+e)) for q.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        if k is not None or v is not None:
            i = check_index("i", i, self.m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self.n, axis="query rows, n")
        q_row = None if q is None else self._query_row("q", q)
        k_row = None if k is None else self._key_row("k", k)
        v_row = None if v is None else self._row("v", v, self.e)

        def calls(shard: _Shard) -> list[Call]:
            rows = self._slices(shard, q=q_row, k=k_row, v=v_row)
            r0, r1 = shard.rows
            if "q" in rows and not r0 <= i < r1:
                del rows["q"]
            if not rows or "q" not in rows or r0 == 0:
                return [("set_token", (i,), rows)] if rows else []
            # the shard's query row i - r0 is not its key row i: the same edits, one by one
            split: list[Call] = [("set_key", (i, rows["k"]), {})] if "k" in rows else []
            split += [("set_value", (i, rows["v"]), {})] if "v" in rows else []
            return [*split, ("set_query", (i - r0, rows["q"]), {})]

        self._queue(calls)
        if k_row is not None:
            self._buffers["K"][:, i] = k_row
            self._k_norms[:, i] = cert.norms(k_row)
        if v_row is not None:
            self._buffers["V"][:, i] = v_row
        if q_row is not None:
            self._buffers["Q"][:, i] = q_row
            self._q_norm_max = max(self._q_norm_max, float(cert.norms(q_row).max()))

    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``.

        The key-value pair goes to every shard, the query row to the last row
        block. A key takes the index ``DynamicAttention.append`` gives it, so
        an append with a key waits for the shards. Returns ``(query_index,
        key_index)`` (None for what was not added).
        Runtime complexity: O(Hs*ns*d) per shard for a key, O(Hs*m*(d+e)) on
        the last row block's shards for a query, plus a round trip with a key.
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        if self._causal and (q is None or k is None):
            raise ValueError("append: a causal structure appends whole tokens; expected q, k and v")
        q_row = None if q is None else self._query_row("q", q)
        k_row = None if k is None else self._key_row("k", k)
        v_row = None if v is None else self._row("v", v, self.e)
        last = self._row_blocks - 1

        def calls(shard: _Shard) -> list[Call]:
            q_here = q_row if shard.index % self._row_blocks == last else None
            rows = self._slices(shard, q=q_here, k=k_row, v=v_row)
            return [("append", (), rows)] if rows else []

        self._queue(calls)
        query_index = key_index = None
        if q_row is not None:
            query_index = self.n
            self._grow("Q", self.n, q_row)
            self._q_norm_max = max(self._q_norm_max, float(cert.norms(q_row).max()))
            self.n += 1
            self._row_edges[-1] += 1
            for shard in self._shards[last :: self._row_blocks]:
                shard.rows[1] += 1
        if k_row is not None and v_row is not None:
            self._exchange({shard.index: [] for shard in self._shards})
            key_index = int(self._shards[0].last_result[1])
            self._grow("K", key_index, k_row)
            self._grow("V", key_index, v_row)
            self._grow("k_norms", key_index, cert.norms(k_row))
            self.m = max(self.m, key_index + 1)
        self._expose()
        return query_index, key_index

    def delete_key(self, c: int) -> None:
        """``DynamicAttention.delete_key(c)`` on every shard (key c hidden from every query); queued.

        Runtime complexity: O(Hs*ns) per shard, plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        self._queue(lambda shard: [("delete_key", (c,), {})])

    def set_key_mask(self, c: int, visible: bool) -> None:
        """Show or hide key c (a key padding mask update), on every shard; queued.

        Runtime complexity: O(Hs*ns*d) per shard, plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        visible = check_flag("visible", visible)
        self._queue(lambda shard: [("set_key_mask", (c, visible), {})])

    def flush(self) -> None:
        """Send every queued edit and wait until every shard applied it (restoring dead shards).

        Runtime complexity: the queued edits, plus one round trip.
        """
        self._exchange({shard.index: [] for shard in self._shards})

    # ================================================================== properties
    @property
    def heads(self) -> int:
        """Number of heads H (the product of ``batch_shape``; 1 without head axes)."""
        return self._H

    @property
    def tau(self) -> float:
        """Threshold exponent: shards fold every ``ceil(m**tau)`` pending rows."""
        return self._tau

    @property
    def causal(self) -> bool:
        """Whether query i sees only keys at positions <= its own."""
        return self._causal

    @property
    def threshold(self) -> int:
        """Pending rows at which a shard folds, ``ceil(m**tau)``."""
        return fold_threshold(self.m, self._tau)

    @property
    def shards(self) -> int:
        """Number of shard actors."""
        return len(self._shards)

    @property
    def layout(self) -> list[dict[str, tuple[int, int]]]:
        """Per shard: its flat head block and query row block, ``{"heads": (h0, h1), "rows": (r0, r1)}``."""
        return [{"heads": s.heads, "rows": (s.rows[0], s.rows[1])} for s in self._shards]

    @property
    def actors(self) -> tuple[Any, ...]:
        """The shards' current Ray actor handles (a restored shard gets a new one)."""
        return tuple(shard.actor for shard in self._shards)

    @property
    def edits_per_call(self) -> int:
        """Queued edits a shard receives in one call when no answer is due first (settable)."""
        return int(self._runtime["edits_per_call"])

    @edits_per_call.setter
    def edits_per_call(self, value: int) -> None:
        self._runtime["edits_per_call"] = RUNTIME_OPTIONS["edits_per_call"][1]("edits_per_call", value)

    @property
    def stats(self) -> dict[str, int]:
        """``DynamicAttention``'s counters summed over the shards, plus the runtime's:
        ``restarts``, ``replayed_edits``, ``checkpoints``, ``checkpoint_failures``.

        Runtime complexity: one round trip to every shard.
        """
        total = dict(self._counters)
        for (counters,) in self._exchange({s.index: [("stats", (), {})] for s in self._shards}).values():
            for name, value in counters.items():
                total[name] = total.get(name, 0) + int(value)
        return total

    @property
    def last_recovery_seconds(self) -> float | None:
        """Wall time of the last restore of a dead shard (new actor, checkpoint, replay), or None."""
        return self._last_recovery_seconds

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, shards={len(self._shards)}, by={self._by!r})"

    # ================================================================== persistence and life cycle
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole state: a JSON manifest at ``path`` and one ``.npz`` per shard beside it.

        Atomic as a whole: every shard writes ``<name>.<token>.shard<k>.npz``
        (``DynamicAttention.save``) under a new name, then the manifest naming
        them is written to a temporary file and renamed over ``path``; only
        then are the previous save's shard files removed. A failed save leaves
        the previous one intact. The folder must be reachable from every shard.
        Runtime complexity: O(size of the state) per shard, in parallel.
        """
        path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(path)
        token = secrets.token_hex(6)
        files = [f"{name}.{token}.shard{k}.npz" for k in range(len(self._shards))]
        temporary = os.path.join(folder, f".{name}.{token}.tmp")
        try:
            self._exchange({k: [("save", (os.path.join(folder, f),), {})] for k, f in enumerate(files)})
            previous = _manifest_files(path)
            manifest = {
                "format": MANIFEST_FORMAT,
                "class": type(self).__name__,
                "by": self._by,
                "batch_shape": list(self.batch_shape),
                "head_edges": self._head_edges,
                "row_edges": self._row_edges,
                "q_norm_max": self._q_norm_max,
                "files": files,
            }
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            for file in (*files, temporary):
                _remove(os.path.join(folder, file))
            raise
        for file in previous - set(files):
            _remove(os.path.join(folder, file))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, address: str | None = None, **runtime: Any
    ) -> ShardedAttention:
        """Start shards from a state written by :meth:`save`, in its layout.

        ``runtime`` takes the constructor's runtime options (:data:`RUNTIME_OPTIONS`,
        e.g. ``edits_per_call``). The manifest is checked first, then each
        shard file by ``DynamicAttention.load`` in its actor, then that the
        shards fit together. The files are copied as the shards' first
        checkpoints, so a later save over ``path`` does not affect a recovery.
        Raises :class:`dynattn.persistence.SnapshotError` saying what is wrong,
        ``OSError`` when a file cannot be read.
        Runtime complexity: O(size of the state) per shard, in parallel.
        """
        unknown = set(runtime) - set(RUNTIME_OPTIONS)
        if unknown:
            raise TypeError(f"ShardedAttention.load: unexpected keyword argument(s) {sorted(unknown)}")
        options, _ = cls._runtime_options(runtime)
        path = os.path.abspath(os.fspath(path))
        manifest = _read_manifest(path)
        self = cls.__new__(cls)
        self._start(options, address, manifest["head_edges"], manifest["row_edges"], manifest["by"])
        try:
            for shard, file in zip(self._shards, manifest["files"], strict=True):
                shard.base = self._checkpoint_path(shard)
                shutil.copyfile(os.path.join(os.path.dirname(path), file), shard.base)
            seconds = self._ray.get([shard.actor.restore.remote(shard.base) for shard in self._shards])
            for shard, took in zip(self._shards, seconds, strict=True):
                shard.base_seconds = took
            self._adopt(manifest, path)
        except BaseException as exc:
            self.close()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SnapshotError):
                raise cause from None
            raise
        return self

    def _adopt(self, manifest: dict[str, Any], path: str) -> None:
        """Take the driver's copy of ``Q, K, V`` and the options from loaded shards, which must fit."""
        answers = self._exchange(
            {s.index: [(a, (), {}) for a in ("Q", "K", "V", "config")] for s in self._shards}
        )
        first = answers[0][3]
        m, d, e = answers[0][1].shape[1], answers[0][0].shape[2], answers[0][2].shape[2]
        same = ("dtype", "scale", "tau", "causal")
        for shard in self._shards:
            Q, K, V, config = answers[shard.index]
            hs, ns = shard.heads[1] - shard.heads[0], shard.rows[1] - shard.rows[0]
            if (Q.shape, K.shape, V.shape) != ((hs, ns, d), (hs, m, d), (hs, m, e)) or any(
                config[k] != first[k] for k in same
            ):
                raise SnapshotError(path, f"shard {shard.index}: its file does not fit the manifest's layout")
        blocks = self._row_blocks
        self._xp = resolve_backend("numpy")
        self._dtype = self._output_dtype = np.dtype(first["dtype"])
        self._dtype_max = float(np.finfo(self._dtype).max)
        self._scale, self._tau, self._causal = (
            float(first["scale"]),
            float(first["tau"]),
            bool(first["causal"]),
        )
        self.batch_shape = tuple(manifest["batch_shape"])
        self._H = math.prod(self.batch_shape)
        heads = [self._shards[a : a + blocks] for a in range(0, len(self._shards), blocks)]
        self._buffers = {
            "Q": np.concatenate(
                [np.concatenate([answers[s.index][0] for s in row], axis=1) for row in heads]
            ),
            "K": np.concatenate([answers[row[0].index][1] for row in heads]),
            "V": np.concatenate([answers[row[0].index][2] for row in heads]),
        }
        self._buffers["k_norms"] = cert.norms(self._buffers["K"])
        self.n, self.m, self.d, self.e = self._row_edges[-1], m, d, e
        self._q_norm_max = float(manifest["q_norm_max"])
        self._expose()

    def close(self) -> None:
        """Stop the shard actors and remove their checkpoints (and the checkpoint folder if it
        was made here); Ray itself keeps running. Idempotent. Runtime complexity: O(shards)."""
        if not getattr(self, "_closed", True):
            self._closed = True
            self._finalizer()

    def __enter__(self) -> ShardedAttention:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ================================================================== fan-out and recovery
    def _queue(self, calls_of: Callable[[_Shard], list[Call]]) -> None:
        """Queue ``calls_of(shard)`` on every shard; a shard whose queue is full gets it now."""
        self._check_usable()
        for shard in self._shards:
            calls = calls_of(shard)
            if calls:
                shard.unsent.extend(calls)
                if len(shard.unsent) >= self._runtime["edits_per_call"]:
                    shard.in_flight.append(self._send(shard, []))
                    if len(shard.in_flight) > MAX_IN_FLIGHT:
                        self._collect([shard])

    def _send(self, shard: _Shard, asks: list[Call]) -> _Sent:
        """One call to ``shard``: its queued edits (logged), then ``asks``, then a checkpoint if due."""
        entry = None
        if shard.unsent:
            entry = _Entry(shard.next_seq, shard.unsent, _nbytes(shard.unsent))
            shard.next_seq += 1
            shard.log.append(entry)
            shard.unsent = []
        checkpoint = None
        if self._checkpoint_due(shard):
            checkpoint = self._checkpoint_path(shard)
        payload = pickle.dumps(
            (entry.calls if entry else [], asks, checkpoint), protocol=pickle.HIGHEST_PROTOCOL
        )
        return _Sent(shard.actor.run.remote(payload), entry, asks, checkpoint, shard.next_seq - 1)

    def _exchange(self, asks: dict[int, list[Call]]) -> dict[int, list[Any]]:
        """Send ``asks[s]`` with its queued edits to every shard ``s`` (one call each); return the answers."""
        self._check_usable()
        for s, calls in asks.items():
            self._shards[s].in_flight.append(self._send(self._shards[s], calls))
        return self._collect([self._shards[s] for s in asks])

    def _collect(self, shards: list[_Shard]) -> dict[int, list[Any]]:
        """Wait for every call in flight to ``shards`` with one ``ray.get``, restore dead shards (and
        ask them again); return each shard's answers to its last call."""
        ray, dead = self._ray, _actor_died(self._ray)
        try:
            try:
                results: list[Any] | None = ray.get([sent.ref for s in shards for sent in s.in_flight])
            except dead:
                results = None  # find the dead shards one by one
            answers: dict[int, list[Any]] = {}
            for shard in shards:
                sent_list, shard.in_flight = shard.in_flight, []
                if results is not None:
                    mine, results = results[: len(sent_list)], results[len(sent_list) :]
                else:
                    try:
                        mine = ray.get([sent.ref for sent in sent_list])
                    except dead:
                        for sent in sent_list:
                            if sent.checkpoint is not None:
                                _remove(sent.checkpoint)
                        answers[shard.index] = self._recover(shard, sent_list[-1].asks)
                        continue
                for sent, raw in zip(sent_list, mine, strict=True):
                    edit_seconds, answers[shard.index], saved, last = pickle.loads(raw)
                    self._settle(shard, sent, edit_seconds, saved)
                    shard.last_result = last if sent.entry is not None else shard.last_result
            return answers
        except (RuntimeError, ray.exceptions.RayTaskError) as exc:
            self._broken = exc
            raise RuntimeError(
                "ShardedAttention: a shard failed on a call the driver had accepted; the shards may now "
                f"disagree, so this structure is unusable: {exc}"
            ) from exc

    def _settle(self, shard: _Shard, sent: _Sent, edit_seconds: float, saved: Any) -> None:
        """Record a collected call: its edits' time in the log; a confirmed checkpoint cuts the log."""
        if sent.entry is not None:
            sent.entry.seconds = edit_seconds
        if sent.checkpoint is None:
            return
        if not isinstance(saved, float):
            self._counters["checkpoint_failures"] += 1
            _remove(sent.checkpoint)
            return
        if shard.base is not None:
            _remove(shard.base)
        shard.base, shard.inputs, shard.checkpoint_seconds = sent.checkpoint, (), saved
        shard.log = [entry for entry in shard.log if entry.seq > sent.covers]
        self._counters["checkpoints"] += 1

    def _recover(self, shard: _Shard, asks: list[Call]) -> list[Any]:
        """Restore a dead shard (new actor, checkpoint or build, log replayed), then answer ``asks``."""
        ray, dead = self._ray, _actor_died(self._ray)
        start = time.perf_counter()
        edits = [call for entry in shard.log for call in entry.calls]
        for _ in range(self._runtime["max_restarts"] + 1):
            _kill(ray, shard.actor)
            shard.actor = actor = self._spawn()
            restore = actor.restore.remote(shard.base) if shard.base else actor.build.remote(*shard.inputs)
            replay = actor.run.remote(pickle.dumps((edits, [], None)))
            question = actor.run.remote(pickle.dumps(([], asks, None)))
            try:
                _, replayed, answered = ray.get([restore, replay, question])
                break
            except dead:
                continue
        else:
            raise RuntimeError(f"shard {shard.index} died {self._runtime['max_restarts'] + 1} times in a row")
        seconds, _, _, last = pickle.loads(replayed)
        shard.last_result = last if edits else shard.last_result
        for entry in shard.log:  # the replay's time, spread over the log by number of edits
            entry.seconds = seconds * len(entry.calls) / max(1, len(edits))
        self._counters["restarts"] += 1
        self._counters["replayed_edits"] += len(edits)
        self._last_recovery_seconds = time.perf_counter() - start
        return pickle.loads(answered)[1]

    def _checkpoint_due(self, shard: _Shard) -> bool:
        if any(sent.checkpoint for sent in shard.in_flight):
            return False
        budget = self._runtime["replay_budget"]
        if budget is None:
            budget = max(1.0, 10 * (shard.checkpoint_seconds or 0.0))
        if not shard.log and shard.base is not None:
            return False
        log_bytes = sum(entry.nbytes for entry in shard.log)
        return shard.replay_cost() > budget or log_bytes > self._runtime["max_log_bytes"]

    def _checkpoint_path(self, shard: _Shard) -> str:
        return os.path.join(
            self._checkpoint_dir, f"{self._instance}.shard{shard.index}.{secrets.token_hex(4)}.npz"
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("ShardedAttention: this structure was closed; its shards are gone")
        if self._broken is not None:
            raise RuntimeError(f"ShardedAttention: unusable after a shard failure: {self._broken}")

    # ================================================================== routing and argument checks
    @property
    def _row_blocks(self) -> int:
        return len(self._row_edges) - 1

    def _owners(self, heads: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The shard holding each ``(head, row)`` pair."""
        a = np.searchsorted(self._head_edges, heads, side="right") - 1
        b = np.searchsorted(self._row_edges, rows, side="right") - 1
        return a * self._row_blocks + b

    def _slices(self, shard: _Shard, **rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The shard's heads of each given ``(H, width)`` row."""
        h0, h1 = shard.heads
        return {name: value[h0:h1] for name, value in rows.items() if value is not None}

    def _entry(self, target: str, i: Any, j: Any, delta: Any, head: Any) -> None:
        """Check one entry update under the names of ``update_k`` / ``update_v``, then queue it."""
        h = self._head_index(head)
        i = check_index("i", i, self.m, axis=f"{'key' if target == 'K' else 'value'} rows, m")
        j = check_index("j", j, self.d if target == "K" else self.e, axis="columns")
        delta = check_scalar("delta", delta)
        self._entries(target, [i], [j], [delta], [h] if self.batch_shape else None, "delta")

    def _entries(self, target: str, rows: Any, cols: Any, deltas: Any, heads: Any, name: str) -> None:
        """Check a batch of entry updates as ``DynamicAttention`` does, then queue it per head block."""
        width = self.d if target == "K" else self.e
        rows = check_index_array("rows", rows, self.m, axis="key/value rows, m")
        cols = check_index_array("cols", cols, width, axis="columns")
        values = np.asarray(_host(deltas))
        if values.shape != rows.shape or cols.shape != rows.shape:
            raise ValueError(
                f"rows, cols, deltas: expected equal lengths, got {rows.shape}, {cols.shape}, {values.shape}"
            )
        flat = self._head_indices(heads, rows.size)
        if values.size and not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            raise TypeError(f"deltas: expected real numbers, got dtype {values.dtype}")
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise ValueError("deltas: expected finite values, got NaN or inf")
        array = self._buffers[target]
        trial: dict[tuple[int, int, int], Any] = {}
        norms: dict[tuple[int, int], float] = {}
        for h, c, j, delta in zip(flat.tolist(), rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            old = trial.get((h, c, j), array[h, c, j])
            trial[h, c, j] = new = self._checked_sum(name, old, delta, target)
            if target == "K":
                before = norms.get((h, c), float(self._k_norms[h, c]))
                norms[h, c] = norm = cert.updated_norm(before, float(old), float(new))
                self._guard(name, self._q_norm_max, norm)
        for (h, c, j), new in trial.items():
            array[h, c, j] = new
        for (h, c), norm in norms.items():
            self._k_norms[h, c] = norm
        method = "update_k_many" if target == "K" else "update_v_many"
        block = np.searchsorted(self._head_edges, flat, side="right") - 1

        def calls(shard: _Shard) -> list[Call]:
            mask = block == shard.index // self._row_blocks
            if not mask.any():
                return []
            return [(method, (rows[mask], cols[mask], values[mask]), {"heads": flat[mask] - shard.heads[0]})]

        self._queue(calls)

    def _row(self, name: str, value: Any, width: int) -> np.ndarray:
        """A checked copy of a row argument ``(*batch, width)``, as ``(H, width)``."""
        row = check_rows(name, _host(value), dtype=self._dtype, shape=(*self.batch_shape, width))
        return row.reshape(self._H, width)

    def _key_row(self, name: str, value: Any) -> np.ndarray:
        k = self._row(name, value, self.d)
        self._guard(name, self._q_norm_max, float(cert.norms(k).max()))
        return k

    def _query_row(self, name: str, value: Any) -> np.ndarray:
        q = self._row(name, value, self.d)
        self._guard(name, float(cert.norms(q).max()), float(self._k_norms.max(initial=0.0)))
        return q

    def _guard(self, name: str, q_norm: float, k_norm: float) -> None:
        """``DynamicAttention``'s range guard: scaled dot products must stay below 1e300."""
        reach = 0.0 if q_norm == 0 or k_norm == 0 else q_norm * k_norm * max(1.0, abs(self._scale))
        if reach > 1e300:
            raise ValueError(
                f"{name}: dot products |Q_i||K_c| times max(1, |scale|) could reach {reach:.3g}, "
                "beyond float64's range; expected inputs whose (scaled) dot products stay below 1e300"
            )

    def _head_index(self, head: Any) -> int:
        """The flat head index named by ``head=`` (the rules of ``DynamicAttention``)."""
        axes = f"flattened leading axes {self.batch_shape}"
        if not self.batch_shape:
            if head is not None and as_index("head", head) != 0:
                raise IndexError(
                    f"head={head!r} is out of range: this structure has no head axis; pass head=None"
                )
            return 0
        if head is None:
            raise TypeError(f"head: expected an index into the leading axes {self.batch_shape}, got None")
        if isinstance(head, tuple):
            if len(head) != len(self.batch_shape):
                raise IndexError(f"head: expected a {len(self.batch_shape)}-tuple, got {head!r}")
            parts = [
                check_index(f"head[{k}]", x, size, axis=f"leading axis {k} of {self.batch_shape}")
                for k, (x, size) in enumerate(zip(head, self.batch_shape, strict=True))
            ]
            return int(np.ravel_multi_index(parts, self.batch_shape))
        return check_index("head", head, self._H, axis=axes)

    def _head_indices(self, heads: Any, size: int) -> np.ndarray:
        """``heads=`` as ``size`` flat head indices (None: head 0, without a head axis)."""
        if heads is None:
            if self.batch_shape:
                raise TypeError(f"heads: expected head indices for leading axes {self.batch_shape}, got None")
            return np.zeros(size, dtype=np.int64)
        flat = check_index_array("heads", heads, self._H, axis=f"flattened leading axes {self.batch_shape}")
        if flat.size != size:
            raise ValueError(f"heads: expected {size} head indices, got {flat.size}")
        return flat


# ====================================================================== helpers
_REMOTE_WORKER: Any = None


def _remote_worker(ray: Any) -> Any:
    """:class:`ShardWorker` as a Ray actor class (made once)."""
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(ShardWorker)
    return _REMOTE_WORKER


def _actor_died(ray: Any) -> type[BaseException]:
    """The exception Ray raises for a call on an actor that died."""
    return ray.exceptions.RayActorError


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _release(shards: list[_Shard], owned_dir: str | None) -> None:
    """Kill the shards' actors; remove their checkpoints and an owned checkpoint folder."""
    try:
        import ray

        alive = ray.is_initialized()
    except ImportError:
        alive = False
    for shard in shards:
        if alive:
            _kill(ray, shard.actor)
        if shard.base is not None:
            _remove(shard.base)
        for sent in shard.in_flight:
            if sent.checkpoint is not None:
                _remove(sent.checkpoint)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _manifest_files(path: str) -> set[str]:
    """Shard files named by the manifest at ``path`` (none if it is missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if isinstance(f, str) and os.path.basename(f) == f}


def _read_manifest(path: str) -> dict[str, Any]:
    """The checked manifest at ``path`` (SnapshotError saying what is wrong)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(path, f"not a ShardedAttention manifest: not UTF-8 JSON ({exc})") from exc

    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise SnapshotError(path, problem)

    require(
        isinstance(manifest, dict) and manifest.get("class") == "ShardedAttention",
        "not a ShardedAttention manifest (expected a JSON object with class 'ShardedAttention')",
    )
    require(manifest.get("format") == MANIFEST_FORMAT, f"manifest 'format': expected {MANIFEST_FORMAT}")
    batch = manifest.get("batch_shape")
    require(
        isinstance(batch, list) and all(type(x) is int and x > 0 for x in batch),
        f"manifest 'batch_shape': expected a list of positive integers, got {batch!r}",
    )
    require(
        manifest.get("by") in ("heads", "rows", "auto"), "manifest 'by': expected 'heads', 'rows' or 'auto'"
    )
    q_norm = manifest.get("q_norm_max")
    require(
        type(q_norm) in (int, float) and math.isfinite(q_norm) and q_norm >= 0,
        f"manifest 'q_norm_max': expected a finite number >= 0, got {q_norm!r}",
    )
    for name, end in (("head_edges", math.prod(batch)), ("row_edges", None)):
        edges = manifest.get(name)
        require(
            isinstance(edges, list)
            and len(edges) >= 2
            and all(type(x) is int for x in edges)
            and edges[0] == 0
            and all(a < b for a, b in zip(edges, edges[1:], strict=False))
            and (end is None or edges[-1] == end),
            f"manifest {name!r}: expected increasing block edges from 0"
            + ("" if end is None else f" to {end} (the heads)")
            + f", got {edges!r}",
        )
    files = manifest.get("files")
    count = (len(manifest["head_edges"]) - 1) * (len(manifest["row_edges"]) - 1)
    require(
        isinstance(files, list)
        and len(files) == count
        and all(
            isinstance(f, str) and f and os.path.basename(f) == f and not f.startswith(".") for f in files
        ),
        f"manifest 'files': expected {count} plain file names, got {files!r}",
    )
    return manifest
