"""The optimiser and learning-rate schedule a spec's `train` section asks for (optax)."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from rtlib.parallel.rules import param_info
from rtlib.spec.schema import TrainSpec


def learning_rate(train: TrainSpec) -> optax.Schedule:
    """lr as a function of the optimiser step counter (0 for the first update).

    Warm-up is linear from lr / warmup_steps at the first update to lr after warmup_steps
    updates (never exactly 0, so the first step is not wasted)."""
    peak, warm = train.lr, train.warmup_steps

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1.0
        ramp = jnp.minimum(1.0, t / warm) if warm else jnp.asarray(1.0, jnp.float32)
        if train.schedule == "constant":
            after = jnp.asarray(1.0, jnp.float32)
        elif train.schedule == "rsqrt":
            after = jnp.sqrt(max(warm, 1) / jnp.maximum(t, max(warm, 1)))
        else:
            span = max((train.decay_steps or train.steps) - warm, 1)
            frac = jnp.clip((t - warm) / span, 0.0, 1.0)
            cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
            after = train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cos
        return peak * ramp * after

    return schedule


def decay_mask(params: PyTree) -> PyTree[bool]:
    """True where the layers declare weight decay (projection and embedding matrices); False on
    norms, biases, learned positions and anything undeclared."""
    return jax.tree.map(lambda _, info: info is not None and info.decay, params,
                        param_info(params))


def schedule_key(train: TrainSpec) -> dict:
    """The `train` settings that shape the compiled step: `steps` only matters to a cosine
    schedule without `decay_steps` (so raising it to extend a run reuses the compiled step)."""
    fields = train.model_dump(mode="json")
    if train.schedule != "cosine" or train.decay_steps is not None:
        fields.pop("steps")
    return fields


def make_optimizer(train: TrainSpec) -> optax.GradientTransformation:
    """AdamW or Adafactor on `learning_rate(train)`, decaying matrices only (`decay_mask`),
    after global-norm clipping when `train.clip_norm` is set."""
    schedule = learning_rate(train)
    if train.optimizer == "adamw":
        core = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                           mask=decay_mask)
    else:
        core = optax.adafactor(schedule, decay_rate=train.b2, momentum=train.b1 or None,
                               weight_decay_rate=train.weight_decay or None,
                               weight_decay_mask=decay_mask)
    if train.clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(train.clip_norm), core)
