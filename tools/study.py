"""Routing vs local vs full attention at equal size: a reproducible study.

Every arm of a task shares its layers, d_model, head count and head size and differs only in
what its attention heads see:
  local             every head local (blocked, one block of look-back)
  routing-balanced  half the heads local, half routing with balanced assignment (the paper's)
  routing-causal    half local, half routing with strictly causal assignment
  full              half local, half full attention (the upper reference)
The specs under specs/study/ are generated from the tables below (`--write-specs`; a test keeps
them in sync), so the arms cannot drift apart by hand edits.

    python tools/study.py --quick --out runs/study-quick     # <= 15 minutes on 2 cores
    python tools/study.py --out runs/study                   # the default study, <= 2 hours

Those budgets are without the images task (`--tasks text,copy` and `text,copy,recall`): it adds
about an hour to either (its quick runs took 66 minutes on a shared 2-core machine; its default
is estimated from their step times).

writes OUT/results.json (one row per task, arm, seed and metric), OUT/curves.json (validation
curves against steps and training seconds), and the report (`--report`, default
docs/study.md, with its plots beside it). Runs are ordinary `rtlib train` run directories under
OUT/runs/; a run already complete is reused, so an interrupted study resumes where it stopped.
Balanced-routing arms get a causality audit (`rtlib.runs.evaluate.causality_audit`): the same
targets scored by the full pass and by a strictly causal pass.
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs" / "study"

HEADS, HEAD_DIM = 4, 16
ARMS = ("local", "routing-balanced", "routing-causal", "full")

# The smoke budget's tiny shapes (the suite runs it): 2 steps at sequence 64.
SMOKE = {"steps": 2, "eval_every": 1, "seeds": [0], "test_tokens": 512,
         "geometry": {"seq_len": 64, "local_window": 16, "routing": {"clusters": 2, "window": 32}}}


def _synthetic(task: str, about: str, *, vocab: int, options: list[str], quick: dict | None,
               default: dict) -> dict:
    """A `rtlib data synth` task at sequence 256: 2 layers, answers beyond the local field."""
    store = f"data/study/{task}"
    return {
        "about": about, "store": store,
        "make_store": ["data", "synth", task, store, "--length", "257", *options, "--train",
                       "16384", "--valid", "256", "--test", "512"],
        "metric": "answer_accuracy", "better": "higher",
        "local_window": 16,
        "routing": {"clusters": 4, "window": 64},
        "spec": {
            "model": {"vocab_size": vocab, "seq_len": 256, "d_model": 64, "n_layers": 2,
                      "embedding": {"positions": "rotary"},
                      "feed_forward": {"hidden": 256, "activation": "gelu"},
                      "routing": {"init": "kmeans", "commitment": 1.0e-4, "ema_decay": 0.99}},
            "train": {"batch_size": 16, "lr": 3.0e-3, "warmup_steps": 100,
                      "schedule": "constant", "weight_decay": 0.01, "clip_norm": 1.0,
                      "loss_on": "answers"},
            "run": {"log_every": 1, "checkpoint_every": 0, "sample_tokens": 0},
            "data": {"path": store, "eval_tokens": 65536},
        },
        "budgets": {"smoke": SMOKE, "quick": quick, "default": default},
    }


def _images(size: int) -> dict:
    """`rtlib data synth shapes` images of size x size RGB, read image by image (sequence
    3 x size^2) with per-axis positions: local heads of one image row (and the row above)."""
    store, row = f"data/study/shapes{size}", 3 * size
    return {
        "about": f"{size}x{size} RGB images of mirrored shapes (`rtlib data synth shapes`): the "
                 "lower half repeats the upper half, up to a whole image back",
        "store": store,
        "make_store": ["data", "synth", "shapes", store, "--size", str(size)],
        "metric": "bits_per_dim", "better": "lower",
        "local_window": row,
        "routing": {"clusters": 4, "window": size * row // 4},
        "spec": {
            "model": {"vocab_size": 256, "seq_len": size * row, "d_model": 64, "n_layers": 2,
                      "embedding": {"positions": "axes", "axes": [size, size, 3]},
                      "feed_forward": {"hidden": 256, "activation": "gelu"},
                      "routing": {"init": "kmeans", "commitment": 1.0e-4, "ema_decay": 0.99}},
            "train": {"batch_size": 16, "lr": 3.0e-3, "warmup_steps": 30, "schedule": "cosine",
                      "weight_decay": 0.01, "clip_norm": 1.0},
            "run": {"log_every": 1, "checkpoint_every": 0, "sample_tokens": 0},
            "data": {"path": store, "eval_tokens": 64 * size * row},
        },
        "budgets": {
            # images of 8x8: the sequence (192) must be one image, so no generic geometry
            "smoke": {**SMOKE, "geometry": {"seq_len": 192, "axes": [8, 8, 3],
                                            "local_window": 24,
                                            "routing": {"clusters": 2, "window": 96}}},
            "quick": {"steps": 400, "eval_every": 100, "seeds": [0, 1],
                      "test_tokens": 256 * size * row},
            "default": {"steps": 1000, "eval_every": 200, "seeds": [0],
                        "test_tokens": 256 * size * row}},
    }


# Per task: the shared spec, the local window and routing geometry, the data, the metric, and
# how long each budget trains.
TASKS = {
    "text": {
        "about": "the embedded default corpus (the Python standard library's source, bytes)",
        "store": "data/stdlib",
        "make_store": ["data", "prepare", "default", "data/stdlib"],
        "metric": "bits_per_byte", "better": "lower",
        "local_window": 64,
        "routing": {"clusters": 8, "window": 256},
        "spec": {
            "model": {"vocab_size": 256, "seq_len": 2048, "d_model": 64, "n_layers": 2,
                      "embedding": {"positions": "rotary"},
                      "feed_forward": {"hidden": 256, "activation": "gelu"},
                      "routing": {"init": "kmeans", "commitment": 1.0e-4, "ema_decay": 0.99}},
            "train": {"batch_size": 4, "lr": 3.0e-3, "warmup_steps": 20, "schedule": "cosine",
                      "weight_decay": 0.01, "clip_norm": 1.0},
            "run": {"log_every": 1, "checkpoint_every": 0, "sample_tokens": 0},
            "data": {"path": "data/stdlib", "eval_tokens": 32768},
        },
        "budgets": {"smoke": SMOKE,
                    "quick": {"steps": 60, "eval_every": 20, "seeds": [0, 1],
                              "test_tokens": 65536},
                    "default": {"steps": 400, "eval_every": 100, "seeds": [0, 1, 2],
                                "test_tokens": 262144}},
    },
    "copy": _synthetic(
        "copy", "induction copy (`rtlib data synth copy`): a 32-token span recalled by "
        "content >= 97 tokens later", vocab=130,
        options=["--span", "32", "--min-gap", "64"],
        quick={"steps": 1000, "eval_every": 200, "seeds": [0], "test_tokens": 131072},
        default={"steps": 2000, "eval_every": 200, "seeds": [0, 1], "test_tokens": 131072}),
    "recall": _synthetic(
        "recall", "multi-query associative recall (`rtlib data synth recall`)", vocab=193,
        options=["--pairs", "16"],
        quick=None,  # no arm learns it in a quick budget (docs/study.md)
        default={"steps": 3000, "eval_every": 250, "seeds": [0], "test_tokens": 131072}),
    "images": _images(16),
}


def arm_heads(task: dict, arm: str) -> list[dict]:
    """The head groups of one arm (all arms: HEADS heads of HEAD_DIM per layer)."""
    local = {"kind": "local", "window": task["local_window"], "look_back": 1}
    if arm == "local":
        return [{**local, "count": HEADS}]
    half = [{**local, "count": HEADS // 2}]
    if arm == "full":
        return half + [{"kind": "full", "count": HEADS // 2}]
    # Unshared QK: a routing head then has the same projections as a local or full head, so
    # every arm has the same parameter count.
    return half + [{"kind": "routing", "count": HEADS // 2, **task["routing"],
                    "assignment": arm.removeprefix("routing-"), "shared_qk": False}]


def arm_spec(name: str, arm: str, geometry: dict | None = None) -> dict:
    """The spec of one arm; `geometry` replaces seq_len, local_window and routing (smoke), and
    the position axes of an image task."""
    task = {**TASKS[name], **{k: v for k, v in (geometry or {}).items() if k != "seq_len"}}
    spec = copy.deepcopy(task["spec"])
    if geometry:
        spec["model"]["seq_len"] = geometry["seq_len"]
        if "axes" in geometry:
            spec["model"]["embedding"]["axes"] = geometry["axes"]
    spec = {"name": f"study-{name}-{arm}",
            "description": f"tools/study.py: {task['about']}, arm {arm!r}.", **spec}
    spec["model"]["attention"] = {"head_dim": HEAD_DIM, "heads": arm_heads(task, arm)}
    spec["run"]["dir"] = f"runs/study/{name}-{arm}"
    return spec


def spec_text(name: str, arm: str, geometry: dict | None = None) -> str:
    header = ("# Generated by tools/study.py (`python tools/study.py --write-specs`): edit the "
              "tables there,\n# not this file; a test checks they agree.\n")
    return header + yaml.safe_dump(arm_spec(name, arm, geometry), sort_keys=False, width=100)


def spec_path(name: str, arm: str) -> Path:
    return SPECS / f"{name}-{arm}.yaml"


def write_specs() -> list[Path]:
    SPECS.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TASKS:
        for arm in ARMS:
            path = spec_path(name, arm)
            path.write_text(spec_text(name, arm))
            paths.append(path)
    return paths


def rtlib_cli(args: list[str], log: Path | None = None) -> float:
    """Run `rtlib ARGS` in a fresh process (its own memory and compile caches); seconds."""
    start = time.perf_counter()
    with open(log, "a") if log else open("/dev/null", "w") as out:
        done = subprocess.run([sys.executable, "-m", "rtlib.cli", *args], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"study: `rtlib {' '.join(args)}` failed with exit code "
                         f"{done.returncode}" + (f"; see {log}" if log else ""))
    return time.perf_counter() - start


def ensure_store(name: str, smoke_store: str | None) -> str:
    task = TASKS[name]
    if smoke_store is not None:
        return smoke_store
    if not (ROOT / task["store"] / "manifest.json").exists():
        print(f"study: making {task['store']}: rtlib {' '.join(task['make_store'])}", flush=True)
        rtlib_cli(task["make_store"])
    return task["store"]


def curves(records: list[dict]) -> list[dict]:
    """Validation points with the training seconds spent up to them (compile excluded)."""
    seconds, out = 0.0, []
    for r in records:
        if "split" not in r:
            seconds += r.get("step_s") or 0.0
        else:
            out.append({**r, "train_s": seconds})
    return out


def same_spec(recorded: dict, resolved: dict) -> bool:
    """Whether a finished run's recorded spec is the one asked for now. Keys the record lacks
    are spec fields added to rtlib after the run: they hold their defaults, which keep the old
    behaviour, so they do not make the run stale."""
    if not isinstance(recorded, dict) or not isinstance(resolved, dict):
        return recorded == resolved
    return recorded.keys() <= resolved.keys() and all(
        same_spec(value, resolved[key]) for key, value in recorded.items())


def run_arm(name: str, arm: str, seed: int, budget: dict, out: Path, store: str,
            extra: list[str]) -> dict:
    """Train one arm (or reuse a finished run), score its test split, audit balanced routing."""
    from rtlib.costs import estimate_costs
    from rtlib.data.store import TokenStore
    from rtlib.spec.load import load_spec
    from rtlib.train.metrics_log import read_metrics

    run_dir = out / "runs" / f"{name}-{arm}-s{seed}"
    path = spec_path(name, arm)
    if "geometry" in budget:  # the smoke budget's tiny shapes: specs of its own
        path = out / "specs" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(spec_text(name, arm, budget["geometry"]))
    overrides = [f"train.steps={budget['steps']}", f"run.eval_every={budget['eval_every']}",
                 f"run.seed={seed}", f"run.dir={run_dir}", f"data.path={store}", *extra]
    spec = load_spec(path, overrides)
    costs = estimate_costs(spec.model)
    done_file = run_dir / "study.json"
    if done_file.exists():
        row = json.loads(done_file.read_text())
        resolved = spec.model_dump(mode="json")
        if row.get("overrides") == overrides and same_spec(row.get("spec", resolved), resolved):
            print(f"study: {run_dir.name}: done before, reused", flush=True)
            return {**row, "reused": True}
    print(f"study: {run_dir.name}: training {budget['steps']} steps", flush=True)
    log = out / "logs" / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    wall = rtlib_cli(["train", str(path), *overrides, "--no-progress"], log)
    scored = run_dir / "test.json"
    rtlib_cli(["eval", str(run_dir), "--split", "test", "--max-tokens",
               str(budget["test_tokens"]), "--no-progress"], scored)
    test = json.loads(scored.read_text().splitlines()[-1])
    records = read_metrics(run_dir)
    last = [r for r in records if "split" not in r][-1]
    data = TokenStore.open(str(ROOT / store))
    source = data.manifest["source"]
    local = spec.model.attention.heads[0]
    routing = TASKS[name]["routing"] if "geometry" not in budget else \
        budget["geometry"]["routing"]
    geometry = {"n_layers": spec.model.n_layers, "d_model": spec.model.d_model,
                "seq_len": spec.model.seq_len, "local_window": local.window,
                "receptive_field": spec.model.n_layers * ((local.look_back + 1) * local.window
                                                          - 1),
                **routing, **{k: source[k] for k in ("min_distance", "chance_accuracy")
                              if k in source}}
    row = {"task": name, "arm": arm, "seed": seed, "step": test["step"], "store": store,
           "geometry": geometry,
           "params": costs.parameters, "flops_per_token": sum(costs.flops_per_token.values()),
           "attention_flops_per_token": costs.flops_per_token["attention"]
           + costs.flops_per_token["routing"], "wall_s": wall,
           "train_s": sum(r.get("step_s") or 0.0 for r in records if "split" not in r),
           "test": test, "curve": curves(records), "overrides": overrides,
           "spec": spec.model_dump(mode="json"),
           "routing_last": {k: last[k] for k in ("coverage", "occupancy_min", "occupancy_max",
                                                 "occupancy_entropy") if k in last}}
    if arm == "routing-balanced":
        row["audit"] = audit(run_dir, data, answers=TASKS[name]["metric"] == "answer_accuracy",
                             small=budget["steps"] <= 2)
    done_file.write_text(json.dumps(row, indent=1))
    return row


def audit(run_dir: Path, store, *, answers: bool, small: bool) -> dict:
    from rtlib.runs.evaluate import causality_audit
    from rtlib.train.run_dir import load_run

    _, ts, _ = load_run(run_dir)
    return causality_audit(ts.model, ts.routing, store, "test",
                           windows=1 if small else 8, per_window=4 if small else 32,
                           batch_size=4 if small else 16, answers_only=answers)


def result_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        base = {k: r[k] for k in ("task", "arm", "seed", "step", "params", "flops_per_token",
                                  "wall_s")}
        for metric in ("bits_per_dim", "bits_per_byte", "bits_per_token", "answer_accuracy",
                       "answer_nll"):
            if metric in r["test"]:
                rows.append({**base, "metric": metric, "value": r["test"][metric]})
        for key, value in r.get("audit", {}).items():
            if key.startswith(("nll", "accuracy")):
                rows.append({**base, "metric": f"audit_{key}", "value": value})
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
            f"(min {min(values):.4f}, max {max(values):.4f})")


def plot(name: str, runs: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    colours = dict(zip(ARMS, ["tab:gray", "tab:blue", "tab:green", "tab:red"], strict=True))
    for r in runs:
        curve = [c for c in r["curve"] if metric in c]
        label = f"{r['arm']} (seed {r['seed']})"
        style = "-" if r["seed"] == min(x["seed"] for x in runs) else "--"
        for ax, x in zip(axes, ("step", "train_s"), strict=True):
            ax.plot([c[x] for c in curve], [c[metric] for c in curve], style, marker="o", ms=3,
                    color=colours[r["arm"]], label=label if ax is axes[0] else None)
    for ax, x in zip(axes, ("step", "training seconds (compile excluded)"), strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(f"validation {metric.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {TASKS[name]['about']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(runs: list[dict], *, budget_name: str, command: str, total_s: float,
           report_path: Path) -> str:
    reused = sum(bool(r.get("reused")) for r in runs)
    took = f"in {total_s / 60:.1f} minutes on this machine" + (
        f" ({reused} of {len(runs)} runs finished by an earlier invocation of the same command "
        "and reused; their wall times are in the tables)" if reused else "")
    lines = [f"# Study: routing vs local vs full attention ({budget_name})", "",
             f"Generated by `{command}` {took}; every figure below is measured by the runs "
             "it lists (tables and plots are rewritten by each invocation).", ""]
    for name in TASKS:
        task_runs = [r for r in runs if r["task"] == name]
        if not task_runs:
            continue
        metric = TASKS[name]["metric"]
        first = task_runs[0]
        g = first["geometry"]
        lines += [f"## {name}: {TASKS[name]['about']}", "",
                  f"Specs: `specs/study/{name}-*.yaml` ({g['n_layers']} layers, d_model "
                  f"{g['d_model']}, {HEADS} heads of {HEAD_DIM}, sequence {g['seq_len']}). Local "
                  f"heads: window {g['local_window']} with one block of look-back, so "
                  f"{g['n_layers']} layers of local heads see at most {g['receptive_field']} "
                  f"tokens back. Routing heads: {g['clusters']} clusters x window "
                  f"{g['window']}, unshared QK. Store: `{first['store']}`"
                  + (f"; every answer is at least {g['min_distance']} tokens after what it "
                     f"recalls; chance accuracy {g['chance_accuracy']:.3f}."
                     if "min_distance" in g else "."), "",
                  f"Test-split {metric.replace('_', ' ')} ({TASKS[name]['better']} is better), "
                  f"after {first['step']} steps; seeds "
                  f"{sorted({r['seed'] for r in task_runs})}; mean ± standard deviation over "
                  "seeds.", "",
                  *table([
                      "arm", metric, "params", "forward FLOPs/token",
                      "attention+routing FLOPs/token", "train s (per run)",
                      "wall s (per run, with compile and eval)"],
                      [[arm, spread([r["test"][metric] for r in rs]), f"{rs[0]['params']:,}",
                        f"{rs[0]['flops_per_token'] / 1e6:.2f} M",
                        f"{rs[0]['attention_flops_per_token'] / 1e6:.3f} M",
                        f"{statistics.mean(r['train_s'] for r in rs):.0f}",
                        f"{statistics.mean(r['wall_s'] for r in rs):.0f}"]
                       for arm in ARMS if (rs := [r for r in task_runs if r["arm"] == arm])])]
        figure = report_path.with_name(f"{report_path.stem}-{name}.png")
        plot(name, task_runs, metric, figure)
        lines += ["", f"![{name} curves]({figure.name})", ""]
        routed = [r for r in task_runs if r.get("routing_last")]
        if routed:
            lines += ["Routing at the last training step (share of routed vectors in the least "
                      "/ most used cluster, normalised occupancy entropy, share of queries in at "
                      "least one cluster):", "",
                      *table(["arm", "seed", "occupancy min", "occupancy max", "entropy",
                              "coverage"],
                             [[r["arm"], str(r["seed"]),
                               *(f"{r['routing_last'][k]:.3f}" for k in (
                                   "occupancy_min", "occupancy_max", "occupancy_entropy",
                                   "coverage"))] for r in routed]), ""]
        audited = [r for r in task_runs if "audit" in r]
        if audited:
            lines += ["Causality audit of balanced routing (the same test targets scored by "
                      "the full pass and by a strictly causal pass that sees only the prefix):",
                      "",
                      *table(["seed", "targets", "nll full", "nll causal", "gap (nats)",
                              "accuracy full", "accuracy causal"],
                             [[str(r["seed"]), str(a["targets"]), f"{a['nll_full']:.4f}",
                               f"{a['nll_causal']:.4f}", f"{a['nll_gap']:+.4f}",
                               f"{a['accuracy_full']:.3f}", f"{a['accuracy_causal']:.3f}"]
                              for r in audited if (a := r["audit"])]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the <= 15-minute budget (an hour more "
                   "with the images task)")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the tool itself "
                   "(tiny models, 2 steps; the suite runs it)")
    p.add_argument("--out", default="runs/study", help="runs, logs and results.json go here")
    p.add_argument("--report", default=str(ROOT / "docs" / "study.md"),
                   help="the Markdown report (plots are written beside it)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of tasks")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of arms")
    p.add_argument("--store", action="append", default=[], metavar="TASK=PATH",
                   help="use this token store for a task (the smoke test's tiny stores)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="extra spec override for every run (e.g. model.d_model=32)")
    p.add_argument("--steps", type=int, help="train this many steps instead of the budget's")
    p.add_argument("--seeds", help="comma-separated seeds instead of the budget's")
    p.add_argument("--notes", help="Markdown appended to the report (the findings, written "
                   "by a person after reading the figures)")
    p.add_argument("--write-specs", action="store_true",
                   help="regenerate specs/study/*.yaml from the tables and exit")
    args = p.parse_args(argv)
    if args.write_specs:
        for path in write_specs():
            print(path.relative_to(ROOT))
        return 0
    tasks = [t for t in args.tasks.split(",") if t]
    arms = [a for a in args.arms.split(",") if a]
    bad = [t for t in tasks if t not in TASKS] + [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"unknown task or arm: {', '.join(bad)} (tasks: {', '.join(TASKS)}; arms: "
                f"{', '.join(ARMS)})")
    stores = dict(s.split("=", 1) for s in args.store)
    budget_name = "smoke" if args.smoke else "quick" if args.quick else "default"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = []
    for name in tasks:
        budget = TASKS[name]["budgets"][budget_name]
        if budget is None:
            print(f"study: {name}: not part of the {budget_name} budget", flush=True)
            continue
        budget = {**budget, **({"steps": args.steps} if args.steps else {}),
                  **({"seeds": [int(x) for x in args.seeds.split(",")]} if args.seeds else {})}
        store = ensure_store(name, stores.get(name))
        for seed in budget["seeds"]:
            for arm in arms:
                row = run_arm(name, arm, seed, budget, out, store, args.set)
                runs.append(row)
                metric = TASKS[name]["metric"]
                print(f"study: {name} {arm} seed {seed}: test {metric} "
                      f"{row['test'][metric]:.4f} ({row['wall_s']:.0f} s)", flush=True)
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(result_rows(runs), indent=1))
    (out / "curves.json").write_text(json.dumps(
        [{k: r[k] for k in ("task", "arm", "seed", "curve")} for r in runs], indent=1))
    command = " ".join(["python tools/study.py", *(argv if argv is not None else sys.argv[1:])])
    report_path = Path(args.report).resolve()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    text = report(runs, budget_name=budget_name, command=command, total_s=total,
                  report_path=report_path)
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    report_path.write_text(text)
    print(f"study: {len(runs)} runs in {total / 60:.1f} min; {out / 'results.json'}; "
          f"{report_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
