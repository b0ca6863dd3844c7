"""A run directory: `spec.yaml` (the resolved spec), `checkpoints/`, `metrics.jsonl`, plots,
`diverged/` (checkpoints set aside after a divergence) and `.lock`.

Opening a run for evaluation or sampling, refusing to resume a run whose arrays a changed
spec would not fit, and the lock that keeps a second trainer out of a live run directory.
"""

import errno
import fcntl
import os
import socket
from pathlib import Path

import equinox as eqx
import jax
import yaml
from jax.sharding import Mesh

from rtlib.errors import CheckpointError, RunError
from rtlib.parallel import single_device_mesh
from rtlib.spec.load import SpecError, validate_spec
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.metrics_log import METRICS_FILE  # noqa: F401  (its format's module owns it)
from rtlib.train.step import TrainState, abstract_state, init_train_state

SPEC_FILE = "spec.yaml"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
_ROTATION_RETRIES = 5  # a reader racing a live run's `run.keep` takes the new latest this often


def make_run_dir(run_dir: Path) -> None:
    """Create `run_dir` (and its parents) if needed; RunError in one line when it is a file,
    lies under a file or cannot be created."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunError(f"run.dir {run_dir} is a file, not a directory; choose another "
                       "run.dir") from None
    except OSError as e:
        blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
        why = (f"{blocker} is a file" if blocker is not None and not blocker.is_dir()
               else e.strerror or type(e).__name__)
        raise RunError(f"run.dir {run_dir} cannot be created: {why}; choose another "
                       "run.dir") from None
    if not run_dir.is_dir():
        raise RunError(f"run.dir {run_dir} is not a directory; choose another run.dir")


class RunLock:
    """An exclusive `flock` on `RUN_DIR/.lock` for the lifetime of a training run, holding the
    owner's pid and host. The lock dies with its process, so a killed trainer's lock never
    blocks; the file itself stays (deleting lock files races)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock: RunError naming the holder when another process has it, or the
        directory is not writable. Returns a note instead when the file system cannot lock
        at all (the run goes on, unprotected)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"run.dir {self.run_dir} is not writable ({e.strerror}); choose "
                           "another run.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"{self.run_dir} is in use by another training run "
                    f"({holder or 'a process that is just starting'}); wait for it to end or "
                    f"stop it, or use another run.dir") from None
            return (f"note: cannot lock {self.path} ({e.strerror}): a second trainer on this "
                    "run directory would not be noticed")
        self.fd = fd
        try:  # who holds it, for the message a second trainer gets; the lock is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass
        return None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            finally:
                os.close(self.fd)  # closing drops the flock
                self.fd = None


def write_spec(run_dir: Path, spec: Spec) -> None:
    path = run_dir / SPEC_FILE
    tmp = path.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(f"# Resolved spec of this run (written by rtlib train).\n"
                       f"{yaml.safe_dump(spec.model_dump(mode='json'), sort_keys=False)}")
        tmp.replace(path)
    except OSError as e:
        raise RunError(f"{path}: cannot write the run's spec ({e.strerror or e})") from None


def fresh_state(spec: Spec) -> TrainState:
    """The spec's initial state on the default device (`init_sharded` lays it on a mesh)."""
    return init_train_state(spec, key=jax.random.key(spec.run.seed))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, as `key: old -> new`."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def check_compatible(saved: dict, spec: Spec, run_dir: Path) -> list[str]:
    """Refuse (RunError) when the arrays of `spec` differ in shape from the saved run's; else
    return the keys that changed (allowed, e.g. train.steps or train.lr)."""
    old = validate_spec(saved, source=str(run_dir / SPEC_FILE))
    changes = spec_changes(old.model_dump(mode="json"), spec.model_dump(mode="json"))

    def shapes(s: Spec):
        abstract = eqx.filter_eval_shape(init_train_state, s, key=jax.random.key(0))
        return jax.tree.structure(abstract), [(x.shape, x.dtype) for x in
                                              jax.tree.leaves(abstract)]

    if changes and shapes(old) != shapes(spec):
        shaping = [c for c in changes if c.split(":")[0].startswith(("model.", "train."))]
        raise RunError(
            f"{run_dir} was trained with another spec, and this one changes the shapes of its "
            f"arrays, so it cannot resume there. Changed keys:\n  " + "\n  ".join(shaping) +
            f"\nUse a new run.dir (e.g. `run.dir={run_dir}-2`), or the spec in "
            f"{run_dir / SPEC_FILE}.")
    return changes


def load_run(run_dir: str | Path, step: int | None = None, *,
             mesh: Mesh | None = None) -> tuple[Spec, TrainState, int]:
    """(spec, trained state, step) of a run directory's latest (or given) checkpoint, its
    arrays laid out on `mesh` (default: one device), whatever mesh trained it."""
    run_dir = Path(run_dir)
    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory ({SPEC_FILE} is missing); train one "
                       f"with `rtlib train SPEC run.dir={run_dir}`")
    try:
        spec = validate_spec(yaml.safe_load(path.read_text()), source=str(path))
    except (SpecError, yaml.YAMLError) as e:
        raise RunError(f"{path}: unreadable run spec: {e}") from None
    if not (run_dir / CHECKPOINTS).is_dir():
        raise RunError(f"{run_dir}: no checkpoint yet (the run has not saved one)")
    ckpt = Checkpointer(run_dir, keep=spec.run.keep, create=False)
    try:
        like = abstract_state(spec, mesh or single_device_mesh())
        for attempt in range(_ROTATION_RETRIES):
            steps = ckpt.steps()
            if not steps:
                raise RunError(f"{run_dir}: no checkpoint yet (the run has not saved one)")
            chosen = steps[-1] if step is None else step
            if chosen not in steps:
                raise RunError(f"{run_dir}: no checkpoint at step {step}; there are {steps}")
            try:
                ts, _ = ckpt.restore(chosen, like)
                return spec, ts, chosen
            except CheckpointError:
                if chosen in ckpt.steps() or attempt == _ROTATION_RETRIES - 1:
                    raise  # really damaged (or a run saving faster than we can read)
                if step is not None:  # the asked-for step was rotated away by a live run
                    raise RunError(f"{run_dir}: checkpoint {step} was deleted while being "
                                   f"read (the run keeps the newest run.keep={spec.run.keep});"
                                   f" there are now {ckpt.steps()}") from None
                # the latest was rotated away by a live run while we read it: take the new one
        raise AssertionError("unreachable")
    finally:
        ckpt.close()


