"""One step of the training loop: the next global batch, the jitted step, the health check
(finite loss, gradient and parameters, a bounded update: `finite.check_finite`).

Every process reads its own rows of the global batch from its grain iterator; the jitted step
(on the spec's mesh, donating the previous state) advances the session's state in place. The
first batch of a run also initialises the routing centroids when `routing.init: kmeans` asks.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
from jaxtyping import Array

from rtlib import parallel
from rtlib.train.finite import check_finite
from rtlib.train.start import Session
from rtlib.train.step import TrainState, init_routing

_ROUTING_SEED = 0x5EED  # folded into run.seed: the k-means draws, apart from the model's


@dataclass
class StepOutcome:
    """What one step reports: its metrics (device scalars), the loss and gradient norm as
    floats (already checked finite), and its wall time."""

    step: int
    metrics: dict[str, Array]
    loss: float
    grad_norm: float
    seconds: float


class Stepper:
    """Advances a `Session` one step per call with `step_fn` (`train_step_for`'s step);
    `note` tells the user about one-off events (the routing initialisation)."""

    def __init__(self, session: Session,
                 step_fn: Callable[[Array, TrainState], tuple[TrainState, dict[str, Array]]],
                 note: Callable[[str], None]):
        self.session = session
        self.step_fn = step_fn
        self.note = note
        spec = session.spec
        self.tokens_per_step = spec.train.batch_size * spec.model.seq_len
        self.with_answers = spec.train.loss_on == "answers"

    def __call__(self, step: int) -> StepOutcome:
        """Take step `step`; raises `NonFiniteLoss` (the state unsaved, see `finite`) if it
        diverged, `StoreError` if the token store was replaced while the run read it."""
        s = self.session
        t0 = time.perf_counter()
        try:
            batch = next(s.data)
        except Exception:
            s.check_store(step - 1, collective=False)  # a replaced store: say so
            raise
        tokens = parallel.global_batch(batch, s.rows, s.batch_shape)
        if not bool(s.ts.routing.initialised):
            s.ts = init_routing(tokens[:, 0] if self.with_answers else tokens, s.ts,
                                key=jax.random.fold_in(jax.random.key(s.spec.run.seed),
                                                       _ROUTING_SEED),
                                mesh=s.mesh, rules=s.spec.mesh.rules)
            self.note("routing centroids initialised by k-means on the first batch")
        s.ts, metrics = self.step_fn(tokens, s.ts)
        health = {k: float(v) for k, v in jax.device_get(
            {k: metrics[k] for k in ("loss", "grad_norm", "param_norm", "update_ratio")}).items()}
        loss, grad_norm = health["loss"], health["grad_norm"]
        check_finite(loss, grad_norm, step=step, checkpointer=s.checkpointer,
                     param_norm=health["param_norm"], update_ratio=health["update_ratio"],
                     max_update_ratio=s.spec.train.max_update_ratio, primary=s.primary)
        seconds = time.perf_counter() - t0
        s.tokens_seen += self.tokens_per_step
        return StepOutcome(step=step, metrics=metrics, loss=loss, grad_norm=grad_norm,
                           seconds=seconds)
