"""One attention state sharded over Ray actors, with recovery when an actor dies.

:class:`ShardedAttention` holds the state of one :class:`~dynattn.DynamicAttention`
split over ``shards`` Ray actors, each running a ``DynamicAttention`` over a block
of heads and/or query rows, and answers as one structure would.

Layout
------
Heads are independent problems, and query rows are independent once ``K`` and
``V`` are known, so the shards form a grid: ``head_blocks x row_blocks = shards``.
Shard ``(a, b)`` holds the heads of head block ``a`` (contiguous flat head
indices), the query rows of row block ``b`` (contiguous) and *all* keys and
values of its heads. ``by="heads"`` splits heads only, ``by="rows"`` query rows
only, ``by="auto"`` splits heads when ``shards <= heads`` and otherwise uses
the largest number of head blocks that divides ``shards`` and splits rows
within them. A causal structure is split by heads only (a shard cannot give
its query rows positions other than ``0..n-1``). Blocks differ in size by at
most one; appended query rows join the last row block.

Edits and answers
-----------------
Every call is validated on the driver first, with the checks
``DynamicAttention`` makes (:mod:`dynattn._validation`, the same messages), so a
rejected call reaches no shard. An accepted call goes to the shards owning the
heads and rows it touches, as *one* actor call per shard (a batch of entry
updates is split by head block, one call each); arrays travel in the call
(Ray moves large ones through its object store). Answers are gathered with a
single ``ray.get`` over every shard involved, and assembled on the driver.

* Token and row edits (``set_key``, ``set_value``, ``set_query``, ``set_token``,
  ``append``, ``delete_key``, ``set_key_mask``, ``fold``) are *pipelined*: the
  call returns once it is submitted, and the shards apply it in submission
  order (Ray runs a caller's calls to one actor in order). The driver waits
  for them at the next answer, at :meth:`ShardedAttention.flush`, or once
  ``pipeline_depth`` calls are outstanding on a shard. The driver's checks
  cover everything a shard checks for these calls, so they cannot fail there.
* Entry updates (``update_k``, ``update_v`` and their ``_many`` batches) wait
  for the shards: whether ``K[h, i, j] + delta`` stays finite, or a key's norm
  in range, depends on state that only the shard holds. If any shard rejects
  the call, the shards that applied it are rolled back (restarted from their
  checkpoint and log without the call) and the shard's error is raised, so a
  rejected call changes no shard.

Fault tolerance
---------------
The driver keeps, for every shard, the calls it sent since the shard's last
checkpoint (the *log*) and the time the shard took to run each. When the
log's replay cost (the sum of those times, plus the shard's build time while
its base is still the initial build) reaches ``replay_budget`` seconds, or its
arrays reach ``max_log_bytes``, the driver asks the shard for a checkpoint
(``DynamicAttention.save``): to ``checkpoint_dir`` on local disk
(``checkpoint="disk"``, the default), or into Ray's object store
(``checkpoint="object_store"``, owned by the driver). A checkpoint is taken in
line with the shard's other calls, covers every call before it, and replaces
the previous one only once it is complete; the log is then cut. The default
``replay_budget=None`` is adaptive: ten times the shard's last checkpoint time
and at least one second, so checkpoints cost at most about a tenth of the
shard's compute and a recovery replays at most ten checkpoint-times of it.

When Ray reports that an actor died (``RayActorError``: killed, its process
crashed, its node lost), the next call that waits on that shard starts a new
actor, restores its checkpoint (or rebuilds it from the inputs, kept in the
object store until the first checkpoint), replays its log and then answers
the call; a pipelined edit that was in flight is in the log and is replayed
too. A shard that dies again during recovery is restarted up to
``max_restarts`` times in a row before the call raises.

What is covered: the death of any number of shard actors, at any time,
including during a checkpoint or a recovery, as long as the driver lives and
the checkpoints can be read. What is not covered: the death of the driver
(the logs live in its memory; :meth:`ShardedAttention.save` is the way to keep
a state across driver restarts); loss of the checkpoint itself (a local-disk
checkpoint on a node that is lost, on a multi-node cluster without a shared
``checkpoint_dir``; an object-store checkpoint whose node is lost); a call
that hangs rather than fails (there are no timeouts); and Ray's own failures
(the head node, the GCS). Answers after a recovery are those of a structure
that received the same calls, within the accuracy target, not bit-for-bit:
the replay happens from the checkpoint, in one call.

Requires Ray (``pip install "dynattn[ray]"``), imported when first used. On a
multi-node cluster, ``checkpoint_dir`` and the folders given to ``save`` and
``load`` must be shared by the nodes (or use ``checkpoint="object_store"``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynattn import certificate as cert
from dynattn._validation import (
    as_index,
    check_choice,
    check_dtype,
    check_flag,
    check_index,
    check_index_array,
    check_matrix,
    check_rows,
    check_scalar,
)
from dynattn.persistence import SnapshotError
from dynattn.storage import STORAGES
from dynattn.structure import DynamicAttention, fold_threshold

__all__ = ["INSTALL_HINT", "ShardedAttention"]

#: What to run when Ray is missing.
INSTALL_HINT = 'pip install "dynattn[ray]"'
#: Version of the manifest written by :meth:`ShardedAttention.save`.
MANIFEST_FORMAT = 1
#: Adaptive replay budget: this many times the shard's last checkpoint time ...
AUTO_BUDGET_FACTOR = 10.0
#: ... and at least this many seconds.
AUTO_BUDGET_FLOOR = 1.0
#: Environment variables that set the BLAS/OpenMP thread count of a shard's process.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Calls a shard may apply: the edits of DynamicAttention (logged and replayed) ...
EDIT_METHODS = frozenset(
    {
        "set_key",
        "set_value",
        "set_query",
        "set_token",
        "append",
        "delete_key",
        "set_key_mask",
        "update_k",
        "update_v",
        "update_k_many",
        "update_v_many",
        "fold",
    }
)
#: ... and what it may answer (never logged).
ASK_METHODS = frozenset(
    {"query", "query_row", "query_rows", "query_many", "output", "error_bound", "save", "describe", "array"}
)
#: A shard call: (method, positional arguments, keyword arguments).
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"dynattn.distributed needs Ray, an optional dependency of dynattn: {INSTALL_HINT}"
        ) from exc
    return ray


# ====================================================================== inside the actor
def _timed(action: Callable[[], Any]) -> tuple[BaseException | None, Any, float]:
    """Run ``action``: ``(error or None, value, seconds)``; an exception is returned, not raised."""
    start = time.perf_counter()
    try:
        value = action()
    except Exception as exc:  # returned to the driver, which decides
        return exc, None, time.perf_counter() - start
    return None, value, time.perf_counter() - start


class ShardWorker:
    """What runs in one shard's Ray actor: a ``DynamicAttention`` and the calls on it.

    Every method returns ``(error, value, seconds)``: the exception a call
    raised (None when it succeeded), its result and the time it took in the
    actor. Exceptions are returned rather than raised so that one ``ray.get``
    over many shards only ever raises for a dead actor.
    """

    def __init__(self) -> None:
        self._att: Any = None

    # ------------------------------------------------------------------ state
    def build(self, Q: Any, K: Any, V: Any, options: dict[str, Any]) -> tuple[Any, Any, float]:
        """A new structure from the shard's inputs. Runtime complexity: O(Hs*ns*m*(d+e))."""
        return _timed(lambda: self._set(DynamicAttention(Q, K, V, backend="numpy", **options)))

    def restore_file(self, path: str) -> tuple[Any, Any, float]:
        """The structure saved in ``path``. Runtime complexity: O(size of the state)."""
        return _timed(lambda: self._set(DynamicAttention.load(path, backend="numpy")))

    def restore_bytes(self, data: bytes) -> tuple[Any, Any, float]:
        """The structure saved as ``data`` (a snapshot's bytes). Runtime complexity: O(size of the state)."""

        def load() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="dynattn-shard-") as folder:
                path = os.path.join(folder, "shard.npz")
                with open(path, "wb") as file:
                    file.write(data)
                return self._set(DynamicAttention.load(path, backend="numpy"))

        return _timed(load)

    def checkpoint(self, path: str | None) -> tuple[tuple[Any, Any, float], bytes | None]:
        """Save the structure to ``path``, or (None) return its snapshot's bytes as a second result.

        Runtime complexity: O(size of the state).
        """
        payload: list[bytes] = []

        def save() -> None:
            if path is not None:
                self._att.save(path)
                return
            with tempfile.TemporaryDirectory(prefix="dynattn-shard-") as folder:
                file_path = os.path.join(folder, "shard.npz")
                self._att.save(file_path)
                with open(file_path, "rb") as file:
                    payload.append(file.read())

        status = _timed(save)
        return status, (payload[0] if payload else None)

    def _set(self, att: DynamicAttention) -> dict[str, Any]:
        self._att = att
        return self.describe()

    # ------------------------------------------------------------------ calls
    def apply(self, calls: Sequence[Call]) -> tuple[Any, Any, float]:
        """Apply edits in order. ``error`` is ``(index of the failed call, exception)``; ``value``
        the largest norm of a key row an entry update touched (None without such updates).

        Runtime complexity: that of the calls.
        """
        start = time.perf_counter()
        key_norm = None
        for index, (method, args, kwargs) in enumerate(calls):
            try:
                if method not in EDIT_METHODS:
                    raise ValueError(f"shard call: {method!r} is not an edit")
                getattr(self._att, method)(*args, **kwargs)
                if method in ("update_k", "update_k_many"):
                    touched = np.atleast_1d(np.asarray(args[0], dtype=np.int64))
                    norms = cert.norms(np.asarray(self._att.K)[:, touched])
                    key_norm = max(key_norm or 0.0, float(norms.max(initial=0.0)))
            except Exception as exc:  # returned to the driver, which rolls back
                return (index, exc), key_norm, time.perf_counter() - start
        return None, key_norm, time.perf_counter() - start

    def replay(self, entries: Sequence[Sequence[Call]]) -> list[tuple[Any, Any, float]]:
        """:meth:`apply` for each logged entry, in order (a recovery).

        Runtime complexity: that of the calls.
        """
        return [self.apply(calls) for calls in entries]

    def ask(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, float]:
        """An answer: ``method`` of the structure (or of this worker: ``describe``, ``array``)."""

        def answer() -> Any:
            if method not in ASK_METHODS:
                raise ValueError(f"shard call: {method!r} is not a question")
            target = self if method in ("describe", "array") else self._att
            return getattr(target, method)(*args, **kwargs)

        return _timed(answer)

    def describe(self) -> dict[str, Any]:
        """Sizes, options, storage, pending rows and counters of the structure."""
        att = self._att
        return {
            "n": att.n,
            "m": att.m,
            "d": att.d,
            "e": att.e,
            "pending": att.pending,
            "threshold": att.threshold,
            "stats": dict(att.stats),
            "nbytes": att.nbytes,
            **att.config(),
        }

    def array(self, name: str) -> np.ndarray:
        """A copy of ``Q``, ``K`` or ``V``."""
        if name not in ("Q", "K", "V"):
            raise ValueError(f"array: expected 'Q', 'K' or 'V', got {name!r}")
        return np.array(getattr(self._att, name))

    def ping(self) -> tuple[Any, Any, float]:
        """Nothing (measures the cost of a call)."""
        return None, None, 0.0


_REMOTE_WORKER: Any = None


def _remote_worker(ray: Any) -> Any:
    """:class:`ShardWorker` as a Ray actor class (made once)."""
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(ShardWorker)
    return _REMOTE_WORKER


# ====================================================================== driver bookkeeping
@dataclass
class _Entry:
    """One logged call to one shard (a shard's part of one public edit)."""

    op: int
    calls: list[Call]
    nbytes: int
    #: submitted without waiting: an error surfaces at the next call that waits
    deferred: bool
    seconds: float = 0.0
    settled: bool = False


@dataclass
class _Pending:
    """A call submitted to a shard and not yet collected."""

    kind: str  # "edit", "ask" or "checkpoint"
    ref: Any
    entry: _Entry | None = None
    covered_op: int = -1
    path: str | None = None
    payload: Any = None


@dataclass
class _Base:
    """Where a shard's state is restored from: its inputs, a file or a snapshot in the object store."""

    kind: str  # "build", "file" or "bytes"
    refs: tuple[Any, ...] = ()
    path: str | None = None
    #: the file is a checkpoint of this structure (deleted when replaced)
    owned: bool = False
    #: time the restore takes, counted in the replay cost while the base is the build
    seconds: float = 0.0


@dataclass
class _Shard:
    index: int
    heads: tuple[int, int]
    rows: list[int]
    actor: Any
    base: _Base
    log: list[_Entry] = field(default_factory=list)
    in_flight: deque[_Pending] = field(default_factory=deque)
    log_seconds: float = 0.0
    log_bytes: int = 0
    last_checkpoint_seconds: float | None = None
    checkpoint_count: int = 0

    def replay_cost(self) -> float:
        return self.log_seconds + (self.base.seconds if self.base.kind == "build" else 0.0)

    def recount(self) -> None:
        self.log_seconds = sum(entry.seconds for entry in self.log)
        self.log_bytes = sum(entry.nbytes for entry in self.log)


@dataclass
class _Failure:
    op: int
    shard: int
    index: int
    error: BaseException


def _host(value: Any) -> Any:
    """A host numpy view of a torch tensor; anything else unchanged."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


def _nbytes(calls: Iterable[Call]) -> int:
    total = 0
    for _, args, kwargs in calls:
        for value in (*args, *kwargs.values()):
            total += getattr(value, "nbytes", 8)
    return total


def _check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int (the rules of :func:`dynattn._validation.as_index`) of at least ``minimum``."""
    count = as_index(name, value)
    if count < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {count}")
    return count


def _split(size: int, parts: int) -> list[tuple[int, int]]:
    """``[0, size)`` in ``parts`` contiguous blocks whose sizes differ by at most one."""
    edges = [size * k // parts for k in range(parts + 1)]
    return [(edges[k], edges[k + 1]) for k in range(parts)]


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
            f"shards={shards}: a causal structure is split by heads only (at most {heads} shards here), "
            "since a shard's query rows always take positions 0..n-1; use shards <= heads"
        )
    if row_blocks > n:
        raise ValueError(
            f"shards={shards}: {row_blocks} row blocks need at least that many query rows, n={n}"
        )
    return head_blocks, row_blocks


# ====================================================================== the driver
class ShardedAttention:
    """Softmax attention kept current under edits, its state sharded over Ray actors.

    Answers what a single :class:`~dynattn.DynamicAttention` given the same
    inputs and calls would (within the accuracy target), with the work of
    every call split over the shards that own the heads and query rows it
    touches, and survives the death of shard actors (see the module
    docstring for the layout, the pipelining of edits and the recovery).

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
        How the state is split: blocks of heads, blocks of query rows, or
        heads first and rows where there are more shards than heads.
    address : str or None, keyword-only
        Ray cluster to join (``ray.init(address=...)``) when Ray is not yet
        initialized in this process; None starts a local one. Ignored when
        Ray is already initialized.
    cpus_per_shard : float, keyword-only
        CPUs Ray reserves for each shard (default 1). The shard's BLAS and
        OpenMP thread count is this, rounded up, at least 1.
    checkpoint : {"disk", "object_store"}, keyword-only
        Where shard checkpoints go (default ``"disk"``).
    checkpoint_dir : str or path-like, keyword-only
        Folder for disk checkpoints (default: a new temporary folder, removed
        by :meth:`close`). Shared by all nodes on a multi-node cluster.
    replay_budget : float or None, keyword-only
        Seconds of shard compute a recovery may have to replay: a shard is
        checkpointed when its log's replay cost reaches it. None (default):
        ten times the shard's last checkpoint time, at least 1 s.
    max_log_bytes : int, keyword-only
        A shard is also checkpointed when the arrays in its log reach this
        many bytes (default 256 MiB).
    pipeline_depth : int, keyword-only
        Edits that may be outstanding on a shard before the driver waits for
        them (default 64).
    max_restarts : int, keyword-only
        Restarts of one shard in a row before a call gives up (default 3).
    **options
        ``DynamicAttention``'s options: ``tau``, ``scale``, ``dtype``,
        ``storage``, ``memory_budget`` (per shard), ``tol``, ``certify``,
        ``causal``, ``key_mask``. Shards run on numpy; answers are numpy
        arrays (``backend`` may only be None, ``"auto"`` or ``"numpy"``).

    Runtime complexity: construction O(H*n*m*(d+e)/shards) per shard, in
    parallel, plus moving ``Q, K, V`` to the shards; see each method.
    """

    def __init__(
        self,
        Q: Any,
        K: Any,
        V: Any,
        *,
        shards: int = 2,
        by: str = "auto",
        address: str | None = None,
        cpus_per_shard: float = 1.0,
        checkpoint: str = "disk",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        replay_budget: float | None = None,
        max_log_bytes: int = 256 << 20,
        pipeline_depth: int = 64,
        max_restarts: int = 3,
        **options: Any,
    ):
        unknown = set(options) - {
            "tau",
            "scale",
            "dtype",
            "storage",
            "memory_budget",
            "tol",
            "certify",
            "causal",
            "key_mask",
            "backend",
            "device",
        }
        if unknown:
            raise TypeError(f"ShardedAttention: unexpected keyword argument(s) {sorted(unknown)}")
        backend = options.pop("backend", None)
        options.pop("device", None)
        if backend not in (None, "auto", "numpy"):
            raise ValueError(
                f"backend: shards run on numpy; expected None, 'auto' or 'numpy', got {backend!r}"
            )
        shards = _check_count("shards", shards, 1)
        by = check_choice("by", by, ("heads", "rows", "auto"))
        dtype = check_dtype(np.float64 if options.get("dtype") is None else options["dtype"])
        queries = check_matrix("Q", _host(Q), dtype=dtype, batch=None)
        batch = queries.shape[:-2]
        n, d = queries.shape[-2:]
        keys = check_matrix("K", _host(K), dtype=dtype, cols=d, col_name="columns (d, as Q has)", batch=batch)
        m = keys.shape[-2]
        values = check_matrix("V", _host(V), dtype=dtype, rows=m, row_name="rows (m, as K has)", batch=batch)
        shard_options = self._check_options(options, dtype, m)
        self._configure(
            batch_shape=batch,
            sizes=(n, m, d, values.shape[-1]),
            dtype=dtype,
            scale=shard_options["scale"],
            tau=shard_options["tau"],
            causal=shard_options["causal"],
            by=by,
        )
        self._q_norm_max = float(cert.norms(queries).max())
        self._k_norm_max = float(cert.norms(keys).max())
        self._guard_logit_reach("K", self._q_norm_max, self._k_norm_max)
        head_blocks, row_blocks = _grid(by, shards, self._H, n, self._causal)
        self._start_runtime(
            address=address,
            cpus_per_shard=cpus_per_shard,
            checkpoint=checkpoint,
            checkpoint_dir=checkpoint_dir,
            replay_budget=replay_budget,
            max_log_bytes=max_log_bytes,
            pipeline_depth=pipeline_depth,
            max_restarts=max_restarts,
        )
        ray = self._ray
        flat = [x.reshape(self._H, *x.shape[-2:]) for x in (queries, keys, values)]
        try:
            pending = []
            for a, (h0, h1) in enumerate(_split(self._H, head_blocks)):
                key_ref, value_ref = ray.put(flat[1][h0:h1]), ray.put(flat[2][h0:h1])
                for b, (r0, r1) in enumerate(_split(n, row_blocks)):
                    query_ref = ray.put(np.ascontiguousarray(flat[0][h0:h1, r0:r1]))
                    base = _Base("build", refs=(query_ref, key_ref, value_ref, shard_options))
                    shard = _Shard(a * row_blocks + b, (h0, h1), [r0, r1], self._spawn(), base)
                    self._shards.append(shard)
                    pending.append(shard.actor.build.remote(query_ref, key_ref, value_ref, shard_options))
            self._grid = (head_blocks, row_blocks)
            self._finalizer = weakref.finalize(self, _release, self._shards, self._owned_dir)
            for shard, (error, _, seconds) in zip(self._shards, ray.get(pending), strict=True):
                if error is not None:
                    raise error
                shard.base.seconds = seconds
        except BaseException:
            self.close()
            raise
        self._after_layout()
        for shard in self._shards:
            self._maybe_checkpoint(shard)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_options(options: dict[str, Any], dtype: np.dtype, m: int) -> dict[str, Any]:
        """DynamicAttention's options, checked as it checks them, ready to send to every shard."""
        tau = check_scalar("tau", options.get("tau", 0.5), low=0.0, high=1.0)
        scale = check_scalar("scale", options.get("scale", 1.0))
        storage = check_choice("storage", options.get("storage", "auto"), (*STORAGES, "auto"))
        budget = check_scalar("memory_budget", options.get("memory_budget", 1 << 30), low=0.0)
        tol = options.get("tol")
        if tol is not None:
            tol = check_scalar("tol", tol, low=0.0, include_boundaries="neither")
        certify = check_flag("certify", options.get("certify", True))
        causal = check_flag("causal", options.get("causal", False))
        key_mask = options.get("key_mask")
        if key_mask is not None:
            mask = np.asarray(_host(key_mask))
            if mask.dtype != bool or mask.shape != (m,):
                raise ValueError(
                    f"key_mask: expected a boolean array of shape ({m},), got "
                    f"{mask.dtype} array of shape {mask.shape}"
                )
            key_mask = mask.copy()
        return {
            "tau": tau,
            "scale": scale,
            "dtype": dtype,
            "storage": storage,
            "memory_budget": int(budget),
            "tol": tol,
            "certify": certify,
            "causal": causal,
            "key_mask": key_mask,
        }

    def _configure(
        self,
        *,
        batch_shape: tuple[int, ...],
        sizes: tuple[int, int, int, int],
        dtype: np.dtype,
        scale: float,
        tau: float,
        causal: bool,
        by: str,
    ) -> None:
        self._batch_shape = tuple(batch_shape)
        self._H = math.prod(self._batch_shape)
        self._n, self._m, self._d, self._e = sizes
        self._dtype = np.dtype(dtype)
        self._scale, self._tau, self._causal, self._by = scale, tau, causal, by
        self._shards: list[_Shard] = []
        self._grid = (1, 1)
        self._owned_dir: list[str] = []
        self._closed = False

    def _start_runtime(
        self,
        *,
        address: str | None,
        cpus_per_shard: float,
        checkpoint: str,
        checkpoint_dir: str | os.PathLike[str] | None,
        replay_budget: float | None,
        max_log_bytes: int,
        pipeline_depth: int,
        max_restarts: int,
    ) -> None:
        """Check the knobs, join or start Ray, prepare the checkpoint folder."""
        self._cpus_per_shard = check_scalar("cpus_per_shard", cpus_per_shard, low=0.0)
        self._checkpoint_kind = check_choice("checkpoint", checkpoint, ("disk", "object_store"))
        self._replay_budget = (
            None if replay_budget is None else check_scalar("replay_budget", replay_budget, low=0.0)
        )
        self._max_log_bytes = _check_count("max_log_bytes", max_log_bytes, 0)
        self._pipeline_depth = _check_count("pipeline_depth", pipeline_depth, 1)
        self._max_restarts = _check_count("max_restarts", max_restarts, 0)
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address: expected a string or None, got {type(address).__name__}")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=address)
        self._ray = ray
        self._actor_errors = (ray.exceptions.RayActorError,)
        if checkpoint_dir is None:
            folder = tempfile.mkdtemp(prefix="dynattn-shards-")
            self._owned_dir.append(folder)
        else:
            folder = os.path.abspath(os.fspath(checkpoint_dir))
            os.makedirs(folder, exist_ok=True)
        self._checkpoint_dir = folder
        self._next_op = 0
        #: op -> number of shards that have not reported it yet (in submission order)
        self._outstanding: dict[int, int] = {}
        self._failures: list[_Failure] = []
        self._counters = {
            "checkpoints": 0,
            "checkpoint_failures": 0,
            "restarts": 0,
            "replayed_calls": 0,
            "rollbacks": 0,
        }
        self._last_recovery_seconds: float | None = None

    def _after_layout(self) -> None:
        """Lookup arrays from the shards' blocks."""
        head_blocks, row_blocks = self._grid
        starts = [self._shards[a * row_blocks].heads for a in range(head_blocks)]
        self._head_block_of = np.repeat(np.arange(head_blocks), [h1 - h0 for h0, h1 in starts])
        self._head_start = np.array([h0 for h0, _ in starts], dtype=np.int64)

    def _spawn(self) -> Any:
        threads = str(max(1, math.ceil(self._cpus_per_shard)))
        return (
            _remote_worker(self._ray)
            .options(
                num_cpus=self._cpus_per_shard,
                max_restarts=0,
                max_task_retries=0,
                runtime_env={"env_vars": dict.fromkeys(BLAS_THREAD_VARIABLES, threads)},
            )
            .remote()
        )

    # ================================================================== the paper's operations
    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``K[head][i, j] += delta`` on the shards owning ``head``; waits for them.

        Runtime complexity: that of ``DynamicAttention.update_k`` on a shard
        (O(ns) amortized, plus the fold), plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self._m, axis="key rows, m")
        j = check_index("j", j, self._d, axis="key columns, d")
        delta = check_scalar("delta", delta)
        self._edit_head(h, lambda h_local: [("update_k", (i, j, delta), {"head": h_local})])

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``V[head][i, j] += delta`` on the shards owning ``head``; waits for them.

        Runtime complexity: that of ``DynamicAttention.update_v`` on a shard, plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self._m, axis="value rows, m")
        j = check_index("j", j, self._e, axis="value columns, e")
        delta = check_scalar("delta", delta)
        self._edit_head(h, lambda h_local: [("update_v", (i, j, delta), {"head": h_local})])

    def update_k_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``K[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        One call per shard owning any of the heads; waits for them.
        Runtime complexity: that of the updates on each shard, in parallel.
        """
        self._edit_entries("update_k_many", rows, cols, deltas, heads, self._d)

    def update_v_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``V[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        Runtime complexity: that of the updates on each shard, in parallel.
        """
        self._edit_entries("update_v_many", rows, cols, deltas, heads, self._e)

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """``O[head][i, j]`` as a Python float, from the one shard owning it.

        Runtime complexity: O(t) on that shard, plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self._n, axis="query rows, n")
        j = check_index("j", j, self._e, axis="output columns, e")
        shard = self._owner(h, i)
        call = ("query", (i - shard.rows[0], j), {"head": h - shard.heads[0]})
        return float(self._ask({shard.index: call})[shard.index])

    def fold(self) -> None:
        """Fold every shard's pending rows into its snapshot now (the paper's rebuild); pipelined.

        Runtime complexity: O(Hs*ns*e*t) per shard, in parallel.
        """
        self._edit({shard.index: [("fold", (), {})] for shard in self._shards}, wait=False)

    #: The paper's name for :meth:`fold`.
    rebuild = fold

    # ================================================================== answers
    def query_row(self, i: int) -> np.ndarray:
        """``O[..., i, :]`` for every head, a new ``(*batch, e)`` array.

        Runtime complexity: O(Hs*t*e) on each shard owning row i, in parallel, plus one round trip.
        """
        i = check_index("i", i, self._n, axis="query rows, n")
        return self._gather_rows(np.array([i]))[..., 0, :]

    def query_rows(self, rows: Any) -> np.ndarray:
        """``O[..., rows, :]`` for every head, a new ``(*batch, len(rows), e)`` array.

        Runtime complexity: O(Hs*k*t*e) on each shard for its k rows, in parallel, plus one round trip.
        """
        rows = check_index_array("rows", rows, self._n, axis="query rows, n")
        return self._gather_rows(rows)

    def query_many(self, rows: Any, cols: Any, *, heads: Any = None) -> np.ndarray:
        """``O[heads[k]][rows[k], cols[k]]`` for every k, a new ``(len(rows),)`` array.

        Runtime complexity: O(k*t) on each shard for its k entries, in parallel, plus one round trip.
        """
        rows = check_index_array("rows", rows, self._n, axis="query rows, n")
        cols = check_index_array("cols", cols, self._e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols: expected the same length, got {rows.shape[0]} and {cols.shape[0]}"
            )
        head_index = self._head_indices(heads, rows.size)
        out = np.empty(rows.size, dtype=self._dtype)
        owner = self._head_block_of[head_index] * self._grid[1] + self._row_block_of(rows)
        asks, where = {}, {}
        for s in np.unique(owner).tolist():
            shard, mask = self._shards[s], owner == s
            local = (rows[mask] - shard.rows[0], cols[mask])
            asks[s] = ("query_many", local, {"heads": head_index[mask] - shard.heads[0]})
            where[s] = mask
        for s, answer in self._ask(asks).items():
            out[where[s]] = answer
        return out

    def output(self) -> np.ndarray:
        """The whole output ``O: (*batch, n, e)``, gathered from every shard.

        Runtime complexity: O(Hs*ns*t*e) per shard, in parallel, plus moving O(H*n*e) values.
        """
        return self._gather_rows(np.arange(self._n))

    def error_bound(self, i: int, *, head: Any = None) -> float:
        """The bound on ``|answer - exact| / max|V[:, j]|`` for answers about row ``i`` of ``head``
        (see ``DynamicAttention.error_bound``), from the shard owning them.

        Runtime complexity: O(t + e) on that shard, plus one round trip.
        """
        h = self._head_index(head)
        i = check_index("i", i, self._n, axis="query rows, n")
        shard = self._owner(h, i)
        call = ("error_bound", (i - shard.rows[0],), {"head": h - shard.heads[0]})
        return float(self._ask({shard.index: call})[shard.index])

    def _gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """``O[:, rows, :]`` for every head, ``(*batch, len(rows), e)``: one ask per shard owning rows."""
        out = np.empty((self._H, rows.size, self._e), dtype=self._dtype)
        block = self._row_block_of(rows)
        asks: dict[int, Call] = {}
        where: dict[int, np.ndarray] = {}
        for shard in self._shards:
            mask = block == shard.index % self._grid[1]
            if mask.any():
                asks[shard.index] = ("query_rows", (rows[mask] - shard.rows[0],), {})
                where[shard.index] = mask
        for s, answer in self._ask(asks).items():
            h0, h1 = self._shards[s].heads
            out[h0:h1, where[s]] = answer
        return out.reshape(*self._batch_shape, rows.size, self._e)

    # ================================================================== token and row edits
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head; ``k: (*batch, d)``. Pipelined.

        Runtime complexity: O(Hs*ns*d) per shard, in parallel, plus the fold.
        """
        c = check_index("c", c, self._m, axis="key rows, m")
        k_rows = self._valid_key_row("k", k)
        self._edit_all(lambda shard: [("set_key", (c, self._heads_of(k_rows, shard)), {})])
        self._note_key_norms(k_rows)

    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head; ``v: (*batch, e)``. Pipelined.

        Runtime complexity: O(Hs*e) per shard (O(Hs*ns*d) on a row's first touch), plus the fold.
        """
        c = check_index("c", c, self._m, axis="value rows, m")
        v_rows = self._valid_row("v", v, self._e)
        self._edit_all(lambda shard: [("set_value", (c, self._heads_of(v_rows, shard)), {})])

    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head; ``q: (*batch, d)``; sent only to the shards owning
        row i, which recompute it exactly. Pipelined.

        Runtime complexity: O(Hs*m*(d+e)) on each owning shard.
        """
        i = check_index("i", i, self._n, axis="query rows, n")
        q_rows = self._valid_query_row("q", q)

        def calls(shard: _Shard) -> list[Call] | None:
            if not shard.rows[0] <= i < shard.rows[1]:
                return None
            return [("set_query", (i - shard.rows[0], self._heads_of(q_rows, shard)), {})]

        self._edit_all(calls)
        self._note_query_norms(q_rows)

    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows. Pipelined.

        All given rows are checked before anything is sent. Keys and values go
        to every shard, the query row to the shards owning row i.
        Runtime complexity: O(Hs*ns*d) per shard for k, O(Hs*e) for v,
        O(Hs*m*(d+e)) on the owning shards for q.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        if k is not None or v is not None:
            i = check_index("i", i, self._m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self._n, axis="query rows, n")
        q_rows = None if q is None else self._valid_query_row("q", q)
        k_rows = None if k is None else self._valid_key_row("k", k)
        v_rows = None if v is None else self._valid_row("v", v, self._e)

        def calls(shard: _Shard) -> list[Call] | None:
            rows = {
                name: self._heads_of(value, shard)
                for name, value in (("q", q_rows), ("k", k_rows), ("v", v_rows))
                if value is not None
            }
            r0, r1 = shard.rows
            if "q" in rows and not r0 <= i < r1:
                del rows["q"]
            if not rows:
                return None
            if "q" not in rows or r0 == 0:
                return [("set_token", (i,), rows)]
            # the shard's query row i - r0 is not its key row i: the same three edits, one by one
            split: list[Call] = [("set_key", (i, rows["k"]), {})] if "k" in rows else []
            split += [("set_value", (i, rows["v"]), {})] if "v" in rows else []
            return [*split, ("set_query", (i - r0, rows["q"]), {})]

        self._edit_all(calls)
        if k_rows is not None:
            self._note_key_norms(k_rows)
        if q_rows is not None:
            self._note_query_norms(q_rows)

    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``. Pipelined.

        The key-value pair goes to every shard, the query row to the last row
        block. Returns ``(query_index, key_index)`` (None for what was not added).
        Runtime complexity: O(Hs*ns*d) per shard for a key, O(Hs*m*(d+e)) on
        the last row block's shards for a query.
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        if self._causal and (q is None or k is None):
            raise ValueError("append: a causal structure appends whole tokens; expected q, k and v")
        q_rows = None if q is None else self._valid_query_row("q", q)
        k_rows = v_rows = None
        if k is not None:
            k_rows = self._valid_key_row("k", k)
            v_rows = self._valid_row("v", v, self._e)
        last_block = self._grid[1] - 1

        def calls(shard: _Shard) -> list[Call] | None:
            rows = {}
            if q_rows is not None and shard.index % self._grid[1] == last_block:
                rows["q"] = self._heads_of(q_rows, shard)
            if k_rows is not None and v_rows is not None:
                rows["k"], rows["v"] = self._heads_of(k_rows, shard), self._heads_of(v_rows, shard)
            return [("append", (), rows)] if rows else None

        self._edit_all(calls)
        query_index = key_index = None
        if q_rows is not None:
            query_index = self._n
            self._n += 1
            for shard in self._shards:
                if shard.index % self._grid[1] == last_block:
                    shard.rows[1] += 1
            self._note_query_norms(q_rows)
        if k_rows is not None:
            key_index = self._m
            self._m += 1
            self._note_key_norms(k_rows)
        return query_index, key_index

    def delete_key(self, c: int) -> None:
        """Hide key c from every query on every shard (its mask bit off). Pipelined.

        Runtime complexity: O(Hs*ns) per shard, plus the fold.
        """
        c = check_index("c", c, self._m, axis="key rows, m")
        self._edit_all(lambda shard: [("delete_key", (c,), {})])

    def set_key_mask(self, c: int, visible: bool) -> None:
        """Show or hide key c on every shard (a key padding mask update). Pipelined.

        Runtime complexity: O(Hs*ns*d) per shard, plus the fold.
        """
        c = check_index("c", c, self._m, axis="key rows, m")
        visible = check_flag("visible", visible)
        self._edit_all(lambda shard: [("set_key_mask", (c, visible), {})])

    def flush(self) -> None:
        """Wait until every shard has applied every edit sent to it (restarting dead shards).

        Raises the error of a pipelined edit that a shard rejected (after
        undoing that edit on every shard). Runtime complexity: the
        outstanding edits, plus one round trip.
        """
        self._sync(range(len(self._shards)))

    # ================================================================== properties
    @property
    def n(self) -> int:
        """Number of query rows."""
        return self._n

    @property
    def m(self) -> int:
        """Number of keys."""
        return self._m

    @property
    def d(self) -> int:
        """Key width."""
        return self._d

    @property
    def e(self) -> int:
        """Value width."""
        return self._e

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading head/batch axes (``()`` for a single head)."""
        return self._batch_shape

    @property
    def heads(self) -> int:
        """Number of independent problems (product of the leading axes)."""
        return self._H

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype (float32 or float64)."""
        return self._dtype

    @property
    def scale(self) -> float:
        """Softmax scale."""
        return self._scale

    @property
    def tau(self) -> float:
        """Laziness exponent of every shard."""
        return self._tau

    @property
    def causal(self) -> bool:
        """Whether query i sees only keys at positions <= its own."""
        return self._causal

    @property
    def threshold(self) -> int:
        """Pending key/value rows that trigger a fold on a shard, ``ceil(m**tau)``."""
        return fold_threshold(self._m, self._tau)

    @property
    def backend(self) -> str:
        """Array backend of the shards and the answers (always ``"numpy"``)."""
        return "numpy"

    @property
    def shards(self) -> int:
        """Number of shards."""
        return len(self._shards)

    @property
    def layout(self) -> list[dict[str, tuple[int, int]]]:
        """Per shard, the flat head range and the query row range it owns (``[start, stop)``)."""
        return [{"heads": shard.heads, "rows": (shard.rows[0], shard.rows[1])} for shard in self._shards]

    @property
    def actors(self) -> tuple[Any, ...]:
        """The shards' current Ray actor handles (for monitoring, or to test recovery with ``ray.kill``)."""
        return tuple(shard.actor for shard in self._shards)

    @property
    def Q(self) -> np.ndarray:
        """Current queries ``(*batch, n, d)``, gathered from the shards (a new array)."""
        return self._gather_array("Q", self._n, self._d, by_rows=True)

    @property
    def K(self) -> np.ndarray:
        """Current keys ``(*batch, m, d)``, gathered from the shards (a new array)."""
        return self._gather_array("K", self._m, self._d, by_rows=False)

    @property
    def V(self) -> np.ndarray:
        """Current values ``(*batch, m, e)``, gathered from the shards (a new array)."""
        return self._gather_array("V", self._m, self._e, by_rows=False)

    @property
    def stats(self) -> dict[str, int]:
        """``DynamicAttention.stats`` counters summed over the shards (folds, refreshed rows, ...)."""
        total: dict[str, int] = {}
        for info in self._describe_all():
            for name, count in info["stats"].items():
                total[name] = total.get(name, 0) + int(count)
        return total

    @property
    def distributed_stats(self) -> dict[str, Any]:
        """The sharding's own counters: ``checkpoints`` taken, ``checkpoint_failures``,
        ``restarts`` of shard actors, ``replayed_calls``, ``rollbacks`` of rejected
        entry updates, the logs' current ``log_entries``, ``log_bytes`` and
        ``replay_seconds`` (summed over shards), and ``last_recovery_seconds``.
        Runtime complexity: O(shards); contacts no shard."""
        return {
            **self._counters,
            "log_entries": sum(len(shard.log) for shard in self._shards),
            "log_bytes": sum(shard.log_bytes for shard in self._shards),
            "replay_seconds": sum(shard.replay_cost() for shard in self._shards),
            "last_recovery_seconds": self._last_recovery_seconds,
        }

    def shard_info(self) -> list[dict[str, Any]]:
        """Per shard: its sizes, options, storage, pending rows and counters (one round trip).

        Runtime complexity: O(shards), plus the outstanding edits.
        """
        return self._describe_all()

    def __repr__(self) -> str:
        heads = f"batch_shape={self._batch_shape}, " if self._batch_shape else ""
        return (
            f"ShardedAttention(shards={len(self._shards)}, grid={self._grid}, {heads}n={self._n}, "
            f"m={self._m}, d={self._d}, e={self._e}, dtype={self._dtype.name}, scale={self._scale:g})"
        )

    def _describe_all(self) -> list[dict[str, Any]]:
        answers = self._ask({shard.index: ("describe", (), {}) for shard in self._shards})
        return [answers[s] for s in range(len(self._shards))]

    def _gather_array(self, name: str, rows: int, width: int, *, by_rows: bool) -> np.ndarray:
        out = np.empty((self._H, rows, width), dtype=self._dtype)
        chosen = [s for s in self._shards if by_rows or s.index % self._grid[1] == 0]
        answers = self._ask({shard.index: ("array", (name,), {}) for shard in chosen})
        for shard in chosen:
            (h0, h1), (r0, r1) = shard.heads, (shard.rows if by_rows else (0, rows))
            out[h0:h1, r0:r1] = answers[shard.index]
        return out.reshape(*self._batch_shape, rows, width)

    # ================================================================== persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole state: a JSON manifest at ``path`` and one ``.npz`` per shard beside it.

        Atomic as a whole: every shard writes ``<name>.<token>.shard<k>.npz``
        (``DynamicAttention.save``, itself atomic) under a name no other save
        uses, then the manifest naming those files is written to a temporary
        name and renamed over ``path``. Until that rename ``path`` names the
        previous complete save; after it, the previous save's shard files are
        removed. A save that fails (or a driver killed mid-save) leaves the
        previous save intact, plus at most the new shard files, which are not
        named by any manifest. The folder must be reachable from every shard.
        Runtime complexity: O(size of the state) per shard, in parallel.
        """
        path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(path)
        token = secrets.token_hex(8)
        files = [f"{name}.{token}.shard{shard.index}.npz" for shard in self._shards]
        try:
            self._ask(
                {
                    shard.index: ("save", (os.path.join(folder, file),), {})
                    for shard, file in zip(self._shards, files, strict=True)
                }
            )
            previous = _previous_files(path)
            manifest = {
                "format": MANIFEST_FORMAT,
                "class": type(self).__name__,
                "by": self._by,
                "grid": list(self._grid),
                "batch_shape": list(self._batch_shape),
                "sizes": {"n": self._n, "m": self._m, "d": self._d, "e": self._e},
                "dtype": self._dtype.name,
                "scale": self._scale,
                "tau": self._tau,
                "causal": self._causal,
                "norm_bounds": {"Q": self._q_norm_max, "K": self._k_norm_max},
                "shards": [
                    {"file": file, "heads": list(shard.heads), "rows": list(shard.rows)}
                    for shard, file in zip(self._shards, files, strict=True)
                ],
            }
            temporary = os.path.join(folder, f".{name}.{token}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            for file in (*files, f".{name}.{token}.tmp"):
                _remove(os.path.join(folder, file))
            raise
        for file in previous - set(files):
            _remove(os.path.join(folder, file))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        address: str | None = None,
        cpus_per_shard: float = 1.0,
        checkpoint: str = "disk",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        replay_budget: float | None = None,
        max_log_bytes: int = 256 << 20,
        pipeline_depth: int = 64,
        max_restarts: int = 3,
    ) -> ShardedAttention:
        """Start shards from a state written by :meth:`save` (same layout); the knobs are
        those of the constructor.

        The manifest is checked first, then each shard file by
        ``DynamicAttention.load`` in its actor, then that each shard's sizes and
        options match the manifest. Raises
        :class:`dynattn.persistence.SnapshotError` saying what is wrong, and
        ``OSError`` when the manifest cannot be opened. The files are copied
        (hard-linked where possible) as the shards' first checkpoints, so a
        later save over ``path`` does not affect a recovery.
        Runtime complexity: O(size of the state) per shard, in parallel.
        """
        path = os.path.abspath(os.fspath(path))
        manifest = _read_manifest(path)
        self = cls.__new__(cls)
        sizes = manifest["sizes"]
        self._configure(
            batch_shape=tuple(manifest["batch_shape"]),
            sizes=(sizes["n"], sizes["m"], sizes["d"], sizes["e"]),
            dtype=np.dtype(manifest["dtype"]),
            scale=manifest["scale"],
            tau=manifest["tau"],
            causal=manifest["causal"],
            by=manifest["by"],
        )
        self._q_norm_max = manifest["norm_bounds"]["Q"]
        self._k_norm_max = manifest["norm_bounds"]["K"]
        self._start_runtime(
            address=address,
            cpus_per_shard=cpus_per_shard,
            checkpoint=checkpoint,
            checkpoint_dir=checkpoint_dir,
            replay_budget=replay_budget,
            max_log_bytes=max_log_bytes,
            pipeline_depth=pipeline_depth,
            max_restarts=max_restarts,
        )
        self._grid = (manifest["grid"][0], manifest["grid"][1])
        folder = os.path.dirname(path)
        try:
            pending = []
            for k, record in enumerate(manifest["shards"]):
                file = os.path.join(folder, record["file"])
                base = _Base("file", path=file)
                heads = (record["heads"][0], record["heads"][1])
                shard = _Shard(k, heads, list(record["rows"]), self._spawn(), base)
                self._shards.append(shard)
                pending.append(shard.actor.restore_file.remote(file))
            self._finalizer = weakref.finalize(self, _release, self._shards, self._owned_dir)
            for shard, (error, info, seconds) in zip(self._shards, self._ray.get(pending), strict=True):
                if error is not None:
                    raise error
                self._check_loaded(path, shard, info)
                shard.base.seconds = seconds
                self._adopt(shard)
        except BaseException:
            self.close()
            raise
        self._after_layout()
        return self

    def _check_loaded(self, path: str, shard: _Shard, info: dict[str, Any]) -> None:
        """A loaded shard has the sizes and options the manifest gives it."""
        (h0, h1), (r0, r1) = shard.heads, shard.rows
        expected = {
            "batch_shape": [h1 - h0],
            "n": r1 - r0,
            "m": self._m,
            "d": self._d,
            "e": self._e,
            "dtype": self._dtype.name,
            "scale": self._scale,
            "tau": self._tau,
            "causal": self._causal,
        }
        for key, value in expected.items():
            if info[key] != value:
                raise SnapshotError(
                    path,
                    f"shard {shard.index}: expected {key} {value!r} (the manifest), "
                    f"its file has {info[key]!r}",
                )

    def _adopt(self, shard: _Shard) -> None:
        """Make a loaded shard's file its first checkpoint, independent of the user's file."""
        source = shard.base.path
        assert source is not None
        if self._checkpoint_kind == "object_store":
            self._take_checkpoint(shard)
            return
        shard.checkpoint_count += 1
        target = os.path.join(self._checkpoint_dir, f"shard{shard.index}-{shard.checkpoint_count}.npz")
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        shard.base = _Base("file", path=target, owned=True)

    def close(self) -> None:
        """Stop the shard actors and remove the checkpoints (and the checkpoint folder if it was made
        here). Ray itself keeps running. Idempotent. Runtime complexity: O(shards)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            _release(self._shards, self._owned_dir)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShardedAttention: this structure was closed; its shards are gone")

    def __enter__(self) -> ShardedAttention:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ================================================================== fan-out
    def _edit_all(self, calls_of: Callable[[_Shard], list[Call] | None]) -> None:
        """A pipelined edit: ``calls_of(shard)`` for every shard (None: nothing for it)."""
        plan = {}
        for shard in self._shards:
            calls = calls_of(shard)
            if calls:
                plan[shard.index] = calls
        self._edit(plan, wait=False)

    def _edit_head(self, h: int, calls_of: Callable[[int], list[Call]]) -> None:
        """An entry update of head ``h`` on its shards (one per row block); waits for them."""
        a = int(self._head_block_of[h])
        first = a * self._grid[1]
        h_local = h - int(self._head_start[a])
        self._edit({s: calls_of(h_local) for s in range(first, first + self._grid[1])}, wait=True)

    def _edit_entries(self, method: str, rows: Any, cols: Any, deltas: Any, heads: Any, width: int) -> None:
        """A batch of entry updates, validated as ``DynamicAttention`` does, split by head block."""
        rows = check_index_array("rows", rows, self._m, axis="key/value rows, m")
        cols = check_index_array("cols", cols, width, axis="columns")
        values = np.asarray(_host(deltas))
        if values.shape != rows.shape or cols.shape != rows.shape:
            raise ValueError(
                f"rows, cols, deltas: expected equal lengths, got {rows.shape}, {cols.shape}, {values.shape}"
            )
        head_index = self._head_indices(heads, rows.size)
        if values.size and not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            raise TypeError(f"deltas: expected real numbers, got dtype {values.dtype}")
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise ValueError("deltas: expected finite values, got NaN or inf")
        plan = {}
        blocks = self._head_block_of[head_index]
        for a in np.unique(blocks).tolist():
            mask = blocks == a
            local = (rows[mask], cols[mask], values[mask])
            kwargs = {"heads": head_index[mask] - self._head_start[a]}
            for s in range(a * self._grid[1], (a + 1) * self._grid[1]):
                plan[s] = [(method, local, kwargs)]
        if plan:
            self._edit(plan, wait=True)

    def _edit(self, plan: dict[int, list[Call]], *, wait: bool) -> None:
        """Log and submit one edit (one call per shard in ``plan``); with ``wait``, collect it."""
        if not plan:
            return
        self._check_open()
        op = self._next_op
        self._next_op += 1
        self._outstanding[op] = len(plan)
        deepest = 0
        for s, calls in plan.items():
            shard = self._shards[s]
            entry = _Entry(op, calls, _nbytes(calls), deferred=not wait)
            shard.log.append(entry)
            shard.log_bytes += entry.nbytes
            shard.in_flight.append(_Pending("edit", shard.actor.apply.remote(calls), entry=entry))
            deepest = max(deepest, len(shard.in_flight))
        if wait:
            self._sync(plan)
        elif deepest >= self._pipeline_depth:
            self._sync(range(len(self._shards)))

    def _ask(self, asks: dict[int, Call]) -> dict[int, Any]:
        """One question per shard, answered after the shard's earlier edits; one ``ray.get``."""
        answers = self._sync(asks, asks)
        return {s: answers[s] for s in asks}

    def _sync(self, ids: Iterable[int], asks: dict[int, Call] | None = None) -> dict[int, Any]:
        """Collect everything outstanding on shards ``ids`` (and ``asks``' answers), restarting dead
        shards; then undo rejected edits, take due checkpoints and return the answers."""
        self._check_open()
        ids = sorted(set(ids))
        asks = asks or {}
        answers: dict[int, tuple[Any, Any, float]] = {}
        unsent = set(asks)
        while True:
            for s in sorted(unsent):
                shard = self._shards[s]
                method, args, kwargs = asks[s]
                shard.in_flight.append(_Pending("ask", shard.actor.ask.remote(method, args, kwargs)))
            unsent = set()
            dead = self._collect(ids, answers)
            if not dead:
                break
            for s in dead:
                self._recover(self._shards[s])
                if s in asks and s not in answers:
                    unsent.add(s)
        self._resolve_failures()
        for s in ids:
            self._maybe_checkpoint(self._shards[s])
        for s in sorted(answers):
            error = answers[s][0]
            if error is not None:
                raise error
        return {s: value for s, (_, value, _) in answers.items()}

    def _collect(self, ids: Sequence[int], answers: dict[int, Any]) -> set[int]:
        """``ray.get`` everything in flight on shards ``ids``, settling results in order; returns the
        shards found dead (what they had in flight is dropped: their log has it)."""
        ray = self._ray
        pending = [(s, p) for s in ids for p in self._shards[s].in_flight]
        if not pending:
            return set()
        try:
            values = ray.get([p.ref for _, p in pending])
        except self._actor_errors:
            values = None
        if values is not None:
            for (s, p), value in zip(pending, values, strict=True):
                self._settle(self._shards[s], p, value, answers)
            for s in ids:
                self._shards[s].in_flight.clear()
            return set()
        dead = set()
        for s in ids:
            shard = self._shards[s]
            while shard.in_flight:
                p = shard.in_flight[0]
                try:
                    value = ray.get(p.ref)
                except self._actor_errors:
                    dead.add(s)
                    self._drop_in_flight(shard)
                    break
                shard.in_flight.popleft()
                self._settle(shard, p, value, answers)
        return dead

    def _settle(self, shard: _Shard, pending: _Pending, value: Any, answers: dict[int, Any]) -> None:
        """Account for one collected result."""
        if pending.kind == "ask":
            answers[shard.index] = value
        elif pending.kind == "checkpoint":
            self._settle_checkpoint(shard, pending, value)
        else:
            assert pending.entry is not None
            self._settle_entry(shard, pending.entry, value, replayed=False)

    def _settle_entry(self, shard: _Shard, entry: _Entry, value: Any, *, replayed: bool) -> None:
        error, key_norm, seconds = value
        shard.log_seconds += seconds - entry.seconds
        entry.seconds = seconds
        if key_norm is not None:
            self._k_norm_max = max(self._k_norm_max, key_norm)
        if entry.settled:
            if error is not None:  # it succeeded before the shard was restarted
                raise RuntimeError(
                    f"shard {shard.index}: replaying its log after a restart failed at a call that had "
                    f"succeeded ({entry.calls[error[0]][0]}): {error[1]!r}"
                ) from error[1]
            return
        entry.settled = True
        if error is not None:
            self._failures.append(_Failure(entry.op, shard.index, error[0], error[1]))
        remaining = self._outstanding.get(entry.op, 0) - 1
        if remaining > 0:
            self._outstanding[entry.op] = remaining
        else:
            self._outstanding.pop(entry.op, None)

    def _drop_in_flight(self, shard: _Shard) -> None:
        """Forget a dead shard's uncollected calls (unconfirmed checkpoints are deleted)."""
        for pending in shard.in_flight:
            if pending.kind == "checkpoint" and pending.path is not None:
                _remove(pending.path)
        shard.in_flight.clear()

    # ================================================================== failures and rollback
    def _resolve_failures(self) -> None:
        """Undo every edit that some shard rejected on every shard that applied it, then raise
        the first rejection (a pipelined edit's wrapped in a RuntimeError that says so)."""
        if not self._failures:
            return
        failures: list[_Failure] = []
        undone: dict[int, _Entry] = {}
        while self._failures:
            batch, self._failures = self._failures, []
            failures.extend(batch)
            ops = {failure.op for failure in batch}
            # every shard holding one of these edits must have reported it first
            holders = [s.index for s in self._shards if any(e.op in ops and not e.settled for e in s.log)]
            if holders:
                self._sync_only(holders)
            for op in sorted(ops):
                entry = self._undo(op, {f.shard: f.index for f in failures if f.op == op})
                if entry is not None:
                    undone.setdefault(op, entry)
        self._counters["rollbacks"] += 1
        first = failures[0]
        entry = undone.get(first.op)
        if entry is not None and entry.deferred:
            method = entry.calls[min(first.index, len(entry.calls) - 1)][0]
            raise RuntimeError(
                f"shard {first.shard} rejected {method}, sent earlier without waiting; that edit has been "
                f"undone on every shard: {first.error!r}"
            ) from first.error
        raise first.error

    def _sync_only(self, ids: Sequence[int]) -> None:
        """Collect the shards ``ids`` (restarting dead ones) without resolving failures."""
        while True:
            dead = self._collect(ids, {})
            if not dead:
                return
            for s in dead:
                self._recover(self._shards[s])

    def _undo(self, op: int, failed_at: dict[int, int]) -> _Entry | None:
        """Remove edit ``op`` from every log and restart the shards that applied any of it;
        returns one of its removed entries."""
        removed = None
        for shard in self._shards:
            entry = next((e for e in shard.log if e.op == op), None)
            if entry is None:
                continue
            shard.log.remove(entry)
            shard.recount()
            removed = entry
            if failed_at.get(shard.index) == 0:
                continue  # the shard rejected the edit's first call: it applied nothing
            self._recover(shard, kill=True)
        self._outstanding.pop(op, None)
        return removed

    # ================================================================== recovery and checkpoints
    def _recover(self, shard: _Shard, *, kill: bool = False) -> None:
        """A new actor for ``shard``: its base restored, its log replayed."""
        ray = self._ray
        start = time.perf_counter()
        for _ in range(self._max_restarts + 1):
            if kill:
                try:
                    ray.kill(shard.actor, no_restart=True)
                except Exception:  # already dead
                    pass
            kill = True
            self._drop_in_flight(shard)
            actor = self._spawn()
            base = shard.base
            if base.kind == "build":
                restore = actor.build.remote(*base.refs)
            elif base.kind == "file":
                restore = actor.restore_file.remote(base.path)
            else:
                restore = actor.restore_bytes.remote(base.refs[0])
            replay = actor.replay.remote([entry.calls for entry in shard.log])
            try:
                restored, replayed = ray.get([restore, replay])
            except self._actor_errors:
                shard.actor = actor
                continue
            shard.actor = actor
            if restored[0] is not None:
                raise RuntimeError(
                    f"shard {shard.index}: its checkpoint could not be restored: {restored[0]!r}"
                ) from restored[0]
            self._counters["restarts"] += 1
            self._counters["replayed_calls"] += len(shard.log)
            for entry, value in zip(list(shard.log), replayed, strict=True):
                self._settle_entry(shard, entry, value, replayed=True)
            shard.recount()
            self._last_recovery_seconds = time.perf_counter() - start
            return
        raise RuntimeError(
            f"shard {shard.index}: its actor died {self._max_restarts + 1} times in a row "
            "while being restored"
        )

    def _budget(self, shard: _Shard) -> float:
        if self._replay_budget is not None:
            return self._replay_budget
        return max(AUTO_BUDGET_FLOOR, AUTO_BUDGET_FACTOR * (shard.last_checkpoint_seconds or 0.0))

    def _maybe_checkpoint(self, shard: _Shard) -> None:
        """Checkpoint ``shard`` when its log is due and every logged edit has settled everywhere."""
        if not shard.log or any(p.kind == "checkpoint" for p in shard.in_flight):
            return
        if shard.replay_cost() < self._budget(shard) and shard.log_bytes < self._max_log_bytes:
            return
        if self._outstanding and shard.log[-1].op >= next(iter(self._outstanding)):
            return  # an edit in the log may still be rejected elsewhere (and need undoing here)
        self._take_checkpoint(shard)

    def _take_checkpoint(self, shard: _Shard) -> None:
        """Submit a checkpoint covering everything sent to ``shard`` so far."""
        shard.checkpoint_count += 1
        path = None
        if self._checkpoint_kind == "disk":
            path = os.path.join(self._checkpoint_dir, f"shard{shard.index}-{shard.checkpoint_count}.npz")
        status, payload = shard.actor.checkpoint.options(num_returns=2).remote(path)
        covered = shard.log[-1].op if shard.log else -1
        shard.in_flight.append(_Pending("checkpoint", status, covered_op=covered, path=path, payload=payload))

    def _settle_checkpoint(self, shard: _Shard, pending: _Pending, value: Any) -> None:
        error, _, seconds = value
        if error is not None:
            self._counters["checkpoint_failures"] += 1
            if pending.path is not None:
                _remove(pending.path)
            warnings.warn(
                f"shard {shard.index}: checkpoint failed ({error!r}); its log keeps growing",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        previous = shard.base
        if pending.path is not None:
            shard.base = _Base("file", path=pending.path, owned=True)
        else:
            shard.base = _Base("bytes", refs=(pending.payload,))
        shard.log = [entry for entry in shard.log if entry.op > pending.covered_op]
        shard.recount()
        shard.last_checkpoint_seconds = seconds
        self._counters["checkpoints"] += 1
        if previous.owned and previous.path is not None:
            _remove(previous.path)

    # ================================================================== argument validation
    def _head_index(self, head: Any) -> int:
        """The flat head index named by ``head=`` (the rule of ``DynamicAttention``)."""
        if not self._batch_shape:
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
                f"head: expected an index into the leading axes {self._batch_shape}, got None; "
                f"pass an int below {self._H} or a {len(self._batch_shape)}-tuple"
            )
        if isinstance(head, tuple):
            if len(head) != len(self._batch_shape):
                raise IndexError(
                    f"head: expected a {len(self._batch_shape)}-tuple (one index per leading axis of "
                    f"{self._batch_shape}), got {head!r}"
                )
            parts = [
                check_index(f"head[{k}]", x, s, axis=f"leading axis {k} of {self._batch_shape}")
                for k, (x, s) in enumerate(zip(head, self._batch_shape, strict=True))
            ]
            return int(np.ravel_multi_index(parts, self._batch_shape))
        return check_index("head", head, self._H, axis=f"flattened leading axes {self._batch_shape}")

    def _head_indices(self, heads: Any, size: int) -> np.ndarray:
        """``heads=`` as ``size`` flat head indices (None: head 0, without a head axis)."""
        if heads is None:
            if self._batch_shape:
                raise TypeError(
                    f"heads: expected head indices for leading axes {self._batch_shape}, got None; "
                    f"pass one flat head index (below {self._H}) per entry"
                )
            return np.zeros(size, dtype=np.int64)
        heads = check_index_array("heads", heads, self._H, axis=f"flattened leading axes {self._batch_shape}")
        if heads.size != size:
            raise ValueError(f"heads: expected {size} head indices, got {heads.size}")
        return heads

    def _valid_row(self, name: str, value: Any, width: int) -> np.ndarray:
        """A validated copy of a row argument, one row per head ``(H, width)``."""
        rows = check_rows(name, _host(value), dtype=self._dtype, shape=(*self._batch_shape, width))
        return rows.reshape(self._H, width)

    def _valid_key_row(self, name: str, value: Any) -> np.ndarray:
        k = self._valid_row(name, value, self._d)
        self._guard_logit_reach(name, self._q_norm_max, float(cert.norms(k).max()))
        return k

    def _valid_query_row(self, name: str, value: Any) -> np.ndarray:
        q = self._valid_row(name, value, self._d)
        self._guard_logit_reach(name, float(cert.norms(q).max()), self._k_norm_max)
        return q

    def _guard_logit_reach(self, name: str, q_norm: float, k_norm: float) -> None:
        """Reject rows whose (scaled) dot products could leave float64's range, with the largest
        query and key norms over *all* heads (as one structure would; a shard's are smaller)."""
        reach = 0.0 if q_norm == 0 or k_norm == 0 else q_norm * k_norm * max(1.0, abs(self._scale))
        if reach > 1e300:
            raise ValueError(
                f"{name}: dot products |Q_i||K_c| times max(1, |scale|) could reach {reach:.3g}, "
                "beyond float64's range; expected inputs whose (scaled) dot products stay below 1e300"
            )

    def _note_key_norms(self, k: np.ndarray) -> None:
        self._k_norm_max = max(self._k_norm_max, float(cert.norms(k).max()))

    def _note_query_norms(self, q: np.ndarray) -> None:
        self._q_norm_max = max(self._q_norm_max, float(cert.norms(q).max()))

    # ================================================================== layout lookups
    @staticmethod
    def _heads_of(rows: np.ndarray, shard: _Shard) -> np.ndarray:
        """The rows ``(H, w)`` of the shard's heads, ``(Hs, w)``."""
        return rows[shard.heads[0] : shard.heads[1]]

    def _row_block_of(self, rows: np.ndarray) -> np.ndarray:
        starts = np.array([self._shards[b].rows[0] for b in range(self._grid[1])], dtype=np.int64)
        return np.searchsorted(starts, rows, side="right") - 1

    def _owner(self, h: int, i: int) -> _Shard:
        a = int(self._head_block_of[h])
        b = int(self._row_block_of(np.array([i]))[0])
        return self._shards[a * self._grid[1] + b]


# ====================================================================== files
def _release(shards: list[_Shard], owned_dirs: list[str]) -> None:
    """Kill the shards' actors; remove their checkpoint files and an owned checkpoint folder."""
    try:
        import ray

        alive = ray.is_initialized()
    except ImportError:
        alive = False
    for shard in shards:
        if alive:
            try:
                ray.kill(shard.actor, no_restart=True)
            except Exception:  # already gone
                pass
        for pending in shard.in_flight:
            if pending.path is not None:
                _remove(pending.path)
        if shard.base.owned and shard.base.path is not None:
            _remove(shard.base.path)
    for folder in owned_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _previous_files(path: str) -> set[str]:
    """Shard files named by the manifest now at ``path`` (none if it is missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        names = {record["file"] for record in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in names if isinstance(name, str) and os.path.basename(name) == name}


def _read_manifest(path: str) -> dict[str, Any]:
    """The checked manifest at ``path`` (SnapshotError saying what is wrong)."""

    def fail(problem: str) -> SnapshotError:
        return SnapshotError(path, problem)

    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"not a ShardedAttention manifest: not UTF-8 JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise fail(f"not a ShardedAttention manifest: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("class") != "ShardedAttention":
        raise fail(f"not a ShardedAttention manifest: 'class' is {manifest.get('class')!r}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise fail(f"manifest 'format': expected {MANIFEST_FORMAT}, got {manifest.get('format')!r}")

    def positive(value: Any) -> bool:
        return type(value) is int and value > 0

    def number(value: Any) -> bool:
        return type(value) in (int, float) and math.isfinite(value)

    batch = manifest.get("batch_shape")
    if not isinstance(batch, list) or not all(positive(x) for x in batch):
        raise fail(f"manifest 'batch_shape': expected a list of positive integers, got {batch!r}")
    sizes = manifest.get("sizes")
    if (
        not isinstance(sizes, dict)
        or set(sizes) != {"n", "m", "d", "e"}
        or not all(positive(x) for x in sizes.values())
    ):
        raise fail(f"manifest 'sizes': expected positive integers n, m, d, e, got {sizes!r}")
    if manifest.get("dtype") not in ("float32", "float64"):
        raise fail(f"manifest 'dtype': expected 'float32' or 'float64', got {manifest.get('dtype')!r}")
    if manifest.get("by") not in ("heads", "rows", "auto"):
        raise fail(f"manifest 'by': expected 'heads', 'rows' or 'auto', got {manifest.get('by')!r}")
    for name in ("scale", "tau"):
        if not number(manifest.get(name)):
            raise fail(f"manifest {name!r}: expected a finite number, got {manifest.get(name)!r}")
    if type(manifest.get("causal")) is not bool:
        raise fail(f"manifest 'causal': expected true or false, got {manifest.get('causal')!r}")
    bounds = manifest.get("norm_bounds")
    if (
        not isinstance(bounds, dict)
        or set(bounds) != {"Q", "K"}
        or not all(number(x) and x >= 0 for x in bounds.values())
    ):
        raise fail(f"manifest 'norm_bounds': expected finite numbers >= 0 for Q and K, got {bounds!r}")
    grid = manifest.get("grid")
    records = manifest.get("shards")
    if not (isinstance(grid, list) and len(grid) == 2 and all(positive(x) for x in grid)):
        raise fail(f"manifest 'grid': expected [head blocks, row blocks], got {grid!r}")
    if not isinstance(records, list) or len(records) != grid[0] * grid[1]:
        raise fail(f"manifest 'shards': expected {grid[0] * grid[1]} records (grid {grid}), got {records!r}")
    heads, n = math.prod(batch), sizes["n"]
    head_edges, row_edges = [0], [0]
    for k, record in enumerate(records):
        if not isinstance(record, dict) or set(record) != {"file", "heads", "rows"}:
            raise fail(f"manifest shard {k}: expected an object with file, heads, rows, got {record!r}")
        file, span, rows = record["file"], record["heads"], record["rows"]
        if not isinstance(file, str) or not file or os.path.basename(file) != file or file.startswith("."):
            raise fail(f"manifest shard {k} 'file': expected a plain file name, got {file!r}")
        for name, pair in (("heads", span), ("rows", rows)):
            if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)):
                raise fail(f"manifest shard {k} {name!r}: expected [start, stop], got {pair!r}")
        a, b = divmod(k, grid[1])
        if b == 0:
            if span[0] != head_edges[-1] or span[1] <= span[0]:
                raise fail(f"manifest shard {k} 'heads': expected a block from {head_edges[-1]}, got {span}")
            head_edges.append(span[1])
        elif span != records[a * grid[1]]["heads"]:
            raise fail(f"manifest shard {k} 'heads': expected {records[a * grid[1]]['heads']}, got {span}")
        if a == 0:
            if rows[0] != row_edges[-1] or rows[1] <= rows[0]:
                raise fail(f"manifest shard {k} 'rows': expected a block from {row_edges[-1]}, got {rows}")
            row_edges.append(rows[1])
        elif rows != records[b]["rows"]:
            raise fail(f"manifest shard {k} 'rows': expected {records[b]['rows']}, got {rows}")
    if head_edges[-1] != heads:
        raise fail(f"manifest 'shards': head blocks cover {head_edges[-1]} heads, expected {heads}")
    if row_edges[-1] != n:
        raise fail(f"manifest 'shards': row blocks cover {row_edges[-1]} rows, expected n = {n}")
    return manifest
