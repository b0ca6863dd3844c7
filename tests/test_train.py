"""`rtlib train / eval / generate / plot` on a tiny model: learning, exact resume (also after a
crash mid-save), micro-batching, non-finite losses, incompatible specs, damaged checkpoints,
signals, and bad arguments; the metrics log's tolerance and the checkpoint policy alone."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_max_abs

from rtlib.cli import main
from rtlib.spec.load import load_spec
from rtlib.train import loop
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.loop import NonFiniteLoss, train
from rtlib.train.run_dir import fresh_state, load_run
from rtlib.train.step import init_routing, train_step_for

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "specs" / "tiny.yaml")
# One model and one `train` section for every test here, so the step compiles once.
BASE = ["train.batch_size=4", "train.micro_batches=2", "train.lr=3e-3", "train.warmup_steps=2",
        "train.schedule=constant", "run.log_every=1", "run.eval_every=0",
        "run.checkpoint_every=2", "run.checkpoint_minutes=null", "run.sample_tokens=0",
        "data.eval_tokens=256", "mesh.data=1"]
TIMING = {"tokens_per_s", "step_s"}


def spec_for(store: str, run_dir: Path, *extra: str):
    return load_spec(TINY, [*BASE, f"data.path={store}", f"run.dir={run_dir}", *extra])


def cli_args(store: str, run_dir: Path, *extra: str) -> list[str]:
    return ["train", TINY, *BASE, f"data.path={store}", f"run.dir={run_dir}", "--no-progress",
            *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if "split" not in r]


@pytest.fixture(scope="module")
def trained(text_store, tmp_path_factory) -> Path:
    """A tiny run trained for 30 steps (checkpoints at 28 and 30)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(spec_for(text_store, run_dir, "train.steps=30", "run.checkpoint_every=28",
                            "run.eval_every=15"), progress=False, print_fn=lambda *_: None)
    assert result.step == 30
    return run_dir


def test_a_few_steps_lower_the_loss_and_log_everything(trained):
    records = metrics(trained)
    steps = [r for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:
        assert {"step", "loss", "lm_loss", "commit_loss", "lr", "grad_norm", "tokens_per_s",
                "occupancy_min", "occupancy_max", "occupancy_entropy", "coverage"} <= r.keys()
        assert 0 <= r["occupancy_min"] <= r["occupancy_max"] <= 1 and 0 < r["coverage"] <= 1
        assert math.isclose(r["loss"], r["lm_loss"] + r["commit_loss"], rel_tol=1e-5)
    first = np.mean([r["lm_loss"] for r in steps[:5]])
    last = np.mean([r["lm_loss"] for r in steps[-5:]])
    assert last < 0.7 * first, (first, last)
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["bits_per_byte"] < evals[0]["bits_per_byte"] < 8
    assert Checkpointer(trained).steps() == [28, 30]
    _, ts, step = load_run(trained)
    assert step == int(ts.step) == 30 and bool(ts.routing.initialised)


def test_resume_is_bit_identical_even_after_a_crash_mid_save(text_store, tmp_path,
                                                             monkeypatch):
    straight = train(spec_for(text_store, tmp_path / "a", "train.steps=6"), progress=False)
    first = train(spec_for(text_store, tmp_path / "b", "train.steps=3"), progress=False)
    second = train(spec_for(text_store, tmp_path / "b", "train.steps=6"), progress=False)
    assert first.losses + second.losses == straight.losses  # exact float equality
    assert without_timing(metrics(tmp_path / "a")) == without_timing(metrics(tmp_path / "b"))
    (_, a, _), (_, b, _) = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert tree_max_abs(eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)) == 0.0

    # A crash while the step-4 checkpoint is being written: its half-written directory must
    # not count, and resuming from step 2 must recompute steps 3-6 exactly.
    from orbax.checkpoint import handlers

    real_save, calls = handlers.JsonCheckpointHandler.async_save, []

    async def crash_on_second_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the `state` item of this checkpoint is already written
            raise RuntimeError("simulated crash mid-save")
        return await real_save(self, *args, **kwargs)

    monkeypatch.setattr(handlers.JsonCheckpointHandler, "async_save", crash_on_second_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(spec_for(text_store, tmp_path / "c", "train.steps=6"), progress=False)
    monkeypatch.undo()
    assert Checkpointer(tmp_path / "c").steps() == [2]
    resumed = train(spec_for(text_store, tmp_path / "c", "train.steps=6"), progress=False)
    assert resumed.start_step == 2 and resumed.losses == straight.losses[2:]
    assert without_timing(metrics(tmp_path / "c")) == without_timing(metrics(tmp_path / "a"))


def test_micro_batches_match_one_batch(text_store, tmp_path):
    from rtlib.data.pipeline import train_dataset
    from rtlib.data.store import TokenStore

    spec2 = spec_for(text_store, tmp_path)
    spec1 = spec_for(text_store, tmp_path, "train.micro_batches=1")
    batch = jnp.asarray(train_dataset(TokenStore.open(text_store), "train", seq_len=64,
                                      batch_size=4, seed=0)[0])
    start = init_routing(batch, fresh_state(spec1), key=jax.random.key(0))
    # dropout is 0, so the per-micro-batch keys do not matter
    one, m1 = train_step_for(spec1)(batch, start)
    two, m2 = train_step_for(spec2)(batch, init_routing(batch, fresh_state(spec2),
                                                        key=jax.random.key(0)))
    assert abs(float(m1["lm_loss"]) - float(m2["lm_loss"])) < 1e-5
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) < 1e-4
    assert tree_max_abs(eqx.filter(one.model, eqx.is_array),
                        eqx.filter(two.model, eqx.is_array)) < 1e-5
    # statistics are summed before the single EMA step: same centroids
    assert tree_max_abs(one.routing, two.routing) < 1e-6


@pytest.mark.parametrize("poison", ["loss", "grad_norm"])
def test_non_finite_loss_stops_and_names_the_newest_good_checkpoint(text_store, tmp_path,
                                                                  monkeypatch, capsys, poison):
    real = loop.train_step_for

    def poisoned(spec, mesh=None):
        step = real(spec, mesh)

        def wrapped(batch, ts):
            ts, m = step(batch, ts)
            if int(ts.step) == 3:  # step 3 is also a checkpoint step below
                m = {**m, poison: jnp.asarray(jnp.nan)}
            return ts, m

        return wrapped

    monkeypatch.setattr(loop, "train_step_for", poisoned)
    run_dir = tmp_path / "nan"
    assert main(cli_args(text_store, run_dir, "train.steps=6", "run.checkpoint_every=1")) == 3
    err = capsys.readouterr().err
    what = "loss" if poison == "loss" else "gradient norm"
    assert f"non-finite {what} (nan) at step 3" in err
    # Step 3's loss and gradient come from the parameters after step 2: that checkpoint is
    # set aside, and the one before it is the newest good one.
    assert f"Checkpoint 2 holds the parameters that produced it and was moved to " \
           f"{run_dir.resolve() / 'diverged' / '2'}" in err
    assert "newest good checkpoint is step 1" in err
    assert Checkpointer(run_dir).steps() == [1]
    assert max(r["step"] for r in metrics(run_dir)) == 2
    with pytest.raises(NonFiniteLoss):
        train(spec_for(text_store, run_dir, "train.steps=6"), progress=False)


def test_a_spec_that_changes_shapes_is_refused(trained, text_store, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(cli_args(text_store, run_dir, "train.steps=40", "model.d_model=48")) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.d_model: 32 -> 48" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("damage", ["truncate", "meta"])
def test_a_damaged_checkpoint_gives_a_clear_message_and_loses_nothing(trained, tmp_path, capsys,
                                                                      damage):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    latest = run_dir / "checkpoints" / "30"
    if damage == "truncate":
        for f in (latest / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 64:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
        (latest / "meta" / "metadata").write_text("{not json")
    files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(["eval", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {latest} (step 30) cannot be restored" in err
    assert "tensorstore_spec" not in err and err.strip().count("\n") == 0  # one line
    assert "Nothing was deleted" in err and "resume from step 28" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == files
    shutil.move(latest, tmp_path / "aside")
    assert main(["eval", str(run_dir), "--max-tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 28


def test_eval_generate_and_plot(trained, text_store, tmp_path, capsys):
    assert main(["eval", str(trained), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"tokens", "nll", "bits_per_token", "bits_per_byte", "perplexity"} <= out.keys()
    assert out["split"] == "test" and out["step"] == 30 and out["tokens"] > 0
    assert math.isclose(out["bits_per_token"], out["nll"] / math.log(2))
    assert math.isclose(out["perplexity"], math.exp(out["nll"]))
    assert out["bits_per_byte"] < 8

    from rtlib.data.prepare import prepare

    other = tmp_path / "other"
    (other / "src").mkdir(parents=True)
    for i in range(4):
        (other / "src" / f"{i}.txt").write_text("zzzz qqqq " * 40)
    prepare(str(other / "src"), str(other / "store"), progress=False)
    assert main(["eval", str(trained), "--data", str(other / "store")]) == 0
    elsewhere = json.loads(capsys.readouterr().out)
    assert elsewhere["data"] == str(other / "store") and elsewhere["nll"] != out["nll"]

    greedy = ["generate", str(trained), "--prompt", "line 1", "--max-new-tokens", "12",
              "--temperature", "0"]
    assert main(greedy) == 0
    first = capsys.readouterr().out
    assert main([*greedy, "--seed", "7"]) == 0
    assert capsys.readouterr().out == first and first.startswith("line 1")
    assert main(["generate", str(trained), "--prompt", "x", "--max-new-tokens", "5",
                 "--top-k", "3", "--top-p", "0.9", "--temperature", "0.7"]) == 0
    capsys.readouterr()

    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 31, "lo')  # a line cut short by a killed process
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-k", "0"], "top_k must be between 1 and the vocabulary size 256"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0"),
    (["--prompt", ""], "--prompt is empty"),
    (["EVAL", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["EVAL", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
])
def test_bad_sampling_and_eval_arguments(trained, capsys, args, message):
    if args[0] == "EVAL":
        assert main(["eval", str(trained), *args[1:]]) == 2
    else:
        assert main(["generate", str(trained), "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err


def test_generation_draws_only_ids_the_tokenizer_can_decode(getkey):
    from rtlib.build import build
    from rtlib.runs.sample import Sampling, generate

    model, routing = build(load_spec(TINY, ["model.vocab_size=1024",
                                            "model.routing.init=random"]).model, key=getkey())
    out = generate(model, routing, np.array([1, 2, 3]), max_new_tokens=12,
                   sampling=Sampling(temperature=3.0), key=getkey(), vocab_limit=256)
    assert out.max() < 256  # an untrained model spreads over 1024 ids: 75% of them >= 256


def test_missing_data_or_run_directory(tmp_path, capsys):
    assert main(cli_args(str(tmp_path / "nodata"), tmp_path / "run")) == 1
    assert "no token store here" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run-never")]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits(text_store, tmp_path):
    run_dir = tmp_path / "sig"
    cmd = [sys.executable, "-m", "rtlib", *cli_args(text_store, run_dir, "train.steps=100000",
                                                     "run.checkpoint_every=0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in out
    last = max(r["step"] for r in metrics(run_dir))
    assert Checkpointer(run_dir).steps() == [last] and last >= 3


def test_adafactor_cosine_and_bfloat16_compute_train(text_store, tmp_path):
    result = train(spec_for(text_store, tmp_path / "ada", "train.steps=10",
                            "train.optimizer=adafactor", "train.b1=0.0", "train.lr=1e-2",
                            "train.schedule=cosine", "train.compute_dtype=bfloat16",
                            "run.checkpoint_every=0"), progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    _, ts, _ = load_run(tmp_path / "ada")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(
        ts.model, eqx.is_inexact_array)))


def test_the_metrics_log_drops_torn_lines_and_resumes_each_step_once(tmp_path):
    from rtlib.errors import RunError
    from rtlib.runs.plot import read_metrics as plot_reader
    from rtlib.train.metrics_log import METRICS_FILE, MetricsLog, read_metrics

    assert plot_reader is read_metrics
    with pytest.raises(RunError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    path = tmp_path / METRICS_FILE
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\n[1, 2]\n{"loss": 1.5}\n"text"\n'
                     b'{"step": 2, "split": "valid"}\n{"step": 3, "loss": 1.0}\n'
                     b'{"step": 4, "lo\xff')  # a kill mid-line; the reader must not fail on it
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0},
                                      {"step": 2, "split": "valid"}, {"step": 3, "loss": 1.0}]
    log = MetricsLog(path, resume_step=2)  # resumed from the step-2 checkpoint
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[-1]["loss"] == 0.5


def test_the_checkpoint_policy_saves_on_steps_on_the_clock_at_the_end_and_on_signals():
    from rtlib.spec.schema import RunSpec
    from rtlib.train.checkpoint_policy import CheckpointPolicy

    now, saved, handler = [0.0], [], signal.getsignal(signal.SIGTERM)
    policy = CheckpointPolicy(RunSpec(checkpoint_every=3, checkpoint_minutes=1.0), step=1,
                              clock=lambda: now[0])
    with policy:
        for step in range(2, 9):
            now[0] += 10.0 if step != 8 else 55.0  # 65 s after the step-6 save at step 8
            assert not policy.after_step(step, lambda s=step: saved.append(s))
        assert saved == [3, 6, 8]
        os.kill(os.getpid(), signal.SIGTERM)  # caught: a flag, not the end of the process
        assert policy.after_step(10, lambda: saved.append(10))  # neither a multiple nor due
        assert policy.stopped_by == "SIGTERM"
    assert saved == [3, 6, 8] and signal.getsignal(signal.SIGTERM) is handler  # given back
    policy.finish(10, lambda: saved.append(10))  # the stopped run's state
    policy.finish(10, lambda: saved.append(10))  # already saved: nothing more
    assert saved == [3, 6, 8, 10]
