"""Checkpoints of a run directory, with orbax-checkpoint.

`RUN_DIR/checkpoints/<step>/` holds two items: `state` (every array of the `TrainState`:
parameters, optimiser and routing state, step, RNG key) and `meta` (JSON: step, the resolved
spec, the data iterator's state, tokens seen). orbax writes each checkpoint into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest usable one. On several processes every process writes its own shards
of the arrays (orbax coordinates them); process 0 writes the JSON. Saving is synchronous: the step's buffers are donated to
the next step, and the iterator state must be the one matching these arrays.

A checkpoint found to hold diverged parameters is moved out of `checkpoints/` into
`RUN_DIR/diverged/<step>` (`set_aside`), so resuming takes the newest good one and nothing is
deleted. Error messages are one line naming the checkpoint (tensorstore's spec dumps cut out).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import equinox as eqx
import jax
import orbax.checkpoint as ocp

from rtlib.errors import CheckpointError
from rtlib.parallel.rules import is_array_leaf
from rtlib.train.step import TrainState


class Checkpointer:
    """The checkpoints of one run directory: save, list, read and restore them; orbax prunes
    all but the newest `keep`. Close it when done (orbax holds threads and files)."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, create: bool = True):
        """`create=False` for readers (evaluate, generate): nothing is created on disk."""
        self.directory = Path(run_dir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=False),
        )

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, ts: TrainState, meta: dict) -> None:
        step = int(ts.step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(eqx.filter(ts, eqx.is_array)),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(self._damaged(step, f"its meta data ({path}) is unreadable: "
                                                      f"{e}")) from None

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        """The state saved at `step` with `like`'s structure, and its meta data. `like` is an
        initialised state of the same spec or an `abstract_state` (shapes and shardings):
        arrays come back in `like`'s shardings, whatever mesh saved them."""
        meta = self.read_meta(step)
        arrays, static = eqx.partition(like, is_array_leaf)
        _drop_orphaned_read_errors()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(arrays)))["state"]
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(self._damaged(step, readable(e))) from None
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(arrays), strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(self._damaged(step, "array shapes differ from the spec's"))
        return eqx.combine(restored, static), meta

    def set_aside(self, step: int) -> Path:
        """Move checkpoint `step` out of the way (to `RUN_DIR/diverged/<step>`, or
        `<step>-2`, ... if taken) so that it is no longer resumed from; returns where it went.
        Only one process may call it."""
        root = self.directory.parent / "diverged"
        target, n = root / str(step), 1
        try:
            root.mkdir(exist_ok=True)
            while target.exists():
                n += 1
                target = root / f"{step}-{n}"
            shutil.move(self.directory / str(step), target)
        except OSError as e:
            raise CheckpointError(f"checkpoint {step} of {self.directory} failed the health check "
                                  f"but could not be moved to {root} ({e.strerror or e}): move "
                                  "it aside by hand before resuming") from None
        self.manager.reload()
        return target

    def _damaged(self, step: int, why: str) -> str:
        others = [s for s in self.steps() if s != step]
        hint = (f"move {self.directory / str(step)} aside to resume from step {others[-1]}"
                if others else "no other checkpoint is left; start a new run directory")
        return (f"checkpoint {self.directory / str(step)} (step {step}) cannot be restored "
                f"({why}). Nothing was deleted; {hint}")

    def close(self) -> None:
        self.manager.close()


def _drop_orphaned_read_errors() -> None:
    """When a restore fails (a damaged file), orbax closes its event loop at the first error
    while tensorstore still reads the other arrays; each of those reads then completes onto the
    closed loop, and Python reports the `RuntimeError("Event loop is closed")` raised in its
    callback as an unraisable exception: a traceback on stderr per array, around the one-line
    error. Installed once (chained to the previous `sys.unraisablehook`), this drops exactly
    those and passes every other unraisable exception on."""
    previous = sys.unraisablehook
    if getattr(previous, "rtlib_orphaned_reads", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.rtlib_orphaned_reads = True
    sys.unraisablehook = hook


# tensorstore appends its whole JSON spec to every error, twice: `[tensorstore_spec='{...}']`.
_TS_SPEC = re.compile(r"\s*\[tensorstore_spec(?:\[\d+\])?='(?:[^'\\]|\\.)*'\]")
_DRIVER = re.compile(r'Error opening "\w+" driver: ')


def readable(e: BaseException, limit: int = 400) -> str:
    """An orbax/tensorstore exception as one readable line: its type and message without
    tensorstore's spec dumps and driver chains, whitespace collapsed, at most `limit` chars."""
    text = _DRIVER.sub("", _TS_SPEC.sub("", str(e)))
    text = " ".join(text.split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"
