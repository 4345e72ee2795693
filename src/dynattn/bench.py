"""Compatibility facade: the benchmark code now lives in

* :mod:`dynattn.sweep` -- :class:`BenchConfig`, the ``Subject`` runner and :func:`run_bench`;
* :mod:`dynattn.report` -- the summary table, the machine line and the ``--policy`` advice;
* :mod:`dynattn.demo` -- ``dynattn demo``;
* :mod:`dynattn.progress` -- progress bars.

New code should import from those modules.
"""

from dynattn.demo import DemoConfig, demo_workload, format_demo, run_demo
from dynattn.progress import make_progress
from dynattn.report import DEFAULT_MIXES, format_machine, format_policy, mix_cost, policy, summary_table
from dynattn.sweep import (
    BASELINE_ORDER,
    DEFAULTS,
    QUICK,
    SCHEMA,
    BenchConfig,
    Subject,
    add_ratios,
    build_subjects,
    make_problem,
    measure_size,
    run_bench,
    total_steps,
)

__all__ = [
    "BASELINE_ORDER",
    "DEFAULTS",
    "QUICK",
    "SCHEMA",
    "BenchConfig",
    "Subject",
    "add_ratios",
    "build_subjects",
    "make_problem",
    "measure_size",
    "run_bench",
    "total_steps",
    "DEFAULT_MIXES",
    "format_machine",
    "format_policy",
    "mix_cost",
    "policy",
    "summary_table",
    "DemoConfig",
    "demo_workload",
    "format_demo",
    "run_demo",
    "make_progress",
]
