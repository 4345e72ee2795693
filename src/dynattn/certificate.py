"""The certificate: error terms of an incrementally maintained answer, as pure functions.

Every answer ``O[i, j] = unit_j * num / den`` of :class:`~dynattn.DynamicAttention`
is checked against a first-order bound before it is returned (the derivation,
and why each term is there, is in ``docs/accuracy.md``)::

    E_i = drift_i + rate_t * mass_i + underflow + mismatch_i
    r   = E_i / den_i
    |answer - exact| / max|V[:, j]|  <=  (rho_j + 1) * r / (1 - r)

The functions below compute those terms once, for the scalar entry path and the
vectorized row/batch paths alike: given ``where=xp.where`` they work on arrays,
given ``where=None`` on Python floats (the entry hot path, same formula with plain
conditionals). Value-scale bookkeeping (``rho_j``, the column units) lives here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: float64 unit roundoff: every sum, product and logit is computed in float64.
UNIT_ROUNDOFF = 2.0**-53
#: Default tolerance on the incremental error, relative to max|V[:, j]|: a tenth of the
#: accuracy targets 1e-10 (float64) and 1e-4 (float32) of docs/accuracy.md.
DEFAULT_TOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-5}
#: A fold refreshes a row once its drift exceeds this fraction of ``tol`` (the rest is
#: headroom for the pending terms of the answers until the next fold).
DRIFT_FRACTION = 0.5
#: An answer is certified only while ``E / den`` stays below this (first-order bound valid).
MAX_RELATIVE = 0.5

Where = Callable[[Any, Any, Any], Any]


def gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)`` for float64: the relative error of a k-term sum."""
    ku = k * UNIT_ROUNDOFF
    return ku / (1.0 - ku)


def column_error_limit(unit: float, tol: float) -> float:
    """Relative error a multiplicatively updated weight column may carry before it is
    recomputed from its logits: it enters every bound times the row's weight mass, so a
    32nd of ``tol`` (and at least a few roundings, ``8u + 64 * 2**-53``)."""
    return max(8 * unit + 64 * UNIT_ROUNDOFF, tol / 32)


def mass_rate(column_limit: float, unit: float, t: int) -> float:
    """Error per unit of summed weight mass that is not drift: stored weights against a
    fresh computation (``column_limit + u``), the O(t) sums of an answer
    (``gamma_{2t+4}``), and values divided by their column unit rounding in float64's
    subnormal range (``2**-1074``)."""
    return column_limit + unit + gamma(2 * t + 4) + 2.0**-1074


def logit_error(d: int, scale: float, q_norm: Any, k_norm_max: float) -> Any:
    """Bound on |computed - exact| float64 logit ``scale * q.k`` for query rows of norm
    ``q_norm``: ``gamma_{d+2} |scale| |q| max|k|``. An infinite key norm passes the
    range checks only when every query row is 0, when every logit is exactly 0."""
    k_norm = k_norm_max if math.isfinite(k_norm_max) else 0.0
    return gamma(d + 2) * abs(scale) * q_norm * k_norm


def mismatch_rate(unit: float, column_limit: float, logit_err: Any) -> Any:
    """Relative difference between a weight column recomputed from the logits and the
    column that was folded (implicit storage): two roundings to the dtype, the folded
    column's own error, and the logit rounding of both computations."""
    return 4 * unit + column_limit + 2 * logit_err


def fresh_error(logit_err: Any, unit: float, m: int) -> Any:
    """Error of a from-scratch float64 evaluation of a row from the stored inputs:
    logits, weights rounded to the dtype, and the m-term sums (relative to max|V[:, j]|)."""
    return 2 * (logit_err + unit + gamma(m + 2))


def row_error(drift: Any, rate: float, mass: Any, underflow: float, mismatch: Any) -> Any:
    """``E_i`` of the module docstring (scalars or arrays)."""
    return drift + rate * mass + underflow + mismatch


def row_bound(error: Any, denominator: Any, where: Where | None) -> Any:
    """``r / (1 - r)`` with ``r = E / den``: multiplied by ``rho_j + 1`` it bounds the
    error relative to max|V[:, j]|. Infinite (not certifiable) when ``den <= 0`` or
    ``r >= 1/2``. ``where=None``: Python floats."""
    if where is None:
        relative = error / denominator if denominator > 0 else math.inf
        return relative / (1 - relative) if relative < MAX_RELATIVE else math.inf
    positive = denominator > 0
    relative = where(positive, error / where(positive, denominator, 1.0), math.inf)
    certifiable = relative < MAX_RELATIVE
    safe = where(certifiable, relative, 0.0)
    return where(certifiable, safe / (1 - safe), math.inf)


def column_bound(row_bound: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """``row_bound * (rho_j + 1)``, the bound relative to max|V[:, j]| (numpy arrays that
    broadcast), and 0 wherever ``row_bound`` is 0: an exact answer (a row that sees no
    key, or certification off) stays exact when a column's ratio is infinite, instead of
    becoming NaN and being recomputed."""
    with np.errstate(invalid="ignore"):
        return np.where(row_bound == 0, 0.0, row_bound * (ratio + 1))


def value_ratio(scale: Any, current: Any, where: Where | None) -> Any:
    """``rho_j = value_scale_j / max|V[:, j]|``: how much larger than today's values the
    values summed into the snapshot may have been (1 for an all-zero column).
    ``where=None``: Python floats."""
    if where is None:
        return scale / current if current > 0 else (math.inf if scale > 0 else 1.0)
    positive = current > 0
    ratio = scale / where(positive, current, 1.0)
    return where(positive, ratio, where(scale > 0, math.inf, 1.0))


def power_of_two_units(scale: np.ndarray) -> np.ndarray:
    """The power of two ``2**k <= scale < 2**(k+1)`` per entry (1 where ``scale`` is 0):
    the unit in which a value column is kept, so that no sum of weights times values
    can overflow for any finite V (docs/accuracy.md, "Values of any finite magnitude")."""
    exponent = np.frexp(scale)[1]
    return np.where(scale > 0, np.ldexp(1.0, exponent - 1), 1.0)


def note_new_values(state: Any, old_abs: Any, new_abs: Any) -> bool:
    """Value-scale bookkeeping after a value row changed from ``|old|`` to ``|new|``, both
    ``(H, e)``: ``value_max`` stays exact or is marked stale, ``value_scale`` only grows
    (the tables are updated in place). Returns whether a column's unit must move up."""
    value_max, stale, scale = state.value_max, state.value_max_stale, state.value_scale
    # stale where the old max may have left (``old >= max``) and no new value reached it
    np.logical_or(stale, old_abs >= value_max, out=stale)
    np.logical_and(stale, new_abs < value_max, out=stale)
    np.maximum(value_max, new_abs, out=value_max)
    np.maximum(scale, new_abs, out=scale)
    return bool(np.any(scale / 2 >= state.value_unit))


def note_new_value(state: Any, h: int, j: int, old_abs: float, new_abs: float) -> bool:
    """:func:`note_new_values` for one entry ``(h, j)``, in Python floats (the entry-update
    hot path)."""
    value_max = float(state.value_max[h, j])
    if new_abs >= value_max:
        state.value_max[h, j] = new_abs
        state.value_max_stale[h, j] = False
    elif old_abs >= value_max:
        state.value_max_stale[h, j] = True
    if new_abs > state.value_scale[h, j]:
        state.value_scale[h, j] = new_abs
    return bool(state.value_scale[h, j] / 2 >= state.value_unit[h, j])


def norms(x: Any) -> np.ndarray:
    """Euclidean norms along the last axis, without overflow or underflow of the squares."""
    x = np.asarray(x, dtype=np.float64)
    squares = np.einsum("...d,...d->...", x, x)
    if not squares.size or squares.max() < math.inf:  # no square overflowed (underflow only
        return np.sqrt(squares)  # loses < 1e-150)
    biggest = np.abs(x).max(axis=-1, keepdims=True, initial=0.0)
    safe = np.where(biggest > 0, biggest, 1.0)
    scaled = x / safe
    return np.sqrt(np.einsum("...d,...d->...", scaled, scaled)) * safe[..., 0]


def updated_norm(norm: float, old: float, new: float) -> float:
    """An upper bound on ``|k'|`` when one entry of ``k`` (``|k| = norm``) moves from
    ``old`` to ``new``: O(1), scaled so that no square overflows, with the float64
    rounding of the update (which can cancel) added. Folds recompute the norms of
    pending rows exactly."""
    if norm < 1e150 and -1e150 < old < 1e150 and -1e150 < new < 1e150:  # no square overflows
        a, b, c = norm * norm, old * old, new * new
        return math.sqrt(max(a - b + c + 4 * UNIT_ROUNDOFF * (a + b + c), 0.0))
    biggest = max(norm, abs(old), abs(new))
    a, b, c = norm / biggest, old / biggest, new / biggest
    square = a * a - b * b + c * c + 4 * UNIT_ROUNDOFF * (a * a + b * b + c * c)
    return biggest * math.sqrt(max(square, 0.0))


def rescale_drift(
    drift: Any, z: Any, pending_mass: Any, factors: Any, shift: Any, unit: float, subnormal: float
) -> Any:
    """Drift of rows after their stabilizer moved up by ``shift`` (factor ``exp(-shift)``).

    The computed factor is off by the rounding of the shift and of exp (the same for
    every stored quantity of the row, so it counts against weights computed fresh
    later); ``N`` and ``Z`` took one more rounding each; and every stored weight of the
    row (dense storage, pending columns) was rounded again to the dtype, so it no longer
    cancels exactly what ``N`` and ``Z`` hold: by ``u`` relative or half a subnormal
    step. ``z`` and ``pending_mass`` are after scaling (docs/accuracy.md, "Stabilizers").
    """
    scaled = drift * factors * (1 + 4 * UNIT_ROUNDOFF)
    factor_error = 2 * UNIT_ROUNDOFF * (shift + 4)
    restored = (unit + UNIT_ROUNDOFF) * (z + scaled + pending_mass)
    return scaled + (factor_error + 2 * UNIT_ROUNDOFF) * z + restored + subnormal
