"""One attention state sharded over Ray actors, restored when an actor dies.

:class:`ShardedAttention` answers as one :class:`~dynattn.DynamicAttention`
would, with the state split over Ray actors (*shards*), each holding a
``DynamicAttention`` over a block of heads and/or query rows (docs/distributed.md).

* Layout: a grid of ``head_blocks x row_blocks`` shards; shard ``(a, b)`` holds
  the heads of block ``a``, the query rows of block ``b`` and all keys and values
  of its heads. A causal structure is split by heads only.
* Calls: the driver keeps a copy of ``Q, K, V`` and checks every argument with
  ``DynamicAttention``'s checks before anything is sent, so a rejected call
  changes nothing. Accepted edits are queued per shard and travel with the next
  call that needs an answer from that shard (or alone, once ``edits_per_call``
  are queued): at most one actor call per shard per public call, answers
  gathered with one ``ray.get``. Calls travel pickled as one ``bytes`` argument.
* Fault tolerance: per shard the driver logs the edits sent since the shard's
  last checkpoint. When the log's replay cost exceeds ``replay_budget`` seconds
  (or ``max_log_bytes``), the next call also asks the shard to save a checkpoint,
  and the log is cut once it is confirmed. When Ray reports a dead actor
  (``RayActorError``), the call starts a new one, restores the checkpoint (or the
  initial build), replays the log and asks again. Not covered: the death of the
  driver (the logs live in its memory; use :meth:`ShardedAttention.save`), lost
  checkpoint files, calls that hang, Ray's own failures.

Ray is an optional dependency (``pip install "dynattn[ray]"``), imported when first used.
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
from collections.abc import Callable
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
    check_scalar,
)
from dynattn.backends import resolve_backend
from dynattn.persistence import SnapshotError
from dynattn.structure import DynamicAttention, fold_threshold, reserve_sizes

__all__ = ["INSTALL_HINT", "RUNTIME_OPTIONS", "ShardedAttention"]

#: What to run when Ray is missing.
INSTALL_HINT = 'pip install "dynattn[ray]"'
#: Version of the manifest written by :meth:`ShardedAttention.save`.
MANIFEST_FORMAT = 1
#: Environment variables that limit a shard's BLAS/OpenMP threads (and numba's, dynattn.kernels).
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
#: Calls without answers a shard may have in flight before the driver waits for them.
MAX_IN_FLIGHT = 2
#: One call on a shard's structure: (method or attribute, positional arguments, keyword arguments).
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _count(minimum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if (count := as_index(name, value)) < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {count}")
        return count

    return check


def _path(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name}: expected a path or None, got {type(value).__name__}")
    return None if value is None else os.path.abspath(os.fspath(value))


#: The runtime's options (constructor and :meth:`ShardedAttention.load`): name -> (default, check).
RUNTIME_OPTIONS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    # queued edits a shard gets in one call when no answer is due first (also a settable property)
    "edits_per_call": (8, _count(1)),
    # seconds of shard work a recovery may replay; None: 10x the last checkpoint's time, at least 1 s
    "replay_budget": (None, lambda name, v: None if v is None else check_scalar(name, v, low=0.0)),
    # ... and bytes of logged arrays
    "max_log_bytes": (256 << 20, _count(0)),
    # deaths of one shard in a row before a call gives up
    "max_restarts": (3, _count(0)),
    # CPUs Ray reserves per actor
    "cpus_per_shard": (1.0, lambda name, v: check_scalar(name, v, low=0.0)),
    # the actor's BLAS/OpenMP threads, set in its runtime_env: "auto" is cpus_per_shard rounded up;
    # None keeps Ray's default and starts actors faster (no runtime_env)
    "blas_threads": ("auto", lambda name, v: v if v is None or v == "auto" else _count(1)(name, v)),
    # where checkpoints go (shared by the nodes of a cluster); None: a temporary folder
    "checkpoint_dir": (None, _path),
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
        """Apply edits, answer asks (a method is called, an attribute read), save a checkpoint.

        ``payload`` is ``pickle((edits, asks, checkpoint path or None))``. Returns
        ``pickle((edit seconds, answers, checkpoint seconds or its error or None,
        what the last edit returned, seconds in all))``.
        Runtime complexity: that of the calls, plus O(size of the state) for a checkpoint.
        """
        edits, asks, checkpoint = pickle.loads(payload)
        start = time.perf_counter()
        last = None
        for name, args, kwargs in edits:
            last = getattr(self._att, name)(*args, **kwargs)
        edit_seconds = time.perf_counter() - start
        answers = [getattr(self._att, name) for name, _, _ in asks]
        answers = [f(*a, **k) if callable(f) else f for f, (_, a, k) in zip(answers, asks, strict=True)]
        saved: float | str | None = None
        if checkpoint is not None:
            begin = time.perf_counter()
            try:
                self._att.save(checkpoint)
                saved = time.perf_counter() - begin
            except OSError as exc:  # the driver keeps the log and tries again later
                saved = f"{type(exc).__name__}: {exc}"
        result = (edit_seconds, answers, saved, last, time.perf_counter() - start)
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


# ====================================================================== driver bookkeeping
@dataclass(eq=False)
class _Entry:
    """Edits sent to a shard in one call, logged until a checkpoint covers them."""

    seq: int
    calls: list[Call]
    nbytes: int
    seconds: float = 0.0


@dataclass(eq=False)
class _Sent:
    """A call to a shard whose result has not been collected (``covers``: last logged seq)."""

    ref: Any
    entry: _Entry | None
    asks: list[Call]
    checkpoint: str | None
    covers: int


@dataclass(eq=False)
class _Shard:
    index: int
    heads: tuple[int, int]
    rows: list[int]
    actor: Any
    base: str | None  #: checkpoint the shard restores from (None: the build from ``inputs``)
    inputs: tuple[Any, ...] = ()
    base_seconds: float = 0.0
    log: list[_Entry] = field(default_factory=list)
    unsent: list[Call] = field(default_factory=list)
    in_flight: list[_Sent] = field(default_factory=list)
    next_seq: int = 0
    checkpoint_seconds: float = 0.0
    last_result: Any = None  #: what the shard's last edit returned (``append``'s indices)
    log_seconds: float = 0.0  #: the logged edits' shard time (the replay cost), kept with ``log``
    log_bytes: int = 0  #: the logged edits' array bytes, kept with ``log``

    def tally_log(self) -> None:
        """Recount ``log_seconds`` and ``log_bytes`` after the log was cut or its times redistributed."""
        self.log_seconds = sum(entry.seconds for entry in self.log)
        self.log_bytes = sum(entry.nbytes for entry in self.log)


def _split(size: int, parts: int) -> list[int]:
    """Edges of ``parts`` contiguous blocks of ``[0, size)`` whose sizes differ by at most one."""
    return [size * k // parts for k in range(parts + 1)]


def _grid(by: str, shards: int, heads: int, n: int, causal: bool) -> tuple[int, int]:
    """``(head_blocks, row_blocks)``; ``by="auto"``: the most head blocks that divide ``shards``."""
    if by == "heads" or (by == "auto" and shards <= heads):
        if shards > heads:
            raise ValueError(f"shards={shards}: by='heads' needs at most one shard per head ({heads} heads)")
        return shards, 1
    head_blocks = 1 if by == "rows" else max(g for g in range(1, heads + 1) if shards % g == 0)
    row_blocks = shards // head_blocks
    if causal and row_blocks > 1:
        raise ValueError(f"shards={shards}: a causal structure is split by heads only ({heads} heads)")
    if row_blocks > n:
        raise ValueError(f"shards={shards}: {row_blocks} row blocks need as many query rows, n={n}")
    return head_blocks, row_blocks


# ====================================================================== the driver
class ShardedAttention(ValidatedInputs):
    """Softmax attention kept current under edits, its state sharded over Ray actors.

    Answers what one :class:`~dynattn.DynamicAttention` given the same inputs
    and calls would, within the accuracy target, and survives the death of
    shard actors. ``Hs`` and ``ns`` below are a shard's heads and query rows.

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
        Split blocks of heads, of query rows, or heads first and rows where
        there are more shards than heads (default).
    address : str or None, keyword-only
        Ray cluster to join (``ray.init(address=...)``) when Ray is not yet
        initialized in this process; None starts a local one.
    **options
        ``DynamicAttention``'s options (``tau``, ``scale``, ``dtype``, ``storage``,
        ``memory_budget`` per shard, ``tol``, ``certify``, ``causal``, ``key_mask``;
        ``backend`` only None, "auto" or "numpy"), and the runtime's, listed
        with their defaults in :data:`RUNTIME_OPTIONS`.

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
        runtime = self._runtime_options({k: options.pop(k) for k in list(options) if k in RUNTIME_OPTIONS})
        if options.pop("backend", None) not in (None, "auto", "numpy"):
            raise ValueError("backend: shards run on numpy; expected None, 'auto' or 'numpy'")
        options.pop("device", None)
        Q, K, V = _host(Q), _host(K), _host(V)
        super().__init__(
            Q, K, V, scale=options.get("scale", 1.0), dtype=options.get("dtype"), backend="numpy"
        )
        if options.get("key_mask") is not None:
            options["key_mask"] = np.array(_host(options["key_mask"]))
        # DynamicAttention's own checks of every option, on a structure with one query row
        probe = DynamicAttention(self._Q[..., :1, :], self._K, self._V, backend="numpy", **options)
        options["dtype"] = self._dtype
        shards = _count(1)("shards", shards)
        by = check_choice("by", by, ("heads", "rows", "auto"))
        if not isinstance(probe.tau, float):
            raise ValueError(
                f"tau: expected a number in [0, 1] for ShardedAttention, got {probe.tau!r} (the "
                "online policy decides per structure; shards would decide apart)"
            )
        self._H, self._tau, self._causal = probe.heads, probe.tau, probe.causal
        self._helper = self._make_helper()
        inputs = {"Q": self._Q, "K": self._K, "V": self._V}
        self._buffers = {
            x: np.ascontiguousarray(a.reshape(self._H, *a.shape[-2:])) for x, a in inputs.items()
        }
        self._buffers["k_norms"] = k_norms = cert.norms(self._buffers["K"])
        self._q_norm_max, self._k_norm_max = float(cert.norms(self._Q).max()), float(k_norms.max())
        self._helper._guard_logit_reach("K", self._q_norm_max, self._k_norm_max)
        head_blocks, row_blocks = _grid(by, shards, self._H, self.n, self._causal)
        self._expose()
        self._start(runtime, address, _split(self._H, head_blocks), _split(self.n, row_blocks), by)
        try:
            for shard in self._shards:
                (h0, h1), (r0, r1) = shard.heads, shard.rows
                if shard.index % row_blocks == 0:
                    keys, values = (self._ray.put(self._buffers[x][h0:h1]) for x in "KV")
                queries = self._ray.put(np.ascontiguousarray(self._buffers["Q"][h0:h1, r0:r1]))
                shard.inputs = (queries, keys, values, options)
            seconds = self._ray.get([s.actor.build.remote(*s.inputs) for s in self._shards])
            for shard, took in zip(self._shards, seconds, strict=True):
                shard.base_seconds = took
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _runtime_options(given: dict[str, Any]) -> dict[str, Any]:
        """The runtime's options: ``given`` checked, defaults filled in."""
        return {
            name: check(name, given.get(name, default)) for name, (default, check) in RUNTIME_OPTIONS.items()
        }

    def _make_helper(self) -> DynamicAttention:
        """A one-row ``DynamicAttention`` of the same heads, dtype and scale, whose argument checks
        (head indices, rows, logit range) the driver uses."""
        zeros = [np.zeros((*self.batch_shape, 1, w), dtype=self._dtype) for w in (self.d, self.d, self.e)]
        return DynamicAttention(*zeros, scale=self._scale, dtype=self._dtype, backend="numpy")

    def _start(
        self, runtime: dict[str, Any], address: Any, heads: list[int], rows: list[int], by: str
    ) -> None:
        """Join or start Ray, prepare the checkpoint folder, spawn one actor per shard."""
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address: expected a string or None, got {type(address).__name__}")
        self._ray = ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=address)
        self._runtime, self._by, self._closed = runtime, by, False
        self._broken: BaseException | None = None
        owned = runtime["checkpoint_dir"] is None
        self._checkpoint_dir = (
            tempfile.mkdtemp(prefix="dynattn-shards-") if owned else runtime["checkpoint_dir"]
        )
        os.makedirs(self._checkpoint_dir, exist_ok=True)
        self._instance = secrets.token_hex(6)
        self._counters = dict.fromkeys(
            ("restarts", "replayed_edits", "checkpoints", "checkpoint_failures"), 0
        )
        self._last_recovery_seconds: float | None = None
        self._last_shard_seconds = 0.0
        self._head_edges, self._row_edges = heads, rows
        self._shards: list[_Shard] = []
        for h0, h1 in zip(heads, heads[1:], strict=False):
            for r0, r1 in zip(rows, rows[1:], strict=False):
                self._shards.append(_Shard(len(self._shards), (h0, h1), [r0, r1], self._spawn(), None))
        self._finalizer = weakref.finalize(
            self, _release, self._shards, self._checkpoint_dir if owned else None
        )

    def _spawn(self) -> Any:
        cpus, threads = self._runtime["cpus_per_shard"], self._runtime["blas_threads"]
        options: dict[str, Any] = {"num_cpus": cpus, "max_restarts": 0, "max_task_retries": 0}
        if threads is not None:
            count = str(max(1, math.ceil(cpus)) if threads == "auto" else threads)
            options["runtime_env"] = {"env_vars": dict.fromkeys(BLAS_THREAD_VARIABLES, count)}
        return _remote_worker(self._ray).options(**options).remote()

    def _expose(self) -> None:
        """Point ``Q, K, V`` (read-only accessors of the base class) at the used part of the buffers."""
        for name, rows, width in (("Q", self.n, self.d), ("K", self.m, self.d), ("V", self.m, self.e)):
            setattr(self, f"_{name}", self._buffers[name][:, :rows].reshape(*self.batch_shape, rows, width))
        self._k_norms = self._buffers["k_norms"][:, : self.m]

    def _grow(self, name: str, index: int, row: np.ndarray) -> None:
        """Store ``row: (H, width)`` at row ``index`` of buffer ``name`` (capacity doubles)."""
        buffer = self._buffers[name]
        if index == buffer.shape[1]:
            self._buffers[name] = np.empty(
                (buffer.shape[0], 2 * index, *buffer.shape[2:]), dtype=buffer.dtype
            )
            self._buffers[name][:, :index] = buffer
        self._buffers[name][:, index] = row

    # ================================================================== the paper's operations
    def update_k(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``K[head][i, j] += delta`` on the shards holding ``head``; queued.

        Runtime complexity: ``DynamicAttention.update_k`` on each (O(ns) amortized, plus the fold).
        """
        self._entry("K", i, j, delta, head)

    def update_v(self, i: int, j: int, delta: float, *, head: Any = None) -> None:
        """``V[head][i, j] += delta`` on the shards holding ``head``; queued.

        Runtime complexity: ``DynamicAttention.update_v`` on each.
        """
        self._entry("V", i, j, delta, head)

    def update_k_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``K[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        Runtime complexity: the updates, on the shards holding their heads, in parallel; queued.
        """
        self._entries("K", rows, cols, deltas, heads, "deltas")

    def update_v_many(self, rows: Any, cols: Any, deltas: Any, *, heads: Any = None) -> None:
        """``V[heads[b], rows[b], cols[b]] += deltas[b]`` for every b, in order; all-or-nothing.

        Runtime complexity: the updates, on the shards holding their heads, in parallel; queued.
        """
        self._entries("V", rows, cols, deltas, heads, "deltas")

    def query(self, i: int, j: int, *, head: Any = None) -> float:
        """``O[head][i, j]`` as a Python float, from the shard holding it.

        Runtime complexity: O(t) on that shard, plus one round trip.
        """
        h = self._helper._head_index(head)
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
        return self._rows(np.array([check_index("i", i, self.n, axis="query rows, n")]))[..., 0, :]

    def query_rows(self, rows: Any) -> np.ndarray:
        """``O[..., rows, :]`` for every head: a new ``(*batch, k, e)`` array for k rows.

        Runtime complexity: O(Hs*k*t*e) on the shards holding the rows, in parallel, plus one round trip.
        """
        return self._rows(check_index_array("rows", rows, self.n, axis="query rows, n"))

    def query_many(self, rows: Any, cols: Any, *, heads: Any = None) -> np.ndarray:
        """``O[heads[k]][rows[k], cols[k]]`` for every k: a new ``(k,)`` array.

        Runtime complexity: O(k*t) on the shards holding the entries, in parallel, plus one round trip.
        """
        rows = check_index_array("rows", rows, self.n, axis="query rows, n")
        cols = check_index_array("cols", cols, self.e, axis="output columns, e")
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols: expected the same length, got {rows.size} and {cols.size}")
        flat = self._helper._head_indices(heads, rows.size)
        owner = self._owners(flat, rows)
        asks, where = {}, {}
        for s in np.unique(owner).tolist():
            shard, where[s] = self._shards[s], owner == s
            local = (rows[where[s]] - shard.rows[0], cols[where[s]])
            asks[s] = [("query_many", local, {"heads": flat[where[s]] - shard.heads[0]})]
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
        """``DynamicAttention.error_bound`` for row ``i`` of ``head``, from the shard holding it.

        Runtime complexity: O(t + e) on that shard, plus one round trip.
        """
        h = self._helper._head_index(head)
        i = check_index("i", i, self.n, axis="query rows, n")
        s = int(self._owners(np.array([h]), np.array([i]))[0])
        shard = self._shards[s]
        ask = ("error_bound", (i - shard.rows[0],), {"head": h - shard.heads[0]})
        return float(self._exchange({s: [ask]})[s][0])

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """``O[..., rows, :]``, ``(*batch, k, e)``: one call per shard holding any of the rows."""
        out = np.empty((self._H, rows.size, self.e), dtype=self._dtype)
        block = np.searchsorted(self._row_edges, rows, side="right") - 1
        where = {s.index: block == s.index % self._row_blocks for s in self._shards}
        asks: dict[int, list[Call]] = {
            s: [("query_rows", (rows[w] - self._shards[s].rows[0],), {})] for s, w in where.items() if w.any()
        }
        for s, answers in self._exchange(asks).items():
            h0, h1 = self._shards[s].heads
            out[h0:h1, where[s]] = answers[0]
        return out.reshape(*self.batch_shape, rows.size, self.e)

    # ================================================================== token and row edits
    def set_key(self, c: int, k: Any) -> None:
        """``K[..., c, :] = k`` for every head, ``k: (*batch, d)``, on every shard; queued.

        Runtime complexity: O(Hs*ns*d) per shard, in parallel, plus the fold.
        """
        self.set_token(check_index("c", c, self.m, axis="key rows, m"), k=k)

    def set_value(self, c: int, v: Any) -> None:
        """``V[..., c, :] = v`` for every head, ``v: (*batch, e)``, on every shard; queued.

        Runtime complexity: O(Hs*e) per shard (O(Hs*ns*d) on a row's first touch), plus the fold.
        """
        self.set_token(check_index("c", c, self.m, axis="value rows, m"), v=v)

    def set_query(self, i: int, q: Any) -> None:
        """``Q[..., i, :] = q`` for every head, ``q: (*batch, d)``, on the shards holding row i; queued.

        Runtime complexity: O(Hs*m*(d+e)) on each of them (the row is recomputed exactly).
        """
        self.set_token(check_index("i", i, self.n, axis="query rows, n"), q=q)

    def set_token(self, i: int, q: Any = None, k: Any = None, v: Any = None) -> None:
        """Self-attention edit of token i: any of its query, key and value rows, checked together.

        Keys and values go to every shard, the query row to the shards holding row i; queued.
        Runtime complexity: O(Hs*ns*d) per shard for k, O(Hs*e) for v, O(Hs*m*(d+e)) for q.
        """
        if q is None and k is None and v is None:
            raise ValueError("set_token: expected at least one of q, k, v; got none")
        if k is not None or v is not None:
            i = check_index("i", i, self.m, axis="key/value rows, m")
        if q is not None:
            i = check_index("i", i, self.n, axis="query rows, n")
        q_row, k_row, v_row = self._new_rows(q, k, v)

        def calls(shard: _Shard) -> list[Call]:
            r0, r1 = shard.rows
            rows = self._slices(shard, q=q_row if r0 <= i < r1 else None, k=k_row, v=v_row)
            if not rows or "q" not in rows or r0 == 0:
                return [("set_token", (i,), rows)] if rows else []
            # the shard's query row i - r0 is not its key row i: the same edits, one by one
            split: list[Call] = [
                (f"set_{name}", (i, rows[x]), {}) for x, name in (("k", "key"), ("v", "value")) if x in rows
            ]
            return [*split, ("set_query", (i - r0, rows["q"]), {})]

        self._queue(calls)
        for name, row in (("Q", q_row), ("K", k_row), ("V", v_row)):
            if row is not None:
                self._buffers[name][:, i] = row
        if k_row is not None:
            self._k_norms[:, i] = cert.norms(k_row)

    def append(self, q: Any = None, k: Any = None, v: Any = None) -> tuple[int | None, int | None]:
        """Add a token: a query row ``q: (*batch, d)`` and/or a key-value pair ``k, v``.

        The pair goes to every shard, the query row to the last row block. A key
        takes the index ``DynamicAttention.append`` gives it, so an append with a
        key waits for the shards. Returns ``(query_index, key_index)`` (None for
        what was not added). Runtime complexity: O(Hs*ns*d) per shard for a key,
        plus a round trip; O(Hs*m*(d+e)) on the last row block's shards for a query.
        """
        if (k is None) != (v is None):
            raise ValueError("append: expected k and v together (a key-value pair), got only one")
        if q is None and k is None:
            raise ValueError("append: expected q, or k and v, or all three; got none")
        if self._causal and (q is None or k is None):
            raise ValueError("append: a causal structure appends whole tokens; expected q, k and v")
        q_row, k_row, v_row = self._new_rows(q, k, v)
        last = self._row_blocks - 1

        def calls(shard: _Shard) -> list[Call]:
            here = shard.index % self._row_blocks == last
            rows = self._slices(shard, q=q_row if here else None, k=k_row, v=v_row)
            return [("append", (), rows)] if rows else []

        self._queue(calls)
        query_index = key_index = None
        if q_row is not None:
            query_index = self.n
            self._grow("Q", self.n, q_row)
            self.n += 1
            self._row_edges[-1] += 1
            for shard in self._shards[last :: self._row_blocks]:
                shard.rows[1] += 1
        if k_row is not None and v_row is not None:
            self._exchange({shard.index: [] for shard in self._shards})
            key_index = int(self._shards[0].last_result[1])
            for name, row in (("K", k_row), ("V", v_row), ("k_norms", cert.norms(k_row))):
                self._grow(name, key_index, row)
            self.m = max(self.m, key_index + 1)
        self._expose()
        return query_index, key_index

    def reserve(self, *, n: int | None = None, m: int | None = None) -> None:
        """``DynamicAttention.reserve`` on the shards: room for ``m`` keys on every shard and
        for query rows up to ``n`` in all on the last row block (where appended query rows
        go); queued like an edit. Runtime complexity: that of ``DynamicAttention.reserve``
        per shard, in parallel.
        """
        wanted = reserve_sizes(n, m)
        last = self._row_blocks - 1

        def calls(shard: _Shard) -> list[Call]:
            room = {"m": wanted["m"]} if "m" in wanted else {}
            if "n" in wanted and shard.index % self._row_blocks == last:
                room["n"] = max(wanted["n"] - shard.rows[0], 0)
            return [("reserve", (), room)] if room else []

        self._queue(calls)

    def delete_key(self, c: int) -> None:
        """``DynamicAttention.delete_key(c)`` on every shard (key c hidden from every query); queued.

        Runtime complexity: O(Hs*ns) per shard, plus the fold.
        """
        c = check_index("c", c, self.m, axis="key rows, m")
        self._queue(lambda shard: [("delete_key", (c,), {})])

    def set_key_mask(self, c: int, visible: bool) -> None:
        """Show or hide key c (a key padding mask update) on every shard; queued.

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
        """Number of heads H (the product of ``batch_shape``)."""
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
    def actors(self) -> tuple[Any, ...]:
        """The shards' current Ray actor handles (a restored shard has a new one)."""
        return tuple(shard.actor for shard in self._shards)

    @property
    def edits_per_call(self) -> int:
        """Queued edits a shard gets in one call when no answer is due first (settable)."""
        return int(self._runtime["edits_per_call"])

    @edits_per_call.setter
    def edits_per_call(self, value: int) -> None:
        self._runtime["edits_per_call"] = RUNTIME_OPTIONS["edits_per_call"][1]("edits_per_call", value)

    @property
    def stats(self) -> dict[str, int]:
        """``DynamicAttention``'s counters summed over the shards, plus ``restarts``,
        ``replayed_edits``, ``checkpoints``, ``checkpoint_failures``.

        Runtime complexity: one round trip to every shard.
        """
        total = dict(self._counters)
        for (counters,) in self._exchange({s.index: [("stats", (), {})] for s in self._shards}).values():
            for name, value in counters.items():
                total[name] = total.get(name, 0) + int(value)
        return total

    @property
    def last_shard_seconds(self) -> float:
        """The longest time one shard spent in the last call that waited (the rest of that
        call's wall time is the fan-out's overhead)."""
        return self._last_shard_seconds

    @property
    def last_recovery_seconds(self) -> float | None:
        """Wall time of the last restore of a dead shard (new actor, checkpoint, replay), or None."""
        return self._last_recovery_seconds

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, shards={len(self._shards)}, by={self._by!r})"

    # ================================================================== persistence and life cycle
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state: a JSON manifest at ``path``, one ``.npz`` per shard beside it.

        Atomic as a whole: the shards write new files (``DynamicAttention.save``),
        then the manifest naming them is written to a temporary file and renamed
        over ``path``; only then are the previous save's shard files removed. A
        failed save leaves the previous one intact. The folder must be reachable
        from every shard. Runtime complexity: O(size of the state) per shard, in parallel.
        """
        path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(path)
        token = secrets.token_hex(6)
        files = [f"{name}.{token}.shard{k}.npz" for k in range(len(self._shards))]
        temporary = os.path.join(folder, f".{name}.{token}.tmp")
        manifest = {"format": MANIFEST_FORMAT, "class": type(self).__name__, "by": self._by}
        manifest.update(batch_shape=list(self.batch_shape), head_edges=self._head_edges)
        manifest.update(row_edges=self._row_edges, q_norm_max=self._q_norm_max, k_norm_max=self._k_norm_max)
        manifest["files"] = files
        try:
            self._exchange({k: [("save", (os.path.join(folder, f),), {})] for k, f in enumerate(files)})
            try:
                previous = set(_read_manifest(path)["files"])
            except (OSError, SnapshotError):
                previous = set()
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

        ``runtime`` takes the constructor's runtime options (:data:`RUNTIME_OPTIONS`).
        The manifest is checked first, each shard file by ``DynamicAttention.load``,
        then that the shards fit together; the files are copied as the shards'
        first checkpoints, so a later save over ``path`` cannot affect a recovery.
        Raises :class:`dynattn.persistence.SnapshotError` saying what is wrong,
        ``OSError`` when a file cannot be read.
        Runtime complexity: O(size of the state) per shard, in parallel.
        """
        if unknown := set(runtime) - set(RUNTIME_OPTIONS):
            raise TypeError(f"ShardedAttention.load: unexpected keyword argument(s) {sorted(unknown)}")
        options = cls._runtime_options(runtime)
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
            if isinstance(cause := getattr(exc, "cause", None), SnapshotError):
                raise cause from None
            raise
        return self

    def _adopt(self, manifest: dict[str, Any], path: str) -> None:
        """The driver's copy of ``Q, K, V`` and options, from loaded shards that must fit together."""
        answers = self._exchange(
            {s.index: [(x, (), {}) for x in ("Q", "K", "V", "config")] for s in self._shards}
        )
        Q0, K0, V0, first = answers[0]
        (_, m, d), e = K0.shape, V0.shape[2]
        for shard in self._shards:
            Q, K, V, config = answers[shard.index]
            hs, ns = shard.heads[1] - shard.heads[0], shard.rows[1] - shard.rows[0]
            fits = (Q.shape, K.shape, V.shape) == ((hs, ns, d), (hs, m, d), (hs, m, e))
            if not fits or any(config[k] != first[k] for k in ("dtype", "scale", "tau", "causal")):
                raise SnapshotError(path, f"shard {shard.index}: its file does not fit the manifest's layout")
        self._xp = resolve_backend("numpy")
        self._dtype = self._output_dtype = np.dtype(first["dtype"])
        self._dtype_max = float(np.finfo(self._dtype).max)
        self._scale, self._tau, self._causal = (
            float(first["scale"]),
            float(first["tau"]),
            bool(first["causal"]),
        )
        self.batch_shape = tuple(manifest["batch_shape"])
        self._H, blocks = math.prod(self.batch_shape), self._row_blocks
        grid = [self._shards[a : a + blocks] for a in range(0, len(self._shards), blocks)]
        self._buffers = {
            "Q": np.concatenate([np.concatenate([answers[s.index][0] for s in row], axis=1) for row in grid]),
            "K": np.concatenate([answers[row[0].index][1] for row in grid]),
            "V": np.concatenate([answers[row[0].index][2] for row in grid]),
        }
        self._buffers["k_norms"] = cert.norms(self._buffers["K"])
        self.n, self.m, self.d, self.e = self._row_edges[-1], m, d, e
        self._q_norm_max, self._k_norm_max = float(manifest["q_norm_max"]), float(manifest["k_norm_max"])
        self._helper = self._make_helper()
        self._expose()

    def close(self) -> None:
        """Stop the shard actors and remove their checkpoints (and the checkpoint folder if it
        was made here); Ray keeps running. Idempotent. Runtime complexity: O(shards)."""
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
            shard.unsent.extend(calls_of(shard))
            if len(shard.unsent) >= self._runtime["edits_per_call"]:
                shard.in_flight.append(self._send(shard, []))
                if len(shard.in_flight) > MAX_IN_FLIGHT:
                    self._collect([shard])

    def _send(self, shard: _Shard, asks: list[Call]) -> _Sent:
        """One call to ``shard``: its queued edits (logged), then ``asks``, then a checkpoint if due."""
        entry = None
        if shard.unsent:
            nbytes = sum(getattr(x, "nbytes", 8) for _, a, k in shard.unsent for x in (*a, *k.values()))
            entry = _Entry(shard.next_seq, shard.unsent, nbytes)
            shard.log.append(entry)
            shard.log_bytes += nbytes
            shard.next_seq, shard.unsent = shard.next_seq + 1, []
        checkpoint = self._checkpoint_path(shard) if self._checkpoint_due(shard) else None
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
        ray, dead = self._ray, self._ray.exceptions.RayActorError
        try:
            try:
                results: list[Any] | None = ray.get([sent.ref for s in shards for sent in s.in_flight])
            except dead:
                results = None  # find the dead shards one by one
            answers: dict[int, list[Any]] = {}
            self._last_shard_seconds = 0.0
            for shard in shards:
                sent_list, shard.in_flight = shard.in_flight, []
                if results is not None:
                    mine, results = results[: len(sent_list)], results[len(sent_list) :]
                else:
                    try:
                        mine = ray.get([sent.ref for sent in sent_list])
                    except dead:
                        for sent in sent_list:
                            _remove(sent.checkpoint)
                        answers[shard.index] = self._recover(shard, sent_list[-1].asks)
                        continue
                for sent, raw in zip(sent_list, mine, strict=True):
                    edit_seconds, answers[shard.index], saved, last, seconds = pickle.loads(raw)
                    self._last_shard_seconds = max(self._last_shard_seconds, seconds)
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
            shard.log_seconds += edit_seconds
        if sent.checkpoint is None:
            return
        if not isinstance(saved, float):
            self._counters["checkpoint_failures"] += 1
            _remove(sent.checkpoint)
            return
        _remove(shard.base)
        shard.base, shard.inputs, shard.checkpoint_seconds = sent.checkpoint, (), saved
        shard.log = [entry for entry in shard.log if entry.seq > sent.covers]
        shard.tally_log()
        self._counters["checkpoints"] += 1

    def _recover(self, shard: _Shard, asks: list[Call]) -> list[Any]:
        """Restore a dead shard (new actor, checkpoint or build, log replayed), then answer ``asks``."""
        ray, start = self._ray, time.perf_counter()
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
            except ray.exceptions.RayActorError:
                continue
        else:
            raise RuntimeError(f"shard {shard.index} died {self._runtime['max_restarts'] + 1} times in a row")
        seconds, _, _, last, _ = pickle.loads(replayed)
        shard.last_result = last if edits else shard.last_result
        for entry in shard.log:  # the replay's time, spread over the log by number of edits
            entry.seconds = seconds * len(entry.calls) / len(edits)
        shard.tally_log()
        self._counters["restarts"] += 1
        self._counters["replayed_edits"] += len(edits)
        self._last_recovery_seconds = time.perf_counter() - start
        return pickle.loads(answered)[1]

    def _checkpoint_due(self, shard: _Shard) -> bool:
        """Whether the shard's replay cost (or log size) is over budget and no checkpoint is in flight."""
        if any(sent.checkpoint for sent in shard.in_flight) or (not shard.log and shard.base is not None):
            return False
        budget = self._runtime["replay_budget"]
        budget = max(1.0, 10 * shard.checkpoint_seconds) if budget is None else budget
        cost = shard.log_seconds + (shard.base_seconds if shard.base is None else 0.0)
        return cost > budget or shard.log_bytes > self._runtime["max_log_bytes"]

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
        return a * self._row_blocks + np.searchsorted(self._row_edges, rows, side="right") - 1

    def _slices(self, shard: _Shard, **rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The shard's heads of each given ``(H, width)`` row."""
        return {name: row[shard.heads[0] : shard.heads[1]] for name, row in rows.items() if row is not None}

    def _new_rows(self, q: Any, k: Any, v: Any) -> list[np.ndarray | None]:
        """Checked ``(H, width)`` copies of the given rows (``DynamicAttention``'s checks, logit range
        included); the driver's query norm bound grows with ``q``."""
        helper, rows = self._helper, []
        for name, value, width in (("q", q, self.d), ("k", k, self.d), ("v", v, self.e)):
            rows.append(
                None if value is None else helper._valid_row(name, value, width).reshape(self._H, width)
            )
        q_norm, k_norm = (0.0 if x is None else float(cert.norms(x).max()) for x in rows[:2])
        if q is not None:
            helper._guard_logit_reach("q", q_norm, self._k_norm_max)
        if k is not None:
            helper._guard_logit_reach("k", self._q_norm_max, k_norm)
        self._q_norm_max, self._k_norm_max = max(self._q_norm_max, q_norm), max(self._k_norm_max, k_norm)
        return rows

    def _entry(self, target: str, i: Any, j: Any, delta: Any, head: Any) -> None:
        """Check one entry update under the names of ``update_k`` / ``update_v``, then queue it."""
        h = self._helper._head_index(head)
        i = check_index("i", i, self.m, axis="key rows, m" if target == "K" else "value rows, m")
        j = check_index("j", j, self.d if target == "K" else self.e, axis="columns")
        self._entries(
            target, [i], [j], [check_scalar("delta", delta)], [h] if self.batch_shape else None, "delta"
        )

    def _entries(self, target: str, rows: Any, cols: Any, deltas: Any, heads: Any, name: str) -> None:
        """Check a batch of entry updates as ``DynamicAttention`` does, then queue it per head block."""
        rows = check_index_array("rows", rows, self.m, axis="key/value rows, m")
        cols = check_index_array("cols", cols, self.d if target == "K" else self.e, axis="columns")
        values = np.asarray(_host(deltas))
        if values.shape != rows.shape or cols.shape != rows.shape:
            raise ValueError(
                f"rows, cols, deltas: expected equal lengths, got {rows.shape}, {cols.shape}, {values.shape}"
            )
        flat = self._helper._head_indices(heads, rows.size)
        if values.size and values.dtype.kind not in "fiu":
            raise TypeError(f"deltas: expected real numbers, got dtype {values.dtype}")
        if values.size and not np.isfinite(values.astype(np.float64)).all():
            raise ValueError("deltas: expected finite values, got NaN or inf")
        array = self._buffers[target]
        trial: dict[tuple[int, int], dict[int, Any]] = {}  # (head, row) -> {column: new value}
        norms: dict[tuple[int, int], float] = {}
        for h, c, j, delta in zip(flat.tolist(), rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            changed = trial.setdefault((h, c), {})
            old = changed.get(j, array[h, c, j])
            changed[j] = new = self._checked_sum(name, old, delta, target)
            if target == "K":  # DynamicAttention's range checks: each step, then each row as a whole
                before = norms.get((h, c), float(self._k_norms[h, c]))
                norms[h, c] = norm = cert.updated_norm(before, float(old), float(new))
                self._helper._guard_logit_reach(name, self._q_norm_max, norm)
        for (h, c), changed in trial.items():
            if target == "K" and name == "deltas":
                row = array[h, c].astype(np.float64)
                row[list(changed)] = [float(x) for x in changed.values()]
                self._helper._guard_logit_reach(name, self._q_norm_max, float(cert.norms(row)))
        for (h, c), changed in trial.items():
            for j, new in changed.items():
                array[h, c, j] = new
        for (h, c), norm in norms.items():
            self._k_norms[h, c] = norm
            self._k_norm_max = max(self._k_norm_max, norm)
        method = f"update_{target.lower()}_many"
        block = np.searchsorted(self._head_edges, flat, side="right") - 1

        def calls(shard: _Shard) -> list[Call]:
            mask = block == shard.index // self._row_blocks
            local = {"heads": flat[mask] - shard.heads[0]}
            return [(method, (rows[mask], cols[mask], values[mask]), local)] if mask.any() else []

        self._queue(calls)


# ====================================================================== helpers
_REMOTE_WORKER: Any = None


def _remote_worker(ray: Any) -> Any:
    """:class:`ShardWorker` as a Ray actor class (made once)."""
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(ShardWorker)
    return _REMOTE_WORKER


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
        for path in (shard.base, *(sent.checkpoint for sent in shard.in_flight)):
            _remove(path)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _read_manifest(path: str) -> dict[str, Any]:
    """The checked manifest at ``path`` (SnapshotError saying what is wrong)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(path, f"not a ShardedAttention manifest: not UTF-8 JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("class") != "ShardedAttention":
        raise SnapshotError(path, "not a ShardedAttention manifest (no 'class': 'ShardedAttention')")

    def get(key: str) -> Any:
        return manifest.get(key)

    def ints(x: Any, low: int) -> bool:
        return isinstance(x, list) and len(x) >= low and all(type(v) is int and v >= 0 for v in x)

    def edges(x: Any) -> bool:
        return ints(x, 2) and x[0] == 0 and all(a < b for a, b in zip(x, x[1:], strict=False))

    heads, rows, files = get("head_edges"), get("row_edges"), get("files")
    checks = {
        "format": get("format") == MANIFEST_FORMAT,
        "by": get("by") in ("heads", "rows", "auto"),
        "batch_shape": ints(get("batch_shape"), 0) and 0 not in get("batch_shape"),
        "head_edges": edges(heads)
        and ints(get("batch_shape"), 0)
        and heads[-1] == math.prod(get("batch_shape")),
        "row_edges": edges(rows),
        "q_norm_max": all(
            type(get(x)) in (int, float) and 0 <= get(x) < math.inf for x in ("q_norm_max", "k_norm_max")
        ),
        "files": edges(heads)
        and edges(rows)
        and isinstance(files, list)
        and len(files) == (len(heads) - 1) * (len(rows) - 1)
        and all(isinstance(f, str) and f and os.path.basename(f) == f and f[0] != "." for f in files),
    }
    for key, ok in checks.items():
        if not ok:
            raise SnapshotError(path, f"manifest {key!r} is missing or invalid: {get(key)!r}")
    return manifest
