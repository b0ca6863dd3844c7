"""Training reliability (issue 18): a diverged run's newest checkpoint is good and the advised
rerun trains on; the run directory lock; evaluation racing a live run's checkpoint rotation;
the token store's digest in every checkpoint; the final evaluation and sample after a kill;
one-line errors for unusable run directories and damaged checkpoints."""

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus
from test_train import cli_args, metrics, spec_for

from rtlib.cli import main
from rtlib.errors import CheckpointError
from rtlib.train import finite, loop
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.loop import train
from rtlib.train.run_dir import LOCK_FILE, RunLock, load_run, write_spec


def quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(autouse=True)
def pipes_as_python_starts():
    """Python ignores SIGPIPE (internal pipes and sockets then fail with an error, not a
    signal); a test before this one may have changed that through the CLI."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def four_steps(text_store, tmp_path_factory) -> Path:
    """A tiny run at step 4 with a checkpoint after every step (kept: 2, 3, 4)."""
    run_dir = tmp_path_factory.mktemp("runs") / "four"
    train(spec_for(text_store, run_dir, "train.steps=4", "run.checkpoint_every=1"),
          progress=False, print_fn=quiet)
    assert Checkpointer(run_dir).steps() == [2, 3, 4]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "copy")
    return tmp_path / "copy"


# 1. The checkpoint named after a divergence is good, and the advised rerun trains on.

def test_a_diverging_update_is_not_saved_and_the_rerun_trains_on(four_steps, text_store,
                                                                  tmp_path, capsys):
    run_dir = copy_of(four_steps, tmp_path)
    huge = ("train.steps=8", "run.checkpoint_every=1", "train.lr=1e9")
    assert main(cli_args(text_store, run_dir, *huge)) == 3
    err = one_line_error(capsys)
    assert "training diverged at step 5: its update moved the parameters by" in err
    assert "newest good checkpoint is step 4" in err
    assert Checkpointer(run_dir).steps() == [2, 3, 4]  # the step-5 state was never saved
    result = train(spec_for(text_store, run_dir, "train.steps=8", "run.checkpoint_every=1"),
                   progress=False, print_fn=quiet)  # the advised command, a sane lr
    assert result.start_step == 4 and result.step == 8
    assert all(math.isfinite(x) for x in result.losses)
    steps = [r for r in metrics(run_dir) if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["update_ratio"] < finite.MAX_UPDATE_RATIO and math.isfinite(r["param_norm"])
               for r in steps)


def test_a_checkpoint_whose_next_step_is_non_finite_is_set_aside(four_steps, text_store,
                                                                 tmp_path, monkeypatch, capsys):
    # Without the update bound (as before it existed, or a slower divergence), the blown-up
    # state after step 5 is saved; step 6, computed from it, is non-finite whatever the lr.
    run_dir = copy_of(four_steps, tmp_path)
    assert main(cli_args(text_store, run_dir, "train.steps=8", "run.checkpoint_every=1",
                         "train.lr=1e9", "train.max_update_ratio=null")) == 3
    err = one_line_error(capsys)
    assert "non-finite" in err and "at step 6" in err
    assert f"Checkpoint 5 holds the parameters that produced it and was moved to " \
           f"{run_dir.resolve() / 'diverged' / '5'}" in err
    assert "newest good checkpoint is step 4" in err
    assert Checkpointer(run_dir).steps() == [3, 4]
    assert (run_dir / "diverged" / "5" / "meta").is_dir()  # kept for a look, not deleted
    monkeypatch.undo()
    result = train(spec_for(text_store, run_dir, "train.steps=8", "run.checkpoint_every=1"),
                   progress=False, print_fn=quiet)
    assert result.start_step == 4 and result.step == 8
    assert all(math.isfinite(x) for x in result.losses)


# 2. The run directory lock; readers racing a live run's rotation.

def test_a_second_trainer_on_a_locked_run_directory_is_refused(four_steps, text_store,
                                                               tmp_path, capsys):
    run_dir = copy_of(four_steps, tmp_path)
    lock = RunLock(run_dir)
    assert lock.acquire() is None
    try:
        files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        assert main(cli_args(text_store, run_dir, "train.steps=6")) == 1
        err = one_line_error(capsys)
        assert f"{run_dir} is in use by another training run (pid {os.getpid()} on " in err
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == files
    finally:
        lock.release()
    # A lock left by a killed process does not block: flock dies with its holder.
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on x'); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    result = train(spec_for(text_store, run_dir, "train.steps=5"), progress=False,
                   print_fn=quiet)
    assert result.step == 5
    assert (run_dir / LOCK_FILE).read_text() == ""  # released (and emptied) at the end


def test_eval_takes_the_new_latest_when_its_checkpoint_is_rotated_away(four_steps, tmp_path,
                                                                       monkeypatch, capsys):
    run_dir = copy_of(four_steps, tmp_path)
    real, calls = Checkpointer.restore, []

    def rotated_first(self, step, like):  # a live run's run.keep deletes it as we read it
        calls.append(step)
        if len(calls) == 1:
            shutil.rmtree(self.directory / str(step))
        return real(self, step, like)

    monkeypatch.setattr(Checkpointer, "restore", rotated_first)
    assert main(["eval", str(run_dir), "--max-tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3 and calls == [4, 3]
    calls.clear()
    assert main(["eval", str(run_dir), "--step", "2", "--max-tokens", "64"]) == 1
    err = one_line_error(capsys)
    assert "checkpoint 2 was deleted while being read" in err and "there are now [3]" in err


def test_eval_of_a_run_without_checkpoints_creates_nothing(text_store, tmp_path, capsys):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    write_spec(run_dir, spec_for(text_store, run_dir))
    assert main(["eval", str(run_dir)]) == 1
    assert "no checkpoint yet" in one_line_error(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["spec.yaml"]


# 3. The token store's digest.

def prepare_from(corpus: Path, store: Path) -> None:
    from rtlib.data.prepare import prepare

    prepare(str(corpus), str(store), force=True, progress=False)


@pytest.fixture
def own_store(tmp_path) -> tuple[Path, Path, Path]:
    """(store, its corpus, another corpus): a store of this test's own, to re-prepare."""
    write_corpus(tmp_path / "a", 24)
    (tmp_path / "b").mkdir()
    for i in range(24):
        (tmp_path / "b" / f"{i}.txt").write_text(f"another corpus, document {i}\n" * 30)
    prepare_from(tmp_path / "a", tmp_path / "store")
    return tmp_path / "store", tmp_path / "a", tmp_path / "b"


def test_resuming_on_another_store_is_refused_unless_asked(own_store, tmp_path, capsys):
    store, corpus, other = own_store
    run_dir = tmp_path / "run"
    assert main(cli_args(str(store), run_dir, "train.steps=2")) == 0
    saved = Checkpointer(run_dir).read_meta(2)["store_digest"]
    prepare_from(corpus, store)  # the same source again: the same store, resumed as is
    assert main(cli_args(str(store), run_dir, "train.steps=4")) == 0
    capsys.readouterr()
    prepare_from(other, store)  # --force from another source
    files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(cli_args(str(store), run_dir, "train.steps=6")) == 1
    err = one_line_error(capsys)
    assert f"was trained on a token store with digest {saved[:16]}" in err
    assert "--accept-store-change" in err
    new = Checkpointer(run_dir).read_meta(4)["store_digest"]
    assert new == saved
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == files
    assert main([*cli_args(str(store), run_dir, "train.steps=6"), "--accept-store-change"]) == 0
    assert "continuing on it as asked" in capsys.readouterr().out
    digest = Checkpointer(run_dir).read_meta(6)["store_digest"]
    assert digest != saved and digest[:16] in err
    assert main(cli_args(str(store), run_dir, "train.steps=8")) == 0  # recorded: no question
    # A checkpoint written before digests were recorded resumes as before.
    meta = run_dir / "checkpoints" / "8" / "meta" / "metadata"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                if k != "store_digest"}))
    prepare_from(corpus, store)
    assert main(cli_args(str(store), run_dir, "train.steps=9")) == 0


@pytest.mark.parametrize("when", ["read", "save"])
def test_a_store_replaced_while_training_stops_the_run_in_one_line(own_store, tmp_path,
                                                                   monkeypatch, capsys, when):
    store, _, other = own_store
    run_dir = tmp_path / "run"
    if when == "read":  # the replaced store's chunks fail to read (tensorstore's error)
        from rtlib.train import start

        real = start.train_iterator

        import grain

        class Failing(grain.DatasetIterator):
            def __init__(self, it):
                super().__init__(it)
                self.it, self.calls = it, 0

            def __next__(self):
                self.calls += 1
                if self.calls == 2:
                    prepare_from(other, store)
                    raise ValueError("FAILED_PRECONDITION: Error reading local file")
                return next(self.it)

            def get_state(self):
                return self.it.get_state()

            def set_state(self, state):
                self.it.set_state(state)

        monkeypatch.setattr(start, "train_iterator", lambda *a, **k: Failing(real(*a, **k)))
    else:  # the reads go on (cached chunks): the next save notices
        real_step = loop.train_step_for

        def replacing(spec, mesh=None):
            step = real_step(spec, mesh)

            def wrapped(batch, ts):
                ts, m = step(batch, ts)
                if int(ts.step) == 3:
                    prepare_from(other, store)
                return ts, m

            return wrapped

        monkeypatch.setattr(loop, "train_step_for", replacing)
    assert main(cli_args(str(store), run_dir, "train.steps=6")) == 1
    err = one_line_error(capsys)
    assert f"{store} changed while this run was reading it" in err
    assert "--accept-store-change" in err
    assert Checkpointer(run_dir).steps() == ([] if when == "read" else [2])


# 4. Smaller items.

def test_a_kill_before_the_final_evaluation_is_made_good_by_the_rerun(text_store, tmp_path,
                                                                      monkeypatch):
    from rtlib.train import eval_and_sample

    run_dir = tmp_path / "run"
    spec = spec_for(text_store, run_dir, "train.steps=2", "run.sample_tokens=4")

    def killed(self, step):
        raise KeyboardInterrupt  # what a kill right after the last checkpoint leaves

    with monkeypatch.context() as m:
        m.setattr(eval_and_sample.Validation, "at_end", killed)
        with pytest.raises(KeyboardInterrupt):
            train(spec, progress=False, print_fn=quiet)
    assert Checkpointer(run_dir).steps() == [2]
    assert not [r for r in metrics(run_dir) if "split" in r]
    said = []
    result = train(spec, progress=False, print_fn=said.append)
    assert result.eval is not None and result.eval["step"] == 2 and result.sample is not None
    assert any("final evaluation and sample are missing: making them now" in s for s in said)
    ends = [(r["step"], r["split"]) for r in metrics(run_dir) if "split" in r]
    assert ends == [(2, "valid"), (2, "sample")]
    said.clear()
    again = train(spec, progress=False, print_fn=said.append)
    assert again.eval is None and again.sample is None and "nothing to do" in said[-1]
    assert [(r["step"], r["split"]) for r in metrics(run_dir) if "split" in r] == ends


@pytest.mark.parametrize("case", ["run.dir is a file", "run.dir under a file",
                                  "run.dir unwritable", "metrics.jsonl is a directory"])
def test_an_unusable_run_directory_is_one_line(text_store, tmp_path, monkeypatch, capsys, case):
    run_dir = tmp_path / "run"
    if case == "run.dir is a file":
        run_dir.write_text("x")
        expected = f"run.dir {run_dir} is a file, not a directory"
    elif case == "run.dir under a file":
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
        expected = f"run.dir {run_dir} cannot be created: {tmp_path / 'file'} is a file"
    elif case == "run.dir unwritable":
        run_dir.mkdir()
        real_open = os.open

        def refused(path, *args, **kwargs):  # what a read-only directory answers (non-root)
            if str(path).startswith(str(run_dir)):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refused)
        expected = f"run.dir {run_dir} is not writable (Permission denied)"
    else:
        (run_dir / "metrics.jsonl").mkdir(parents=True)
        expected = f"{run_dir / 'metrics.jsonl'} is not a file"
    assert main(cli_args(text_store, run_dir, "train.steps=2")) == 1
    assert expected in one_line_error(capsys)
    if case == "metrics.jsonl is a directory":
        assert main(["plot", str(run_dir)]) == 1
        assert expected in one_line_error(capsys)


def test_a_damaged_checkpoint_is_reported_in_one_readable_line(four_steps, tmp_path):
    run_dir = copy_of(four_steps, tmp_path)
    latest = run_dir / "checkpoints" / "4"
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d" and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError) as caught:
        load_run(run_dir)
    err = str(caught.value)
    assert f"checkpoint {latest.resolve()} (step 4) cannot be restored" in err
    assert "\n" not in err and "tensorstore_spec" not in err and "driver" not in err
    assert len(err) < 800 and "resume from step 3" in err


def test_load_run_and_the_lock_file_leave_a_finished_run_alone(four_steps):
    before = sorted(p.relative_to(four_steps) for p in four_steps.rglob("*"))
    _, ts, step = load_run(four_steps)
    assert step == int(ts.step) == 4
    assert sorted(p.relative_to(four_steps) for p in four_steps.rglob("*")) == before
