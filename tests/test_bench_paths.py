"""Smoke test of benchmarks/bench_paths.py: tiny sizes, structure of the output only (never timing)."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench_paths():
    return load_benchmark("bench_paths")


def test_tiny_run_writes_every_section(bench_paths, tmp_path, backend):
    if backend != "numpy":
        pytest.skip("the benchmark builds its own arrays; one backend is enough")
    cfg = bench_paths.PathsConfig.tiny()
    result = bench_paths.run_paths(cfg, out_dir=tmp_path, command="tiny", echo=lambda _: None)
    saved = json.loads((tmp_path / "paths.json").read_text())
    text = (tmp_path / "paths.txt").read_text()
    assert saved["schema"] == result["schema"] == bench_paths.SCHEMA
    assert saved["command"] == "tiny" and saved["git_commit"] and "# commit " in text
    assert set(saved["tables"]) == set("abcdefgh")
    for letter in "abcdefgh":
        assert f"## {letter}. " in text
    sections = {rec["section"] for rec in saved["records"]}
    assert {"a_token_edit", "b_decode", "c_all_rows", "d_batches", "e_construction", "f_dtypes"} <= sections
    assert {"g_fallbacks", "h_eager"} <= sections
    for rec in saved["records"]:
        if "median_s" in rec:
            assert rec["min_s"] <= rec["median_s"] <= rec["max_s"] and rec["ratio_to_ours"] > 0
    contenders = {rec["contender"] for rec in saved["records"] if rec["section"] == "a_token_edit"}
    assert {"dynattn", "dynattn-auto", "rows-numpy", "eager"} <= contenders
    decode = [
        r for r in saved["records"] if r["section"] == "b_decode" and r["contender"].startswith("dynattn")
    ]
    assert decode and all(r["nbytes_peak"] > 0 and r["memory_budget"] == cfg.memory_budget for r in decode)
    reserved = {r["contender"]: r["reserve_s"] for r in decode}
    assert {"dynattn-auto", "dynattn-auto grown"} <= set(reserved)
    assert reserved["dynattn-auto"] > 0 and reserved["dynattn-auto grown"] is None
    fallbacks = [r for r in saved["records"] if r["section"] == "g_fallbacks"]
    assert len(fallbacks) == 2 and all(0 <= r["fraction"] <= 1 for r in fallbacks)
    assert saved["targets"] and all(
        {"target", "measured", "bound", "met"} <= set(t) for t in saved["targets"]
    )
    assert "targets met:" in text


def test_command_line_choices(bench_paths, backend):
    if backend != "numpy":
        pytest.skip("one backend is enough")
    quick = bench_paths.PathsConfig.preset(quick=True)
    full = bench_paths.PathsConfig.preset(full=True)
    assert max(quick.token_sizes) < min(bench_paths.PathsConfig().token_sizes)
    assert 16384 in full.token_sizes and 16384 in full.decode_sizes
