"""Validation at the public boundary (scikit-learn's ``check_array`` style).

Every public entry point of :mod:`dynattn` checks its arguments with the
helpers below *before* it changes any state, so a rejected call leaves the
structure exactly as it was. Messages say which argument was wrong, what was
expected, what was received and, where it helps, how to fix it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(dtype: Any) -> np.dtype:
    """Return ``dtype`` as a numpy dtype if it is float32 or float64, else raise TypeError."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r} which is not a dtype") from exc
    if resolved not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dtype: expected float32 or float64, got {resolved}; "
            "pass dtype=np.float64 (default) or dtype=np.float32"
        )
    return resolved


def check_matrix(
    name: str,
    value: Any,
    *,
    dtype: np.dtype,
    rows: int | None = None,
    cols: int | None = None,
    row_name: str = "rows",
    col_name: str = "columns",
    batch: tuple[int, ...] | None = (),
) -> np.ndarray:
    """Return a C-contiguous copy of ``value`` as a finite array of ``dtype``.

    The array is a matrix ``(rows, cols)``, or with ``batch=None`` a stack of
    matrices ``(*batch, rows, cols)`` with any leading axes; with a tuple
    ``batch`` the leading axes must be exactly that. Raises TypeError for
    non-numeric input (complex, bool, object, strings), ValueError for a wrong
    number of dimensions, a mismatched shape, an empty axis or a non-finite
    entry. The caller's array is never modified.
    """
    array = _as_real_array(name, value)
    if batch == () and array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got {array.ndim}-D with shape {array.shape}")
    if array.ndim < 2:
        raise ValueError(
            f"{name}: expected an array of 2 or more dimensions (..., rows, columns), "
            f"got {array.ndim}-D with shape {array.shape}"
        )
    if 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty array, got shape {array.shape}")
    if batch is not None and array.shape[:-2] != tuple(batch):
        raise ValueError(
            f"{name}: expected leading (head/batch) axes {tuple(batch)}, got shape {array.shape}"
        )
    if rows is not None and array.shape[-2] != rows:
        raise ValueError(f"{name}: expected {rows} {row_name}, got shape {array.shape}")
    if cols is not None and array.shape[-1] != cols:
        raise ValueError(f"{name}: expected {cols} {col_name}, got shape {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.array(array, dtype=dtype, order="C", copy=True)
    _check_finite(name, converted, original=array)
    return converted


def check_rows(name: str, value: Any, *, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Return a finite copy of ``value`` with exactly ``shape`` (a row, or one row per head)."""
    array = _as_real_array(name, value)
    if array.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.array(array, dtype=dtype, copy=True)
    _check_finite(name, converted, original=array)
    return converted


def check_index(name: str, value: Any, size: int, *, axis: str) -> int:
    """Return ``value`` as an int in ``[0, size)``.

    ``axis`` names what is indexed (for example ``"key rows (m)"``) so the
    message can say what the valid range refers to. Negative indices are
    rejected rather than wrapped: an update to ``K[-1]`` is almost always a bug.
    """
    if type(value) is int:  # fast path for the common case
        index = value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer index, got {type(value).__name__} {value!r}")
    else:
        index = int(value)
    if not 0 <= index < size:
        raise IndexError(f"{name}={index} is out of range: expected 0 <= {name} < {size} ({axis})")
    return index


def check_index_array(name: str, value: Any, size: int, *, axis: str) -> np.ndarray:
    """Return ``value`` as a 1-D int64 array whose entries all lie in ``[0, size)``."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {array.shape}")
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name}: expected integer indices, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=True)
    if array.size:
        bad = (array < 0) | (array >= size)
        if bad.any():
            first = int(array[np.argmax(bad)])
            raise IndexError(f"{name} contains {first}, out of range: expected 0 <= {name} < {size} ({axis})")
    return array


def check_scalar(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    """Return ``value`` as a finite Python float, optionally within ``[low, high]``."""
    if type(value) is float or type(value) is int:
        number = float(value)
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {number!r}")
    if low is not None and number < low or high is not None and number > high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {number!r}")
    return number


def check_choice(name: str, value: Any, choices: dict[str, Any] | tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices`` (a registry's names), else raise ValueError."""
    valid = tuple(choices)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, valid))}, got {value!r}")
    return value


def _as_real_array(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy raises many types here
        raise TypeError(f"{name}: expected a real numeric array, could not convert: {exc}") from exc
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(f"{name}: expected a real numeric array (integer or float), got dtype {array.dtype}")
    return array


def _check_finite(name: str, converted: np.ndarray, *, original: np.ndarray) -> None:
    if np.isfinite(converted).all():
        return
    bad = np.argwhere(~np.isfinite(converted))[0]
    where = ", ".join(str(int(k)) for k in bad)
    received = original[tuple(bad)]
    hint = ""
    if np.isfinite(received):
        hint = f" (it overflows {converted.dtype}; rescale the input or use float64)"
    raise ValueError(f"{name}: expected finite values, got {received!r} at [{where}]{hint}")
