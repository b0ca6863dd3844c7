#!/usr/bin/env python
"""CPU benchmarks: attention scaling, the bench-4k training step, and the PyTorch peer.

    python tools/bench.py [--out bench-out] [--lengths 1024,2048,...,65536] [--steps 10]
                          [--train-lengths 4096,16384,32768] [--parts attention,train,peer]

(a) attention: one layer's forward + backward (8 heads of 64, batch 1) against sequence length
    for routing-balanced, routing-causal (cluster size 128, n / 128 clusters, shared QK), local
    (blocks of 128, one block of look-back) and dense causal `jax.nn.dot_product_attention`;
    median wall time, peak RSS, and the exponent of time in n fitted from 4k up;
(b) train: the training step of specs/bench-4k.yaml at each of --train-lengths
    (`model.seq_len` n, n / 128 clusters): tokens/s, peak RSS, and the step's f32 matmul floor
    (its dense-product FLOPs, forward and backward, over the GFLOP/s of a [4096, 512] x
    [512, 2048] float32 product measured in the same process);
(c) peer: lucidrains' routing-transformer 1.6.1 at the same configuration and length
    (`max_seq_len=n`; `pip install -e ".[bench]"`), right after (b) at each length.

Every measurement runs in its own process, so each peak RSS is that measurement's alone. Prints
one JSON object to stdout; writes results.json, results.md, scaling.png and
train-lengths.png to --out. Dense
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


def length_overrides(n: int) -> list[str]:
    """bench-4k at sequence length n: one cluster per 128 tokens, as the peer's
    `max_seq_len / window_size`."""
    return [f"model.seq_len={n}", f"model.attention.heads.0.clusters={max(n // WINDOW, 1)}"]


def matmul_gflops(seconds: float = 2.0) -> float:
    """GFLOP/s of a representative float32 product of the step, [4096, 512] x [512, 2048]
    (the feed-forward's), by XLA on this machine now."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (4096, 512), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (512, 2048), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * 4096 * 512 * 2048 / _time(lambda: f(a, b).block_until_ready(),
                                         min_seconds=seconds) / 1e9


def worker_train(steps: int, n: int = 4096, overrides: tuple[str, ...] = ()) -> dict:
    import jax
    import numpy as np

    from rtlib.costs import estimate_costs
    from rtlib.parallel import single_device_mesh
    from rtlib.spec import load_spec
    from rtlib.train.step import init_sharded, train_step_for

    spec = load_spec(ROOT / "specs" / "bench-4k.yaml",
                     ["mesh.data=1", *length_overrides(n), *overrides])
    mesh = single_device_mesh()
    ts = init_sharded(spec, mesh, key=jax.random.key(0))
    step = train_step_for(spec, mesh)
    b = spec.train.batch_size
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
    # The floor: the step's dense products (projections, feed-forward, output; forward and
    # the two backward products, so 3x the forward's) at the measured product speed.
    dense_flops = 3 * estimate_costs(spec.model).flops_per_token["rest"] * b * n
    gflops = matmul_gflops()
    return {"part": "train", "impl": "rtlib", "n": n, "s_per_step": seconds,
            "tokens_per_s": b * n / seconds, "compile_s": compile_s,
            "peak_rss_mb": _rss_mb(), "loss": float(m["loss"]), "overrides": list(overrides),
            "dense_gflop": dense_flops / 1e9, "matmul_gflops": gflops,
            "floor_s": dense_flops / 1e9 / gflops}


def worker_peer(steps: int, n: int = 4096) -> dict:
    import torch
    from routing_transformer import RoutingTransformerLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = RoutingTransformerLM(num_tokens=256, dim=512, depth=2, heads=8, window_size=128,
                                 max_seq_len=n, causal=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.randint(0, 256, (2, 1, n + 1))
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
            "n": n, "s_per_step": seconds, "tokens_per_s": n / seconds,
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
    ratios = results.get("ratios", [])
    if ratios:
        out += ["### Training step of bench-4k against sequence length (batch 1, one process "
                "per point)", "",
                "| n | rtlib tok/s | peer tok/s | tok/s ratio | rtlib RSS MB | peer RSS MB "
                "| RSS ratio | rtlib s/step | f32 matmul floor s | step / floor |",
                "|---" * 10 + "|"]
        for r in ratios:
            out.append("| " + " | ".join(_cell(r.get(k), f) for k, f in (
                ("n", ",.0f"), ("rtlib_tokens_per_s", ",.0f"), ("peer_tokens_per_s", ",.0f"),
                ("tokens_ratio", ".2f"), ("rtlib_rss_mb", ",.0f"), ("peer_rss_mb", ",.0f"),
                ("rss_ratio", ".2f"), ("rtlib_s_per_step", ".3f"), ("floor_s", ".3f"),
                ("step_over_floor", ".2f"))) + " |")
        errors = [f"{r['impl']} n={r['n']}: {r['error']}" for r in results.get("train", [])
                  if "error" in r]
        overrides = sorted({" ".join(r.get("overrides", [])) for r in results.get("train", [])
                            if r.get("overrides")})
        out += [""] + [f"- rtlib with `{o}`" for o in overrides] + [f"- {e}" for e in errors]
    return "\n".join(out) + "\n"


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def train_ratios(rows: list[dict]) -> list[dict]:
    """Per length: both sides' figures, rtlib / peer ratios, and rtlib's step against its f32
    matmul floor (what is missing stays None)."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        mine = next((r for r in rows if r["n"] == n and r["impl"] == "rtlib"
                     and "error" not in r), None)
        peer = next((r for r in rows if r["n"] == n and r["impl"] != "rtlib"
                     and "error" not in r), None)
        row = {"n": n}
        if mine:
            row.update(rtlib_tokens_per_s=mine["tokens_per_s"], rtlib_rss_mb=mine["peak_rss_mb"],
                       rtlib_s_per_step=mine["s_per_step"], floor_s=mine["floor_s"],
                       step_over_floor=mine["s_per_step"] / mine["floor_s"])
        if peer:
            row.update(peer_tokens_per_s=peer["tokens_per_s"], peer_rss_mb=peer["peak_rss_mb"])
        if mine and peer:
            row.update(tokens_ratio=mine["tokens_per_s"] / peer["tokens_per_s"],
                       rss_ratio=mine["peak_rss_mb"] / peer["peak_rss_mb"])
        out.append(row)
    return out


def _plot_train(ratios: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label in (("rtlib_tokens_per_s", "rtlib"), ("peer_tokens_per_s",
                                                         "routing-transformer (PyTorch)")):
        pts = [(r["n"], r[key]) for r in ratios if r.get(key)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    floor = [(r["n"], r["n"] / r["floor_s"]) for r in ratios if r.get("floor_s")]
    if floor:
        ax.plot(*zip(*floor, strict=True), ls="--", color="grey", label="rtlib f32 matmul floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("training tokens/s")
    ax.set_title("bench-4k training step, batch 1, 2 CPU cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    parser.add_argument("--train-lengths", default="4096,16384,32768",
                        help="sequence lengths of the training-step comparison")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for rtlib's training step (repeatable), e.g. "
                        "model.remat=true")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        what = args.worker[0]
        if what == "attention":
            result = worker_attention(args.worker[1], int(args.worker[2]))
        elif what == "train":
            result = worker_train(int(args.worker[1]), int(args.worker[2]), args.worker[3:])
        else:
            result = worker_peer(int(args.worker[1]), int(args.worker[2]))
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
    rows = []
    for n in [int(x) for x in args.train_lengths.split(",")]:
        # Side by side at each length, each in its own process: rtlib, then the peer.
        for part, impl in (("train", "rtlib"), ("peer", "routing-transformer")):
            if part not in parts:
                continue
            extra = args.set if part == "train" else []
            r = {"impl": impl, "n": n, **_run_worker([part, str(args.steps), str(n), *extra],
                                                     args.timeout)}
            rows.append(r)
            log(f"{part} {impl} n={n}: " + (r["error"] if "error" in r else
                f"{r['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_mb']:,.0f} MB"))
    if rows:
        results["train"] = rows
        results["ratios"] = train_ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    if results.get("attention"):
        _plot(results, out / "scaling.png")
    if results.get("ratios"):
        _plot_train(results["ratios"], out / "train-lengths.png")
    print(json.dumps(results))
    log(f"wrote results.json, results.md and plots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
