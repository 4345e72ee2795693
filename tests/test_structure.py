"""DynamicAttention and the baselines against the float64 reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _schedules import AUTO_AWAKE, build, tau_schedules
from dynattn import DynamicAttention
from dynattn.baselines import BASELINES
from dynattn.testing import as_numpy, assert_attention_close, random_problem, reference_attention

DTYPES = [np.float64, np.float32]
STORAGES = ["dense", "implicit"]
TAUS = [0.0, 0.25, 0.5, 1.0, "auto", AUTO_AWAKE]
SIZES = [(1, 1, 1, 1), (2, 7, 1, 2), (7, 2, 3, 1), (59, 97, 7, 5), (97, 59, 2, 7)]


def run_workload(att, Q, K, V, *, steps, seed, scale=1.0, check=True, k_step=0.5, v_step=0.5):
    """Random interleaving of entry updates and queries; every answer checked."""
    rng = np.random.default_rng(seed)
    dt = att.dtype
    K, V = K.astype(dt).copy(), V.astype(dt).copy()
    Q = Q.astype(dt)
    m, d = K.shape
    e = V.shape[1]
    n = Q.shape[0]
    for step in range(steps):
        c = int(rng.integers(m))
        if rng.random() < 0.5:
            j, delta = int(rng.integers(d)), float(rng.normal(0, k_step))
            att.update_k(c, j, delta)
            K[c, j] += dt.type(delta)
        else:
            j, delta = int(rng.integers(e)), float(rng.normal(0, v_step))
            att.update_v(c, j, delta)
            V[c, j] += dt.type(delta)
        if check and hasattr(att, "_check"):
            att._check(deep=n * m <= 10_000)
        i, jj = int(rng.integers(n)), int(rng.integers(e))
        answer = att.query(i, jj)
        assert isinstance(answer, float)
        assert_attention_close(
            np.array([answer]),
            Q,
            K,
            V,
            scale=scale,
            dtype=dt,
            rows=np.array([i]),
            cols=np.array([jj]),
            context=f"step {step}: ",
        )
    return Q, K, V


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules(TAUS))
@pytest.mark.parametrize("shape", SIZES)
def test_random_sequences_match_reference(shape, tau, schedule, dtype, storage):
    n, m, d, e = shape
    Q, K, V = random_problem(n, m, d, e, seed=n * 1000 + m, logit_scale=2.0)
    att = build(Q, K, V, tau=tau, dtype=dtype, storage=storage, schedule=schedule)
    if tau not in ("auto", AUTO_AWAKE):
        assert att.threshold == min(m, max(1, int(np.ceil(m**tau - 1e-9))))
    Q, K, V = run_workload(att, Q, K, V, steps=60, seed=m)
    assert_attention_close(as_numpy(att.output()), Q, K, V, scale=1.0, dtype=dtype)
    rows = np.arange(n)
    assert_attention_close(
        np.stack([as_numpy(att.query_row(i)) for i in rows]), Q, K, V, scale=1.0, dtype=dtype
    )


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_baselines_match_reference(name, dtype):
    Q, K, V = random_problem(23, 31, 4, 6, seed=3)
    impl = BASELINES[name](Q, K, V, tau=0.5, dtype=dtype, storage="dense")
    Q, K, V = run_workload(impl, Q, K, V, steps=40, seed=5)
    assert_attention_close(as_numpy(impl.output()), Q, K, V, scale=1.0, dtype=dtype)
    rows, cols = np.array([0, 5, 22, 5]), np.array([1, 0, 5, 5])
    assert_attention_close(
        as_numpy(impl.query_many(rows, cols)), Q, K, V, scale=1.0, dtype=dtype, rows=rows, cols=cols
    )


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_after_updates_equals_fresh_structure(storage, dtype):
    """Replay: the maintained output equals a structure built on the final K, V."""
    Q, K, V = random_problem(41, 53, 6, 4, seed=9)
    att = DynamicAttention(Q, K, V, tau=0.5, dtype=dtype, storage=storage)
    Q, K, V = run_workload(att, Q, K, V, steps=150, seed=2, check=False)
    fresh = DynamicAttention(att.Q, att.K, att.V, tau=0.5, dtype=dtype, storage=storage)
    assert np.array_equal(as_numpy(att.K), as_numpy(K)) and np.array_equal(as_numpy(att.V), as_numpy(V))
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(as_numpy(att.output()), as_numpy(fresh.output()), rtol=0, atol=tolerance)
    att.rebuild()
    assert att.pending == 0
    np.testing.assert_allclose(as_numpy(att.output()), as_numpy(fresh.output()), rtol=0, atol=tolerance)


@pytest.mark.parametrize("storage", STORAGES)
def test_scale_and_mixed_shapes(storage):
    Q, K, V = random_problem(17, 29, 8, 3, seed=4, logit_scale=4.0)
    scale = 1 / np.sqrt(8)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=scale, storage=storage)
    Q, K, V = run_workload(att, Q, K, V, steps=50, seed=1, scale=scale)
    assert_attention_close(as_numpy(att.output()), Q, K, V, scale=scale, dtype=np.float64)


def test_pending_and_threshold_bookkeeping():
    Q, K, V = random_problem(5, 16, 2, 2, seed=0)
    att = DynamicAttention(Q, K, V, tau=0.5)
    assert att.threshold == 4 and att.pending == 0
    att.update_k(3, 0, 0.1)
    att.update_v(3, 1, 0.1)  # same row: still one pending row
    assert att.pending == 1
    att.update_k(4, 1, 0.1)
    att.update_k(5, 1, 0.1)
    assert att.pending == 3
    att.update_v(6, 0, 0.1)  # the fourth distinct row reaches the threshold: folded
    assert att.pending == 0 and att.stats["folds"] == 1
    att.update_k(0, 0, 0.1)
    att.rebuild()
    assert att.pending == 0 and att.stats["folds"] == 2


def test_inputs_copied_views_read_only_and_user_arrays_untouched(backend):
    Q, K, V = random_problem(6, 7, 3, 2, seed=1)
    originals = [x.copy() for x in (Q, K, V)]
    att = DynamicAttention(Q, K, V, tau=0.5)
    att.update_k(1, 2, 0.3)
    att.update_v(2, 1, -0.3)
    for given_array, original in zip((Q, K, V), originals, strict=True):
        assert np.array_equal(given_array, original)
    for name in "QKV":
        view = getattr(att, name)
        if backend == "numpy":
            with pytest.raises(ValueError):
                view[0, 0] = 1.0
        else:  # tensors have no read-only flag: the accessor returns a copy
            view[0, 0] = 1e6
            assert getattr(att, name)[0, 0] != 1e6
    assert att.K[1, 2] == K[1, 2] + 0.3
    out = as_numpy(att.output())
    out[:] = 0  # the returned array is the caller's
    assert np.any(as_numpy(att.output()) != 0)


def test_query_methods_agree():
    Q, K, V = random_problem(19, 23, 4, 5, seed=7)
    att = DynamicAttention(Q, K, V, tau=1.0)
    for c in range(10):
        att.update_k(c, c % 4, 0.2)
        att.update_v(c + 5, c % 5, -0.2)
    full = as_numpy(att.output())
    rows = np.repeat(np.arange(19), 5)
    cols = np.tile(np.arange(5), 19)
    np.testing.assert_allclose(as_numpy(att.query_many(rows, cols)), full[rows, cols], rtol=0, atol=1e-13)
    for i in range(19):
        np.testing.assert_allclose(as_numpy(att.query_row(i)), full[i], rtol=0, atol=1e-13)
        for j in range(5):
            assert abs(att.query(i, j) - full[i, j]) <= 1e-13


def test_storage_auto_follows_memory_budget():
    Q, K, V = random_problem(8, 8, 2, 2)
    assert DynamicAttention(Q, K, V, storage="auto").storage == "dense"
    assert DynamicAttention(Q, K, V, storage="auto", memory_budget=100).storage == "implicit"
    dense = DynamicAttention(Q, K, V, storage="dense")
    assert DynamicAttention(Q, K, V, memory_budget=dense.nbytes).storage == "dense"
    assert DynamicAttention(Q, K, V, memory_budget=dense.nbytes - 1).storage == "implicit"


# ---------------------------------------------------------------- randomized stress (weighted actions)
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["k", "k", "k", "v", "v", "query", "row", "rebuild", "many"]),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
        st.floats(-3, 3, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=60,
)


@given(
    actions=ACTIONS,
    tau=st.sampled_from(TAUS),
    storage=st.sampled_from(STORAGES),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(3, 5, 2, 2), (9, 4, 3, 1), (1, 6, 1, 3)]),
)
def test_hypothesis_action_sequences(actions, tau, storage, dtype, shape):
    n, m, d, e = shape
    Q, K, V = random_problem(n, m, d, e, seed=len(actions), logit_scale=3.0)
    att = build(Q, K, V, tau=tau, storage=storage, dtype=dtype)
    Q, K, V = Q.astype(dtype), K.astype(dtype), V.astype(dtype)
    dt = np.dtype(dtype)
    for kind, a, b, x in actions:
        if kind == "k":
            att.update_k(a % m, b % d, x)
            K[a % m, b % d] += dt.type(x)
        elif kind == "v":
            att.update_v(a % m, b % e, x)
            V[a % m, b % e] += dt.type(x)
        elif kind == "rebuild":
            att.rebuild()
        elif kind == "query":
            i, j = a % n, b % e
            assert_attention_close(
                np.array([att.query(i, j)]),
                Q,
                K,
                V,
                scale=1.0,
                dtype=dt,
                rows=np.array([i]),
                cols=np.array([j]),
            )
        elif kind == "row":
            assert_attention_close(
                as_numpy(att.query_row(a % n))[None],
                Q,
                K,
                V,
                scale=1.0,
                dtype=dt,
                rows=np.array([a % n]),
            )
        else:
            rows, cols = np.array([a % n, b % n]), np.array([b % e, a % e])
            assert_attention_close(
                as_numpy(att.query_many(rows, cols)),
                Q,
                K,
                V,
                scale=1.0,
                dtype=dt,
                rows=rows,
                cols=cols,
            )
        att._check()
    assert_attention_close(as_numpy(att.output()), Q, K, V, scale=1.0, dtype=dt)


def test_every_head_of_the_same_rows_is_recomputed_in_one_batched_pass(monkeypatch):
    """A refresh of the same rows of every head (a dormant row read, a new query row, a
    full refresh, or such pairs given explicitly) is one batched pass over the heads;
    other pairs go head by head. Each gives the reference rows."""
    H, n, m, d, e = 3, 7, 6, 4, 2
    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((H, r, w)) for r, w in ((n, d), (m, d), (m, e)))
    att = DynamicAttention(Q, K, V, tau=0.5)
    blocks = []
    batched = att._refresh_rows
    monkeypatch.setattr(
        att, "_refresh_rows", lambda block, *rest: blocks.append(block) or batched(block, *rest)
    )
    expected = np.stack([reference_attention(Q[h], K[h], V[h]) for h in range(H)])  # (H, n, e)
    out = att._refresh(None, np.array([1, 4]))
    np.testing.assert_allclose(as_numpy(out), expected[:, [1, 4]].reshape(-1, e), rtol=1e-12, atol=1e-12)
    out = att._refresh(np.repeat(np.arange(H), 2), np.tile([1, 4], H))
    np.testing.assert_allclose(as_numpy(out), expected[:, [1, 4]].reshape(-1, e), rtol=1e-12, atol=1e-12)
    out = att._refresh(np.array([0, 2]), np.array([5, 5]))
    np.testing.assert_allclose(as_numpy(out), expected[[0, 2], [5, 5]], rtol=1e-12, atol=1e-12)
    assert blocks == [slice(None), slice(None), slice(0, 1), slice(2, 3)]
    att._check()
