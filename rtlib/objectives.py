"""Training objectives built on the model's pure forward pass."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.model import RoutingTransformer, Stats
from rtlib.routing import RoutingState


def next_token_nll(
    model: RoutingTransformer,
    state: RoutingState,
    tokens: Int[Array, "batch seq_plus_one"],
    *,
    key: PRNGKeyArray | None = None,
    mask: Bool[Array, "batch seq_plus_one"] | None = None,
    inference: bool = False,
) -> tuple[Float[Array, "batch seq"], Bool[Array, "batch seq"], Float[Array, "batch seq vocab"],
           Stats]:
    """Per-target cross-entropy in nats of `tokens[:, :-1] -> tokens[:, 1:]`: the one copy of
    the loss math that training (`next_token_loss`) and evaluation (`rtlib.runs.evaluate`)
    share, so their figures cannot drift apart.

    Returns `(nll, scored, logits, stats)`: `scored` marks targets that are real and follow a
    real token (`mask` marks padding, which the model does not see either); `logits` are
    float32, for metrics beyond the nll (e.g. greedy accuracy)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_mask = None if mask is None else mask[:, :-1]
    scored = jnp.ones(targets.shape, bool) if mask is None else mask[:, 1:] & mask[:, :-1]
    logits, stats = model(inputs, state, key=key, mask=in_mask, inference=inference)
    # float32 whatever the compute dtype: the log-softmax of a bf16 vocabulary is too coarse
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), scored, logits, stats


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
    ce, scored, _, stats = next_token_nll(model, state, tokens, key=key, mask=mask,
                                          inference=inference)
    weight = scored.astype(jnp.float32)
    if targets_mask is not None:
        weight = weight * targets_mask[:, 1:].astype(jnp.float32)
    lm_loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    commit = model.aux_loss(stats)
    return lm_loss + commit, (lm_loss, commit, jax.lax.stop_gradient(stats))
