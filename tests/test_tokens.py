"""Token-level use: row edits, append/delete, masks, heads, batched calls, save/load.

Every operation is mirrored on a plain numpy model of (Q, K, V, mask) and the
structure's answers are compared with dynattn.testing.reference_attention,
head by head, with the same mask and scale.
"""

import os
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _schedules import AUTO_AWAKE, build, tau_schedules
from conftest import assert_rows_certified, assert_same_state, state_of
from dynattn import DynamicAttention
from dynattn.structure import SCHEDULES
from dynattn.testing import as_numpy, assert_attention_close, reference_attention

STORAGES = ["dense", "implicit"]
DTYPES = [np.float64, np.float32]


class Model:
    """The plain-numpy truth: inputs with leading axes, key mask, positions."""

    def __init__(self, Q, K, V, *, scale, causal=False, key_mask=None, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.Q, self.K, self.V = (np.array(x, dtype=self.dtype) for x in (Q, K, V))
        self.scale, self.causal = scale, causal
        m, n = self.K.shape[-2], self.Q.shape[-2]
        self.visible = np.ones(m, bool) if key_mask is None else np.array(key_mask)
        self.qpos, self.kpos = np.arange(n), np.arange(m)
        self.next = max(n, m)

    def mask(self):
        mask = np.broadcast_to(self.visible, (self.Q.shape[-2], self.K.shape[-2]))
        if self.causal:
            mask = mask & (self.kpos[None, :] <= self.qpos[:, None])
        return mask

    def append_token(self, q, k, v):
        """A new token at the next position: query row q and key-value pair k, v (per head)."""
        self.Q = np.concatenate([self.Q, q[..., None, :].astype(self.dtype)], axis=-2)
        self.K = np.concatenate([self.K, k[..., None, :].astype(self.dtype)], axis=-2)
        self.V = np.concatenate([self.V, v[..., None, :].astype(self.dtype)], axis=-2)
        self.visible = np.append(self.visible, True)
        self.qpos = np.append(self.qpos, self.next)
        self.kpos = np.append(self.kpos, self.next)
        self.next += 1

    def heads(self):
        batch = self.Q.shape[:-2]
        flat = [x.reshape(-1, *x.shape[-2:]) for x in (self.Q, self.K, self.V)]
        return batch, list(zip(*flat, strict=True))

    def check(self, att, context=""):
        out = as_numpy(att.output())
        batch, heads = self.heads()
        flat_out = out.reshape(-1, *out.shape[-2:])
        worst = 0.0
        for h, (q, k, v) in enumerate(heads):
            worst = max(
                worst,
                assert_attention_close(
                    flat_out[h],
                    q,
                    k,
                    v,
                    scale=self.scale,
                    dtype=self.dtype,
                    context=context,
                    mask=self.mask(),
                ),
            )
        assert out.shape == (*batch, self.Q.shape[-2], self.V.shape[-1])
        return worst


def problem(batch, n, m, d, e, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((*batch, n, d))
    K = rng.standard_normal((*batch, m, d))
    V = rng.standard_normal((*batch, m, e))
    return [x.astype(dtype) for x in (Q, K, V)]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "schedule"), tau_schedules([0.0, 0.5, 1.0, "auto", AUTO_AWAKE]))
def test_row_edits_match_reference(storage, dtype, tau, schedule):
    n, m, d, e = 11, 13, 4, 3
    Q, K, V = problem((), n, m, d, e, seed=1, dtype=dtype)
    scale = 1 / np.sqrt(d)
    att = build(Q, K, V, tau=tau, scale=scale, storage=storage, dtype=dtype, schedule=schedule)
    model = Model(Q, K, V, scale=scale, dtype=dtype)
    rng = np.random.default_rng(2)
    for step in range(30):
        c = int(rng.integers(m))
        kind = step % 4
        if kind == 0:
            k = rng.standard_normal(d) * 2
            att.set_key(c, k)
            model.K[c] = k
        elif kind == 1:
            v = rng.standard_normal(e)
            att.set_value(c, v)
            model.V[c] = v
        elif kind == 2:
            i = int(rng.integers(n))
            q = rng.standard_normal(d)
            att.set_query(i, q)
            model.Q[i] = q
        else:
            i = int(rng.integers(min(n, m)))
            q, k, v = rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal(e)
            att.set_token(i, q=q, k=k, v=v)
            model.Q[i], model.K[i], model.V[i] = q, k, v
        att._check()
        model.check(att, context=f"step {step}: ")
        i, j = int(rng.integers(n)), int(rng.integers(e))
        assert abs(att.query(i, j) - as_numpy(att.output())[i, j]) <= 1e-12 * (
            1 + abs(as_numpy(att.output())[i, j])
        )


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4,), (2, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_transformer_layer_token_edit_equals_from_scratch(storage, dtype, heads, causal):
    """Scale 1/sqrt(d), several heads: a token edit, then queries, equal the from-scratch output."""
    n, d, e = 17, 8, 8
    Q, K, V = problem(heads, n, n, d, e, seed=3, dtype=dtype)
    scale = 1 / np.sqrt(d)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=scale, storage=storage, dtype=dtype, causal=causal)
    model = Model(Q, K, V, scale=scale, causal=causal, dtype=dtype)
    model.check(att)
    rng = np.random.default_rng(4)
    for token in (5, 0, 16, 5):
        q, k, v = (rng.standard_normal((*heads, w)) for w in (d, d, e))
        att.set_token(token, q=q, k=k, v=v)
        model.Q[..., token, :], model.K[..., token, :], model.V[..., token, :] = q, k, v
        att._check()
        model.check(att, context=f"token {token}: ")
        fresh = DynamicAttention(att.Q, att.K, att.V, scale=scale, dtype=dtype, causal=causal)
        tolerance = 1e-12 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(as_numpy(att.output()), as_numpy(fresh.output()), rtol=0, atol=tolerance)
        # entry queries per head agree with the rows
        for head in range(int(np.prod(heads))):
            index = np.unravel_index(head, heads)
            row = as_numpy(att.query_row(token))[index]
            assert abs(att.query(token, 2, head=head) - row[2]) <= tolerance
            assert abs(att.query(token, 2, head=tuple(int(x) for x in index)) - row[2]) <= tolerance


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_decoding_by_append(storage, dtype):
    """Grow a causal self-attention one token at a time (capacity doubling)."""
    heads, d, e = (3,), 6, 5
    Q, K, V = problem(heads, 2, 2, d, e, seed=5, dtype=dtype)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.4, storage=storage, dtype=dtype, causal=True)
    model = Model(Q, K, V, scale=0.4, causal=True, dtype=dtype)
    rng = np.random.default_rng(6)
    for step in range(40):
        q, k, v = (rng.standard_normal((*heads, w)) for w in (d, d, e))
        pending = att.pending
        query_index, key_index = att.append(q=q, k=k, v=v)
        # no earlier query sees the new key: nothing becomes pending (the new row is exact)
        assert att.pending == pending or att.pending == 0
        assert (query_index, key_index) == (model.Q.shape[-2], model.K.shape[-2])
        model.append_token(q, k, v)
        if step % 3 == 1:  # an edit of an earlier token, so appends meet pending rows
            c = int(rng.integers(model.K.shape[-2]))
            k2, v2 = (rng.standard_normal((*heads, w)) for w in (d, e))
            att.set_token(c, k=k2, v=v2)
            model.K[..., c, :], model.V[..., c, :] = k2, v2
        if step % 5 == 0:
            att._check()
        model.check(att, context=f"append {step}: ")
    assert att.n == att.m == 42
    assert att.threshold == int(np.ceil(42**0.5))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reserve_makes_room_so_that_appends_reallocate_nothing(storage, schedule, tmp_path):
    heads, d, e = (2,), 5, 4
    Q, K, V = problem(heads, 9, 9, d, e, seed=21)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.5, storage=storage, causal=True, schedule=schedule)
    model = Model(Q, K, V, scale=0.5, causal=True)
    before = state_of(att)
    att.reserve(n=30, m=31)
    assert_same_state(before, state_of(att))  # the same structure, with room
    att._check()
    buffers = {key: buffer for key, (_, _, buffer) in att._state._buffers.items()}
    nbytes = att.nbytes
    rng = np.random.default_rng(22)
    for step in range(21):
        q, k, v = (rng.standard_normal((*heads, w)) for w in (d, d, e))
        att.append(q=q, k=k, v=v)
        model.append_token(q, k, v)
        if step % 4 == 1:  # pending rows across the appends
            c = int(rng.integers(model.K.shape[-2]))
            k2 = rng.standard_normal((*heads, d))
            att.set_key(c, k2)
            model.K[..., c, :] = k2
        if step % 5 == 0:
            att._check()
        model.check(att, context=f"append {step}: ")
    assert att.n == 30 and att.nbytes == nbytes
    assert all(att._state._buffers[key][2] is buffer for key, buffer in buffers.items())
    att.reserve(n=4, m=None)  # below today's sizes: nothing to do
    assert att.nbytes == nbytes
    att.append(*(rng.standard_normal((*heads, w)) for w in (d, d, e)))  # past the room: it grows
    assert att.n == 31 and att.nbytes > nbytes
    att.save(tmp_path / "reserved.npz")
    model.append_token(*(as_numpy(x)[..., -1, :] for x in (att.Q, att.K, att.V)))
    model.check(DynamicAttention.load(tmp_path / "reserved.npz"), context="loaded: ")


def test_regrowth_exposes_zeros_where_a_deleted_row_left_its_copy():
    # delete_query leaves a stale copy of the last row in the spare capacity; a growth of
    # the state past its capacity (several rows at once here) must not bring it back
    heads, d, e = (2,), 4, 3
    Q, K, V = problem(heads, 8, 8, d, e, seed=24)
    att = DynamicAttention(Q, K, V, tau=0.5, storage="implicit")
    att.delete_query(2)
    s = att._state
    stale = as_numpy(s.Q[:, -1])
    assert np.array_equal(as_numpy(s._buffers["Q"][2][:, att.n]), stale)  # the copy, in the spare row
    s.resize(n=att.n + 4)
    for name in ("Q", "N", "Z"):
        assert not as_numpy(getattr(s, name)[:, att.n :]).any(), name


def test_growth_within_capacity_zeroes_each_stale_row_it_exposes():
    # two deletions leave two stale rows past the live part; growing one row at a time
    # (no regrowth: room reserved) must zero each as it comes into view, and only those
    heads, d, e = (2,), 4, 3
    Q, K, V = problem(heads, 8, 8, d, e, seed=25)
    att = DynamicAttention(Q, K, V, tau=0.5, storage="implicit")
    att.reserve(n=16)
    att.delete_query(1)
    att.delete_query(1)
    s = att._state
    n = att.n
    assert as_numpy(s._buffers["Q"][2][:, n : n + 2]).any()  # the stale copies
    for grown in (n + 1, n + 2, n + 3):
        s.resize(n=grown)
        for name in ("Q", "N", "Z"):
            assert not as_numpy(getattr(s, name)[:, n:]).any(), (name, grown)


def test_reserve_checks_its_arguments_and_the_budget():
    heads, d, e = (2,), 4, 3
    Q, K, V = problem(heads, 16, 16, d, e, seed=23)
    att = DynamicAttention(Q, K, V, tau=0.5, causal=True)
    before = state_of(att)
    for kwargs, error, words in [
        ({"n": -1}, ValueError, "n: expected a number of rows >= 0"),
        ({"m": 2.5}, TypeError, "m"),
        ({"n": True}, TypeError, "n"),
    ]:
        with pytest.raises(error, match=words):
            att.reserve(**kwargs)
        assert_same_state(before, state_of(att))
    with pytest.raises(TypeError):
        att.reserve(40)  # keyword-only
    # under storage="auto", room whose dense weights would pass the budget means implicit storage
    budget = DynamicAttention(Q, K, V).nbytes * 2
    auto = DynamicAttention(Q, K, V, tau=0.5, causal=True, memory_budget=budget)
    assert auto.storage == "dense"
    auto.reserve(n=20, m=20)
    assert auto.storage == "dense" and auto.nbytes <= budget
    auto.reserve(n=64, m=64)
    assert auto.storage == "implicit"  # (the budget decides the storage, as growth does)
    assert auto.stats["storage_switches"] == 1
    auto._check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_storage_switches_to_implicit_before_growing_past_the_budget(tmp_path, dtype):
    heads, d, e = (2,), 4, 3
    Q, K, V = problem(heads, 24, 24, d, e, seed=8, dtype=dtype)
    budget = DynamicAttention(Q, K, V, dtype=dtype).nbytes + 1  # dense fits now, not after doubling
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.5, dtype=dtype, causal=True, memory_budget=budget)
    model = Model(Q, K, V, scale=0.5, causal=True, dtype=dtype)
    assert att.storage == "dense"
    rng = np.random.default_rng(9)
    for step in range(30):
        if step == 3:
            att.set_token(5, k=rng.standard_normal((*heads, d)))  # a pending row across the switch
            model.K[..., 5, :] = att.K[..., 5, :]
        q, k, v = (rng.standard_normal((*heads, w)) for w in (d, d, e))
        att.append(q=q, k=k, v=v)
        model.append_token(q, k, v)
        assert att.nbytes <= budget or att.storage == "implicit"
        model.check(att, context=f"append {step}: ")
    assert att.storage == "implicit" and att.stats["storage_switches"] == 1
    att._check()
    att.save(tmp_path / "grown.npz")
    again = DynamicAttention.load(tmp_path / "grown.npz")
    assert again.storage == "implicit" and again.config() == att.config()
    model.check(again, context="loaded: ")
    # an explicitly chosen storage is kept whatever the budget
    fixed = DynamicAttention(Q, K, V, dtype=dtype, causal=True, storage="dense", memory_budget=budget)
    for _ in range(30):
        fixed.append(*(rng.standard_normal((*heads, w)) for w in (d, d, e)))
    assert fixed.storage == "dense"


@pytest.mark.parametrize("storage", STORAGES)
def test_key_memory_append_delete_and_mask(storage):
    """A key-value memory: gains, loses (mask) and rewrites entries; queries come and go."""
    n, m, d, e = 7, 9, 3, 2
    Q, K, V = problem((), n, m, d, e, seed=8)
    key_mask = np.ones(m, dtype=bool)
    key_mask[[2, 6]] = False
    att = DynamicAttention(Q, K, V, tau=0.5, storage=storage, key_mask=key_mask)
    model = Model(Q, K, V, scale=1.0, key_mask=key_mask)
    model.check(att)
    rng = np.random.default_rng(9)
    for step in range(30):
        action = step % 5
        if action == 0:
            k, v = rng.standard_normal(d), rng.standard_normal(e)
            assert att.append(k=k, v=v) == (None, model.K.shape[0])
            model.K = np.vstack([model.K, k])
            model.V = np.vstack([model.V, v])
            model.visible = np.append(model.visible, True)
            model.kpos = np.append(model.kpos, model.next)
            model.next += 1
        elif action == 1:
            c = int(rng.integers(model.K.shape[0]))
            att.set_key_mask(c, False)  # masked, not deleted: the index is kept (tests/test_streams.py)
            model.visible[c] = False
        elif action == 2:
            c = int(np.flatnonzero(~model.visible)[0]) if (~model.visible).any() else 0
            att.set_key_mask(c, True)
            model.visible[c] = True
        elif action == 3:
            q = rng.standard_normal(d)
            att.append(q=q)
            model.Q = np.vstack([model.Q, q])
            model.qpos = np.append(model.qpos, model.next)
            model.next += 1
        else:
            i = int(rng.integers(model.Q.shape[0]))
            att.delete_query(i)
            model.Q = np.delete(model.Q, i, axis=0)
            model.qpos = np.delete(model.qpos, i)
        att._check()
        model.check(att, context=f"step {step}: ")
    assert np.array_equal(att.key_mask, model.visible)


def test_all_keys_masked_gives_zero_rows():
    Q, K, V = problem((), 3, 2, 2, 2, seed=1)
    att = DynamicAttention(Q, K, V, key_mask=np.array([True, False]))
    att.delete_key(0)
    np.testing.assert_array_equal(as_numpy(att.output()), 0.0)
    assert att.query(1, 1) == 0.0


@pytest.mark.parametrize("storage", STORAGES)
def test_rows_that_see_no_key_answer_zero_exactly_and_cheaply(storage):
    """Causal row 0 sees only key 0; once it is hidden, row 0 answers 0 with bound 0
    and without recomputing anything, while the other rows stay correct."""
    Q, K, V = problem((2,), 4, 4, 3, 2, seed=3)
    att = DynamicAttention(Q, K, V, causal=True, storage=storage, tau=1.0)
    att.delete_key(0)
    before = att.stats
    for answer in (att.query(0, 1, head=1), *as_numpy(att.query_row(0)).ravel()):
        assert answer == 0.0
    assert as_numpy(att.query_many([0, 0], [0, 1], heads=[0, 1])).tolist() == [0.0, 0.0]
    assert att.error_bound(0, head=0) == 0.0 and att.error_bound(1, head=0) > 0.0
    assert att.stats["query_fallbacks"] == before["query_fallbacks"]
    mask = np.tril(np.ones((4, 4), dtype=bool))
    mask[:, 0] = False
    for h in range(2):
        expected = reference_attention(Q[h], K[h], V[h], mask=mask)
        np.testing.assert_allclose(as_numpy(att.output())[h], expected, atol=1e-12)
    att.set_key_mask(0, True)  # row 0 sees key 0 again
    att._check()
    expected = reference_attention(Q[0], K[0], V[0], mask=np.tril(np.ones((4, 4), dtype=bool)))
    np.testing.assert_allclose(as_numpy(att.query_row(0))[0], expected[0], atol=1e-12)


@pytest.mark.parametrize("storage", STORAGES)
def test_rows_that_see_no_key_stay_exact_when_a_value_column_became_zero(storage):
    """A value column that was nonzero and is all zero now has an infinite ratio rho_j
    (values summed into the snapshot, none left); a row that sees no key has bound 0 and
    stays exact (0 times that ratio is no NaN, so no warning and no recomputation)."""
    Q, K, V = problem((), 5, 5, 3, 2, seed=4)
    V[2:, 1] = 0.0  # column 1 nonzero in rows 0 and 1 only
    att = DynamicAttention(Q, K, V, causal=True, storage=storage, tau=1.0)
    att.delete_key(0)  # row 0 now sees no key
    att.update_v(0, 1, -float(V[0, 1]))
    att.update_v(1, 1, -float(V[1, 1]))  # column 1 is all zero, its scale is not
    assert att.pending and att._column_ratio(np.array([0]), np.array([1]))[0] == np.inf
    before = att.stats["query_fallbacks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_numpy(att.query_row(0)).tolist() == [0.0, 0.0]
        assert as_numpy(att.query_many([0, 0], [0, 1])).tolist() == [0.0, 0.0]
        assert att.error_bound(0) == 0.0
    assert att.stats["query_fallbacks"] == before
    att._check()


@pytest.mark.parametrize("storage", STORAGES)
def test_batched_updates_equal_single_updates(storage):
    Q, K, V = problem((2,), 9, 12, 3, 4, seed=10)
    rng = np.random.default_rng(11)
    size = 40
    heads = rng.integers(2, size=size)
    rows, kcols, vcols = (
        rng.integers(12, size=size),
        rng.integers(3, size=size),
        rng.integers(4, size=size),
    )
    deltas = rng.normal(0, 0.5, size=size)
    many = DynamicAttention(Q, K, V, tau=0.5, storage=storage)
    single = DynamicAttention(Q, K, V, tau=0.5, storage=storage)
    many.update_k_many(rows, kcols, deltas, heads=heads)
    many.update_v_many(rows, vcols, -deltas, heads=heads)
    for h, c, jk, x in zip(heads, rows, kcols, deltas, strict=True):
        single.update_k(int(c), int(jk), float(x), head=int(h))
    for h, c, jv, x in zip(heads, rows, vcols, deltas, strict=True):
        single.update_v(int(c), int(jv), float(-x), head=int(h))
    np.testing.assert_array_equal(as_numpy(many.K), as_numpy(single.K))
    np.testing.assert_array_equal(as_numpy(many.V), as_numpy(single.V))
    np.testing.assert_allclose(as_numpy(many.output()), as_numpy(single.output()), rtol=0, atol=1e-13)
    query_rows = rng.integers(9, size=25)
    query_cols = rng.integers(4, size=25)
    query_heads = rng.integers(2, size=25)
    expected = as_numpy(single.output())[query_heads, query_rows, query_cols]
    np.testing.assert_allclose(
        as_numpy(many.query_many(query_rows, query_cols, heads=query_heads)),
        expected,
        rtol=0,
        atol=1e-13,
    )


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_batch_folds_once_for_all_its_rows(storage, dtype):
    """update_k_many / update_v_many touching many more rows than the threshold fold once,
    and every row's answer stays within its certified bound of the exact attention."""
    heads, n, m, d, e = (3,), 10, 40, 4, 3
    Q, K, V = problem(heads, n, m, d, e, seed=30)
    att = DynamicAttention(Q, K, V, tau=0.5, storage=storage, dtype=dtype)
    rng = np.random.default_rng(31)
    size = 120
    rows, hs = rng.integers(m, size=size), rng.integers(3, size=size)
    att.update_k_many(rows, rng.integers(d, size=size), rng.normal(0, 0.3, size), heads=hs)
    assert att.stats["folds"] == 1 and att.pending == 0  # one fold for every touched row
    att._check()
    att.update_v_many(rows, rng.integers(e, size=size), rng.normal(0, 0.3, size), heads=hs)
    assert att.stats["folds"] == 2
    att._check()
    assert_rows_certified(att, *(as_numpy(x).astype(np.float64) for x in (att.Q, att.K, att.V)))


def test_a_batch_interrupted_by_an_error_leaves_a_consistent_structure(monkeypatch):
    """Validation makes a batch all-or-nothing for bad input; should an update fail
    anyway (memory), the structure folds what is pending and its invariants hold."""
    Q, K, V = problem((2,), 10, 40, 4, 3, seed=34)
    att = DynamicAttention(Q, K, V, tau=0.5)
    apply_k, calls = att._apply_k, []

    def failing(h, c, j, new):
        calls.append(c)
        if len(calls) == 30:
            raise MemoryError("simulated")
        apply_k(h, c, j, new)

    monkeypatch.setattr(att, "_apply_k", failing)
    rng = np.random.default_rng(35)
    with pytest.raises(MemoryError):
        att.update_k_many(np.arange(40), rng.integers(4, size=40), np.full(40, 0.1), heads=np.zeros(40, int))
    assert att.pending < att.threshold
    att._check()


def test_a_batch_keeps_within_the_memory_budget():
    """With little room left in memory_budget a batch folds as often as its pending buffers
    need, and storage="auto" keeps its dense storage."""
    heads, n, m, d, e = (2,), 64, 400, 4, 3
    Q, K, V = problem(heads, n, m, d, e, seed=32)
    probe = DynamicAttention(Q, K, V, tau=0.5, storage="auto")
    per_slot = 16 * 2 * (n + e)
    budget = probe.nbytes + 4 * probe.threshold * per_slot  # room for about twice the threshold
    att = DynamicAttention(Q, K, V, tau=0.5, storage="auto", memory_budget=budget)
    assert att.storage == "dense"
    rng = np.random.default_rng(33)
    size = 600
    hs = rng.integers(2, size=size)
    rows, cols = rng.integers(m, size=size), rng.integers(d, size=size)
    att.update_k_many(rows, cols, rng.normal(0, 0.3, size), heads=hs)
    assert att.storage == "dense" and att.nbytes <= budget
    assert 1 < att.stats["folds"] < size // att.threshold  # batched, within the room
    att._check()


BAD_TOKEN_CALLS = [
    ("set_key", (9, np.ones(3)), IndexError, "c=9"),
    ("set_key", (0, np.ones(4)), ValueError, r"k: expected shape \(3,\)"),
    ("set_key", (0, np.array([1.0, np.nan, 0])), ValueError, "k: expected finite"),
    ("set_value", (0, np.ones((1, 2))), ValueError, r"v: expected shape \(2,\)"),
    ("set_value", (0, np.array([np.inf, 0])), ValueError, "v: expected finite"),
    ("set_query", (7, np.ones(3)), IndexError, "i=7"),
    ("set_query", (0, ["a", "b", "c"]), TypeError, "q: expected a real numeric"),
    ("set_token", (0,), ValueError, "expected at least one of q, k, v"),
    (
        "set_token",
        (0, np.ones(3), np.ones(3), np.array([1.0, np.nan])),
        ValueError,
        "v: expected finite",
    ),
    ("set_token", (9, None, np.ones(3)), IndexError, "i=9"),
    ("set_token", (7, np.ones(3)), IndexError, "i=7"),
    ("append", (None, np.ones(3)), ValueError, "expected k and v together"),
    ("append", (), ValueError, "expected q, or k and v"),
    ("append", (np.ones(2),), ValueError, r"q: expected shape \(3,\)"),
    ("append", (np.ones(3), np.ones(3), np.ones(3)), ValueError, r"v: expected shape \(2,\)"),
    ("delete_key", (9,), IndexError, "c=9"),
    ("delete_query", (7,), IndexError, "i=7"),
    ("set_key_mask", (0, 1), TypeError, "visible: expected True or False"),
    ("update_k_many", ([0, 9], [0, 0], [0.1, 0.1]), IndexError, "rows contains 9"),
    ("update_k_many", ([0, 1], [0, 0], [0.1, np.nan]), ValueError, "deltas: expected finite"),
    ("update_k_many", ([0, 1], [0, 0], [0.1]), ValueError, "equal lengths"),
    ("update_v_many", ([0, 1], [0, 2], [0.1, 0.1]), IndexError, "cols contains 2"),
    ("update_v_many", ([0, 0], [0, 0], [3e38, 3e38]), ValueError, "overflow float32"),
    ("query_many", ([0], [0]), None, None),
    ("update_k", (0, 0, 0.1), None, None),
    ("update_k", (0, 0, 0.1, 0), TypeError, "positional"),
    ("query", (0, 0), None, None),
]


@pytest.mark.parametrize("method, args, error, message", BAD_TOKEN_CALLS)
def test_bad_token_calls_leave_state_unchanged(method, args, error, message):
    Q, K, V = problem((), 7, 9, 3, 2, seed=12, dtype=np.float32)
    att = DynamicAttention(Q, K, V, tau=0.5, dtype=np.float32)
    att.update_v(3, 1, 0.5)  # something pending
    if error is None:
        getattr(att, method)(*args)  # good calls work
        return
    before = state_of(att)
    with pytest.raises(error, match=message):
        getattr(att, method)(*args)
    assert_same_state(before, state_of(att))


def test_head_argument_is_checked():
    Q, K, V = problem((2, 3), 4, 5, 2, 2, seed=13)
    att = DynamicAttention(Q, K, V)
    assert att.heads == 6 and att.batch_shape == (2, 3)
    with pytest.raises(TypeError, match="head: expected an index"):
        att.update_k(0, 0, 0.1)
    with pytest.raises(IndexError, match="head=6"):
        att.query(0, 0, head=6)
    with pytest.raises(IndexError, match="head: expected a 2-tuple"):
        att.query(0, 0, head=(1,))
    with pytest.raises(ValueError, match="K: expected leading"):
        DynamicAttention(Q, K[0], V)
    single = DynamicAttention(Q[0, 0], K[0, 0], V[0, 0])
    with pytest.raises(IndexError, match="no head axis"):
        single.query(0, 0, head=1)
    assert att.query(1, 1, head=(1, 2)) == att.query(1, 1, head=5)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_and_load_round_trip(tmp_path, storage, dtype):
    Q, K, V = problem((2,), 8, 10, 3, 4, seed=14, dtype=dtype)
    att = DynamicAttention(Q, K, V, tau=0.75, storage=storage, dtype=dtype, causal=True, scale=0.7)
    rng = np.random.default_rng(15)
    for _ in range(5):
        att.update_k(int(rng.integers(10)), int(rng.integers(3)), 0.3, head=int(rng.integers(2)))
        att.set_value(int(rng.integers(10)), rng.standard_normal((2, 4)))
    att.append(q=rng.standard_normal((2, 3)), k=rng.standard_normal((2, 3)), v=rng.standard_normal((2, 4)))
    assert att.pending > 0
    path = tmp_path / "state.npz"
    att.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.npz"]  # no temporary left behind
    loaded = DynamicAttention.load(path)
    loaded._check()
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    assert loaded.pending == att.pending and loaded.threshold == att.threshold
    assert loaded.stats == att.stats and loaded.storage == att.storage
    for structure in (att, loaded):  # the same future
        structure.update_k(1, 1, -0.4, head=1)
        structure.set_token(2, q=np.ones((2, 3)), v=np.zeros((2, 4)))
        structure.append(q=np.ones((2, 3)), k=np.ones((2, 3)), v=np.ones((2, 4)))
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    assert loaded.query(3, 1, head=0) == att.query(3, 1, head=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    Q, K, V = problem((), 4, 4, 2, 2, seed=16)
    att = DynamicAttention(Q, K, V)
    path = tmp_path / "state.npz"
    att.save(path)
    original = path.read_bytes()
    att.update_k(0, 0, 1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        att.save(path)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.frombuffer(b'{"format": 99}', dtype=np.uint8))
    with pytest.raises(ValueError, match="path: expected a dynattn file"):
        DynamicAttention.load(path)


@given(
    actions=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "key",
                    "value",
                    "query",
                    "token",
                    "append",
                    "delete_key",
                    "show_key",
                    "delete_query",
                    "entry_k",
                    "rebuild",
                ]
            ),
            st.integers(0, 1000),
            st.integers(0, 2**31 - 1),
        ),
        min_size=1,
        max_size=20,
    ),
    causal=st.booleans(),
    storage=st.sampled_from(STORAGES),
    dtype=st.sampled_from(DTYPES),
    schedule=st.sampled_from(SCHEDULES),
)
def test_hypothesis_token_sequences(actions, causal, storage, dtype, schedule):
    heads, d, e = (2,), 3, 2
    Q, K, V = problem(heads, 4, 4, d, e, seed=len(actions), dtype=dtype)
    att = DynamicAttention(
        Q, K, V, tau=0.5, storage=storage, dtype=dtype, causal=causal, scale=0.8, schedule=schedule
    )
    model = Model(Q, K, V, scale=0.8, causal=causal, dtype=dtype)
    for kind, index, seed in actions:
        rng = np.random.default_rng(seed)
        n, m = model.Q.shape[-2], model.K.shape[-2]
        q, k = rng.standard_normal((*heads, d)) * 2, rng.standard_normal((*heads, d)) * 2
        v = rng.standard_normal((*heads, e))
        if kind == "key":
            att.set_key(index % m, k)
            model.K[..., index % m, :] = k
        elif kind == "value":
            att.set_value(index % m, v)
            model.V[..., index % m, :] = v
        elif kind == "query":
            att.set_query(index % n, q)
            model.Q[..., index % n, :] = q
        elif kind == "token":
            i = index % min(n, m)
            att.set_token(i, q=q, k=k, v=v)
            model.Q[..., i, :], model.K[..., i, :], model.V[..., i, :] = q, k, v
        elif kind == "append":
            att.append(q=q, k=k, v=v)
            model.append_token(q, k, v)
        elif kind in ("delete_key", "show_key"):
            c = index % m
            att.set_key_mask(c, kind == "show_key")
            model.visible[c] = kind == "show_key"
        elif kind == "delete_query" and n > 1:
            att.delete_query(index % n)
            model.Q = np.delete(model.Q, index % n, axis=-2)
            model.qpos = np.delete(model.qpos, index % n)
        elif kind == "entry_k":
            h, c, j = index % 2, index % m, index % d
            att.update_k(c, j, 1.5, head=h)
            model.K[h, c, j] += dtype(1.5)
        else:
            att.rebuild()
        att._check()
    model.check(att)
