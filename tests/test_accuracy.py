"""Certified accuracy (docs/accuracy.md): adversarial workloads and a long soak.

Every answer is compared with the float64 reference (extended precision where
the logits are so large that float64 rounding of the logit itself matters), with
the allowance ``4 * err_naive + target * max|V[:, j]|`` of dynattn.testing.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _schedules import AUTO_AWAKE, build, tau_schedule_pairs, tau_schedules
from dynattn import DynamicAttention
from dynattn.baselines import Eager, OnDemand, Recompute, Rows
from dynattn.testing import (
    TARGET,
    as_numpy,
    assert_attention_close,
    reference_attention,
    value_scale,
)

STORAGES = ["dense", "implicit"]
DTYPES = [np.float64, np.float32]
TAUS = [0.0, 0.5, 1.0, "auto", AUTO_AWAKE]


def dominant_key_problem(n, extra_keys, big, e, seed):
    """Row i's weight sits almost entirely on key i (logit ``big``); other keys are small."""
    rng = np.random.default_rng(seed)
    Q = np.eye(n)
    K = np.vstack([big * np.eye(n), rng.standard_normal((extra_keys, n)) * 0.3])
    V = rng.standard_normal((n + extra_keys, e))
    return Q, K, V


def check_all_answers(att, Q, K, V, *, scale=1.0, precise=False):
    """Entry queries for every row/column, plus the full output, against the reference."""
    dt = att.dtype
    reference = reference_attention(Q, K, V, scale=scale, precise=precise)
    n, e = reference.shape
    rows, cols = np.divmod(np.arange(n * e), e)
    answers = np.array([att.query(int(i), int(j)) for i, j in zip(rows, cols, strict=True)])
    worst = assert_attention_close(answers, Q, K, V, scale=scale, dtype=dt, rows=rows, cols=cols)
    assert_attention_close(as_numpy(att.output()), Q, K, V, scale=scale, dtype=dt)
    # the target itself, against the exact reference (the naive error is only slack on top)
    err = np.abs(answers - reference[rows, cols]) / value_scale(V)[cols]
    naive_slack = (
        4 * np.abs(_naive(Q, K, V, scale, dt)[rows, cols] - reference[rows, cols]) / value_scale(V)[cols]
    )
    assert np.all(err <= TARGET[np.dtype(dt)] + naive_slack)
    return worst


def _naive(Q, K, V, scale, dt):
    from dynattn.testing import naive_attention

    with np.errstate(over="ignore", invalid="ignore"):
        out = naive_attention(Q, K, V, scale=scale, dtype=dt).astype(np.float64)
    return np.where(np.isfinite(out), out, 0.0)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules(TAUS))
def test_dominant_key_moved_away_repeatedly(storage, dtype, tau, schedule):
    """(a) Cancellation: den = Z + (a_new - a_old) subtracts two nearly equal numbers."""
    n, big = 9, 40.0
    Q, K, V = dominant_key_problem(n, extra_keys=14, big=big, e=3, seed=1)
    att = build(Q, K, V, tau=tau, storage=storage, dtype=dtype, schedule=schedule)
    K = K.astype(dtype)
    Q, V = Q.astype(dtype), V.astype(dtype)
    for rep in range(6):
        for i in range(n):
            delta = -2 * big if rep % 2 == 0 else 2 * big
            att.update_k(i, i, delta)
            K[i, i] += dtype(delta)
            att._check()
            check_all_answers(att, Q, K, V)
    assert att.stats["query_fallbacks"] + att.stats["rows_refreshed"] > n


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules(TAUS))
def test_one_dominant_key_for_all_rows_removed(storage, tau, schedule):
    """(a) Every row's weight on one key, which then moves away by 1e3 logits."""
    rng = np.random.default_rng(4)
    n, m, d, e = 11, 17, 3, 4
    Q = np.abs(rng.standard_normal((n, d))) + 0.5
    K = rng.standard_normal((m, d)) * 0.1
    K[5] = 30.0
    V = rng.standard_normal((m, e))
    att = build(Q, K, V, tau=tau, storage=storage, schedule=schedule)
    for _ in range(3):
        for j in range(d):
            att.update_k(5, j, -1000.0)
            K[5, j] -= 1000.0
            check_all_answers(att, Q, K, V)
        for j in range(d):
            att.update_k(5, j, 1000.0)
            K[5, j] += 1000.0
            check_all_answers(att, Q, K, V)
        att._check()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules(TAUS))
def test_huge_logits(storage, dtype, tau, schedule):
    """(b) Logits of magnitude 1e3-1e4 (float64) and 100-1e3 (float32): no inf/NaN."""
    rng = np.random.default_rng(7)
    n, m, d, e = 13, 19, 4, 3
    magnitude = 1e4 if dtype == np.float64 else 1e3
    Q = rng.standard_normal((n, d))
    K = rng.standard_normal((m, d)) * magnitude / 2
    V = rng.standard_normal((m, e))
    att = build(Q, K, V, tau=tau, storage=storage, dtype=dtype, schedule=schedule)
    Q, K, V = (x.astype(dtype) for x in (Q, K, V))
    K = K.copy()
    V = V.copy()
    for step in range(40):
        c, j = int(rng.integers(m)), int(rng.integers(d))
        delta = float(rng.normal(0, magnitude / 4))
        att.update_k(c, j, delta)
        K[c, j] += dtype(delta)
        if step % 3 == 0:
            c, j = int(rng.integers(m)), int(rng.integers(e))
            att.update_v(c, j, 1.0)
            V[c, j] += dtype(1.0)
        att._check()
        check_all_answers(att, Q, K, V, precise=True)
    assert np.all(np.isfinite(as_numpy(att.output())))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_beyond_exp_overflow_trigger_rescaling(storage, dtype):
    """(b) A key update that pushes a logit far above the stabilizer rescales the row."""
    Q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    K = np.zeros((4, 2))
    V = np.arange(8.0).reshape(4, 2)
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, dtype=dtype)
    for c, step in [(0, 500.0), (1, 800.0), (0, 300.0), (2, 2000.0)]:
        att.update_k(c, c % 2, step)
        K[c, c % 2] += step
        att._check()
        check_all_answers(att, Q, K, V)
    assert att.stats["rows_rescaled"] > 0


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules(TAUS))
def test_values_with_huge_dynamic_range_and_cancelling_numerators(storage, dtype, tau, schedule):
    """(c) Values spanning 1e-8..1e8 and answers near zero by cancellation; then the
    huge values are removed (the snapshot held them)."""
    rng = np.random.default_rng(11)
    n, m, d, e = 10, 16, 3, 4
    Q = rng.standard_normal((n, d)) * 0.1
    K = rng.standard_normal((m, d)) * 0.1
    span = 1e8 if dtype == np.float64 else 1e4
    V = rng.standard_normal((m, e)) * np.logspace(-np.log10(span), np.log10(span), m)[:, None]
    V[1::2] = -V[0::2]  # pairs that nearly cancel
    att = build(Q, K, V, tau=tau, storage=storage, dtype=dtype, schedule=schedule)
    Q, K, V = (x.astype(dtype).copy() for x in (Q, K, V))
    check_all_answers(att, Q, K, V)
    # shrink the largest values by many orders of magnitude, entry by entry
    for c in range(m - 4, m):
        for j in range(e):
            delta = -float(V[c, j]) * (1 - 1e-6)
            att.update_v(c, j, delta)
            V[c, j] += dtype(delta)
            att._check()
            check_all_answers(att, Q, K, V)


#: updates of the soak per (backend, schedule): the drift under test is the same code on
#: both backends, a torch call costs several numpy calls, and at these sizes a spread
#: update folds a slice at every update, so those soak shorter (and the long fuzz profile
#: runs spread sequences far longer)
SOAK_UPDATES = {
    ("numpy", "amortized"): 100_000,
    ("numpy", "spread"): 25_000,
    ("torch", "amortized"): 20_000,
    ("torch", "spread"): 10_000,
}


@pytest.mark.parametrize("schedule", ["amortized", "spread"])
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soak_100k_updates(storage, dtype, schedule, backend):
    """(d) >= 100,000 random updates (numpy, amortized; fewer elsewhere, SOAK_UPDATES) with
    queries sampled along the way: no drift."""
    rng = np.random.default_rng(2024)
    n, m, d, e = 12, 16, 4, 3
    Q = rng.standard_normal((n, d))
    K = rng.standard_normal((m, d))
    V = rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, tau=0.5, storage=storage, dtype=dtype, schedule=schedule)
    Q, K, V = (x.astype(dtype).copy() for x in (Q, K, V))
    total = SOAK_UPDATES[backend, schedule]
    rows = rng.integers(m, size=total)
    cols = rng.integers(d, size=total)
    deltas = rng.normal(0, 0.3, size=total)
    is_key = rng.random(total) < 0.6
    worst = 0.0
    for step in range(total):
        c, j, delta = int(rows[step]), int(cols[step]), float(deltas[step])
        # keep entries bounded so the workload stays stationary
        if is_key[step]:
            delta -= 0.01 * float(K[c, j])
            att.update_k(c, j, delta)
            K[c, j] += dtype(delta)
        else:
            j %= e
            delta -= 0.01 * float(V[c, j])
            att.update_v(c, j, delta)
            V[c, j] += dtype(delta)
        if step % 5_000 == 4_999:
            worst = max(worst, check_all_answers(att, Q, K, V))
            att._check()
    assert worst <= TARGET[np.dtype(dtype)]
    assert att.stats["folds"] >= total // (2 * att.threshold)


@given(
    steps=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([-60.0, -20.0, -1.0, 1.0, 20.0, 60.0])),
        min_size=1,
        max_size=25,
    ),
    tau_schedule=st.sampled_from(tau_schedule_pairs(TAUS)),
    storage=st.sampled_from(STORAGES),
    dtype=st.sampled_from(DTYPES),
)
def test_hypothesis_adversarial_key_moves(steps, tau_schedule, storage, dtype):
    """(e) Hypothesis searches for sequences of large key moves that break an answer."""
    tau, schedule = tau_schedule
    n = 6
    big = 30.0 if dtype == np.float64 else 10.0
    Q, K, V = dominant_key_problem(n, extra_keys=5, big=big, e=2, seed=len(steps))
    att = build(Q, K, V, tau=tau, storage=storage, dtype=dtype, schedule=schedule)
    Q, K, V = (x.astype(dtype).copy() for x in (Q, K, V))
    for c, delta in steps:
        delta = delta if dtype == np.float64 else delta / 4
        att.update_k(c, c, delta)
        K[c, c] += dtype(delta)
        att._check()
    check_all_answers(att, Q, K, V)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_is_an_upper_bound(storage, dtype):
    rng = np.random.default_rng(5)
    n, m, d, e = 15, 21, 4, 3
    Q, K, V = rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, dtype=dtype)
    Q, K, V = (x.astype(dtype).copy() for x in (Q, K, V))
    for _ in range(30):
        c, j = int(rng.integers(m)), int(rng.integers(d))
        att.update_k(c, j, 0.7)
        K[c, j] += dtype(0.7)
        att.update_v(c, j % e, -0.7)
        V[c, j % e] += dtype(-0.7)
    reference = reference_attention(Q, K, V)
    for i in range(n):
        bound = att.error_bound(i)
        assert 0 < bound < 10 * TARGET[np.dtype(dtype)]
        err = np.abs(as_numpy(att.query_row(i)).astype(np.float64) - reference[i]) / value_scale(V)
        assert np.all(err <= bound)


def _certified_rows(att, Q, K, V, *, mask=None):
    """Every row's answers (entries and whole rows) against the extended-precision
    reference, and error_bound(i) covering the measured error."""
    reference = reference_attention(Q, K, V, mask=mask, precise=True)
    scale = value_scale(V)
    for i in range(reference.shape[0]):
        bound = att.error_bound(i)
        entries = np.array([att.query(i, j) for j in range(reference.shape[1])])
        for answer in (entries, as_numpy(att.query_row(i)).astype(np.float64)):
            err = np.abs(answer - reference[i]) / scale
            assert np.all(err <= bound), (i, err, bound)
            assert np.all(err <= TARGET[np.dtype(att.dtype)])


def _stabilizer_audit_case(att, variant, raised):
    """The audit's float32 reproducers: the row's stabilizer moves up (the key's logit rises
    from 39.5 to ``raised``, past float32's weight limit e^22), then the key that dominated
    the row moves far away (or is hidden)."""
    if variant == "update_k":
        att.update_k(1, 0, raised - 39.5)
        att.update_k(1, 0, -164.5)
        return np.array([[0.0], [float(np.float32(raised - 39.5) + np.float32(39.5)) - 164.5]]), None
    att.set_key(1, np.array([raised]))
    if variant == "set_key_mask":
        att.set_key_mask(1, False)
        return np.array([[0.0], [raised]]), np.array([[True, False]])
    att.set_key(1, np.array([-100.0]))  # "set_key": moved away
    return np.array([[0.0], [-100.0]]), None


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["update_k", "set_key_mask", "set_key"])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("raised", [62.0, 64.5])
def test_stabilizer_move_then_dominant_key_leaves(storage, dtype, variant, fold, raised):
    """Rescaling a row re-rounds its stored weights to the dtype; the bound must count it
    (with ``raised = 62`` the float32 dense case certifies a wrong answer without that term)."""
    Q, K, V = np.array([[1.0]]), np.array([[0.0], [39.5]]), np.array([[1.0], [0.0]])
    att = DynamicAttention(Q, K, V, dtype=dtype, storage=storage, tau=1.0)
    K, mask = _stabilizer_audit_case(att, variant, raised)
    if fold:
        att.rebuild()
    att._check()
    assert att.query(0, 0) == pytest.approx(1.0, rel=1e-6)
    _certified_rows(att, Q, K, V, mask=mask)


@pytest.mark.parametrize("seed", range(20))
def test_random_large_key_steps_stay_certified(seed):
    """Key steps of 5-40 logits (rows are rescaled often), whole new keys, value edits and
    folds on small random problems; every row checked after every step. Seeds cycle through
    float32/float64, dense/implicit and tau in {0, 0.3, 0.5, 1, "auto"}."""
    rng = np.random.default_rng(seed)
    n, m, d, e = (int(rng.integers(1, hi)) for hi in (7, 9, 4, 3))
    dtype = (np.float32, np.float64)[seed % 2]
    storage = STORAGES[(seed // 2) % 2]
    tau = (0.0, 0.3, 0.5, 1.0, "auto")[(seed // 4) % 5]
    Q, K, V = rng.standard_normal((n, d)), 3 * rng.standard_normal((m, d)), rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, dtype=dtype, storage=storage, tau=tau)
    Q, K, V = (x.astype(dtype).astype(np.float64) for x in (Q, K, V))
    for _ in range(60):
        action, c = rng.random(), int(rng.integers(m))
        if action < 0.5:
            j, delta = int(rng.integers(d)), float(rng.choice([-1.0, 1.0]) * rng.uniform(5, 40))
            att.update_k(c, j, delta)
            K[c, j] = float(dtype(dtype(K[c, j]) + dtype(delta)))
        elif action < 0.7:
            key = (rng.standard_normal(d) * rng.uniform(0, 30)).astype(dtype)
            att.set_key(c, key)
            K[c] = key
        elif action < 0.85:
            j, delta = int(rng.integers(e)), float(rng.standard_normal() * 10 ** rng.uniform(-3, 3))
            att.update_v(c, j, delta)
            V[c, j] = float(dtype(dtype(V[c, j]) + dtype(delta)))
        else:
            att.rebuild()
        att._check()
        _certified_rows(att, Q, K, V)


HUGE = {np.dtype(np.float64): 1e308, np.dtype(np.float32): 3e38}


@pytest.mark.parametrize("cls", [DynamicAttention, Eager, Recompute, OnDemand, Rows])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_finite_values_never_overflow(cls, dtype):
    """Every answer is a convex combination of values: any finite V answers finitely."""
    huge = HUGE[np.dtype(dtype)]
    att = cls(np.zeros((4, 1)), np.zeros((4, 1)), np.full((4, 1), huge), dtype=dtype)
    assert att.query(0, 0) == pytest.approx(huge, rel=1e-6)
    np.testing.assert_allclose(as_numpy(att.output()).astype(np.float64), huge, rtol=1e-6)
    big = huge / 1e68 if dtype == np.float64 else huge / 1e8
    Q, K, V = np.ones((1, 1)), np.zeros((2, 1)), np.array([[big], [big]])
    att = cls(Q, K, V, dtype=dtype)
    att.update_k(0, 0, 170.0 if dtype == np.float64 else 21.0)
    assert att.query(0, 0) == pytest.approx(big, rel=1e-6)
    att.update_v(1, 0, huge - big)  # a value column grows by orders of magnitude
    V[1, 0] = float(dtype(dtype(big) + dtype(huge - big)))
    K[0, 0] = 170.0 if dtype == np.float64 else 21.0
    expected = reference_attention(Q, K, V.astype(dtype), precise=True)
    np.testing.assert_allclose(as_numpy(att.query_row(0)).astype(np.float64), expected[0], rtol=1e-5)
    assert np.isfinite(att.query(0, 0))


@pytest.mark.parametrize("storage", STORAGES)
def test_value_units_follow_growing_values(storage):
    """Values growing by 1e200 through many folds keep the certificate."""
    rng = np.random.default_rng(9)
    n, m, e = 4, 6, 2
    Q, K, V = rng.standard_normal((n, 2)), rng.standard_normal((m, 2)), rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, storage=storage, tau=0.5)
    for step in range(40):
        c, j = int(rng.integers(m)), int(rng.integers(e))
        delta = float(rng.standard_normal() * 10.0 ** (5 * step))
        att.update_v(c, j, delta)
        V[c, j] += delta
        att._check()
        _certified_rows(att, Q, K, V)


def test_error_bound_is_never_nan():
    """A zero scale with huge keys: logits are exactly 0, the bound is finite."""
    att = DynamicAttention(np.ones((2, 2)), np.full((3, 2), 1e200), np.ones((3, 1)), scale=0.0)
    assert att.error_bound(0) == pytest.approx(att.error_bound(1))
    assert np.isfinite(att.error_bound(0)) and att.error_bound(0) < 1e-12
    att.update_k(0, 1, 1e200)
    assert np.isfinite(att.error_bound(1))
    assert att.query(1, 0) == 1.0
    with pytest.raises(ValueError, match="dot products"):
        att.set_query(0, np.full(2, 1e200))  # q.k would overflow float64


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_append_whose_key_moves_a_stabilizer_beyond_a_subnormal_factor(storage, tau):
    """A logit jump of 800 recomputes the row in the middle of ``append``: the appended
    row is pending with folded values 0 and must not be counted twice."""
    att = DynamicAttention(
        np.array([[1.0], [-1.0]]), np.array([[0.0]]), np.array([[1.0, 2.0]]), tau=tau, storage=storage
    )
    att.append(k=np.array([800.0]), v=np.array([5.0, -3.0]))
    att._check()
    np.testing.assert_allclose(as_numpy(att.output()), [[5.0, -3.0], [1.0, 2.0]], rtol=1e-12)
    assert att.query(0, 0) == pytest.approx(5.0, rel=1e-12)


@pytest.mark.parametrize("storage", STORAGES)
def test_subnormal_values_answer_to_full_relative_accuracy(storage):
    """Values in float64's subnormal range: their value unit is tiny, and an exact row
    recomputation must keep the value side in units (a product w * v of subnormals would
    keep only a few significant bits)."""
    rng = np.random.default_rng(3)
    n, m = 5, 7
    Q, K = rng.standard_normal((n, 2)), rng.standard_normal((m, 2)) * 3
    V = rng.integers(1, 1 << 20, (m, 3)).astype(np.float64) * 5e-324  # subnormal, 20 significant bits
    att = DynamicAttention(Q, K, V, storage=storage)
    att.set_query(2, rng.standard_normal(2))  # an exact recomputation of row 2
    Q[2] = att.Q[2]
    expected = reference_attention(Q, K, V, precise=True)
    scale = np.abs(V).max(axis=0)
    error = np.abs(as_numpy(att.output()) - expected) / scale
    assert error.max() <= 1e-9, error.max()
