"""Checkpoints of a run directory, with orbax-checkpoint.

`RUN_DIR/checkpoints/<step>/` holds two items: `state` (every array of the `TrainState`:
parameters, optimiser and routing state, step, RNG key) and `meta` (JSON: step, the resolved
spec, the data iterator's state, tokens seen). orbax writes each checkpoint into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest usable one. On several processes every process writes its own shards
of the arrays (orbax coordinates them); process 0 writes the JSON. Saving is synchronous: the step's buffers are donated to
the next step, and the iterator state must be the one matching these arrays.
"""

import json
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

    def __init__(self, run_dir: str | Path, *, keep: int = 3):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
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
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(arrays)))["state"]
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(self._damaged(step, f"{type(e).__name__}: {e}")) from None
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(arrays), strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(self._damaged(step, "array shapes differ from the spec's"))
        return eqx.combine(restored, static), meta

    def _damaged(self, step: int, why: str) -> str:
        others = [s for s in self.steps() if s != step]
        hint = (f"move {self.directory / str(step)} aside to resume from step {others[-1]}"
                if others else "no other checkpoint is left; start a new run directory")
        return (f"checkpoint {self.directory / str(step)} cannot be restored ({why}). Nothing "
                f"was deleted; {hint}")

    def close(self) -> None:
        self.manager.close()
