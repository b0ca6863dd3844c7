#!/usr/bin/env python
"""CPU benchmarks: attention scaling, the bench-4k training step, and the PyTorch peer.

    python tools/bench.py [--out bench-out] [--lengths 1024,2048,...,65536] [--steps 10]
                          [--skip-peer] [--parts attention,train,peer]

(a) attention: one layer's forward + backward (8 heads of 64, batch 1) against sequence length
    for routing-balanced, routing-causal (cluster size 128, n / 128 clusters, shared QK), local
    (blocks of 128, one block of look-back) and dense causal `jax.nn.dot_product_attention`;
    median wall time, peak RSS, and the exponent of time in n fitted from 4k up;
(b) train: the training step of specs/bench-4k.yaml (tokens/s, peak RSS);
(c) peer: lucidrains' routing-transformer 1.6.1 at the same configuration
    (`pip install -e ".[bench]"`), and the ratio to (b).

Every measurement runs in its own process, so each peak RSS is that measurement's alone. Prints
one JSON object to stdout; writes results.json, results.md and scaling.png to --out. Dense
attention whose logits would not fit in memory runs query-chunked (the same FLOPs, logits one
chunk at a time) and is marked so.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM, WINDOW = 8, 64, 128
KINDS = ("routing-balanced", "routing-causal", "local", "dense")
CHUNK = 1024  # query chunk of dense attention past the memory limit


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, *, min_reps: int = 3, min_seconds: float = 2.0) -> float:
    """Median wall time of fn() (already compiled), over at least min_reps calls."""
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and
                                    len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if times[0] > 20:  # minutes-long points: one timed call after the compiling one
            break
    times.sort()
    return times[len(times) // 2]


def _dense_fits(n: int) -> bool:
    """Whether materialised float32 logits (forward + backward keep about three copies) fit in
    half of this machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 3 * HEADS * n * n * 4 < total / 2


def worker_attention(kind: str, n: int) -> dict:
    import jax
    import jax.numpy as jnp

    import rtlib

    keys = jax.random.split(jax.random.key(0), 5)
    shape = (1, n, HEADS, HEAD_DIM)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in keys[:4])
    centroids = jax.random.normal(keys[4], (HEADS, max(n // WINDOW, 1), HEAD_DIM))
    chunked = False
    if kind.startswith("routing"):
        assignment = kind.split("-")[1]

        def attend(q, k, v):
            return rtlib.routing_attention(q, None, v, centroids, window=WINDOW,
                                           assignment=assignment, causal=True)[0]
    elif kind == "local":
        def attend(q, k, v):
            return rtlib.local_attention(q, k, v, window=WINDOW, causal=True, look_back=1)
    elif _dense_fits(n):
        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
        chunked = True

        def attend(q, k, v):
            # Queries in chunks against every key, causal by position; the logits of one chunk
            # exist at a time (recomputed in the backward pass).
            @jax.checkpoint
            def chunk(i):
                qc = jax.lax.dynamic_slice_in_dim(q, i * CHUNK, CHUNK, axis=1)
                s = jnp.einsum("bqhd,bkhd->bhqk", qc, k) * HEAD_DIM**-0.5
                pos = i * CHUNK + jnp.arange(CHUNK)
                s = jnp.where(pos[:, None] >= jnp.arange(n)[None, :], s, -jnp.inf)
                return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

            out = jax.lax.map(chunk, jnp.arange(n // CHUNK))  # [chunks, b, CHUNK, h, d]
            return out.transpose(1, 0, 2, 3, 4).reshape(q.shape)

    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * ct), argnums=(0, 1, 2)))
    base = _rss_mb()
    t = time.perf_counter()
    jax.block_until_ready(grad(q, k, v))
    compile_s = time.perf_counter() - t
    seconds = _time(lambda: jax.block_until_ready(grad(q, k, v)))
    return {"part": "attention", "kind": kind, "n": n, "ms": 1e3 * seconds,
            "compile_s": compile_s, "peak_rss_mb": _rss_mb(), "rss_before_mb": base,
            "chunked": chunked}


def worker_train(steps: int) -> dict:
    import jax
    import numpy as np

    from rtlib.parallel import single_device_mesh
    from rtlib.spec import load_spec
    from rtlib.train.step import init_sharded, train_step_for

    spec = load_spec(ROOT / "specs" / "bench-4k.yaml", ["mesh.data=1"])
    mesh = single_device_mesh()
    ts = init_sharded(spec, mesh, key=jax.random.key(0))
    step = train_step_for(spec, mesh)
    b, n = spec.train.batch_size, spec.model.seq_len
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, 256, (b, n + 1)).astype(np.int32))
               for _ in range(2)]
    t = time.perf_counter()
    ts, m = step(batches[0], ts)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for i in range(steps):
        t = time.perf_counter()
        ts, m = step(batches[i % 2], ts)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    times.sort()
    seconds = times[len(times) // 2]
    return {"part": "train", "impl": "rtlib", "s_per_step": seconds, "tokens_per_s": b * n /
            seconds, "compile_s": compile_s, "peak_rss_mb": _rss_mb(),
            "loss": float(m["loss"])}


def worker_peer(steps: int) -> dict:
    import torch
    from routing_transformer import RoutingTransformerLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = RoutingTransformerLM(num_tokens=256, dim=512, depth=2, heads=8, window_size=128,
                                 max_seq_len=4096, causal=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.randint(0, 256, (2, 1, 4097))
    times = []
    for i in range(steps + 1):
        x = data[i % 2]
        t = time.perf_counter()
        out = model(x[:, :-1])
        logits, aux = out if isinstance(out, tuple) else (out, 0.0)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256),
                                                 x[:, 1:].reshape(-1)) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])  # the first step allocates and warms up
    seconds = times[len(times) // 2]
    return {"part": "peer", "impl": f"routing-transformer (torch {torch.__version__})",
            "s_per_step": seconds, "tokens_per_s": 4096 / seconds,
            "peak_rss_mb": _rss_mb(), "loss": float(loss)}


def _run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0]
        return {"error": f"exit {proc.returncode}: {why}"}
    return json.loads(lines[-1])


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(n)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def _markdown(results: dict) -> str:
    out = []
    att = results.get("attention", [])
    if att:
        lengths = sorted({r["n"] for r in att})
        out += ["### Attention layer, forward + backward (ms; peak RSS MB)", "",
                "| n | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
        for n in lengths:
            cells = []
            for kind in KINDS:
                r = next((r for r in att if r["n"] == n and r["kind"] == kind), None)
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append(r["error"][:40])
                else:
                    star = "*" if r.get("chunked") else ""
                    cells.append(f"{r['ms']:,.1f}{star} ({r['peak_rss_mb']:,.0f})")
            out.append(f"| {n:,} | " + " | ".join(cells) + " |")
        out += ["", "\\* dense run query-chunked (logits one 1,024-query chunk at a time): "
                "materialised logits would not fit in memory.", ""]
        out += ["| kind | exponent of time in n, 4k and up |", "|---|---|"]
        for kind, e in results.get("exponents", {}).items():
            out.append(f"| {kind} | {'' if e is None else f'{e:.2f}'} |")
        for key, value in results.get("speedups", {}).items():
            out.append(f"\n{key}: {value}")
        out.append("")
    rows = [results[k] for k in ("train", "peer") if k in results]
    if rows:
        out += ["### Training step, bench-4k (batch 1 x 4,096 tokens)", "",
                "| implementation | s/step | tokens/s | peak RSS MB |", "|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r.get('impl', '?')} | {r['error']} | | |")
            else:
                out.append(f"| {r['impl']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} "
                           f"| {r['peak_rss_mb']:,.0f} |")
        if "ratio" in results:
            out.append(f"\nrtlib / peer tokens/s: {results['ratio']['tokens_per_s']:.2f}x; "
                       f"peak RSS: {results['ratio']['peak_rss']:.2f}x")
    return "\n".join(out) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind in KINDS:
        pts = sorted((r["n"], r["ms"]) for r in results.get("attention", [])
                     if r["kind"] == kind and "error" not in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"{HEADS} heads x {HEAD_DIM}, batch 1, cluster / block {WINDOW}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out", help="folder for results.json/.md/.png")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--parts", default="attention,train,peer")
    parser.add_argument("--dense-max", type=int, default=32768, help="longest sequence for "
                        "dense attention (its time grows as n^2; timings in docs/performance.md)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        what = args.worker[0]
        if what == "attention":
            result = worker_attention(args.worker[1], int(args.worker[2]))
        elif what == "train":
            result = worker_train(int(args.worker[1]))
        else:
            result = worker_peer(int(args.worker[1]))
        print(json.dumps(result))
        return 0

    parts = set(args.parts.split(","))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        import jax

        results["machine"]["jax"] = jax.__version__
    except ImportError:
        pass
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if "attention" in parts:
        att = []
        for n in [int(x) for x in args.lengths.split(",")]:
            for kind in args.kinds.split(","):
                if kind == "dense" and n > args.dense_max:
                    continue
                r = {"kind": kind, "n": n, **_run_worker(["attention", kind, str(n)],
                                                         args.timeout)}
                att.append(r)
                log(f"attention {kind:>16} n={n:>6}: " + (r["error"] if "error" in r else
                    f"{r['ms']:9.1f} ms, peak RSS {r['peak_rss_mb']:7.0f} MB"))
        results["attention"] = att
        results["exponents"] = {
            kind: fit_exponent([(r["n"], r["ms"]) for r in att if r["kind"] == kind and
                                r["n"] >= 4096 and "error" not in r]) for kind in KINDS}
        speed = {}
        for n in (8192, 16384, 32768, 65536):
            dense = next((r for r in att if r["n"] == n and r["kind"] == "dense" and
                          "error" not in r), None)
            for kind in ("routing-balanced", "routing-causal"):
                r = next((r for r in att if r["n"] == n and r["kind"] == kind and
                          "error" not in r), None)
                if dense and r:
                    speed[f"dense / {kind} at n={n}"] = f"{dense['ms'] / r['ms']:.1f}x"
        results["speedups"] = speed
    if "train" in parts:
        results["train"] = {"impl": "rtlib", **_run_worker(["train", str(args.steps)],
                                                           args.timeout)}
        log(f"train rtlib: {results['train']}")
    if "peer" in parts:
        results["peer"] = {"impl": "routing-transformer", **_run_worker(
            ["peer", str(args.steps)], args.timeout)}
        log(f"train peer: {results['peer']}")
    t, p = results.get("train", {}), results.get("peer", {})
    if "tokens_per_s" in t and "tokens_per_s" in p:
        results["ratio"] = {"tokens_per_s": t["tokens_per_s"] / p["tokens_per_s"],
                            "peak_rss": t["peak_rss_mb"] / p["peak_rss_mb"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    if results.get("attention"):
        _plot(results, out / "scaling.png")
    print(json.dumps(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f", {out / 'scaling.png'}" if results.get("attention") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
