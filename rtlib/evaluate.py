"""Scoring a model on a split of a token store: nll, bits per token and per byte, perplexity."""

import contextlib
import math

import equinox as eqx
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from rtlib.data.pipeline import eval_batches
from rtlib.data.store import TokenStore
from rtlib.nn.model import RoutingTransformer
from rtlib.parallel import activate, from_global
from rtlib.parallel.rules import batch_sharding, rules_key
from rtlib.routing import RoutingState
from rtlib.spec.schema import AxisRules


@eqx.filter_jit
def _nll_sum(model: RoutingTransformer, routing: RoutingState,
             tokens: Int[Array, "batch seq_plus_one"], mask: Bool[Array, "batch seq_plus_one"],
             layout: str) -> tuple[Float[Array, ""], Float[Array, ""]]:
    # layout: the active rules (static), see `rtlib.parallel.rules.rules_key`
    logits, _ = model(tokens[:, :-1], routing, mask=mask[:, :-1], inference=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         tokens[:, 1:])
    weight = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(ce * weight), jnp.sum(weight)


def evaluate(model: RoutingTransformer, routing: RoutingState, store: TokenStore, split: str, *,
             batch_size: int, max_tokens: int | None = None, mesh: Mesh | None = None,
             rules: AxisRules | None = None) -> dict:
    """Every target token of the split (or its first `max_tokens`) scored once, in consecutive
    windows of the model's seq_len. Byte-level tokens: bits per byte = bits per token.
    With a `mesh` (the model sharded on it), batches are split over its data axes; every
    process passes the same arguments."""
    total_nll, total = 0.0, 0.0
    rows = None if mesh is None else batch_sharding(mesh, rules)
    with contextlib.nullcontext() if mesh is None else activate(mesh, rules):
        for tokens, mask in eval_batches(store, split, seq_len=model.seq_len,
                                         batch_size=batch_size, max_tokens=max_tokens):
            if rows is None:
                tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
            else:
                tokens, mask = from_global(tokens, rows), from_global(mask, rows)
            nll, count = _nll_sum(model, routing, tokens, mask,
                                  "" if mesh is None else rules_key(rules or AxisRules()))
            total_nll += float(nll)
            total += float(count)
    nll = total_nll / total
    bytes_per_token = 1.0  # byte tokenizer; a subword tokenizer would record its ratio
    return {"split": split, "tokens": int(total), "nll": nll, "bits_per_token": nll / math.log(2),
            "bits_per_byte": nll / math.log(2) / bytes_per_token, "perplexity": math.exp(nll)}

