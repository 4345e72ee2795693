"""Certified accuracy (SPEC section 3): adversarial workloads and a long soak.

Every answer is compared with the float64 reference (extended precision where
the logits are so large that float64 rounding of the logit itself matters), with
the allowance ``4 * err_naive + target * max|V[:, j]|`` of dynattn.testing.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynattn import DynamicAttention
from dynattn.testing import (
    TARGET,
    as_numpy,
    assert_attention_close,
    reference_attention,
    value_scale,
)

STORAGES = ["dense", "implicit"]
DTYPES = [np.float64, np.float32]
TAUS = [0.0, 0.5, 1.0]


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
@pytest.mark.parametrize("tau", TAUS)
def test_dominant_key_moved_away_repeatedly(storage, dtype, tau):
    """(a) Cancellation: den = Z + (a_new - a_old) subtracts two nearly equal numbers."""
    n, big = 9, 40.0
    Q, K, V = dominant_key_problem(n, extra_keys=14, big=big, e=3, seed=1)
    att = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype)
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
@pytest.mark.parametrize("tau", TAUS)
def test_one_dominant_key_for_all_rows_removed(storage, tau):
    """(a) Every row's weight on one key, which then moves away by 1e3 logits."""
    rng = np.random.default_rng(4)
    n, m, d, e = 11, 17, 3, 4
    Q = np.abs(rng.standard_normal((n, d))) + 0.5
    K = rng.standard_normal((m, d)) * 0.1
    K[5] = 30.0
    V = rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, tau=tau, storage=storage)
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
@pytest.mark.parametrize("tau", TAUS)
def test_huge_logits(storage, dtype, tau):
    """(b) Logits of magnitude 1e3-1e4 (float64) and 100-1e3 (float32): no inf/NaN."""
    rng = np.random.default_rng(7)
    n, m, d, e = 13, 19, 4, 3
    magnitude = 1e4 if dtype == np.float64 else 1e3
    Q = rng.standard_normal((n, d))
    K = rng.standard_normal((m, d)) * magnitude / 2
    V = rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype)
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
@pytest.mark.parametrize("tau", TAUS)
def test_values_with_huge_dynamic_range_and_cancelling_numerators(storage, dtype, tau):
    """(c) Values spanning 1e-8..1e8 and answers near zero by cancellation; then the
    huge values are removed (the snapshot held them)."""
    rng = np.random.default_rng(11)
    n, m, d, e = 10, 16, 3, 4
    Q = rng.standard_normal((n, d)) * 0.1
    K = rng.standard_normal((m, d)) * 0.1
    span = 1e8 if dtype == np.float64 else 1e4
    V = rng.standard_normal((m, e)) * np.logspace(-np.log10(span), np.log10(span), m)[:, None]
    V[1::2] = -V[0::2]  # pairs that nearly cancel
    att = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype)
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


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soak_100k_updates(storage, dtype):
    """(d) >= 100,000 random updates with queries sampled along the way: no drift."""
    rng = np.random.default_rng(2024)
    n, m, d, e = 12, 16, 4, 3
    Q = rng.standard_normal((n, d))
    K = rng.standard_normal((m, d))
    V = rng.standard_normal((m, e))
    att = DynamicAttention(Q, K, V, tau=0.5, storage=storage, dtype=dtype)
    Q, K, V = (x.astype(dtype).copy() for x in (Q, K, V))
    total = 100_000
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
    tau=st.sampled_from(TAUS),
    storage=st.sampled_from(STORAGES),
    dtype=st.sampled_from(DTYPES),
)
def test_hypothesis_adversarial_key_moves(steps, tau, storage, dtype):
    """(e) Hypothesis searches for sequences of large key moves that break an answer."""
    n = 6
    big = 30.0 if dtype == np.float64 else 10.0
    Q, K, V = dominant_key_problem(n, extra_keys=5, big=big, e=2, seed=len(steps))
    att = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype)
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
        assert np.all(err <= bound + (np.finfo(dtype).eps if dtype == np.float32 else 0))
