"""Reading ``dynattn bench`` records: the summary table, the machine line, the policy.

:func:`summary_table` prints every implementation's times and its ratios to
the baselines per size; :func:`policy` ranks the measured configurations for
a workload of ``mix`` queries per update (cost per update = update time +
``mix`` x query time) and recommends tau and storage. The exponent fits
against the paper's bounds are in :mod:`dynattn.theory`
(:func:`~dynattn.theory.fit_records`, :func:`~dynattn.theory.format_fits`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dynattn._timing import fmt_ratio, fmt_seconds, format_table
from dynattn.sweep import BASELINE_ORDER

#: Queries per update of the ``--plot`` mix figure.
DEFAULT_MIXES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Per size: every implementation's update, query, rebuild times and ratios."""
    baselines = [b for b in BASELINE_ORDER if any(r["impl"] == b for r in records)]
    headers = ["impl", "n", "d", "T", "update", "(min-max)", "/bound", "query", "rebuild"]
    headers += [f"upd vs {b}" for b in baselines] + [f"qry vs {b}" for b in baselines]
    rows = []
    for rec in sorted(records, key=lambda r: (r["regime"], r["n"], _order(r))):
        ratios = rec.get("ratios", {})
        rows.append(
            [
                rec["label"],
                rec["n"],
                rec["d"],
                rec["threshold"] or "-",
                fmt_seconds(rec["update_s"]),
                f"{fmt_seconds(rec['update_s_min'])}-{fmt_seconds(rec['update_s_max'])}",
                f"{rec['update_over_bound']:.1f}x",
                fmt_seconds(rec["query_s"]),
                fmt_seconds(rec.get("rebuild_s")),
            ]
            + [fmt_ratio(ratios.get(b, {}).get("update")) for b in baselines]
            + [fmt_ratio(ratios.get(b, {}).get("query")) for b in baselines]
        )
    note = (
        "update: amortized per update over whole fold cycles (median of repeats); "
        "/bound: update time over the BLAS-3 bound 2*n*e/GEMM rate; query: one entry with "
        "threshold/2 rows pending; ratios: baseline time / this time (>1 = faster)."
    )
    return format_table(headers, rows) + "\n" + note


def latency_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Per size: every implementation's single-call latency distribution (timed rounds)."""
    headers = ["impl", "n", "op", "calls", "mean", "p50", "p99", "p99.9", "max", "max/mean"]
    rows = []
    for rec in sorted(records, key=lambda r: (r["regime"], r["n"], _order(r))):
        for op in ("update", "query"):
            summary = rec.get(f"{op}_latency") or {}
            if not summary.get("count"):
                continue
            rows.append(
                [rec["label"], rec["n"], op, summary["count"]]
                + [fmt_seconds(summary[key]) for key in ("mean", "p50", "p99", "p99.9", "max")]
                + [f"{summary['max'] / summary['mean']:.1f}x" if summary["mean"] else "-"]
            )
    note = (
        "latency: every single update/query call of the timed rounds (a fold's stall lands on "
        "one update; the amortized 'update' above spreads it); percentiles are nearest-rank."
    )
    return format_table(headers, rows) + "\n" + note


def _order(rec: Mapping[str, Any]) -> tuple[int, float, str]:
    if rec["impl"] == "dynamic":
        return (0, rec["tau"], str(rec["storage"]))
    return (1, BASELINE_ORDER.index(rec["impl"]) if rec["impl"] in BASELINE_ORDER else 9, "")


def mix_cost(rec: Mapping[str, Any], mix: float) -> float:
    """Time per update of a workload with ``mix`` queries per update."""
    return float(rec["update_s"]) + mix * float(rec["query_s"])


def policy(records: Sequence[Mapping[str, Any]], mixes: Iterable[float]) -> list[dict[str, Any]]:
    """For each workload mix and size: the best tau and storage, and the best overall.

    Parameters
    ----------
    records : benchmark records
    mixes : queries per update

    Returns
    -------
    list of dict with ``mix``, ``n``, ``best`` (tau, storage, cost per update),
    ``best_overall`` (label), ``runner_up`` and ``speedup`` of the best DynamicAttention
    configuration over the fastest baseline.
    """
    out = []
    sizes = sorted({(r["regime"], r["n"]) for r in records})
    for mix in mixes:
        for regime, n in sizes:
            group = [r for r in records if r["regime"] == regime and r["n"] == n]
            dyn = [r for r in group if r["impl"] == "dynamic"]
            base = [r for r in group if r["impl"] != "dynamic"]
            ranked = sorted(group, key=lambda r: mix_cost(r, mix))
            entry: dict[str, Any] = {
                "mix": mix,
                "regime": regime,
                "n": n,
                "best_overall": ranked[0]["label"],
                "best_overall_cost_s": mix_cost(ranked[0], mix),
            }
            if dyn:
                best = min(dyn, key=lambda r: mix_cost(r, mix))
                entry.update({"tau": best["tau"], "storage": best["storage"], "cost_s": mix_cost(best, mix)})
                if base:
                    fb = min(base, key=lambda r: mix_cost(r, mix))
                    entry["fastest_baseline"] = fb["label"]
                    entry["speedup_vs_fastest_baseline"] = mix_cost(fb, mix) / mix_cost(best, mix)
            out.append(entry)
    return out


def format_policy(entries: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`policy`."""
    rows = []
    for p in entries:
        rows.append(
            [
                f"{p['mix']:g}",
                p["regime"],
                p["n"],
                f"{p['tau']:.2f}" if p.get("tau") is not None else "-",
                p.get("storage") or "-",
                fmt_seconds(p.get("cost_s")),
                p.get("fastest_baseline", "-"),
                fmt_ratio(p.get("speedup_vs_fastest_baseline")),
                p["best_overall"],
            ]
        )
    return format_table(
        [
            "queries/update",
            "regime",
            "n",
            "best tau",
            "storage",
            "cost/update",
            "fastest baseline",
            "speedup",
            "best overall",
        ],
        rows,
    )


def format_machine(machine: Mapping[str, Any]) -> str:
    """One-line description of the machine a result came from."""
    rates = machine.get("gemm_gflops", {})
    rate_txt = ", ".join(f"{k} GEMM {v:.1f} GFLOP/s" for k, v in rates.items())
    load = machine.get("foreign_load_max")
    if load is not None:
        rate_txt += f"; other processes used up to {load:.2f} cores while measuring"
    return (
        f"{machine.get('cpu_model')} ({machine.get('cores')} cores), numpy {machine.get('numpy')}"
        f" [{machine.get('blas')}], {rate_txt}"
    )
