"""GPU check for the torch backend (one GPU, under 5 minutes).

1. Correctness on the device: DynamicAttention (torch backend, both storage
   modes, float32 and float64) after random entry updates and token edits,
   against a float64 reference computed with torch on the same device.
2. Speed, in one run, against the baselines and SDPA recomputation:
   * LLM regime: H = 8 heads, n = m = 16384, d = e = 64 and 128, float32 --
     token edits (set_token k, v) + 4 full-row queries per edit;
   * paper regime: n = m = d = e = 4096, float32 -- entry updates of K, and
     entry queries with half the threshold pending.
3. The fold's achieved TFLOP/s (2*n*e flops per pending row) as a fraction of
   the device's measured GEMM rate at the same dtype.

    python benchmarks/gpu_check.py               # on cuda:0
    python benchmarks/gpu_check.py --device cpu --quick   # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def timed(torch, device, fn, repeats):
    """Median wall time of ``fn`` over ``repeats`` runs, synchronizing the device."""
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def gemm_rate(torch, device, dtype, size=4096):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(torch, device, lambda: a @ b, 5)
    return 2 * size**3 / seconds


def correctness(torch, device, quick):
    from dynattn import DynamicAttention

    rows = []
    sizes = (64, 96, 16) if quick else (512, 640, 64)
    n, m, d = sizes
    for dtype in (torch.float32, torch.float64):
        for storage in ("dense", "implicit"):
            g = torch.Generator(device="cpu").manual_seed(0)
            Q, K, V = (torch.randn(4, n if i == 0 else m, d, generator=g).to(device, dtype) for i in range(3))
            att = DynamicAttention(Q, K, V, tau=0.5, scale=d**-0.5, storage=storage)
            K, V = K.clone(), V.clone()
            for step in range(200):
                h, c, j = step % 4, (7 * step) % m, step % d
                att.update_k(c, j, 0.3, head=h)
                K[h, c, j] += 0.3
                if step % 10 == 0:
                    k, v = (
                        torch.randn(4, d, generator=g).to(device, dtype),
                        torch.randn(4, d, generator=g).to(device, dtype),
                    )
                    att.set_token(c, k=k, v=v)
                    K[:, c], V[:, c] = k, v
            reference = torch.nn.functional.scaled_dot_product_attention(
                Q.double(), K.double(), V.double(), scale=d**-0.5
            )
            err = (att.output().double() - reference).abs().amax(dim=-2) / V.double().abs().amax(dim=-2)
            rows.append(
                {
                    "dtype": str(dtype),
                    "storage": storage,
                    "worst_error": float(err.max()),
                    "target": 1e-4 if dtype == torch.float32 else 1e-10,
                }
            )
    return rows


def llm_speed(torch, device, head_dim, n, repeats, quick):
    from dynattn import DynamicAttention

    heads = 8
    dtype = torch.float32
    g = torch.Generator(device="cpu").manual_seed(1)
    Q, K, V = (torch.randn(heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    scale = head_dim**-0.5
    att = DynamicAttention(Q, K, V, tau=0.5, scale=scale)
    edits = [
        (
            int(c),
            torch.randn(heads, head_dim, generator=g).to(device, dtype),
            torch.randn(heads, head_dim, generator=g).to(device, dtype),
        )
        for c in torch.randint(n, (4 * att.threshold,), generator=g)
    ]
    queries = torch.randint(n, (len(edits), 4), generator=g).tolist()

    def ours():
        for (c, k, v), rows in zip(edits, queries, strict=True):
            att.set_token(c, k=k, v=v)
            att.query_rows(rows)

    K2, V2 = K.clone(), V.clone()

    def sdpa():
        for (c, k, v), rows in zip(edits[:8], queries[:8], strict=True):
            K2[:, c], V2[:, c] = k, v
            out = torch.nn.functional.scaled_dot_product_attention(Q, K2, V2, scale=scale)
            out[:, rows].clone()

    def ondemand():
        for (c, k, v), rows in zip(edits[:64], queries[:64], strict=True):
            K2[:, c], V2[:, c] = k, v
            torch.nn.functional.scaled_dot_product_attention(Q[:, rows], K2, V2, scale=scale)

    ours_s = timed(torch, device, ours, repeats) / len(edits)
    sdpa_s = timed(torch, device, sdpa, repeats) / 8
    ondemand_s = timed(torch, device, ondemand, repeats) / 64
    return {
        "regime": "llm",
        "n": n,
        "d": head_dim,
        "heads": heads,
        "storage": att.storage,
        "edit_plus_4_rows_s": ours_s,
        "sdpa_recompute_s": sdpa_s,
        "ondemand_rows_s": ondemand_s,
        "ratio_sdpa": sdpa_s / ours_s,
        "ratio_ondemand": ondemand_s / ours_s,
        "query_fallbacks": att.stats["query_fallbacks"],
    }


def paper_speed(torch, device, n, repeats, rate):
    from dynattn import DynamicAttention
    from dynattn.baselines import Eager

    dtype = torch.float32
    g = torch.Generator(device="cpu").manual_seed(2)
    Q, K, V = (torch.randn(n, n, generator=g).to(device, dtype) / n**0.25 for _ in range(3))
    att = DynamicAttention(Q, K, V, tau=1.0, storage="dense")
    eager = Eager(Q, K, V, storage="dense")
    T = att.threshold
    updates = [
        (int(i), int(j), float(x))
        for i, j, x in zip(
            torch.randint(n, (2 * T,), generator=g),
            torch.randint(n, (2 * T,), generator=g),
            torch.randn(2 * T, generator=g) * 0.1,
            strict=False,
        )
    ]

    def ours():
        for i, j, x in updates:
            att.update_k(i, j, x)
        att.rebuild()

    def eager_updates():
        for i, j, x in updates[:32]:
            eager.update_k(i, j, x)

    update_s = timed(torch, device, ours, repeats) / len(updates)
    eager_s = timed(torch, device, eager_updates, repeats) / 32
    # the fold alone: T pending rows
    for i, j, x in updates[:T]:
        att.update_k(i, j, x)
    fold_s = timed(torch, device, att.rebuild, 1)
    for i, j, x in updates[: T // 2]:
        att.update_k(i, j, x)
    probes = torch.randint(n, (200, 2), generator=g).tolist()
    query_s = timed(torch, device, lambda: [att.query(i, j) for i, j in probes], repeats) / len(probes)
    K2 = K.clone()

    def recompute():
        K2[0, 0] += 0.1
        torch.softmax(Q @ K2.T, dim=-1) @ V

    recompute_s = timed(torch, device, recompute, repeats)
    fold_flops = 2 * n * n * T
    return {
        "regime": "paper",
        "n": n,
        "tau": 1.0,
        "update_s": update_s,
        "eager_s": eager_s,
        "recompute_s": recompute_s,
        "query_s": query_s,
        "ratio_eager": eager_s / update_s,
        "ratio_recompute": recompute_s / update_s,
        "fold_tflops": fold_flops / fold_s / 1e12,
        "fold_fraction_of_gemm": fold_flops / fold_s / rate,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for a smoke run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rate32 = gemm_rate(torch, device, torch.float32, 1024 if args.quick else 8192)
    result = {
        "device": name,
        "torch": torch.__version__,
        "gemm_tflops_fp32": rate32 / 1e12,
        "correctness": correctness(torch, device, args.quick),
    }
    print(f"device: {name}, fp32 GEMM {rate32 / 1e12:.2f} TFLOP/s")
    for row in result["correctness"]:
        status = "ok" if row["worst_error"] <= row["target"] else "FAIL"
        print(
            f"  correctness {row['dtype']:14} {row['storage']:8} worst {row['worst_error']:.2e} "
            f"(target {row['target']:.0e}) {status}"
        )
    sizes = [(2048, (64,))] if args.quick else [(16384, (64, 128))]
    result["llm"] = [
        llm_speed(torch, device, hd, n, args.repeats, args.quick) for n, dims in sizes for hd in dims
    ]
    for row in result["llm"]:
        print(
            f"  llm n={row['n']} d={row['d']}: edit+4 rows {row['edit_plus_4_rows_s'] * 1e3:.3f} ms, "
            f"SDPA recompute {row['ratio_sdpa']:.1f}x slower, on-demand rows {row['ratio_ondemand']:.1f}x"
        )
    paper_n = 512 if args.quick else 4096
    result["paper"] = paper_speed(torch, device, paper_n, args.repeats, rate32)
    p = result["paper"]
    print(
        f"  paper n={paper_n}: update {p['update_s'] * 1e6:.1f} us (eager {p['ratio_eager']:.1f}x, "
        f"recompute {p['ratio_recompute']:.0f}x slower), query {p['query_s'] * 1e6:.1f} us, "
        f"fold {p['fold_tflops']:.2f} TFLOP/s = {p['fold_fraction_of_gemm']:.0%} of GEMM"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    ok = all(row["worst_error"] <= row["target"] for row in result["correctness"])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
