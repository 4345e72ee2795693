"""Theoretical exponents and log-log fits for the benchmarks.

The paper (van den Brand, Song, Zhou, arXiv 2304.02207) bounds the amortized
update time by ``O(n^(omega(1,1,tau) - tau))`` and the worst-case query time by
``O(n^(1+tau))``, where ``omega(1,1,k)`` is the exponent of multiplying an
``n x n`` by an ``n x n^k`` matrix. This module

* tabulates published upper bounds on ``omega(1,1,k)`` (:data:`OMEGA_TABLES`),
  with the convexity interpolation between tabulated points
  (:func:`omega_rect`);
* gives the exponents the benchmarks compare against
  (:func:`update_exponent`, :func:`query_exponent`);
* fits measured times against ``n``: a plain log-log line
  (:func:`fit_loglog`) and a fixed cost plus a power law,
  ``t(n) = c0 + c1 * n**x`` (:func:`fit_cost_model`), with a bootstrap
  interval for ``x`` over the per-round samples; :func:`fit_records` does both
  for every group of a benchmark run.

Why a cost model
----------------
A call into the structure costs a fixed few microseconds (Python dispatch,
argument checks) whatever ``n`` is. Where that fixed part is a large share of
the measured time, the log-log slope is pulled towards 0 and says little about
the asymptotic exponent. ``c0 + c1 * n**x`` separates the two; ``x`` is then
read off the part of the time that grows with ``n``. The fit minimizes the
relative squared error ``sum(((t_i - c0 - c1 n_i**x) / t_i)**2)`` (timing noise
is roughly proportional to the time) with ``c0, c1 >= 0``: for a fixed ``x``
this is a linear least-squares problem in ``(c0, c1)``, so ``x`` is found by
profiling the residual over a grid of exponents and refining around the best
one. :func:`fit_records` reports how much of the time at the smallest and the
largest size is the fixed part (``fixed_share``); where it is large at every
size, the interval on ``x`` is wide, and that is the honest answer.

Sources of the table
--------------------
``omega(a, b, c)`` is invariant under permuting ``(a, b, c)``, so the papers'
``omega(1, k, 1)`` is the ``omega(1, 1, k)`` used here. The numbers are the
upper bounds tabulated in

* **VXXZ24** -- V. Vassilevska Williams, Y. Xu, Z. Xu, R. Zhou, *New Bounds
  for Matrix Multiplication: from Alpha to Omega*, SODA 2024,
  arXiv:2307.07970 (omega < 2.371552, alpha > 0.321334, mu < 0.527661);
* **ADVXXZ24** -- J. Alman, R. Duan, V. Vassilevska Williams, Y. Xu, Z. Xu,
  R. Zhou, *More Asymmetry Yields Faster Matrix Multiplication*, SODA 2025,
  arXiv:2404.16349 (omega < 2.371339, mu < 0.5275).

They were transcribed from the tables of those papers as reproduced in Jan
van den Brand's rectangular-exponent calculator
(https://people.kth.se/~janvdb/matrix.html) and its Python port
(github.com/hanlin-ren/matmulexp, ``rectmm.py``); the headline values
(``omega(1,1,1)``, ``alpha`` and ``mu`` with ``omega(1,1,mu) = 1 + 2 mu``)
agree with the papers' abstracts. Le Gall and Urrutia (SODA 2018,
arXiv:1708.05622) had ``alpha > 0.31389``; their table is superseded point by
point by VXXZ24 and is not repeated here.

Interpolation
-------------
``k -> omega(1,1,k)`` is convex (Lotti and Romani 1983; used this way by Le
Gall 2012 and all later tables), so the chord between two valid upper bounds
is a valid upper bound. :func:`omega_rect` takes the lower convex envelope of
the tabulated points (and of ``(0, 2)``, ``(alpha, 2)``), which is the best
bound the tables give by convexity. For ``k <= alpha`` the value is exactly 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dynattn._validation import check_choice, check_scalar

#: Lower bound on the dual exponent alpha (omega(1,1,alpha) = 2), VXXZ24.
ALPHA = 0.321334

#: Published upper bounds on omega(1,1,k): name -> citation and (k, bound) points.
OMEGA_TABLES: dict[str, dict[str, Any]] = {
    "VXXZ24": {
        "citation": (
            "V. Vassilevska Williams, Y. Xu, Z. Xu, R. Zhou. New Bounds for Matrix "
            "Multiplication: from Alpha to Omega. SODA 2024. arXiv:2307.07970"
        ),
        "points": (
            (0.321334, 2.0),
            (0.33, 2.000100),
            (0.34, 2.000600),
            (0.35, 2.001363),
            (0.40, 2.009541),
            (0.45, 2.023788),
            (0.50, 2.042994),
            (0.527661, 2.055322),
            (0.55, 2.066134),
            (0.60, 2.092631),
            (0.65, 2.121734),
            (0.70, 2.153048),
            (0.75, 2.186210),
            (0.80, 2.220929),
            (0.85, 2.256984),
            (0.90, 2.294209),
            (0.95, 2.332440),
            (1.00, 2.371552),
            (1.10, 2.452056),
            (1.20, 2.535063),
            (1.30, 2.621644),
            (1.40, 2.708400),
            (1.50, 2.794941),
            (1.75, 3.021591),
            (2.00, 3.250385),
        ),
    },
    "ADVXXZ24": {
        "citation": (
            "J. Alman, R. Duan, V. Vassilevska Williams, Y. Xu, Z. Xu, R. Zhou. More "
            "Asymmetry Yields Faster Matrix Multiplication. SODA 2025. arXiv:2404.16349"
        ),
        "points": (
            (0.33, 2.000092),
            (0.34, 2.000520),
            (0.35, 2.001243),
            (0.40, 2.009280),
            (0.50, 2.042776),
            (0.5275, 2.054999),
            (0.60, 2.092351),
            (0.70, 2.152770),
            (0.80, 2.220639),
            (0.90, 2.293941),
            (1.00, 2.371339),
            (1.50, 2.794633),
            (2.00, 3.250035),
        ),
    },
}


def _lower_hull(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex envelope of ``points`` (Andrew's monotone chain), sorted by x."""
    best: dict[float, float] = {}
    for x, y in points:
        best[x] = min(y, best.get(x, math.inf))
    hull: list[tuple[float, float]] = []
    for p in sorted(best.items()):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # keep hull[-1] only if it lies strictly below the chord hull[-2] -> p
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def omega_points(table: str = "best") -> list[tuple[float, float]]:
    """The ``(k, omega(1,1,k))`` breakpoints :func:`omega_rect` interpolates.

    Parameters
    ----------
    table : str
        A key of :data:`OMEGA_TABLES`, or ``"best"`` for all tables together.

    Returns
    -------
    list of (k, bound)
        The lower convex envelope, including ``(0, 2)`` and ``(ALPHA, 2)``.
    """
    check_choice("table", table, ("best", *OMEGA_TABLES))
    names = list(OMEGA_TABLES) if table == "best" else [table]
    pts = [(0.0, 2.0), (ALPHA, 2.0)]
    for name in names:
        pts.extend(OMEGA_TABLES[name]["points"])
    return _lower_hull(pts)


def omega_rect(k: float, table: str = "best") -> float:
    """Best known upper bound on ``omega(1,1,k)``, the ``n x n`` by ``n x n^k`` exponent.

    Parameters
    ----------
    k : float
        Exponent of the inner/outer dimension, ``0 <= k <= 2`` (the tables' range).
    table : str
        ``"best"`` (default) or a key of :data:`OMEGA_TABLES`.

    Returns
    -------
    float
        ``2`` for ``k <= ALPHA``; otherwise linear interpolation on the lower
        convex envelope of the tabulated points (valid because the exponent is
        convex in ``k``).
    """
    k = check_scalar("k", k, low=0.0, high=2.0)  # the tabulated range
    pts = omega_points(table)
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    return float(np.interp(k, xs, ys))


def omega_classical(k: float) -> float:
    """``omega(1,1,k)`` of classical (cubic) multiplication: ``2 + k``."""
    return 2.0 + float(k)


def update_exponent(tau: float, multiplication: str = "best") -> float:
    """Theoretical amortized update exponent ``omega(1,1,tau) - tau`` (paper regime, d = e = n).

    Parameters
    ----------
    tau : float
        Threshold exponent, ``T = ceil(n^tau)``.
    multiplication : {"best", "classical"} or a table name
        ``"classical"`` gives 2 for every tau (one ``n x T`` by ``T x n``
        product per ``T`` updates costs ``n^2`` per update); otherwise the
        bound from :func:`omega_rect`.

    Notes
    -----
    For ``tau = 0`` this is the rank-1 fold, exponent 2 either way.
    """
    tau = check_scalar("tau", tau, low=0.0, high=1.0)
    check_choice("multiplication", multiplication, ("best", "classical", *OMEGA_TABLES))
    if multiplication == "classical":
        return omega_classical(tau) - tau
    return omega_rect(tau, multiplication) - tau


def query_exponent(tau: float, bound: str = "structure") -> float:
    """Theoretical query exponent for one entry.

    Parameters
    ----------
    tau : float
        Threshold exponent.
    bound : {"structure", "paper"}
        ``"structure"``: ``tau``, the O(T) correction over the pending columns
        (README.md, "How it works"); ``"paper"``: ``1 + tau``, the worst case in
        the abstract of van den Brand, Song, Zhou (arXiv 2304.02207).
    """
    tau = check_scalar("tau", tau, low=0.0, high=1.0)
    check_choice("bound", bound, ("structure", "paper"))
    return tau if bound == "structure" else 1.0 + tau


@dataclass(frozen=True)
class Fit:
    """Least-squares line ``log(y) = slope * log(x) + intercept``.

    Attributes
    ----------
    slope : float
        The fitted exponent.
    intercept : float
        Natural-log intercept.
    stderr : float
        Standard error of the slope (``nan`` with two points).
    r2 : float
        Coefficient of determination in log space.
    points : int
        Number of points used.
    span : float
        ``max(x) / min(x)``.
    """

    slope: float
    intercept: float
    stderr: float
    r2: float
    points: int
    span: float

    def predict(self, x: Any) -> np.ndarray:
        """Fitted ``y`` at ``x``."""
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.slope

    def as_dict(self) -> dict[str, float]:
        """JSON-friendly dict."""
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "stderr": self.stderr,
            "r2": self.r2,
            "points": self.points,
            "span": self.span,
        }


def fit_loglog(x: ArrayLike, y: ArrayLike) -> Fit:
    """Fit ``y = c * x^p`` by least squares on ``(log x, log y)``.

    Parameters
    ----------
    x, y : (k,) array_like of positive floats
        Same length k >= 2, at least two distinct x.

    Returns
    -------
    Fit
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y: expected 1-D arrays of equal length, got {xs.shape} and {ys.shape}")
    if xs.size < 2 or np.unique(xs).size < 2:
        raise ValueError(f"x: expected at least two distinct values, got {xs.tolist()}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise ValueError("x and y: expected finite positive values for a log-log fit")
    lx, ly = np.log(xs), np.log(ys)
    design = np.stack([lx, np.ones_like(lx)], axis=1)
    coef, *_ = np.linalg.lstsq(design, ly, rcond=None)
    slope, intercept = float(coef[0]), float(coef[1])
    resid = ly - (slope * lx + intercept)
    ss_res = float(resid @ resid)
    centered = ly - ly.mean()
    ss_tot = float(centered @ centered)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    dof = xs.size - 2
    sxx = float(((lx - lx.mean()) ** 2).sum())
    stderr = math.sqrt(ss_res / dof / sxx) if dof > 0 else math.nan
    return Fit(slope, intercept, stderr, r2, int(xs.size), float(xs.max() / xs.min()))


#: Exponents :func:`fit_cost_model` searches, and the step of its first grid.
EXPONENT_RANGE = (0.02, 4.0)
EXPONENT_STEP = 0.01
#: Points of the second, finer grid around the best exponent of the first.
_FINE_POINTS = 41


@dataclass(frozen=True)
class CostFit:
    """Fixed cost plus a power law, ``t(n) = fixed + scale * n**exponent``.

    Attributes
    ----------
    exponent : float
        The fitted exponent ``x``.
    fixed : float
        ``c0``, the part of the time that does not grow with ``n`` (seconds).
    scale : float
        ``c1`` (seconds per ``n**exponent``).
    low, high : float
        Bootstrap percentile interval of ``exponent`` at confidence ``level``
        (``nan`` without per-round samples to resample).
    level : float
        Confidence level of ``[low, high]``.
    rss : float
        Weighted residual sum of squares (relative errors squared, by default).
    sizes : tuple of float
        The ``n`` the fit used.
    boundary : bool
        True if the exponent ended on an edge of :data:`EXPONENT_RANGE` or the
        fit found no term growing with ``n`` (``scale == 0``): then the data
        do not determine ``x``.
    reps : int
        Bootstrap resamples behind ``[low, high]`` (0: none).
    """

    exponent: float
    fixed: float
    scale: float
    low: float
    high: float
    level: float
    rss: float
    sizes: tuple[float, ...]
    boundary: bool
    reps: int

    def predict(self, n: ArrayLike) -> np.ndarray:
        """Fitted time at ``n`` (any shape)."""
        return self.fixed + self.scale * np.asarray(n, dtype=np.float64) ** self.exponent

    def fixed_share(self, n: ArrayLike) -> np.ndarray:
        """Share of the fitted time at ``n`` that is the fixed cost, in ``[0, 1]``."""
        total = self.predict(n)
        return np.where(total > 0, self.fixed / np.where(total > 0, total, 1.0), 1.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict, with the fixed share at the smallest and largest size."""
        lo_n, hi_n = min(self.sizes), max(self.sizes)
        return {
            "exponent": self.exponent,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "fixed_s": self.fixed,
            "scale": self.scale,
            "rss": self.rss,
            "sizes": list(self.sizes),
            "boundary": self.boundary,
            "reps": self.reps,
            "fixed_share_smallest": float(self.fixed_share(lo_n)),
            "fixed_share_largest": float(self.fixed_share(hi_n)),
        }


def _profile(u: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonnegative weighted least squares of ``y ~ c0 + c1 * u`` for many ``u`` at once.

    Parameters
    ----------
    u : (g, k) or (r, g, k) array
        The regressor ``n**x`` at k sizes for g exponents, shared by all r
        data sets or one set of g per data set.
    y, w : (r, k) arrays
        r data sets of times and their weights.

    Returns
    -------
    rss, c0, c1 : (r, g) arrays
        Residual and coefficients of the best fit with ``c0 >= 0``, ``c1 >= 0``:
        the unconstrained solution where it is feasible, else the better of
        the two faces ``c0 = 0`` and ``c1 = 0`` (the optimum of a convex
        quadratic over the quadrant lies inside it or on one of them). The
        residual is computed from the weighted moments, without forming the
        residual vectors.
    """
    wy = w * y
    if u.ndim == 2:
        su, suu, suy = w @ u.T, w @ (u * u).T, wy @ u.T
    else:
        su = np.einsum("rk,rgk->rg", w, u)
        suu = np.einsum("rk,rgk->rg", w, u * u)
        suy = np.einsum("rk,rgk->rg", wy, u)
    sw = w.sum(-1)[:, None]
    sy = wy.sum(-1)[:, None]
    syy = (wy * y).sum(-1)[:, None]

    def rss_of(c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
        got = syy - 2 * c0 * sy - 2 * c1 * suy + c0 * c0 * sw + 2 * c0 * c1 * su + c1 * c1 * suu
        return np.asarray(np.maximum(got, 0.0))

    det = sw * suu - su * su
    ok = det > 1e-12 * sw * suu
    safe = np.where(ok, det, 1.0)
    c1_free = (sw * suy - su * sy) / safe
    c0_free = (sy - c1_free * su) / sw
    free_ok = ok & (c0_free >= 0) & (c1_free >= 0)
    # face c0 = 0: c1 = max(suy / suu, 0); face c1 = 0: c0 = sy / sw
    zeros = np.zeros_like(suu)
    c1_face = np.maximum(suy / suu, 0.0)
    c0_face = np.broadcast_to(sy / sw, suu.shape)
    rss_a = rss_of(zeros, c1_face)
    rss_b = rss_of(c0_face, zeros)
    use_a = rss_a <= rss_b
    c0 = np.where(use_a, 0.0, c0_face)
    c1 = np.where(use_a, c1_face, 0.0)
    rss = np.where(use_a, rss_a, rss_b)
    rss_f = rss_of(np.where(free_ok, c0_free, 0.0), np.where(free_ok, c1_free, 0.0))
    better = free_ok & (rss_f <= rss)
    return np.where(better, rss_f, rss), np.where(better, c0_free, c0), np.where(better, c1_free, c1)


def _best_exponents(xn: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Profile fit of every row of ``y``.

    Parameters
    ----------
    xn : (k,) array
        Sizes divided by their maximum (so ``xn**x`` lies in (0, 1]).
    y, w : (r, k) arrays
        r data sets (times scaled to order 1) and their weights.

    Returns
    -------
    x, c0, c1, rss : (r,) arrays
        With ``c1`` in the units of ``xn``.
    """
    lo, hi = EXPONENT_RANGE
    grid = np.arange(lo, hi + EXPONENT_STEP / 2, EXPONENT_STEP)
    logx = np.log(xn)
    u = np.exp(grid[:, None] * logx[None, :])  # (g, k)
    rss, _, _ = _profile(u, y, w)
    best = np.argmin(rss, axis=1)  # (r,)
    # second pass: a fine grid of one coarse step either side of each row's best exponent
    offsets = np.linspace(-EXPONENT_STEP, EXPONENT_STEP, _FINE_POINTS)
    fine = np.clip(grid[best][:, None] + offsets[None, :], lo, hi)  # (r, f)
    u2 = np.exp(fine[:, :, None] * logx[None, None, :])  # (r, f, k)
    rss2, c0s, c1s = _profile(u2, y, w)
    pick = np.argmin(rss2, axis=1)
    rows = np.arange(y.shape[0])
    return fine[rows, pick], c0s[rows, pick], c1s[rows, pick], rss2[rows, pick]


def _check_sizes_times(x: ArrayLike, y: ArrayLike, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or ys.shape != xs.shape:
        raise ValueError(f"x and {name}: expected 1-D arrays of equal length, got {xs.shape} and {ys.shape}")
    if np.unique(xs).size < 3:
        raise ValueError(
            f"x: a fixed cost plus a power law needs at least three distinct sizes, got {xs.tolist()}"
        )
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise ValueError(f"x and {name}: expected finite positive values")
    return xs, ys


def _weights(ys: np.ndarray, sigma: ArrayLike | None) -> np.ndarray:
    if sigma is None:
        return 1.0 / ys**2
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.shape != ys.shape or not np.all(np.isfinite(sig)) or not np.all(sig > 0):
        raise ValueError(f"sigma: expected finite positive values of shape {ys.shape}")
    return 1.0 / sig**2


def fit_power_offset(x: ArrayLike, y: ArrayLike, sigma: ArrayLike | None = None) -> CostFit:
    """Fit ``y = c0 + c1 * x**p`` (``c0, c1 >= 0``) by weighted least squares.

    Parameters
    ----------
    x : (k,) array_like of positive floats
        Sizes, at least three distinct.
    y : (k,) array_like of positive floats
        Times.
    sigma : (k,) array_like, optional
        Standard deviation of each ``y``; the residuals are divided by it.
        Default: ``y`` itself, i.e. relative errors.

    Returns
    -------
    CostFit
        Without an interval (``low = high = nan``); see :func:`fit_cost_model`.

    Notes
    -----
    For a fixed ``p`` the best ``(c0, c1)`` solve a 2 x 2 linear system (with
    the sign constraints handled exactly), so the fit profiles the residual
    over ``p`` on a grid of step :data:`EXPONENT_STEP` over
    :data:`EXPONENT_RANGE` and then on a 20 times finer grid around the best
    point.
    """
    xs, ys = _check_sizes_times(x, y)
    w = _weights(ys, sigma)
    x_max, y_max = float(xs.max()), float(ys.max())
    ex, c0, c1, rss = _best_exponents(xs / x_max, (ys / y_max)[None, :], (w * y_max**2)[None, :])
    p = float(ex[0])
    lo, hi = EXPONENT_RANGE
    scale = float(c1[0]) * y_max / x_max**p
    boundary = scale <= 0.0 or p <= lo + 1e-9 or p >= hi - 1e-9
    return CostFit(
        exponent=p,
        fixed=float(c0[0]) * y_max,
        scale=scale,
        low=math.nan,
        high=math.nan,
        level=math.nan,
        rss=float(rss[0]),
        sizes=tuple(float(v) for v in xs),
        boundary=bool(boundary),
        reps=0,
    )


def fit_cost_model(
    sizes: ArrayLike,
    samples: Sequence[ArrayLike],
    *,
    level: float = 0.95,
    reps: int = 1000,
    seed: int = 0,
) -> CostFit:
    """:func:`fit_power_offset` to per-size medians, with a bootstrap interval on the exponent.

    Parameters
    ----------
    sizes : (k,) array_like
        The sizes ``n``, at least three distinct.
    samples : sequence of k 1-D array_likes
        The timed samples at each size (one per interleaved round); they may
        differ in length.
    level : float
        Confidence level of the interval, in (0, 1).
    reps : int
        Bootstrap resamples (0: no interval).
    seed : int
        Seed of the resampling, so a report is reproducible.

    Returns
    -------
    CostFit
        The point estimate is the fit to the medians. The interval is the
        percentile interval of the exponents fitted to ``reps`` resampled data
        sets: at every size, as many samples as were taken, drawn with
        replacement, and their median. Sizes with a single sample contribute
        that sample every time; if no size has two, there is no interval.
    """
    level = check_scalar("level", level, low=0.0, high=1.0, include_boundaries="neither")
    reps = int(check_scalar("reps", reps, low=0))
    xs = np.asarray(sizes, dtype=np.float64)
    if len(samples) != xs.size:
        raise ValueError(f"samples: expected one sequence per size ({xs.size}), got {len(samples)}")
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    for i, arr in enumerate(arrays):
        if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
            raise ValueError(f"samples[{i}]: expected at least one finite positive time")
    medians = np.array([float(np.median(a)) for a in arrays])
    point = fit_power_offset(xs, medians)
    if reps == 0 or all(a.size < 2 for a in arrays):
        return point
    rng = np.random.default_rng(seed)
    boot = np.empty((reps, xs.size))
    for i, arr in enumerate(arrays):
        idx = rng.integers(0, arr.size, size=(reps, arr.size))
        boot[:, i] = np.median(arr[idx], axis=1)
    x_max = float(xs.max())
    y_max = boot.max(axis=1, keepdims=True)
    yb = boot / y_max
    ex, _, _, _ = _best_exponents(xs / x_max, yb, 1.0 / yb**2)
    low, high = np.quantile(ex, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return replace(point, low=float(low), high=float(high), level=level, reps=reps)


#: A fit is reported as reliable with at least this many sizes spanning this factor.
MIN_FIT_POINTS = 4
MIN_FIT_SPAN = 4.0


def fit_records(
    records: Iterable[Mapping[str, Any]],
    impl: str = "dynamic",
    *,
    min_n: int | None = None,
    reps: int = 1000,
    seed: int = 0,
    per_gemm: bool = False,
) -> list[dict[str, Any]]:
    """Exponent fits of ``update_s`` and ``query_s`` against ``n`` per (tau, storage, dtype).

    Parameters
    ----------
    records : iterable of benchmark records (see :mod:`dynattn.sweep`)
        Only records with ``impl == impl`` and ``regime == "paper"`` are used.
        Records with ``update_s_samples`` / ``query_s_samples`` (the per-round
        samples) give the cost-model fits a bootstrap interval.
    impl : str
        Implementation name to fit.
    min_n : int, optional
        Fit only the sizes ``n >= min_n`` (default: all).
    reps, seed : int
        Bootstrap resamples and seed (:func:`fit_cost_model`).
    per_gemm : bool
        Correct for a machine whose speed drifts between sizes (other
        processes on a shared machine): multiply every time of a record by
        ``gemm_gflops / max(gemm_gflops of the group)``, the GEMM rate timed
        in the same interleaved rounds relative to the fastest seen. Exact
        for the part of the time that is GEMM, approximate for the rest; a
        diagnostic, reported as ``per_gemm`` in every entry.

    Returns
    -------
    list of dict
        One per group: ``tau``, ``storage``, ``dtype``, ``sizes`` (all
        measured), ``fit_sizes`` (those fitted); ``update`` and ``query``: the
        log-log line (:meth:`Fit.as_dict` or ``None``); ``update_model`` and
        ``query_model``: the fixed cost plus power law with its interval
        (:meth:`CostFit.as_dict`, ``None`` with fewer than three sizes);
        ``reliable`` (at least :data:`MIN_FIT_POINTS` fitted sizes spanning
        :data:`MIN_FIT_SPAN`), and the theoretical exponents
        ``theory_update_classical``, ``theory_update_best``, ``theory_query``,
        ``theory_query_paper``.
    """
    groups: dict[tuple[Any, Any, Any], list[Mapping[str, Any]]] = {}
    for rec in records:
        if rec.get("impl") != impl or rec.get("regime") != "paper":
            continue
        groups.setdefault((rec["tau"], rec.get("storage"), rec.get("dtype")), []).append(rec)
    out = []
    for (tau, storage, dtype), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        recs = sorted(recs, key=lambda r: r["n"])
        sizes = [r["n"] for r in recs]
        used = [r for r in recs if min_n is None or r["n"] >= min_n]
        fit_sizes = [r["n"] for r in used]
        rates = [r.get("gemm_gflops") for r in used]
        if per_gemm and not all(rates):
            raise ValueError("per_gemm: every record needs its 'gemm_gflops' (the in-round GEMM rate)")
        top = max((float(x) for x in rates if x), default=1.0)
        speed = [float(x) / top if per_gemm and x else 1.0 for x in rates]
        entry: dict[str, Any] = {
            "impl": impl,
            "tau": tau,
            "storage": storage,
            "dtype": dtype,
            "sizes": sizes,
            "fit_sizes": fit_sizes,
            "per_gemm": per_gemm,
        }
        for key, field in (("update", "update_s"), ("query", "query_s")):
            timed = [(r, f) for r, f in zip(used, speed, strict=True) if r.get(field)]
            try:
                entry[key] = fit_loglog(
                    [r["n"] for r, _ in timed], [r[field] * f for r, f in timed]
                ).as_dict()
            except ValueError:
                entry[key] = None
            samples = [
                np.asarray(r.get(f"{field}_samples") or [r[field]], dtype=np.float64) * f for r, f in timed
            ]
            try:
                model = fit_cost_model([r["n"] for r, _ in timed], samples, reps=reps, seed=seed)
                entry[f"{key}_model"] = model.as_dict()
            except ValueError:
                entry[f"{key}_model"] = None
        span = max(fit_sizes) / min(fit_sizes) if fit_sizes else 0.0
        entry["reliable"] = len(set(fit_sizes)) >= MIN_FIT_POINTS and span >= MIN_FIT_SPAN
        entry["theory_update_classical"] = update_exponent(tau, "classical")
        entry["theory_update_best"] = update_exponent(tau, "best")
        entry["theory_query"] = query_exponent(tau)
        entry["theory_query_paper"] = query_exponent(tau, "paper")
        out.append(entry)
    return out


def _show_slope(fit: Mapping[str, Any] | None) -> str:
    if not fit:
        return "n/a"
    err = fit["stderr"]
    return f"{fit['slope']:.2f}" + (f" +/- {err:.2f}" if math.isfinite(err) else "")


def _show_model(model: Mapping[str, Any] | None) -> str:
    if not model:
        return "n/a"
    text = f"{model['exponent']:.2f}"
    if math.isfinite(model.get("low", math.nan)):
        text += f" [{model['low']:.2f}, {model['high']:.2f}]"
    if model.get("boundary"):
        text += "*"
    return text


def _show_share(model: Mapping[str, Any] | None) -> str:
    if not model:
        return "n/a"
    return f"{model['fixed_share_smallest']:.0%}..{model['fixed_share_largest']:.0%}"


def format_fits(fits: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text tables of :func:`fit_records` output next to the theoretical exponents.

    Two tables, updates and queries. Each has the log-log slope, the exponent
    ``x`` of the fixed cost plus power law with its bootstrap interval, the
    fixed cost ``c0``, and the share of the fitted time that ``c0`` is at the
    smallest and at the largest fitted size.
    """
    if not fits:
        return "no paper-regime DynamicAttention records to fit"
    per_gemm = any(f.get("per_gemm") for f in fits)
    level = next(
        (f[k]["level"] for f in fits for k in ("update_model", "query_model") if f.get(k) and f[k]["reps"]),
        None,
    )
    ci = f"{level:.0%} CI" if level else "CI"
    lines = []
    for title, key, theory in (
        ("updates (amortized)", "update", ("classical", "best-known")),
        ("queries (one entry, T/2 pending)", "query", ("structure", "paper")),
    ):
        head = (
            f"{'tau':>5} {'storage':>8} {'fitted sizes':>16} | {'log-log slope':>13} | "
            f"{'x, c0 + c1 n^x [' + ci + ']':>28} {'c0':>8} {'c0 share':>10} | "
            f"{theory[0]:>9} {theory[1]:>10}"
        )
        lines += [f"{title}:", head, "-" * len(head)]
        for f in fits:
            fs = f.get("fit_sizes", f["sizes"])
            sizes = f"{min(fs)}..{max(fs)}({len(fs)})" if fs else "-"
            model = f.get(f"{key}_model")
            c0 = f"{model['fixed_s'] * 1e6:.1f}us" if model else "n/a"
            if key == "update":
                th = f"{f['theory_update_classical']:>9.3f} {f['theory_update_best']:>10.3f}"
            else:
                th = f"{f['theory_query']:>9.2f} {f['theory_query_paper']:>10.2f}"
            flag = "" if f["reliable"] else "  (fewer than 4 sizes spanning 4x: indicative only)"
            lines.append(
                f"{f['tau']:>5.2f} {str(f['storage']):>8} {sizes:>16} | {_show_slope(f.get(key)):>13} | "
                f"{_show_model(model):>28} {c0:>8} {_show_share(model):>10} | {th}{flag}"
            )
        lines.append("")
    if per_gemm:
        lines.append(
            "per-GEMM: every time multiplied by (GEMM rate in its rounds) / (fastest GEMM rate of the "
            "group), a correction for a machine whose speed drifted between sizes."
        )
    lines.append(
        "x: exponent of t(n) = c0 + c1*n^x fitted to the per-size medians (relative least squares, "
        "c0, c1 >= 0), interval from resampling the rounds; * = x not determined (at the edge of "
        f"[{EXPONENT_RANGE[0]:g}, {EXPONENT_RANGE[1]:g}] or no growing term). c0 share: fixed part of the "
        "fitted time at the smallest..largest size. Updates: classical = omega(1,1,tau)-tau with "
        "cubic multiplication (= 2), best-known = with the VXXZ24/ADVXXZ24 bounds (asymptotic, not "
        "what BLAS runs). Queries: structure = tau (O(T) correction per entry), paper = 1+tau (the "
        "paper's worst case)."
    )
    return "\n".join(lines)


#: What the conditional lower bound says and its status, printed by ``dynattn theory``
#: (the same text as docs/hardness.md, "Status of the conjecture").
LOWER_BOUND_STATUS = """\
Lower bound (conditional). van den Brand, Song and Zhou (arXiv 2304.02207): for a constant
tau in (0, 1], no structure has amortized update time n^(omega(1,1,tau) - tau - eps) and query
time n^(1 + tau - eps) at once, unless the Hinted Mv conjecture of van den Brand, Nanongkai
and Saranurak (FOCS 2019) fails, in the variant whose hint is a 0/1 matrix with at most n^tau
nonzeros. dynattn.hardness runs that reduction (docs/hardness.md).
Status: Alman and Vassilevska Williams, "Truly Subquadratic 3SUM and Truly Subcubic APSP via
Triangles in Sparse Lopsided Graphs", arXiv:2610.06783 (October 2026; a preprint, not peer
reviewed; with a Lean formalization), claim (Corollary 40, Section 5.4) that the Hinted Mv
conjectures, this variant included, fail for 0 < tau < 1/18 (phase 2 in O(n^(2 - 0.063 tau)),
phase 3 in O(n^(1 + 0.437 tau)), 0/1 inputs on the word RAM), and with smaller savings for
tau < ln 4/(5 ln 10) = 0.1204. For those tau the lower bound has no basis left; for larger tau,
including every tau this library measures (>= 0.25), it stands as before, conditional on the
conjecture. Neither gives a faster practical algorithm: the reduction runs from attention to
Hinted Mv, not back, and the preprint's algorithm (integer inputs, a recursive fast-matrix-
multiplication scheme) saves at most n^(0.063/18) = n^0.0035, a factor 1.08 at n = 10^9."""
