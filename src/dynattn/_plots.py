"""Figures for ``dynattn bench --plot DIR`` (matplotlib, the optional ``plot`` extra).

* ``<regime>_tradeoff.png`` -- update vs query time, one point per tau
  (measured at the largest size, baselines for reference) and the exponent
  plane: fitted (update, query) exponents next to the theoretical ones.
* ``<regime>_scaling.png`` -- log-log update and query time against n with the
  fitted slopes.
* ``<regime>_mix.png`` -- for workload mixes from 0.01 to 100 queries per
  update, which implementation is fastest at each size and by how much
  (speedup over the runner-up).
* ``<regime>_exponents.png`` (paper regime) -- the exponents of the fixed
  cost plus power law ``c0 + c1 n^x`` with their bootstrap intervals against
  tau, next to ``omega(1,1,tau) - tau`` (classical and best known) for
  updates and ``tau`` / ``1 + tau`` for queries, and the times against n with
  the fitted curves; filled markers are the sizes the fit used.

Every figure's title names the command and the commit of the run (from the
result's ``source``, when it has one).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynattn.report import DEFAULT_MIXES, mix_cost
from dynattn.theory import fit_loglog, fit_records, query_exponent, update_exponent

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
        if all(f.get("update_model") and f.get("query_model") for f in pts):
            # the fixed cost plus power law, with its bootstrap interval
            ux = [f["update_model"]["exponent"] for f in pts]
            qy = [f["query_model"]["exponent"] for f in pts]
            xerr = _interval_bars([f["update_model"] for f in pts])
            yerr = _interval_bars([f["query_model"] for f in pts])
            label = f"fitted x of c0 + c1 n^x, 95% CI ({storage})"
        else:
            ux = [f["update"]["slope"] for f in pts]
            qy = [f["query"]["slope"] for f in pts]
            xerr = np.array([_finite(f["update"]["stderr"]) for f in pts])
            yerr = np.array([_finite(f["query"]["stderr"]) for f in pts])
            label = f"log-log slopes ({storage})"
        bx.errorbar(ux, qy, xerr=xerr, yerr=yerr, fmt="o", color=_color(storage, s_idx), label=label)
        for f, x, y in zip(pts, ux, qy, strict=True):
            bx.annotate(f"tau={f['tau']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
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


def _interval_bars(models: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(2, k) error bars from the bootstrap intervals of cost-model fits (0 where absent)."""
    lower, upper = [], []
    for m in models:
        x, lo, hi = m["exponent"], m.get("low"), m.get("high")
        ok = lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        lower.append(max(x - lo, 0.0) if ok else 0.0)
        upper.append(max(hi - x, 0.0) if ok else 0.0)
    return np.array([lower, upper])


def _sizes_text(sizes: Sequence[int]) -> str:
    return f"n = {min(sizes)}..{max(sizes)} ({len(sizes)} sizes)" if sizes else "no sizes"


def plot_exponents(
    records: Sequence[Mapping[str, Any]],
    fits: Sequence[Mapping[str, Any]],
    path: str,
    title: str,
    baseline_fits: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Fitted exponents against tau next to theory, and the times against n with the fits.

    Parameters
    ----------
    records : paper-regime benchmark records
    fits : :func:`dynattn.theory.fit_records` output for DynamicAttention
    path, title : str
    baseline_fits : fit_records output for Eager (drawn at tau = 0), optional
    """
    plt = _pyplot()
    per_gemm = any(f.get("per_gemm") for f in fits)
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    (ua, qa), (ut, qt) = axes
    taus = np.linspace(0.0, 1.0, 201)
    ua.plot(
        taus,
        [update_exponent(t, "classical") for t in taus],
        "-",
        color="tab:gray",
        label="theory, classical multiplication: 2",
    )
    ua.plot(
        taus,
        [update_exponent(t) for t in taus],
        "--",
        color="black",
        label="theory, best known omega(1,1,tau) - tau",
    )
    qa.plot(taus, [query_exponent(t) for t in taus], "-", color="tab:gray", label="structure: tau (O(T))")
    qa.plot(
        taus,
        [query_exponent(t, "paper") for t in taus],
        ":",
        color="black",
        label="paper's worst case: 1 + tau",
    )
    storages = sorted({str(f["storage"]) for f in fits})
    for s_idx, storage in enumerate(storages):
        pts = [f for f in fits if str(f["storage"]) == storage]
        color = _color(storage, s_idx)
        shift = 0.012 * (s_idx - (len(storages) - 1) / 2)
        for ax, key in ((ua, "update"), (qa, "query")):
            with_model = [f for f in pts if f.get(f"{key}_model")]
            if with_model:
                sizes = sorted({n for f in with_model for n in f.get("fit_sizes", f["sizes"])})
                ax.errorbar(
                    [f["tau"] + shift for f in with_model],
                    [f[f"{key}_model"]["exponent"] for f in with_model],
                    yerr=_interval_bars([f[f"{key}_model"] for f in with_model]),
                    fmt="o",
                    capsize=4,
                    color=color,
                    label=f"fitted x of c0 + c1 n^x, 95% CI ({storage}; {_sizes_text(sizes)})",
                )
            slopes = [f for f in pts if f.get(key)]
            if slopes:
                ax.plot(
                    [f["tau"] + shift for f in slopes],
                    [f[key]["slope"] for f in slopes],
                    "o",
                    mfc="none",
                    color=color,
                    alpha=0.7,
                    label=f"log-log slope, no fixed cost ({storage})",
                )
    for f in baseline_fits:
        model = f.get("update_model")
        if model:
            ua.errorbar(
                [0.0],
                [model["exponent"]],
                yerr=_interval_bars([model]),
                fmt="v",
                capsize=4,
                color="tab:brown",
                label=f"Eager (rank-1 fold, tau = 0; {_sizes_text(f['fit_sizes'])})",
            )
    ua.set_xlabel("tau")
    ua.set_ylabel("update exponent x (amortized time ~ c0 + c1 n^x)")
    ua.set_title(
        "amortized update: fitted exponent vs theory" + (" (per-GEMM corrected)" if per_gemm else "")
    )
    qa.set_xlabel("tau")
    qa.set_ylabel("query exponent x (time ~ c0 + c1 n^x)")
    qa.set_title("query (T/2 rows pending): fitted exponent vs theory")
    for ax in (ua, qa):
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    by_key = {(f["tau"], str(f["storage"])): f for f in fits}

    def inside_mask(recs: Sequence[Mapping[str, Any]], used: set[int]) -> np.ndarray:
        mask = np.array([r["n"] in used for r in recs])
        return mask if mask.any() else np.ones(len(recs), dtype=bool)

    dyn = [r for r in records if r["impl"] == "dynamic"]
    for ax, field, key, name in (
        (ut, "update_s", "update_model", "amortized update"),
        (qt, "query_s", "query_model", "query"),
    ):
        for label, recs in _series(dyn).items():
            style = _style(recs[0])
            fit = by_key.get((recs[0]["tau"], str(recs[0]["storage"])))
            used = set(fit.get("fit_sizes", fit["sizes"])) if fit else set()
            ns = np.array([r["n"] for r in recs], dtype=float)
            speed = np.ones(len(recs))
            if per_gemm:  # the fits' correction: times at the fastest GEMM rate of the series
                rates = np.array([r["gemm_gflops"] for r in recs], dtype=float)
                speed = rates / rates[inside_mask(recs, used)].max()
            med = np.array([r[field] for r in recs], dtype=float) * speed
            lo = np.array([r.get(f"{field}_min", r[field]) for r in recs], dtype=float) * speed
            hi = np.array([r.get(f"{field}_max", r[field]) for r in recs], dtype=float) * speed
            inside = np.array([r["n"] in used for r in recs])
            ax.errorbar(ns, med, yerr=[med - lo, hi - med], fmt="none", color=style["color"], alpha=0.5)
            ax.plot(ns[inside], med[inside], style["marker"], color=style["color"])
            if (~inside).any():
                ax.plot(ns[~inside], med[~inside], style["marker"], mfc="none", color=style["color"])
            model = fit.get(key) if fit else None
            text = label
            if model:
                grid = np.geomspace(ns.min(), ns.max(), 50)
                curve = model["fixed_s"] + model["scale"] * grid ** model["exponent"]
                ax.plot(grid, curve, style["ls"], color=style["color"], alpha=0.7)
                text = f"{label}: c0 = {model['fixed_s'] * 1e6:.1f} us, x = {model['exponent']:.2f}"
            ax.plot([], [], style["ls"] + style["marker"], color=style["color"], label=text)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (= m = d = e)")
        ax.set_ylabel(f"{name} time (s)" + (", per-GEMM corrected" if per_gemm else ""))
        ax.set_title(
            f"{name}: medians, min-max over rounds, fitted c0 + c1 n^x\n"
            "(filled: sizes the fit used; hollow: left out)",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _title(result: Mapping[str, Any], regime: str, dtype: str) -> str:
    machine = result.get("machine", {})
    rates = machine.get("gemm_gflops", {})
    source = result.get("source") or {}
    command = source.get("command") or f"dynattn bench --regime {regime}"
    env = " ".join(f"{k}={v}" for k, v in (source.get("env") or {}).items())
    commit = source.get("commit")
    origin = (env + " " if env else "") + command + (f"  [dynattn {commit[:10]}]" if commit else "")
    return (
        f"{textwrap.fill(origin, 140)}\n"
        f"{dtype}; {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
        f"numpy {machine.get('numpy', '?')}, GEMM {rates.get(dtype, float('nan')):.0f} GFLOP/s"
    )


def write_plots(
    result: Mapping[str, Any],
    directory: str,
    figures: Sequence[str] = ("tradeoff", "scaling", "mix", "exponents"),
) -> list[str]:
    """Write the figures of a bench result into ``directory``; return their paths.

    Parameters
    ----------
    result : dict
        As written by ``dynattn bench --json``.
    directory : str
    figures : sequence of {"tradeoff", "scaling", "mix", "exponents"}
        Which figures; ``exponents`` only for the paper regime.

    Raises
    ------
    RuntimeError
        With an install hint when matplotlib is missing.
    """
    _pyplot()
    os.makedirs(directory, exist_ok=True)
    records = result["records"]
    out: list[str] = []
    for regime in sorted({r["regime"] for r in records}):
        recs = [r for r in records if r["regime"] == regime]
        title = _title(result, regime, recs[0]["dtype"])
        fits = [f for f in result.get("fits", [])] if regime == "paper" else []
        for kind in figures:
            path = os.path.join(directory, f"{regime}_{kind}.png")
            if kind == "tradeoff":
                plot_tradeoff(recs, fits, path, title)
            elif kind == "scaling":
                plot_scaling(recs, path, title)
            elif kind == "mix":
                plot_mix(recs, path, title)
            elif kind == "exponents":
                if regime != "paper" or not fits:
                    continue
                min_n = min((min(f["fit_sizes"]) for f in fits if f.get("fit_sizes")), default=None)
                reps = max((f[k]["reps"] for f in fits for k in ("update_model",) if f.get(k)), default=0)
                per_gemm = any(f.get("per_gemm") for f in fits)
                eager = fit_records(recs, impl="eager", min_n=min_n, reps=reps, per_gemm=per_gemm)
                plot_exponents(recs, fits, path, title, baseline_fits=eager)
            else:
                raise ValueError(f"figures: unknown figure {kind!r}")
            out.append(path)
    return out
