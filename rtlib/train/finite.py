"""The health check after every training step: a diverged step stops the run unsaved, and the
checkpoint it proves bad is set aside, so the newest checkpoint left is a good one.

Two kinds of evidence, each pointing at a different state:

* The loss and gradient norm of step `t` are computed from the parameters after step `t - 1`
  (before step `t`'s update, so whatever `t`'s learning rate). If either is NaN or infinite,
  those parameters are bad: the checkpoint of step `t - 1`, if there is one, is moved to
  `RUN_DIR/diverged/` (otherwise rerunning with a lower learning rate would resume from it and
  fail again at once, forever).
* The parameters after step `t` itself: they must be finite, and the update must not have moved
  them by more than `train.max_update_ratio` (default 1) times their own norm
  (`||update|| / ||params||`, the global L2 norms, before the update). Healthy training moves
  them by about 1e-3 to 0.5 of that per step (Adam's per-parameter step is about the learning
  rate); a step that moves the weights by more than their whole size no longer refines them, it
  replaces them with numbers that only then overflow. Such a state is never saved.

So every checkpoint on disk passed the check on its own update, and the one just before a
non-finite step is set aside: the newest checkpoint left is what the user resumes from after
lowering the learning rate, and the message names it.
"""

import math

from rtlib.errors import NonFiniteLoss
from rtlib.train.checkpoint import Checkpointer

MAX_UPDATE_RATIO = 1.0  # default of train.max_update_ratio: largest ||update|| / ||params||


def check_finite(loss: float, grad_norm: float, *, step: int, checkpointer: Checkpointer,
                 param_norm: float | None = None, update_ratio: float | None = None,
                 max_update_ratio: float | None = MAX_UPDATE_RATIO,
                 primary: bool = True) -> None:
    """Raise `NonFiniteLoss` (naming the quantity, the step and the newest good checkpoint)
    unless the loss and gradient norm of `step` are finite, and the parameters after it are
    finite (`param_norm`) and moved by at most `MAX_UPDATE_RATIO` times their norm
    (`update_ratio`). On a non-finite loss or gradient the checkpoint of step `step - 1`, if
    any, is set aside (by process 0, `primary`; every process raises)."""
    bad: int | None = None
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
        problem = f"non-finite {what} at step {step}"
        if step - 1 in checkpointer.steps():
            bad = step - 1
    elif param_norm is not None and not math.isfinite(param_norm):
        problem = f"non-finite parameters after step {step} (parameter norm {param_norm})"
    elif (update_ratio is not None and max_update_ratio is not None
          and not update_ratio <= max_update_ratio):
        problem = (f"training diverged at step {step}: its update moved the parameters by "
                   f"{update_ratio:.3g} times their norm (more than train.max_update_ratio="
                   f"{max_update_ratio:g}; parameter norm now {param_norm:.3g})")
    else:
        return
    kept = [s for s in checkpointer.steps() if s != bad]
    moved = ""
    if bad is not None:
        where = checkpointer.directory.parent / "diverged" / str(bad)
        if primary:
            where = checkpointer.set_aside(bad)
        moved = (f" Checkpoint {bad} holds the parameters that produced it and was moved to "
                 f"{where}.")
    newest = (f"The newest good checkpoint is step {kept[-1]} in {checkpointer.directory}; "
              "lower train.lr, add warm-up or clipping, then run the same command again to "
              "resume from it." if kept else
              "No good checkpoint is left; lower train.lr, add warm-up or clipping, then run "
              "the same command again to start over from step 0.")
    raise NonFiniteLoss(f"{problem}; stopped without saving.{moved} {newest}")
