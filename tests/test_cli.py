"""Smoke tests of the ``dynattn`` command line (timings are never asserted)."""

import json
import subprocess
import sys

import pytest

import dynattn
from dynattn import DynamicAttention
from dynattn.cli import main
from dynattn.progress import make_progress
from dynattn.sweep import BASELINE_ORDER

REQUIRED = {
    "impl",
    "regime",
    "n",
    "m",
    "d",
    "e",
    "tau",
    "dtype",
    "storage",
    "update_s",
    "query_s",
    "rebuild_s",
    "ratios",
}

TINY_BENCH = ["--quick", "--repeats", "1", "--sample-s", "0.002", "--progress", "none"]


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "dynattn", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for word in ("demo", "bench", "theory"):
        assert word in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_tiny_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    rc = main(
        [
            "demo",
            "--size",
            "40",
            "--updates",
            "60",
            "--recompute-updates",
            "6",
            "--eager-updates",
            "20",
            "--tau",
            "0.75",
            "--progress",
            "none",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out
    result = json.loads(path.read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == {"dynamic", *BASELINE_ORDER}
    assert rows["dynamic"]["updates"] == 60 and rows["dynamic"]["queries"] == 60
    assert rows["recompute"]["updates"] == 6
    assert all(row["worst_error"] <= 1e-10 for row in rows.values())
    assert set(rows["dynamic"]["ratios"]) == set(BASELINE_ORDER)


def test_demo_float32(capsys):
    rc = main(
        [
            "demo",
            "--size",
            "24",
            "--updates",
            "30",
            "--dtype",
            "float32",
            "--progress",
            "none",
            "--recompute-updates",
            "4",
            "--eager-updates",
            "8",
        ]
    )
    assert rc == 0
    assert "1e-04" in capsys.readouterr().out


class _OffByOne(DynamicAttention):
    """Answers a little wrong: the demo's check must catch it."""

    def query(self, i, j):
        return super().query(i, j) + 1e-6


def test_demo_exits_nonzero_on_a_wrong_answer(monkeypatch, capsys):
    monkeypatch.setattr(dynattn, "DynamicAttention", _OffByOne)
    rc = main(
        [
            "demo",
            "--size",
            "24",
            "--updates",
            "10",
            "--progress",
            "none",
            "--recompute-updates",
            "2",
            "--eager-updates",
            "4",
        ]
    )
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


def test_demo_rejects_bad_tau(capsys):
    assert main(["demo", "--tau", "1.5", "--progress", "none"]) == 2
    assert "--tau" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "paper.json"
    rc = main(
        [
            "bench",
            *TINY_BENCH,
            "--sizes",
            "16,32,64,128",
            "--taus",
            "0.5,1",
            "--storage",
            "dense,implicit",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    return path


def test_bench_quick_json_has_required_fields(bench_json):
    result = json.loads(bench_json.read_text())
    assert result["schema"].startswith("dynattn-bench")
    machine = result["machine"]
    assert machine["cpu_model"] and machine["numpy"] and machine["gemm_gflops"]["float64"] > 0
    records = result["records"]
    dynamic = [r for r in records if r["impl"] == "dynamic"]
    assert len(dynamic) == 4 * 2 * 2  # sizes x taus x storages
    assert {(r["tau"], r["storage"]) for r in dynamic} == {
        (t, s) for t in (0.5, 1.0) for s in ("dense", "implicit")
    }
    for name in BASELINE_ORDER:
        assert len([r for r in records if r["impl"] == name]) == 4
    for rec in records:
        assert REQUIRED <= set(rec), set(REQUIRED) - set(rec)
        assert rec["regime"] == "paper" and rec["n"] == rec["m"] == rec["d"] == rec["e"]
        assert rec["update_s"] > 0 and rec["query_s"] > 0
        assert rec["update_s_min"] <= rec["update_s"] <= rec["update_s_max"]
        assert set(rec["ratios"]) == set(BASELINE_ORDER)
        assert rec["bound_s"] > 0 and rec["update_over_bound"] > 0
    for rec in dynamic:
        assert rec["rebuild_s"] > 0
        assert rec["threshold"] >= 1
        eager = next(r for r in records if r["impl"] == "eager" and r["n"] == rec["n"])
        expected = eager["update_s"] / rec["update_s"]
        assert rec["ratios"]["eager"]["update"] == pytest.approx(expected)
    fits = result["fits"]
    assert len(fits) == 4 and all(f["reliable"] for f in fits)
    assert all(f["theory_update_classical"] == 2.0 for f in fits)


def test_bench_load_policy_and_plots(bench_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(
        ["bench", "--load", str(bench_json), "--policy", "0.01,1,100", "--plot", str(tmp_path / "figs")]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "exponent fits" in out and "policy" in out
    for name in ("paper_tradeoff.png", "paper_scaling.png", "paper_mix.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000


def test_plots_without_matplotlib_give_install_hint(bench_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["bench", "--load", str(bench_json), "--plot", str(tmp_path / "figs")])
    assert rc == 2
    assert "pip install" in capsys.readouterr().err


def test_bench_llm_regime(tmp_path):
    path = tmp_path / "llm.json"
    rc = main(
        [
            "bench",
            "--regime",
            "llm",
            *TINY_BENCH,
            "--sizes",
            "32,64",
            "--taus",
            "0.5",
            "--head-dim",
            "8",
            "--baselines",
            "ondemand,eager,recompute",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    records = json.loads(path.read_text())["records"]
    assert {r["n"] for r in records} == {32, 64}
    for rec in records:
        assert rec["regime"] == "llm" and rec["d"] == rec["e"] == 8
        assert REQUIRED <= set(rec)


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--taus", "1.5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["bench", "--storage", "sparse"])
    assert main(["bench", "--load", "/nonexistent/x.json"]) == 2


def test_theory_command(capsys):
    assert main(["theory"]) == 0
    out = capsys.readouterr().out
    assert "2.371339" in out and "arXiv:2307.07970" in out


def test_progress_falls_back_to_plain_text(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    with make_progress(3, "auto") as progress:
        progress.advance("step one")
    assert "step one" in capsys.readouterr().err


def test_load_monitor_and_quiet_wait_return_quickly():
    from dynattn._timing import LoadMonitor, wait_for_quiet

    monitor = LoadMonitor().start()
    load = monitor.stop()
    assert load is None or load >= 0.0
    # a limit no machine exceeds returns after one short window
    load = wait_for_quiet(max_load=1e9, timeout_s=0.0, window_s=0.01)
    assert load is None or load >= 0.0
