"""Validation at the public boundary (scikit-learn's ``check_array`` style).

Every public entry point of :mod:`dynattn` checks its arguments with the
helpers below *before* it changes any state, so a rejected call leaves the
structure exactly as it was. Messages say which argument was wrong, what was
expected, what was received and, where it helps, how to fix it.

The policy, the same for every method:

* flags (``certify``, ``causal``, ``visible``): ``True``/``False``, numpy bools
  and 0-d boolean arrays or tensors (:func:`check_flag`); never ints or strings;
* indices: Python ints, numpy integer scalars and 0-d integer arrays or
  tensors (:func:`check_index`); never bools, floats or arrays with any
  dimensions; negative indices are out of range, not wrapped;
* index arrays: 1-D lists, numpy integer arrays or integer torch tensors
  (:func:`check_index_array`); never boolean masks or floats;
* scalars (``scale``, ``tau``, ``delta``, ...): Python or numpy real numbers,
  finite, within a stated interval written in bracket notation, ``[0, 1]`` or
  ``(0, 1]`` (:func:`check_scalar`, after scikit-learn's); never bools or strings;
* names (``storage``, ``backend``, ...): one of a registry's keys, and the
  message lists them (:func:`check_choice`);
* errors: TypeError for the wrong kind of value, IndexError for an index out
  of range, ValueError for a wrong shape or value.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any, Literal

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
    converted = _converted_copy(array, dtype, order="C")
    _check_finite(name, converted, original=array)
    return converted


def check_rows(name: str, value: Any, *, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Return a finite copy of ``value`` with exactly ``shape`` (a row, or one row per head)."""
    array = _as_real_array(name, value)
    if array.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {array.shape}")
    converted = _converted_copy(array, dtype)
    _check_finite(name, converted, original=array)
    return converted


def _converted_copy(array: np.ndarray, dtype: Any, order: Literal["K", "C"] = "K") -> np.ndarray:
    """A copy of ``array`` in ``dtype``; values beyond its range become inf (reported by
    :func:`_check_finite`), without a warning."""
    if array.dtype == dtype:  # (a plain copy cannot overflow)
        return np.array(array, order=order, copy=True)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(array, dtype=dtype, order=order, copy=True)


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` as a Python bool if it is a boolean, else raise TypeError.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : object
        ``True``/``False``, a numpy bool (``np.True_``), or a 0-d boolean
        array or tensor (``mask[c]`` of a numpy array or torch tensor).

    Returns
    -------
    bool
        A plain Python bool (safe to store, compare and serialize).

    Raises
    ------
    TypeError
        For anything else: integers (even 0 and 1), strings, None, arrays
        with more than one element. Truthiness is never used.
    """
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if _is_array_like(value) and tuple(value.shape) == () and _is_bool_dtype(value.dtype):
        return bool(value.item())
    raise TypeError(
        f"{name}: expected True or False (a Python or numpy bool), got {_describe(value)}; "
        f"pass {name}=True or {name}=False (bool(x) converts explicitly)"
    )


def as_index(name: str, value: Any) -> int:
    """Return ``value`` as a Python int if it is one integer, else raise TypeError.

    Accepted: Python ints, numpy integer scalars and 0-d integer arrays or
    tensors (whatever :func:`operator.index` converts). Rejected: bools (Python,
    numpy, 0-d boolean arrays), floats (even integral ones such as ``2.0``),
    arrays or tensors with any dimensions (even one element), strings, None.
    No range check; see :func:`check_index`.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : object
        The candidate index.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        When ``value`` is not a single integer.
    """
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{name}: expected an integer index, got {_describe(value)}; "
            "booleans are not indices, pass the integer 0 or 1"
        )
    if _is_array_like(value):
        if tuple(value.shape) != ():
            raise TypeError(
                f"{name}: expected an integer index (a scalar or 0-d array), got {_describe(value)}; "
                "pass one index, e.g. int(x[0])"
            )
        if _is_bool_dtype(value.dtype):
            raise TypeError(
                f"{name}: expected an integer index, got {_describe(value)}; "
                "booleans are not indices, pass the integer 0 or 1"
            )
    try:
        return operator.index(value)
    except TypeError:
        pass
    hint = "pass an int"
    if isinstance(value, numbers.Real) or (
        _is_array_like(value) and "float" in str(value.dtype) and tuple(value.shape) == ()
    ):
        hint = f"floats are not indices, convert with int({name}) if the value is integral"
    raise TypeError(f"{name}: expected an integer index, got {_describe(value)}; {hint}") from None


def check_index(name: str, value: Any, size: int, *, axis: str) -> int:
    """Return ``value`` as an int in ``[0, size)``.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : object
        A single integer: see :func:`as_index` for what is accepted.
    size : int
        Length of the indexed axis.
    axis : str
        What is indexed (for example ``"key rows, m"``), so the message can
        say what the valid range refers to.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        When ``value`` is not a single integer (see :func:`as_index`).
    IndexError
        When it is outside ``[0, size)``. Negative indices are rejected rather
        than wrapped: an update to ``K[-1]`` is almost always a bug.
    """
    index = value if type(value) is int else as_index(name, value)
    if not 0 <= index < size:
        hint = ""
        if -size <= index < 0:
            hint = f"; negative indices are not wrapped, the last one is {name}={size - 1}"
        raise IndexError(f"{name}={index} is out of range: expected 0 <= {name} < {size} ({axis}){hint}")
    return index


def check_index_array(name: str, value: Any, size: int, *, axis: str) -> np.ndarray:
    """Return ``value`` as a new 1-D int64 array whose entries all lie in ``[0, size)``.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : array_like
        A list of ints, a numpy integer array or an integer torch tensor (any
        device; copied to the host). An empty sequence is allowed.
    size : int
        Length of the indexed axis.
    axis : str
        What is indexed, for the message.

    Returns
    -------
    (k,) int64 ndarray
        Always a new array; the caller's is never modified.

    Raises
    ------
    TypeError
        For boolean, float, string or object entries (masks are not index
        arrays: use ``np.flatnonzero(mask)``).
    ValueError
        When the array is not 1-D (a scalar, or more dimensions).
    IndexError
        When an entry lies outside ``[0, size)``.
    """
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name}: expected a 1-D array of integer indices, could not convert {_describe(value)}: {exc}"
        ) from exc
    if array.size and not _is_integer_dtype(array.dtype):
        if array.dtype == bool:
            hint = f"boolean masks are not index arrays, pass np.flatnonzero({name}) instead"
        elif np.issubdtype(array.dtype, np.floating):
            hint = "convert with .astype(int) if the values are integral"
        else:
            hint = "pass a list or array of ints"
        raise TypeError(
            f"{name}: expected integer indices, got dtype {array.dtype} ({_describe(value)}); {hint}"
        )
    if array.ndim != 1:
        hint = f"; wrap a single index in a list: {name}=[i]" if array.ndim == 0 else ""
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {array.shape}{hint}")
    if array.size:
        bad = (array < 0) | (array >= size)
        if bad.any():
            first = array[np.argmax(bad)].item()
            raise IndexError(f"{name} contains {first}, out of range: expected 0 <= {name} < {size} ({axis})")
    return array.astype(np.int64, copy=True)


#: Accepted ``include_boundaries`` values of :func:`check_scalar`: whether (low, high) are included.
_CLOSED_ENDS = {
    "both": (True, True),
    "left": (True, False),
    "right": (False, True),
    "neither": (False, False),
}
BOUNDARIES = tuple(_CLOSED_ENDS)


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    include_boundaries: str = "both",
) -> float:
    """Return ``value`` as a finite Python float, optionally within an interval.

    In the manner of scikit-learn's ``check_scalar``: one call states the
    type, the finiteness and the range of a scalar argument, and the message
    names the argument and the interval in bracket notation.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : object
        A real number: a Python int or float or a numpy integer or float
        scalar. Bools and strings are rejected (no truthiness, no parsing).
    low, high : float, optional
        Bounds of the interval; None leaves that side unbounded.
    include_boundaries : {"both", "left", "right", "neither"}
        Which bounds belong to the interval: ``"both"`` is ``[low, high]``,
        ``"left"`` ``[low, high)``, ``"right"`` ``(low, high]``, ``"neither"``
        ``(low, high)``. An unbounded side is always open.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        When ``value`` is not a real number.
    ValueError
        When it is NaN or infinite (``"{name}: expected a finite number, got inf"``)
        or outside the interval (``"{name}: expected a number in (0, 1], got 1.5"``).

    Examples
    --------
    >>> check_scalar("tau", 0.5, low=0, high=1, include_boundaries="right")
    0.5
    >>> check_scalar("tau", 0.0, low=0, high=1, include_boundaries="right")
    Traceback (most recent call last):
    ...
    ValueError: tau: expected a number in (0, 1], got 0.0
    """
    if type(value) is float or type(value) is int:
        number = float(value)
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {number!r}")
    if low is None and high is None and include_boundaries == "both":
        return number  # the fast path of every entry update's delta
    closed_low, closed_high = _closed_ends(include_boundaries)
    below = low is not None and (number < low if closed_low else number <= low)
    above = high is not None and (number > high if closed_high else number >= high)
    if below or above:
        interval = format_interval(low, high, include_boundaries)
        shown = int(value) if isinstance(value, numbers.Integral) else number
        raise ValueError(f"{name}: expected a number in {interval}, got {shown!r}")
    return number


def format_interval(low: float | None, high: float | None, include_boundaries: str = "both") -> str:
    """The interval in bracket notation: ``format_interval(0, None) == "[0, inf)"``."""
    closed_low, closed_high = _closed_ends(include_boundaries)
    left = "-inf" if low is None else _format_bound(low)
    right = "inf" if high is None else _format_bound(high)
    opening = "[" if closed_low and low is not None else "("
    closing = "]" if closed_high and high is not None else ")"
    return f"{opening}{left}, {right}{closing}"


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError listing them.

    Parameters
    ----------
    name : str
        Argument name, used in the message.
    value : object
        The candidate; only a string equal to one of the names is accepted.
    choices : iterable of str
        The valid names: a registry (its keys) or a tuple.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        ``"{name}: expected one of 'dense', 'implicit', 'auto', got 'sparse'"``.
    """
    valid = tuple(choices)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, valid))}, got {value!r}")
    return value


def _closed_ends(include_boundaries: str) -> tuple[bool, bool]:
    """Whether the (low, high) ends are closed under ``include_boundaries``."""
    ends = _CLOSED_ENDS.get(include_boundaries) if isinstance(include_boundaries, str) else None
    if ends is None:
        check_choice("include_boundaries", include_boundaries, BOUNDARIES)  # raises
        raise AssertionError  # pragma: no cover
    return ends


def _format_bound(bound: float) -> str:
    """A bound for messages: integral values without ``.0`` (``1``, ``1000000``), others as repr."""
    number = float(bound)
    if number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    return repr(number)


def _as_real_array(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy raises many types here
        raise TypeError(f"{name}: expected a real numeric array, could not convert: {exc}") from exc
    if array.dtype.kind not in "fiu":  # floating, signed or unsigned integer (bool is "b")
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


def _is_array_like(value: Any) -> bool:
    """True for numpy arrays and array-likes with ``shape`` and ``dtype`` (torch tensors)."""
    return isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _is_bool_dtype(dtype: Any) -> bool:
    """True for numpy's and torch's boolean dtypes (torch is not imported)."""
    return str(dtype) in ("bool", "torch.bool")


def _is_integer_dtype(dtype: np.dtype) -> bool:
    """True for numpy's signed and unsigned integer dtypes (numpy bool is not an integer dtype)."""
    return np.issubdtype(dtype, np.integer)


def _describe(value: Any) -> str:
    """``"<type name> <repr>"`` for messages, the repr shortened when long."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"
