"""The baselines with heads, token operations, both dtypes and both backends.

Every baseline of ``dynattn.baselines.BASELINES`` (and ``Eager`` in both storages,
``Rows`` with both kernels) is compared with the float64 reference of
``dynattn.testing`` after entry updates, token edits and appends, head by head;
bad input raises an error naming the argument and changes nothing.
"""

import numpy as np
import pytest

from conftest import assert_same_state, state_of
from dynattn.baselines import BASELINES, Eager, Rows
from dynattn.interface import AttentionMaintainer
from dynattn.testing import as_numpy, assert_attention_close, random_problem

DTYPES = [np.float64, np.float32]

#: name -> constructor with fixed options: every registered baseline, plus the variants
VARIANTS = {
    **BASELINES,
    "eager-dense": lambda Q, K, V, **o: Eager(Q, K, V, storage="dense", **o),
    "eager-implicit": lambda Q, K, V, **o: Eager(Q, K, V, storage="implicit", **o),
    "rows-sdpa": lambda Q, K, V, **o: Rows(Q, K, V, kernel="sdpa", **o),
}


def heads_problem(batch, n, m, d, e, seed, dtype=np.float64, logit_scale=2.0):
    """Independent random problems per head, stacked to ``(*batch, rows, cols)``."""
    heads = int(np.prod(batch))
    parts = [random_problem(n, m, d, e, seed=seed + h, logit_scale=logit_scale) for h in range(heads)]
    return tuple(
        np.stack([p[k] for p in parts]).reshape(*batch, *parts[0][k].shape).astype(dtype) for k in range(3)
    )


def check_heads(att, Q, K, V, *, scale, dtype, context=""):
    """Every head's output, query_rows and entries against the reference."""
    batch = Q.shape[:-2]
    out = as_numpy(att.output())
    assert out.shape == (*batch, Q.shape[-2], V.shape[-1]) and out.dtype == np.dtype(dtype)
    rows = np.array([0, Q.shape[-2] - 1, 0])
    some = as_numpy(att.query_rows(rows))
    assert some.shape == (*batch, 3, V.shape[-1])
    flat = (x.reshape(-1, *x.shape[-2:]) for x in (Q, K, V, out, some))
    for h, (q, k, v, o, s) in enumerate(zip(*flat, strict=True)):
        check = {"scale": scale, "dtype": dtype, "context": f"{context}head {h}: "}
        assert_attention_close(o, q, k, v, **check)
        assert_attention_close(s, q, k, v, rows=rows, **check)


def expected_after(Q, K, V, c, k=None, v=None):
    K, V = K.copy(), V.copy()
    if k is not None:
        K[..., c, :] = k
    if v is not None:
        V[..., c, :] = v
    return K, V


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_token_edits_and_appends_match_the_reference(name, dtype, batch):
    """Odd sizes, leading axes, every token operation, then appends."""
    n, m, d, e = 7, 9, 5, 3
    Q, K, V = heads_problem(batch or (1,), n, m, d, e, seed=3, dtype=dtype)
    if not batch:
        Q, K, V = Q[0], K[0], V[0]
    scale = 0.7
    att = VARIANTS[name](Q, K, V, scale=scale, dtype=dtype, tau=0.5)
    assert isinstance(att, AttentionMaintainer) and att.batch_shape == batch
    rng = np.random.default_rng(1)
    check_heads(att, Q, K, V, scale=scale, dtype=dtype, context=f"{name} init ")
    for step, c in enumerate([2, 8, 2, 0]):
        k = rng.standard_normal((*batch, d)).astype(dtype)
        v = rng.standard_normal((*batch, e)).astype(dtype)
        if step == 0:
            att.set_key(c, k)
            K, V = expected_after(Q, K, V, c, k=k)
        elif step == 1:
            att.set_value(c, v)
            K, V = expected_after(Q, K, V, c, v=v)
        else:
            att.set_token(c, k=k, v=v)
            K, V = expected_after(Q, K, V, c, k=k, v=v)
        check_heads(att, Q, K, V, scale=scale, dtype=dtype, context=f"{name} step {step} ")
    q = rng.standard_normal((*batch, d)).astype(dtype)
    att.set_query(4, q)
    Q = Q.copy()
    Q[..., 4, :] = q
    check_heads(att, Q, K, V, scale=scale, dtype=dtype, context=f"{name} set_query ")
    for what in ("kv", "q", "qkv", "kv"):
        q = rng.standard_normal((*batch, d)).astype(dtype)
        k = rng.standard_normal((*batch, d)).astype(dtype)
        v = rng.standard_normal((*batch, e)).astype(dtype)
        got = att.append(
            q=q if "q" in what else None, k=k if "k" in what else None, v=v if "v" in what else None
        )
        expected = (Q.shape[-2] if "q" in what else None, K.shape[-2] if "k" in what else None)
        assert got == expected
        if "q" in what:
            Q = np.concatenate([Q, q[..., None, :]], axis=-2)
        if "k" in what:
            K = np.concatenate([K, k[..., None, :]], axis=-2)
            V = np.concatenate([V, v[..., None, :]], axis=-2)
        assert (att.n, att.m) == (Q.shape[-2], K.shape[-2])
        check_heads(att, Q, K, V, scale=scale, dtype=dtype, context=f"{name} append {what} ")
    np.testing.assert_array_equal(as_numpy(att.K), K)
    np.testing.assert_array_equal(as_numpy(att.V), V)
    np.testing.assert_array_equal(as_numpy(att.Q), Q)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_entry_operations_name_their_head(name, dtype):
    batch, n, m, d, e = (2, 3), 5, 6, 3, 4
    Q, K, V = heads_problem(batch, n, m, d, e, seed=7, dtype=dtype)
    att = VARIANTS[name](Q, K, V, dtype=dtype)
    K, V = K.copy(), V.copy()
    for head, flat in (((1, 2), 5), (0, 0), (4, 4)):
        index = np.unravel_index(flat, batch)
        att.update_k(3, 1, 0.75, head=head)
        K[index][3, 1] += dtype(0.75)
        att.update_v(2, 3, -1.5, head=head)
        V[index][2, 3] += dtype(-1.5)
    np.testing.assert_array_equal(as_numpy(att.K), K)
    np.testing.assert_array_equal(as_numpy(att.V), V)
    check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context=f"{name}: ")
    flat = [x.reshape(6, *x.shape[-2:]) for x in (Q, K, V)]
    heads, rows, cols = np.array([5, 0, 4, 5, 1]), np.array([1, 4, 0, 1, 2]), np.array([3, 0, 2, 1, 1])
    many = as_numpy(att.query_many(rows, cols, heads=heads))
    entries = [att.query(int(i), int(j), head=int(h)) for h, i, j in zip(heads, rows, cols, strict=True)]
    for b, h in enumerate(heads):
        check = {"scale": 1.0, "dtype": dtype, "rows": rows[b : b + 1], "cols": cols[b : b + 1]}
        assert_attention_close(many[b : b + 1], *(x[h] for x in flat), **check)
        assert_attention_close(np.array(entries[b : b + 1]), *(x[h] for x in flat), **check)


@pytest.mark.parametrize("storage", ["dense", "implicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_dominant_key_moved_away_and_back(storage, dtype):
    """Cancellation: a key that holds almost all of every row's weight moves far away and
    back; the rows whose rounding bound fails are recomputed, answers stay on target."""
    rng = np.random.default_rng(4)
    n, m, d, e = 11, 17, 3, 4
    Q = np.abs(rng.standard_normal((2, n, d))) + 0.5
    K = rng.standard_normal((2, m, d)) * 0.1
    K[:, 5] = 9.0  # key 5 holds all but e^-18 .. e^-54 of each row's weight
    V = rng.standard_normal((2, m, e))
    att = Eager(Q, K, V, storage=storage, dtype=dtype)
    Q, K, V = (x.astype(dtype) for x in (Q, K, V))
    refreshed = att.stats["rows_refreshed"]
    for sign in (-1, 1, -1, 1):
        for j in range(d):
            att.update_k(5, j, sign * 200.0, head=1)
            K[1, 5, j] += dtype(sign * 200.0)
            check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context=f"{storage} ")
    assert att.stats["rows_refreshed"] > refreshed


@pytest.mark.parametrize("storage", ["dense", "implicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_logits_above_the_stabilizer_and_shrinking_values(storage, dtype):
    rng = np.random.default_rng(5)
    n, m, d, e = 6, 8, 2, 3
    Q, K, V = rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal((m, e))
    att = Eager(Q, K, V, storage=storage, dtype=dtype)
    Q, K, V = (x.astype(dtype) for x in (Q, K, V))
    for c, step in [(0, 60.0), (1, 90.0), (0, -150.0)]:  # weights would overflow float32 at e^88
        att.update_k(c, 0, step)
        K[c, 0] += dtype(step)
        check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context="logits ")
    span = 1e6 if dtype == np.float32 else 1e12
    for c in range(m):  # values grow by orders of magnitude, then shrink back
        att.set_value(c, (V[c] * span).astype(dtype))
        V[c] = (V[c] * span).astype(dtype)
        check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context="grow ")
    for c in range(m):
        v = rng.standard_normal(e).astype(dtype)
        att.set_value(c, v)
        V[c] = v
        check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context="shrink ")


@pytest.mark.parametrize("storage", ["dense", "implicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_long_random_workload_keeps_the_target(storage, dtype):
    """Thousands of rank-1 updates: the accumulated rounding never passes the target."""
    rng = np.random.default_rng(6)
    n, m, d, e = 9, 12, 4, 3
    Q, K, V = (rng.standard_normal(s) for s in ((2, n, d), (2, m, d), (2, m, e)))
    att = Eager(Q, K, V, storage=storage, dtype=dtype)
    Q, K, V = (x.astype(dtype) for x in (Q, K, V))
    steps = 3000
    heads, rows, cols = rng.integers(2, size=steps), rng.integers(m, size=steps), rng.integers(3, size=steps)
    deltas = rng.normal(0, 0.5, size=steps)
    for s in range(steps):
        h, c, j = int(heads[s]), int(rows[s]), int(cols[s])
        delta = float(deltas[s]) - 0.05 * float(K[h, c, j])
        if s % 3:
            att.update_k(c, j, delta, head=h)
            K[h, c, j] += dtype(delta)
        else:
            att.update_v(c, j, delta, head=h)
            V[h, c, j] += dtype(delta)
        if s % 500 == 499:
            check_heads(att, Q, K, V, scale=1.0, dtype=dtype, context=f"step {s} ")


def test_eager_storage_follows_the_memory_budget():
    Q, K, V = heads_problem((2,), 8, 8, 2, 2, seed=1)
    assert Eager(Q, K, V).storage == "dense"
    small = Eager(Q, K, V, memory_budget=2 * 8 * 8 * 8 - 1)
    assert small.storage == "implicit"
    assert Eager(Q, K, V, memory_budget=2 * 8 * 8 * 8).storage == "dense"
    assert small.nbytes < Eager(Q, K, V, storage="dense").nbytes * 2


def test_rows_kernels_agree():
    pytest.importorskip("torch")
    Q, K, V = heads_problem((3,), 6, 10, 4, 5, seed=2)
    numpy_rows = Rows(Q, K, V, kernel="numpy", backend="numpy")
    sdpa_rows = Rows(Q, K, V, kernel="sdpa", backend="numpy")
    assert (numpy_rows.kernel, sdpa_rows.kernel) == ("numpy", "sdpa")
    rows = np.array([5, 0, 3])
    a, b = as_numpy(numpy_rows.query_rows(rows)), as_numpy(sdpa_rows.query_rows(rows))
    assert isinstance(b, np.ndarray) and b.shape == (3, 3, 5)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert Rows(Q, K, V, backend="numpy").kernel == "numpy"


#: (method, args, kwargs, error, message) against a (2,)-head baseline with n=5, m=6, d=3, e=2
BAD_CALLS = [
    ("set_key", (6, np.ones((2, 3))), {}, IndexError, "c=6"),
    ("set_key", (0, np.ones(3)), {}, ValueError, r"k: expected shape \(2, 3\)"),
    ("set_key", (0, np.full((2, 3), np.nan)), {}, ValueError, "k: expected finite"),
    ("set_value", (0, np.ones((2, 3))), {}, ValueError, r"v: expected shape \(2, 2\)"),
    ("set_value", (-1, np.ones((2, 2))), {}, IndexError, "c=-1"),
    ("set_query", (5, np.ones((2, 3))), {}, IndexError, "i=5"),
    ("set_query", (0, np.full((2, 3), np.inf)), {}, ValueError, "q: expected finite"),
    ("set_token", (0,), {}, ValueError, "set_token: expected at least one"),
    ("set_token", (0,), {"k": np.ones((2, 3)), "v": np.ones((2, 3))}, ValueError, "v: expected shape"),
    ("append", (), {"k": np.ones((2, 3))}, ValueError, "append: expected k and v together"),
    ("append", (), {}, ValueError, "append: expected q"),
    ("append", (), {"q": np.ones((2, 3)), "k": np.ones((2, 3)), "v": [[1.0, "x"]] * 2}, TypeError, "v:"),
    ("update_k", (0, 0, 0.5), {"head": 2}, IndexError, "head=2"),
    ("update_k", (0, 0, 0.5), {}, TypeError, "head: expected an index"),
    ("update_v", (0, 0, 0.5), {"head": (0, 1)}, IndexError, "head: expected a 1-tuple"),
    ("query", (0, 0), {"head": 1.0}, TypeError, "head: expected an integer"),
    ("query_many", ([0], [0]), {}, TypeError, "heads: expected head indices"),
    ("query_many", ([0], [0]), {"heads": [2]}, IndexError, "heads contains 2"),
    ("query_many", ([0, 1], [0, 1]), {"heads": [0]}, ValueError, "heads: expected 2 head indices"),
    ("query_rows", ([0, 5],), {}, IndexError, "rows contains 5"),
    ("query_rows", ([[0]],), {}, ValueError, "rows: expected a 1-D"),
]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("method, args, kwargs, error, message", BAD_CALLS)
def test_bad_calls_raise_and_change_nothing(name, method, args, kwargs, error, message):
    Q, K, V = heads_problem((2,), 5, 6, 3, 2, seed=9)
    att = VARIANTS[name](Q, K, V)
    att.update_k(1, 1, 0.5, head=1)
    before = state_of(att)
    with pytest.raises(error, match=message):
        getattr(att, method)(*args, **kwargs)
    assert_same_state(before, state_of(att))


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"causal": True}, ValueError, "causal: .* supports no mask"),
        ({"causal": 1}, TypeError, "causal: expected True or False"),
        ({"key_mask": np.ones(6, dtype=bool)}, ValueError, "key_mask: .* supports no mask"),
        ({"dtype": np.float16}, TypeError, "dtype: expected float32 or float64"),
        ({"scale": float("nan")}, ValueError, "scale: expected a finite"),
    ],
)
def test_constructor_rejects_bad_options(name, options, error, message):
    Q, K, V = heads_problem((2,), 5, 6, 3, 2, seed=9)
    with pytest.raises(error, match=message):
        BASELINES[name](Q, K, V, **options)


def test_constructor_rejects_mismatched_heads():
    Q, K, V = heads_problem((2,), 5, 6, 3, 2, seed=9)
    for name, cls in BASELINES.items():
        with pytest.raises(ValueError, match="K: "):
            cls(Q, K[:1], V)
        with pytest.raises(ValueError, match="V: "):
            cls(Q, K, V[..., :4, :])
        assert cls(Q, K, V, tau=0.25, tol=1e-3, certify=False).n == 5, name


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"storage": "sparse"}, ValueError, "storage: expected one of"),
        ({"memory_budget": -1}, ValueError, "memory_budget"),
    ],
)
def test_eager_rejects_bad_storage_options(options, error, message):
    Q, K, V = heads_problem((2,), 5, 6, 3, 2, seed=9)
    with pytest.raises(error, match=message):
        Eager(Q, K, V, **options)


def test_rows_rejects_a_bad_kernel(backend):
    Q, K, V = heads_problem((2,), 5, 6, 3, 2, seed=9)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        Rows(Q, K, V, kernel="flash")
    if backend == "torch":
        with pytest.raises(ValueError, match="kernel: 'numpy' needs the numpy backend"):
            Rows(Q, K, V, kernel="numpy")
