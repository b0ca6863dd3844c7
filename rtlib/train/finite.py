"""The finiteness check after every training step: a NaN or infinity stops the run unsaved.

A non-finite gradient poisons the parameters even when the step's loss is finite, so both are
checked, and the state after such a step must never reach a checkpoint: the last good one is
what the user resumes from, after lowering the learning rate.
"""

import math

from rtlib.errors import NonFiniteLoss
from rtlib.train.checkpoint import Checkpointer


def check_finite(loss: float, grad_norm: float, *, step: int,
                 checkpointer: Checkpointer) -> None:
    """Raise `NonFiniteLoss` (naming the quantity, the step and the checkpoint kept) unless
    both the loss and the gradient norm of `step` are finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    kept = checkpointer.latest()
    where = (f"The last good checkpoint (step {kept}) is kept in {checkpointer.directory}."
             if kept is not None else "No checkpoint had been written yet.")
    raise NonFiniteLoss(f"non-finite {what} at step {step}; stopped without saving. {where} "
                        "Lower train.lr, add warm-up or clipping, then run the same command "
                        "again.")
