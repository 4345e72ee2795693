"""How ``tau="auto"`` behaves over a long stream with few reads: whether it is dormant
(docs/policy.md, Rule 4; it starts so, or goes dormant later), and what an update costs
before and after, against OnDemand.

``benchmarks/bench_policy.py`` times segments of a few thousand updates per mix; this
script follows one long stream per (regime, r) instead, to show that the structure
stays dormant (or when it went dormant). Both contenders walk the same seeded stream
(the paper regime: alternating ``update_k``/``update_v`` entries and ``query`` entries;
llm: ``set_token`` token edits and ``query_row`` rows), in windows of ``--window``
updates, alternating between the contenders window by window; the report gives the
time per update (reads included) in the first window, the update by which ``"auto"``
was dormant (0: from construction), the median over the windows after it, and the
windows by the end of which its state had changed. The llm stream at one row read per
edit (12,000 edits) shows Rule 4 on measured time: the structure wakes once reads have
cost a full refresh, and goes dormant again when its measured awake updates cost more
than its dormant ones did.

    python benchmarks/bench_dormancy.py            # about 4 minutes
    python benchmarks/bench_dormancy.py --quick    # tiny sizes (tests)

Writes ``docs/figures/dormancy.{txt,json}`` (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import (
    add_output_options,
    fmt_seconds,
    format_table,
    machine_info,
    report_header,
    write_report,
)
from dynattn.baselines import OnDemand
from dynattn.testing import random_problem


def _stream(regime: str, size: int, count: int, ratio: float, seed: int) -> dict[str, Any]:
    """The updates and the reads after each of them (``reads[u]`` of them after update u)."""
    rng = np.random.default_rng(seed)
    reads = np.diff(np.floor(np.arange(count + 1) * ratio).astype(np.int64))
    total = int(reads.sum()) + 1
    if regime == "paper":
        events = (rng.integers(size, size=(count, 3)), rng.normal(0, 0.1, size=count))
        queries = rng.integers(size, size=(total, 2))
    else:
        events = (rng.integers(size, size=count), rng.standard_normal((count, 2, 8, 64)).astype(np.float32))
        queries = rng.integers(size, size=total)
    return {"events": events, "queries": queries, "reads": reads}


def _run_window(obj: Any, regime: str, stream: dict[str, Any], start: int, stop: int, cursor: int) -> int:
    events, queries, reads = stream["events"], stream["queries"], stream["reads"]
    if regime == "paper":
        index, deltas = events
        update_k, update_v, query = obj.update_k, obj.update_v, obj.query
        for u in range(start, stop):
            i, j, jv = index[u].tolist()
            if u % 2:
                update_v(i, jv, float(deltas[u]))
            else:
                update_k(i, j, float(deltas[u]))
            for _ in range(reads[u]):
                query(*queries[cursor].tolist())
                cursor += 1
    else:
        tokens, rows = events
        set_token, query_row = obj.set_token, obj.query_row
        for u in range(start, stop):
            set_token(int(tokens[u]), k=rows[u, 0], v=rows[u, 1])
            for _ in range(reads[u]):
                query_row(int(queries[cursor]))
                cursor += 1
    return cursor


def follow(regime: str, ratio: float, cfg: argparse.Namespace) -> dict[str, Any]:
    """One (regime, r): both contenders over the same stream, window by window."""
    if regime == "paper":
        size, count = cfg.paper_n, cfg.paper_updates
        Q, K, V = random_problem(size, size, size, size, seed=1)
        options: dict[str, Any] = {}
    else:
        size, count = cfg.llm_n, cfg.llm_updates if ratio < 1 else cfg.llm_long_updates
        rng = np.random.default_rng(2)
        Q, K, V = (rng.standard_normal((8, size, 64)).astype(np.float32) for _ in range(3))
        options = {"scale": 0.125, "dtype": np.float32}
    stream = _stream(regime, size, count, ratio, seed=3)
    contenders = {
        "auto": DynamicAttention(Q, K, V, tau="auto", **options),
        "OnDemand": OnDemand(Q, K, V, **options),
    }
    cursors = dict.fromkeys(contenders, 0)
    windows: dict[str, list[float]] = {name: [] for name in contenders}
    dormant_at = 0 if contenders["auto"].stats["dormant_periods"] else None  # (dormant when built)
    switches: list[tuple[int, str]] = []  # (the window's last update, the state after it)
    previous = "dormant" if contenders["auto"]._state.dormant else "awake"
    window = cfg.window
    for start in range(0, count, window):
        stop = min(start + window, count)
        for name, obj in contenders.items():
            began = time.perf_counter()
            cursors[name] = _run_window(obj, regime, stream, start, stop, cursors[name])
            windows[name].append((time.perf_counter() - began) / (stop - start))
        if dormant_at is None and contenders["auto"].stats["dormant_periods"]:
            dormant_at = stop
        state = "dormant" if contenders["auto"]._state.dormant else "awake"
        if state != previous:  # (windows see at most one switch: see dormant/woke)
            switches.append((stop, state))
            previous = state
    auto = contenders["auto"]
    first_dormant = None if dormant_at is None else dormant_at // window - 1
    after = slice(first_dormant + 1, None) if first_dormant is not None else slice(len(windows["auto"]), None)
    steady = {
        name: float(np.median(times[after])) if times[after] else None for name, times in windows.items()
    }
    return {
        "regime": regime,
        "ratio": ratio,
        "size": size,
        "updates": count,
        "window": window,
        "dormant_by_update": dormant_at,
        "switches": switches,
        "stats": auto.stats,
        "windows_s": windows,
        "first_window_s": {name: times[0] for name, times in windows.items()},
        "steady_s": steady,
    }


def report(results: list[dict[str, Any]], header: list[str]) -> str:
    rows = []
    for r in results:
        steady_auto, steady_od = r["steady_s"]["auto"], r["steady_s"]["OnDemand"]
        rows.append(
            [
                r["regime"],
                r["size"],
                f"{r['ratio']:g}",
                fmt_seconds(r["first_window_s"]["auto"]),
                "-" if r["dormant_by_update"] is None else r["dormant_by_update"],
                fmt_seconds(steady_auto),
                fmt_seconds(steady_od),
                "-" if steady_auto is None else f"{steady_auto / steady_od:.2f}x",
                f"{r['stats']['dormant_periods']}/{r['stats']['wakes']}",
                ", ".join(f"{state} by {at}" for at, state in r["switches"]) or "-",
            ]
        )
    headers = [
        "regime",
        "n",
        "r",
        "auto, first window",
        "dormant by update",
        "auto after",
        "OnDemand after",
        "auto / OnDemand",
        "dormant/woke",
        "switches after construction",
    ]
    lines = [
        *header,
        "",
        "time per update (reads included); 'after': median over the windows after it went dormant",
    ]
    return "\n".join([*lines, format_table(headers, rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    add_output_options(parser, "dormancy", Path(__file__).resolve().parent.parent / "docs" / "figures")
    args = parser.parse_args(argv)
    if args.quick:
        cfg = argparse.Namespace(
            paper_n=48, paper_updates=3000, llm_n=64, llm_updates=1200, llm_long_updates=1200, window=300
        )
    else:
        cfg = argparse.Namespace(
            paper_n=1024,
            paper_updates=30000,
            llm_n=4096,
            llm_updates=6000,
            llm_long_updates=12000,
            window=500,
        )
    ratios = {"paper": (0.01, 0.1), "llm": (0.01, 0.1, 1.0)}
    results = [follow(regime, r, cfg) for regime, rs in ratios.items() for r in rs]
    info = machine_info()
    header = report_header(f"python benchmarks/bench_dormancy.py{' --quick' if args.quick else ''}", info)
    text = report(results, header)
    print(text)
    if not args.no_write:
        write_report({"machine": info, "results": results, "text": text}, args.out_dir, "dormancy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
