"""Pairs (tau, schedule) for tests parametrized over both fold schedules (docs/latency.md):
every tau with "amortized", and with "spread" the taus that leave rows pending (tau = 0
folds at every update; "auto" decides when to fold itself and refuses "spread")."""

import pytest


def tau_schedule_pairs(taus):
    """``(tau, schedule)`` for every tau, and the spread variants."""
    return [(tau, "amortized") for tau in taus] + [(tau, "spread") for tau in taus if tau not in (0, "auto")]


def tau_schedules(taus):
    """:func:`tau_schedule_pairs` as ``pytest.param`` with readable ids."""
    return [
        pytest.param(tau, schedule, id=f"{tau}" if schedule == "amortized" else f"{tau}-{schedule}")
        for tau, schedule in tau_schedule_pairs(taus)
    ]
