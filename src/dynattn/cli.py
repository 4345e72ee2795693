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
    The theoretical exponents per tau, the omega(1,1,k) table used, the
    status of the conditional lower bound, and (``--load``) the exponents
    fitted to a saved paper-regime run next to them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from dynattn._validation import check_choice, check_scalar
from dynattn.baselines import BASELINES
from dynattn.demo import DemoConfig
from dynattn.progress import PROGRESS_KINDS
from dynattn.storage import STORAGES
from dynattn.structure import SCHEDULES
from dynattn.sweep import DTYPES, QUICK_SETTINGS, REGIMES, UPDATE_KINDS, BenchConfig

#: Figures ``dynattn bench --plot`` can write (``--figures``).
FIGURES = ("tradeoff", "scaling", "mix", "exponents")


def _argument(check: Any, *args: Any, **kwargs: Any) -> Any:
    """``check(*args, **kwargs)`` (a :mod:`dynattn._validation` helper), its error as argparse's."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one size")
    for v in values:
        _argument(check_scalar, "each size", v, low=2)
    return values


def _float_list(name: str, text: str, low: float | None = None, high: float | None = None) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return [_argument(check_scalar, name, v, low=low, high=high) for v in values]


def _taus(text: str) -> list[float]:
    return _float_list("each tau", text, 0.0, 1.0)


def _mixes(text: str) -> list[float]:
    return _float_list("each mix", text, 0.0, None)


def _choices_list(name: str, choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        values = [x for x in text.replace(" ", "").split(",") if x]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}")
        return [_argument(check_choice, name, v, choices) for v in values]

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dynattn`` command.

    Options left out are ``None`` and take their value from :class:`DemoConfig`
    or :meth:`BenchConfig.preset`, which the help texts quote.
    """
    parser = argparse.ArgumentParser(
        prog="dynattn",
        description="Exact softmax attention maintained under edits to keys and values "
        "(van den Brand, Song, Zhou, arXiv 2304.02207): demo and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,theory}")

    demo_defaults = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="short built-in workload: timings, ratios, accuracy check",
        description="Run a short mixed workload (entry updates of K and V "
        "interleaved with queries) on DynamicAttention and the "
        "baselines; check every answer against float64.",
    )
    demo.add_argument("--size", type=int, help=f"n = m = d = e (default {demo_defaults.size})")
    demo.add_argument(
        "--updates", type=int, help=f"updates in the workload (default {demo_defaults.updates})"
    )
    demo.add_argument(
        "--queries-per-update", type=float, help=f"default {demo_defaults.queries_per_update:g}"
    )
    demo.add_argument("--tau", type=float, help=f"DynamicAttention tau (default {demo_defaults.tau:g})")
    demo.add_argument("--storage", choices=["auto", *STORAGES])
    demo.add_argument("--dtype", choices=DTYPES)
    demo.add_argument(
        "--recompute-updates",
        type=int,
        help=f"Recompute runs only this prefix of the updates (default {demo_defaults.recompute_updates})",
    )
    demo.add_argument(
        "--eager-updates",
        type=int,
        help=f"Eager runs only this prefix of the updates (default {demo_defaults.eager_updates})",
    )
    demo.add_argument("--seed", type=int)
    demo.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    demo.add_argument("--progress", default="auto", choices=PROGRESS_KINDS)

    defaults = BenchConfig()
    bench = sub.add_parser(
        "bench",
        help="sweeps over sizes and tau; JSON, plots, exponent fits",
        description="Benchmark DynamicAttention against Recompute, OnDemand and "
        "Eager, interleaved in one run.",
    )
    bench.add_argument(
        "--regime",
        choices=REGIMES,
        help="paper: n=m=d=e, entry updates; llm: d=e=head-dim, token (row) edits",
    )
    bench.add_argument("--sizes", type=_int_list, help="comma-separated n values")
    bench.add_argument("--taus", type=_taus, help="comma-separated tau values in [0, 1]")
    bench.add_argument("--dtype", choices=DTYPES)
    bench.add_argument(
        "--storage",
        dest="storages",
        metavar="STORAGE",
        type=_choices_list("each storage", [*STORAGES, "auto"]),
        help=f"comma-separated storage modes of DynamicAttention (default {','.join(defaults.storages)})",
    )
    bench.add_argument(
        "--schedule",
        dest="schedules",
        metavar="SCHEDULE",
        type=_choices_list("each schedule", list(SCHEDULES)),
        help="comma-separated fold schedules of DynamicAttention, amortized and/or spread "
        f"(default {','.join(defaults.schedules)}; docs/latency.md)",
    )
    bench.add_argument(
        "--baselines", type=_choices_list("each baseline", list(BASELINES)), help="baselines to measure"
    )
    bench.add_argument(
        "--repeats",
        type=int,
        help=f"timed interleaved rounds (default {defaults.repeats}; --quick {QUICK_SETTINGS['repeats']})",
    )
    bench.add_argument(
        "--warmup",
        type=int,
        help=f"untimed rounds first (default {defaults.warmup}; --quick {QUICK_SETTINGS['warmup']})",
    )
    bench.add_argument(
        "--sample-s", type=float, help=f"target seconds per sample (default {defaults.sample_s:g})"
    )
    bench.add_argument(
        "--recompute-updates",
        type=int,
        help=f"at most this many updates per Recompute sample (default {defaults.recompute_updates})",
    )
    bench.add_argument(
        "--quiet-wait",
        dest="quiet_wait_s",
        type=float,
        metavar="SECONDS",
        help="shared machines: before each size wait up to SECONDS for other processes to "
        f"use < --quiet-load cores (default {defaults.quiet_wait_s:g}: don't wait)",
    )
    bench.add_argument(
        "--quiet-load",
        type=float,
        help="cores other processes may use for the machine to count as quiet "
        f"(default {defaults.quiet_load:g})",
    )
    bench.add_argument(
        "--noisy-retries",
        type=int,
        help="measure a size again (up to this many times) when other processes used more "
        "than 3x --quiet-load cores during it; the quietest attempt is kept "
        f"(default {defaults.noisy_retries})",
    )
    bench.add_argument(
        "--burn-in",
        type=float,
        help="untimed updates per key row before timing "
        f"(default {defaults.burn_in:g}; --quick {QUICK_SETTINGS['burn_in']:g})",
    )
    bench.add_argument(
        "--update-kind",
        choices=UPDATE_KINDS,
        help=f"paper regime: entry updates of K, V or alternating (default {defaults.update_kind})",
    )
    bench.add_argument("--head-dim", type=int, help=f"llm regime: d = e (default {defaults.head_dim})")
    bench.add_argument(
        "--memory-budget",
        type=int,
        help="bytes of dense weights allowed under storage=auto "
        f"(default {defaults.memory_budget / 2**30:g} GiB)",
    )
    bench.add_argument("--seed", type=int)
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
        "--figures",
        type=_choices_list("each figure", FIGURES),
        help=f"with --plot: which figures (default all: {','.join(FIGURES)})",
    )
    bench.add_argument(
        "--load",
        metavar="PATH",
        help="skip measuring: report on a JSON file written by --json (the fits are recomputed)",
    )
    _fit_arguments(bench)
    bench.add_argument("--progress", default="auto", choices=PROGRESS_KINDS)

    theory = sub.add_parser(
        "theory",
        help="theoretical exponents per tau, the omega(1,1,k) table, the lower bound's status",
        description="Theoretical exponents, the omega(1,1,k) table, the status of the "
        "conditional lower bound; with --load, the exponents fitted to a saved paper-regime run.",
    )
    theory.add_argument(
        "--load", metavar="PATH", help="a JSON file from `dynattn bench --regime paper --json`"
    )
    _fit_arguments(theory)
    return parser


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the exponent fits, shared by ``bench`` and ``theory``."""
    parser.add_argument(
        "--fit-min-n",
        type=int,
        metavar="N",
        help="fit the exponents to the sizes n >= N only (default: all sizes)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="REPS",
        help="bootstrap resamples of the rounds for the exponent intervals (default 1000; 0: none)",
    )
    parser.add_argument(
        "--fit-per-gemm",
        action="store_true",
        help="shared machines: fit times rescaled by the GEMM rate timed in the same rounds "
        "(relative to the fastest), to separate a drifting machine speed from growth in n",
    )


def _given(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The options in ``args`` named after fields of ``config_class`` that were given."""
    return {
        f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name, None) is not None
    }


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    given = _given(args, BenchConfig)
    if args.quick:
        given.pop("recompute_updates", None)  # --quick has always used its own value
    cfg = BenchConfig.preset(quick=args.quick, **given)
    for option, value, low, boundaries in (
        ("--repeats", cfg.repeats, 1, "both"),
        ("--recompute-updates", cfg.recompute_updates, 1, "both"),
        ("--warmup", cfg.warmup, 0, "both"),
        ("--burn-in", cfg.burn_in, 0, "both"),
        ("--quiet-wait", cfg.quiet_wait_s, 0, "both"),
        ("--noisy-retries", cfg.noisy_retries, 0, "both"),
        ("--sample-s", cfg.sample_s, 0, "neither"),
    ):
        check_scalar(option, value, low=low, include_boundaries=boundaries)
    if cfg.regime == "paper" and max(cfg.sizes) > 8192:
        raise ValueError(
            "--sizes: the paper regime has d = e = n; sizes above 8192 need "
            "tens of GiB. Use --regime llm for long contexts."
        )
    return cfg


def _cmd_bench(args: argparse.Namespace) -> int:
    from dynattn.report import format_machine, format_policy, latency_table, policy, summary_table
    from dynattn.sweep import run_bench
    from dynattn.theory import fit_records, format_fits

    _check_fit_arguments(args)
    if args.load:
        result = _load_result(args.load)
    else:
        cfg = _bench_config(args)
        result = run_bench(cfg, progress_mode=args.progress)
        result["source"]["command"] = shlex.join(["dynattn", *getattr(args, "argv", [])])
    records = result["records"]
    refit = args.load or args.fit_min_n is not None or args.fit_per_gemm or args.bootstrap != 1000
    if any(r.get("regime") == "paper" for r in records) and (refit or not result.get("fits")):
        result["fits"] = fit_records(
            records, min_n=args.fit_min_n, reps=args.bootstrap, per_gemm=args.fit_per_gemm
        )
    print(f"machine: {format_machine(result.get('machine', {}))}")
    print()
    print(summary_table(records))
    print()
    print(latency_table(records))
    if result.get("fits"):
        print()
        print("exponent fits (paper regime) vs theory:")
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

        paths = write_plots(result, args.plot, figures=args.figures or FIGURES)
        print("wrote " + ", ".join(paths))
    return 0


def _check_fit_arguments(args: argparse.Namespace) -> None:
    if args.fit_min_n is not None:
        check_scalar("--fit-min-n", args.fit_min_n, low=1)
    check_scalar("--bootstrap", args.bootstrap, low=0)


def _load_result(path: str) -> dict[str, Any]:
    """A result written by ``dynattn bench --json``."""
    with open(path, encoding="utf-8") as fh:
        result = json.load(fh)
    if not isinstance(result, dict) or "records" not in result:
        raise ValueError(f"--load: {path} has no 'records'; expected a file from dynattn bench --json")
    return result


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from dynattn.demo import format_demo, run_demo

    cfg = DemoConfig(**_given(args, DemoConfig))
    check_scalar("--size", cfg.size, low=2)
    check_scalar("--updates", cfg.updates, low=1)
    check_scalar("--queries-per-update", cfg.queries_per_update, low=0)
    check_scalar("--tau", cfg.tau, low=0, high=1)
    cfg = replace(
        cfg, recompute_updates=max(1, cfg.recompute_updates), eager_updates=max(1, cfg.eager_updates)
    )
    result = run_demo(cfg, progress_mode=args.progress)
    print(format_demo(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
    return 0 if result["passed"] else 1


def _cmd_theory(args: argparse.Namespace) -> int:
    from dynattn._timing import format_table
    from dynattn.theory import (
        ALPHA,
        LOWER_BOUND_STATUS,
        OMEGA_TABLES,
        fit_records,
        format_fits,
        omega_rect,
        query_exponent,
        update_exponent,
    )

    _check_fit_arguments(args)
    fits = None
    if args.load:
        result = _load_result(args.load)
        fits = fit_records(
            result["records"], min_n=args.fit_min_n, reps=args.bootstrap, per_gemm=args.fit_per_gemm
        )

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
    print()
    print(LOWER_BOUND_STATUS)
    if fits is not None:
        from dynattn.report import format_machine

        print()
        source = result.get("source", {})
        print(
            f"measured exponents from {args.load}"
            + (f" ({source['commit']})" if source.get("commit") else "")
        )
        print(f"machine: {format_machine(result.get('machine', {}))}")
        print(format_fits(fits))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynattn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "bench":
            return _cmd_bench(args)
        return _cmd_theory(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"dynattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
