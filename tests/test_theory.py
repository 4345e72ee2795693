"""Tests of dynattn.theory: the omega(1,1,k) table, the theoretical exponents and the fits."""

import math

import numpy as np
import pytest

from dynattn.theory import (
    ALPHA,
    EXPONENT_RANGE,
    LOWER_BOUND_STATUS,
    OMEGA_TABLES,
    fit_cost_model,
    fit_loglog,
    fit_power_offset,
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


# ---------------------------------------------------------------- fixed cost plus power law

#: Sizes of the reference sweep (half octaves from 256 to 4096).
SIZES = np.array([256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096], dtype=float)


def _samples(x_true, fixed, top, noise, seed, rounds=7):
    """Per-size samples of fixed + c1 n^x (c1 so that the growing part is ``top`` at n = 4096)."""
    rng = np.random.default_rng(seed)
    c1 = top / SIZES.max() ** x_true
    return [(fixed + c1 * n**x_true) * np.exp(rng.normal(0.0, noise, rounds)) for n in SIZES]


def test_cost_model_fits_exact_data_exactly():
    t = 30e-6 + 1e-11 * SIZES**2
    fit = fit_power_offset(SIZES, t)
    assert fit.exponent == pytest.approx(2.0, abs=1e-6)
    assert fit.fixed == pytest.approx(30e-6, rel=1e-6)
    assert fit.scale == pytest.approx(1e-11, rel=1e-5)
    assert not fit.boundary and fit.reps == 0 and math.isnan(fit.low)
    np.testing.assert_allclose(fit.predict(SIZES), t, rtol=1e-9)


def test_ignoring_the_fixed_cost_gets_the_exponent_wrong():
    # 30 us of fixed cost per call is 99 % of the time at n = 256 and 25 % at n = 4096:
    # the log-log slope reads 0.64; the cost model reads the exponent of the growing part.
    t = 30e-6 + 1e-11 * SIZES**2
    assert fit_loglog(SIZES, t).slope < 1.0
    fit = fit_power_offset(SIZES, t)
    assert abs(fit.exponent - 2.0) < 1e-3
    assert float(fit.fixed_share(256)) == pytest.approx(30 / (30 + 1e-11 * 256**2 * 1e6))
    # a pure power law (no fixed cost) is fitted with c0 = 0
    pure = fit_power_offset(SIZES, 1e-9 * SIZES**1.5)
    assert pure.exponent == pytest.approx(1.5, abs=1e-6) and pure.fixed == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("x_true", [1.0, 2.0, 2.5])
def test_cost_model_recovers_exponent_under_noise(x_true):
    samples = _samples(x_true, fixed=30e-6, top=100e-6, noise=0.03, seed=3)
    fit = fit_cost_model(SIZES, samples, reps=200, seed=1)
    assert abs(fit.exponent - x_true) < 0.15
    assert fit.low <= x_true <= fit.high
    assert fit.high - fit.low < 0.6
    assert fit.level == 0.95 and fit.reps == 200 and not fit.boundary
    assert fit.fixed == pytest.approx(30e-6, rel=0.2)
    # the same on the plain log-log line is far off: the fixed cost dominates the small sizes
    medians = [float(np.median(s)) for s in samples]
    assert abs(fit_loglog(SIZES, medians).slope - x_true) > 0.3


def test_interval_is_reproducible_and_widens_with_noise():
    quiet = _samples(2.0, 30e-6, 100e-6, noise=0.01, seed=5)
    loud = _samples(2.0, 30e-6, 100e-6, noise=0.10, seed=5)
    a = fit_cost_model(SIZES, quiet, reps=200, seed=7)
    b = fit_cost_model(SIZES, quiet, reps=200, seed=7)
    assert (a.low, a.high, a.exponent) == (b.low, b.high, b.exponent)
    c = fit_cost_model(SIZES, loud, reps=200, seed=7)
    assert c.high - c.low > 2 * (a.high - a.low)
    # no resampling: no interval
    none = fit_cost_model(SIZES, quiet, reps=0)
    assert math.isnan(none.low) and none.reps == 0 and none.exponent == a.exponent
    single = fit_cost_model(SIZES, [[float(np.median(s))] for s in quiet], reps=100)
    assert math.isnan(single.high)


def test_constant_time_is_flagged_as_undetermined():
    fit = fit_power_offset(SIZES, np.full(SIZES.size, 5e-6))
    assert fit.boundary and fit.scale == 0.0
    assert fit.fixed == pytest.approx(5e-6)
    assert fit.exponent >= EXPONENT_RANGE[0]
    assert float(fit.fixed_share(4096)) == 1.0


def test_cost_model_with_absolute_sigma():
    t = 5e-6 + 2e-10 * SIZES**1.2
    fit = fit_power_offset(SIZES, t, sigma=np.full(SIZES.size, 1e-7))
    assert fit.exponent == pytest.approx(1.2, abs=1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fit_power_offset([1.0, 2.0], [1.0, 2.0]),  # two sizes
        lambda: fit_power_offset([1.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]),  # two distinct
        lambda: fit_power_offset([1.0, 2.0, 3.0], [1.0, -2.0, 3.0]),
        lambda: fit_power_offset([1.0, 2.0, 3.0], [1.0, 2.0]),
        lambda: fit_power_offset([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")]),
        lambda: fit_power_offset([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], sigma=[1.0, 0.0, 1.0]),
        lambda: fit_cost_model([1.0, 2.0, 3.0], [[1.0], [2.0]]),
        lambda: fit_cost_model([1.0, 2.0, 3.0], [[1.0], [], [3.0]]),
        lambda: fit_cost_model([1.0, 2.0, 3.0], [[1.0], [2.0], [3.0]], level=1.0),
        lambda: fit_cost_model([1.0, 2.0, 3.0], [[1.0], [2.0], [3.0]], reps=-1),
    ],
)
def test_cost_model_rejects_bad_input(call):
    with pytest.raises(ValueError):
        call()


def test_fit_records_cost_model_with_samples_and_min_n():
    rng = np.random.default_rng(2)
    recs = []
    for n in SIZES.astype(int):
        upd = (20e-6 + 1e-11 * n**2.0) * np.exp(rng.normal(0, 0.02, 5))
        qry = (5e-6 + 1e-8 * n**0.75) * np.exp(rng.normal(0, 0.02, 5))
        rec = _record(int(n), 0.75, float(np.median(upd)), float(np.median(qry)))
        rec["update_s_samples"] = upd.tolist()
        rec["query_s_samples"] = qry.tolist()
        recs.append(rec)
    (fit,) = fit_records(recs, reps=100)
    assert fit["fit_sizes"] == fit["sizes"] == SIZES.astype(int).tolist()
    model = fit["update_model"]
    assert abs(model["exponent"] - 2.0) < 0.1 and model["low"] <= 2.0 <= model["high"]
    assert model["fixed_share_smallest"] > 0.9 > model["fixed_share_largest"]
    assert fit["update"]["slope"] < 1.5  # the log-log line, for contrast
    assert abs(fit["query_model"]["exponent"] - 0.75) < 0.2
    (cut,) = fit_records(recs, min_n=1024, reps=0)
    assert cut["fit_sizes"] == [1024, 1448, 2048, 2896, 4096] and cut["sizes"] == fit["sizes"]
    assert cut["update_model"]["sizes"] == [1024.0, 1448.0, 2048.0, 2896.0, 4096.0]
    assert math.isnan(cut["update_model"]["low"])
    (few,) = fit_records(recs, min_n=2896, reps=0)
    assert few["update_model"] is None and not few["reliable"]
    text = format_fits([fit, cut, few])
    assert "c0 + c1 n^x [95% CI]" in text and "c0 share" in text
    assert f"[{model['low']:.2f}, {model['high']:.2f}]" in text
    assert "queries" in text and "n/a" in text


def test_lower_bound_status_names_the_conjecture_and_the_preprint():
    text = LOWER_BOUND_STATUS
    for needle in ("Hinted Mv", "Nanongkai", "arXiv:2610.06783", "1/18", "not peer", "0.1204", "Lean"):
        assert needle in text, needle


def test_per_gemm_correction_removes_a_drifting_machine_speed():
    # the machine slows down 2.5x over the large sizes (others' load); the GEMM probe of the
    # same rounds sees the same slowdown, and the correction takes it out again
    slow = np.interp(np.log(SIZES), np.log([256, 1024, 4096]), [1.0, 1.0, 2.5])
    recs = []
    for n, f in zip(SIZES.astype(int), slow, strict=True):
        t = (20e-6 + 1e-11 * n**2.0) * f
        rec = _record(int(n), 0.5, t, 5e-6 * f)
        rec["gemm_gflops"] = 40.0 / f
        recs.append(rec)
    (raw,) = fit_records(recs, reps=0)
    (fixed,) = fit_records(recs, reps=0, per_gemm=True)
    assert raw["update_model"]["exponent"] > 2.3 and not raw["per_gemm"]
    assert fixed["update_model"]["exponent"] == pytest.approx(2.0, abs=1e-3) and fixed["per_gemm"]
    assert "per-GEMM" in format_fits([fixed]) and "per-GEMM" not in format_fits([raw])
    del recs[0]["gemm_gflops"]
    with pytest.raises(ValueError, match="gemm_gflops"):
        fit_records(recs, per_gemm=True)
