"""Smoke test of benchmarks/bench_policy.py: --quick sizes, structure of the output only (never timing)."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench_policy():
    return load_benchmark("bench_policy")


@pytest.mark.parametrize("regime", ["paper", "llm"])
def test_quick_run_writes_every_cell(bench_policy, tmp_path, backend, regime, capsys):
    if backend != "numpy":
        pytest.skip("the benchmark builds its own arrays; one backend is enough")
    result = bench_policy.main(["--quick", "--regime", regime, "--out", str(tmp_path)])
    stem = f"policy_{regime}"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    text = (tmp_path / f"{stem}.txt").read_text()
    assert saved["schema"] == result["schema"] == bench_policy.SCHEMA
    assert saved["command"].startswith("python benchmarks/bench_policy.py --quick")
    assert saved["git_commit"] and "# commit " in text and "targets met:" in text
    assert saved["other_load_cores"] >= 0 and len(saved["loadavg_start"]) == 3
    assert set(saved["policy_rates"]) == {"gemm", "gemv", "call"}
    cfg = saved["config"]
    assert cfg["regime"] == regime and cfg["repeats"] == 1 and len(cfg["ratios"]) == 2

    storages = ["dense", "implicit"] if regime == "paper" else ["auto"]
    expected_fixed = len(bench_policy.TAUS) * len(storages)
    assert [rec["ratio"] for rec in saved["records"]] == cfg["ratios"]
    for rec in saved["records"]:
        cells = rec["cells"]
        kinds = [cell["kind"] for cell in cells.values()]
        assert kinds.count("fixed") == expected_fixed and kinds.count("auto") == 1
        assert {"OnDemand", "Eager"} <= set(cells)
        assert set(cells) | set(rec["skipped"]) >= {"OnDemand", "Eager", "Recompute"}
        for label, cell in cells.items():
            assert cell["seconds_per_update"] > 0 and cell["pooled_seconds_per_update"] > 0
            assert cell["seconds_per_update_min"] <= cell["seconds_per_update"]
            assert cell["seconds_per_update"] <= cell["seconds_per_update_max"]
            assert len(cell["segments"]) == cfg["repeats"] == len(cell["seconds_per_update_samples"])
            assert all(seg["updates"] >= 1 for seg in cell["segments"])
            assert cell["warmup_updates"] >= 1
            if cell["kind"] != "baseline":
                assert isinstance(cell["partial_cycle"], bool) and cell["threshold"] >= 1
                assert {"folds", "columns_materialized", "columns_deferred"} <= set(cell["stats_timed"])
            if regime == "llm" and cell["kind"] != "baseline":
                assert cell["storage"] in label  # storage="auto" is labelled with what it picked
        # the same sequence for everyone: the queries of a segment follow from its updates
        ratio = bench_policy.ratio_fraction(rec["ratio"])
        for cell in cells.values():
            for seg in cell["segments"]:
                assert abs(seg["queries"] - seg["updates"] * ratio) <= 1
        assert rec["winner"] in cells and rec["best_other"] in cells and rec["best_other"] != rec["auto"]
        assert rec["auto_over_best"] > 0 and rec["ondemand_over_auto"] > 0
        assert rec["auto_over_best_pooled"] > 0 and rec["ondemand_over_auto_pooled"] > 0
        assert {"folds", "columns_materialized", "columns_deferred"} <= set(rec["auto_stats_timed"])
        assert f"{rec['ratio']:g}" in text

    summary = saved["summary"]
    assert len(summary["per_ratio"]) == len(cfg["ratios"])
    assert summary["worst_auto_over_best"] == max(r["auto_over_best"] for r in saved["records"])
    assert isinstance(summary["auto_within_target"], bool)
    assert isinstance(summary["ondemand_within_target"], bool)
    assert "worst auto/best over all r" in text and "worst OnDemand/auto over all r" in text
    assert len(saved["targets"]) == 2 * len(cfg["ratios"])
    if saved["figure"] is not None:
        assert (tmp_path / saved["figure"]).stat().st_size > 0


def test_workload_is_the_same_for_every_reader(bench_policy, backend):
    if backend != "numpy":
        pytest.skip("numpy only")
    cfg = bench_policy.PolicyConfig.preset("paper", quick=True)
    a = bench_policy.Workload(cfg, 0.03, (1, 48, 48, 48, 48))
    b = bench_policy.Workload(cfg, 0.03, (1, 48, 48, 48, 48))
    # read in different chunkings, the events and queries agree (a chunk ends at a block's end)
    first = [a.chunk(start, 100) for start in (0, 100, 200)]
    second = b.chunk(0, 256)
    assert [c["count"] for c in first] == [100, 100, 56] and second["count"] == 256
    assert first[0]["events"][0] == second["events"][0][:100]
    assert first[1]["events"][3] == second["events"][3][100:200]
    total = sum(len(c["qrows"]) for c in first)
    assert total == len(second["qrows"]) == 7  # floor(256 * 3 / 100)
    assert (
        first[0]["qrows"] + first[1]["qrows"] == second["qrows"][: len(first[0]["qrows"] + first[1]["qrows"])]
    )
    assert bench_policy.ratio_fraction(0.03) == bench_policy.Fraction(3, 100)
