"""Mixed-precision kernels (dynattn.kernels): float32 loads, float64 arithmetic.

Each kernel is checked against an extended-precision product and held to the
``gamma_k`` bound the certificate assumes of any float64 sum of k products
(``docs/accuracy.md``); then the structure is run under every kernel set on the
paths that use them (new query rows, token edits, refreshes), against the
shared reference with every row's error bound covering its measured error.
"""

import importlib.util
import types

import numpy as np
import pytest

from conftest import assert_rows_certified
from dynattn import DynamicAttention, kernels, policy
from dynattn.certificate import gamma

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
KERNEL_SETS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="no numba"))]


@pytest.fixture(params=KERNEL_SETS)
def kernel_set(request):
    with kernels.use(request.param) as name:
        yield name


def _state_view(rng, heads, rows, width, capacity_rows):
    """A float32 view ``(heads, rows, width)`` into a larger buffer, as the state holds."""
    buffer = rng.standard_normal((heads + 1, capacity_rows, width)).astype(np.float32)
    return buffer[1:, :rows]


def _exact(a, b):
    return np.asarray(a, np.longdouble) @ np.asarray(b, np.longdouble)


needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")


@needs_numba
@pytest.mark.parametrize("heads, rows, width, columns", [(1, 1, 1, 1), (3, 17, 5, 2), (8, 130, 64, 8)])
def test_rows_dot_within_the_float64_bound(heads, rows, width, columns):
    rng = np.random.default_rng(rows)
    a = _state_view(rng, heads, rows, width, rows + 7)
    x = rng.standard_normal((heads, width, columns)) * 10.0 ** rng.integers(-3, 4, (heads, width, columns))
    with kernels.use("numba"):
        got = kernels.rows_dot(a, x)
    assert got is not None and got.dtype == np.float64 and got.shape == (heads, rows, columns)
    error = np.abs(got - _exact(a, x))
    assert np.all(error <= gamma(width) * _exact(np.abs(a), np.abs(x)))


@needs_numba
@pytest.mark.parametrize("heads, keys, width, columns", [(1, 1, 1, 1), (2, 33, 3, 4), (8, 257, 64, 1)])
def test_weighted_rows_within_the_float64_bound(heads, keys, width, columns):
    rng = np.random.default_rng(keys)
    b = _state_view(rng, heads, keys, width, keys + 3)
    w_t = np.exp(rng.standard_normal((heads, keys, columns)) * 5)
    w_t[:, ::3] = 0.0  # masked keys weigh exactly 0
    with kernels.use("numba"):
        got = kernels.weighted_rows(w_t, b)
    assert got is not None and got.shape == (heads, columns, width)
    exact = _exact(np.swapaxes(w_t, 1, 2), b)
    bound = gamma(keys) * _exact(np.swapaxes(w_t, 1, 2), np.abs(b))
    assert np.all(np.abs(got - exact) <= bound)


@needs_numba
def test_rows_dot_writes_into_a_given_buffer():
    rng = np.random.default_rng(0)
    a = _state_view(rng, 2, 9, 4, 12)
    x = rng.standard_normal((2, 4, 3))
    buffer = np.full((2, 9, 5), np.nan)
    with kernels.use("numba"):
        got = kernels.rows_dot(a, x, buffer[:, :, :3])
    assert np.shares_memory(got, buffer) and np.all(np.isfinite(buffer[:, :, :3]))


FLOAT32_ROWS = np.ones((2, 5, 3), np.float32)


@pytest.mark.parametrize(
    "a, columns",
    [
        (np.ones((2, 5, 3)), 1),  # float64: BLAS on the array itself is as good
        (FLOAT32_ROWS, kernels.MAX_KERNEL_COLUMNS + 1),  # BLAS-3 work
        (np.ones((2, 3, 5), np.float32).swapaxes(1, 2), 1),  # rows not contiguous
    ],
)
def test_no_kernel_where_it_does_not_apply(kernel_set, a, columns):
    assert kernels.rows_dot(a, np.ones((2, 3, columns))) is None
    assert kernels.weighted_rows(np.ones((2, 5, columns)), a) is None


@needs_numba
def test_kernels_refuse_shapes_that_do_not_multiply():
    with kernels.use("numba"), pytest.raises(ValueError, match="do not multiply"):
        kernels.rows_dot(FLOAT32_ROWS, np.ones((2, 4, 1)))
    with kernels.use("numba"), pytest.raises(ValueError, match="do not multiply"):
        kernels.weighted_rows(np.ones((2, 6, 1)), FLOAT32_ROWS)


def test_numpy_set_runs_no_kernel():
    with kernels.use("numpy"):
        assert kernels.active() == "numpy"
        assert kernels.rows_dot(np.ones((1, 4, 2), np.float32), np.ones((1, 2, 1))) is None


def test_use_restores_the_previous_choice_and_names_the_valid_ones():
    before = kernels.active()
    with kernels.use("numpy"):
        assert kernels.active() == "numpy"
    assert kernels.active() == before
    with pytest.raises(ValueError, match="kernels.*'numba'.*'numpy'|kernels.*numpy"):
        kernels.use("fortran")
    assert kernels.active() == before


def test_auto_without_an_importable_numba_runs_numpy(monkeypatch):
    def broken():
        raise ImportError("numba built for another numpy")

    before = kernels.active()
    try:
        with monkeypatch.context() as patch:
            patch.setitem(kernels.KERNELS, "numba", broken)
            kernels.use("auto")
            assert kernels.active() == "numpy"
    finally:
        kernels.use(before)  # (after the registry is whole again)


def test_a_kernel_numba_cannot_compile_turns_the_kernels_off(monkeypatch):
    numba_error = type("TypingError", (Exception,), {"__module__": "numba.core.errors"})

    def fails(*arguments):
        raise numba_error("cannot type this")

    def bug(*arguments):
        raise ZeroDivisionError("a bug, not numba")

    a, x = np.ones((1, 4, 2), np.float32), np.ones((1, 2, 1))
    # the fakes are undone first, then the outer block restores the choice before the test
    with kernels.use("numpy"), monkeypatch.context() as patch:
        patch.setattr(kernels, "_active", types.SimpleNamespace(rows_dot=bug))
        with pytest.raises(ZeroDivisionError):
            kernels.rows_dot(a, x)
        patch.setattr(kernels, "_active", types.SimpleNamespace(rows_dot=fails))
        patch.setattr(kernels, "_active_name", "numba")
        with pytest.warns(RuntimeWarning, match="numba failed.*using numpy"):
            assert kernels.rows_dot(a, x) is None
        assert kernels.active() == "numpy" and kernels.rows_dot(a, x) is None


@pytest.mark.parametrize("tau", [0.5, "auto"])
@pytest.mark.parametrize("storage", ["dense", "implicit"])
@pytest.mark.parametrize("causal", [False, True])
def test_structure_under_each_kernel_set(kernel_set, storage, causal, tau):
    """Decoding (append + the new row), token edits and entry updates of a float32
    structure with heads: every row within its certified bound (under tau="auto" the
    edits defer their columns, which the reads then compute)."""
    rng = np.random.default_rng(7)
    H, n, d, e = 3, 11, 5, 4
    Q, K, V = (rng.standard_normal((H, n, w)).astype(np.float32) for w in (d, d, e))
    # tau="auto" with rates that defer every column: reads then compute them, with one
    # product over every key once a third of the keys is deferred
    with policy.use_rates(policy.Rates(gemm=1.0, gemv=1e9, call=0.0)):
        _edit_and_check(tau, storage, causal, Q, K, V, rng)


def _edit_and_check(tau, storage, causal, Q, K, V, rng):
    H, _, d = Q.shape
    e = V.shape[2]
    att = DynamicAttention(Q, K, V, tau=tau, dtype=np.float32, storage=storage, causal=causal, scale=0.7)
    if tau == "auto":
        att.fold()  # wakes it (it starts dormant): the deferred columns are the point here
    Q, K, V = (list(x) for x in (Q, K, V))
    for step in range(12):
        q, k, v = (rng.standard_normal((H, w)).astype(np.float32) for w in (d, d, e))
        if step % 3 == 0:
            att.append(q=q, k=k, v=v)
            for h in range(H):
                Q[h] = np.vstack([Q[h], q[h]])
                K[h] = np.vstack([K[h], k[h]])
                V[h] = np.vstack([V[h], v[h]])
        elif step % 3 == 1:
            c = int(rng.integers(len(K[0])))
            att.set_token(c, k=k, v=v)
            for h in range(H):
                K[h][c], V[h][c] = k[h], v[h]
        else:
            c, j = int(rng.integers(len(K[0]))), int(rng.integers(d))
            att.update_k(c, j, 0.5, head=1)
            K[1][c, j] += np.float32(0.5)
        att._check()
    if tau == "auto":
        assert 3 * att.pending >= att.m and att.stats["columns_deferred"] >= att.pending
    count = len(Q[0])
    mask = np.tril(np.ones((count, count), bool)) if causal else None
    assert_rows_certified(att, *(np.stack(x).astype(np.float64) for x in (Q, K, V)), mask=mask)
