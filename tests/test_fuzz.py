"""Differential fuzz test of :class:`dynattn.DynamicAttention`.

Random sequences of every public operation are applied both to the structure
and to an independent *mirror* (plain numpy copies of ``Q``, ``K``, ``V`` in
the storage dtype, the key padding mask and the causal positions). After every
step the structure's invariants are asserted (``_check(deep=True)``), its
read-only views are compared with the mirror, and every answer of every row of
every head is compared with the extended-precision reference
:func:`dynattn.testing.reference_attention` (``precise=True``) in two ways:

* accuracy: ``|answer - ref| <= 4 * err_naive + TARGET[dtype] * max|V[:, j]|``
  (:func:`dynattn.testing.allowed_error`);
* certificate: ``|answer - ref| <= error_bound(i, head=h) * max|V[:, j]|``
  (times 1.01, plus 1e-300, for the rounding of the comparison itself); a
  column whose values are all zero must answer exactly zero.

The answers are read through a randomly chosen method each step (``output``,
``query_rows``, ``query_row``, ``query``, ``query_many`` or a mix), in random
order, because a query may itself recompute a row. For the same reason some
steps are *bursts*: 2-4 mutations (``_check`` after each) with no query between
them, so that an error a fold buries in the snapshot is not repaired by a query
that happens to look at the row first.

Workloads are sortedcontainers-style: weighted actions drawn by a seeded
:class:`numpy.random.Generator`. The ``"random"`` workload uses moderate
content; the ``"adversarial"`` workload adds large key steps (logit jumps of
15-60 for float32, 15-400 for float64, as entry deltas and as whole new key
rows), a dominant key raised further, moved far away and back (by row, by
entries and by the key mask, also as one uninterrupted excursion with folds)
and values spanning many orders of magnitude. Configurations cover
both storages, both dtypes, ``tau`` in {0, 0.3, 0.5, 1}, causal or not, an
optional construction ``key_mask``, scale 1 or ``1/sqrt(d)`` and leading axes
``()``, ``(1,)``, ``(3,)`` or ``(2, 2)``; the seed picks the ones that are not
parametrized. A hypothesis test draws the action sequence itself, so a failure
shrinks to a short sequence.

Every failure message names the configuration, the step and the last calls;
the whole call sequence is written as a runnable script ``reproducer.py`` in
the test's ``tmp_path``.

Profiles
--------
quick (default)
    A few short sequences per configuration; about a minute for both backends.
long
    ``python -m pytest tests/test_fuzz.py --fuzz-long`` multiplies the number
    of sequences per configuration, the steps per sequence and the hypothesis
    examples by 4; ``--fuzz-long=F`` by ``F`` (write ``=F``, or put the option
    after the test paths). Runtime grows as ``F**2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn import DynamicAttention, policy, structure
from dynattn.testing import allowed_error, as_numpy, reference_attention

STORAGES = ("dense", "implicit")
DTYPES = (np.float64, np.float32)
TAUS = (0.0, 0.3, 0.5, 1.0, "auto")
#: fold schedules, and the taus "spread" is fuzzed with (tau=0 folds at every update and
#: "auto" decides when to fold itself)
SCHEDULES = ("amortized", "spread")
SPREAD_TAUS = (0.3, 0.5, 1.0)
#: rates (GEMM flop/s, GEMV flop/s, seconds per call) that steer tau="auto" into each of its
#: regimes: folds and column purchases decided by rent, folds only at the memory cap
#: (columns read lazily until a fold), and columns bought after a few reads
POLICY_RATES = ((2e10, 5e9, 2e-6), (1e3, 1e12, 0.0), (1e3, 1e4, 0.0))
#: how often a tau="auto" structure is woken at construction (else it starts dormant)
AWAKE_PROBABILITY = 0.75
WORKLOADS = ("random", "adversarial")
#: leading (head/batch) axes of Q, K, V
BATCH_SHAPES = ((), (1,), (3,), (2, 2))
#: n and m start in 1..MAX_START_ROWS and grow by append up to MAX_ROWS
MAX_START_ROWS = 8
MAX_ROWS = 12
#: d and e are drawn from 1..MAX_WIDTH
MAX_WIDTH = 5
#: sequences per (dtype, storage, tau, workload) and steps per sequence, quick profile
QUICK_SEQUENCES = 4
QUICK_STEPS = 24
#: probability that a step is a burst of mutations without queries, per workload
BURST_PROBABILITY = {"random": 0.2, "adversarial": 0.4}
#: hypothesis examples per backend, quick profile
QUICK_EXAMPLES = 20
#: logit jumps of the adversarial key steps, per storage dtype
LOGIT_JUMP = {np.dtype(np.float32): (15.0, 60.0), np.dtype(np.float64): (15.0, 400.0)}
#: adversarial values span 10**-DECADES .. 10**DECADES
VALUE_DECADES = {np.dtype(np.float32): 6.0, np.dtype(np.float64): 12.0}
#: the certificate comparison's own rounding: relative factor and absolute floor
CERTIFICATE_SLACK = 1.01
CERTIFICATE_FLOOR = 1e-300
#: how many of the last calls a failure message shows
LOG_TAIL = 12


def fuzz_factor(config: pytest.Config) -> int:
    """The ``--fuzz-long`` multiplier (1 for the quick profile)."""
    return max(1, int(config.getoption("fuzz_long")))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``sequence``: QUICK_SEQUENCES sequences per configuration, times the factor."""
    if "sequence" in metafunc.fixturenames:
        metafunc.parametrize("sequence", range(QUICK_SEQUENCES * fuzz_factor(metafunc.config)))


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    """Everything that defines one fuzzed structure.

    Attributes
    ----------
    dtype : numpy dtype
        Storage dtype (float32 or float64).
    storage : {"dense", "implicit"}
        Storage strategy.
    tau : float or "auto"
        Laziness exponent, or the online policy.
    rates : tuple of 3 floats or None
        The policy's rates (:class:`dynattn.policy.Rates`) for ``tau="auto"``.
    workload : {"random", "adversarial"}
        Which content and action weights the sequence uses.
    causal : bool
        Causal mask by positions.
    use_key_mask : bool
        Whether a random ``key_mask`` is given at construction.
    scale_name : {"unit", "inverse_sqrt_d"}
        Softmax scale 1 or ``1/sqrt(d)``.
    batch_shape : tuple of int
        Leading axes of Q, K, V.
    n, m, d, e : int
        Initial query rows, key rows, key width, value width.
    schedule : {"amortized", "spread"}
        When folds are done.
    awake : bool
        ``tau="auto"`` only: woken by ``fold()`` right after construction (it starts
        dormant, and with some of the rates above would never wake by itself).
    """

    dtype: np.dtype
    storage: str
    tau: float | str
    rates: tuple[float, float, float] | None
    workload: str
    causal: bool
    use_key_mask: bool
    scale_name: str
    batch_shape: tuple[int, ...]
    n: int
    m: int
    d: int
    e: int
    schedule: str = "amortized"
    awake: bool = False

    @property
    def scale(self) -> float:
        """The softmax scale."""
        return 1.0 if self.scale_name == "unit" else 1.0 / np.sqrt(self.d)

    @property
    def heads(self) -> int:
        """Number of independent problems (product of the leading axes)."""
        return int(np.prod(self.batch_shape, dtype=np.int64))

    @property
    def adversarial(self) -> bool:
        """Whether the workload draws adversarial content."""
        return self.workload == "adversarial"


def draw_config(
    rng: np.random.Generator,
    *,
    dtype: Any,
    storage: str,
    tau: float | str,
    workload: str,
    schedule: str = "amortized",
) -> FuzzConfig:
    """Draw the configuration axes that are not given (mask, causality, scale, heads, sizes,
    and the policy's rates for tau="auto")."""
    config = FuzzConfig(
        schedule=schedule,
        dtype=np.dtype(dtype),
        storage=storage,
        tau=tau,
        rates=None,
        workload=workload,
        causal=bool(rng.random() < 0.5),
        use_key_mask=bool(rng.random() < 0.4),
        scale_name=str(rng.choice(["unit", "inverse_sqrt_d"])),
        batch_shape=BATCH_SHAPES[int(rng.integers(len(BATCH_SHAPES)))],
        n=int(rng.integers(1, MAX_START_ROWS + 1)),
        m=int(rng.integers(1, MAX_START_ROWS + 1)),
        d=int(rng.integers(1, MAX_WIDTH + 1)),
        e=int(rng.integers(1, MAX_WIDTH + 1)),
    )
    if tau == "auto":  # drawn last: the other configurations keep their seeds' streams
        rates = POLICY_RATES[int(rng.integers(len(POLICY_RATES)))]
        config = dataclasses.replace(config, rates=rates, awake=bool(rng.random() < AWAKE_PROBABILITY))
    return config


# ---------------------------------------------------------------------------------------------- mirror
class Mirror:
    """The independent truth: inputs in the storage dtype, key visibility and positions.

    Arrays are kept per flattened head, ``Q: (H, n, d)``, ``K: (H, m, d)``,
    ``V: (H, m, e)``, rounded to the storage dtype exactly as the structure
    rounds its inputs; entry updates add in the storage dtype, as the structure does.

    Parameters
    ----------
    config : FuzzConfig
        Dtype, scale, causality and leading axes.
    Q, K, V : ndarray
        Initial inputs with leading axes ``config.batch_shape``.
    key_mask : (m,) bool ndarray or None
        Construction key mask.
    """

    def __init__(self, config: FuzzConfig, Q: np.ndarray, K: np.ndarray, V: np.ndarray, key_mask: Any):
        self.config = config
        self.dtype = config.dtype
        heads = config.heads
        self.Q = np.array(Q, dtype=self.dtype).reshape(heads, *Q.shape[-2:])
        self.K = np.array(K, dtype=self.dtype).reshape(heads, *K.shape[-2:])
        self.V = np.array(V, dtype=self.dtype).reshape(heads, *V.shape[-2:])
        n, m = self.n, self.m
        self.visible = np.ones(m, dtype=bool) if key_mask is None else np.array(key_mask, dtype=bool)
        self.free = np.zeros(m, dtype=bool)  # deleted keys: the next key append reuses the lowest
        self.query_position = np.arange(n)
        self.key_position = np.arange(m)
        self.next_position = max(n, m)

    @property
    def n(self) -> int:
        """Query rows."""
        return self.Q.shape[1]

    @property
    def m(self) -> int:
        """Key rows."""
        return self.K.shape[1]

    def add(self, array: np.ndarray, h: int, c: int, j: int, delta: float) -> None:
        """``array[h, c, j] += delta`` in the storage dtype (the structure's rounding)."""
        array[h, c, j] = self.dtype.type(array[h, c, j]) + self.dtype.type(delta)

    def key_index_of_append(self) -> int:
        """The index the next appended key takes: the lowest deleted one, else a new one."""
        free = np.flatnonzero(self.free)
        return int(free[0]) if free.size else self.m

    def append(self, q: np.ndarray | None, k: np.ndarray | None, v: np.ndarray | None) -> None:
        """A new token at the next position: query row ``q`` and/or key-value pair ``k, v`` ``(H, width)``."""
        position = self.next_position
        self.next_position += 1
        if k is not None and self.free.any():
            c = self.key_index_of_append()
            self.K[:, c], self.V[:, c] = k.astype(self.dtype), v.astype(self.dtype)
            self.visible[c], self.free[c], self.key_position[c] = True, False, position
        elif k is not None:
            self.free = np.append(self.free, False)
            self.K = np.concatenate([self.K, k[:, None].astype(self.dtype)], axis=1)
            self.V = np.concatenate([self.V, v[:, None].astype(self.dtype)], axis=1)
            self.visible = np.append(self.visible, True)
            self.key_position = np.append(self.key_position, position)
        if q is not None:
            self.Q = np.concatenate([self.Q, q[:, None].astype(self.dtype)], axis=1)
            self.query_position = np.append(self.query_position, position)

    def delete_query(self, i: int) -> None:
        """Remove query row ``i`` (later rows move up)."""
        self.Q = np.delete(self.Q, i, axis=1)
        self.query_position = np.delete(self.query_position, i)

    def mask(self) -> np.ndarray:
        """``(n, m)`` bool: which keys each query row sees."""
        mask = np.broadcast_to(self.visible, (self.n, self.m))
        if self.config.causal:
            mask = mask & (self.key_position[None, :] <= self.query_position[:, None])
        return mask


# ---------------------------------------------------------------------------------------------- fuzzer
@dataclasses.dataclass
class DominantKey:
    """A key row that ``Fuzzer.move_dominant_key`` moves along ``level * direction``.

    Attributes
    ----------
    direction : (H, d) ndarray
        Per head, the row that gives one chosen query row a logit of exactly 1.
    before : (H, d) ndarray
        The key row before it was first made dominant.
    level : float or None
        Current logit of the chosen query rows; None while the key is moved away.
    away_level : float
        The level it had when it was last moved away.
    """

    direction: np.ndarray
    before: np.ndarray
    level: float | None = None
    away_level: float = 0.0

    def row(self) -> np.ndarray:
        """The key rows ``(H, d)`` at the current level."""
        return self.direction * self.level


class FuzzFailure(AssertionError):
    """A mismatch between the structure and the mirror, with the configuration and the call log."""


def _literal(value: Any) -> str:
    """Python source for ``value`` that rebuilds it exactly (floats by repr, arrays and tensors by tolist)."""
    if hasattr(value, "detach"):
        value = as_numpy(value)
    if isinstance(value, np.ndarray):
        return f"np.array({value.tolist()!r})"
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return repr(value.item())
    return repr(value)


def _where(failure: BaseException) -> str:
    """``file:line: source: `` of the assertion that failed, when it is not one of this file's."""
    frame = traceback.extract_tb(failure.__traceback__)[-1]
    if Path(frame.filename).resolve() == Path(__file__).resolve():
        return ""
    return f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}: "


class Fuzzer:
    """Drives one structure and its mirror through random operations and checks every answer.

    Parameters
    ----------
    config : FuzzConfig
        The structure to build.
    seed : int or sequence of int
        Seed of the generator that draws the initial content.
    folder : pathlib.Path
        Where save/load round trips and the reproducer script are written.
    backend : str
        The default backend in use (``"numpy"`` or ``"torch"``); under torch
        some row arguments are passed as tensors.
    """

    def __init__(self, config: FuzzConfig, seed: Any, folder: Path, backend: str):
        self.config = config
        self.folder = folder
        self.backend = backend
        self.step = 0
        self.calls: list[str] = []
        #: large entry steps of K still applied, ``(h, c, j, delta)``, to be undone later
        self.entry_moves: list[tuple[int, int, int, float]] = []
        #: keys moved by ``move_dominant_key``, by key row
        self.dominant_keys: dict[int, DominantKey] = {}
        rng = np.random.default_rng(seed)
        batch, n, m, d, e = config.batch_shape, config.n, config.m, config.d, config.e
        Q = rng.standard_normal((*batch, n, d))
        K = rng.standard_normal((*batch, m, d)) * rng.choice([0.5, 1.0, 2.0])
        V = rng.standard_normal((*batch, m, e))
        if config.adversarial:
            V *= self.magnitudes(rng, (*batch, m, 1))
        key_mask = rng.random(m) < 0.7 if config.use_key_mask else None
        self.mirror = Mirror(config, Q, K, V, key_mask)
        arguments = {
            "tau": config.tau,
            "schedule": config.schedule,
            "scale": config.scale,
            "dtype": config.dtype.type,
            "storage": config.storage,
            "causal": config.causal,
            "key_mask": key_mask,
        }
        if config.rates is not None:
            self.record(f"policy.set_rates(policy.Rates(*{config.rates!r}))")
            policy.set_rates(policy.Rates(*config.rates))
        self.record(
            f"att = DynamicAttention({_literal(Q)}, {_literal(K)}, {_literal(V)}, "
            + ", ".join(f"{name}={_literal(value)}" for name, value in arguments.items() if name != "dtype")
            + f", dtype=np.{config.dtype.name})"
        )
        self.att = DynamicAttention(Q, K, V, **arguments)
        if config.awake:
            self.record("att.fold()  # wakes it")
            self.att.fold()

    # ------------------------------------------------------------------ content
    @property
    def heads(self) -> int:
        """Number of flattened heads."""
        return self.config.heads

    def magnitudes(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Factors ``10**u`` with ``u`` uniform in +-VALUE_DECADES (adversarial value ranges)."""
        decades = VALUE_DECADES[self.config.dtype]
        return 10.0 ** rng.uniform(-decades, decades, size=shape)

    def logit_jump(self, rng: np.random.Generator) -> float:
        """A signed adversarial logit jump."""
        low, high = LOGIT_JUMP[self.config.dtype]
        return float(rng.uniform(low, high) * rng.choice([-1.0, 1.0]))

    def key_entry_step(self, rng: np.random.Generator, h: int, j: int) -> float:
        """A delta for ``K[h, :, j]``: small, or (adversarial) one that moves some logit by 15-60 or more."""
        if self.config.adversarial and rng.random() < 0.6:
            q_max = float(np.abs(self.mirror.Q[h, :, j].astype(np.float64)).max())
            if q_max > 0:
                return self.logit_jump(rng) / (abs(self.config.scale) * q_max)
        return float(rng.normal(0.0, 0.7))

    def value_entry_step(self, rng: np.random.Generator, h: int, c: int, j: int) -> float:
        """A delta for ``V[h, c, j]``: small, one that zeroes the entry, or one of any magnitude."""
        draw = rng.random()
        if draw < 0.15:
            return -float(self.mirror.V[h, c, j])
        scale = float(self.magnitudes(rng, ())) if self.config.adversarial else 1.0
        return float(rng.normal(0.0, scale))

    def key_rows(self, rng: np.random.Generator, c: int | None) -> np.ndarray:
        """New key rows ``(H, d)`` for key ``c`` (None: a new key): random, or (adversarial)
        the current row moved so that some query's logit jumps by 15-60 or more."""
        H, d = self.heads, self.config.d
        rows = rng.standard_normal((H, d)) * rng.choice([0.3, 1.0, 2.0])
        if not self.config.adversarial or rng.random() < 0.4:
            return rows
        base = rows if c is None else self.mirror.K[:, c].astype(np.float64)
        for h in range(H):
            i = int(rng.integers(self.mirror.n))
            q = self.mirror.Q[h, i].astype(np.float64)
            q_sq = float(q @ q)
            if q_sq > 0:
                rows[h] = base[h] + q * (self.logit_jump(rng) / (abs(self.config.scale) * q_sq))
        return rows

    def value_rows(self, rng: np.random.Generator) -> np.ndarray:
        """New value rows ``(H, e)``: random, zero, or (adversarial) spanning many magnitudes."""
        H, e = self.heads, self.config.e
        if rng.random() < 0.1:
            return np.zeros((H, e))
        rows = rng.standard_normal((H, e))
        if self.config.adversarial:
            rows *= self.magnitudes(rng, (H, e))
        return rows

    def query_rows(self, rng: np.random.Generator) -> np.ndarray:
        """New query rows ``(H, d)`` (sometimes zero: every logit of the row is 0)."""
        if rng.random() < 0.05:
            return np.zeros((self.heads, self.config.d))
        return rng.standard_normal((self.heads, self.config.d)) * rng.choice([0.5, 1.0, 2.0])

    # ------------------------------------------------------------------ arguments
    def head_argument(self, rng: np.random.Generator, h: int) -> Any:
        """``head=`` for flattened head ``h``: None without leading axes, an int or a tuple."""
        shape = self.config.batch_shape
        if not shape:
            return None
        if len(shape) > 1 and rng.random() < 0.5:
            return tuple(int(x) for x in np.unravel_index(h, shape))
        return h

    def heads_argument(self, heads: np.ndarray) -> np.ndarray | None:
        """``heads=`` for a batch call: None without leading axes."""
        return None if not self.config.batch_shape else heads

    def row_argument(self, rng: np.random.Generator, rows: np.ndarray) -> Any:
        """A per-head row ``(*batch, width)`` for the structure, sometimes as a torch tensor."""
        value = rows.reshape(*self.config.batch_shape, rows.shape[-1])
        as_tensor = rng.random() < 0.5  # drawn on every backend, so both run the same sequence
        if self.backend == "torch" and as_tensor:
            import torch

            return torch.from_numpy(np.ascontiguousarray(value))
        return value

    def record(self, call: str) -> None:
        """Append a call (Python source) to the log."""
        self.calls.append(call)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``att.method(*args, **kwargs)`` and log it (tensors are logged as numpy arrays)."""
        shown = [_literal(a) for a in args] + [f"{k}={_literal(v)}" for k, v in kwargs.items()]
        self.record(f"att.{method}({', '.join(shown)})")
        return getattr(self.att, method)(*args, **kwargs)

    # ------------------------------------------------------------------ actions
    def update_k(self, rng: np.random.Generator) -> None:
        """One entry of K (a large step may be undone by a later one)."""
        mirror = self.mirror
        if self.config.adversarial and self.entry_moves and rng.random() < 0.4:
            h, c, j, delta = self.entry_moves.pop(int(rng.integers(len(self.entry_moves))))
            delta = -delta * (1.0 if rng.random() < 0.5 else float(rng.uniform(1.0, 4.0)))  # back, or beyond
        else:
            h, c, j = (
                int(rng.integers(self.heads)),
                int(rng.integers(mirror.m)),
                int(rng.integers(mirror.K.shape[2])),
            )
            delta = self.key_entry_step(rng, h, j)
            if abs(delta) > 1:
                self.entry_moves.append((h, c, j, delta))
        self.call("update_k", c, j, delta, head=self.head_argument(rng, h))
        mirror.add(mirror.K, h, c, j, delta)

    def update_v(self, rng: np.random.Generator) -> None:
        """One entry of V."""
        mirror = self.mirror
        h, c, j = int(rng.integers(self.heads)), int(rng.integers(mirror.m)), int(rng.integers(self.config.e))
        delta = self.value_entry_step(rng, h, c, j)
        self.call("update_v", c, j, delta, head=self.head_argument(rng, h))
        mirror.add(mirror.V, h, c, j, delta)

    def update_many(self, rng: np.random.Generator, target: str) -> None:
        """A batch of 1-6 entry updates of K or V (repeated entries allowed), applied in order."""
        mirror = self.mirror
        array, width = (mirror.K, self.config.d) if target == "K" else (mirror.V, self.config.e)
        size = int(rng.integers(1, 7))
        heads = rng.integers(self.heads, size=size)
        rows = rng.integers(mirror.m, size=size)
        cols = rng.integers(width, size=size)
        deltas = np.empty(size)
        for b in range(size):
            h, c, j = int(heads[b]), int(rows[b]), int(cols[b])
            if target == "K":
                deltas[b] = self.key_entry_step(rng, h, j)
            else:
                deltas[b] = self.value_entry_step(rng, h, c, j)
            mirror.add(array, h, c, j, deltas[b])
        method = "update_k_many" if target == "K" else "update_v_many"
        self.call(method, rows, cols, deltas, heads=self.heads_argument(heads))

    def set_key(self, rng: np.random.Generator) -> None:
        """A whole key row in every head."""
        c = int(rng.integers(self.mirror.m))
        rows = self.key_rows(rng, c)
        self.call("set_key", c, self.row_argument(rng, rows))
        self.mirror.K[:, c] = rows.astype(self.config.dtype)
        self.dominant_keys.pop(c, None)

    def set_value(self, rng: np.random.Generator) -> None:
        """A whole value row in every head."""
        c = int(rng.integers(self.mirror.m))
        rows = self.value_rows(rng)
        self.call("set_value", c, self.row_argument(rng, rows))
        self.mirror.V[:, c] = rows.astype(self.config.dtype)

    def set_query(self, rng: np.random.Generator) -> None:
        """A whole query row in every head."""
        i = int(rng.integers(self.mirror.n))
        rows = self.query_rows(rng)
        self.call("set_query", i, self.row_argument(rng, rows))
        self.mirror.Q[:, i] = rows.astype(self.config.dtype)

    def set_token(self, rng: np.random.Generator) -> None:
        """Any non-empty subset of token i's query, key and value rows."""
        mirror = self.mirror
        parts = [p for p in ("q", "k", "v") if rng.random() < 0.6] or [str(rng.choice(["q", "k", "v"]))]
        limit = min(mirror.n if "q" in parts else MAX_ROWS, mirror.m if {"k", "v"} & set(parts) else MAX_ROWS)
        i = int(rng.integers(limit))
        rows = {
            "q": self.query_rows(rng) if "q" in parts else None,
            "k": self.key_rows(rng, i) if "k" in parts else None,
            "v": self.value_rows(rng) if "v" in parts else None,
        }
        given_rows = {p: self.row_argument(rng, r) for p, r in rows.items() if r is not None}
        self.call("set_token", i, **given_rows)
        if rows["q"] is not None:
            mirror.Q[:, i] = rows["q"].astype(self.config.dtype)
        if rows["k"] is not None:
            mirror.K[:, i] = rows["k"].astype(self.config.dtype)
            self.dominant_keys.pop(i, None)
        if rows["v"] is not None:
            mirror.V[:, i] = rows["v"].astype(self.config.dtype)

    def append(self, rng: np.random.Generator) -> None:
        """A new query row, key-value pair, or whole token (always whole tokens when causal)."""
        mirror = self.mirror
        kinds = []
        if mirror.n < MAX_ROWS and mirror.m < MAX_ROWS:
            kinds.append("token")
        if not self.config.causal:
            kinds += ["query"] * (mirror.n < MAX_ROWS) + ["key"] * (mirror.m < MAX_ROWS)
        kind = str(rng.choice(kinds))
        q = self.query_rows(rng) if kind in ("token", "query") else None
        k = self.key_rows(rng, None) if kind in ("token", "key") else None
        v = self.value_rows(rng) if k is not None else None
        given_rows = {
            p: self.row_argument(rng, r) for p, r in (("q", q), ("k", k), ("v", v)) if r is not None
        }
        expected = (
            mirror.n if q is not None else None,
            mirror.key_index_of_append() if k is not None else None,
        )
        indices = self.call("append", **given_rows)
        assert tuple(indices) == expected, (indices, expected)
        if expected[1] is not None:
            self.dominant_keys.pop(expected[1], None)  # a reused index holds a new key
        mirror.append(q, k, v)

    def can_append(self) -> bool:
        """Whether some append keeps n and m within MAX_ROWS."""
        n, m = self.mirror.n, self.mirror.m
        if self.config.causal:
            return n < MAX_ROWS and m < MAX_ROWS
        return n < MAX_ROWS or m < MAX_ROWS

    def delete_key(self, rng: np.random.Generator) -> None:
        """Delete a key (possibly one already hidden): hidden, its index free for an append."""
        c = int(rng.integers(self.mirror.m))
        self.call("delete_key", c)
        self.mirror.visible[c], self.mirror.free[c] = False, True

    def set_key_mask(self, rng: np.random.Generator) -> None:
        """Show a hidden key again (mostly), or set a random key's visibility."""
        hidden = np.flatnonzero(~self.mirror.visible)
        if hidden.size and rng.random() < 0.7:
            c, visible = int(rng.choice(hidden)), True
        else:
            c, visible = int(rng.integers(self.mirror.m)), bool(rng.random() < 0.5)
        self.set_visibility(rng, c, visible)

    def delete_query(self, rng: np.random.Generator) -> None:
        """Remove a query row (needs n > 1)."""
        i = int(rng.integers(self.mirror.n))
        self.call("delete_query", i)
        self.mirror.delete_query(i)

    def rebuild(self, rng: np.random.Generator) -> None:
        """Fold the pending rows now."""
        self.call("rebuild")

    def save_and_load(self, rng: np.random.Generator) -> None:
        """Save, load, check that both answer identically, and continue with the loaded one."""
        path = self.folder / "state.npz"
        self.call("save", str(path))
        self.record(f"att = DynamicAttention.load({str(path)!r})")
        loaded = DynamicAttention.load(path)
        loaded._check(deep=True)
        assert loaded.pending == self.att.pending and loaded.stats == self.att.stats
        original = as_numpy(self.att.output())
        again = as_numpy(loaded.output())
        assert np.array_equal(original, again), "a loaded structure answers differently"
        self.att = loaded

    def move_dominant_key(self, rng: np.random.Generator) -> None:
        """One move of a dominant key: make one, raise it, move it away, hide or show it, bring it back.

        A dominant key lies on the line ``level * direction`` (per head,
        ``direction`` gives one query row a logit of exactly ``level``): it is
        made at a level of 15-60, raised by another 15-60 (which moves the row's
        stabilizer), moved away (to its old row, or to a negative level), hidden
        by the key mask and shown again, and moved back. A move is a whole new
        row (``set_key``) or entry updates of every head and column (``update_k_many``).
        """
        mirror = self.mirror
        known = [c for c in self.dominant_keys if c < mirror.m]
        if not known or rng.random() < 0.2:
            self.make_dominant_key(rng)
            return
        c = int(rng.choice(known))
        key = self.dominant_keys[c]
        if not mirror.visible[c]:
            self.set_visibility(rng, c, True)
        elif key.level is not None:  # dominant now
            draw = rng.random()
            if draw < 0.35:
                self.raise_key(rng, c)
            elif draw < 0.8:
                self.move_key_away(rng, c)
            else:
                self.set_visibility(rng, c, False)
        else:
            self.move_key_back(rng, c)

    def dominant_excursion(self, rng: np.random.Generator) -> None:
        """A dominant key, folded, raised by 15-60 logits, moved away (or hidden), folded; no query between.

        The stabilizer moves while the weights it rescales are about to cancel in
        a fold: whatever the rescaling rounds must stay within the certificate.
        """
        mirror = self.mirror
        ready = [c for c, key in self.dominant_keys.items() if key.level is not None and mirror.visible[c]]
        if not ready or rng.random() < 0.3:
            ready = [self.make_dominant_key(rng)]
            self.att._check(deep=True)
        c = int(rng.choice(ready))
        if rng.random() < 0.7:
            self.rebuild(rng)
            self.att._check(deep=True)
        self.raise_key(rng, c)
        self.att._check(deep=True)
        if rng.random() < 0.25:
            self.set_visibility(rng, c, False)
        else:
            self.move_key_away(rng, c)
        if rng.random() < 0.7:
            self.att._check(deep=True)
            self.rebuild(rng)

    def make_dominant_key(self, rng: np.random.Generator) -> int:
        """Make a random key dominant (level 15-60) for one random query row per head; return it."""
        mirror = self.mirror
        c = int(rng.integers(mirror.m))
        direction = np.empty((self.heads, self.config.d))
        for h in range(self.heads):
            q = mirror.Q[h, int(rng.integers(mirror.n))].astype(np.float64)
            q_sq = float(q @ q)
            direction[h] = (
                q / (abs(self.config.scale) * q_sq) if q_sq > 0 else rng.standard_normal(self.config.d)
            )
        key = DominantKey(direction, mirror.K[:, c].astype(np.float64), level=abs(self.logit_jump(rng)))
        self.dominant_keys[c] = key
        self.move_key(rng, c, key.row())
        return c

    def raise_key(self, rng: np.random.Generator, c: int) -> None:
        """Raise dominant key ``c`` by another 15-60 logits."""
        key = self.dominant_keys[c]
        key.level = (key.level if key.level is not None else key.away_level) + abs(self.logit_jump(rng))
        self.move_key(rng, c, key.row())

    def move_key_away(self, rng: np.random.Generator, c: int) -> None:
        """Move dominant key ``c`` far away: to its old row, or to a negative level."""
        key = self.dominant_keys[c]
        key.away_level = key.level if key.level is not None else key.away_level
        key.level = None
        away = key.before if rng.random() < 0.5 else key.direction * -abs(self.logit_jump(rng))
        self.move_key(rng, c, away)

    def move_key_back(self, rng: np.random.Generator, c: int) -> None:
        """Move dominant key ``c`` back to the level it had (or higher)."""
        key = self.dominant_keys[c]
        key.level = key.away_level
        if rng.random() < 0.4:
            key.level += abs(self.logit_jump(rng))
        self.move_key(rng, c, key.row())

    def set_visibility(self, rng: np.random.Generator, c: int, visible: bool) -> None:
        """``set_key_mask(c, visible)`` on the structure and the mirror."""
        self.call("set_key_mask", c, visible)
        self.mirror.visible[c] = visible
        if visible:
            self.mirror.free[c] = False  # showing a deleted key keeps it

    def move_key(self, rng: np.random.Generator, c: int, target: np.ndarray) -> None:
        """Move key row ``c`` of every head to ``target: (H, d)``, by ``set_key`` or entry updates."""
        mirror = self.mirror
        if rng.random() < 0.5:
            self.call("set_key", c, self.row_argument(rng, target))
            mirror.K[:, c] = target.astype(self.config.dtype)
            return
        heads, cols = np.divmod(np.arange(self.heads * self.config.d), self.config.d)
        deltas = (target - mirror.K[:, c].astype(np.float64)).ravel()
        rows = np.full(heads.size, c)
        self.call("update_k_many", rows, cols, deltas, heads=self.heads_argument(heads))
        for h, j, delta in zip(heads.tolist(), cols.tolist(), deltas.tolist(), strict=True):
            mirror.add(mirror.K, h, c, j, delta)

    # ------------------------------------------------------------------ driving
    def actions(
        self, *, burst: bool = False
    ) -> dict[str, tuple[Callable[[np.random.Generator], None], float]]:
        """Every action available now with its weight (workload dependent).

        Inside a burst there are no queries: no save/load round trip (it compares
        answers), and ``rebuild`` is more likely, so that folds follow mutations.
        """
        adversarial = self.config.adversarial
        table: dict[str, tuple[Callable[[np.random.Generator], None], float]] = {
            "update_k": (self.update_k, 6.0 if adversarial else 5.0),
            "update_v": (self.update_v, 3.0),
            "update_k_many": (lambda rng: self.update_many(rng, "K"), 2.0),
            "update_v_many": (lambda rng: self.update_many(rng, "V"), 1.5),
            "set_key": (self.set_key, 3.0),
            "set_value": (self.set_value, 2.0),
            "set_query": (self.set_query, 1.5),
            "set_token": (self.set_token, 1.5),
            "delete_key": (self.delete_key, 1.0),
            "set_key_mask": (self.set_key_mask, 1.5),
            "rebuild": (self.rebuild, 4.0 if burst else 1.0),
        }
        if not burst:
            table["save_and_load"] = (self.save_and_load, 0.5)
        if adversarial:
            table["move_dominant_key"] = (self.move_dominant_key, 4.0)
            table["dominant_excursion"] = (self.dominant_excursion, 2.0)
        if self.can_append():
            table["append"] = (self.append, 1.5)
        if self.mirror.n > 1:
            table["delete_query"] = (self.delete_query, 1.0)
        return table

    def random_step(self, rng: np.random.Generator) -> None:
        """One step: an action drawn by weight or, with probability ``BURST_PROBABILITY``, a burst
        of 2-4 mutations with no query between them; then every answer is checked.

        Bursts matter: a query that finds a row doubtful recomputes it exactly,
        so an error that a later fold would bury in the snapshot is only reachable
        when the mutations before that fold are not interrupted by queries.
        """
        burst = rng.random() < BURST_PROBABILITY[self.config.workload]
        self.step += 1
        with self.reporting(f"burst {self.step}" if burst else f"step {self.step}"):
            for _ in range(int(rng.integers(2, 5)) if burst else 1):
                table = self.actions(burst=burst)
                names = list(table)
                weights = np.array([table[name][1] for name in names])
                name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
                self.mutate(name, rng, burst=burst)
            self.verify(rng)

    def mutate(self, name: str, rng: np.random.Generator, *, burst: bool = False) -> None:
        """Apply action ``name`` (nothing when it is not available now), then assert the invariants."""
        table = self.actions(burst=burst)
        if name in table:
            self.record(f"# {name}")
            table[name][0](rng)
            self.att._check(deep=True)

    @contextlib.contextmanager
    def reporting(self, label: str) -> Iterator[None]:
        """Turn an AssertionError inside into a FuzzFailure naming ``label`` and the call log."""
        try:
            yield
        except AssertionError as failure:
            raise self.failure(f"{label}: {_where(failure)}{failure}") from failure

    def failure(self, message: str) -> FuzzFailure:
        """A FuzzFailure naming the configuration, the step and the last calls; writes the reproducer."""
        script = self.folder / "reproducer.py"
        header = ["import numpy as np", "from dynattn import DynamicAttention, policy"]
        if self.backend != "numpy":
            header += ["from dynattn.backends import use_backend", f"use_backend({self.backend!r})"]
        script.write_text("\n".join([*header, "", *self.calls, ""]))
        tail = "\n    ".join(
            call if len(call) < 300 else call[:300] + " ..." for call in self.calls[-LOG_TAIL:]
        )
        return FuzzFailure(
            f"{self.config} (backend {self.backend}), {message}\n"
            f"  last calls:\n    {tail}\n  full sequence: {script}"
        )

    # ------------------------------------------------------------------ checking
    def answers(self, rng: np.random.Generator) -> np.ndarray:
        """Every answer ``(H, n, e)`` (float64), read through a randomly chosen query method."""
        H, n, e = self.heads, self.mirror.n, self.config.e
        method = str(rng.choice(["output", "query_rows", "query_row", "query", "query_many", "mixed"]))
        out = np.full((H, n, e), np.nan)
        if method == "output":
            out[...] = self.checked_dtype(self.call("output")).reshape(H, n, e)
        elif method == "query_rows":
            rows = rng.permutation(n)
            out[:, rows] = self.checked_dtype(self.call("query_rows", rows)).reshape(H, n, e)
        elif method == "query_row":
            for i in rng.permutation(n).tolist():
                out[:, i] = self.checked_dtype(self.call("query_row", i)).reshape(H, e)
        elif method == "query":
            entries = [np.unravel_index(flat, (H, n, e)) for flat in rng.permutation(H * n * e).tolist()]
            self.entry_queries(rng, out, [(int(h), int(i), int(j)) for h, i, j in entries])
        elif method == "query_many":
            heads, rows, cols = np.unravel_index(rng.permutation(H * n * e), (H, n, e))
            answer = self.call("query_many", rows, cols, heads=self.heads_argument(heads))
            out[heads, rows, cols] = self.checked_dtype(answer)
        else:
            for i in rng.permutation(n).tolist():
                how = rng.integers(3)
                if how == 0:
                    out[:, i] = self.checked_dtype(self.call("query_row", i)).reshape(H, e)
                elif how == 1:
                    self.entry_queries(rng, out, [(h, i, j) for h in range(H) for j in range(e)])
                else:
                    heads, cols = np.divmod(np.arange(H * e), e)
                    rows = np.full(H * e, i)
                    answer = self.call("query_many", rows, cols, heads=self.heads_argument(heads))
                    out[heads, rows, cols] = self.checked_dtype(answer)
        return out

    def entry_queries(
        self, rng: np.random.Generator, out: np.ndarray, entries: list[tuple[int, int, int]]
    ) -> None:
        """``out[h, i, j] = att.query(i, j, head=...)`` for each ``(h, i, j)`` in ``entries``, in order."""
        calls = [(i, j, self.head_argument(rng, h)) for h, i, j in entries]
        self.record(f"for i, j, head in {calls!r}: att.query(i, j, head=head)")
        for (h, i, j), (_, _, head) in zip(entries, calls, strict=True):
            out[h, i, j] = self.att.query(i, j, head=head)

    def error_bounds(self, rng: np.random.Generator) -> np.ndarray:
        """``att.error_bound(i, head=h)`` for every row and head, ``(H, n)`` (one log line)."""
        calls = [(i, self.head_argument(rng, h)) for h in range(self.heads) for i in range(self.mirror.n)]
        self.record(f"bounds = [att.error_bound(i, head=head) for i, head in {calls!r}]")
        bounds = [self.att.error_bound(i, head=head) for i, head in calls]
        return np.array(bounds).reshape(self.heads, self.mirror.n)

    def checked_dtype(self, answer: Any) -> np.ndarray:
        """``answer`` as float64 numpy, after checking it came back in the storage dtype."""
        array = as_numpy(answer)
        assert array.dtype == self.config.dtype, f"answer dtype {array.dtype}, expected {self.config.dtype}"
        return array.astype(np.float64)

    def check_views(self) -> None:
        """The structure's sizes, read-only views and key mask equal the mirror's (a cross-check)."""
        att, mirror, H = self.att, self.mirror, self.heads
        assert (att.n, att.m) == (mirror.n, mirror.m), ((att.n, att.m), (mirror.n, mirror.m))
        for name in ("Q", "K", "V"):
            view = as_numpy(getattr(att, name))
            expected = getattr(mirror, name)
            assert view.dtype == expected.dtype, f"{name}: dtype {view.dtype}"
            assert np.array_equal(view.reshape(H, *expected.shape[1:]), expected), f"att.{name} != mirror"
        assert np.array_equal(att.key_mask, mirror.visible), "key mask != mirror"

    def verify(self, rng: np.random.Generator) -> None:
        """Check the views, then every answer against the reference: accuracy and certificate.

        Rows that see no key must answer exactly 0; so must columns whose values
        are all 0 (the certificate allows ``error_bound * 0``).
        """
        self.check_views()
        mirror, config, att = self.mirror, self.config, self.att
        mask = mirror.mask()
        bounds = self.error_bounds(rng)
        answers = self.answers(rng)
        att._check(deep=True)  # a query may have recomputed rows
        blind = ~mask.any(axis=1)
        assert np.all(answers[:, blind] == 0), f"rows {np.flatnonzero(blind)} see no key but answer non-zero"
        for h in range(self.heads):
            q, k, v = mirror.Q[h], mirror.K[h], mirror.V[h]
            reference = reference_attention(q, k, v, scale=config.scale, mask=mask, precise=True)
            allowance = allowed_error(
                q, k, v, scale=config.scale, dtype=config.dtype, reference=reference, mask=mask
            )
            value_max = np.abs(v.astype(np.float64)).max(axis=0)
            certified = bounds[h][:, None] * value_max[None, :] * CERTIFICATE_SLACK + CERTIFICATE_FLOOR
            error = np.abs(answers[h] - reference)
            for name, limit in (("accuracy", allowance), ("certificate", certified)):
                bad = ~(error <= limit)
                if bad.any():
                    i, j = (int(x) for x in np.argwhere(bad)[0])
                    raise AssertionError(
                        f"{name} violated at head {h}, row {i}, column {j}: answer {answers[h, i, j]!r}, "
                        f"reference {reference[i, j]!r}, error {error[i, j]:.3e} > {name} limit "
                        f"{limit[i, j]:.3e} (error_bound {bounds[h, i]:.3e}, max|V[:, j]| "
                        f"{value_max[j]:.3e}, {int(mask[i].sum())} visible keys); "
                        f"stats {att.stats}"
                    )


def run_sequence(config: FuzzConfig, seed: Any, steps: int, folder: Path, backend: str) -> Fuzzer:
    """Build a structure for ``config`` and apply ``steps`` random actions, checking after each."""
    fuzzer = Fuzzer(config, seed, folder, backend)
    rng = np.random.default_rng(seed)
    with fuzzer.reporting("construction"):
        fuzzer.att._check(deep=True)
        fuzzer.verify(rng)
    for _ in range(steps):
        fuzzer.random_step(rng)
    return fuzzer


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_random_operation_sequences(dtype, storage, tau, workload, sequence, tmp_path, backend, request):
    """Seeded random sequences of every operation: each answer accurate and within its certificate."""
    steps = QUICK_STEPS * fuzz_factor(request.config)
    fuzzer = run_seeded(dtype, storage, tau, workload, sequence, steps, tmp_path, backend)
    assert fuzzer.step > 0


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("tau", SPREAD_TAUS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_random_sequences_with_spread_folds(
    dtype, storage, tau, workload, sequence, tmp_path, backend, request
):
    """The same, with folds spread over the updates that follow them (so most operations,
    saves and loads included, meet a fold in progress)."""
    steps = QUICK_STEPS * fuzz_factor(request.config)
    fuzzer = run_seeded(dtype, storage, tau, workload, sequence, steps, tmp_path, backend, "spread")
    assert fuzzer.step > 0


def run_seeded(
    dtype: Any,
    storage: str,
    tau: float | str,
    workload: str,
    sequence: int,
    steps: int,
    folder: Path,
    backend: str,
    schedule: str = "amortized",
) -> Fuzzer:
    """The sequence that ``test_random_operation_sequences`` (or, for ``schedule="spread"``,
    ``test_random_sequences_with_spread_folds``) runs for these parameters."""
    seed = [
        DTYPES.index(dtype),
        STORAGES.index(storage),
        TAUS.index(tau),
        WORKLOADS.index(workload),
        sequence,
        *([SCHEDULES.index(schedule)] if schedule != "amortized" else []),
    ]
    config = draw_config(
        np.random.default_rng([*seed, 1]),
        dtype=dtype,
        storage=storage,
        tau=tau,
        workload=workload,
        schedule=schedule,
    )
    return run_sequence(config, seed, steps, folder, backend)


#: Sequences of the long profile (``--fuzz-long``, 96 steps) that once failed, kept in the
#: quick profile. The first two made ``error_bound`` charge a row with its worst column's
#: value ratio only, while entry queries decide per column (so a column answered
#: incrementally, within tol, was reported as if recomputed exactly). The third fails when
#: tau="auto" lets a read fold: the fold changes the certificate of rows whose bound
#: ``error_bound`` had already given.
ONCE_FAILED = [
    (np.float64, "dense", 0.0, "random", 7),
    (np.float64, "dense", 0.5, "random", 13),
    (np.float64, "dense", "auto", "random", 3),
]


@pytest.mark.parametrize(("dtype", "storage", "tau", "workload", "number"), ONCE_FAILED)
def test_sequences_that_once_failed(dtype, storage, tau, workload, number, tmp_path, backend):
    fuzzer = run_seeded(dtype, storage, tau, workload, number, 4 * QUICK_STEPS, tmp_path, backend)
    assert fuzzer.step > 0


ACTION_NAMES = (
    "update_k",
    "update_v",
    "update_k_many",
    "update_v_many",
    "set_key",
    "set_value",
    "set_query",
    "set_token",
    "append",
    "delete_key",
    "set_key_mask",
    "delete_query",
    "rebuild",
    "save_and_load",
    "move_dominant_key",
    "dominant_excursion",
)


def test_hypothesis_operation_sequences(tmp_path_factory, backend, request):
    """Hypothesis draws the configuration and the action sequence (so failures shrink);
    answers are checked after the actions it marks, and at the end."""
    factor = fuzz_factor(request.config)

    @settings(max_examples=QUICK_EXAMPLES * factor)
    @given(
        dtype=st.sampled_from(DTYPES),
        storage=st.sampled_from(STORAGES),
        tau=st.sampled_from(TAUS),
        schedule=st.sampled_from(SCHEDULES),
        workload=st.sampled_from(WORKLOADS),
        config_seed=st.integers(0, 2**32 - 1),
        actions=st.lists(
            st.tuples(st.sampled_from(ACTION_NAMES), st.integers(0, 2**32 - 1), st.booleans()),
            min_size=1,
            max_size=12 * factor,
        ),
    )
    def check(dtype, storage, tau, schedule, workload, config_seed, actions):
        config = draw_config(
            np.random.default_rng(config_seed),
            dtype=dtype,
            storage=storage,
            tau=tau,
            workload=workload,
            schedule="amortized" if tau == "auto" else schedule,
        )
        fuzzer = Fuzzer(config, config_seed, tmp_path_factory.mktemp("fuzz"), backend)
        with fuzzer.reporting("construction"):
            fuzzer.verify(np.random.default_rng(config_seed))
        for number, (name, action_seed, check_answers) in enumerate(actions):
            action_rng = np.random.default_rng(action_seed)
            with fuzzer.reporting(f"action {number}"):
                fuzzer.mutate(name, action_rng)
                if check_answers or number == len(actions) - 1:
                    fuzzer.verify(action_rng)

    check()


def test_action_names_cover_every_action(tmp_path, backend):
    """The hypothesis test can draw every action of every workload (and nothing else)."""
    names = set()
    for workload in WORKLOADS:
        config = FuzzConfig(
            np.dtype(np.float64), "dense", 0.5, None, workload, False, False, "unit", (), 3, 3, 2, 2
        )
        fuzzer = Fuzzer(config, 0, tmp_path, backend)
        names |= set(fuzzer.actions()) | set(fuzzer.actions(burst=True))
    assert names == set(ACTION_NAMES)


@pytest.mark.parametrize(
    ("tau", "schedule"), [(0.5, "amortized"), (1.0, "amortized"), ("auto", "amortized"), (1.0, "spread")]
)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_folds_in_blocks_of_one_slot(dtype, storage, tau, schedule, tmp_path, backend, monkeypatch):
    """Folds split into blocks of slots (here one slot each, the most roundings into N and
    Z): every answer stays within its certificate."""
    monkeypatch.setattr(structure, "FOLD_BLOCK_ENTRIES", 1)
    for number in range(2):
        fuzzer = run_seeded(
            dtype, storage, tau, "adversarial", number, QUICK_STEPS, tmp_path, backend, schedule
        )
        assert fuzzer.step > 0
