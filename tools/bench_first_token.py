"""First-token latency of `rtlib generate`: a whole process (imports, restore, compilation,
one token), with the persistent compilation cache off, then on for a first (cold) and a second
(warm) call. Each figure is the median of --repeats processes.

    python tools/bench_first_token.py runs/demo [--prompt "def "] [--repeats 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def one_call(run_dir: str, prompt: str, cache: str) -> float:
    env = {**os.environ, "RTLIB_COMPILE_CACHE": cache}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rtlib", "generate", run_dir, "--prompt", prompt,
                    "--max-new-tokens", "1", "--temperature", "0"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    off, cold, warm = [], [], []
    for _ in range(args.repeats):
        off.append(one_call(args.run_dir, args.prompt, "off"))
        with tempfile.TemporaryDirectory() as cache:  # a fresh cache: first call, then second
            cold.append(one_call(args.run_dir, args.prompt, cache))
            warm.append(one_call(args.run_dir, args.prompt, cache))
    print(f"{'call':<28}{'median s':>10}  all")
    for name, times in [("cache off", off), ("cache on, first call", cold),
                        ("cache on, second call", warm)]:
        print(f"{name:<28}{statistics.median(times):>10.2f}  "
              + " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
