"""Smoke test of benchmarks/bench_streams.py: tiny sizes, structure of the output only (never timing)."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench_streams():
    return load_benchmark("bench_streams")


def test_tiny_run_writes_both_parts(bench_streams, tmp_path, backend, capsys):
    if backend != "numpy":
        pytest.skip("the benchmark builds its own arrays; one backend is enough")
    result = bench_streams.main(["--tiny", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "streams.json").read_text())
    text = (tmp_path / "streams.txt").read_text()
    assert saved["schema"] == result["schema"] == bench_streams.SCHEMA
    assert saved["command"].startswith("python benchmarks/bench_streams.py --tiny")
    assert saved["git_commit"] and "# commit " in text and "threads at start" in text
    assert "## a. soak" in text and "## b. window step" in text and "targets met:" in text
    cfg = saved["config"]

    # a. one soak per dtype: bounded series, blocks covering every step, checkpoints
    assert [run["summary"]["dtype"] for run in saved["soak"]] == cfg["soak_dtypes"]
    for run in saved["soak"]:
        summary = run["summary"]
        assert summary["steps"] == cfg["soak_steps"]
        assert [r["step"] for r in run["series"]] == list(
            range(0, cfg["soak_steps"] + 1, cfg["record_every"])
        )
        assert all(r["m"] == cfg["soak_window"] for r in run["series"])  # evicted indices are reused
        assert run["blocks"][0]["first"] == 1 and run["blocks"][-1]["last"] == cfg["soak_steps"]
        assert all(b["per_step_s"] > 0 for b in run["blocks"])
        assert len(run["checkpoints"]) == cfg["checkpoints"]
        assert all(c["live_keys"] == cfg["soak_window"] for c in run["checkpoints"])
        assert summary["worst_error"] <= summary["accuracy_target"]
        assert run["aged"]["ratio"] > 0 and len(run["aged"]["aged_s_samples"]) == cfg["aged_repeats"]
        assert summary["memory_ratio"] >= 1.0 and set(summary["stats"]) >= {"folds", "query_fallbacks"}

    # b. one record per thread count, every contender with its samples and ratio
    step = saved["window_step"]
    assert [run["threads"] for run in step["runs"]] == cfg["threads"]
    for run in step["runs"]:
        assert {"dynattn", "numpy"} <= set(run["contenders"])
        for timing in run["contenders"].values():
            assert len(timing["median_s_samples"]) == cfg["repeats"]
            assert timing["median_s_min"] <= timing["median_s"] <= timing["median_s_max"]
            assert timing["ratio_to_dynattn"] > 0
        assert {"folds", "query_fallbacks", "rows_refreshed"} <= set(run["stats_during"])
    assert step["final_m"] == cfg["step_window"] and step["final_error"] <= 1e-4

    kinds = {(t["part"], t["target"].split(" ")[0]) for t in saved["targets"]}
    assert ("a", "soak") in kinds and all(isinstance(t["met"], bool) for t in saved["targets"])
