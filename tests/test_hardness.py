"""Tests for dynattn.hardness: Hinted Mv (Boolean) solved through attention black boxes.

Every decoded column is compared with :func:`hinted_mv_direct`. float32 runs
everywhere: the decoding margin ``(1/2 - e^-C)/(2n+1)`` stays above the
float32 accuracy target (1e-4 of ``max|V[:, j]| <= 1``, docs/accuracy.md) for
every ``n <= 2407`` (default C = 4), so no float32 case needs to be skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynattn import DynamicAttention
from dynattn.baselines import Eager, OnDemand, Recompute
from dynattn.hardness import (
    DEFAULT_LOGIT_GAP,
    HintedMvViaAttention,
    encode_phase1,
    hinted_mv_direct,
    max_hint_nonzeros,
)
from dynattn.testing import reference_attention

TAUS = (0.25, 0.5, 1.0)


# ---------------------------------------------------------------------- helpers
class BruteForceAttention:
    """A minimal black box with the DynamicAttention interface (float64, a row per query)."""

    def __init__(self, Q, K, V, *, tau=0.5, scale=1.0, dtype=np.float64, **ignored):
        self.Q = np.array(Q, dtype=np.float64)
        self.K = np.array(K, dtype=np.float64)
        self.V = np.array(V, dtype=np.float64)
        self.scale = float(scale)

    def update_k(self, i, j, delta):
        self.K[i, j] += delta

    def update_v(self, i, j, delta):
        self.V[i, j] += delta

    def query(self, i, j):
        logits = self.scale * (self.K @ self.Q[i])
        weights = np.exp(logits - logits.max())
        return float(weights @ self.V[:, j] / weights.sum())


class NoisyAttention(BruteForceAttention):
    """Brute force plus an adversarial absolute error of ``noise`` pushing answers toward 0."""

    noise = 0.0

    def query(self, i, j):
        exact = super().query(i, j)
        return exact - math.copysign(self.noise, exact)


class ShrunkAttention(BruteForceAttention):
    """Answers 100 times too small: every one lands within half the margin of 0."""

    def query(self, i, j):
        return super().query(i, j) / 100


def random_instance(n, tau, *, density_m=0.3, density_v=0.3, fill=1.0, seed=0):
    """0/1 ``M, V: (n, n)`` and a ``P: (n, n)`` with ``round(fill * ceil(n**tau))`` nonzeros."""
    rng = np.random.default_rng(seed)
    M = (rng.random((n, n)) < density_m).astype(np.int8)
    V = (rng.random((n, n)) < density_v).astype(np.int8)
    P = np.zeros((n, n), dtype=np.int8)
    nnz = int(round(fill * max_hint_nonzeros(n, tau)))
    P.flat[rng.choice(n * n, size=nnz, replace=False)] = 1
    return M, V, P


def solve_all(M, V, P, tau, columns=None, **kwargs):
    """Run the three phases; return the solver and the decoded columns as an (n, k) array."""
    solver = HintedMvViaAttention(M, V, tau=tau, **kwargs)
    solver.hint(P)
    cols = range(np.shape(M)[0]) if columns is None else columns
    return solver, np.stack([solver.column(i) for i in cols], axis=1)


def direct_all(M, V, P, columns=None):
    cols = range(M.shape[0]) if columns is None else columns
    return np.stack([hinted_mv_direct(M, V, P, i) for i in cols], axis=1)


def boolean_product(M, P, V):
    """(M P V) over the Boolean semiring by a different route (whole matrix, bool matmuls)."""
    mp = (M.astype(np.int64) @ P.astype(np.int64)) > 0
    return ((mp.astype(np.int64) @ V.astype(np.int64)) > 0).astype(np.uint8)


BLACK_BOXES = {
    "dynamic-dense-f64": dict(attention=DynamicAttention, storage="dense", dtype=np.float64),
    "dynamic-implicit-f64": dict(attention=DynamicAttention, storage="implicit", dtype=np.float64),
    "dynamic-dense-f32": dict(attention=DynamicAttention, storage="dense", dtype=np.float32),
    "dynamic-implicit-f32": dict(attention=DynamicAttention, storage="implicit", dtype=np.float32),
    "recompute-f64": dict(attention=Recompute, dtype=np.float64),
    "recompute-f32": dict(attention=Recompute, dtype=np.float32),
    "ondemand-f64": dict(attention=OnDemand, dtype=np.float64),
    "ondemand-f32": dict(attention=OnDemand, dtype=np.float32),
    "eager-f64": dict(attention=Eager, dtype=np.float64),
    "eager-f32": dict(attention=Eager, dtype=np.float32),
    "bruteforce": dict(attention=BruteForceAttention),
}


# ---------------------------------------------------------------------- the reference
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
)
def test_direct_matches_definition(n, seed, density):
    rng = np.random.default_rng(seed)
    M, V, P = ((rng.random((n, n)) < density).astype(int) for _ in range(3))
    full = boolean_product(M, P, V)
    for i in range(n):
        expected = [
            int(any(M[r, k] and P[k, c] and V[c, i] for k in range(n) for c in range(n))) for r in range(n)
        ]
        got = hinted_mv_direct(M, V, P, i)
        assert got.dtype == np.uint8 and got.shape == (n,)
        assert got.tolist() == expected == full[:, i].tolist()


def test_encoding_numerators_are_exactly_as_documented():
    """O[l, i] * D_l is +1/2 for a 0 answer and <= -1/2 + e^-C for a 1; D_l in [n+1, 2n+1]."""
    n, tau = 24, 1.0
    M, V, P = random_instance(n, tau, density_m=0.5, density_v=0.4, seed=3)
    Q, K, V_att = encode_phase1(M, V)
    assert Q.shape == (n, n) and K.shape == (2 * n + 1, n) and V_att.shape == (2 * n + 1, n)
    assert np.abs(V_att).max() <= 1.0
    K = K.copy()
    K[:n] = P.T  # what phase 2's updates produce
    logits = Q @ K.T
    D = np.exp(logits).sum(axis=1)
    assert np.all((D >= n + 1) & (D <= 2 * n + 1))
    out = reference_attention(Q, K, V_att)
    numerators = out * D[:, None]
    truth = boolean_product(M, P, V)
    gap = math.exp(-DEFAULT_LOGIT_GAP)
    np.testing.assert_allclose(numerators[truth == 0], 0.5, rtol=1e-12)
    assert np.all(numerators[truth == 1] <= -0.5 + gap + 1e-12)
    solver = HintedMvViaAttention(M, V, tau=tau, attention=BruteForceAttention)
    assert np.abs(out).min() >= solver.margin * (1 - 1e-12)


# ---------------------------------------------------------------------- black boxes
@pytest.mark.parametrize("box", list(BLACK_BOXES))
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_every_black_box_decodes_every_column(box, tau, density):
    n = 20
    M, V, P = random_instance(n, tau, density_m=density, density_v=density, seed=int(tau * 8))
    solver, got = solve_all(M, V, P, tau, **BLACK_BOXES[box])
    assert np.array_equal(got, direct_all(M, V, P))
    assert solver.updates == int(P.sum()) <= solver.max_nonzeros
    assert solver.queries == n * n


@pytest.mark.parametrize("box", [b for b in BLACK_BOXES if b.startswith("dynamic")])
@pytest.mark.parametrize("tau", TAUS)
def test_n256_dynamic_attention(box, tau):
    n = 256
    M, V, P = random_instance(n, tau, density_m=0.05, density_v=0.05, seed=256)
    columns = None if tau == 1.0 else range(0, n, 16)  # tau = 1: all 256 columns
    solver, got = solve_all(M, V, P, tau, columns=columns, **BLACK_BOXES[box])
    expected = direct_all(M, V, P, columns=columns)
    assert expected.any() and not expected.all()  # a nontrivial instance
    assert np.array_equal(got, expected)
    assert solver.updates == max_hint_nonzeros(n, tau)


@pytest.mark.parametrize(
    "box", ["recompute-f64", "recompute-f32", "ondemand-f64", "ondemand-f32", "eager-f64", "eager-f32"]
)
@pytest.mark.parametrize("tau", [0.25, 0.5])
def test_n256_baselines(box, tau):
    n = 256
    M, V, P = random_instance(n, tau, density_m=0.05, density_v=0.05, seed=257)
    columns = range(3, n, 32)
    _, got = solve_all(M, V, P, tau, columns=columns, **BLACK_BOXES[box])
    assert np.array_equal(got, direct_all(M, V, P, columns=columns))


@pytest.mark.parametrize("box", ["recompute-f64", "ondemand-f32", "eager-f64", "eager-f32"])
def test_n96_baselines(box):
    n, tau = 96, 1.0
    M, V, P = random_instance(n, tau, density_m=0.1, density_v=0.1, seed=96)
    columns = range(0, n, 7)
    _, got = solve_all(M, V, P, tau, columns=columns, **BLACK_BOXES[box])
    assert np.array_equal(got, direct_all(M, V, P, columns=columns))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 9),
    tau=st.sampled_from(TAUS),
    dtype=st.sampled_from([np.float64, np.float32]),
    storage=st.sampled_from(["dense", "implicit"]),
)
def test_hypothesis_instances(data, n, tau, dtype, storage):
    bits = st.lists(st.integers(0, 1), min_size=n * n, max_size=n * n)
    M = np.array(data.draw(bits, label="M")).reshape(n, n)
    V = np.array(data.draw(bits, label="V")).reshape(n, n)
    cells = data.draw(st.sets(st.integers(0, n * n - 1), max_size=max_hint_nonzeros(n, tau)), label="P")
    P = np.zeros((n, n), dtype=int)
    P.flat[sorted(cells)] = 1
    _, got = solve_all(M, V, P, tau, attention=DynamicAttention, dtype=dtype, storage=storage)
    assert np.array_equal(got, boolean_product(M, P, V))


# ---------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("box", ["dynamic-dense-f64", "dynamic-implicit-f32", "ondemand-f32"])
@pytest.mark.parametrize("n", [1, 2, 16])
def test_all_zero_and_all_one(box, n):
    tau = 1.0
    zero, one = np.zeros((n, n), dtype=int), np.ones((n, n), dtype=int)
    full_p = np.zeros((n, n), dtype=int)
    full_p.flat[: max_hint_nonzeros(n, tau)] = 1  # the densest allowed hint
    cases = [
        (zero, zero, zero, 0),
        (one, one, zero, 0),  # no hint: MPV = 0
        (one, one, full_p, 1),  # every row and column reached
        (zero, one, full_p, 0),
        (one, zero, full_p, 0),
    ]
    for M, V, P, value in cases:
        _, got = solve_all(M, V, P, tau, **BLACK_BOXES[box])
        assert np.all(got == value)
        assert np.array_equal(got, direct_all(M, V, P))


def staircase_instance(n, tau, seed):
    """Hinted counts that differ widely within one row: key c gets c nonzeros in P."""
    rng = np.random.default_rng(seed)
    budget = max_hint_nonzeros(n, tau)
    P = np.zeros((n, n), dtype=int)
    c, used = 1, 0
    while c < n and used + c <= budget:
        P[rng.choice(n, size=c, replace=False), c] = 1
        used += c
        c += 1
    M = np.ones((n, n), dtype=int)
    M[n // 2 :] = (rng.random((n - n // 2, n)) < 0.5).astype(int)  # counts vary by row too
    V = (rng.random((n, n)) < 0.1).astype(int)
    V[:, 0] = 0
    V[1, 0] = 1  # column 0 hangs on key 1 only (count <= 1) while key c-1 has count up to c-1
    return M, V, P, c - 1


@pytest.mark.parametrize("box", list(BLACK_BOXES))
def test_widely_differing_counts(box):
    n, tau = 64, 1.0
    M, V, P, top = staircase_instance(n, tau, seed=11)
    counts = M @ P
    assert top >= 10 and counts.max() >= 10  # weights e^(-C k) for k = 0..>=10 in one row
    _, got = solve_all(M, V, P, tau, **BLACK_BOXES[box])
    assert np.array_equal(got, direct_all(M, V, P))
    assert got[: n // 2, 0].all()  # the count-1 key decides column 0 for the all-one rows


@pytest.mark.parametrize("gap", [DEFAULT_LOGIT_GAP, 50.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_widely_differing_counts_n256(dtype, gap):
    n, tau = 256, 1.0
    M, V, P, top = staircase_instance(n, tau, seed=5)
    # weights e^(-C k) for k = 0..22 in one row: down to e^-88 (subnormal in float32)
    # with C = 4, and to exact zeros in both dtypes with C = 50
    assert (M @ P).max() == top == 22
    columns = [0, *range(1, n, 23)]
    for storage in ("dense", "implicit"):
        _, got = solve_all(
            M,
            V,
            P,
            tau,
            columns=columns,
            attention=DynamicAttention,
            dtype=dtype,
            storage=storage,
            logit_gap=gap,
        )
        assert np.array_equal(got, direct_all(M, V, P, columns=columns))


@pytest.mark.parametrize("storage", ["dense", "implicit"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_folds_during_and_after_phase2(storage, dtype):
    """A lazier-than-needed structure (its own tau/3) folds several times inside phase 2."""
    n, tau = 64, 1.0

    def eager_ish(Q, K, V, *, tau, **options):
        return DynamicAttention(Q, K, V, tau=tau / 3, **options)

    M, V, P, _ = staircase_instance(n, tau, seed=8)
    solver = HintedMvViaAttention(M, V, tau=tau, attention=eager_ish, storage=storage, dtype=dtype)
    solver.hint(P)
    assert solver.attention.stats["folds"] >= 5
    got = np.stack([solver.column(i) for i in range(n)], axis=1)
    assert np.array_equal(got, direct_all(M, V, P))
    solver.attention.rebuild()  # the amortized charge, paid: answers stay the same
    assert solver.attention.pending == 0
    again = np.stack([solver.column(i) for i in range(n)], axis=1)
    assert np.array_equal(again, got)


@pytest.mark.parametrize("gap", [0.7, 2.0, 10.0, 50.0])
def test_other_logit_gaps(gap):
    n, tau = 16, 0.5
    M, V, P = random_instance(n, tau, density_m=0.6, density_v=0.3, seed=2)
    for dtype in (np.float64, np.float32):
        solver, got = solve_all(M, V, P, tau, attention=DynamicAttention, dtype=dtype, logit_gap=gap)
        assert solver.logit_gap == gap
        assert np.array_equal(got, direct_all(M, V, P))


# ---------------------------------------------------------------------- the margin
def test_errors_below_the_margin_are_harmless():
    n, tau = 12, 1.0
    M, V, P = random_instance(n, tau, density_m=0.5, density_v=0.5, seed=7)
    solver = HintedMvViaAttention(M, V, tau=tau, attention=NoisyAttention, check=False)
    solver.attention.noise = 0.99 * solver.margin
    solver.hint(P)
    got = np.stack([solver.column(i) for i in range(n)], axis=1)
    assert np.array_equal(got, boolean_product(M, P, V))
    assert solver.margin == pytest.approx((0.5 - math.exp(-DEFAULT_LOGIT_GAP)) / (2 * n + 1))


def test_check_flags_a_black_box_that_is_too_inaccurate():
    n, tau = 12, 1.0
    M, V, P = random_instance(n, tau, seed=7)
    solver = HintedMvViaAttention(M, V, tau=tau, attention=ShrunkAttention)
    solver.hint(P)
    with pytest.raises(ArithmeticError, match="margin"):
        solver.column(0)
    solver = HintedMvViaAttention(M, V, tau=tau, attention=ShrunkAttention, check=False)
    solver.hint(P)
    solver.column(0)  # decodes (the sign survives shrinking), but could not vouch for it


def test_float32_margin_beats_spec_target_up_to_documented_n():
    gap = math.exp(-DEFAULT_LOGIT_GAP)
    assert (0.5 - gap) / (2 * 2407 + 1) > 1e-4 > (0.5 - gap) / (2 * 2408 + 1)


# ---------------------------------------------------------------------- phases and counts
def test_phase_counts_and_laziness():
    n, tau = 32, 0.5
    M, V, P = random_instance(n, tau, seed=1)
    solver = HintedMvViaAttention(M, V, tau=tau, storage="dense")
    assert isinstance(solver.attention, DynamicAttention)
    assert (solver.attention.n, solver.attention.m) == (n, 2 * n + 1)
    assert solver.max_nonzeros == 6 and not solver.hinted
    solver.hint(P)
    assert solver.hinted and solver.updates == 6
    assert solver.attention.pending == 6  # T = ceil(65**0.5) = 9: nothing folded yet
    solver.column(3)
    assert solver.queries == n
    assert "n=32" in repr(solver)


def test_max_hint_nonzeros():
    assert max_hint_nonzeros(256, 0.5) == 16
    assert max_hint_nonzeros(256, 0.25) == 4
    assert max_hint_nonzeros(1000, 1 / 3) == 10
    assert max_hint_nonzeros(10, 0.5) == 4
    assert max_hint_nonzeros(1, 0.5) == 1


def test_inputs_are_never_modified():
    n, tau = 10, 1.0
    M, V, P = random_instance(n, tau, seed=4)
    copies = [x.copy() for x in (M, V, P)]
    for x in (M, V, P):
        x.flags.writeable = False
    solver = HintedMvViaAttention(M, V, tau=tau)
    solver.hint(P)
    solver.column(0)
    hinted_mv_direct(M, V, P, 1)
    for x, c in zip((M, V, P), copies, strict=True):
        assert np.array_equal(x, c)


def test_accepts_bool_and_float_and_lists():
    M = [[True, False], [True, True]]
    V = np.array([[0.0, 1.0], [1.0, 0.0]])
    P = [[0, 1], [0, 0]]
    solver, got = solve_all(M, V, P, 1.0)
    assert got.tolist() == boolean_product(np.array(M), np.array(P), V).tolist()


# ---------------------------------------------------------------------- bad input
def make(n=4, tau=0.5, **kwargs):
    M, V, _ = random_instance(n, tau, seed=0)
    return HintedMvViaAttention(M, V, tau=tau, **kwargs)


def test_too_many_nonzeros():
    solver = make(n=16, tau=0.5)
    P = np.zeros((16, 16), dtype=int)
    P.flat[:5] = 1
    with pytest.raises(ValueError, match=r"P: expected at most ceil\(n\*\*tau\) = 4 .*got 5"):
        solver.hint(P)
    assert not solver.hinted and solver.updates == 0 and solver.attention.pending == 0
    P.flat[4] = 0
    solver.hint(P)  # exactly the bound is fine


@pytest.mark.parametrize("value", [2, -1, 0.5, np.nan, np.inf])
@pytest.mark.parametrize("name", ["M", "V", "P"])
def test_non_boolean_entries(name, value):
    n = 4
    M, V, P = (np.zeros((n, n)) for _ in range(3))
    {"M": M, "V": V, "P": P}[name][1, 2] = value
    with pytest.raises(ValueError, match=rf"{name}: expected entries 0 or 1.*at \[1, 2\]"):
        solver = HintedMvViaAttention(M, V, tau=1.0)
        solver.hint(P)
    with pytest.raises(ValueError, match=rf"{name}: expected entries 0 or 1"):
        hinted_mv_direct(M, V, P, 0)


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((4, 5), r"expected shape \(4, 4\).*got shape \(4, 5\)"),
        ((3, 3), r"got shape \(3, 3\)"),
        ((16,), r"expected a 2-D 0/1 matrix, got 1-D"),
        ((2, 4, 4), r"got 3-D"),
    ],
)
def test_wrong_shapes(shape, pattern):
    solver = make(n=4)
    with pytest.raises(ValueError, match=rf"P: .*{pattern}"):
        solver.hint(np.zeros(shape))
    with pytest.raises(ValueError, match=rf"V: .*{pattern}"):
        HintedMvViaAttention(np.zeros((4, 4)), np.zeros(shape), tau=1.0)
    with pytest.raises(ValueError, match=rf"P: .*{pattern}"):
        hinted_mv_direct(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros(shape), 0)


def test_bad_m_and_dtypes():
    with pytest.raises(ValueError, match=r"M: expected a non-empty square.*\(3, 4\)"):
        HintedMvViaAttention(np.zeros((3, 4)), np.zeros((3, 3)), tau=1.0)
    with pytest.raises(ValueError, match=r"M: expected a non-empty square.*\(0, 0\)"):
        HintedMvViaAttention(np.zeros((0, 0)), np.zeros((0, 0)), tau=1.0)
    with pytest.raises(TypeError, match=r"M: expected a 0/1 matrix.*complex"):
        HintedMvViaAttention(np.zeros((2, 2), dtype=complex), np.zeros((2, 2)), tau=1.0)
    with pytest.raises(TypeError, match=r"P: expected a 0/1 matrix.*got dtype <U1"):
        make(n=2).hint([["0", "1"], ["1", "0"]])


@pytest.mark.parametrize(
    "tau, error",
    [
        (0, ValueError),
        (1.5, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.5", TypeError),
    ],
)
def test_bad_tau(tau, error):
    with pytest.raises(error, match=r"tau: expected"):
        make(tau=tau)
    with pytest.raises(error, match=r"tau: expected"):
        max_hint_nonzeros(4, tau)


def test_bad_column_index_and_phase_order():
    solver = make(n=4)
    with pytest.raises(RuntimeError, match=r"column: call hint\(P\)"):
        solver.column(0)
    solver.hint(np.zeros((4, 4)))
    with pytest.raises(RuntimeError, match="hint: phase 2 already ran"):
        solver.hint(np.zeros((4, 4)))
    with pytest.raises(IndexError, match=r"i=4 is out of range: expected 0 <= i < 4"):
        solver.column(4)
    with pytest.raises(IndexError, match=r"i=-1 is out of range"):
        solver.column(-1)
    with pytest.raises(TypeError, match=r"i: expected an integer index, got float"):
        solver.column(1.0)
    with pytest.raises(TypeError, match=r"i: expected an integer index, got bool"):
        hinted_mv_direct(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), True)
    assert solver.column(np.int64(2)).tolist() == [0, 0, 0, 0]


def test_bad_options():
    with pytest.raises(ValueError, match=r"options: the encoding fixes scale=1.0.*got scale=0.5"):
        make(scale=0.5)
    with pytest.raises(ValueError, match=r"logit_gap: expected a number in \(0\.693147\d*, 1000000\]"):
        make(logit_gap=0.5)
    with pytest.raises(TypeError, match=r"logit_gap: expected a real number"):
        make(logit_gap="10")
    with pytest.raises(TypeError, match=r"attention: expected a class or factory"):
        make(attention="DynamicAttention")
    with pytest.raises(TypeError, match=r"attention: expected the constructed object to have"):
        make(attention=lambda *a, **k: object())
    with pytest.raises(ValueError, match=r"storage: expected one of"):
        make(storage="sparse")  # options go to the black box, which validates them
