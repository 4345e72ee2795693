"""Snapshots of :class:`~dynattn.DynamicAttention` on disk (``.npz``), checked before use.

A snapshot is an uncompressed ``.npz`` archive: one ``state.<name>`` array for
every array the structure's state declares (:class:`dynattn.state.AttentionState`
and its storage strategy, ``state.storage.<name>``), and a ``meta`` array
holding UTF-8 JSON: the format version, the class, the options
(``DynamicAttention.config()``) and the state's numbers (sizes, pending-row map,
counters and ``AttentionState.SCALARS``). Nothing here names a state field:
a field declared in :mod:`dynattn.state` is saved, checked and restored.

:func:`load` reads nothing it has not checked and builds nothing before the
whole file has passed: every unreadable or inconsistent file raises
:class:`SnapshotError` (a ``ValueError``) whose message names the array or
field at fault, with what was expected and what was found. Array headers are
checked (name, shape, dtype) before any array data is read, and
``allow_pickle`` stays off, so a file can never run code.

Policy for unknown content: arrays and meta fields that the layout does not
name are rejected, not ignored -- a file written by a different layout would
otherwise load with part of its state silently dropped.

:func:`save` writes to a temporary file in the target folder and renames it
over the target. Temporary files are named ``.dynattn-<host>-<pid>-<random>.npz``
so that a writer killed mid-write can be identified: each save and load removes,
in its folder, such files whose writer ran on this host and no longer runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import tempfile
import zipfile
import zlib
from typing import Any

import numpy as np

from dynattn.backends import resolve_backend
from dynattn.storage import STORAGES

__all__ = ["SnapshotError", "load", "read_snapshot", "remove_stale_temporaries", "save"]

#: Name parts of the temporary files :func:`save` writes (``.dynattn-<host>-<pid>-<random>.npz``).
TEMP_PREFIX = ".dynattn-"
TEMP_SUFFIX = ".npz"
_TEMP_NAME = re.compile(r"\.dynattn-(?P<host>[A-Za-z0-9._]+)-(?P<pid>[0-9]{1,10})-[a-z0-9_]+\.npz")
#: Everything that reading a damaged or foreign archive can raise (zipfile, zlib, numpy's
#: ``.npy`` header parser, ``struct`` on short records, unsupported zip features).
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    OverflowError,
)
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"
_FIELDS = (
    "format",
    "class",
    "batch_shape",
    "sizes",
    "dtype",
    "storage",
    "schedule",
    "pending",
    "folding",
    "stats",
)
#: Options saved in meta (``DynamicAttention.config()`` less dtype, storage, batch_shape).
_OPTIONS = {
    "tau": float,
    "adaptive": bool,
    "scale": float,
    "tol": float,
    "certify": bool,
    "causal": bool,
    "auto_storage": bool,
    "memory_budget": float,
}
#: Prefix of the state arrays in the archive.
_PREFIX = "state."


class SnapshotError(ValueError):
    """A file that is not a valid ``DynamicAttention`` snapshot.

    Raised by :func:`load` (and ``DynamicAttention.load``) for every file that
    cannot be read or does not describe a consistent structure: not an
    ``.npz`` archive, a truncated or corrupted one, a foreign ``.npz`` or a
    ``.npy``, a missing or garbled ``meta`` record, a wrong format version, a
    missing, unexpected, wrongly shaped or typed array, a non-finite value, or
    state that contradicts itself. The message says which array or field is at
    fault, what was expected and what was found. Nothing has been built or
    changed when it is raised.

    Attributes
    ----------
    path : str
        The file that was being read.
    problem : str
        What is wrong with it.
    """

    def __init__(self, path: str, problem: str):
        super().__init__(f"path: {problem} (file {path!r})")
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return type(self), (self.path, self.problem)


# ---------------------------------------------------------------------- temporary files
def _host_tag() -> str:
    """This host's name, reduced to characters that are safe in a file name."""
    tag = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]
    return tag or "host"


def _pid_is_dead(pid: int) -> bool:
    """True only when no process ``pid`` exists on this host (never guesses "dead")."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: alive, owned by someone else
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Remove temporary files left in ``folder`` by :func:`save` calls that were killed.

    A file is removed only when its name has the pattern
    ``.dynattn-<host>-<pid>-<random>.npz``, ``<host>`` is this host and no
    process ``<pid>`` runs here (``os.kill(pid, 0)`` raises
    ``ProcessLookupError``). Other files, symbolic links and the temporary
    files of live writers are never touched. Best effort: errors (an
    unreadable folder, a file removed meanwhile) are ignored. Does nothing on
    Windows, where ``os.kill`` cannot probe a process. Writers in another PID
    namespace under the same host name (containers given one hostname over a
    shared folder) cannot be told apart from this host's processes.

    Parameters
    ----------
    folder : str or path-like
        The folder to clean.

    Returns
    -------
    list of str
        Paths of the files removed.

    Runtime complexity: O(number of entries in ``folder``).
    """
    if os.name == "nt" or not hasattr(os, "kill"):
        return []
    host = _host_tag()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match["host"] != host:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or not _pid_is_dead(int(match["pid"])):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.path)
    return removed


# ---------------------------------------------------------------------- save
def save(att: Any, path: str | os.PathLike[str]) -> None:
    """Write the whole state of ``att`` to ``path`` as a ``.npz`` snapshot, atomically.

    The snapshot is written to a temporary file
    ``.dynattn-<host>-<pid>-<random>.npz`` in the target folder, flushed to
    disk and renamed over ``path``, so a crash never leaves a half-written
    ``path``. A temporary file left by a writer that was killed is removed by
    the next save or load in the same folder (see
    :func:`remove_stale_temporaries`): only files of that pattern whose
    writer ran on this host and is no longer running.

    Parameters
    ----------
    att : DynamicAttention
        The structure to write (unchanged).
    path : str or path-like
        Target file; replaced if it exists.

    Runtime complexity: O(size of the state), plus O(entries in the folder).
    """
    from dynattn.structure import FORMAT_VERSION

    path = os.fspath(path)
    state_arrays, numbers = att._state.export()
    arrays = {_PREFIX + name: array for name, array in state_arrays.items()}
    config = att.config()
    meta = {
        "format": FORMAT_VERSION,
        "class": type(att).__name__,
        "batch_shape": config.pop("batch_shape"),
        "sizes": numbers.pop("sizes"),
        "dtype": config.pop("dtype"),
        "storage": config.pop("storage"),
        "schedule": config.pop("schedule"),
        "pending": {str(c): s for c, s in numbers.pop("slot_of").items()},
        "folding": {str(c): s for c, s in numbers.pop("folding_slot_of").items()},
        "stats": numbers.pop("stats"),
        **config,
        **numbers,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    prefix = f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-"
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------- load
def load(cls: Any, path: str | os.PathLike[str], *, backend: str | None = None, device: Any = None) -> Any:
    """Read a snapshot written by :func:`save` into a new ``cls`` on ``backend`` (and ``device``).

    The whole file is checked first (see :func:`read_snapshot`); the
    structure is built only from a file that passed, and answers exactly as
    the saved one did.

    Parameters
    ----------
    cls : type
        ``DynamicAttention`` or a subclass.
    path : str or path-like
        The snapshot.
    backend : {"auto", "numpy", "torch"} or None, keyword-only
        Where the state is placed (None: the default of ``use_backend``).
    device : optional, keyword-only
        Device for the torch backend.

    Returns
    -------
    DynamicAttention
        The restored structure.

    Raises
    ------
    SnapshotError
        ``path`` is not a valid snapshot (the message says why).
    OSError
        ``path`` cannot be opened (missing, a folder, no permission).

    Runtime complexity: O(size of the state), plus O(entries in the folder).
    """
    from dynattn.state import AttentionState

    xp = resolve_backend(backend, device=device)
    path = os.fspath(path)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    meta, arrays = read_snapshot(path, cls=cls)
    config = {name: meta[name] for name in (*_OPTIONS, "dtype", "storage", "schedule", "batch_shape")}
    numbers = {name: meta[name] for name in AttentionState.SCALARS}
    numbers.update(
        sizes=meta["sizes"], slot_of=meta["pending"], folding_slot_of=meta["folding"], stats=meta["stats"]
    )
    state_arrays = {name[len(_PREFIX) :]: array for name, array in arrays.items()}
    return cls._restore(xp, config, state_arrays, numbers)


def read_snapshot(
    path: str | os.PathLike[str], *, cls: Any = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check a snapshot: its decoded ``meta`` and its host arrays by name.

    Checks, in order: the file is an ``.npz`` archive (not a ``.npy``, not
    damaged); it has a ``meta`` record of UTF-8 JSON holding a JSON object
    with every required field of the right type (format version, class name,
    ``batch_shape``, ``sizes`` consistent with it, dtype, storage, pending
    map, counters, every scalar of ``cls._SCALARS``; float scalars finite);
    the archive holds exactly the arrays that this dtype and storage lay out,
    each with the shape that ``sizes`` gives its axes and the layout's dtype
    (checked on the headers, before any data is read); float arrays are
    finite; and the cross-array invariants hold (pending count and slots,
    pending rows, positions, key-visibility flag).

    Parameters
    ----------
    path : str or path-like
        The snapshot.
    cls : type, keyword-only
        The class to check against (its ``_SCALARS`` and name; default
        ``DynamicAttention``).

    Returns
    -------
    meta : dict
        The decoded meta record, float scalars as Python floats.
    arrays : dict of str to numpy.ndarray
        Every ``state<name>`` array, freshly read (writable, not shared).

    Raises
    ------
    SnapshotError
        The file is not a valid snapshot.
    OSError
        The file cannot be opened.

    Runtime complexity: O(size of the file).
    """
    if cls is None:
        from dynattn.structure import DynamicAttention as cls
    path = os.fspath(path)
    with open(path, "rb") as file:
        start = file.read(len(_NPY_MAGIC))
        if start.startswith(_NPY_MAGIC):
            raise SnapshotError(
                path, "not a dynattn snapshot: it is a single .npy array, not an .npz archive"
            )
        if not start.startswith(_ZIP_MAGIC):
            raise SnapshotError(
                path, f"not a dynattn snapshot: not an .npz (zip) archive, starts with {start!r}"
            )
        file.seek(0)
        try:
            with zipfile.ZipFile(file) as archive:
                return _read_archive(cls, path, archive, os.fstat(file.fileno()).st_size)
        except SnapshotError:
            raise
        except RecursionError as exc:
            raise SnapshotError(path, "meta: nested too deeply to decode") from exc
        except _READ_ERRORS as exc:
            raise SnapshotError(
                path, f"damaged or unreadable .npz archive ({type(exc).__name__}: {exc})"
            ) from exc


def _read_archive(
    cls: Any, path: str, archive: zipfile.ZipFile, file_size: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check and read an open archive (see :func:`read_snapshot`)."""
    from dynattn.structure import FORMAT_VERSION

    def fail(problem: str) -> SnapshotError:
        return SnapshotError(path, problem)

    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise fail(f"not a dynattn snapshot: member {info.filename!r} is not an .npy array")
        name = info.filename[: -len(".npy")]
        if name in members:
            raise fail(f"array {name!r} appears twice in the archive")
        if info.compress_size > file_size:
            raise fail(f"array {name!r}: its zip entry claims more bytes than the file holds")
        members[name] = info
    if "meta" not in members:
        found = ", ".join(map(repr, sorted(members))) or "nothing"
        raise fail(f"not a dynattn snapshot: expected a 'meta' record, the archive holds {found}")

    _check_header(archive, members["meta"], "meta", None, np.dtype(np.uint8), fail)
    with archive.open(members["meta"]) as member:
        raw = np.lib.format.read_array(member, allow_pickle=False)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or a number JSON cannot convert
        raise fail(f"meta: expected UTF-8 JSON, could not decode it ({exc})") from exc
    if not isinstance(meta, dict):
        raise fail(f"meta: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format")
    if type(version) is not int or version != FORMAT_VERSION:
        raise fail(f"expected a dynattn file of format {FORMAT_VERSION}, got format {version!r}")
    meta = _check_meta(cls, meta, fail)

    expected = _expected_arrays(cls, meta, fail)
    missing = sorted(set(expected) - set(members))
    if missing:
        raise fail(f"missing state array(s) {', '.join(map(repr, missing))}")
    extra = sorted(set(members) - set(expected) - {"meta"})
    if extra:
        raise fail(
            f"unexpected array(s) {', '.join(map(repr, extra))} in a {meta['dtype']} "
            f"{meta['storage']} snapshot (written with a different layout?)"
        )
    # every header first: nothing large is read from a file that is wrong elsewhere
    for name, (axes, shape, dtype) in expected.items():
        _check_header(archive, members[name], name, (axes, shape), dtype, fail)
    arrays = {}
    for name in expected:
        with archive.open(members[name]) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            where = tuple(int(k) for k in np.argwhere(~np.isfinite(array))[0])
            raise fail(
                f"array {name!r}: expected finite values, got {float(array[where])!r} at {list(where)}"
            )
        arrays[name] = array
    _check_invariants(meta, arrays, fail)
    return meta, arrays


def _check_header(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    name: str,
    shape: tuple[str, tuple[int, ...]] | None,
    dtype: np.dtype,
    fail: Any,
) -> None:
    """Check an ``.npy`` member's header: ``shape`` (axes, sizes; None: any 1-D), ``dtype``, length."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise fail(f"array {name!r}: expected .npy format 1.0 or 2.0, got {version}")
        offset = member.tell()
    if got_dtype != dtype:
        raise fail(f"array {name!r}: expected dtype {dtype}, got {got_dtype}")
    if shape is None:
        if len(got_shape) != 1:
            raise fail(f"array {name!r}: expected a 1-D array, got shape {got_shape}")
    elif got_shape != shape[1]:
        axes = ", ".join(shape[0])
        raise fail(f"array {name!r}: expected shape {shape[1]} ({axes} from meta sizes), got {got_shape}")
    data = math.prod(got_shape) * got_dtype.itemsize
    if info.file_size != offset + data:
        raise fail(
            f"array {name!r}: expected {data} bytes of data after its header, "
            f"its archive entry holds {info.file_size - offset}"
        )


def _kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _check_meta(cls: Any, meta: dict[str, Any], fail: Any) -> dict[str, Any]:
    """Check the decoded meta record; return a copy with float scalars as floats."""
    from dynattn.state import GROWABLE, STAT_NAMES, AttentionState

    scalars = {**_OPTIONS, **AttentionState.SCALARS}
    required = (*_FIELDS, *scalars)
    missing = [key for key in required if key not in meta]
    if missing:
        raise fail(f"meta: missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(meta) - set(required))
    if unknown:
        raise fail(f"meta: unexpected field(s) {', '.join(map(repr, unknown))}")
    meta = dict(meta)

    names = [k.__name__ for k in cls.__mro__ if k is not object]
    if not isinstance(meta["class"], str) or meta["class"] not in names:
        raise fail(f"meta 'class': expected {cls.__name__!r}, got {meta['class']!r}")
    dtype = meta["dtype"]
    if dtype not in ("float32", "float64"):
        raise fail(f"meta 'dtype': expected 'float32' or 'float64', got {dtype!r}")
    storage = meta["storage"]
    if not isinstance(storage, str) or storage not in STORAGES:
        raise fail(f"meta 'storage': expected one of {', '.join(map(repr, STORAGES))}, got {storage!r}")

    def positive_int(value: Any) -> bool:
        return type(value) is int and value > 0

    batch = meta["batch_shape"]
    if not isinstance(batch, list) or not all(positive_int(x) for x in batch):
        raise fail(f"meta 'batch_shape': expected a list of positive integers, got {batch!r}")
    sizes = meta["sizes"]
    size_keys = {"H", "d", "e", *GROWABLE}
    if not isinstance(sizes, dict) or set(sizes) != size_keys:
        got = sorted(sizes) if isinstance(sizes, dict) else repr(sizes)
        raise fail(f"meta 'sizes': expected an object with keys {sorted(size_keys)}, got {got}")
    for axis, value in sizes.items():
        if not positive_int(value):
            raise fail(f"meta 'sizes' {axis}: expected a positive integer, got {value!r}")
    if sizes["H"] != math.prod(batch):
        raise fail(
            f"meta 'sizes' H: expected {math.prod(batch)} (the product of batch_shape {batch}), "
            f"got {sizes['H']}"
        )

    for name, kind in scalars.items():
        value = meta[name]
        if kind is float:
            if type(value) not in (int, float) or not math.isfinite(value):
                raise fail(f"meta {name!r}: expected a finite number, got {value!r}")
            meta[name] = float(value)
        elif _kind(value) != kind.__name__:
            raise fail(f"meta {name!r}: expected {kind.__name__}, got {_kind(value)} {value!r}")
    checks = {
        "tau": (lambda x: 0 <= x <= 1, "in [0, 1]"),
        "tol": (lambda x: x > 0, "> 0"),
        "threshold": (lambda x: x >= 1, ">= 1"),
        "t": (lambda x: x >= 0, ">= 0"),
        "next_position": (lambda x: x >= 0, ">= 0"),
        "k_norm_max": (lambda x: x >= 0, ">= 0"),
        "q_norm_max": (lambda x: x >= 0, ">= 0"),
        "pending_rent": (lambda x: x >= 0, ">= 0"),
        "read_rate": (lambda x: x >= 0, ">= 0"),
        "reads_since_update": (lambda x: x >= 0, ">= 0"),
        "slots_opened": (lambda x: x >= 0, ">= 0"),
        "spread_updates": (lambda x: x >= 0, ">= 0"),
        "spread_length": (lambda x: x >= 0, ">= 0"),
    }
    for name, (check, wanted) in checks.items():
        if not check(meta[name]):
            raise fail(f"meta {name!r}: expected a value {wanted}, got {meta[name]!r}")

    from dynattn.structure import SCHEDULES

    if meta["schedule"] not in SCHEDULES:
        raise fail(
            f"meta 'schedule': expected one of {', '.join(map(repr, SCHEDULES))}, got {meta['schedule']!r}"
        )
    for field in ("pending", "folding"):
        slot_map = meta[field]
        if not isinstance(slot_map, dict):
            raise fail(f"meta {field!r}: expected an object (key row -> slot), got {slot_map!r}")
        for row, slot in slot_map.items():
            if not re.fullmatch(r"0|[1-9][0-9]*", row) or type(slot) is not int or slot < 0:
                raise fail(
                    f"meta {field!r}: expected key row -> slot as integers >= 0, got {row!r}: {slot!r}"
                )
    stats = meta["stats"]
    if not isinstance(stats, dict) or set(stats) != set(STAT_NAMES):
        got = sorted(stats) if isinstance(stats, dict) else repr(stats)
        raise fail(f"meta 'stats': expected an object with keys {sorted(STAT_NAMES)}, got {got}")
    for key, value in stats.items():
        if type(value) is not int or value < 0:
            raise fail(f"meta 'stats' {key}: expected an integer >= 0, got {value!r}")

    t, threshold, slots = meta["t"], meta["threshold"], sizes["S"]
    live, folding = len(meta["pending"]), len(meta["folding"])
    limit = threshold * (2 if meta["schedule"] == "spread" else 1)  # docs/latency.md
    if not (0 <= live < limit or (threshold == 1 and live == 0)):
        raise fail(f"meta 'pending': expected fewer pending rows than {limit}, got {live}")
    if meta["schedule"] == "amortized" and folding:
        raise fail(f"meta 'folding': expected no folding slots with schedule 'amortized', got {folding}")
    if not live + folding <= t <= slots:
        raise fail(
            f"meta 't': expected pending and folding slots ({live + folding}) <= t <= S ({slots}), got {t}"
        )
    used = sorted([*meta["pending"].values(), *meta["folding"].values()])
    if len(set(used)) != len(used) or (used and used[-1] >= t):
        raise fail(f"meta 'pending', 'folding': expected distinct slots below t ({t}), got {used}")
    if not 0 <= meta["folded_rows"] <= sizes["n"] or (meta["folded_rows"] and not folding):
        raise fail(
            "meta 'folded_rows': expected 0..n during a spread fold and 0 otherwise, "
            f"got {meta['folded_rows']}"
        )
    return meta


def _expected_arrays(
    cls: Any, meta: dict[str, Any], fail: Any
) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
    """Every array the snapshot must hold: name -> (axes, shape, dtype), from the state's
    declarations (:meth:`dynattn.state.AttentionState.expected_arrays`)."""
    from dynattn.state import AttentionState

    expected = AttentionState.expected_arrays(
        meta["sizes"], np.dtype(meta["dtype"]), STORAGES[meta["storage"]]
    )
    return {_PREFIX + name: spec for name, spec in expected.items()}


def _check_invariants(meta: dict[str, Any], arrays: dict[str, np.ndarray], fail: Any) -> None:
    """Cross-array checks: pending rows, positions, the key-visibility flag."""
    from dynattn.state import FOLDING, LIVE

    sizes, t = meta["sizes"], meta["t"]
    name = _PREFIX + "pending_rows"
    rows, kinds = arrays[name], arrays[_PREFIX + "slot_kind"]
    for field, kind in (("pending", LIVE), ("folding", FOLDING)):
        for row, slot in meta[field].items():
            c = int(row)
            if c >= sizes["m"]:
                raise fail(f"meta {field!r}: key row {c} is out of range (m = {sizes['m']})")
            if rows[slot] != c:
                raise fail(
                    f"array {name!r}: expected key row {c} at slot {slot} (meta {field!r}), "
                    f"got {int(rows[slot])}"
                )
        expected = sorted(meta[field].values())
        if np.flatnonzero(kinds[:t] == kind).tolist() != expected:
            raise fail(
                f"array {_PREFIX}slot_kind: expected kind {kind} exactly at slots {expected} (meta {field!r})"
            )
    if np.any(kinds[t:] != 0):
        raise fail(f"array {_PREFIX}slot_kind: expected free slots from t = {t} on")
    end = meta["next_position"]
    for name in (_PREFIX + "query_pos", _PREFIX + "key_pos"):
        positions = arrays[name]
        if positions.size:
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= end:
                raise fail(
                    f"array {name!r}: expected positions in [0, {end}) (meta 'next_position'), "
                    f"got values in [{low}, {high}]"
                )
    visible = arrays[_PREFIX + "key_visible"]
    if meta["all_keys_visible"] != bool(visible.all()):
        raise fail(
            f"meta 'all_keys_visible': expected {bool(visible.all())} (array {_PREFIX}key_visible), "
            f"got {meta['all_keys_visible']}"
        )
