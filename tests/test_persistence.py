"""Snapshots on disk: exact round trips, and a clean SnapshotError for every bad file.

Each corruption is made by rewriting a real snapshot (arrays read with
``np.load``, changed, written back with ``np.savez``) or by damaging its
bytes; the error must be a SnapshotError whose message names what is wrong.
"""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dynattn import DynamicAttention, SnapshotError, persistence
from dynattn.state import AttentionState
from dynattn.storage import STORAGES
from dynattn.structure import FORMAT_VERSION
from dynattn.testing import as_numpy

H, N, M, D, E = 2, 6, 8, 3, 2


def build(storage="dense", dtype=np.float64, batch=(H,), seed=0):
    """A small structure with pending rows, an appended token, a deleted query and a masked key."""
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal((*batch, rows, cols)) for rows, cols in ((N, D), (M, D), (M, E)))
    att = DynamicAttention(Q, K, V, tau=0.95, storage=storage, dtype=dtype, causal=True, scale=0.7)
    head = 1 if batch else None
    att.update_k(2, 1, 0.3, head=head)
    att.set_value(5, rng.standard_normal((*batch, E)))
    att.append(q=rng.standard_normal((*batch, D)), k=rng.standard_normal((*batch, D)), v=np.ones((*batch, E)))
    att.delete_query(0)
    att.delete_key(3)
    assert att.pending >= 3
    return att


def members(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def meta_of(arrays):
    return json.loads(arrays["meta"].tobytes().decode())


def with_meta(arrays, meta):
    return {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}


def rewrite(tmp_path, arrays, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def rejected(path, match):
    """Load ``path``, expecting a SnapshotError whose message matches ``match``."""
    with pytest.raises(SnapshotError, match=match) as info:
        DynamicAttention.load(path)
    assert isinstance(info.value, ValueError) and info.value.path == os.fspath(path)
    assert str(info.value).startswith("path: ")
    return info.value


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "state.npz"
    build().save(path)
    return path


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("storage", sorted(STORAGES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_trip_is_exact(tmp_path, storage, dtype):
    att = build(storage, dtype)
    path = tmp_path / "state.npz"
    att.save(path)
    assert os.listdir(tmp_path) == ["state.npz"]
    loaded = DynamicAttention.load(path)
    loaded._check()
    assert loaded.backend == att.backend and loaded.dtype == att.dtype and loaded.storage == att.storage
    assert (loaded.pending, loaded.threshold, loaded.stats) == (att.pending, att.threshold, att.stats)
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    for structure in (att, loaded):  # the same future, through a fold
        for c in range(M):
            structure.update_k(c, 0, 0.1, head=0)
        structure.set_token(1, q=np.ones((H, D)), v=np.zeros((H, E)))
    np.testing.assert_array_equal(as_numpy(loaded.output()), as_numpy(att.output()))
    assert loaded.stats == att.stats


@pytest.mark.parametrize("batch", [(), (1, 2)])
def test_round_trip_other_head_shapes(tmp_path, batch):
    att = build(batch=batch, seed=1)
    att.save(tmp_path / "state.npz")
    loaded = DynamicAttention.load(tmp_path / "state.npz", backend="numpy")
    assert loaded.batch_shape == batch and loaded.backend == "numpy"
    np.testing.assert_array_equal(loaded.output(), as_numpy(att.output()))


def test_snapshot_holds_exactly_the_layout(tmp_path):
    """The arrays written are those the state declares (the checks are derived from them)."""
    for storage in STORAGES:
        for dtype in (np.float64, np.float32):
            path = tmp_path / f"{storage}-{np.dtype(dtype).name}.npz"
            att = build(storage, dtype)
            att.save(path)
            names = set(AttentionState.expected_arrays(att._state.sizes, np.dtype(dtype), STORAGES[storage]))
            assert set(members(path)) == {"meta"} | {f"state.{name}" for name in names}
            assert ("Q64" in names) == (dtype == np.float32)
            assert ("storage.weights_t" in names) == (storage == "dense")


# ---------------------------------------------------------------------- damaged files
def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for length in (0, 1, 3, 40, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        path = tmp_path / f"cut{length}.npz"
        path.write_bytes(data[:length])
        error = rejected(path, "not a dynattn snapshot|damaged or unreadable")
        if length > 2:
            assert error.__cause__ is not None


def test_flipped_bytes(saved, tmp_path):
    """A byte flipped inside any member's data is caught (zip CRC, or the header checks)."""
    data = saved.read_bytes()
    with zipfile.ZipFile(saved) as archive:
        infos = archive.infolist()
    assert len(infos) > 20
    for info in infos:
        name_length, extra_length = struct.unpack(
            "<HH", data[info.header_offset + 26 : info.header_offset + 30]
        )
        start = info.header_offset + 30 + name_length + extra_length
        for position in (start + info.compress_size // 2, start + info.compress_size - 1):
            damaged = bytearray(data)
            damaged[position] ^= 0x5A
            path = tmp_path / "flipped.npz"
            path.write_bytes(bytes(damaged))
            rejected(path, "damaged or unreadable|expected")


def test_random_bytes_and_text(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    rejected(path, "not a dynattn snapshot: not an .npz")
    path.write_text("hello")
    rejected(path, "not a dynattn snapshot: not an .npz")
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    rejected(path, "damaged or unreadable")


def test_foreign_npz_and_npy(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3), bias=np.zeros(2))
    rejected(
        foreign, r"not a dynattn snapshot: expected a 'meta' record, the archive holds 'bias', 'weights'"
    )
    single = tmp_path / "single.npy"
    np.save(single, np.ones((3, 3)))
    rejected(single, r"single \.npy array")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hi")
    rejected(other, "member 'readme.txt' is not an .npy array")


def test_error_pickles(saved, tmp_path):
    path = tmp_path / "noise.npz"
    path.write_text("hello")
    error = rejected(path, "not an .npz")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SnapshotError and str(copy) == str(error) and copy.path == error.path


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        DynamicAttention.load(tmp_path / "absent.npz")


# ---------------------------------------------------------------------- meta record
def test_meta_missing_or_garbled(saved, tmp_path):
    arrays = members(saved)
    rejected(rewrite(tmp_path, {k: v for k, v in arrays.items() if k != "meta"}), "expected a 'meta' record")
    for raw, match in (
        (b"{not json", "meta: expected UTF-8 JSON"),
        (b"\xff\xfe\x00", "meta: expected UTF-8 JSON"),
        (b"[1, 2]", "meta: expected a JSON object, got list"),
        (b"", "meta: expected UTF-8 JSON"),
    ):
        rejected(rewrite(tmp_path, {**arrays, "meta": np.frombuffer(raw, dtype=np.uint8)}), match)
    rejected(
        rewrite(tmp_path, {**arrays, "meta": np.ones(3)}), "array 'meta': expected dtype uint8, got float64"
    )


class _Marker:
    """Unpickling this would call :func:`_unpickled`."""

    def __reduce__(self):
        return (_unpickled, ())


UNPICKLED = []


def _unpickled():
    UNPICKLED.append(True)


def test_pickled_member_is_never_loaded(saved, tmp_path):
    arrays = members(saved)
    marker = np.array([_Marker()], dtype=object)
    for name in ("meta", "state.N"):
        rejected(
            rewrite(tmp_path, {**arrays, name: marker}), f"array '{name}': expected dtype .*, got object"
        )
    assert not UNPICKLED


def test_wrong_format_version(saved, tmp_path):
    arrays = members(saved)
    for version in (FORMAT_VERSION + 1, FORMAT_VERSION - 1, True, str(FORMAT_VERSION), None):
        meta = meta_of(arrays)
        meta["format"] = version
        rejected(
            rewrite(tmp_path, with_meta(arrays, meta)),
            re.escape(f"path: expected a dynattn file of format {FORMAT_VERSION}, got format {version!r}"),
        )


def test_meta_fields(saved, tmp_path):
    arrays = members(saved)
    base = meta_of(arrays)

    def check(match, **changes):
        meta = {**base, **changes}
        for key in [k for k, v in changes.items() if v is KeyError]:
            del meta[key]
        rejected(rewrite(tmp_path, with_meta(arrays, meta)), match)

    for key in base:
        if key != "format":
            check(f"meta: missing field\\(s\\) '{key}'", **{key: KeyError})
    check("meta: unexpected field\\(s\\) 'extra'", extra=1)
    check("meta 'class': expected 'DynamicAttention', got 'Recompute'", **{"class": "Recompute"})
    check("meta 'dtype': expected 'float32' or 'float64', got 'float16'", dtype="float16")
    check("meta 'storage': expected one of .*, got 'sparse'", storage="sparse")
    check("meta 'batch_shape': expected a list of positive integers", batch_shape=[2, 0])
    check("meta 'batch_shape': expected a list of positive integers", batch_shape="2")
    check(r"meta 'sizes' H: expected 4 \(the product of batch_shape \[2, 2\]\), got 2", batch_shape=[2, 2])
    check("meta 'sizes' d: expected a positive integer, got 0", sizes={**base["sizes"], "d": 0})
    check("meta 'sizes' e: expected a positive integer, got 2.0", sizes={**base["sizes"], "e": 2.0})
    check("meta 'sizes': expected an object with keys", sizes={"n": 1})
    check("meta 'tau': expected a finite number, got nan", tau=float("nan"))
    check("meta 'scale': expected a finite number, got 'x'", scale="x")
    check("meta 'tau': expected a value in \\[0, 1\\], got 1.5", tau=1.5)
    check("meta 'tol': expected a value > 0, got 0.0", tol=0.0)
    check("meta 'certify': expected bool, got int 1", certify=1)
    check("meta 'threshold': expected int, got float 7.0", threshold=7.0)
    check("meta 'next_position': expected int, got bool True", next_position=True)
    check("meta 'k_norm_max': expected a value >= 0, got -1.0", k_norm_max=-1.0)
    check("meta 'stats': expected an object with keys", stats={})
    check("meta 'stats' folds: expected an integer >= 0, got -1", stats={**base["stats"], "folds": -1})
    check("meta 'pending': expected an object", pending=[])
    check("meta 'pending': expected key row -> slot as integers >= 0", pending={"x": 0})
    check("meta 'pending': expected key row -> slot as integers >= 0", pending={"01": 0})


def test_edited_query_count_is_rejected(saved, tmp_path):
    """Changing meta sizes n must not load a structure with rows missing (or invented)."""
    arrays = members(saved)
    for n in (base_n := meta_of(arrays)["sizes"]["n"]) - 1, base_n + 1:
        meta = meta_of(arrays)
        meta["sizes"]["n"] = n
        error = rejected(rewrite(tmp_path, with_meta(arrays, meta)), "from meta sizes")
        assert f"expected shape (2, {n}, 3) (H, n, d from meta sizes), got (2, {base_n}, 3)" in str(error)


def test_pending_map_inconsistent(saved, tmp_path):
    arrays = members(saved)
    base = meta_of(arrays)
    pending, t = base["pending"], base["t"]
    assert t == len(pending) >= 3

    def check(match, meta, changes=None):
        rejected(rewrite(tmp_path, with_meta({**arrays, **(changes or {})}, meta)), match)

    (c0, s0), (c1, s1) = list(pending.items())[:2]
    check("array 'state.pending_rows': expected key row", {**base, "pending": {**pending, c0: s1, c1: s0}})
    fewer = dict(list(pending.items())[1:])
    check("array state.slot_kind: expected kind 1 exactly at slots", {**base, "pending": fewer})
    check(
        "meta 'pending', 'folding': expected distinct slots below t", {**base, "pending": fewer, "t": t - 1}
    )
    check("meta 'pending', 'folding': expected distinct slots", {**base, "pending": {**pending, c0: s1}})
    rows = arrays["state.pending_rows"].copy()
    rows[s0] = 99
    moved = {**{c: s for c, s in pending.items() if c != c0}, "99": s0}
    check(
        "meta 'pending': key row 99 is out of range", {**base, "pending": moved}, {"state.pending_rows": rows}
    )
    check(
        f"meta 'pending': expected fewer pending rows than {t}, got {t}",
        {**base, "threshold": t},
    )
    check("meta 't': expected pending and folding slots", {**base, "sizes": {**base["sizes"], "S": t - 1}})
    check(
        "meta 'folding': expected no folding slots with schedule 'amortized'",
        {**base, "pending": fewer, "folding": {c0: s0}},
    )
    kinds = arrays["state.slot_kind"].copy()
    kinds[s0] = 2
    check(
        "array state.slot_kind: expected kind 2 exactly at slots",
        {**base, "schedule": "spread", "pending": fewer, "folding": {}},
        {"state.slot_kind": kinds},
    )
    check("meta 'schedule': expected one of", {**base, "schedule": "eager"})


# ---------------------------------------------------------------------- state arrays
def test_each_array_dropped_reshaped_retyped_or_nan(tmp_path):
    """Every state array, whatever the storage and dtype: missing, wrong shape, wrong dtype, NaN."""
    done = {"meta"}
    for storage in STORAGES:
        path = tmp_path / f"{storage}.npz"
        build(storage, np.float32).save(path)
        arrays = members(path)
        for name, array in arrays.items():
            if name in done:
                continue
            done.add(name)
            rest = {k: v for k, v in arrays.items() if k != name}
            rejected(rewrite(tmp_path, rest), f"missing state array\\(s\\) '{name}'")
            bigger = np.concatenate([array, array[..., :1]], axis=-1)
            error = rejected(rewrite(tmp_path, {**arrays, name: bigger}), f"array '{name}': expected shape")
            assert str(array.shape) in str(error) and str(bigger.shape) in str(error)
            other = {"f": np.float16, "i": np.int32, "b": np.uint8}[array.dtype.kind]
            retyped = array.astype(other)
            rejected(
                rewrite(tmp_path, {**arrays, name: retyped}),
                f"array '{name}': expected dtype {array.dtype}, got {retyped.dtype}",
            )
            if array.dtype.kind == "f":
                for bad in (np.nan, np.inf):
                    broken = array.copy()
                    broken.flat[broken.size // 2] = bad
                    rejected(rewrite(tmp_path, {**arrays, name: broken}), f"array '{name}': expected finite")


def test_unexpected_array(saved, tmp_path):
    arrays = members(saved)
    rejected(
        rewrite(tmp_path, {**arrays, "state.extra": np.ones(2)}), "unexpected array\\(s\\) 'state.extra'"
    )
    # float64 copies belong to float32 snapshots only
    copy = {"state.Q64": arrays["state.Q"]}
    rejected(rewrite(tmp_path, {**arrays, **copy}), "unexpected array\\(s\\) 'state.Q64' in a float64 dense")


def test_positions_and_visibility_flag(saved, tmp_path):
    arrays = members(saved)
    meta = meta_of(arrays)
    for name in ("state.query_pos", "state.key_pos"):
        for bad in (-1, meta["next_position"]):
            positions = arrays[name].copy()
            positions[0] = bad
            rejected(rewrite(tmp_path, {**arrays, name: positions}), f"array '{name}': expected positions in")
    visible = np.ones_like(arrays["state.key_visible"])
    rejected(
        rewrite(tmp_path, {**arrays, "state.key_visible": visible}),
        "meta 'all_keys_visible': expected True",
    )


# ---------------------------------------------------------------------- temporary files
def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(os.name == "nt", reason="writers are identified by pid on POSIX only")
def test_stale_temporaries_removed(tmp_path):
    host = persistence._host_tag()
    dead = _dead_pid()
    stale = tmp_path / f".dynattn-{host}-{dead}-abc_123x.npz"
    keep = [
        tmp_path / f".dynattn-{host}-{os.getpid()}-live0000.npz",  # a live writer (this process)
        tmp_path / f".dynattn-{host}-1-init0000.npz",  # pid 1 is alive (or not ours to judge)
        tmp_path / f".dynattn-other_host-{dead}-abcdefgh.npz",  # another host's writer
        tmp_path / ".dynattn-abcdefgh.npz",  # an old-style name: writer unknown
        tmp_path / f"dynattn-{host}-{dead}-abcdefgh.npz",  # not our pattern
        tmp_path / "notes.txt",
    ]
    for path in (stale, *keep):
        path.write_bytes(b"x" * 100)
    folder_like = tmp_path / f".dynattn-{host}-{dead}-folder00.npz"
    folder_like.mkdir()
    build().save(tmp_path / "state.npz")
    assert not stale.exists()
    assert all(path.exists() for path in keep) and folder_like.is_dir()
    # load cleans too
    stale.write_bytes(b"x")
    DynamicAttention.load(tmp_path / "state.npz")
    assert not stale.exists() and all(path.exists() for path in keep)


def test_temporary_names_identify_the_writer(tmp_path, monkeypatch):
    att = build()
    seen = []

    def crash(file, **arrays):
        seen.extend(os.listdir(tmp_path))
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        att.save(tmp_path / "state.npz")
    assert len(seen) == 1
    pattern = rf"\.dynattn-{re.escape(persistence._host_tag())}-{os.getpid()}-[a-z0-9_]+\.npz"
    assert re.fullmatch(pattern, seen[0])
    assert os.listdir(tmp_path) == []  # the failed save removed its own temporary
