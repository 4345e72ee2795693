"""benchmarks/fit_linear_term.py: the fit recovers a known exponent next to a linear term."""

import numpy as np
import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def fit_linear_term():
    return load_benchmark("fit_linear_term")


@pytest.mark.parametrize("exponent", [1.8, 2.0, 2.3])
def test_recovers_the_exponent_where_the_plain_model_cannot(fit_linear_term, exponent):
    n = np.array([256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096], dtype=float)
    # a fixed cost, an O(n) part that is a fifth of the time at n = 4096, and the power law
    power = 4e-4 * (n / 4096) ** exponent
    times = 1e-5 + 1e-4 * n / 4096 + power
    x, (c0, c1, c2) = fit_linear_term._fit(n, times, np.arange(1.0, 3.5001, 0.01))
    assert x == pytest.approx(exponent, abs=0.011)
    assert (c0, c1, c2) == pytest.approx((1e-5, 1e-4, 4e-4), rel=0.05)
    # dynattn.theory's c0 + c1 n^x absorbs the linear part into x
    from dynattn.theory import fit_power_offset

    assert fit_power_offset(n, times).exponent < exponent - 0.05


def test_negative_coefficients_are_skipped(fit_linear_term):
    n = np.array([256.0, 512.0, 1024.0, 2048.0, 4096.0])
    times = 1e-3 - 2e-7 * n + 1e-11 * n**2  # no non-negative fit at x = 2
    x, coef = fit_linear_term._fit(n, times, np.array([2.0]))
    assert np.isnan(x) and np.isnan(coef).all()
