"""Pairs (tau, schedule) for tests parametrized over both fold schedules (docs/latency.md):
every tau with "amortized", and with "spread" the taus that leave rows pending (tau = 0
folds at every update; "auto" decides when to fold itself and refuses "spread").

Tests name one more tau, ``AUTO_AWAKE``: ``tau="auto"`` woken by ``fold()`` right after
construction (it starts dormant, docs/policy.md), so that its deferred columns and fold
policy are exercised as well as its dormant reads; :func:`build` constructs either."""

import pytest

from dynattn import DynamicAttention

AUTO_AWAKE = "auto-awake"


def build(Q, K, V, *, tau, **options):
    """``DynamicAttention(Q, K, V, tau=tau, **options)``, with ``tau=AUTO_AWAKE`` meaning
    ``tau="auto"`` woken at once."""
    att = DynamicAttention(Q, K, V, tau="auto" if tau == AUTO_AWAKE else tau, **options)
    if tau == AUTO_AWAKE:
        att.fold()
    return att


def tau_schedule_pairs(taus):
    """``(tau, schedule)`` for every tau, and the spread variants."""
    spread = [tau for tau in taus if tau not in (0, "auto", AUTO_AWAKE)]
    return [(tau, "amortized") for tau in taus] + [(tau, "spread") for tau in spread]


def tau_schedules(taus):
    """:func:`tau_schedule_pairs` as ``pytest.param`` with readable ids."""
    return [
        pytest.param(tau, schedule, id=f"{tau}" if schedule == "amortized" else f"{tau}-{schedule}")
        for tau, schedule in tau_schedule_pairs(taus)
    ]
