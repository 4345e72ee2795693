"""Distributed regime: one attention state sharded over Ray actors, on this machine.

Workload (the LLM regime of bench_llm.py): float32, d = e = 64, n = m, tau = 0.5.
One *step* is a token edit ``set_token(c, k=..., v=...)`` in every head, then
``query_rows`` of ``--rows`` random query rows in every head; the edit is queued
and travels with the query, so a step is one batched call per shard.
Throughput is head-edits per second (heads x steps / wall time, queries included).

Configurations, interleaved in ``--rounds`` rounds (the machine is shared, so
each round measures all three under similar load; medians are reported):

* ``1 shard``   ShardedAttention over ``--heads-per-shard`` heads, one actor;
* ``2 shards``  twice the heads on two actors (weak scaling: the same work per actor);
* ``1 process`` a plain DynamicAttention over the 2-shard configuration's heads in this
  process, its BLAS free to use every core (the same total workload as ``2 shards``).

Each actor is limited to one BLAS/OpenMP thread (``blas_threads=1``, set in its
``runtime_env``; ``cpus_per_shard=1``). Also measured: the fan-out overhead of a
batched call (its wall time less its slowest shard's own time, p50), the round
trip of a bare actor call against payload size (latency and bandwidth), the
round trip of an empty call to 1, 2 and 4 shards, and the time to recover after
``ray.kill`` of one shard. A cost model fitted from these projects the
throughput to 8, 32 and 128 shards (a projection, not a measurement).

    python benchmarks/bench_distributed.py --json docs/figures/distributed.json \\
        | tee docs/figures/distributed.txt
    python benchmarks/bench_distributed.py --n 2048 --steps 50 --rounds 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from dynattn import DynamicAttention
from dynattn._timing import LoadMonitor, format_table, machine_info
from dynattn.distributed import ShardedAttention

PROJECTED_SHARDS = (1, 2, 8, 32, 128)


def workload(heads, n, d, steps, rows, seed=0):
    """Inputs and a fixed sequence of steps: (key/value column, k rows, v rows, query rows)."""
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal((heads, n, d), dtype=np.float32) for _ in range(3))
    plan = [
        (
            int(rng.integers(n)),
            rng.standard_normal((heads, d), dtype=np.float32),
            rng.standard_normal((heads, d), dtype=np.float32),
            rng.integers(n, size=rows),
        )
        for _ in range(steps)
    ]
    return Q, K, V, plan


def run(att, plan):
    """Run the steps; returns the wall seconds and, per step, the driver's time for the (queued)
    edit, the batched call's fan-out overhead and its slowest shard's own time."""
    sharded = isinstance(att, ShardedAttention)
    parts = {"edit": [], "overhead": [], "shard": []}
    start = time.perf_counter()
    for c, k, v, rows in plan:
        t0 = time.perf_counter()
        att.set_token(c, k=k, v=v)
        t1 = time.perf_counter()
        att.query_rows(rows)
        if sharded:
            parts["edit"].append(t1 - t0)
            parts["overhead"].append(time.perf_counter() - t1 - att.last_shard_seconds)
            parts["shard"].append(att.last_shard_seconds)
    return time.perf_counter() - start, parts


def p50_ms(values):
    return 1e3 * statistics.median(values) if values else float("nan")


def transport(ray, sizes=(0, 1 << 16, 1 << 20, 1 << 23), repeats=60):
    """Round trip of a bare actor call against payload bytes: fitted latency (s) and bandwidth (B/s)."""

    @ray.remote(num_cpus=0)
    class Echo:
        def size(self, payload):
            return len(payload)

    echo = Echo.remote()
    ray.get(echo.size.remote(b""))
    medians = []
    for size in sizes:
        payload = bytes(size)
        times = []
        for _ in range(repeats if size < 1 << 22 else repeats // 6):
            t0 = time.perf_counter()
            ray.get(echo.size.remote(payload))
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    slope, latency = np.polyfit(np.array(sizes, dtype=float), np.array(medians), 1)
    ray.kill(echo)
    return {
        "latency_s": float(medians[0]),
        "fit_latency_s": float(latency),
        "bandwidth_Bps": float(1 / slope),
    }


def fan_out(counts=(1, 2, 4), repeats=200):
    """p50 round trip of an empty call to every shard (``flush`` with nothing queued) per shard count."""
    Q = np.random.default_rng(0).standard_normal((4, 64, 16), dtype=np.float32)
    result = {}
    for shards in counts:
        with ShardedAttention(Q, Q, Q, shards=shards, cpus_per_shard=0, blas_threads=None) as att:
            att.flush()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                att.flush()
                times.append(time.perf_counter() - t0)
            result[shards] = statistics.median(times)
    slope, intercept = np.polyfit(list(result), list(result.values()), 1)
    return {"p50_s": result, "per_shard_s": float(slope), "base_s": float(intercept)}


def recovery(ray, att, plan):
    """Kill the last shard's actor; the next call restores it. Returns timings and the answer check."""
    rows = plan[-1][3]
    expected = att.query_rows(rows)
    replayed = att.stats["replayed_edits"]
    victim = att.actors[-1]
    ray.kill(victim)
    try:  # ray.kill returns before the actor is gone
        while True:
            ray.get(victim.__ray_ready__.remote(), timeout=30)
            time.sleep(0.01)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    t0 = time.perf_counter()
    got = att.query_rows(rows)
    wall = time.perf_counter() - t0
    return {
        "next_call_s": wall,
        "restore_and_replay_s": att.last_recovery_seconds,
        "replayed_edits": att.stats["replayed_edits"] - replayed,
        "max_difference": float(np.abs(got - expected).max()),
    }


def model(p50, link, heads_per_shard, d, rows):
    """Seconds per step on S shards (weak scaling, ``heads_per_shard`` heads each):

        T(S) = e + c + f0 + f1 * S + S * bytes / B

    e: the driver's time to check and queue the edit (p50 at 2 shards); c: a shard's own
    time for the batched call (p50 of the 1-shard run, the closest to "one free core per
    shard"); f0 + f1 * S: the fan-out overhead of the batched call (fitted to its p50 at 1
    and 2 shards, transfer taken out); bytes: a shard's k and v rows out and its answer rows
    back; B: the measured bandwidth of an actor call.
    """
    per_shard = 4 * heads_per_shard * d * (2 + rows) / link["bandwidth_Bps"]
    f = {S: p50[S]["overhead"] / 1e3 - S * per_shard for S in (1, 2)}
    fitted = {"e_s": p50[2]["edit"] / 1e3, "c_s": p50[1]["shard"] / 1e3, "f1_s": f[2] - f[1]}
    fitted.update(f0_s=f[1] - fitted["f1_s"], bytes_per_shard_s=per_shard)

    def seconds(S):
        return fitted["e_s"] + fitted["c_s"] + fitted["f0_s"] + (fitted["f1_s"] + per_shard) * S

    return seconds, fitted


def measure(args):
    """Run the benchmark; returns every measurement as a JSON-ready dict."""
    import ray

    ray.init(num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    h, n, d = args.heads_per_shard, args.n, args.d
    total = args.warmup + args.rounds * args.steps
    Q, K, V, plan = workload(2 * h, n, d, total, args.rows)
    options = {"scale": d**-0.5, "dtype": np.float32, "tau": 0.5}
    shard_options = {"by": "heads", "cpus_per_shard": 1, "blas_threads": 1}
    builds, contenders = {}, {}
    for name, make in (
        ("1 shard", lambda: ShardedAttention(Q[:h], K[:h], V[:h], shards=1, **shard_options, **options)),
        ("2 shards", lambda: ShardedAttention(Q, K, V, shards=2, **shard_options, **options)),
        ("1 process", lambda: DynamicAttention(Q, K, V, **options)),
    ):
        t0 = time.perf_counter()
        contenders[name] = att = make()
        builds[name] = time.perf_counter() - t0
        part = plan[: args.warmup]
        if name == "1 shard":
            part = [(c, k[:h], v[:h], rows) for c, k, v, rows in part]
        run(att, part)  # includes the first checkpoint, taken at once since the build is costly
        print(f"# built {name} in {builds[name]:.1f} s, warmed up with {args.warmup} steps", flush=True)

    walls = {name: [] for name in contenders}
    parts = {S: {"edit": [], "overhead": [], "shard": []} for S in (1, 2)}
    loads = []
    for r in range(args.rounds):
        monitor = LoadMonitor().start()
        time.sleep(1.0)
        loads.append(monitor.stop())
        part = plan[args.warmup + r * args.steps : args.warmup + (r + 1) * args.steps]
        for name, att in contenders.items():
            steps = [(c, k[:h], v[:h], rows) for c, k, v, rows in part] if name == "1 shard" else part
            wall, measured = run(att, steps)
            walls[name].append(wall)
            for key, values in measured.items():
                if values:
                    parts[att.shards][key] += values
        print(f"# round {r + 1}: " + ", ".join(f"{k} {w[-1]:.2f} s" for k, w in walls.items()), flush=True)

    heads = {"1 shard": h, "2 shards": 2 * h, "1 process": 2 * h}
    link, fan = transport(ray), fan_out()
    rec = recovery(ray, contenders["2 shards"], plan)
    rec["checkpoints"] = contenders["2 shards"].stats["checkpoints"]
    for att in contenders.values():
        if isinstance(att, ShardedAttention):
            att.close()
    ray.shutdown()
    return {
        "args": vars(args),
        "machine": machine_info(),
        "build_s": builds,
        "walls_s": walls,
        "head_edits_per_s": {
            name: heads[name] * args.steps / statistics.median(w) for name, w in walls.items()
        },
        "p50_ms": {S: {k: p50_ms(v) for k, v in p.items()} for S, p in parts.items()},
        "empty_call": fan,
        "transport": link,
        "recovery": rec,
        "background_load": loads,
    }


def report(results):
    """The measured figures, and the projection of the fitted cost model, as text."""
    args, rate, p50 = (
        results["args"],
        results["head_edits_per_s"],
        {int(k): v for k, v in results["p50_ms"].items()},
    )
    h, steps, fan, link, rec = (
        args["heads_per_shard"],
        args["steps"],
        results["empty_call"],
        results["transport"],
        results["recovery"],
    )
    info = results["machine"]
    out = [
        f"# dynattn distributed benchmark: n = m = {args['n']}, d = e = {args['d']}, float32, "
        f"{args['rows']} query rows per step, {args['rounds']} rounds of {steps} steps",
        f"# {info['cpu_model']}, {info['cores']} cores, numpy {info['numpy']} ({info['blas']})",
        "# built in " + ", ".join(f"{k} {v:.0f} s" for k, v in results["build_s"].items()),
        "\n## Measured (medians over rounds)\n",
        format_table(
            ["configuration", "heads", "ms / step", "head-edits / s"],
            [
                [
                    name,
                    {"1 shard": h}.get(name, 2 * h),
                    f"{1e3 * statistics.median(w) / steps:.2f}",
                    f"{rate[name]:,.0f}",
                ]
                for name, w in results["walls_s"].items()
            ],
        ),
        "",
        f"weak scaling, 2 shards vs 1 shard (head-edits/s): {rate['2 shards'] / rate['1 shard']:.2f}x "
        "(target >= 1.6x)",
        f"2 shards vs one unlimited process, same {2 * h}-head workload: "
        f"{rate['2 shards'] / rate['1 process']:.2f}x (aim >= 1.2x)",
        "p50 per step, in ms (driver's edit check and queue / fan-out overhead of the batched call / "
        "slowest shard's own time): "
        + "; ".join(
            f"{S} shard(s) {p['edit']:.2f} / {p['overhead']:.2f} / {p['shard']:.2f}" for S, p in p50.items()
        ),
        "empty call to every shard, p50: "
        + ", ".join(f"{s} shard(s) {1e3 * t:.2f} ms" for s, t in fan["p50_s"].items())
        + f"; bare actor call {1e3 * link['latency_s']:.2f} ms, "
        f"bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s",
        f"recovery after ray.kill of one shard: next call {rec['next_call_s']:.2f} s (new actor, checkpoint "
        f"restored, {rec['replayed_edits']} edits replayed; {rec['restore_and_replay_s']:.2f} s in all), "
        f"answers differ by {rec['max_difference']:.1e}",
        "background load before each round (cores busy with other processes): "
        + ", ".join(f"{x:.2f}" for x in results["background_load"] if x is not None),
    ]
    step_s, fitted = model(p50, link, h, args["d"], args["rows"])
    projected = {S: h * S / step_s(S) for S in PROJECTED_SHARDS}
    out += [
        f"\n## Projection (cost model, not measured): weak scaling, {h} heads per shard\n",
        model.__doc__,
        "Fitted: " + ", ".join(f"{k[:-2]} = {1e3 * v:.3f} ms" for k, v in fitted.items()),
        "Assumptions: one core per shard and no contention between shards; local-machine RPC "
        "(a network adds latency); the slowest of S shards takes the median time (no stragglers); "
        "one driver process issues every call.\n",
        format_table(
            ["shards", "heads", "ms / step", "head-edits / s", "x 1 shard"],
            [
                [
                    S,
                    h * S,
                    f"{1e3 * step_s(S):.2f}",
                    f"{projected[S]:,.0f}",
                    f"{projected[S] / projected[1]:.1f}",
                ]
                for S in PROJECTED_SHARDS
            ],
        ),
    ]
    results["model"], results["projection_head_edits_per_s"] = fitted, projected
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="queries = keys (default 16384)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads-per-shard", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="query rows read per step")
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps per configuration")
    parser.add_argument("--steps", type=int, default=150, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--from-json", help="report (and refit) a run saved with --json instead of measuring")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as handle:
            results = json.load(handle)
    else:
        results = measure(args)
    print(report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
