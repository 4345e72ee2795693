"""Smoke test of benchmarks/bench_latency.py: tiny sizes, structure of the output and the
percentile arithmetic only (never timing)."""

import json

import numpy as np
import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench_latency():
    return load_benchmark("bench_latency")


@pytest.fixture
def numpy_only(backend):
    if backend != "numpy":
        pytest.skip("the benchmark builds its own arrays; one backend is enough")


def test_percentiles_are_nearest_rank(bench_latency, numpy_only):
    sample = list(range(1, 101))
    rng = np.random.default_rng(0)
    rng.shuffle(sample)
    p = bench_latency.percentile
    assert p(sample, 50) == 50
    assert p(sample, 99) == 99
    assert p(sample, 99.9) == 100
    assert p(sample, 100) == 100 and p(sample, 0) == 1 and p(sample, 1) == 1
    assert p(range(1, 1001), 99.9) == 999  # not rounded up to the max by 99.9/100 in floating point
    assert p(range(1, 4001), 99.9) == 3996  # the 5th largest of 4000
    assert np.isnan(p([], 50))
    data = rng.exponential(size=777)
    for q in (0, 1, 37.5, 50, 99, 99.9, 100):
        assert p(data, q) == np.percentile(data, q, method="inverted_cdf")


def test_latency_stats(bench_latency, numpy_only):
    ns = np.arange(1, 101) * 1000  # 1 .. 100 us
    s = bench_latency.latency_stats(ns, slowest=3)
    assert s["count"] == 100
    assert s["mean_s"] == pytest.approx(50.5e-6)
    assert s["p50_s"] == pytest.approx(50e-6) and s["p99_s"] == pytest.approx(99e-6)
    assert s["p999_s"] == pytest.approx(100e-6) and s["max_s"] == pytest.approx(100e-6)
    assert s["min_s"] == pytest.approx(1e-6)
    assert s["max_over_mean"] == pytest.approx(100 / 50.5)
    assert s["p999_over_mean"] == pytest.approx(100 / 50.5)
    assert [x["op"] for x in s["slowest"]] == [99, 98, 97]
    assert s["percentiles_s"]["50"] == pytest.approx(50e-6)


def test_warmup_covers_two_fold_cycles(bench_latency, numpy_only):
    for m, T in ((64, 8), (512, 235), (2048, 790)):
        w = bench_latency.warmup_ops(m, T, 2.0)
        assert w >= 2 * T and w >= 2 * bench_latency.expected_cycle(m, T)


def _check_run(bench_latency, tmp_path, schedules):
    cfg = bench_latency.LatencyConfig.tiny()
    result = bench_latency.run_latency(cfg, out_dir=tmp_path, command="tiny", echo=lambda _: None)
    saved = json.loads((tmp_path / "latency.json").read_text())
    text = (tmp_path / "latency.txt").read_text()
    assert saved["schema"] == result["schema"] == bench_latency.SCHEMA
    assert saved["command"] == "tiny" and saved["git_commit"] and "# commit " in text
    assert saved["schedules"] == schedules
    assert set(saved["tables"]) == {"a", "b"} and "## a. " in text and "## b. " in text
    assert "targets met:" in text
    recs = saved["records"]
    paper = [r for r in recs if r["section"] == "a_paper"]
    llm = [r for r in recs if r["section"] == "b_llm"]
    assert len(paper) == len(cfg.paper_sizes) * len(cfg.taus) * len(schedules)
    assert len(llm) == len(cfg.llm_sizes) * len(schedules)
    for r in recs:
        assert r["schedule"] in schedules and r["threshold"] >= 1
        assert r["warmup_ops"] >= 2 * r["threshold"] and r["warmup_folds"] >= 1
        kinds = ("update", "query") if r["section"] == "a_paper" else ("edit",)
        for kind in kinds:
            s = r[kind]
            assert s["count"] == r["timed_ops"]
            assert 0 < s["min_s"] <= s["p50_s"] <= s["p99_s"] <= s["p999_s"] <= s["max_s"]
            assert s["min_s"] <= s["mean_s"] <= s["max_s"]
            assert s["max_over_mean"] >= 1 and s["p999_over_mean"] > 0
    if saved["figure"] is not None:
        assert (tmp_path / "latency.png").stat().st_size > 0
    return saved, text


def test_tiny_run_measures_both_schedules_with_every_target(bench_latency, tmp_path, numpy_only):
    saved, text = _check_run(bench_latency, tmp_path, ["amortized", "spread"])
    targets = saved["targets"]
    assert len(targets) == 4 * len(saved["config"]["taus"]) + 1
    assert all({"target", "measured", "bound", "kind", "met"} <= set(t) for t in targets)
    assert "vs amortized" in text


def test_command_line_choices(bench_latency, numpy_only):
    quick = bench_latency.LatencyConfig.preset(quick=True)
    full = bench_latency.LatencyConfig.preset()
    assert quick.paper_sizes == [256, 512] and quick.llm_sizes == [1024]
    assert full.paper_sizes == [1024, 2048] and full.llm_sizes == [16384] and full.paper_updates == 4000
    assert full.taus == [0.5, 0.75, 0.875] and full.heads == 8 and full.head_dim == 64
