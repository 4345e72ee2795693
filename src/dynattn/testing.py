"""Testing helpers: the one shared float64 reference and accuracy criteria.

Everything in :mod:`dynattn` is checked against :func:`reference_attention`,
an independent from-scratch recomputation in float64 (or in extended
precision with ``precise=True``). It shares no code with the structure.

Accuracy follows the attention-kernel convention (FlashAttention's tests): an
answer is good when its error against the reference is at most a small multiple
of the error of a naive from-scratch recomputation *in the working dtype*, plus
an absolute floor relative to the column's value scale::

    |O_struct - O_ref| <= factor * |O_naive - O_ref| + target * max|V[:, j]|

with ``target`` 1e-10 for float64 and 1e-4 for float32: the accuracy targets of
docs/accuracy.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Accuracy targets (docs/accuracy.md), relative to max|V[:, j]|.
TARGET = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def reference_attention(
    Q: Any, K: Any, V: Any, *, scale: float = 1.0, mask: Any = None, precise: bool = False
) -> np.ndarray:
    """Exact softmax attention ``O = softmax(scale * Q K^T, masked) V``, from scratch.

    Parameters
    ----------
    Q : (n, d), K : (m, d), V : (m, e)
        Inputs of any real dtype; converted to float64 (exactly, for float32).
    scale : float
        Softmax scale.
    mask : (n, m) bool array, optional
        ``True`` where query i may attend key c. Rows with no visible key give 0.
    precise : bool
        Compute logits and sums with ``np.longdouble`` (extended precision on
        x86) instead of float64; for inputs whose logits are so large that
        float64 rounding of the logit itself matters.

    Returns
    -------
    (n, e) float64 array.
    """
    work = np.longdouble if precise else np.float64
    q = np.asarray(Q, dtype=work)
    k = np.asarray(K, dtype=work)
    v = np.asarray(V, dtype=work)
    logits = (q @ k.T) * work(scale)
    if mask is not None:
        visible = np.asarray(mask, dtype=bool)
        logits = np.where(visible, logits, -np.inf)
    row_max = logits.max(axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    weights = np.exp(logits - row_max)
    sums = weights.sum(axis=1, keepdims=True)
    # normalized before the product, so that any finite V gives a finite answer
    out = (weights / np.where(sums > 0, sums, 1)) @ v
    return np.asarray(out, dtype=np.float64)


def naive_attention(
    Q: Any, K: Any, V: Any, *, scale: float = 1.0, dtype: Any = np.float64, mask: Any = None
) -> np.ndarray:
    """A from-scratch recomputation done entirely in ``dtype`` (the error yardstick)."""
    dt = np.dtype(dtype)
    q, k, v = (np.asarray(x, dtype=dt) for x in (Q, K, V))
    logits = (q @ k.T) * dt.type(scale)
    if mask is not None:
        logits = np.where(np.asarray(mask, dtype=bool), logits, -np.inf)
    row_max = logits.max(axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0))
    sums = weights.sum(axis=1, keepdims=True)
    return (weights @ v) / np.where(sums > 0, sums, 1)


def value_scale(V: Any) -> np.ndarray:
    """``max|V[:, j]|`` per column ``(e,)``, with 0 replaced by 1 (a zero column answers 0)."""
    scale = np.abs(np.asarray(V, dtype=np.float64)).max(axis=0)
    return np.where(scale > 0, scale, 1.0)


def allowed_error(
    Q: Any,
    K: Any,
    V: Any,
    *,
    scale: float,
    dtype: Any,
    reference: np.ndarray | None = None,
    factor: float = 4.0,
    mask: Any = None,
) -> np.ndarray:
    """Per-entry error allowance ``factor * err_naive + target * max|V[:, j]|``, shape ``(n, e)``."""
    dt = np.dtype(dtype)
    ref = reference_attention(Q, K, V, scale=scale, mask=mask) if reference is None else reference
    with np.errstate(over="ignore", invalid="ignore"):
        naive = naive_attention(Q, K, V, scale=scale, dtype=dt, mask=mask).astype(np.float64)
    naive_err = np.abs(naive - ref)
    naive_err = np.where(np.isfinite(naive_err), naive_err, 0.0)
    return factor * naive_err + TARGET[dt] * value_scale(V)[None, :]


def assert_attention_close(
    actual: Any,
    Q: Any,
    K: Any,
    V: Any,
    *,
    scale: float,
    dtype: Any,
    rows: Any = None,
    cols: Any = None,
    factor: float = 4.0,
    context: str = "",
    mask: Any = None,
) -> float:
    """Assert that ``actual`` matches the reference within :func:`allowed_error`.

    ``actual`` is the full ``(n, e)`` output, or with ``rows`` / ``cols`` the
    entries ``O[rows[k], cols[k]]`` (``cols=None`` with ``rows``: whole rows).
    ``mask: (n, m)`` bool, optional, is applied to both the reference and the
    naive recomputation. Returns the worst error relative to ``max|V[:, j]|``.
    """
    Q, K, V, actual = (as_numpy(x) for x in (Q, K, V, actual))
    ref = reference_attention(Q, K, V, scale=scale, mask=mask)
    allowance = allowed_error(Q, K, V, scale=scale, dtype=dtype, reference=ref, factor=factor, mask=mask)
    got = np.asarray(actual, dtype=np.float64)
    if rows is not None and cols is not None:
        ref, allowance = ref[rows, cols], allowance[rows, cols]
        vscale = value_scale(V)[cols]
    elif rows is not None:
        ref, allowance = ref[rows], allowance[rows]
        vscale = value_scale(V)[None, :]
    else:
        vscale = value_scale(V)[None, :]
    err = np.abs(got - ref)
    if not (np.all(np.isfinite(got)) and np.all(err <= allowance)):
        worst = np.unravel_index(np.argmax(np.where(np.isfinite(err), err - allowance, np.inf)), err.shape)
        raise AssertionError(
            f"{context}attention mismatch at {tuple(int(w) for w in worst)}: got {got[worst]!r}, "
            f"reference {ref[worst]!r}, error {err[worst]:.3e} > allowed {allowance[worst]:.3e}"
        )
    return float(np.max(err / vscale)) if err.size else 0.0


def random_problem(
    n: int,
    m: int,
    d: int,
    e: int,
    *,
    seed: int = 0,
    logit_scale: float = 1.0,
    dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian ``Q: (n, d)``, ``K: (m, d)``, ``V: (m, e)``; logits have std ``logit_scale``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d)) * np.sqrt(logit_scale / np.sqrt(d))
    k = rng.standard_normal((m, d)) * np.sqrt(logit_scale / np.sqrt(d))
    v = rng.standard_normal((m, e))
    return tuple(x.astype(dtype) for x in (q, k, v))  # type: ignore[return-value]


def as_numpy(value: Any) -> np.ndarray:
    """A host numpy copy of an answer (numpy array, torch tensor on any device, or scalar)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.float16", "torch.bfloat16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)
