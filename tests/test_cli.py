"""Smoke tests of the ``dynattn`` command line (timings are never asserted)."""

import json
import subprocess
import sys

import pytest

import dynattn
from dynattn import DynamicAttention
from dynattn.cli import main
from dynattn.progress import make_progress
from dynattn.sweep import BASELINE_ORDER, latency_summary

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
    assert all(f["fit_sizes"] == [16, 32, 64, 128] and "update_model" in f for f in fits)
    source = result["source"]
    assert source["command"].startswith("dynattn bench --quick") and "--json" in source["command"]
    assert set(source) >= {"commit", "src_modified"}


def test_bench_load_policy_and_plots(bench_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(
        ["bench", "--load", str(bench_json), "--policy", "0.01,1,100", "--plot", str(tmp_path / "figs")]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "exponent fits" in out and "policy" in out
    for name in ("paper_tradeoff.png", "paper_scaling.png", "paper_mix.png", "paper_exponents.png"):
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


def test_bench_records_latency_per_call_for_both_schedules(tmp_path, capsys):
    path = tmp_path / "schedules.json"
    rc = main(
        [
            "bench",
            *TINY_BENCH,
            "--sizes",
            "32",
            "--taus",
            "0.75",
            "--storage",
            "dense",
            "--schedule",
            "amortized,spread",
            "--baselines",
            "ondemand",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    assert "p99.9" in capsys.readouterr().out
    records = json.loads(path.read_text())["records"]
    dynamic = [r for r in records if r["impl"] == "dynamic"]
    assert sorted(r["schedule"] for r in dynamic) == ["amortized", "spread"]
    assert any(r["label"].endswith("spread") for r in dynamic)
    for rec in records:
        for op in ("update", "query"):
            summary = rec[f"{op}_latency"]
            assert summary["count"] > 0
            assert 0 < summary["p50"] <= summary["p99"] <= summary["p99.9"] <= summary["max"]


def test_latency_summary_is_nearest_rank():
    summary = latency_summary([float(x) for x in range(1000, 0, -1)])
    assert summary["count"] == 1000 and summary["mean"] == pytest.approx(500.5)
    assert (summary["p50"], summary["p99"], summary["p99.9"], summary["max"]) == (500.0, 990.0, 999.0, 1000.0)
    assert latency_summary([])["p99.9"] is None


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
    # the lower bound, its conjecture and the 2026 preprint's claim, next to each other
    assert "Lower bound (conditional)" in out and "Hinted Mv" in out
    assert "arXiv:2610.06783" in out and "1/18" in out and "not peer" in out
    assert "measured exponents" not in out


def _synthetic_run(path, rounds=5):
    """A saved paper-regime run with known exponents: update 20us + c n^2, query 5us + c n^tau."""
    import numpy as np

    rng = np.random.default_rng(0)
    records = []
    for tau in (0.5, 1.0):
        for n in (256, 512, 1024, 2048, 4096):
            upd = (20e-6 + 1e-11 * n**2) * np.exp(rng.normal(0, 0.02, rounds))
            qry = (5e-6 + 1e-8 * n**tau) * np.exp(rng.normal(0, 0.02, rounds))
            records.append(
                {
                    "impl": "dynamic",
                    "label": f"dynamic t={tau:g} dense",
                    "regime": "paper",
                    "n": n,
                    "m": n,
                    "d": n,
                    "e": n,
                    "threshold": round(n**tau),
                    "tau": tau,
                    "dtype": "float64",
                    "storage": "dense",
                    "update_s_min": float(upd.min()),
                    "update_s_max": float(upd.max()),
                    "update_over_bound": 1.0,
                    "update_s": float(np.median(upd)),
                    "update_s_samples": upd.tolist(),
                    "query_s": float(np.median(qry)),
                    "query_s_samples": qry.tolist(),
                }
            )
    path.write_text(json.dumps({"records": records, "source": {"commit": "abc1234"}}))
    return path


def test_theory_load_prints_fitted_exponents_with_intervals(tmp_path, capsys):
    path = _synthetic_run(tmp_path / "run.json")
    assert main(["theory", "--load", str(path), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert f"measured exponents from {path} (abc1234)" in out
    assert "c0 + c1 n^x [95% CI]" in out and "256..4096(5)" in out
    update_rows = out.split("updates (amortized):")[1].split("queries")[0]
    for line in [ln for ln in update_rows.splitlines() if ln.strip().startswith(("0.50", "1.00"))]:
        x = float(line.split("|")[2].split()[0])
        assert abs(x - 2.0) < 0.15, line
    assert main(["theory", "--load", str(path), "--fit-min-n", "1024", "--bootstrap", "0"]) == 0
    assert "1024..4096(3)" in capsys.readouterr().out
    # the synthetic run has no in-round GEMM rates to correct with
    assert main(["theory", "--load", str(path), "--fit-per-gemm"]) == 2
    assert "gemm_gflops" in capsys.readouterr().err


def test_theory_and_bench_reject_bad_fit_options(tmp_path, capsys):
    path = _synthetic_run(tmp_path / "run.json")
    assert main(["theory", "--load", str(path), "--bootstrap", "-1"]) == 2
    assert "--bootstrap" in capsys.readouterr().err
    assert main(["theory", "--load", str(path), "--fit-min-n", "0"]) == 2
    assert main(["theory", "--load", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["theory", "--load", str(tmp_path / "bad.json")]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--load", str(path), "--plot", str(tmp_path), "--figures", "bogus"])


def test_bench_load_writes_the_exponent_figure_alone(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = _synthetic_run(tmp_path / "run.json")
    figs = tmp_path / "figs"
    rc = main(
        ["bench", "--load", str(path), "--bootstrap", "50", "--plot", str(figs), "--figures", "exponents"]
    )
    assert rc == 0
    assert sorted(p.name for p in figs.iterdir()) == ["paper_exponents.png"]
    assert (figs / "paper_exponents.png").stat().st_size > 1000
    assert "exponent fits" in capsys.readouterr().out


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
