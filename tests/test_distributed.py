"""ShardedAttention on a local Ray cluster: answers, recovery from killed actors, bad input, save/load.

Every sharded structure is mirrored by a single DynamicAttention given the same
calls; the sharded answers are checked against the float64 reference of the
mirror's inputs (dynattn.testing) and against the mirror's answers. One local
cluster serves the whole session (Ray's testing guide); sizes are small.
"""

import json
import os
import pickle
import sys

import numpy as np
import pytest

from dynattn import AttentionMaintainer, DynamicAttention, SnapshotError
from dynattn.backends import use_backend
from dynattn.distributed import INSTALL_HINT, ShardedAttention, _grid, _import_ray
from dynattn.testing import assert_attention_close, reference_attention, value_scale

H, N, D, E = 4, 16, 6, 5
SCALE = D**-0.5
RUNTIME = {
    "shards",
    "by",
    "checkpoint_dir",
    "replay_budget",
    "max_log_bytes",
    "edits_per_call",
    "blas_threads",
}
#: small actors that start fast (no runtime_env), two per CPU
FAST = {"cpus_per_shard": 0.5, "blas_threads": None}


@pytest.fixture(autouse=True)
def backend():
    """Overrides conftest's per-backend fixture: shards always run on numpy."""
    with use_backend("numpy"):
        yield "numpy"


@pytest.fixture(scope="session")
def ray():
    """One local Ray cluster for the test session: two CPUs, a small object store."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    if started:
        ray.shutdown()


def problem(seed=0, heads=H, n=N, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shape = (heads,) if heads else ()
    return [rng.standard_normal((*shape, n, w)).astype(dtype) for w in (D, D, E)]


class Mirror:
    """A ShardedAttention and a single DynamicAttention given the same calls."""

    def __init__(self, ray, Q, K, V, **options):
        self.ray = ray
        runtime = {k: options.pop(k) for k in list(options) if k in RUNTIME}
        self.sharded = ShardedAttention(Q, K, V, **{**FAST, **runtime}, **options)
        self.single = DynamicAttention(Q, K, V, **options)
        self.rng = np.random.default_rng(1)
        self.scale = options.get("scale", 1.0)

    def __getattr__(self, name):
        """``mirror.set_key(...)`` calls both and returns both results."""
        return lambda *args, **kwargs: (
            getattr(self.single, name)(*args, **kwargs),
            getattr(self.sharded, name)(*args, **kwargs),
        )

    def row(self, width):
        return self.rng.standard_normal((*self.single.batch_shape, width))

    def kill(self, shard):
        """``ray.kill`` one shard's actor and wait until it is gone."""
        actor = self.sharded.actors[shard]
        self.ray.kill(actor)
        with pytest.raises(self.ray.exceptions.RayActorError):
            for _ in range(100):
                self.ray.get(actor.run.remote(pickle.dumps(([], [], None))), timeout=10)

    def check(self, context=""):
        """Every kind of answer against the float64 reference and the single structure."""
        single, sharded, rng = self.single, self.sharded, self.rng
        assert (sharded.n, sharded.m) == (single.n, single.m)
        Q, K, V = (
            np.asarray(x).reshape(single.heads, -1, x.shape[-1]) for x in (single.Q, single.K, single.V)
        )
        np.testing.assert_array_equal(sharded.K, single.K)
        for shard in sharded._shards:  # the running replay cost and log size match a recount
            assert shard.log_bytes == sum(entry.nbytes for entry in shard.log)
            assert shard.log_seconds == pytest.approx(sum(entry.seconds for entry in shard.log), abs=1e-12)
        mask = np.broadcast_to(single.key_mask, (single.n, single.m))
        if single.causal:  # here positions are the indices
            mask = mask & (np.arange(single.m)[None, :] <= np.arange(single.n)[:, None])
        out = sharded.output()
        assert out.shape == (*single.batch_shape, single.n, single.e) and out.dtype == single.dtype
        flat = out.reshape(single.heads, single.n, single.e)
        for h in range(single.heads):
            assert_attention_close(
                flat[h], Q[h], K[h], V[h], scale=self.scale, dtype=single.dtype, mask=mask, context=context
            )
        tol = (1e-9 if single.dtype == np.float64 else 3e-4) * max(1.0, float(np.abs(V).max()))
        np.testing.assert_allclose(out, single.output(), rtol=0, atol=tol, err_msg=context)
        rows = rng.integers(single.n, size=5)
        np.testing.assert_array_equal(sharded.query_rows(rows), out[..., rows, :])
        i, j = int(rows[0]), int(rng.integers(single.e))
        h = int(rng.integers(single.heads)) if single.batch_shape else None
        np.testing.assert_array_equal(sharded.query_row(i), out[..., i, :])
        assert sharded.query(i, j, head=h) == pytest.approx(flat[h or 0, i, j], rel=0, abs=tol)
        cols = rng.integers(single.e, size=5)
        heads = rng.integers(single.heads, size=5) if single.batch_shape else None
        got = sharded.query_many(rows, cols, heads=heads)
        np.testing.assert_allclose(got, flat[0 if heads is None else heads, rows, cols], rtol=0, atol=tol)
        bound = sharded.error_bound(i, head=h)
        exact = reference_attention(Q[h or 0], K[h or 0], V[h or 0], scale=self.scale, mask=mask)[i]
        assert np.all(np.abs(flat[h or 0, i] - exact) <= bound * value_scale(V[h or 0]) * (1 + 1e-9) + tol)


def stream(mirror, steps, *, kill_at=(), check_every=1):
    """Random token, row, mask and entry edits; answers are checked every ``check_every`` steps and
    after each step that killed a shard (``kill_at``: step -> shard)."""
    rng, att = mirror.rng, mirror.single
    heads = att.heads if att.batch_shape else None
    for step in range(steps):
        kind = step % 7
        if kind == 0:
            mirror.set_token(int(rng.integers(att.m)), k=mirror.row(D), v=mirror.row(E))
        elif kind == 1:
            mirror.set_query(int(rng.integers(att.n)), mirror.row(D))
        elif kind == 2:
            mirror.update_k_many(
                rng.integers(att.m, size=3),
                rng.integers(D, size=3),
                rng.normal(0, 0.3, 3),
                heads=None if heads is None else rng.integers(heads, size=3),
            )
        elif kind == 3:
            mirror.set_key_mask(int(rng.integers(att.m)), step % 2 == 1)
        elif kind == 4:
            mirror.update_v(int(rng.integers(att.m)), int(rng.integers(E)), 0.5, head=heads and heads - 1)
        elif kind == 5:
            mirror.set_token(int(rng.integers(min(att.n, att.m))), q=mirror.row(D), k=mirror.row(D))
        else:
            mirror.update_k(int(rng.integers(att.m)), 1, -0.25, head=heads and 0)
        if step in kill_at:
            mirror.kill(kill_at[step])
        if step in kill_at or step % check_every == check_every - 1:
            mirror.check(f"step {step}: ")


# ---------------------------------------------------------------------- layouts and recovery
@pytest.mark.parametrize(
    "by, shards, budget",
    [("heads", 2, 0.0), ("rows", 2, None), ("auto", 4, 0.0)],
    ids=["heads-checkpoint-every-call", "rows-rebuild-from-inputs", "grid"],
)
def test_answers_match_the_reference_through_edits_and_kills(ray, by, shards, budget):
    Q, K, V = problem(heads=H if by != "rows" else 2)
    mirror = Mirror(
        ray, Q, K, V, shards=shards, by=by, scale=SCALE, tau=0.6, edits_per_call=2, replay_budget=budget
    )
    with mirror.sharded as att:
        assert isinstance(att, AttentionMaintainer) and att.shards == len(att.actors) == shards
        mirror.check("start: ")
        stream(mirror, 12, kill_at={5: 0}, check_every=4)
        assert att.stats["restarts"] == 1 and att.last_recovery_seconds > 0
        assert (att.stats["checkpoints"] > 0) == (budget == 0.0)
        mirror.set_key(3, mirror.row(D))
        mirror.set_value(3, mirror.row(E))
        mirror.delete_key(5)
        for rows in ({"q": mirror.row(D), "k": mirror.row(D), "v": mirror.row(E)}, {"q": mirror.row(D)}):
            expected, got = mirror.append(**rows)
            assert got == expected and got[0] == att.n - 1
        expected, got = mirror.append(k=mirror.row(D), v=mirror.row(E))
        assert got == expected and got[0] is None
        mirror.kill(shards - 1)  # edits are queued: the restored shard gets them after its replay
        mirror.fold()
        mirror.check("after appends, a kill and a fold: ")
        np.testing.assert_array_equal(att.Q, mirror.single.Q)
        np.testing.assert_array_equal(att.V, mirror.single.V)
        stats = att.stats
        assert set(mirror.single.stats) < set(stats) and stats["restarts"] == 2


def test_two_dimensional_float32_and_causal(ray):
    Q, K, V = problem(heads=0, dtype=np.float32)
    mirror = Mirror(ray, Q, K, V, shards=2, by="rows", dtype=np.float32, edits_per_call=1)
    with mirror.sharded:
        stream(mirror, 8, kill_at={3: 1}, check_every=4)
        mirror.append(q=mirror.row(D))
        mirror.check("float32, no head axis: ")
    Q, K, V = problem(heads=2)
    mirror = Mirror(ray, Q, K, V, shards=2, causal=True, scale=SCALE, replay_budget=0.0)
    with mirror.sharded:
        stream(mirror, 6, kill_at={2: 0}, check_every=3)
        mirror.append(q=mirror.row(D), k=mirror.row(D), v=mirror.row(E))
        mirror.check("causal: ")


def test_reserve_then_decode(ray):
    Q, K, V = problem(heads=2)
    mirror = Mirror(ray, Q, K, V, shards=2, by="rows", causal=False, scale=SCALE)
    with mirror.sharded as att:

        def shard_bytes():
            answers = att._exchange({k: [("nbytes", (), {})] for k in range(att.shards)})
            return [answers[k][0] for k in range(att.shards)]

        before = shard_bytes()
        mirror.reserve(n=N + 6, m=N + 6)
        reserved = shard_bytes()
        assert all(b < r for b, r in zip(before, reserved, strict=True))  # every shard got room
        for _ in range(6):
            expected, got = mirror.append(q=mirror.row(D), k=mirror.row(D), v=mirror.row(E))
            assert got == expected
        assert shard_bytes() == reserved  # and the appends fit in it
        mirror.check("after reserve and appends: ")
        with pytest.raises(ValueError, match="n: expected a number of rows >= 0"):
            att.reserve(n=-1)
        with pytest.raises(TypeError, match="m"):
            att.reserve(m=1.5)
        mirror.check("after rejected reserves: ")


def test_the_log_is_cut_at_checkpoints_and_bounded(ray, tmp_path):
    Q, K, V = problem()
    folder = tmp_path / "checkpoints"
    with ShardedAttention(
        Q,
        K,
        V,
        shards=2,
        cpus_per_shard=1,
        blas_threads=1,
        replay_budget=0,
        checkpoint_dir=folder,
        edits_per_call=1,
    ) as att:
        rng = np.random.default_rng(0)
        for c in range(6):
            att.set_key(c, rng.standard_normal((H, D)))
        att.flush()
        assert att.stats["checkpoints"] >= 2
        assert all(len(shard.log) <= 3 for shard in att._shards)  # cut at each checkpoint
        assert len(os.listdir(folder)) == 2  # one live checkpoint per shard
        att.edits_per_call = 4
        assert att.edits_per_call == 4
        with pytest.raises(ValueError, match="edits_per_call"):
            att.edits_per_call = 0
    assert os.listdir(folder) == []  # close removes them; the folder was given, so it stays
    with ShardedAttention(Q, K, V, shards=2, **FAST, max_log_bytes=0, edits_per_call=1) as att:
        att.set_key(0, rng.standard_normal((H, D)))
        att.flush()
        assert att.stats["checkpoints"] >= 1  # the byte bound alone forces one


# ---------------------------------------------------------------------- bad input
def test_rejected_calls_raise_like_a_single_structure_and_change_nothing(ray):
    Q, K, V = problem()
    Q[0, 0, 0] = 1e150  # a huge query: keys of norm 1e151 would overflow logits
    mirror = Mirror(ray, Q, K, V, shards=2, scale=SCALE)
    huge = np.full((H, D), 1e151)
    bad = [
        ("set_key", (N, np.zeros((H, D))), {}, IndexError, "c"),
        ("set_key", (0, np.zeros((H, D + 1))), {}, ValueError, "k"),
        ("set_key", (0, huge), {}, ValueError, "k"),
        ("set_value", (0, np.full((H, E), np.nan)), {}, ValueError, "v"),
        ("set_query", (-1, np.zeros((H, D))), {}, IndexError, "i"),
        ("set_token", (0,), {}, ValueError, "set_token"),
        ("append", (), {"k": np.zeros((H, D))}, ValueError, "append"),
        ("update_k", (0, 0, "x"), {"head": 0}, TypeError, "delta"),
        ("update_k", (0, 0, 1.0), {"head": H}, IndexError, "head"),
        ("update_k", (0, 0, 1.0), {}, TypeError, "head"),
        ("update_v", (0, E, 1.0), {"head": 0}, IndexError, "j"),
        ("update_v", (0, 0, np.inf), {"head": 0}, ValueError, "delta"),
        ("update_k_many", ([0, 1], [0], [1.0, 1.0]), {"heads": [0, 0]}, ValueError, "rows, cols, deltas"),
        ("update_k_many", ([0, 1], [0, 0], [1.0, np.inf]), {"heads": [0, 0]}, ValueError, "deltas"),
        ("update_k_many", ([0, 1], [0, 0], [1.0, 1e151]), {"heads": [0, 3]}, ValueError, "deltas"),
        ("update_k", (0, 0, 1e151), {"head": 1}, ValueError, "delta"),
        ("update_v_many", ([0], [0], [1.0]), {"heads": [0, 1]}, ValueError, "heads"),
        ("set_key_mask", (0, 1), {}, TypeError, "visible"),
        ("query", (N, 0), {"head": 0}, IndexError, "i"),
        ("query_rows", ([0, N],), {}, IndexError, "rows"),
        ("query_many", ([0], [0, 1]), {"heads": [0]}, ValueError, "rows and cols"),
        ("error_bound", (0,), {"head": (0, 0)}, IndexError, "head"),
    ]
    with mirror.sharded as att:
        before = att.output()
        for name, args, kwargs, error, word in bad:
            with pytest.raises(error, match=word):
                getattr(mirror.single, name)(*args, **kwargs)
            with pytest.raises(error, match=word):
                getattr(att, name)(*args, **kwargs)
            assert all(not shard.unsent and not shard.log for shard in att._shards), name
        np.testing.assert_array_equal(att.output(), before)
        np.testing.assert_array_equal(att.K, K)
        np.testing.assert_array_equal(att.V, V)


@pytest.mark.parametrize(
    "options, error, word",
    [
        ({"shards": 0}, ValueError, "shards"),
        ({"shards": 2.0}, TypeError, "shards"),
        ({"by": "cols"}, ValueError, "by"),
        ({"by": "heads", "shards": H + 1}, ValueError, "by='heads'"),
        ({"by": "rows", "shards": 2, "causal": True}, ValueError, "causal"),
        ({"tau": 2}, ValueError, "tau"),
        ({"edits_per_call": 0}, ValueError, "edits_per_call"),
        ({"replay_budget": -1}, ValueError, "replay_budget"),
        ({"backend": "torch"}, ValueError, "backend"),
        ({"key_mask": np.ones(3, dtype=bool)}, ValueError, "key_mask"),
        ({"colour": 1}, TypeError, "colour"),
        ({"address": 7}, TypeError, "address"),
    ],
)
def test_bad_options_are_rejected_before_any_actor_starts(ray, options, error, word):
    Q, K, V = problem()
    with pytest.raises(error, match=word):
        ShardedAttention(Q, K, V, **options)


def test_grid_choice():
    assert _grid("auto", 2, 4, 8, False) == (2, 1)
    assert _grid("auto", 4, 2, 8, False) == (2, 2)
    assert _grid("auto", 6, 4, 8, False) == (3, 2)
    assert _grid("rows", 3, 4, 8, False) == (1, 3)
    with pytest.raises(ValueError, match="row blocks"):
        _grid("rows", 9, 1, 8, False)


# ---------------------------------------------------------------------- persistence
def test_save_and_load_round_trip_atomically(ray, tmp_path, monkeypatch):
    Q, K, V = problem()
    mirror = Mirror(ray, Q, K, V, shards=2, by="rows", scale=SCALE)
    path = tmp_path / "state.json"
    with mirror.sharded as att:
        stream(mirror, 5, check_every=5)
        att.save(path)
        first = set(os.listdir(tmp_path))
        assert len(first) == 3
        mirror.append(q=mirror.row(D), k=mirror.row(D), v=mirror.row(E))
        expected = att.output()
        with monkeypatch.context() as patch:  # a save that fails at its last step changes nothing
            patch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
            with pytest.raises(OSError, match="disk full"):
                att.save(path)
        assert set(os.listdir(tmp_path)) == first
        att.save(path)
        assert len(os.listdir(tmp_path)) == 3 and len(set(os.listdir(tmp_path)) - first) == 2
    with ShardedAttention.load(path, **FAST, edits_per_call=3) as loaded:
        assert loaded.edits_per_call == 3 and loaded.shards == 2 and loaded.n == N + 1
        np.testing.assert_array_equal(loaded.output(), expected)
        np.testing.assert_array_equal(loaded.K, mirror.single.K)
        mirror.sharded = loaded
        mirror.set_token(2, q=mirror.row(D), k=mirror.row(D), v=mirror.row(E))
        os.remove(path)  # the shards restore from their own copies
        mirror.kill(1)
        mirror.check("loaded, then killed after the save was removed: ")


def test_load_rejects_bad_manifests(ray, tmp_path):
    path = tmp_path / "state.json"
    for text, word in [
        ("not json", "UTF-8 JSON"),
        ("[]", "class"),
        (json.dumps({"class": "ShardedAttention", "format": 9}), "format"),
    ]:
        path.write_text(text)
        with pytest.raises(SnapshotError, match=word):
            ShardedAttention.load(path)
    Q, K, V = problem()
    with ShardedAttention(Q, K, V, shards=2, **FAST) as att:
        att.save(path)
    manifest = json.loads(path.read_text())
    for key, value, word in [
        ("head_edges", [0, 3], "head_edges"),
        ("row_edges", [0, 0], "row_edges"),
        ("files", ["../x.npz", "y.npz"], "files"),
        ("q_norm_max", "big", "q_norm_max"),
    ]:
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(SnapshotError, match=word):
            ShardedAttention.load(path)
    path.write_text(json.dumps({**manifest, "head_edges": [0, 1, 4]}))
    with pytest.raises(SnapshotError, match="layout"):
        ShardedAttention.load(path, **FAST)
    with pytest.raises(TypeError, match="tau"):
        ShardedAttention.load(path, tau=0.5)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        _import_ray()
    Q, K, V = problem()
    with pytest.raises(ImportError, match="dynattn"):
        ShardedAttention(Q, K, V, shards=2)


def test_tau_auto_is_refused_before_any_actor_starts():
    """Shards would each run their own policy and fold apart: ``tau="auto"`` is refused
    with a message (no Ray cluster is needed to refuse it)."""
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.standard_normal((N, E))
    with pytest.raises(ValueError, match=r"tau: expected a number in \[0, 1\] for ShardedAttention"):
        ShardedAttention(Q, K, V, tau="auto", **FAST)
