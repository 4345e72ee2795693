"""Smoke test of benchmarks/bench_dormancy.py: tiny sizes, structure of the output only (never timing)."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench_dormancy():
    return load_benchmark("bench_dormancy")


def test_quick_run_follows_every_stream(bench_dormancy, tmp_path, backend, capsys):
    if backend != "numpy":
        pytest.skip("the script builds its own arrays; one backend is enough")
    assert bench_dormancy.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "dormancy.json").read_text())
    text = (tmp_path / "dormancy.txt").read_text()
    assert text in capsys.readouterr().out and "# commit " in text
    assert [(r["regime"], r["ratio"]) for r in saved["results"]] == [
        ("paper", 0.01),
        ("paper", 0.1),
        ("llm", 0.01),
        ("llm", 0.1),
        ("llm", 1.0),
    ]
    for result in saved["results"]:
        windows = result["windows_s"]
        assert set(windows) == {"auto", "OnDemand"}
        assert len(windows["auto"]) == len(windows["OnDemand"]) == -(-result["updates"] // result["window"])
        assert all(t > 0 for times in windows.values() for t in times)
        assert result["stats"]["updates"] == result["updates"]
        # the states after the windows where it changed: alternating, from dormant (as built)
        states = [state for _, state in result["switches"]]
        assert all(before != after for before, after in zip(["dormant", *states], states, strict=False))
        assert states.count("awake") <= result["stats"]["wakes"]
        if result["dormant_by_update"] is not None:
            assert result["stats"]["dormant_periods"] >= 1 and result["steady_s"]["auto"] > 0


def test_streams_are_the_same_for_every_contender(bench_dormancy):
    a = bench_dormancy._stream("paper", 10, 50, 0.1, seed=3)
    b = bench_dormancy._stream("paper", 10, 50, 0.1, seed=3)
    assert a["reads"].sum() == 5 and (a["reads"] >= 0).all()
    assert all((x == y).all() for x, y in zip(a["events"], b["events"], strict=True))
