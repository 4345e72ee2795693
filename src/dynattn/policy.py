"""The online policy of ``DynamicAttention(tau="auto")``: when to compute a deferred
weight column, when to fold, and when to keep no snapshot at all (``docs/policy.md``).

Both decisions are rent-or-buy problems. A *rent* is paid on every read while
the decision is put off (the logits of a deferred column at the rows read; the
pending rows' share of a query); *buying* ends the rents (computing the whole
column once; folding every pending row into the snapshot). The rule buys
exactly when the rents paid reach the price, which costs at most twice what the
best choice in hindsight costs for that decision (the break-even rule of ski
rental; ``docs/policy.md`` states the model and the proof).

Prices and rents are seconds: flop counts divided by rates that are measured
once per process on this machine (:func:`rates`), plus a per-call overhead, so
the policy needs no constant tuned to one machine. ``DYNATTN_RATES`` (three
numbers: GEMM flop/s, GEMV flop/s, seconds per call) or :func:`set_rates`
fixes them, for reproducible decisions in tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rates:
    """Speeds of this machine as the policy sees them.

    Attributes
    ----------
    gemm : float
        Float64 flops per second of a large matrix product (folds, whole columns).
    gemv : float
        Float64 flops per second of a matrix-vector product over memory (reads of
        deferred columns, the pending rows' share of a query).
    call : float
        Seconds of fixed cost of one array operation (dispatch, small temporaries).
    measured : bool
        Whether they were measured here (then structures also correct their fold and
        column prices by the times their own folds and column computations take; with
        rates fixed by hand every decision is a deterministic function of the operations).
    """

    gemm: float
    gemv: float
    call: float
    measured: bool = False


_rates: Rates | None = None


def _best_seconds(work: object, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_rates() -> Rates:
    """Time a GEMM, a GEMV and a tiny operation (best of five each; about 30 ms)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    matrix, vector = rng.standard_normal((2048, 512)), rng.standard_normal(512)
    small = rng.standard_normal((2, 8))
    a @ b, matrix @ vector  # warm-up
    gemm = 2 * 256**3 / _best_seconds(lambda: a @ b)
    gemv = 2 * matrix.size / _best_seconds(lambda: matrix @ vector)
    # the fixed cost of one step of a read: a small contraction and its indexing
    call = _best_seconds(lambda: [np.einsum("kt,kt->k", small, small)[0] for _ in range(100)]) / 100
    return Rates(gemm=gemm, gemv=gemv, call=call, measured=True)


def rates() -> Rates:
    """This process's rates: ``DYNATTN_RATES`` if set, else measured on first use."""
    global _rates
    if _rates is None:
        given = os.environ.get("DYNATTN_RATES")
        if given:
            try:
                gemm, gemv, call = (float(x) for x in given.split(","))
            except ValueError:
                raise ValueError(
                    f"DYNATTN_RATES: expected three numbers 'gemm,gemv,call' (flop/s, flop/s, "
                    f"seconds), got {given!r}"
                ) from None
            _rates = Rates(gemm=gemm, gemv=gemv, call=call)
        else:
            _rates = measure_rates()
    return _rates


def set_rates(value: Rates | None) -> None:
    """Fix the rates the policy uses (None: measure again on next use)."""
    global _rates
    _rates = value


# ---------------------------------------------------------------------- prices and rents
#: Array operations a read makes for its deferred columns (logits, mask, exponentials,
#: the write-back) per head it reads, each costing ``Rates.call``: a cost of having
#: deferred columns at all. (A row read of 8 heads with one deferred column took 146 us
#: more than without, about 8 heads x 8 steps x 1.75 us, on the reference machine.)
DEFERRED_STEPS = 8
#: Flop-equivalents (at the GEMV rate) of reading one pending row's weights and values for
#: one (head, row) pair: four scattered loads, each a cache line, bound by memory latency.
GATHER_FLOPS = 1024
#: Passes over an N-sized array ``(heads, n, e)`` that a fold makes whatever its number of
#: rows (the product's temporary, the update of N, drift and value bookkeeping), each a
#: read and a write of 8-byte elements: 4 flop-equivalents per element at the GEMV rate.
FOLD_PASSES = 8


def column_price(heads: int, n: int, d: int) -> float:
    """Seconds to compute one key's weight column for every head: ``heads*n`` logits."""
    r = rates()
    return 2 * heads * n * d / r.gemv + r.call


def column_rent(pairs: int, d: int, deferred: int, heads: int = 1) -> float:
    """Seconds one of ``deferred`` deferred columns costs a read of ``pairs`` (head, row)
    pairs in ``heads`` heads: its logits, and its share of the read's fixed deferred
    steps (per head)."""
    r = rates()
    return 2 * pairs * d / r.gemv + DEFERRED_STEPS * heads * r.call / max(deferred, 1)


def fold_price(heads: int, n: int, d: int, e: int, products: int, deferred: int) -> float:
    """Seconds of a fold of ``products`` pending products (key- plus value-changed rows)
    with ``deferred`` columns still to compute: the GEMMs, and the passes over N-sized
    arrays that every fold makes whatever its number of rows."""
    r = rates()
    products_s = 2 * heads * n * (e * products + d * deferred) / r.gemm
    return products_s + FOLD_PASSES * 4 * heads * n * e / r.gemv + heads * r.call


#: Flop-equivalents (at the GEMV rate) of one exponential of a multiplicative (Hadamard)
#: column update, and the array operations around it.
EXP_FLOPS = 32
HADAMARD_STEPS = 3


def hadamard_price(n: int) -> float:
    """Seconds of one entry update of a stored column (``a *= exp(s*delta*Q[:, j])``)."""
    r = rates()
    return EXP_FLOPS * n / r.gemv + HADAMARD_STEPS * r.call


def deferred_read_price(deferred: int, m: int, d: int) -> float:
    """Seconds that ``deferred`` deferred columns cost a read of one head (an entry, or
    one head's part of a row read): their logits (one product with all of K once they
    are many) and the fixed deferred steps."""
    r = rates()
    return 2 * min(deferred, m) * d / r.gemv + DEFERRED_STEPS * r.call


def open_price(heads: int, n: int) -> float:
    """Seconds to open a pending slot: a copy of the row's weight column for every head."""
    r = rates()
    return 2 * heads * n / r.gemv + r.call


#: Array steps an update of an awake structure makes beyond those of a dormant one (the
#: policy's plan and rules, the slot bookkeeping): an awake entry update with its column
#: deferred took about 8 us against a dormant one's 3 us at n = 1024 on the reference
#: machine, where one step (``Rates.call``) is about 2 us.
AWAKE_UPDATE_STEPS = 4


def awake_update_price() -> float:
    """Seconds an update costs an awake structure more than a dormant one, besides the
    upkeep it is charged as it is done."""
    return AWAKE_UPDATE_STEPS * rates().call


def awake_update_estimate(heads: int, n: int, d: int, e: int) -> float:
    """Seconds of upkeep per update that Rule 4 assumes for a structure that has not been
    awake yet (it starts dormant): each update opens a pending row, whose column is
    computed and folded by GEMMs (logits, exponentials, the fold's products), plus the
    steps an awake update makes beyond a dormant one."""
    r = rates()
    products = 2 * heads * n * (d + e) / r.gemm + EXP_FLOPS * heads * n / r.gemv
    return open_price(heads, n) + products + awake_update_price()


def entry_price(m: int, d: int) -> float:
    """Seconds to compute one entry from scratch, as a dormant read of an out-of-date row
    does: one row of logits and one column of values."""
    r = rates()
    return m * (2 * d + 2 + EXP_FLOPS) / r.gemv + r.call


def row_price(pairs: int, m: int, d: int, e: int) -> float:
    """Seconds to recompute ``pairs`` (head, row) pairs exactly, as a read of a dormant
    structure does: their logits and weighted values (a pass over K and over V each) and
    the exponentials."""
    r = rates()
    return pairs * m * (2 * (d + e) + EXP_FLOPS) / r.gemv + r.call


def wake_price(heads: int, n: int, m: int, d: int, e: int) -> float:
    """Seconds of a full refresh, which ends dormancy: every row recomputed (two GEMMs per
    head and the exponentials)."""
    r = rates()
    return 2 * heads * n * m * (d + e) / r.gemm + EXP_FLOPS * heads * n * m / r.gemv + heads * r.call


#: The clock Rule 4 times operations with (seconds; tests replace it).
now = time.perf_counter
#: Rule 4 with measured rates uses the other state's measured cost of an operation once it
#: has run it on this many units (updates, or (head, row) pairs read) in its last stretch;
#: the model's difference until then.
MIN_METERED_UNITS = 8

#: How much one measured fold or column computation moves a structure's price correction
#: (an exponential average), and the range the correction is kept in.
CORRECTION_WEIGHT = 0.5
CORRECTION_RANGE = (0.25, 64.0)


def corrected(correction: float, predicted_s: float, measured_s: float) -> float:
    """The price correction after an operation predicted to take ``predicted_s`` took
    ``measured_s`` (only with measured rates; else ``correction`` unchanged)."""
    if not rates().measured or predicted_s <= 0:
        return correction
    ratio = min(max(measured_s / predicted_s, CORRECTION_RANGE[0]), CORRECTION_RANGE[1])
    return correction + CORRECTION_WEIGHT * (ratio - correction)


def pending_rent(pairs: int, t: int, width: int, deferred: int, d: int) -> float:
    """Seconds the ``t`` pending rows (``deferred`` of them deferred) add to a read of
    ``pairs`` (head, row) pairs and ``width`` output columns, in proportion to their
    number: their loads and two weighted sums, and the logits of the deferred ones. This
    is what a fold removes; the fixed steps of a read with pending rows are not counted,
    since the next update brings them back whatever the schedule."""
    flops = pairs * t * (4 * width + GATHER_FLOPS) + 2 * pairs * deferred * d
    return flops / rates().gemv


@contextlib.contextmanager
def use_rates(value: Rates | None) -> Iterator[None]:
    """Use ``value`` as the rates inside a ``with`` block (None: measured), then restore."""
    global _rates
    saved = _rates
    _rates = value
    try:
        yield
    finally:
        _rates = saved
