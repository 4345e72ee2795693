"""tau="auto": deferred key columns and the online policy (docs/policy.md).

The rules are checked with fixed rates (:func:`dynattn.policy.use_rates`), so each
decision is a deterministic function of the operation sequence: a deferred column is
bought at the read where its rent reaches its price, the fold happens at the read
where the pending rows' rent reaches the fold's price, and answers stay exact while
the policy switches between regimes.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _schedules import AUTO_AWAKE, build
from dynattn import DynamicAttention, policy
from dynattn.testing import as_numpy, assert_attention_close, random_problem

STORAGES = ("dense", "implicit")
DTYPES = (np.float64, np.float32)


def _inputs(att):
    """The structure's current inputs as float64 ``(n, d), (m, d), (m, e)`` (one head)."""
    return (as_numpy(x).astype(np.float64) for x in (att._Q, att._K, att._V))


def _certified(att, *, mask=None, context=""):
    Q, K, V = _inputs(att)
    assert_attention_close(
        as_numpy(att.output()), Q, K, V, scale=att._scale, dtype=att._dtype, mask=mask, context=context
    )


def _check_rows(att, rows, mask=None):
    Q64, K64, V64 = _inputs(att)
    assert_attention_close(
        as_numpy(att.query_rows(rows)),
        Q64,
        K64,
        V64,
        scale=att._scale,
        dtype=att._dtype,
        rows=rows,
        mask=mask,
    )


def _visible(att, causal):
    """The (n, m) mask of a one-head structure: causal, or its key mask."""
    if causal:
        return np.tril(np.ones((att.n, att.m), bool))
    return np.broadcast_to(att.key_mask, (att.n, att.m))


@pytest.mark.parametrize("storage", STORAGES)
def test_key_updates_compute_no_column_until_read(storage):
    """Entry and row edits of keys under tau="auto" record the change only."""
    Q, K, V = random_problem(40, 30, 6, 5, seed=1)
    with policy.use_rates(policy.Rates(gemm=1.0, gemv=1e9, call=0.0)):  # folds: never by rent
        att = build(Q, K, V, tau=AUTO_AWAKE, storage=storage)
        for c in range(6):
            att.update_k(c, c % 6, 0.3)
        att.set_key(7, np.ones(6))
        stats = att.stats
        assert stats["fresh_columns"] == 0 and stats["columns_materialized"] == 0
        assert stats["columns_deferred"] == 7 and att.pending == 7
        att._check()
        value = att.query(3, 2)  # one row read: its logits only, no whole column
        assert att.stats["columns_materialized"] == 0
        Q64, K64, V64 = _inputs(att)
        logits = Q64[3] @ K64.T
        weights = np.exp(logits - logits.max())
        assert value == pytest.approx(weights @ V64[:, 2] / weights.sum(), rel=1e-12)
        att._check()


def test_reads_are_priced_per_head_they_read():
    """A read computes deferred columns head by head: a row read of every head counts as
    H head reads in read_rate and charges each deferred column H times the fixed steps."""
    rng = np.random.default_rng(3)
    H, n, d, e = 4, 12, 3, 2
    Q, K, V = (rng.standard_normal((H, n, w)) for w in (d, d, e))
    rates = policy.Rates(gemm=1e9, gemv=1e9, call=1e-6)
    with policy.use_rates(rates):
        att = build(Q, K, V, tau=AUTO_AWAKE)
        att.set_key(2, np.ones((H, d)))  # no reads yet: deferred
        s = att._state
        assert s.column_deferred[: s.t].sum() == 1
        att.query_rows([5])
        assert s.column_rent[0] == pytest.approx(policy.column_rent(H, d, 1, H))
        assert s.column_rent[0] > policy.column_rent(H, d, 1)  # more than one head's steps
        att.query(5, 0, head=1)  # an entry: one head
        assert s.reads_since_update == H + 1
        before = s.read_rate
        att.set_value(3, np.ones((H, e)))
        assert s.read_rate == pytest.approx(before + (H + 1 - before) / 32)
        att._check()


def test_deferred_column_is_bought_when_its_rent_reaches_its_price():
    n, d = 40, 4
    Q, K, V = random_problem(n, 9, d, 3, seed=2)
    with policy.use_rates(policy.Rates(gemm=1e-3, gemv=1e9, call=0.0)):  # folds: never by rent
        att = build(Q, K, V, tau=AUTO_AWAKE, storage="dense")
        att.update_k(4, 1, 0.5)
        price, rent = policy.column_price(1, n, d), policy.column_rent(1, d, 1)
        reads = 0
        while att.stats["columns_materialized"] == 0:
            att.query(reads % n, 0)
            reads += 1
            assert att.stats["columns_materialized"] == 0, "a read decided"
            att.update_v(4, 0, 0.0)  # an update: where the policy acts
            att._check()
            assert reads <= n + 2, "never bought"
        # bought at the update after the read whose rent reached the price (break-even)
        assert abs(reads - price / rent) <= 1
        assert att.stats["folds"] == 0 and att.pending == 1
        _certified(att)


def test_fold_happens_when_the_pending_rent_reaches_its_price():
    n, m, d, e = 40, 12, 8, 8
    Q, K, V = random_problem(n, m, d, e, seed=3)
    rates = policy.Rates(gemm=1e12, gemv=1e6, call=1e-6)
    with policy.use_rates(rates):
        att = build(Q, K, V, tau=AUTO_AWAKE, storage="implicit")
        for c in range(5):
            att.update_k(c, 0, 0.2)
        t = att.pending
        rent = policy.pending_rent(1, t, 1, t, d)
        price = policy.fold_price(1, n, d, e, t, t)
        # no column is bought first
        assert price / rent < policy.column_price(1, n, d) / policy.column_rent(1, d, t)
        att.update_v(0, 0, 0.0)  # row 0 pending for its value too: the price is final
        price = policy.fold_price(1, n, d, e, t + 1, t)
        reads = 0
        while att.stats["folds"] == 0:
            att.query(reads % n, 1)
            reads += 1
            assert att.stats["folds"] == 0, "a read decided"
            att.update_v(0, 0, 0.0)
            assert reads < 1000, "never folded"
        # folded at the update after the read whose rent made the total reach the price
        assert reads in (math.ceil(price / rent), math.ceil(price / rent) + 1)
        assert att.pending == 0 and att.stats["columns_materialized"] == t
        _certified(att)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("causal", [False, True])
def test_deferred_key_far_above_the_stabilizer_moves_it_when_read(storage, causal):
    """A deferred key whose weight would exceed the dtype's limit for some rows: the read
    moves those rows' stabilizers first (float32: limit e**22)."""
    Q, K, V = random_problem(6, 6, 2, 3, seed=4, dtype=np.float32)
    with policy.use_rates(policy.Rates(gemm=1e-3, gemv=1e12, call=0.0)):  # read lazily, fold never
        att = build(Q, K, V, tau=AUTO_AWAKE, storage=storage, dtype=np.float32, causal=causal)
        q = as_numpy(att._Q)[5].astype(np.float64)
        att.set_key(2, (40.0 * q / (q @ q)).astype(np.float32))  # logit 40 for row 5
        att.query(5, 0)
        assert att.stats["columns_materialized"] == 0 and att.stats["rows_rescaled"] >= 1
        att._check()
        _certified(att, mask=np.tril(np.ones((6, 6), bool)) if causal else None)


@pytest.mark.parametrize("storage", STORAGES)
def test_save_and_load_with_deferred_columns(storage, tmp_path):
    Q, K, V = random_problem(20, 15, 4, 3, seed=5)
    with policy.use_rates(policy.Rates(gemm=1e-3, gemv=1e12, call=0.0)):
        att = build(Q, K, V, tau=AUTO_AWAKE, storage=storage)
        for c in range(4):
            att.update_k(c, 1, 0.4)
        att.set_value(9, np.ones(3))
        att.query(2, 1)
        path = tmp_path / "deferred.npz"
        att.save(path)
        loaded = DynamicAttention.load(path)
        assert loaded.tau == "auto" and loaded.pending == att.pending
        assert loaded._state.column_deferred[:4].all() and not loaded._state.column_deferred[4]
        for twin in (att, loaded):
            twin.update_k(11, 0, -0.7)
            twin.set_key(3, np.full(4, 0.5))
        assert np.array_equal(as_numpy(att.output()), as_numpy(loaded.output()))
        loaded._check()


def test_tau_auto_is_validated_and_reported():
    Q, K, V = random_problem(5, 5, 2, 2)
    with pytest.raises(TypeError, match="tau: expected a real number in \\[0, 1\\] or \"auto\", got 'fast'"):
        DynamicAttention(Q, K, V, tau="fast")
    att = DynamicAttention(Q, K, V, tau="auto")
    assert att.tau == "auto" and att.config()["adaptive"] is True
    assert att.policy.startswith('tau="auto"')
    assert DynamicAttention(Q, K, V, tau=0.5).policy.startswith("fixed tau=0.5")


BURST = st.tuples(
    st.sampled_from(["updates", "reads", "rows", "tokens", "queries", "masks"]),
    st.integers(1, 40),
    st.integers(0, 2**16),
)


@settings(max_examples=30)
@given(
    bursts=st.lists(BURST, min_size=2, max_size=8),
    storage=st.sampled_from(STORAGES),
    dtype=st.sampled_from(DTYPES),
    causal=st.booleans(),
    rates=st.sampled_from(
        [(2e10, 5e9, 2e-6), (1e3, 1e12, 0.0), (1e3, 1e4, 0.0), (1e12, 1e6, 1e-6), (1e7, 1e8, 1e-6)]
    ),
)
def test_abrupt_changes_of_the_read_update_ratio(bursts, storage, dtype, causal, rates):
    """Bursts of updates, then of reads, then of token edits: the policy defers, buys,
    folds, goes dormant and wakes as the ratio swings, and every read is exact."""
    n = m = 11
    Q, K, V = random_problem(n, m, 3, 2, seed=len(bursts), logit_scale=3.0)
    with policy.use_rates(policy.Rates(*rates)):
        att = DynamicAttention(Q, K, V, tau="auto", storage=storage, dtype=dtype, causal=causal)
        for kind, count, seed in bursts:
            rng = np.random.default_rng(seed)
            for _ in range(count):
                c = int(rng.integers(m))
                mask = _visible(att, causal)
                if kind == "updates":
                    att.update_k(c, int(rng.integers(3)), float(rng.normal()))
                    att.update_v(int(rng.integers(m)), int(rng.integers(2)), float(rng.normal()))
                elif kind == "tokens":
                    att.set_token(c, k=rng.normal(size=3) * 2, v=rng.normal(size=2))
                elif kind == "queries":  # a query row changes (not an update)
                    att.set_query(int(rng.integers(n)), rng.normal(size=3))
                elif kind == "masks":  # hide a key, or show it again (not under the causal mask)
                    if causal:
                        att.update_v(c, 0, float(rng.normal()))
                    else:
                        att.set_key_mask(c, bool(rng.integers(2)) or att.key_mask.sum() == 1)
                elif kind == "reads":
                    i, j = int(rng.integers(n)), int(rng.integers(2))
                    Q64, K64, V64 = _inputs(att)
                    assert_attention_close(
                        np.array([att.query(i, j)]),
                        Q64,
                        K64,
                        V64,
                        scale=1.0,
                        dtype=dtype,
                        rows=np.array([i]),
                        cols=np.array([j]),
                        mask=mask,
                    )
                else:
                    _check_rows(att, rng.integers(n, size=3), mask=mask)
            att._check()
        _certified(att, mask=_visible(att, causal))


def test_pending_rows_are_capped_by_the_memory_budget_also_after_appends(tmp_path):
    from dynattn.structure import adaptive_threshold

    Q, K, V = random_problem(16, 100, 3, 2, seed=6)
    budget = 4 * 8 * (2 * 16 + 2 * 2) * 20  # room for 20 pending rows
    att = DynamicAttention(Q, K, V, tau="auto", storage="implicit", memory_budget=budget)
    assert att.threshold == 20 == adaptive_threshold(100, 1, 16, 2, budget)
    for _ in range(30):
        att.append(k=np.ones(3), v=np.ones(2))
        assert att.threshold == adaptive_threshold(att.m, 1, 16, 2, budget) and att.pending < 20
    att.save(tmp_path / "capped.npz")
    loaded = DynamicAttention.load(tmp_path / "capped.npz")
    assert loaded.config() == att.config() and loaded.threshold == att.threshold
    loaded._check()


#: Rates under which keeping a snapshot of a small problem soon costs more than reading rows
#: from scratch when reads are rare (folds and slot copies are dear, row recomputations cheap).
DORMANT_RATES = policy.Rates(gemm=1e7, gemv=1e8, call=1e-6)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rare_reads_make_it_dormant_and_frequent_reads_wake_it(storage, dtype):
    """Rule 4: with reads rare the structure stops keeping a snapshot (updates change only
    the inputs, reads recompute their rows exactly); with reads frequent it wakes."""
    n, m, d, e = 30, 25, 6, 4
    Q, K, V = random_problem(n, m, d, e, seed=7, dtype=dtype)
    rng = np.random.default_rng(7)
    with policy.use_rates(DORMANT_RATES):
        att = build(Q, K, V, tau=AUTO_AWAKE, storage=storage, dtype=dtype)
        updates = 0
        while not att._state.dormant:  # a read every 10 updates
            att.update_k(int(rng.integers(m)), int(rng.integers(d)), float(rng.normal(0, 0.3)))
            updates += 1
            if updates % 10 == 0:
                att.query(int(rng.integers(n)), 0)
            assert updates < 5000, "never dormant"
        att._check()
        assert att.pending == 0 and att.policy.startswith('tau="auto", dormant')
        # dormant: updates open nothing and fold nothing; reads are exact
        before = att.stats
        for step in range(60):
            att.update_k(int(rng.integers(m)), int(rng.integers(d)), float(rng.normal(0, 0.3)))
            att.update_v(int(rng.integers(m)), int(rng.integers(e)), float(rng.normal(0, 0.3)))
            att.set_token(int(rng.integers(m)), k=rng.normal(size=d), v=rng.normal(size=e))
            if step % 20 == 0:
                _check_rows(att, rng.integers(n, size=2))
                assert att.error_bound(int(rng.integers(n))) <= att.tol
                att._check()
        after = att.stats
        assert after["folds"] == before["folds"] and after["columns_deferred"] == before["columns_deferred"]
        assert after["wakes"] == before["wakes"] and att.pending == 0
        # reads of every row after every update: dearer than the upkeep, so it wakes
        for _ in range(200):
            att.update_v(int(rng.integers(m)), int(rng.integers(e)), float(rng.normal(0, 0.3)))
            _check_rows(att, np.arange(n))
            if att.stats["wakes"] > before["wakes"]:
                break
        assert att.stats["wakes"] == before["wakes"] + 1 and not att._state.dormant
        att._check()
        _certified(att)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("woken", [False, True], ids=["dormant-since-built", "dormant-after-waking"])
def test_every_operation_on_a_dormant_structure(storage, causal, woken, tmp_path):
    """Token edits, masks, appends, deletions, batches, saving and loading while dormant
    (since construction, which computed no row, or after an awake stretch): the inputs
    change, reads recompute what they read, and fold() wakes it."""
    n = m = 14
    d, e = 4, 3
    Q, K, V = random_problem(n, m, d, e, seed=8)
    rng = np.random.default_rng(8)
    with policy.use_rates(DORMANT_RATES):
        att = build(Q, K, V, tau=AUTO_AWAKE if woken else "auto", storage=storage, causal=causal)
        for step in range(5000):
            att.update_v(int(rng.integers(att.m)), 0, float(rng.normal()))
            if att._state.dormant:
                break
            if step % 10 == 0:
                att.query(int(rng.integers(n)), 0)
        assert att._state.dormant

        def check():
            att._check()
            assert att._state.dormant, "an operation woke it"
            mask = None
            if causal:
                s = att._state
                mask = (s.key_pos[None, :] <= s.query_pos[:, None]) & s.key_visible[None, :]
            elif not att._state.all_keys_visible:
                mask = np.broadcast_to(att._state.key_visible, (att.n, att.m))
            # entries of out-of-date rows are computed from scratch (the rows stay out of date)
            Q64, K64, V64 = _inputs(att)
            i, j = rng.integers(att.n, size=3), rng.integers(e, size=3)
            got = np.array([att.query(int(a), int(b)) for a, b in zip(i, j, strict=True)])
            kwargs = {"scale": att._scale, "dtype": att._dtype, "rows": i, "cols": j}
            assert_attention_close(got, Q64, K64, V64, mask=mask, **kwargs)
            # every row (out of date after an update: recomputed, and those outputs answered)
            rows = np.arange(att.n)
            out, lse = att.query_rows(rows, return_lse=True)
            kwargs = {"scale": att._scale, "dtype": att._dtype, "mask": mask}
            assert_attention_close(as_numpy(out), Q64, K64, V64, **kwargs)
            logits = att._scale * Q64 @ K64.T
            if mask is not None:
                logits = np.where(mask, logits, -np.inf)
            top = np.max(logits, axis=1, keepdims=True)
            top = np.where(np.isfinite(top), top, 0.0)
            with np.errstate(divide="ignore"):  # a row that sees no key: log(0) = -inf
                expected = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            np.testing.assert_allclose(as_numpy(lse), expected, rtol=1e-5, atol=1e-5)
            # reading every row costs what a full refresh does, so the next update would wake
            # it (Rule 4); this test is about the operations, not the rule
            att._state.dormancy_balance = 0.0

        check()  # every row current now
        att.set_query(5, rng.normal(size=d))  # not an update: only row 5 goes out of date
        check()
        att.set_key(3, rng.normal(size=d))
        att.set_value(4, rng.normal(size=e))
        att.set_token(6, q=rng.normal(size=d), k=rng.normal(size=d), v=rng.normal(size=e))
        att.update_k_many([1, 2, 1], [0, 1, 0], [0.5, -0.25, 0.125])
        att.update_v_many([7, 7], [2, 2], [1.0, -3.0])
        check()
        att.set_value(9, np.full(e, 1e300))  # values far up: their units move, nothing overflows
        check()
        att.set_value(9, rng.normal(size=e))
        Q64, K64, V64 = _inputs(att)
        i, j = np.array([0, 9, 9]), np.array([1, 2, 0])
        got = att.query_many(i, j)
        mask = np.tril(np.ones((n, m), bool)) if causal else None
        assert_attention_close(
            got, Q64, K64, V64, scale=att._scale, dtype=att._dtype, rows=i, cols=j, mask=mask
        )
        att.set_key_mask(2, False)
        check()
        att.set_key_mask(2, True)
        att.delete_key(8)
        check()
        att.append(q=rng.normal(size=d), k=rng.normal(size=d), v=rng.normal(size=e))  # reuses index 8
        att.append(q=rng.normal(size=d), k=rng.normal(size=d), v=rng.normal(size=e))  # grows
        check()
        if not causal:
            att.append(q=rng.normal(size=d))
            att.append(k=rng.normal(size=d), v=rng.normal(size=e))
        att.slide(rng.normal(size=d), rng.normal(size=e), window=10, q=rng.normal(size=d))
        att.delete_query(0)
        check()
        att.save(tmp_path / "dormant.npz")
        loaded = DynamicAttention.load(tmp_path / "dormant.npz")
        assert loaded._state.dormant and loaded.config() == att.config()
        np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
        loaded._check()
        att.fold()  # the paper's rebuild: a dormant structure wakes
        assert not att._state.dormant and att.stats["wakes"] == 1 + woken
        att._check()


@pytest.mark.parametrize("storage", STORAGES)
def test_it_starts_dormant_and_wakes_once_reads_pay_for_a_snapshot(storage):
    """Rule 4 from construction: no row is computed until read; rare reads recompute their
    rows and never pay for a snapshot (each update saves the upkeep an awake one would
    cost, the model's until it was awake); reads of every row wake it."""
    n, m, d, e = 30, 25, 6, 4
    Q, K, V = random_problem(n, m, d, e, seed=9)
    rng = np.random.default_rng(9)
    with policy.use_rates(DORMANT_RATES):
        att = DynamicAttention(Q, K, V, tau="auto", storage=storage)
        assert att._state.dormant and att.stats["rows_refreshed"] == 0 and att.stats["full_refreshes"] == 0
        att._check()
        _check_rows(att, np.array([3, 17]))
        assert att.stats["rows_refreshed"] == 2
        estimate = policy.awake_update_estimate(1, n, d, e)
        for step in range(300):  # one row read per 30 updates: less than the upkeep saved
            balance = att._state.dormancy_balance
            att.update_k(int(rng.integers(m)), int(rng.integers(d)), float(rng.normal(0, 0.3)))
            assert att._state.dormancy_balance == max(0.0, balance - estimate)
            if step % 30 == 0:
                _check_rows(att, rng.integers(n, size=1))
        assert att._state.dormant and att.stats["wakes"] == 0
        for _ in range(200):  # every row read after every update: it wakes
            att.update_v(int(rng.integers(m)), int(rng.integers(e)), float(rng.normal(0, 0.3)))
            _check_rows(att, np.arange(n))
            if att.stats["wakes"]:
                break
        assert att.stats["wakes"] == 1 and not att._state.dormant
        att._check()
        _certified(att)


@pytest.mark.parametrize("storage", STORAGES)
def test_rule4_compares_measured_operations_once_both_states_ran_them(storage, monkeypatch):
    """With measured rates Rule 4 charges each public operation its measured time less
    the other state's mean for the same operation (per unit) over its last stretch; the
    model's difference where the other state has not run it; a wake's measured time
    corrects the switching price. A fake clock makes each operation take a fixed time
    per state: awake token edits 5 ms, dormant ones 1 ms, so an awake structure gains
    4 ms per edit and goes dormant once that reaches the price of a full refresh."""
    n, m, d, e = 30, 25, 6, 4
    Q, K, V = random_problem(n, m, d, e, seed=11)
    rng = np.random.default_rng(11)
    seconds = {True: 1e-3, False: 5e-3}  # per clock reading, by state: one operation
    clock = [0.0]

    def fake_now():
        clock[0] += seconds[att._state.dormant]
        return clock[0]

    with policy.use_rates(policy.Rates(gemm=1e9, gemv=1e9, call=1e-6, measured=True)):
        att = DynamicAttention(Q, K, V, tau="auto", storage=storage)
        monkeypatch.setattr(policy, "now", fake_now)

        def edit():
            att.set_token(int(rng.integers(m)), k=rng.normal(size=d), v=rng.normal(size=e))

        for _ in range(policy.MIN_METERED_UNITS):  # dormant: the awake side is not measured yet
            edit()
            assert att._state.dormancy_balance == 0.0
        assert att._operation_costs[True, "set_token"] == [pytest.approx(8e-3), 8]
        price = policy.wake_price(1, n, m, d, e)
        att.fold()  # wakes it; the wake took one clock reading awake, 5 ms
        assert att._wake_correction == pytest.approx(policy.corrected(1.0, price, 5e-3))
        switch = att._switch_price()
        assert switch == pytest.approx(price * att._wake_correction)
        edits = 0
        while not att._state.dormant:
            balance = att._state.dormancy_balance
            edit()
            edits += 1
            if not att._state.dormant:
                assert att._state.dormancy_balance == pytest.approx(balance + 4e-3)
            assert edits < 10_000
        # it switched at the first edit that found the balance at the price
        assert edits == math.ceil(switch / 4e-3 - 1e-9) + 1
        assert att._state.dormancy_balance == 0.0 and att.stats["dormant_periods"] == 2
        # dormant again: its edits cost 4 ms less than the awake stretch measured them
        for _ in range(5):
            edit()
            assert att._state.dormancy_balance == 0.0
        att._check()
        _certified(att)
