"""Merging partial attention states ``(O, LSE)`` over disjoint sets of keys.

Attention of a query over the union of key sets A and B is a convex combination
of the attention over each set, weighted by their softmax masses. With
``LSE_X = log sum_{c in X} exp(s * q.k_c)`` (natural log) and ``O_X`` the attention
output over X,

    LSE = logaddexp(LSE_A, LSE_B)
    O   = exp(LSE_A - LSE) * O_A + exp(LSE_B - LSE) * O_B

Both weights are in [0, 1] and sum to 1, so the merge cannot overflow and adds
only a few roundings. A set that a row cannot see contributes ``LSE = -inf``
(its ``O`` is ignored, 0 by convention); a row that sees no key in any set gets
``O = 0`` and ``LSE = -inf``.

Layout: ``O: (*batch, n, e)`` and ``LSE: (*batch, n)``, the layout of
:meth:`dynattn.DynamicAttention.query_rows` with ``return_lse=True``.
FlashInfer's ``merge_state`` takes ``[seq_len, num_heads, head_dim]`` and
``[seq_len, num_heads]`` (vLLM's ``merge_attn_states``: outputs
``[tokens, heads, head_size]``, LSE ``[heads, tokens]``): move the head axis to
convert. Both use the natural log in their Python interfaces; a log-sum-exp kept
in base 2 converts by multiplying with ``ln 2``.

Works on numpy arrays and torch tensors alike (the result follows the inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynattn.backends import is_torch_tensor

__all__ = ["merge_states", "merge_states_many"]


def merge_states(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """Merge two attention states over disjoint key sets.

    Parameters
    ----------
    o_a, o_b : (*batch, n, e) arrays
        Attention outputs over key sets A and B.
    lse_a, lse_b : (*batch, n) arrays
        Their log-sum-exps (natural log; -inf where a row sees no key of the set).

    Returns
    -------
    o : (*batch, n, e) array
        Attention output over the union of the two key sets.
    lse : (*batch, n) array
        Its log-sum-exp.

    Runtime complexity: O(batch*n*e).
    """
    return merge_states_many([o_a, o_b], [lse_a, lse_b])


def merge_states_many(outputs: Sequence[Any], lses: Sequence[Any]) -> tuple[Any, Any]:
    """Merge any number of attention states over disjoint key sets.

    Parameters
    ----------
    outputs : sequence of (*batch, n, e) arrays
        Attention outputs, one per key set (at least one).
    lses : sequence of (*batch, n) arrays
        Their log-sum-exps, in the same order.

    Returns
    -------
    (o, lse) : the merged ``(*batch, n, e)`` output and ``(*batch, n)`` log-sum-exp.

    Runtime complexity: O(k*batch*n*e) for k states.
    """
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(
            "outputs and lses: expected the same positive number of states, "
            f"got {len(outputs)} and {len(lses)}"
        )
    torch_inputs = is_torch_tensor(outputs[0])
    xp: Any
    if torch_inputs:
        import torch as xp
    else:
        xp = np
    for index, (o, lse) in enumerate(zip(outputs, lses, strict=True)):
        if is_torch_tensor(o) != torch_inputs or is_torch_tensor(lse) != torch_inputs:
            raise TypeError(f"state {index}: expected all outputs and lses to be {xp.__name__} arrays")
        if tuple(o.shape[:-1]) != tuple(lse.shape) or tuple(o.shape) != tuple(outputs[0].shape):
            raise ValueError(
                f"state {index}: expected O of shape {tuple(outputs[0].shape)} and LSE of shape "
                f"{tuple(outputs[0].shape[:-1])}, got {tuple(o.shape)} and {tuple(lse.shape)}"
            )
    stacked_lse = xp.stack(list(lses))  # (k, *batch, n)
    if bool(xp.isnan(stacked_lse).any()) or bool((stacked_lse == math.inf).any()):
        raise ValueError(
            "lses: expected finite log-sum-exps or -inf (a row that sees no key), got NaN or +inf"
        )
    if torch_inputs:
        top = stacked_lse.amax(dim=0)
    else:
        top = stacked_lse.max(axis=0)
    seen = xp.isfinite(top)
    finite_top = xp.where(seen, top, xp.zeros_like(top))
    mass = xp.exp(stacked_lse - finite_top[None])  # (k, *batch, n), exp(-inf) = 0
    total = mass.sum(0)
    lse = xp.where(seen, finite_top + xp.log(xp.where(seen, total, xp.ones_like(total))), top)
    weights = mass / xp.where(seen, total, xp.ones_like(total))[None]
    out = xp.zeros_like(outputs[0])
    for weight, o in zip(weights, outputs, strict=True):
        # a set a row cannot see (weight 0) contributes nothing, whatever its O holds
        out = out + xp.where(weight[..., None] > 0, weight[..., None] * o, 0.0)
    return out, xp.where(seen, lse, xp.full_like(lse, -math.inf))
