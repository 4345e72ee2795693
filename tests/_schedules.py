"""Pairs (tau, schedule) for tests parametrized over both fold schedules (docs/latency.md):
every tau with "amortized", and with "spread" the taus that leave rows pending (tau = 0
folds at every update; "auto" decides when to fold itself and refuses "spread")."""

import pytest


def tau_schedules(taus):
    """``pytest.param(tau, schedule)`` for every tau, and the spread variants."""
    pairs = [pytest.param(tau, "amortized", id=f"{tau}") for tau in taus]
    pairs += [pytest.param(tau, "spread", id=f"{tau}-spread") for tau in taus if tau not in (0, "auto")]
    return pairs
