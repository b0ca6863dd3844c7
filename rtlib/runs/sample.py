"""Sampling text from a trained model: temperature, top-k, top-p (nucleus); temperature 0 is
greedy. Cached decoding by default; the recomputing path keeps the sequence in a fixed buffer
with a mask over its real tokens, so one compiled program serves every length."""

import functools
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.costs import check_fits
from rtlib.errors import BadArgument
from rtlib.nn.model import RoutingTransformer
from rtlib.routing import RoutingState


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: `temperature` (0: greedy), then optional top-k and top-p
    (nucleus) truncation; `check` validates it against a vocabulary."""

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


@functools.partial(jax.jit, static_argnames=("top_k", "top_p", "vocab_limit"))
def pick(logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: Float[Array, ""], *,
         top_k: int | None, top_p: float | None, vocab_limit: int) -> Int[Array, ""]:
    """The next token from one position's logits: greedy at temperature 0, else sampled from
    the filtered, tempered distribution. Ids >= `vocab_limit` (which the tokenizer cannot
    decode, e.g. a byte store under a larger vocabulary) are never drawn."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[0]) < vocab_limit, logits, -jnp.inf)
    greedy = jnp.argmax(logits)
    scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@eqx.filter_jit
def _window_logits(model: RoutingTransformer, routing: RoutingState, buf: Int[Array, "1 seq"],
                   mask: Bool[Array, "1 seq"], last: Int[Array, ""]) -> Float[Array, " vocab"]:
    logits, _ = model(buf, routing, mask=mask, inference=True)
    return logits[0, last]


_prefill = eqx.filter_jit(lambda model, routing, tokens, capacity: model.prefill(
    tokens, routing, capacity=capacity))
_decode = eqx.filter_jit(lambda model, routing, token, cache: model.decode(token, routing, cache))


def generate(model: RoutingTransformer, routing: RoutingState, prompt: np.ndarray, *,
             max_new_tokens: int, sampling: Sampling, key: PRNGKeyArray,
             vocab_limit: int | None = None, use_cache: bool = True,
             capacity: int | None = None, on_token=None) -> np.ndarray:
    """`prompt` followed by `max_new_tokens` sampled tokens; `on_token(id)` is called as each
    is produced (streaming). Only ids below `vocab_limit` (default: the vocabulary) are drawn.

    With `use_cache` (default) the prompt is processed in one pass (`model.prefill`) and every
    new token costs one `model.decode` step: local and causal-routing heads keep fixed-size
    buffers, so memory does not grow with the generated length. Without it, every step
    recomputes the whole sequence. A model with learned positions that would go past seq_len
    always recomputes, over a sliding window of the last seq_len tokens.
    For causal routing and local heads both give the same logits (to float rounding); balanced
    routing is approximated by the cache (see `rtlib.nn.heads.routing_cache.BalancedCache.attend`).
    `capacity` (default: prompt + new tokens) sizes the full-head and balanced buffers and the
    recomputed sequence; a larger value only costs memory and time.
    """
    if not model.causal:
        raise ValueError("generation needs a decoder (model.kind: decoder)")
    if len(prompt) == 0:
        raise BadArgument("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise BadArgument(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.embed.weight.shape[0]
    limit = vocab if vocab_limit is None else min(vocab, vocab_limit)
    sampling.check(limit)
    total = max(len(prompt) + max_new_tokens, capacity or 0)
    learned = model.positions is not None
    if learned and total - 1 > model.seq_len:
        # learned positions end at seq_len: only a sliding window of recomputation goes on
        use_cache = False
    span = model.seq_len if learned else total
    if use_cache:
        need, what = _cache_bytes(model, routing, total), f"a decoding cache of {total:,} positions"
    else:  # every step recomputes float32 logits (and their softmax) over the span
        need, what = 8 * span * vocab, f"logits over {span:,} positions"
    check_fits(need, f"generating {max_new_tokens:,} tokens ({what})", "--max-new-tokens")
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    choose = functools.partial(pick, temperature=temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, vocab_limit=limit)
    tokens = list(np.asarray(prompt, np.int32))
    if use_cache:
        logits, cache = _prefill(model, routing, jnp.asarray(tokens)[None], total)
        logits = logits[0, -1]
    for i in range(max_new_tokens):
        if not use_cache:
            window = tokens[-span:]
            buf = np.zeros((1, span), np.int32)
            buf[0, :len(window)] = window
            logits = _window_logits(model, routing, jnp.asarray(buf),
                                    jnp.asarray(np.arange(span)[None] < len(window)),
                                    jnp.asarray(len(window) - 1))
        nxt = choose(logits, jax.random.fold_in(key, i))
        tokens.append(int(nxt))
        if on_token is not None:
            on_token(int(nxt))
        if use_cache and i + 1 < max_new_tokens:
            logits, cache = _decode(model, routing, nxt[None], cache)
            logits = logits[0]
    return np.asarray(tokens, np.int32)


def _cache_bytes(model: RoutingTransformer, routing: RoutingState, capacity: int) -> int:
    """Bytes of the decoding cache `prefill` would build for `capacity` positions (shapes
    only: nothing is allocated)."""
    shapes = eqx.filter_eval_shape(
        lambda m, r: m.prefill(jnp.zeros((1, 1), jnp.int32), r, capacity=capacity)[1],
        model, routing)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
