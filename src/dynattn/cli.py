"""The ``dynattn`` command line (also ``python -m dynattn``).

Subcommands
-----------
``dynattn demo``
    A short built-in workload on generated data: amortized update time, query
    time and ratios to the baselines, with every answer checked against a
    float64 recomputation. Exits 1 if an answer is off by more than
    1e-10 * max|V[:, j]| (float64; 1e-4 for float32).
``dynattn bench``
    Sweeps over sizes and tau in the ``paper`` or ``llm`` regime, a summary
    table, exponent fits, optional JSON, figures and a ``--policy`` advice.
``dynattn theory``
    The theoretical exponents per tau and the omega(1,1,k) table used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected sizes >= 2, got {text!r}")
    return values


def _float_list(text: str, low: float | None = None, high: float | None = None) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    for v in values:
        if (low is not None and v < low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected numbers in [{low}, {high}], got {v}")
    return values


def _taus(text: str) -> list[float]:
    return _float_list(text, 0.0, 1.0)


def _mixes(text: str) -> list[float]:
    return _float_list(text, 0.0, None)


def _choices_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        values = [x for x in text.replace(" ", "").split(",") if x]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dynattn`` command."""
    parser = argparse.ArgumentParser(
        prog="dynattn",
        description="Exact softmax attention maintained under edits to keys and values "
        "(van den Brand, Song, Zhou, arXiv 2304.02207): demo and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,theory}")

    demo = sub.add_parser(
        "demo",
        help="short built-in workload: timings, ratios, accuracy check",
        description="Run a short mixed workload (entry updates of K and V "
        "interleaved with queries) on DynamicAttention and the "
        "baselines; check every answer against float64.",
    )
    demo.add_argument("--size", type=int, default=1024, help="n = m = d = e (default 1024)")
    demo.add_argument("--updates", type=int, default=4096, help="updates in the workload (default 4096)")
    demo.add_argument("--queries-per-update", type=float, default=1.0, help="default 1")
    demo.add_argument("--tau", type=float, default=0.75, help="DynamicAttention tau (default 0.75)")
    demo.add_argument("--storage", default="auto", choices=["auto", "dense", "implicit"])
    demo.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    demo.add_argument(
        "--recompute-updates",
        type=int,
        default=32,
        help="Recompute runs only this prefix of the updates (default 32)",
    )
    demo.add_argument(
        "--eager-updates",
        type=int,
        default=1024,
        help="Eager runs only this prefix of the updates (default 1024)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    demo.add_argument("--progress", default="auto", choices=["auto", "rich", "plain", "none"])

    bench = sub.add_parser(
        "bench",
        help="sweeps over sizes and tau; JSON, plots, exponent fits",
        description="Benchmark DynamicAttention against Recompute, OnDemand and "
        "Eager, interleaved in one run.",
    )
    bench.add_argument(
        "--regime",
        default="paper",
        choices=["paper", "llm"],
        help="paper: n=m=d=e, entry updates; llm: d=e=head-dim, token (row) edits",
    )
    bench.add_argument("--sizes", type=_int_list, help="comma-separated n values")
    bench.add_argument("--taus", type=_taus, help="comma-separated tau values in [0, 1]")
    bench.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    bench.add_argument(
        "--storage",
        type=_choices_list(["dense", "implicit", "auto"]),
        default=["auto"],
        help="comma-separated storage modes of DynamicAttention (default auto)",
    )
    bench.add_argument(
        "--baselines",
        type=_choices_list(["recompute", "ondemand", "eager"]),
        default=["recompute", "ondemand", "eager"],
        help="baselines to measure",
    )
    bench.add_argument("--repeats", type=int, help="timed interleaved rounds (default 5; --quick 3)")
    bench.add_argument("--warmup", type=int, help="untimed rounds first (default 1; --quick 0)")
    bench.add_argument("--sample-s", type=float, help="target seconds per sample (default 0.15)")
    bench.add_argument(
        "--recompute-updates",
        type=int,
        default=2,
        help="at most this many updates per Recompute sample (default 2)",
    )
    bench.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="shared machines: before each size wait up to SECONDS for other processes to "
        "use < --quiet-load cores (default 0: don't wait)",
    )
    bench.add_argument(
        "--quiet-load",
        type=float,
        default=0.1,
        help="cores other processes may use for the machine to count as quiet (default 0.1)",
    )
    bench.add_argument(
        "--noisy-retries",
        type=int,
        default=0,
        help="measure a size again (up to this many times) when other processes used more "
        "than 3x --quiet-load cores during it; the quietest attempt is kept (default 0)",
    )
    bench.add_argument(
        "--burn-in",
        type=float,
        help="untimed updates per key row before timing (default 16; --quick 4)",
    )
    bench.add_argument(
        "--update-kind",
        default="k",
        choices=["k", "v", "kv"],
        help="paper regime: entry updates of K, V or alternating (default k)",
    )
    bench.add_argument("--head-dim", type=int, default=64, help="llm regime: d = e (default 64)")
    bench.add_argument(
        "--memory-budget",
        type=int,
        default=1 << 30,
        help="bytes of dense weights allowed under storage=auto (default 1 GiB)",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--quick", action="store_true", help="small sizes, few taus and repeats: under 2 minutes"
    )
    bench.add_argument("--json", metavar="PATH", help="write records, machine and fits as JSON")
    bench.add_argument("--plot", metavar="DIR", help="write PNG figures (needs matplotlib)")
    bench.add_argument(
        "--policy",
        type=_mixes,
        metavar="MIXES",
        help="comma-separated queries-per-update values: report the best tau and "
        "storage for each, from the measured data",
    )
    bench.add_argument(
        "--load", metavar="PATH", help="skip measuring: report on a JSON file written by --json"
    )
    bench.add_argument("--progress", default="auto", choices=["auto", "rich", "plain", "none"])

    sub.add_parser("theory", help="theoretical exponents per tau and the omega(1,1,k) table")
    return parser


def _bench_config(args: argparse.Namespace) -> Any:
    from dynattn.bench import DEFAULTS, QUICK, BenchConfig

    table = QUICK if args.quick else DEFAULTS
    cfg = BenchConfig(
        regime=args.regime,
        sizes=args.sizes or list(table[args.regime]["sizes"]),
        taus=args.taus or list(table[args.regime]["taus"]),
        dtype=args.dtype,
        storages=args.storage,
        baselines=args.baselines,
        repeats=args.repeats if args.repeats is not None else (3 if args.quick else 5),
        warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        sample_s=args.sample_s if args.sample_s is not None else (0.03 if args.quick else 0.15),
        recompute_updates=args.recompute_updates if not args.quick else 1,
        burn_in=args.burn_in if args.burn_in is not None else (4.0 if args.quick else 16.0),
        burn_in_s=1.0 if args.quick else 6.0,
        update_kind=args.update_kind,
        head_dim=args.head_dim,
        seed=args.seed,
        memory_budget=args.memory_budget,
        quiet_wait_s=args.quiet_wait,
        quiet_load=args.quiet_load,
        noisy_retries=args.noisy_retries,
    )
    if (
        cfg.repeats < 1
        or cfg.warmup < 0
        or cfg.sample_s <= 0
        or cfg.recompute_updates < 1
        or cfg.burn_in < 0
        or cfg.quiet_wait_s < 0
        or cfg.noisy_retries < 0
    ):
        raise ValueError(
            "--repeats and --recompute-updates must be >= 1; --warmup, --burn-in, --quiet-wait "
            "and --noisy-retries >= 0; --sample-s > 0"
        )
    if cfg.regime == "paper" and max(cfg.sizes) > 8192:
        raise ValueError(
            "--sizes: the paper regime has d = e = n; sizes above 8192 need "
            "tens of GiB. Use --regime llm for long contexts."
        )
    return cfg


def _cmd_bench(args: argparse.Namespace) -> int:
    from dynattn.bench import format_machine, format_policy, policy, run_bench, summary_table
    from dynattn.theory import fit_records, format_fits

    if args.load:
        with open(args.load, encoding="utf-8") as fh:
            result = json.load(fh)
        if "records" not in result:
            raise ValueError(f"--load: {args.load} has no 'records'; expected a file from --json")
        if not result.get("fits"):
            result["fits"] = fit_records(result["records"])
    else:
        cfg = _bench_config(args)
        result = run_bench(cfg, progress_mode=args.progress)
    records = result["records"]
    print(f"machine: {format_machine(result.get('machine', {}))}")
    print()
    print(summary_table(records))
    if result.get("fits"):
        print()
        print("exponent fits (paper regime, time ~ n^slope) vs theory:")
        print(format_fits(result["fits"]))
    if args.policy:
        result["policy"] = policy(records, args.policy)
        print()
        print("policy: cost per update = update time + (queries per update) x query time")
        print(format_policy(result["policy"]))
    if args.json and not (args.load and args.json == args.load):
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
        print(f"\nwrote {args.json}")
    if args.plot:
        from dynattn._plots import write_plots

        paths = write_plots(result, args.plot)
        print("wrote " + ", ".join(paths))
    return 0


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from dynattn.bench import DemoConfig, format_demo, run_demo

    if args.size < 2 or args.updates < 1 or args.queries_per_update < 0:
        raise ValueError("--size must be >= 2, --updates >= 1, --queries-per-update >= 0")
    if not 0.0 <= args.tau <= 1.0:
        raise ValueError(f"--tau: expected a number in [0, 1], got {args.tau}")
    cfg = DemoConfig(
        size=args.size,
        updates=args.updates,
        queries_per_update=args.queries_per_update,
        tau=args.tau,
        storage=args.storage,
        dtype=args.dtype,
        recompute_updates=max(1, args.recompute_updates),
        eager_updates=max(1, args.eager_updates),
        seed=args.seed,
    )
    result = run_demo(cfg, progress_mode=args.progress)
    print(format_demo(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
    return 0 if result["passed"] else 1


def _cmd_theory() -> int:
    from dynattn._timing import format_table
    from dynattn.theory import ALPHA, OMEGA_TABLES, omega_rect, query_exponent, update_exponent

    rows = []
    for tau in (0.0, 0.25, ALPHA, 0.5, 0.75, 1.0):
        rows.append(
            [
                f"{tau:.4g}",
                f"{omega_rect(tau):.6f}",
                f"{update_exponent(tau, 'classical'):.3f}",
                f"{update_exponent(tau):.6f}",
                f"{query_exponent(tau):.3f}",
                f"{query_exponent(tau, 'paper'):.3f}",
            ]
        )
    print(
        format_table(
            [
                "tau",
                "omega(1,1,tau)",
                "update (classical)",
                "update (best known)",
                "query (structure)",
                "query (paper)",
            ],
            rows,
        )
    )
    print(
        f"\nomega(1,1,k) = 2 for k <= alpha, alpha > {ALPHA} (VXXZ24); between tabulated points "
        "the lower convex envelope (omega(1,1,k) is convex in k). Sources:"
    )
    for name, table in OMEGA_TABLES.items():
        print(f"  {name}: {table['citation']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynattn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "bench":
            return _cmd_bench(args)
        return _cmd_theory()
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"dynattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
