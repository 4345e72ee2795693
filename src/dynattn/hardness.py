"""The paper's conditional lower bound, made executable (docs/hardness.md).

van den Brand, Song and Zhou (arXiv 2304.02207) show that a dynamic attention
structure with amortized update time ``n^(omega(1,1,tau) - tau - eps)`` and query
time ``n^(1 + tau - eps)`` would refute the Hinted Matrix-Vector (Hinted Mv)
conjecture of Brand, Nanongkai and Saranurak. This module runs that reduction:
:class:`HintedMvViaAttention` solves Hinted Mv over the Boolean semiring using
*any* :class:`~dynattn.interface.AttentionMaintainer` (only ``update_k`` and
``query`` are used) as a black box, and :func:`hinted_mv_direct` is the plain
Boolean computation it is checked against.

What this shows, and its status. The reduction is an implication: a fast
dynamic attention structure would be a fast Hinted Mv algorithm. The lower
bound is therefore conditional on the Hinted Mv conjecture (van den Brand,
Nanongkai, Saranurak, FOCS 2019; the variant whose phase-2 hint is a 0/1 matrix
with at most ``n**tau`` nonzeros). A 2026 preprint, Alman and Vassilevska
Williams, *Truly Subquadratic 3SUM and Truly Subcubic APSP via Triangles in
Sparse Lopsided Graphs*, arXiv:2610.06783 (not peer reviewed; with a Lean
formalization), claims in its Corollary 40 and Section 5.4 that these
conjectures, this variant included, fail for ``0 < tau < 1/18`` (and with a
smaller saving for ``tau < ln 4 / (5 ln 10) = 0.1204``), on the word RAM with
0/1 inputs. For those tau the lower bound has no basis left; for larger tau,
including every tau this library measures or tests (0.25 to 1), it stands,
conditional as before. No faster practical algorithm follows: the reduction
runs from attention to Hinted Mv only, and the preprint's algorithm works on
integers and saves at most ``n**0.0035`` through a fast-matrix-multiplication
recursion with large constants. ``docs/hardness.md``, "Status of the
conjecture", says what was verified.

Hinted Mv (Boolean semiring, ``0 < tau <= 1``)
    Phase 1: 0/1 matrices ``M: (n, n)`` and ``V: (n, n)`` (polynomial
    preprocessing). Phase 2: a 0/1 matrix ``P: (n, n)`` with at most
    ``ceil(n**tau)`` nonzero entries. Phase 3: an index ``i``; output the 0/1
    column ``(M P V)[:, i]`` (OR of ANDs).

Encoding (see ``docs/hardness.md`` for the derivation and a worked example).
With a constant ``C > ln 2`` (``logit_gap``, default 4) the attention instance
has ``n`` queries, ``m = 2n + 1`` keys, ``d = n`` key columns and ``e = n``
value columns::

    Q = -C * M                               (n, n)
    K = 0                                    (2n+1, n)   phase 2: K[c, k] = P[k, c]
    V_att[c, :]   = V[c, :]        c < n     real keys: the rows of V
    V_att[n+r, i] = -1             r < s_i   n+1 "dummy" keys, K row 0 forever,
    V_att[n+s_i, i] = 1/2                    s_i = number of ones in V[:, i]
    (all other dummy entries 0)

Phase 2 turns every nonzero ``P[k, c]`` into one ``update_k(c, k, 1.0)``, so
afterwards ``Q K^T = -C * (M P)`` on the real keys and 0 on the dummies. With
``k_lc = (M P)[l, c]`` (an integer count) the row-``l`` weights are
``exp(-C k_lc) <= 1`` for real keys and exactly 1 for the ``n + 1`` dummies, so
the normalizer ``D_l`` lies in ``[n + 1, 2n + 1]`` -- it can neither overflow
nor underflow, however widely the counts differ. The output is::

    O[l, i] = (sum_{c : V[c,i]=1} exp(-C k_lc) - s_i + 1/2) / D_l

If ``(M P V)[l, i] = 0`` every such ``k_lc`` is 0 and the numerator is exactly
``+1/2``; if it is 1 some ``k_lc >= 1`` and the numerator is at most
``-1/2 + exp(-C)``. Phase 3 therefore answers ``(M P V)[l, i] = [O[l, i] < 0]``
from one ``query(l, i)`` per row: ``n`` queries.

Numeric margin. ``|O[l, i]| >= (1/2 - exp(-C)) / (2n + 1)`` (:attr:`HintedMvViaAttention.margin`)
and ``max|V_att[:, i]| <= 1``, so the decision is right whenever the black
box's absolute error is below that margin -- about ``1/(4n)`` in units of
``max|V[:, j]|``. The accuracy target of :class:`~dynattn.DynamicAttention`
(``1e-10`` in float64, ``1e-4`` in float32; docs/accuracy.md) is therefore
enough for ``n < 2.4e9`` in float64 and ``n <= 2407`` in float32 (with the
default ``C = 4``). Because the decision is a sign, it also tolerates any
*relative* error below 100 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from dynattn._validation import check_flag, check_index, check_scalar

__all__ = [
    "DEFAULT_LOGIT_GAP",
    "HintedMvViaAttention",
    "encode_phase1",
    "hinted_mv_direct",
    "max_hint_nonzeros",
]

#: Default ``C``. ``exp(-4) = 0.018`` costs under 4 % of the numerator gap 1/2; an
#: integer, so the logits ``-C * k`` are exact in float32 and float64; and small, because
#: DynamicAttention charges each multiplicative K update a rounding error proportional to
#: ``|delta * Q[:, j]| = C`` and recomputes the key's column from scratch (O(n*d) instead
#: of O(n)) once the charges pass its limit: with C = 10 that happened every ~3 updates of
#: one key in float64, with C = 4 it practically never does.
DEFAULT_LOGIT_GAP = 4.0


# ---------------------------------------------------------------------- validation
def _boolean_matrix(name: str, value: Any, *, n: int | None = None) -> np.ndarray:
    """Return ``value`` as a new square 0/1 ``uint8`` matrix, or raise naming ``name``.

    Accepts bool, integer and float arrays whose entries are all exactly 0 or 1.
    """
    try:
        array = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy raises many types here
        raise TypeError(f"{name}: expected a 0/1 matrix, could not convert it: {exc}") from exc
    if not (
        array.dtype == bool
        or np.issubdtype(array.dtype, np.integer)
        or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(
            f"{name}: expected a 0/1 matrix of bool, integer or float dtype, got dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D 0/1 matrix, got {array.ndim}-D with shape {array.shape}")
    if n is None:
        if array.shape[0] != array.shape[1] or array.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty square (n, n) matrix, got shape {array.shape}")
    elif array.shape != (n, n):
        raise ValueError(f"{name}: expected shape ({n}, {n}) (n from M), got shape {array.shape}")
    bad = ~((array == 0) | (array == 1))
    if bad.any():
        where = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: expected entries 0 or 1 (Boolean semiring), "
            f"got {array[where].item()!r} at {list(where)}"
        )
    return array.astype(np.uint8)  # always a new array


def _check_tau(tau: Any) -> float:
    return check_scalar("tau", tau, low=0.0, high=1.0, include_boundaries="right")


def _check_column_index(i: Any, n: int) -> int:
    return check_index("i", i, n, axis="columns of V")


def max_hint_nonzeros(n: int, tau: float) -> int:
    """Most nonzero entries phase 2 may receive: ``ceil(n**tau)``.

    The tiny relative slack keeps ``ceil`` from rounding an exact power such as
    ``256**0.5 = 16`` up to 17 through floating-point error.
    """
    return max(1, math.ceil(n ** _check_tau(tau) * (1 - 1e-12)))


# ---------------------------------------------------------------------- reference
def hinted_mv_direct(M: Any, V: Any, P: Any, i: Any) -> np.ndarray:
    """The Boolean column ``(M P V)[:, i]`` computed directly (the reference).

    Parameters
    ----------
    M : (n, n) 0/1 array_like
    V : (n, n) 0/1 array_like
    P : (n, n) 0/1 array_like
        Any number of nonzeros (the sparsity bound belongs to the reduction).
    i : int
        Column index, ``0 <= i < n``.

    Returns
    -------
    (n,) uint8 array
        ``out[l] = OR_{k, c} M[l, k] AND P[k, c] AND V[c, i]``.

    Runtime complexity: O(n^2) (two integer matrix-vector products).
    """
    m = _boolean_matrix("M", M)
    n = m.shape[0]
    v = _boolean_matrix("V", V, n=n)
    p = _boolean_matrix("P", P, n=n)
    i = _check_column_index(i, n)
    reach = p.astype(np.int64) @ v[:, i].astype(np.int64)  # counts <= n
    return (m.astype(np.int64) @ (reach > 0).astype(np.int64) > 0).astype(np.uint8)


# ---------------------------------------------------------------------- the reduction
def encode_phase1(
    M: Any, V: Any, *, logit_gap: float = DEFAULT_LOGIT_GAP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase-1 attention inputs for the reduction (see the module docstring).

    Parameters
    ----------
    M : (n, n) 0/1 array_like
    V : (n, n) 0/1 array_like
    logit_gap : float
        ``C``; must exceed ``ln 2`` so that ``exp(-C) < 1/2``.

    Returns
    -------
    Q : (n, n) float64
        ``-C * M``.
    K : (2n + 1, n) float64
        All zeros (phase 2 writes ``P^T`` into the first ``n`` rows).
    V_att : (2n + 1, n) float64
        Rows ``0..n-1`` are ``V``; the ``n + 1`` dummy rows hold ``-1`` in the
        first ``s_i`` places of column ``i`` and ``1/2`` right after them.
    """
    m = _boolean_matrix("M", M)
    n = m.shape[0]
    v = _boolean_matrix("V", V, n=n)
    gap = _check_gap(logit_gap)
    q = np.where(m == 1, -gap, 0.0)  # no negative zeros
    k = np.zeros((2 * n + 1, n))
    ones = v.sum(axis=0).astype(np.int64)  # s_i
    dummies = np.where(np.arange(n + 1)[:, None] < ones[None, :], -1.0, 0.0)
    dummies[ones, np.arange(n)] = 0.5
    v_att = np.vstack([v.astype(np.float64), dummies])
    return q, k, v_att


def _check_gap(logit_gap: Any) -> float:
    """``C`` in ``(ln 2, 1e6]``: above ln 2 so that ``exp(-C) < 1/2``."""
    return check_scalar("logit_gap", logit_gap, low=math.log(2.0), high=1e6, include_boundaries="right")


class HintedMvViaAttention:
    """Hinted Mv (Boolean) solved through a dynamic attention black box.

    Parameters
    ----------
    M : (n, n) 0/1 array_like
        Phase-1 matrix (copied; never modified).
    V : (n, n) 0/1 array_like
        Phase-1 matrix (copied; never modified).
    tau : float in (0, 1], keyword-only
        Sparsity exponent: phase 2 accepts at most ``ceil(n**tau)`` nonzeros.
        Also passed to the attention structure as its laziness exponent.
    attention : callable, keyword-only
        Anything called as ``attention(Q, K, V, tau=tau, scale=1.0, **options)``
        that returns an object with ``update_k(i, j, delta)`` and
        ``query(i, j)``: any :class:`~dynattn.interface.AttentionMaintainer`
        (``DynamicAttention``, a baseline) or anything with those two methods.
        ``None`` (default) means :class:`dynattn.DynamicAttention`, imported
        lazily so this module never depends on it at import time.
    logit_gap : float, keyword-only
        The constant ``C`` (default 4); must exceed ``ln 2``.
    check : bool, keyword-only
        If true (default), phase 3 raises ``ArithmeticError`` when an answer's
        magnitude is below half of :attr:`margin` -- proof that the black box
        erred by more than half the margin, so the sign cannot be trusted.
    **options
        Passed to ``attention`` (e.g. ``dtype``, ``storage``). ``scale`` is
        fixed to 1.0 by the encoding and may not be given.

    Attributes
    ----------
    attention : object
        The black-box instance (``n`` queries, ``2n + 1`` keys, ``d = e = n``).
    updates, queries : int
        Black-box calls made so far by :meth:`hint` and :meth:`column`.

    Runtime complexity: phase 1 is one black-box construction on
    ``(n, n), (2n+1, n), (2n+1, n)`` inputs plus O(n^2); phase 2 is
    ``nnz(P) <= ceil(n**tau)`` calls of ``update_k``; phase 3 is ``n`` calls of
    ``query`` plus O(n).
    """

    def __init__(
        self,
        M: Any,
        V: Any,
        *,
        tau: float,
        attention: Callable[..., Any] | None = None,
        logit_gap: float = DEFAULT_LOGIT_GAP,
        check: bool = True,
        **options: Any,
    ):
        self._tau = _check_tau(tau)
        q, k, v_att = encode_phase1(M, V, logit_gap=logit_gap)
        self._n = q.shape[0]
        self._gap = _check_gap(logit_gap)
        self._check = check_flag("check", check)
        self._max_nonzeros = max_hint_nonzeros(self._n, self._tau)
        if "scale" in options:
            raise ValueError(
                f"options: the encoding fixes scale=1.0 (the gap lives in Q = -C*M); "
                f"got scale={options['scale']!r}; pass logit_gap=... to change C instead"
            )
        if attention is None:
            from dynattn.structure import DynamicAttention

            attention = DynamicAttention
        if not callable(attention):
            raise TypeError(
                f"attention: expected a class or factory with the DynamicAttention constructor, "
                f"got {type(attention).__name__} {attention!r}"
            )
        self.attention = attention(q, k, v_att, tau=self._tau, scale=1.0, **options)
        for method in ("update_k", "query"):
            if not callable(getattr(self.attention, method, None)):
                raise TypeError(
                    f"attention: expected the constructed object to have a {method}() method, "
                    f"got {type(self.attention).__name__} without one"
                )
        self._hinted = False
        self.updates = 0
        self.queries = 0

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Problem size ``n``."""
        return self._n

    @property
    def tau(self) -> float:
        """Sparsity exponent ``tau``."""
        return self._tau

    @property
    def logit_gap(self) -> float:
        """The encoding constant ``C``."""
        return self._gap

    @property
    def max_nonzeros(self) -> int:
        """Most nonzeros :meth:`hint` accepts, ``ceil(n**tau)``."""
        return self._max_nonzeros

    @property
    def hinted(self) -> bool:
        """Whether phase 2 (:meth:`hint`) has run."""
        return self._hinted

    @property
    def margin(self) -> float:
        """Smallest possible ``|O[l, i]|``: ``(1/2 - exp(-C)) / (2n + 1)``.

        An answer is decoded correctly whenever the black box's absolute
        error is below this (``max|V_att[:, i]| <= 1``, so this is also the
        tolerance in units of the value scale).
        """
        return (0.5 - math.exp(-self._gap)) / (2 * self._n + 1)

    # ------------------------------------------------------------------ phases
    def hint(self, P: Any) -> None:
        """Phase 2: one ``update_k(c, k, 1.0)`` per nonzero ``P[k, c]``.

        Parameters
        ----------
        P : (n, n) 0/1 array_like
            At most :attr:`max_nonzeros` nonzero entries (copied; never modified).

        Raises
        ------
        TypeError, ValueError
            ``P`` is not a 0/1 ``(n, n)`` matrix or has too many nonzeros.
        RuntimeError
            Phase 2 already ran (the hint is given once).

        Runtime complexity: ``nnz(P)`` black-box updates plus O(n^2) to scan ``P``.
        """
        if self._hinted:
            raise RuntimeError("hint: phase 2 already ran; build a new instance for a new hint P")
        p = _boolean_matrix("P", P, n=self._n)
        rows, cols = np.nonzero(p)
        if rows.size > self._max_nonzeros:
            raise ValueError(
                f"P: expected at most ceil(n**tau) = {self._max_nonzeros} nonzero entries "
                f"(n={self._n}, tau={self._tau:g}), got {rows.size}"
            )
        for k, c in zip(rows.tolist(), cols.tolist(), strict=True):
            # K[c, k] = P[k, c]: then (Q K^T)[l, c] = -C * sum_k M[l, k] P[k, c]
            self.attention.update_k(c, k, 1.0)
            self.updates += 1
        self._hinted = True

    def column(self, i: Any) -> np.ndarray:
        """Phase 3: the Boolean column ``(M P V)[:, i]`` from ``n`` queries.

        Parameters
        ----------
        i : int
            Column index, ``0 <= i < n``.

        Returns
        -------
        (n,) uint8 array of 0/1.

        Raises
        ------
        RuntimeError
            :meth:`hint` has not run yet.
        ArithmeticError
            (only with ``check=True``) an answer was too close to 0 to decode,
            i.e. the black box erred by more than half of :attr:`margin`.

        Runtime complexity: ``n`` black-box queries plus O(n).
        """
        if not self._hinted:
            raise RuntimeError("column: call hint(P) (phase 2) before column(i) (phase 3)")
        i = _check_column_index(i, self._n)
        out = np.zeros(self._n, dtype=np.uint8)
        half_margin = 0.5 * self.margin
        for row in range(self._n):
            answer = float(self.attention.query(row, i))
            self.queries += 1
            if self._check and not abs(answer) >= half_margin:
                raise ArithmeticError(
                    f"attention.query({row}, {i}) = {answer!r} is within half the decoding margin "
                    f"({self.margin:.3g}) of 0: the black box's error is too large to decode"
                )
            out[row] = answer < 0
        return out

    def __repr__(self) -> str:
        return (
            f"HintedMvViaAttention(n={self._n}, tau={self._tau:g}, logit_gap={self._gap:g}, "
            f"attention={type(self.attention).__name__}, hinted={self._hinted})"
        )
