"""schedule="spread": folds done a slice of query rows per update (docs/latency.md).

Every test runs the same operations on a spread structure and checks it against the
float64 reference and, where it makes sense, against an amortized twin: the schedule
changes when the fold's work is done, never the answers' accuracy or certificate.
"""

import math

import numpy as np
import pytest

from dynattn import DynamicAttention, structure
from dynattn.testing import as_numpy, assert_attention_close, random_problem

STORAGES = ("dense", "implicit")
DTYPES = (np.float64, np.float32)


def _certified(att, context=""):
    Q, K, V = (as_numpy(x).astype(np.float64) for x in (att._Q, att._K, att._V))
    mask = None
    if not att.key_mask.all():
        mask = np.broadcast_to(att.key_mask, (att.n, att.m))
    assert_attention_close(
        as_numpy(att.output()), Q, K, V, scale=att._scale, dtype=att._dtype, mask=mask, context=context
    )


def _random_updates(att, rng, count):
    for _ in range(count):
        c = int(rng.integers(att.m))
        if rng.random() < 0.6:
            att.update_k(c, int(rng.integers(att.d)), float(rng.normal(0, 0.3)))
        else:
            att.update_v(c, int(rng.integers(att.e)), float(rng.normal()))


def _slices_recorded(att, monkeypatch):
    """Record the query rows every fold product covers, as (rows, clear) per call."""
    calls = []
    original = structure.DynamicAttention._fold_rows

    def recording(self, slots, rows, *, clear=False):
        calls.append((rows.stop - rows.start, clear))
        return original(self, slots, rows, clear=clear)

    monkeypatch.setattr(structure.DynamicAttention, "_fold_rows", recording)
    return calls


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.5, 0.75, 0.9])
def test_spread_answers_match_reference_and_amortized(storage, dtype, tau, backend):
    Q, K, V = random_problem(67, 53, 7, 5, seed=3)
    spread = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype, schedule="spread")
    amortized = DynamicAttention(Q, K, V, tau=tau, storage=storage, dtype=dtype)
    rng_spread, rng_amortized = np.random.default_rng(1), np.random.default_rng(1)
    for block in range(12):
        _random_updates(spread, rng_spread, 17)
        _random_updates(amortized, rng_amortized, 17)
        spread._check()
        _certified(spread, f"block {block}")
        np.testing.assert_allclose(
            as_numpy(spread.output()),
            as_numpy(amortized.output()),
            rtol=0,
            atol=1e-9 if dtype == np.float64 else 1e-4,
        )
    stats = spread.stats
    assert stats["folds"] >= 2 and stats["fold_slices"] > stats["folds"]
    assert spread.schedule == "spread" and amortized.schedule == "amortized"


@pytest.mark.parametrize("storage", STORAGES)
def test_no_update_folds_more_than_its_slice(storage, monkeypatch):
    """The stall the schedule removes: between the fold's start and its end, each update
    folds at most one slice of rows (n / spread_length per update, gathered into slices of
    about MIN_SLICE_FLOPS)."""
    n, m = 400, 256
    Q, K, V = random_problem(n, m, 8, 6, seed=4)
    att = DynamicAttention(Q, K, V, tau=0.75, storage=storage, schedule="spread")
    calls = _slices_recorded(att, monkeypatch)
    rng = np.random.default_rng(5)
    widest = 0
    for _ in range(600):
        before = len(calls)
        length = att._state.spread_length
        slice_rows = att._slice_rows() if length else 0
        _random_updates(att, rng, 1)
        for rows, clear in calls[before:]:
            assert clear, "an update folded every row at once"
            # rows come due at n / spread_length per update and are folded once a slice's
            # worth (_slice_rows) is due
            allowed = math.ceil(n / max(length, 1)) + slice_rows
            assert rows <= allowed, (rows, allowed)
            widest = max(widest, rows)
    assert att.stats["folds"] >= 3 and widest > 0
    att._check()
    _certified(att)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_and_load_mid_fold(storage, dtype, tmp_path, backend):
    Q, K, V = random_problem(45, 38, 5, 4, seed=6)
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, dtype=dtype, schedule="spread")
    rng = np.random.default_rng(7)
    while not (att._state.spread_length and 0 < att._state.folded_rows < att.n and att.pending):
        _random_updates(att, rng, 1)
    path = tmp_path / "mid.npz"
    att.save(path)
    loaded = DynamicAttention.load(path)
    assert loaded.schedule == "spread" and loaded._state.folded_rows == att._state.folded_rows
    loaded._check()
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    # both continue identically, through the end of this fold and the next ones
    for twin in (att, loaded):
        _random_updates(twin, np.random.default_rng(8), 80)
        twin._check()
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    _certified(loaded)


@pytest.mark.parametrize("storage", STORAGES)
def test_rebuild_mid_fold_finishes_everything(storage):
    Q, K, V = random_problem(30, 29, 4, 3, seed=9)
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, schedule="spread")
    rng = np.random.default_rng(10)
    while not (att._state.spread_length and att._state.folded_rows and att.pending):
        _random_updates(att, rng, 1)
    folds = att.stats["folds"]
    att.rebuild()
    state = att._state
    assert att.pending == 0 and state.t == 0 and not state.folding_slot_of and state.folded_rows == 0
    assert att.stats["folds"] == folds + 2  # the fold in progress, then the pending rows
    att._check()
    _certified(att)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("causal", [False, True])
def test_query_rows_added_and_removed_mid_fold(storage, causal):
    """Appending and deleting query rows while a fold is spread over them: the folded
    boundary follows the rows."""
    Q, K, V = random_problem(24, 24, 4, 3, seed=11)
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, schedule="spread", causal=causal)
    rng = np.random.default_rng(12)
    for step in range(120):
        _random_updates(att, rng, 1)
        state = att._state
        if step % 9 == 4 and state.spread_length:
            folded = state.folded_rows
            victim = int(rng.integers(att.n))
            att.delete_query(victim)
            assert state.folded_rows == folded - (victim < folded)
        if step % 7 == 3:
            att.append(*(rng.standard_normal((1, width))[0] for width in (4, 4, 3)))
        att._check()
        if step % 10 == 0:
            Q64, K64, V64 = (as_numpy(x).astype(np.float64) for x in (att._Q, att._K, att._V))
            mask = None
            if causal:
                mask = att._state.key_pos[None, :] <= att._state.query_pos[:, None]
            assert_attention_close(
                as_numpy(att.output()),
                Q64,
                K64,
                V64,
                scale=1.0,
                dtype=np.float64,
                mask=mask,
                context=f"step {step}",
            )


@pytest.mark.parametrize("storage", STORAGES)
def test_token_edits_of_rows_being_folded(storage):
    """A key or value row edited again while its previous change is being folded: the new
    pending row starts from the folding row's new weights where those are not folded yet."""
    Q, K, V = random_problem(50, 20, 6, 4, seed=13)
    att = DynamicAttention(Q, K, V, tau=1.0, storage=storage, schedule="spread")
    rng = np.random.default_rng(14)
    hot = [2, 5, 11]
    edits = 0
    for step in range(200):
        c = hot[step % 3] if step % 2 else int(rng.integers(att.m))
        if rng.random() < 0.5:
            att.set_key(c, rng.standard_normal(6))
        else:
            att.set_value(c, rng.standard_normal(4))
        state = att._state
        edits += bool(set(state.slot_of) & set(state.folding_slot_of))
        att._check()
    assert edits > 10  # rows pending and folding at once did happen
    _certified(att)


def test_heads_and_key_mask_mid_fold():
    Q, K, V = random_problem(33, 31, 4, 3, seed=15)
    Q, K, V = (np.stack([x, x[::-1].copy(), 0.5 * x]) for x in (Q, K, V))
    att = DynamicAttention(Q, K, V, tau=1.0, schedule="spread")
    rng = np.random.default_rng(16)
    for step in range(150):
        h, c = int(rng.integers(3)), int(rng.integers(att.m))
        if step % 5 == 0:
            att.set_key_mask(c, bool(rng.random() < 0.6))
        else:
            att.update_k(c, int(rng.integers(4)), float(rng.normal(0, 0.5)), head=h)
        att._check()
    Q64, K64, V64 = (as_numpy(x).astype(np.float64) for x in (att._Q, att._K, att._V))
    mask = np.broadcast_to(att.key_mask, (att.n, att.m))
    out = as_numpy(att.output())
    for h in range(3):
        assert_attention_close(out[h], Q64[h], K64[h], V64[h], scale=1.0, dtype=np.float64, mask=mask)


def test_bad_schedule_arguments():
    Q, K, V = random_problem(4, 4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="schedule.*'amortized'.*'spread'"):
        DynamicAttention(Q, K, V, schedule="eager")
    with pytest.raises(ValueError, match='schedule: "spread" works with a fixed tau'):
        DynamicAttention(Q, K, V, tau="auto", schedule="spread")


def test_policy_text_describes_the_fold_in_progress():
    Q, K, V = random_problem(40, 40, 4, 3, seed=17)
    att = DynamicAttention(Q, K, V, tau=1.0, schedule="spread")
    assert "no fold in progress" in att.policy
    rng = np.random.default_rng(18)
    while not att._state.folded_rows:
        _random_updates(att, rng, 1)
    assert f"of {att.n} query rows done" in att.policy
