"""Figures for ``dynattn bench --plot DIR`` (matplotlib, the optional ``plot`` extra).

* ``<regime>_tradeoff.png`` -- update vs query time, one point per tau
  (measured at the largest size, baselines for reference) and the exponent
  plane: fitted (update, query) exponents next to the theoretical ones.
* ``<regime>_scaling.png`` -- log-log update and query time against n with the
  fitted slopes.
* ``<regime>_mix.png`` -- for workload mixes from 0.01 to 100 queries per
  update, which implementation is fastest at each size and by how much
  (speedup over the runner-up).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynattn.report import DEFAULT_MIXES, mix_cost
from dynattn.theory import fit_loglog, query_exponent, update_exponent

MISSING = (
    "plotting needs matplotlib, which is not installed; install it with "
    "`pip install 'dynattn[plot]'` (or `pip install matplotlib`)"
)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    return plt


def _series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        out.setdefault(rec["label"], []).append(rec)
    return {k: sorted(v, key=lambda r: r["n"]) for k, v in out.items()}


def _color(label: str, idx: int) -> Any:
    fixed = {"recompute": "tab:red", "ondemand": "tab:purple", "eager": "tab:brown"}
    if label in fixed:
        return fixed[label]
    palette = [
        "tab:blue",
        "tab:green",
        "tab:orange",
        "tab:cyan",
        "tab:olive",
        "tab:pink",
        "tab:gray",
        "navy",
        "darkgreen",
        "gold",
    ]
    return palette[idx % len(palette)]


def _style(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Color by tau (viridis) and marker by storage for DynamicAttention; fixed for baselines."""
    fixed = {
        "recompute": ("tab:red", "s"),
        "ondemand": ("tab:purple", "D"),
        "eager": ("tab:brown", "v"),
    }
    if rec["impl"] in fixed:
        color, marker = fixed[rec["impl"]]
        return {"color": color, "marker": marker, "ls": "-"}
    from matplotlib import colormaps

    tau = float(rec.get("tau") or 0.0)
    implicit = str(rec.get("storage")) == "implicit"
    return {
        "color": colormaps["viridis"](0.05 + 0.8 * tau),
        "marker": "^" if implicit else "o",
        "ls": "--" if implicit else "-",
    }


def plot_tradeoff(
    records: Sequence[Mapping[str, Any]], fits: Sequence[Mapping[str, Any]], path: str, title: str
) -> None:
    """Update-vs-query trade-off, measured (largest size) and in exponents."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    n_max = max(r["n"] for r in records)
    top = [r for r in records if r["n"] == n_max]
    dyn = sorted((r for r in top if r["impl"] == "dynamic"), key=lambda r: (str(r["storage"]), r["tau"]))
    storages = sorted({str(r["storage"]) for r in dyn})
    for s_idx, storage in enumerate(storages):
        pts = [r for r in dyn if str(r["storage"]) == storage]
        xs = [r["update_s"] for r in pts]
        ys = [r["query_s"] for r in pts]
        ax.plot(xs, ys, "o-", color=_color(storage, s_idx), label=f"DynamicAttention ({storage})")
        for r in pts:
            ax.annotate(
                f"tau={r['tau']:g}",
                (r["update_s"], r["query_s"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    for r in top:
        if r["impl"] != "dynamic":
            ax.plot([r["update_s"]], [r["query_s"]], "s", color=_color(r["label"], 0), label=r["label"])
    if dyn:
        ax.axvline(dyn[0]["bound_s"], color="gray", ls=":", label="BLAS-3 bound 2ne/GEMM rate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("amortized update time (s)")
    ax.set_ylabel("query time, one entry (s)")
    ax.set_title(f"measured, n = {n_max}")
    ax.legend(fontsize=8)

    taus = np.linspace(0.0, 1.0, 101)
    theory_curves = (
        ("classical", "structure", "-", "tab:gray", "theory, classical mult. (2, tau)"),
        ("best", "structure", "--", "black", "theory, best known omega(1,1,tau)-tau"),
        ("best", "paper", ":", "black", "paper's bound (omega(1,1,tau)-tau, 1+tau)"),
    )
    for multiplication, query_bound, line, color, label in theory_curves:
        bx.plot(
            [update_exponent(t, multiplication) for t in taus],
            [query_exponent(t, query_bound) for t in taus],
            line,
            color=color,
            label=label,
        )
    for s_idx, storage in enumerate(storages):
        pts = [f for f in fits if str(f["storage"]) == storage and f.get("update") and f.get("query")]
        if not pts:
            continue
        bx.errorbar(
            [f["update"]["slope"] for f in pts],
            [f["query"]["slope"] for f in pts],
            xerr=[_finite(f["update"]["stderr"]) for f in pts],
            yerr=[_finite(f["query"]["stderr"]) for f in pts],
            fmt="o",
            color=_color(storage, s_idx),
            label=f"fitted slopes ({storage})",
        )
        for f in pts:
            bx.annotate(
                f"tau={f['tau']:g}",
                (f["update"]["slope"], f["query"]["slope"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    bx.set_xlabel("update exponent (time ~ n^x)")
    bx.set_ylabel("query exponent (time ~ n^y)")
    if fits:
        bx.set_title("exponents: fitted vs theory (paper regime)")
    else:
        bx.set_title("theoretical exponents (fits: paper regime only)")
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(x: float) -> float:
    return float(x) if x is not None and np.isfinite(x) else 0.0


def plot_scaling(records: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """Log-log update and query time against n with fitted slopes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    series = _series(records)
    for ax, field, name in (
        (axes[0], "update_s", "amortized update"),
        (axes[1], "query_s", "query"),
    ):
        for idx, (label, recs) in enumerate(series.items()):
            xs = np.array([r["n"] for r in recs], dtype=float)
            ys = np.array([r[field] for r in recs], dtype=float)
            style = _style(recs[0])
            text = label
            if len(set(xs)) >= 2:
                fit = fit_loglog(xs, ys)
                grid = np.geomspace(xs.min(), xs.max(), 20)
                ax.plot(grid, fit.predict(grid), style["ls"], color=style["color"], alpha=0.6)
                text = f"{label}: slope {fit.slope:.2f}"
            ax.plot(xs, ys, style["marker"], color=style["color"], label=text)
            if field == "update_s" and idx == 0:
                bounds = np.array([r["bound_s"] for r in recs])
                ax.plot(xs, bounds, ":", color="gray", label="BLAS-3 bound 2ne/GEMM rate")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n")
        ax.set_ylabel(f"{name} time (s)")
        ax.set_title(f"{name} time vs n (lines: least-squares fits)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mix_grid(
    records: Sequence[Mapping[str, Any]], mixes: Sequence[float] = DEFAULT_MIXES
) -> tuple[list[int], list[float], list[list[str]], np.ndarray]:
    """Winner label and speedup over the runner-up for every (size, mix)."""
    sizes = sorted({r["n"] for r in records})
    winners: list[list[str]] = []
    speedup = np.ones((len(sizes), len(mixes)))
    for a, n in enumerate(sizes):
        group = [r for r in records if r["n"] == n]
        row = []
        for b, mix in enumerate(mixes):
            ranked = sorted(group, key=lambda r: mix_cost(r, mix))
            row.append(ranked[0]["label"])
            if len(ranked) > 1:
                speedup[a, b] = mix_cost(ranked[1], mix) / mix_cost(ranked[0], mix)
        winners.append(row)
    return sizes, list(mixes), winners, speedup


def plot_mix(
    records: Sequence[Mapping[str, Any]],
    path: str,
    title: str,
    mixes: Sequence[float] = DEFAULT_MIXES,
) -> None:
    """Grid over (size, queries per update): fastest implementation and its margin."""
    plt = _pyplot()
    sizes, mixes, winners, speedup = mix_grid(records, mixes)
    labels = sorted({w for row in winners for w in row})
    index = {label: i for i, label in enumerate(labels)}
    codes = np.array([[index[w] for w in row] for row in winners])
    fig, ax = plt.subplots(figsize=(1.1 * len(mixes) + 3, 0.7 * len(sizes) + 2.5))
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([_color(label, i) for i, label in enumerate(labels)])
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, aspect="auto", alpha=0.55)
    for a in range(len(sizes)):
        for b in range(len(mixes)):
            ax.text(b, a, f"{speedup[a, b]:.1f}x", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(mixes)), [f"{m:g}" for m in mixes])
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("queries per update")
    ax.set_ylabel("n")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=_color(label, i), alpha=0.55) for i, label in enumerate(labels)
    ]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("fastest implementation per workload mix (text: speedup over the runner-up)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: Mapping[str, Any], directory: str) -> list[str]:
    """Write all figures of a bench result into ``directory``; return their paths.

    Raises
    ------
    RuntimeError
        With an install hint when matplotlib is missing.
    """
    _pyplot()
    os.makedirs(directory, exist_ok=True)
    records = result["records"]
    machine = result.get("machine", {})
    rates = machine.get("gemm_gflops", {})
    out: list[str] = []
    for regime in sorted({r["regime"] for r in records}):
        recs = [r for r in records if r["regime"] == regime]
        dtype = recs[0]["dtype"]
        title = (
            f"dynattn bench --regime {regime} ({dtype}); {machine.get('cpu_model', '?')}, "
            f"{machine.get('cores', '?')} cores, numpy {machine.get('numpy', '?')}, "
            f"GEMM {rates.get(dtype, float('nan')):.0f} GFLOP/s"
        )
        fits = [f for f in result.get("fits", [])] if regime == "paper" else []
        paths = {
            "tradeoff": os.path.join(directory, f"{regime}_tradeoff.png"),
            "scaling": os.path.join(directory, f"{regime}_scaling.png"),
            "mix": os.path.join(directory, f"{regime}_mix.png"),
        }
        plot_tradeoff(recs, fits, paths["tradeoff"], title)
        plot_scaling(recs, paths["scaling"], title)
        plot_mix(recs, paths["mix"], title)
        out.extend(paths.values())
    return out
