"""Training objectives built on the model's pure forward pass."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.model import RoutingTransformer, Stats
from rtlib.routing import RoutingState


def next_token_loss(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq_plus_one"],
    *,
    key: PRNGKeyArray | None = None,
    mask: Bool[Array, "batch seq_plus_one"] | None = None,
    targets_mask: Bool[Array, "batch seq_plus_one"] | None = None,
    inference: bool = False,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""], Stats]]:
    """Language-model loss on `tokens[:, :-1] -> tokens[:, 1:]`.

    Returns `(loss, (lm_loss, commit_loss, stats))` with `loss = lm_loss + commit_loss`, ready for
    `eqx.filter_value_and_grad(..., has_aux=True)`. `lm_loss` is the mean cross-entropy in nats
    over target positions where `mask` is True (`mask` marks padding: masked tokens are not
    seen either) and, if given, `targets_mask` is True (positions scored, still seen as
    context: e.g. a synthetic task's answers). `stats` feed `model.update_state`.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_mask = None if mask is None else mask[:, :-1]
    weight = jnp.ones(targets.shape, jnp.float32) if mask is None else \
        (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    if targets_mask is not None:
        weight = weight * targets_mask[:, 1:].astype(jnp.float32)
    logits, stats = model(inputs, state, key=key, mask=in_mask, inference=inference)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    lm_loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    commit = model.aux_loss(stats)
    return lm_loss + commit, (lm_loss, commit, jax.lax.stop_gradient(stats))
