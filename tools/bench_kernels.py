#!/usr/bin/env python
"""Kernel benchmark: routing and local attention by the Pallas kernels, the XLA path and
dense cuDNN attention, forward + backward, in bfloat16. Meant for a GPU (on a TPU, pass
`--impls pallas_tpu,xla,dense`).

    python tools/bench_kernels.py [--lengths 4096,16384,65536] [--head-dims 64,128]
        [--impls pallas_gpu,xla,dense] [--ops routing-balanced,routing-causal,local]
        [--heads 8] [--window 128] [--reps 10] [--out bench-kernels]

For every (sequence length n, head dim d, implementation) it times one jitted
forward + backward of each op over [batch 1, n, heads, d] inputs:

- `routing-balanced` / `routing-causal`: `rtlib.routing_attention` (shared QK, n / window
  clusters, cluster size `window`) with `implementation=<impl>`; the time includes routing
  (centroid scores, top-k or sort) as a model would pay it;
- `local`: `rtlib.local_attention` (blocks of `window`, one block of look-back);
- `dense`: `jax.nn.dot_product_attention(is_causal=True)` (cuDNN on GPU; the XLA kernel
  elsewhere), the O(n^2) baseline.

Output: one JSON object on stdout and, under --out, results.json and results.md. Each row:
  op, impl, n, head_dim, ms (median of --reps timed calls after one compiling call),
  tflops (achieved: attention FLOPs / time), peak_mib (the compiled step's argument + output +
  temporary memory, from XLA's memory analysis), flops (the count used), error (when a point
  could not run, e.g. no kernel for the shapes: the dispatcher's reason).
FLOPs are a nominal count (not the tiles a kernel computes or skips), with
forward + backward = 3.5 x forward (FlashAttention's convention): per head, forward =
4 n d x keys per query (window for balanced routing, 2 x window for causal routing and local,
n / 2 for dense causal).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import rtlib
from rtlib.routing import normalize

OPS = ("routing-balanced", "routing-causal", "local", "dense")


def keys_per_query(op: str, n: int, window: int) -> float:
    return {"routing-balanced": window, "routing-causal": 2 * window, "local": 2 * window,
            "dense": n / 2}[op]


def make_step(op: str, impl: str, *, n: int, d: int, heads: int, window: int):
    """A jitted forward + backward of one op, and its inputs."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (1, n, heads, d), jnp.bfloat16) for kk in keys[:3])
    mu = normalize(jax.random.normal(keys[3], (heads, max(1, n // window), d)), "layernorm")
    if op == "dense":
        dense_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
        fn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, implementation=dense_impl)
    elif op == "local":
        fn = lambda q, k, v: rtlib.local_attention(  # noqa: E731
            q, k, v, window=window, look_back=1, implementation=impl)
    else:
        assignment = op.split("-")[1]
        fn = lambda q, k, v: rtlib.routing_attention(  # noqa: E731
            q, None, v, mu, window=window, assignment=assignment, implementation=impl)[0]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), (q, k, v)


def measure(op: str, impl: str, *, n: int, d: int, heads: int, window: int, reps: int) -> dict:
    dense_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    row = {"op": op, "impl": dense_impl if op == "dense" else impl, "n": n, "head_dim": d}
    flops = 3.5 * heads * 4 * n * d * keys_per_query(op, n, window)
    try:
        step, args = make_step(op, impl, n=n, d=d, heads=heads, window=window)
        compiled = step.lower(*args).compile()
        mem = compiled.memory_analysis()
        peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes)
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t)
        ms = sorted(times)[len(times) // 2] * 1e3
    except Exception as e:  # a point that cannot run is reported, not fatal
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {**row, "ms": round(ms, 3), "tflops": round(flops / (ms * 1e-3) / 1e12, 2),
            "peak_mib": None if peak is None else round(peak / 2**20, 1), "flops": flops}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}; jax {jax.__version__}", "",
             "| op | impl | n | head_dim | ms | TFLOP/s | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['n']} | {r['head_dim']} | "
                         f"not run: {r['error']} | | |")
        else:
            lines.append(f"| {r['op']} | {r['impl']} | {r['n']} | {r['head_dim']} | {r['ms']} | "
                         f"{r['tflops']} | {r['peak_mib']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--impls", default="pallas_gpu,xla,dense",
                    help="kernel implementations to compare (and `dense` for the baseline)")
    ap.add_argument("--ops", default=",".join(OPS[:3]))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="bench-kernels")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    device = str(jax.devices()[0].device_kind)
    rows = []
    for n in map(int, args.lengths.split(",")):
        for d in map(int, args.head_dims.split(",")):
            points = [(op, impl) for op in args.ops.split(",") for impl in impls
                      if impl != "dense"]
            if "dense" in impls:
                points.append(("dense", "dense"))
            for op, impl in points:
                row = measure(op, impl, n=n, d=d, heads=args.heads, window=args.window,
                              reps=args.reps)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)  # progress
    result = {"device": device, "jax": jax.__version__, "heads": args.heads,
              "window": args.window, "dtype": "bfloat16", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(rows, device))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
