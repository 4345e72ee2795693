"""Streams and composition: freed key indices, sliding windows, (O, LSE) states and merges.

Every structure is mirrored by a plain numpy model that keeps the keys by index
(a deleted index is reused by the next append, as the structure does) and is
compared with the float64 reference on the visible keys only.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn import DynamicAttention, merge_states, merge_states_many
from dynattn.testing import as_numpy, assert_attention_close

STORAGES = ["dense", "implicit"]
DTYPES = [np.float64, np.float32]


class StreamModel:
    """Keys by index with positions, a visibility mask and a free list, per head."""

    def __init__(self, Q, K, V, *, scale, causal, dtype):
        self.dtype = np.dtype(dtype)
        self.Q, self.K, self.V = (np.array(x, dtype=self.dtype) for x in (Q, K, V))
        self.scale, self.causal = scale, causal
        n, m = Q.shape[-2], K.shape[-2]
        self.visible, self.free = np.ones(m, bool), np.zeros(m, bool)
        self.qpos, self.kpos, self.next = np.arange(n), np.arange(m), max(n, m)

    def append(self, q=None, k=None, v=None):
        position, self.next = self.next, self.next + 1
        key_index = query_index = None
        if k is not None:
            free = np.flatnonzero(self.free)
            if free.size:
                key_index = int(free[0])
                self.K[:, key_index], self.V[:, key_index] = k, v
                self.kpos[key_index], self.visible[key_index], self.free[key_index] = position, True, False
            else:
                key_index = self.K.shape[-2]
                self.K = np.concatenate([self.K, k[:, None].astype(self.dtype)], axis=-2)
                self.V = np.concatenate([self.V, v[:, None].astype(self.dtype)], axis=-2)
                self.kpos, self.visible = np.append(self.kpos, position), np.append(self.visible, True)
                self.free = np.append(self.free, False)
        if q is not None:
            query_index = self.Q.shape[-2]
            self.Q = np.concatenate([self.Q, q[:, None].astype(self.dtype)], axis=-2)
            self.qpos = np.append(self.qpos, position)
        return query_index, key_index

    def delete(self, c):
        self.visible[c], self.free[c] = False, True

    def mask(self):
        mask = np.broadcast_to(self.visible, (self.Q.shape[-2], self.K.shape[-2]))
        if self.causal:
            mask = mask & (self.kpos[None, :] <= self.qpos[:, None])
        return mask

    def lse(self):
        """Log-sum-exp over the visible keys in float64, ``(H, n)``; -inf for no key."""
        logits = np.einsum("hnd,hmd->hnm", self.Q, self.K, dtype=np.float64) * self.scale
        logits = np.where(self.mask()[None], logits, -np.inf)
        top = logits.max(axis=-1)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            total = np.exp(logits - safe[..., None]).sum(-1)
            return np.where(np.isfinite(top), safe + np.log(total), -np.inf)

    def check(self, att, context=""):
        out, lse = (as_numpy(x) for x in att.output(return_lse=True))
        for h in range(self.Q.shape[0]):
            assert_attention_close(
                out[h], self.Q[h], self.K[h], self.V[h], scale=self.scale, dtype=self.dtype,
                mask=self.mask(), context=f"{context}head {h}: ",
            )  # fmt: skip
        expected = self.lse()
        assert np.array_equal(np.isinf(lse), np.isinf(expected)), f"{context}rows without keys"
        finite = np.isfinite(expected)
        tolerance = 1e-9 if self.dtype == np.float64 else 2e-4 * (1 + np.abs(expected[finite]))
        assert np.all(np.abs(lse[finite] - expected[finite]) <= tolerance), f"{context}LSE"


def problem(H, n, m, d, e, seed, dtype):
    rng = np.random.default_rng(seed)
    shapes = ((n, d), (m, d), (m, e))
    return tuple(rng.standard_normal((H, rows, width)).astype(dtype) for rows, width in shapes)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_deleted_indices_are_reused_and_memory_stays_bounded(storage, dtype, causal):
    H, d, e, window = 2, 3, 4, 6
    Q, K, V = problem(H, 5, window, d, e, seed=1, dtype=dtype)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.7, storage=storage, dtype=dtype, causal=causal)
    model = StreamModel(Q, K, V, scale=0.7, causal=causal, dtype=dtype)
    rng = np.random.default_rng(2)
    for step in range(60):
        q = rng.standard_normal((H, d)) if causal else None
        k, v = rng.standard_normal((H, d)), rng.standard_normal((H, e))
        oldest = int(np.argmin(np.where(model.free, np.iinfo(np.int64).max, model.kpos)))
        att.delete_key(oldest)
        model.delete(oldest)
        expected = (att.n if causal else None, oldest)
        assert att.append(q=q, k=k, v=v) == model.append(q=q, k=k, v=v) == expected
        if step % 7 == 0:
            att._check()
            model.check(att, context=f"step {step}: ")
    assert att.m == window  # every append reused the index just freed
    att._check()
    model.check(att, context="end: ")


@pytest.mark.parametrize("storage", STORAGES)
def test_showing_a_deleted_key_keeps_it(storage):
    Q, K, V = problem(1, 4, 5, 2, 2, seed=3, dtype=np.float64)
    att = DynamicAttention(Q, K, V, storage=storage)
    model = StreamModel(Q, K, V, scale=1.0, causal=False, dtype=np.float64)
    att.delete_key(1)
    att.set_key_mask(1, True)
    att.delete_key(3)
    model.delete(3)
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((1, 2)), rng.standard_normal((1, 2))
    assert att.append(k=k, v=v) == model.append(k=k, v=v) == (None, 3)
    model.check(att)
    att._check()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_slide_keeps_the_window_and_the_sinks(storage, dtype):
    H, d, e, window, sinks = 2, 4, 3, 5, 2
    Q, K, V = problem(H, 6, window + sinks, d, e, seed=5, dtype=dtype)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.5, storage=storage, dtype=dtype)
    model = StreamModel(Q, K, V, scale=0.5, causal=False, dtype=dtype)
    rng = np.random.default_rng(6)
    for step in range(40):
        k, v = rng.standard_normal((H, d)), rng.standard_normal((H, e))
        _, key_index = att.slide(k, v, window=window, sinks=sinks)
        live = np.flatnonzero(~model.free)
        by_age = live[np.argsort(model.kpos[live])]
        for c in by_age[sinks : live.size + 1 - window]:
            model.delete(int(c))
        assert model.append(k=k, v=v)[1] == key_index
        if step % 9 == 0:
            model.check(att, context=f"slide {step}: ")
    assert sorted(np.flatnonzero(att.key_mask)) == sorted(np.flatnonzero(model.visible))
    assert set(np.flatnonzero(model.visible)) >= {0, 1}  # the sinks stay
    assert att.m == window + sinks  # evicted indices are reused
    model.check(att, context="end: ")
    att._check()
    with pytest.raises(ValueError, match="window"):
        att.slide(k, v, window=0)
    with pytest.raises(TypeError, match="window"):
        att.slide(k, v, window=2.5)
    with pytest.raises(ValueError, match="k: expected shape"):
        att.slide(k[:, :1], v, window=window)  # nothing was evicted
    model.check(att, context="after a bad call: ")


@given(
    actions=st.lists(
        st.tuples(st.sampled_from(["append", "delete", "edit", "query", "fold"]), st.integers(0, 10_000)),
        min_size=1,
        max_size=40,
    ),
    storage=st.sampled_from(STORAGES),
    causal=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_hypothesis_streams(actions, storage, causal):
    H, d, e = 2, 3, 2
    Q, K, V = problem(H, 4, 5, d, e, seed=7, dtype=np.float64)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.8, storage=storage, causal=causal)
    model = StreamModel(Q, K, V, scale=0.8, causal=causal, dtype=np.float64)
    rng = np.random.default_rng(8)
    for action, number in actions:
        if action == "append":
            q = rng.standard_normal((H, d)) if causal or number % 2 else None
            k, v = rng.standard_normal((H, d)), rng.standard_normal((H, e))
            assert att.append(q=q, k=k, v=v) == model.append(q=q, k=k, v=v)
        elif action == "delete":
            c = number % att.m
            att.delete_key(c)
            model.delete(c)
        elif action == "edit":
            c = number % att.m
            k = rng.standard_normal((H, d))
            att.set_key(c, k)
            model.K[:, c] = k
        elif action == "query":
            i = number % att.n
            expected = StreamModel.lse(model)[:, i]
            _, lse = att.query_rows([i], return_lse=True)
            assert np.allclose(as_numpy(lse)[:, 0], expected, rtol=0, atol=1e-9) or np.array_equal(
                as_numpy(lse)[:, 0], expected
            )
        else:
            att.fold()
        assert att.m <= int((~model.free).sum()) + len(actions) and att.m == model.K.shape[-2]
    att._check()
    model.check(att)


def test_window_soak_memory_stays_bounded():
    """Many window steps: the key capacity and nbytes stop growing once the window is full."""
    H, d, e, window = 2, 4, 4, 16
    Q, K, V = problem(H, 8, window, d, e, seed=9, dtype=np.float64)
    att = DynamicAttention(Q, K, V, tau=0.5, scale=0.5)
    model = StreamModel(Q, K, V, scale=0.5, causal=False, dtype=np.float64)
    rng = np.random.default_rng(10)
    steps = 1500  # benchmarks/bench_streams.py runs 100,000 steps
    keys, values = rng.standard_normal((steps, H, d)), rng.standard_normal((steps, H, e))
    for step in range(steps):
        att.slide(keys[step], values[step], window=window)
        if step == 100:
            settled = att.nbytes
    assert att.m == window and att.nbytes == settled
    model.K, model.V = as_numpy(att.K).copy(), as_numpy(att.V).copy()  # the live window, by index
    model.kpos = np.zeros(window, int)
    model.check(att, context=f"after {steps} steps: ")


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merging_a_maintained_segment_with_another_equals_attention_over_both(storage, dtype, backend):
    """Keys 0..5 maintained (causal, three deleted so early rows see none of them), keys
    6..9 computed separately: the merged state is attention over all visible keys."""
    H, n, d, e = 2, 6, 3, 4
    Q, K, V = problem(H, n, 10, d, e, seed=11, dtype=dtype)
    att = DynamicAttention(Q, K[:, :6], V[:, :6], scale=0.6, storage=storage, dtype=dtype, causal=True)
    for c in (0, 1, 2):
        att.delete_key(c)
    att.set_key(4, np.ones((H, d), dtype))
    o_a, lse_a = att.output(return_lse=True)
    # segment B: every query sees keys 6..9; a plain softmax in float64
    logits = np.einsum("hnd,hmd->hnm", Q.astype(np.float64), K[:, 6:].astype(np.float64)) * 0.6
    top = logits.max(-1, keepdims=True)
    weights = np.exp(logits - top)
    o_b = weights @ V[:, 6:].astype(np.float64) / weights.sum(-1, keepdims=True)
    lse_b = top[..., 0] + np.log(weights.sum(-1))
    if backend == "torch":
        import torch

        o_b, lse_b = torch.as_tensor(o_b, dtype=o_a.dtype), torch.as_tensor(lse_b, dtype=lse_a.dtype)
    else:
        o_b, lse_b = o_b.astype(o_a.dtype), lse_b.astype(lse_a.dtype)
    merged, lse = merge_states(o_a, lse_a, o_b, lse_b)
    model = StreamModel(Q, K, V, scale=0.6, causal=False, dtype=dtype)
    model.K[:, 4] = 1
    model.visible[:3] = False
    causal = np.arange(6)[None, :] <= np.arange(n)[:, None]
    mask = np.concatenate([causal & model.visible[None, :6], np.ones((n, 4), bool)], axis=1)
    for h in range(H):
        assert_attention_close(
            as_numpy(merged)[h], model.Q[h], model.K[h], model.V[h], scale=0.6, dtype=dtype, mask=mask,
            factor=8.0,
        )  # fmt: skip
    assert np.all(np.isfinite(as_numpy(lse)))
    # n-way: merging with an empty set (LSE -inf, garbage O) changes nothing
    empty = (as_numpy(merged) * np.nan, np.full(as_numpy(lse).shape, -np.inf))
    again, lse_again = merge_states_many([as_numpy(merged), empty[0]], [as_numpy(lse), empty[1]])
    assert np.array_equal(again, as_numpy(merged)) and np.array_equal(lse_again, as_numpy(lse))


def test_merge_rejects_mismatched_states():
    o, lse = np.zeros((2, 3, 4)), np.zeros((2, 3))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="lses: expected finite"):
            merge_states(o, lse, o, np.full((2, 3), bad))
    with pytest.raises(ValueError, match="state 1"):
        merge_states(o, lse, o, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="same positive number"):
        merge_states_many([o], [])
