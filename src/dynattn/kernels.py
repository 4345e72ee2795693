"""Mixed-precision kernels: float32 loads, float64 arithmetic, without a float64 copy.

The structure computes every logit and every weighted sum in float64 (see
``docs/accuracy.md``). For float32 storage numpy can only do that on float64
copies of the inputs, so a product over all m keys reads twice the bytes a
float32 computation would; in the memory-bound paths (one query row against
every key, one key against every query row) that is most of their time. A
kernel here reads the float32 array itself, widens each element to float64 (an
exact conversion) and accumulates in float64: the result is a float64
evaluation of the same exact products, in another summation order, so every
error term of the certificate (``gamma_k`` bounds, which hold for any order and
with fused multiply-adds) is unchanged.

Kernels are chosen by name and held in the plain registry :data:`KERNELS`:

``"numba"``
    compiled with numba (``pip install "dynattn[fast]"``), single-threaded;
``"numpy"``
    no kernel: the structure uses numpy/BLAS on its float64 copies (always
    available, and what the torch backend always does).

``"auto"`` (the default) is numba where it imports, else numpy. The environment
variable ``DYNATTN_KERNELS`` sets the choice at import; :func:`use` changes it
(also as a context manager, for tests and benchmarks). The numba kernels
compile on first use (about a second each) and are cached on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dynattn._validation import check_choice

#: ``KERNELS[name]()`` returns the kernel set (None: no kernels, the numpy path).
KERNELS: dict[str, Callable[[], Any]] = {}
#: What to run when numba is missing.
INSTALL_HINT = 'pip install "dynattn[fast]"'
#: At most this many columns of ``x`` (query rows, keys) go to :func:`rows_dot`'s kernel;
#: wider products are BLAS-3 work, which BLAS on the float64 copies does better.
MAX_KERNEL_COLUMNS = 8

_active: Any = None
_active_name = "numpy"


def _numpy_kernels() -> None:
    return None


def _numba_kernels() -> Any:
    if importlib.util.find_spec("numba") is None:
        raise ImportError(f"kernels='numba' needs numba: {INSTALL_HINT}")
    return importlib.import_module("dynattn._numba_kernels")


KERNELS["numpy"] = _numpy_kernels
KERNELS["numba"] = _numba_kernels


def use(name: str = "auto") -> contextlib.AbstractContextManager[str]:
    """Select the kernels by name (``"auto"``, or a key of :data:`KERNELS`); returns a
    context manager that restores the previous choice on exit (the choice holds
    from this call, whether or not it is used as one). Returns the name chosen."""
    global _active, _active_name
    check_choice("kernels", name, ("auto", *KERNELS))
    previous = _active_name
    if name == "auto":
        try:  # a numba that does not import (one built for another numpy): no kernels
            _active, name = KERNELS["numba"](), "numba"
        except ImportError:
            _active, name = KERNELS["numpy"](), "numpy"
    else:
        _active = KERNELS[name]()
    _active_name = name

    @contextlib.contextmanager
    def restore() -> Iterator[str]:
        try:
            yield name
        finally:
            use(previous)

    return restore()


def active() -> str:
    """The name of the kernels in use (``"numba"`` or ``"numpy"``)."""
    return _active_name


def rows_dot(a: Any, x: Any, out: Any = None) -> np.ndarray | None:
    """``a @ x`` in float64 from float32 ``a``, or None where no kernel applies (the
    caller then multiplies its float64 copy with BLAS).

    ``a: (H, R, d)`` float32 (any strides), ``x: (H, d, r)`` float64 with r at most
    :data:`MAX_KERNEL_COLUMNS`; returns ``(H, R, r)`` float64, written into ``out``
    when given (a reused buffer: no fresh memory to fault in). Runtime complexity:
    O(H*R*d*r), one pass over ``a``.
    """
    if not _applies(a, x.shape[-1]):
        return None
    if x.shape[:2] != (a.shape[0], a.shape[2]):
        raise ValueError(f"rows_dot: a {a.shape} and x {x.shape} do not multiply")
    flat = _flat_rows(a)
    if flat is None:
        return None
    if out is None:
        out = np.empty((a.shape[0], a.shape[1], x.shape[2]), np.float64)
    return _run(_active.rows_dot, flat[0], flat[1], np.ascontiguousarray(np.swapaxes(x, 1, 2)), out)


def weighted_rows(w_t: Any, b: Any) -> np.ndarray | None:
    """``swap_last(w_t) @ b`` in float64 from float32 ``b``, or None where no kernel
    applies.

    ``w_t: (H, m, r)`` float64 weights (r at most :data:`MAX_KERNEL_COLUMNS`),
    ``b: (H, m, e)`` float32 (any strides); returns ``(H, r, e)`` float64.
    Runtime complexity: O(H*m*r*e), one pass over ``b``.
    """
    if not _applies(b, w_t.shape[-1]):
        return None
    if w_t.shape[:2] != b.shape[:2]:
        raise ValueError(f"weighted_rows: w_t {w_t.shape} and b {b.shape} do not multiply")
    flat = _flat_rows(b)
    if flat is None:
        return None
    out = np.empty((w_t.shape[0], w_t.shape[2], b.shape[2]), np.float64)
    return _run(_active.weighted_rows, np.ascontiguousarray(np.swapaxes(w_t, 1, 2)), flat[0], flat[1], out)


def _run(kernel: Callable[..., None], *arguments: Any) -> np.ndarray | None:
    """Run ``kernel`` (its last argument is the output, returned). A numba that cannot
    compile it on this machine turns the kernels off with a warning, and None sends the
    caller to its numpy path; any other error is raised."""
    try:
        kernel(*arguments)
    except Exception as error:
        if not type(error).__module__.startswith("numba"):
            raise
        warnings.warn(f"dynattn.kernels: numba failed ({error}); using numpy", RuntimeWarning, stacklevel=3)
        use("numpy")
        return None
    return arguments[-1]


def _applies(low: Any, columns: int) -> bool:
    """Whether a kernel runs for the float32 operand ``low`` and ``columns`` columns."""
    return (
        _active is not None
        and isinstance(low, np.ndarray)
        and low.dtype == np.float32
        and columns <= MAX_KERNEL_COLUMNS
    )


def _flat_rows(a: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``a: (H, R, w)`` whose rows are contiguous (a head and row range of a state
    buffer) as a C-contiguous ``(rows, w)`` view over the same memory, and the number
    of rows from one head's first row to the next's; None for other layouts. The
    compiled loops vectorize only over arrays they know to be contiguous."""
    H, R, width = a.shape
    item = a.itemsize
    if R == 0 or width == 0 or a.strides[2] != item or a.strides[1] != width * item:
        return None
    head_stride = a.strides[0] // a.strides[1] if H > 1 else R
    if H > 1 and (a.strides[0] <= 0 or a.strides[0] % a.strides[1]):
        return None
    flat = np.lib.stride_tricks.as_strided(
        a, shape=((H - 1) * head_stride + R, width), strides=(a.strides[1], item), writeable=False
    )
    return flat, head_stride


use(os.environ.get("DYNATTN_KERNELS", "auto"))
