#!/usr/bin/env python
"""Per-step time of one spec on one device and on meshes of fake CPU devices, in one process.

    python tools/bench_parallel.py [--spec specs/tiny.yaml] [--devices 8] [--steps 20]
        [key=value ...]

On a CPU the fake devices share the same cores, so this measures the overhead of partitioning
(collectives, resharding, smaller per-device kernels), not a speed-up. Prints one JSON object
per mesh and a Markdown table; ratios are against the one-device row of the same run.
"""

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="specs/tiny.yaml")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mesh")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import numpy as np

    from rtlib.parallel import from_global, make_mesh
    from rtlib.parallel.rules import batch_sharding
    from rtlib.spec import load_spec
    from rtlib.train.step import init_sharded, train_step_for

    d = args.devices
    meshes = {"1 device": ["mesh.data=1"], f"data={d}": [f"mesh.data={d}"],
              f"data={d // 2} x model=2": [f"mesh.data={d // 2}", "mesh.model=2"],
              f"data=2 x fsdp={d // 2}": ["mesh.data=2", f"mesh.fsdp={d // 2}"]}
    rows = []
    for name, mesh_over in meshes.items():
        spec = load_spec(args.spec, [*args.overrides, "model.routing.init=random", *mesh_over])
        mesh = make_mesh(spec)
        b, n = spec.train.batch_size, spec.model.seq_len
        batch = np.random.default_rng(0).integers(0, 256, (b, n + 1)).astype(np.int32)
        tokens = from_global(batch, batch_sharding(mesh, spec.mesh.rules))
        ts = init_sharded(spec, mesh, key=jax.random.key(0))
        step = train_step_for(spec, mesh)
        t0 = time.perf_counter()
        ts, m = step(tokens, ts)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            ts, m = step(tokens, ts)
        jax.block_until_ready(m)
        per_step = (time.perf_counter() - t0) / args.steps
        rows.append({"mesh": name, "devices": mesh.size, "first_step_s": round(first, 2),
                     "step_ms": round(1e3 * per_step, 2),
                     "tokens_per_s": round(b * n / per_step)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["step_ms"]
    print(f"\n{args.spec}, batch {spec.train.batch_size} x {spec.model.seq_len}, "
          f"{args.steps} steps per mesh, jax {jax.__version__}, {os.cpu_count()} CPU cores\n")
    print("| mesh | devices | first step (compile) | ms/step | vs 1 device |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['devices']} | {r['first_step_s']} s | {r['step_ms']} | "
              f"{r['step_ms'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
