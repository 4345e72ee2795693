"""Tests of dynattn.theory: the omega(1,1,k) table, the theoretical exponents and the fits."""

import math

import numpy as np
import pytest

from dynattn.theory import (
    ALPHA,
    OMEGA_TABLES,
    fit_loglog,
    fit_records,
    format_fits,
    omega_classical,
    omega_points,
    omega_rect,
    query_exponent,
    update_exponent,
)

# ---------------------------------------------------------------- omega table


def test_tables_have_citations_and_sorted_points():
    for name, table in OMEGA_TABLES.items():
        assert "arXiv" in table["citation"], name
        ks = [k for k, _ in table["points"]]
        assert ks == sorted(ks) and len(set(ks)) == len(ks), name
        for k, w in table["points"]:
            # every bound lies between the trivial lower bound and classical multiplication
            assert max(2.0, 1.0 + k) - 1e-12 <= w <= omega_classical(k) + 1e-12, (name, k, w)


def test_omega_is_two_up_to_alpha():
    for k in np.linspace(0.0, ALPHA, 7):
        assert omega_rect(k) == 2.0
    assert omega_rect(ALPHA + 0.01) > 2.0


def test_headline_values_of_the_papers():
    # square exponent: omega < 2.371339 (ADVXXZ24), < 2.371552 (VXXZ24)
    assert omega_rect(1.0) == pytest.approx(2.371339)
    assert omega_rect(1.0, "VXXZ24") == pytest.approx(2.371552)
    assert omega_rect(0.5) == pytest.approx(2.042776)
    # mu: omega(1,1,mu) = 1 + 2 mu, mu < 0.527661 (VXXZ24)
    mu = 0.527661
    assert omega_rect(mu, "VXXZ24") == pytest.approx(1 + 2 * mu, abs=1e-5)


def test_best_is_no_worse_than_each_table_at_its_points():
    for name, table in OMEGA_TABLES.items():
        for k, w in table["points"]:
            assert omega_rect(k) <= w + 1e-12, (name, k)


def test_interpolation_is_linear_between_breakpoints_and_convex():
    pts = omega_points()
    for (k1, w1), (k2, w2) in zip(pts, pts[1:], strict=False):
        mid = (k1 + k2) / 2
        assert omega_rect(mid) == pytest.approx((w1 + w2) / 2, abs=1e-12)
    ks = np.linspace(0, 2, 401)
    ws = np.array([omega_rect(k) for k in ks])
    assert np.all(np.diff(ws) >= -1e-12)  # nondecreasing
    assert np.all(np.diff(ws, 2) >= -1e-9)  # convex


def test_omega_rejects_out_of_range_and_unknown_table():
    with pytest.raises(ValueError, match="k"):
        omega_rect(-0.1)
    with pytest.raises(ValueError, match="k"):
        omega_rect(2.5)
    with pytest.raises(ValueError, match="table"):
        omega_rect(0.5, "nope")


def test_theoretical_exponents():
    for tau in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert update_exponent(tau, "classical") == pytest.approx(2.0)
        assert update_exponent(tau) == pytest.approx(omega_rect(tau) - tau)
        assert update_exponent(tau) <= 2.0 + 1e-12
        assert query_exponent(tau) == tau
        assert query_exponent(tau, "paper") == 1 + tau
    assert update_exponent(1.0) == pytest.approx(1.371339)
    with pytest.raises(ValueError):
        query_exponent(0.5, "bogus")


# ---------------------------------------------------------------- fits


def test_fit_recovers_exact_power_law():
    x = np.array([128, 256, 512, 1024, 2048])
    fit = fit_loglog(x, 3e-9 * x**2.0)
    assert fit.slope == pytest.approx(2.0, abs=1e-12)
    assert math.exp(fit.intercept) == pytest.approx(3e-9, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.stderr == pytest.approx(0.0, abs=1e-9)
    assert fit.points == 5 and fit.span == 16
    np.testing.assert_allclose(fit.predict(x), 3e-9 * x**2.0, rtol=1e-9)


def test_fit_with_noise_reports_stderr():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 1600, 6)
    y = 1e-6 * x**0.5 * np.exp(rng.normal(0, 0.05, x.size))
    fit = fit_loglog(x, y)
    assert fit.slope == pytest.approx(0.5, abs=0.1)
    assert 0 < fit.stderr < 0.1
    assert abs(fit.slope - 0.5) < 4 * fit.stderr + 1e-3


def test_fit_two_points_has_nan_stderr():
    fit = fit_loglog([10, 20], [1.0, 4.0])
    assert fit.slope == pytest.approx(2.0)
    assert math.isnan(fit.stderr)


@pytest.mark.parametrize(
    "x, y",
    [
        ([1.0], [1.0]),
        ([2.0, 2.0], [1.0, 3.0]),
        ([1.0, 2.0], [1.0, 0.0]),
        ([1.0, 2.0], [1.0]),
        ([1.0, -2.0], [1.0, 1.0]),
        ([1.0, 2.0], [1.0, float("nan")]),
    ],
)
def test_fit_rejects_bad_input(x, y):
    with pytest.raises(ValueError):
        fit_loglog(x, y)


def _record(n, tau, update, query, impl="dynamic", regime="paper"):
    return {
        "impl": impl,
        "regime": regime,
        "n": n,
        "tau": tau,
        "storage": "dense",
        "dtype": "float64",
        "update_s": update,
        "query_s": query,
    }


def test_fit_records_groups_by_tau_and_flags_reliability():
    sizes = [256, 512, 1024, 2048]
    recs = [_record(n, 0.5, 1e-9 * n**2, 1e-7 * n**0.5) for n in sizes]
    recs += [_record(n, 1.0, 2e-9 * n**2, 1e-7 * n) for n in sizes[:2]]
    recs += [_record(512, None, 1.0, 1.0, impl="ondemand")]
    recs += [_record(512, 0.5, 1.0, 1.0, regime="llm")]
    fits = fit_records(recs)
    assert [f["tau"] for f in fits] == [0.5, 1.0]
    half, one = fits
    assert half["update"]["slope"] == pytest.approx(2.0)
    assert half["query"]["slope"] == pytest.approx(0.5)
    assert half["reliable"] and not one["reliable"]
    assert half["theory_update_classical"] == pytest.approx(2.0)
    assert half["theory_update_best"] == pytest.approx(omega_rect(0.5) - 0.5)
    assert half["theory_query"] == 0.5
    text = format_fits(fits)
    assert "2.00" in text and "indicative only" in text
    assert format_fits([]).startswith("no ")
