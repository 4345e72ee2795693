"""Smoke test of benchmarks/profile_paths.py: small sizes, structure of the output only (never timing)."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def profile_paths():
    return load_benchmark("profile_paths")


def test_quick_run_reports_every_path(profile_paths, tmp_path, backend, capsys):
    if backend != "numpy":
        pytest.skip("the script builds its own arrays; one backend is enough")
    assert profile_paths.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "profile.json").read_text())
    text = (tmp_path / "profile.txt").read_text()
    assert text in capsys.readouterr().out and "# commit " in text
    assert [r["path"].split(",")[0].split(" = ")[0] for r in saved["results"]] == [
        "token edit + 1 row",
        "causal decode step",
        "update_k",
        "query with T/2",
    ]
    for letter in "abcd":
        assert f"## {letter}. " in text
    assert all(value > 0 for value in saved["floors"].values())
    for result in saved["results"]:
        assert result["wall"] > 0 and result["floors"] and all(s > 0 for s in result["floors"].values())
        assert 0 < len(result["top"]) <= profile_paths.TOP
        assert result["stats"]["updates"] > 0
