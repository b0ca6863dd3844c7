"""Data, FSDP and model parallelism on 8 fake CPU devices, checkpoints across meshes, and
multi-process jobs on this machine (`tools/launch_local.py`)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rtlib.cli import main
from rtlib.objectives import next_token_loss
from rtlib.parallel import (
    DistributedError,
    MeshError,
    activate,
    from_global,
    initialize,
    make_mesh,
    mesh_shape,
)
from rtlib.parallel.multihost import multi_process_environment
from rtlib.parallel.rules import batch_sharding, is_array_leaf, logical_spec, param_info
from rtlib.spec import SpecError, load_spec
from rtlib.spec.schema import DistributedSpec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.loop import train
from rtlib.train.optim import decay_mask
from rtlib.train.run_dir import load_run
from rtlib.train.step import abstract_state, init_sharded, init_train_state, train_step_for

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "specs" / "tiny.yaml")
LAUNCH = str(ROOT / "tools" / "launch_local.py")
# Random centroids (no k-means init) keep this file to one compiled step per mesh.
# 4 local + 4 routing heads (of 4 dimensions) split over model=2 and model=4.
COMMON = ["train.batch_size=8", "train.lr=3e-3", "train.schedule=constant",
          "train.warmup_steps=2", "model.routing.init=random",
          "model.attention.heads.0.count=4", "model.attention.heads.1.count=4"]
MESHES = {"one": ["mesh.data=1"],
          "data4_model2": ["mesh.data=4", "mesh.model=2", "train.micro_batches=2"],
          "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4"]}
STEPS = 3


def on_mesh(name: str):
    spec = load_spec(TINY, [*COMMON, *MESHES[name]])
    return spec, make_mesh(spec)


def spec_of(x) -> P:
    """x's PartitionSpec with one entry per axis (jax drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return P(*spec, *([None] * (x.ndim - len(spec))))


def replicas_agree(tree) -> bool:
    """Every copy of every array shard (devices holding the same index) is bitwise equal."""
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        seen: dict[str, np.ndarray] = {}
        for shard in leaf.addressable_shards:
            data = np.asarray(shard.data)
            first = seen.setdefault(repr(shard.index), data)
            if first.tobytes() != data.tobytes():
                return False
    return True


@pytest.fixture(scope="module")
def runs():
    """The same steps on one device and on two 8-device meshes: per mesh, the gradient of the
    first step's loss, every step's loss, and the final state.

    Every step on a mesh starts from the one-device run's state before that step (laid out
    on the mesh), so each step is compared with its one-device twin. Chaining the meshes' own
    states instead lets rounding differences of 1e-8 flip a top-k membership a step or two
    later (routing decisions are discrete), after which the runs legitimately part. For the
    same reason the batch must not put a state at a near-tie: with seed 0, step 1's state
    sits so close to one that perturbing its parameters by 1e-7 (relative) moved the
    one-device loss by 3.6e-4 in 1 trial of 5, as the FSDP mesh's different reduction order
    did; seed 1 has no such state in these steps."""
    batch = np.random.default_rng(1).integers(0, 256, (8, 65)).astype(np.int32)
    out, before = {}, []  # before[i]: the one-device state before step i, on the host
    for name in MESHES:
        spec, mesh = on_mesh(name)
        ts = init_sharded(spec, mesh, key=jax.random.key(0))
        tokens = from_global(batch, batch_sharding(mesh, spec.mesh.rules))
        loss_grad = eqx.filter_jit(eqx.filter_grad(
            lambda m, r, t: next_token_loss(m, r, t)[0]))
        with activate(mesh, spec.mesh.rules):
            grads = loss_grad(ts.model, ts.routing, tokens)
        step = train_step_for(spec, mesh)
        layout = abstract_state(spec, mesh)
        losses = []
        for i in range(STEPS):
            if name == "one":
                before.append(jax.tree.map(np.asarray, ts))  # the step donates its input
            else:
                ts = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), before[i],
                                  layout)
            ts, metrics = step(tokens, ts)
            losses.append(float(metrics["loss"]))
        out[name] = {"spec": spec, "mesh": mesh, "grads": grads, "losses": losses, "state": ts}
    return out


@pytest.mark.parametrize("name", ["data4_model2", "data2_fsdp4"])
def test_eight_devices_match_one(runs, name):
    one, many = runs["one"], runs[name]
    assert many["mesh"].size == 8
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=1e-5, atol=0)
    for a, b in zip(jax.tree.leaves(many["grads"]), jax.tree.leaves(one["grads"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(eqx.filter(many["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(one["state"], eqx.is_array)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    ts = many["state"]
    # Statistics were summed over every replica before the EMA: the centroids (replicated on
    # all 8 devices) are bitwise identical everywhere, as is every other replicated copy.
    centroids = ts.routing.stages[0].centroids
    assert centroids.sharding.is_fully_replicated and len(centroids.addressable_shards) == 8
    assert replicas_agree(ts)
    assert int(ts.step) == STEPS


def test_parameters_and_optimiser_state_are_sharded_by_the_rules(runs):
    dm, fsdp = runs["data4_model2"]["state"], runs["data2_fsdp4"]["state"]
    attn, ffn = dm.model.stages[0].attn, dm.model.stages[0].ffn
    assert spec_of(attn.wq.weight) == P(None, None, "model")  # heads over model
    assert spec_of(attn.wo.weight) == P(None, "model", None)
    assert spec_of(ffn.w_in.weight) == P(None, None, "model")  # hidden units over model
    assert dm.model.embed.weight.sharding.is_fully_replicated
    adam = fsdp.opt_state[1][0]
    assert spec_of(fsdp.model.stages[0].attn.wq.weight) == P(None, "fsdp", None)
    assert spec_of(adam.mu.stages[0].attn.wq.weight) == P(None, "fsdp", None)
    assert spec_of(fsdp.model.embed.weight) == P(None, "fsdp")
    # each device holds a quarter of an FSDP-sharded matrix
    w = fsdp.model.stages[0].ffn.w_out.weight
    assert w.addressable_shards[0].data.shape == (w.shape[0], w.shape[1], w.shape[2] // 4)


def test_adafactor_state_shards_where_it_splits():
    """Adafactor keeps (1,)-shaped placeholders for vector parameters: they stay whole while
    the full-shaped statistics shard like their parameters."""
    spec = load_spec(TINY, [*COMMON, "train.optimizer=adafactor", "train.b1=0.0",
                            "mesh.data=2", "mesh.fsdp=4"])
    ts = init_sharded(spec, make_mesh(spec), key=jax.random.key(0))
    specs = {jax.tree_util.keystr(path): (leaf.shape, spec_of(leaf)) for path, leaf in
             jax.tree_util.tree_flatten_with_path(eqx.filter(ts.opt_state, eqx.is_array))[0]}
    norm = {k: v for k, v in specs.items() if "final_norm.weight" in k}
    assert (((1,), P(None)) in norm.values()) and (((32,), P("fsdp")) in norm.values()), norm
    assert replicas_agree(ts)


# The hard-coded table the layers' declarations replaced: (owner attribute, leaf attribute) ->
# logical axes, matched on the tail of any path (so optimiser moments shard like their
# parameters), with a leading None under `stages`; the model's `positions` by its own name.
OLD_AXES = {
    ("embed", "weight"): ("vocab", "embed"), ("embed_proj", "weight"): (None, "embed"),
    ("wq", "weight"): ("embed", "heads"), ("wk", "weight"): ("embed", "heads"),
    ("wv", "weight"): ("embed", "heads"), ("wo", "weight"): ("heads", "embed"),
    ("w_in", "weight"): ("embed", "mlp"), ("w_in", "bias"): ("mlp",),
    ("w_out", "weight"): ("mlp", "embed"), ("w_out", "bias"): ("embed",),
    ("norm1", "weight"): ("embed",), ("norm1", "bias"): ("embed",),
    ("norm2", "weight"): ("embed",), ("norm2", "bias"): ("embed",),
    ("final_norm", "weight"): ("embed",), ("final_norm", "bias"): ("embed",),
    ("unembed", "weight"): ("embed", "vocab"), ("unembed", "bias"): ("vocab",),
}
OLD_DECAYED = {("embed", "weight"), ("embed_proj", "weight"), ("wq", "weight"), ("wk", "weight"),
               ("wv", "weight"), ("wo", "weight"), ("w_in", "weight"), ("w_out", "weight"),
               ("unembed", "weight")}
# Every kind of parameter the model can have: factorised embedding, learned positions, untied
# output projection with its bias, feed-forward biases, final norm.
EVERY_PARAMETER = ["model.embedding.dim=16", "model.embedding.positions=learned",
                   "model.embedding.tied=false", "model.feed_forward.bias=true",
                   "model.final_norm=true"]


def _attribute_names(path) -> tuple[str, ...]:
    return tuple(k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey))


def _old_axes(path, ndim: int) -> tuple[str | None, ...]:
    names = _attribute_names(path)
    axes = (None, "embed") if names[-1:] == ("positions",) else OLD_AXES.get(names[-2:])
    if axes is not None and "stages" in names:
        axes = (None, *axes)
    return (None,) * ndim if axes is None or len(axes) != ndim else axes


@pytest.mark.parametrize("optimizer", [["train.optimizer=adamw"],
                                       ["train.optimizer=adafactor", "train.b1=0.9"]])
@pytest.mark.parametrize("overrides", [[], EVERY_PARAMETER], ids=["tiny", "every_parameter"])
def test_declared_axes_and_decay_match_the_old_table(overrides, optimizer):
    """Over the whole training state (parameters, every optimiser moment, Adafactor's factored
    statistics, routing state, step, key) the declarations give the old table's axes, and
    decay exactly the old mask's parameters."""
    spec = load_spec(TINY, [*overrides, *optimizer])
    ts = eqx.filter_eval_shape(init_train_state, spec, key=jax.random.key(0))
    got, want, seen = {}, {}, set()

    def compare(path, leaf, info):
        if is_array_leaf(leaf):
            got[jax.tree_util.keystr(path)] = tuple(logical_spec(info, leaf.ndim))
            want[jax.tree_util.keystr(path)] = _old_axes(path, leaf.ndim)
            seen.add(_attribute_names(path)[-2:])

    jax.tree_util.tree_map_with_path(compare, ts, param_info(ts))
    assert got == want
    # not vacuous: parameters and moments really shard, on every path the old table knew
    sharded = [k for k, axes in got.items() if any(a is not None for a in axes)]
    assert any(k.startswith(".model.") for k in sharded)
    assert any(k.startswith(".opt_state") for k in sharded)
    if overrides:  # (the output projection never has a bias)
        assert set(OLD_AXES) - {("unembed", "bias")} <= seen and ("model", "positions") in seen

    params = eqx.filter(ts.model, is_array_leaf)
    mask = {jax.tree_util.keystr(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    expected = {jax.tree_util.keystr(p): _attribute_names(p)[-2:] in OLD_DECAYED for p, _ in
                jax.tree_util.tree_flatten_with_path(params)[0]}
    assert mask == expected and any(expected.values()) and not all(expected.values())


def test_a_checkpoint_restores_onto_another_mesh(runs, tmp_path):
    saved = runs["data4_model2"]["state"]
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(saved, {"step": STEPS})
    spec1, mesh1 = runs["one"]["spec"], runs["one"]["mesh"]
    spec24 = load_spec(TINY, [*COMMON, "mesh.data=2", "mesh.model=4"])
    spec_fsdp = runs["data2_fsdp4"]["spec"]
    targets = [(spec24, make_mesh(spec24), P(None, None, "model")),
               (spec_fsdp, make_mesh(spec_fsdp), P(None, "fsdp", None)),
               (spec1, mesh1, P(None, None, None))]
    assert mesh1.size == 1
    for spec, mesh, wq_spec in targets:
        restored, meta = ckpt.restore(STEPS, abstract_state(spec, mesh))
        assert meta["step"] == STEPS
        for a, b in zip(jax.tree.leaves(eqx.filter(restored, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(saved, eqx.is_array)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding.mesh.shape == mesh.shape
        assert spec_of(restored.model.stages[0].attn.wq.weight) == wq_spec
        assert spec_of(restored.opt_state[1][0].nu.stages[0].attn.wq.weight) == wq_spec
    ckpt.close()


def test_sizes_that_do_not_divide_the_mesh_are_refused(capsys):
    with pytest.raises(SpecError, match=r"mesh\.model: 2 local heads per layer do not split "
                                        r"over mesh\.model=3"):
        load_spec(TINY, ["mesh.model=3"])
    with pytest.raises(SpecError, match=r"train\.batch_size: batch_size=6 sequences do not "
                                        r"split over mesh\.data=4"):
        load_spec(TINY, ["train.batch_size=6", "mesh.data=4"])
    with pytest.raises(SpecError, match="at most one axis size may be -1"):
        load_spec(TINY, ["mesh.model=-1"])
    with pytest.raises(SpecError, match=r"mesh\.rules\.heads: shares mesh axis \['fsdp'\]"):
        load_spec(TINY, ["mesh.rules.heads=[fsdp]"])
    with pytest.raises(SpecError, match=r"model\.feed_forward\.hidden: 63 hidden units"):
        load_spec(TINY, ["mesh.model=2", "model.feed_forward.hidden=63"])
    with pytest.raises(SpecError, match=r"model\.embedding\.dim: 20 .* mesh\.fsdp=8"):
        load_spec(TINY, ["mesh.data=1", "mesh.fsdp=8", "model.embedding.dim=20"])
    # sizes known only from the device count
    spec = load_spec(TINY, ["mesh.model=2"])
    assert mesh_shape(spec, 8) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(MeshError, match=r"train\.batch_size: batch_size=8 sequences do not "
                                        r"split over mesh\.data=3 .*on 6 devices"):
        mesh_shape(spec, 6)
    with pytest.raises(MeshError, match="needs 16 devices; 8 are present"):
        mesh_shape(load_spec(TINY, ["mesh.data=8", "mesh.model=2"]), 8)
    assert main(["validate", TINY, "--devices", "8", "mesh.model=2"]) == 0
    assert "mesh on 8 devices: data=4 x fsdp=1 x model=2" in capsys.readouterr().out
    assert main(["validate", TINY, "--devices", "6", "mesh.model=2"]) == 2
    assert "do not split over mesh.data=3" in capsys.readouterr().err


def _launch(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_two_processes_train_like_one_and_stop_together(text_store, tmp_path):
    """2 processes x 4 devices, stopped by SIGTERM after a few steps (as a preempted job
    is), against one process on the same 8-device mesh."""
    # Time-based checkpoints every ~0.1 s: each process's clock differs, the saves must not.
    options = [f"data.path={text_store}", "mesh.data=4", "mesh.model=2", "run.log_every=1",
               "run.eval_every=2", "run.checkpoint_every=0", "run.checkpoint_minutes=0.002",
               "run.sample_tokens=0", "data.eval_tokens=256"]
    two = tmp_path / "two"
    start = time.monotonic()
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
             sys.executable, "-m", "rtlib", "train", TINY, *options, "train.steps=1000",
             f"run.dir={two}", "--no-progress"], stdout=out, stderr=err)
        while time.monotonic() - start < 400 and proc.poll() is None:
            if (two / "metrics.jsonl").exists() and (
                    (two / "metrics.jsonl").read_text().count('"loss"') >= 3):
                break
            time.sleep(0.2)
        first_steps = time.monotonic() - start
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert "2 processes" in stdout and "stopped by SIGTERM" in stdout
    assert "[process 1] stopped" not in stdout  # process 1 prints nothing of its own
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in lines)
    # every process stopped after the same step, and saved it together
    assert last >= 3 and Checkpointer(two).steps()[-1] == last
    train(load_spec(TINY, [*options, f"train.steps={last}", f"run.dir={tmp_path / 'one'}"]),
          progress=False, print_fn=lambda *_: None)  # one process, the same 8-device mesh
    drop = {"tokens_per_s", "step_s"}
    runs = [[{k: v for k, v in json.loads(line).items() if k not in drop}
             for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("two", "one")]
    runs[1] = runs[1][:len(runs[0])]  # the finished run also has a final evaluation
    assert [r["step"] for r in runs[0] if "loss" in r] == list(range(1, last + 1))  # once each
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (k, a, b)
            else:
                assert a[k] == b[k]
    (_, a, _), (_, b, _) = load_run(two), load_run(tmp_path / "one")
    for x, y in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(b, eqx.is_array)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    print(f"2 processes x 4 devices: {first_steps:.1f} s to step 3, "
          f"{time.monotonic() - start:.1f} s in all")


def test_the_environment_decides_whether_to_start_jax_distributed(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS",
                 "OMPI_MCA_orte_hnp_uri", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert multi_process_environment() is None
    assert initialize(DistributedSpec()) is False  # auto, nothing asks: one process
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a shell inside an allocation
    assert multi_process_environment() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert "SLURM" in multi_process_environment()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "four")
    with pytest.raises(DistributedError, match="SLURM_STEP_NUM_TASKS='four' is not an integer"):
        multi_process_environment()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
    assert "TPU" in multi_process_environment()
    assert initialize(DistributedSpec(initialize="never")) is False


DYING = """
import os, sys, time
import numpy as np
from rtlib.parallel import initialize
from rtlib.spec.schema import DistributedSpec
initialize(DistributedSpec(heartbeat_timeout_s=5))
import jax
from jax.experimental import multihost_utils
for i in range(3000):
    multihost_utils.process_allgather(np.int32(i))
    if jax.process_index() == 1 and i == 3:
        os._exit(7)
    time.sleep(0.05)
"""


@pytest.mark.parametrize("wait_for_all", [False, True])
def test_a_dying_process_stops_the_others(tmp_path, wait_for_all):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    start = time.monotonic()
    proc = _launch("--processes", "2", "--devices-per-process", "1",
                   *(["--wait-for-all"] if wait_for_all else []), "--",
                   sys.executable, str(script), timeout=120)
    assert proc.returncode == 7, proc.stderr[-3000:]
    assert "process 1 exited with code 7" in proc.stderr
    codes = json.loads(proc.stderr.split("exit codes ")[-1].splitlines()[0])
    assert codes[1] == 7 and codes[0] != 0  # process 0 did not finish its loop
    # Without the launcher's help, jax's heartbeat (5 s here) takes process 0 down.
    assert time.monotonic() - start < (60 if wait_for_all else 40)
