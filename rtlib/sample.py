"""Sampling text from a trained model: temperature, top-k, top-p (nucleus); temperature 0 is
greedy. Every step recomputes the whole window (at most seq_len tokens), one compiled program
for all lengths: the sequence sits in a fixed buffer with a mask over its real tokens."""

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.errors import BadArgument
from rtlib.nn.model import RoutingTransformer
from rtlib.routing import RoutingState


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def check(self, vocab_size: int) -> None:
        """Raise BadArgument naming the bad argument."""
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise BadArgument(f"temperature must be a finite number >= 0 (0: greedy), got "
                             f"{self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise BadArgument(f"top_k must be between 1 and the vocabulary size {vocab_size}, "
                             f"got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BadArgument(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: Float[Array, " vocab"], top_k: int | None,
                  top_p: float | None) -> Float[Array, " vocab"]:
    """Logits outside the top-k and outside the smallest set with probability >= top_p get
    -inf. The most likely token always survives."""
    if top_k is not None:
        kth = jnp.sort(logits)[-top_k]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        before = jnp.cumsum(probs) - probs  # mass of strictly more likely tokens
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@eqx.filter_jit
def _next_token(model: RoutingTransformer, routing: RoutingState, buf: Int[Array, "1 seq"],
                mask: Bool[Array, "1 seq"], last: Int[Array, ""], key: PRNGKeyArray,
                temperature: Float[Array, ""], top_k: int | None, top_p: float | None,
                vocab_limit: int):
    logits, _ = model(buf, routing, mask=mask, inference=True)
    logits = logits[0, last].astype(jnp.float32)
    # ids the tokenizer cannot decode (a byte store under a larger vocabulary) are never drawn
    logits = jnp.where(jnp.arange(logits.shape[0]) < vocab_limit, logits, -jnp.inf)
    greedy = jnp.argmax(logits)
    scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(model: RoutingTransformer, routing: RoutingState, prompt: np.ndarray, *,
             max_new_tokens: int, sampling: Sampling, key: PRNGKeyArray,
             vocab_limit: int | None = None, on_token=None) -> np.ndarray:
    """`prompt` followed by `max_new_tokens` sampled tokens. The model sees the last seq_len
    tokens. Only ids below `vocab_limit` (default: the model's vocabulary) are drawn.
    `on_token(id)` is called as each token is produced (for streaming output)."""
    if not model.causal:
        raise ValueError("generation needs a decoder (model.kind: decoder)")
    if len(prompt) == 0:
        raise BadArgument("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise BadArgument(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.embed.weight.shape[0]
    sampling.check(vocab if vocab_limit is None else min(vocab, vocab_limit))
    limit = vocab if vocab_limit is None else min(vocab, vocab_limit)
    n = model.seq_len
    tokens = list(np.asarray(prompt, np.int32))
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    for i in range(max_new_tokens):
        window = tokens[-n:]
        buf = np.zeros((1, n), np.int32)
        buf[0, :len(window)] = window
        mask = np.zeros((1, n), bool)
        mask[0, :len(window)] = True
        nxt = int(_next_token(model, routing, jnp.asarray(buf), jnp.asarray(mask),
                              jnp.asarray(len(window) - 1), jax.random.fold_in(key, i),
                              temperature, sampling.top_k, sampling.top_p, limit))
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
    return np.asarray(tokens, np.int32)
