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
* fits measured times against ``n`` on a log-log scale (:func:`fit_loglog`,
  :func:`fit_records`).

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
from dataclasses import dataclass
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


#: A fit is reported as reliable with at least this many sizes spanning this factor.
MIN_FIT_POINTS = 4
MIN_FIT_SPAN = 4.0


def fit_records(records: Iterable[Mapping[str, Any]], impl: str = "dynamic") -> list[dict[str, Any]]:
    """Exponent fits of ``update_s`` and ``query_s`` against ``n`` per (tau, storage, dtype).

    Parameters
    ----------
    records : iterable of benchmark records (see :mod:`dynattn.sweep`)
        Only records with ``impl == impl`` and ``regime == "paper"`` are used.
    impl : str
        Implementation name to fit.

    Returns
    -------
    list of dict
        One per group: ``tau``, ``storage``, ``dtype``, ``sizes``, ``update``
        and ``query`` (:meth:`Fit.as_dict` or ``None``), ``reliable`` (at least
        :data:`MIN_FIT_POINTS` sizes spanning :data:`MIN_FIT_SPAN`), and the
        theoretical exponents ``theory_update_classical``,
        ``theory_update_best``, ``theory_query``, ``theory_query_paper``.
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
        entry: dict[str, Any] = {
            "impl": impl,
            "tau": tau,
            "storage": storage,
            "dtype": dtype,
            "sizes": sizes,
        }
        for key, field in (("update", "update_s"), ("query", "query_s")):
            pairs = [(r["n"], r[field]) for r in recs if r.get(field)]
            try:
                entry[key] = fit_loglog([p[0] for p in pairs], [p[1] for p in pairs]).as_dict()
            except ValueError:
                entry[key] = None
        span = max(sizes) / min(sizes) if sizes else 0.0
        entry["reliable"] = len(set(sizes)) >= MIN_FIT_POINTS and span >= MIN_FIT_SPAN
        entry["theory_update_classical"] = update_exponent(tau, "classical")
        entry["theory_update_best"] = update_exponent(tau, "best")
        entry["theory_query"] = query_exponent(tau)
        entry["theory_query_paper"] = query_exponent(tau, "paper")
        out.append(entry)
    return out


def format_fits(fits: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`fit_records` output next to the theoretical exponents."""
    if not fits:
        return "no paper-regime DynamicAttention records to fit"
    head = (
        f"{'tau':>5} {'storage':>8} {'sizes':>14} | {'update fit':>14} {'classical':>9} "
        f"{'best-known':>10} | {'query fit':>14} {'theory':>6} {'paper':>5}"
    )
    lines = [head, "-" * len(head)]

    def show(fit: Mapping[str, Any] | None) -> str:
        if not fit:
            return "n/a"
        err = fit["stderr"]
        return f"{fit['slope']:.2f}" + (f" +/- {err:.2f}" if math.isfinite(err) else "")

    for f in fits:
        sizes = f"{min(f['sizes'])}..{max(f['sizes'])}({len(f['sizes'])})"
        flag = "" if f["reliable"] else "  (fewer than 4 sizes spanning 4x: indicative only)"
        lines.append(
            f"{f['tau']:>5.2f} {str(f['storage']):>8} {sizes:>14} | {show(f['update']):>14} "
            f"{f['theory_update_classical']:>9.3f} {f['theory_update_best']:>10.3f} | "
            f"{show(f['query']):>14} {f['theory_query']:>6.2f} "
            f"{f['theory_query_paper']:>5.2f}{flag}"
        )
    lines.append(
        "classical: omega(1,1,tau)-tau with cubic multiplication (= 2); best-known: with the "
        "VXXZ24/ADVXXZ24 bounds (asymptotic, not what BLAS runs); theory query: tau (O(T) "
        "correction per entry); paper: 1+tau (the paper's worst case)."
    )
    return "\n".join(lines)
