"""The Routing Transformer: embeddings, groups of identical blocks run by `lax.scan`, output.

The forward pass is pure. It reads the routing state and returns routing *statistics*; the
state only changes through `update_state` (one EMA step per optimiser step, after statistics
are summed over micro-batches and data-parallel replicas) or `init_routing`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.attention import LayerCache
from rtlib.nn.block import Block
from rtlib.nn.cross_attention import EncoderOutput
from rtlib.nn.feed_forward import FEED_FORWARD_INPUT
from rtlib.nn.layers import AxisPositions, Embedding, LayerNorm, Linear, dropout
from rtlib.parallel.rules import Declarations, ParamInfo, Stacked
from rtlib.routing import KMeansState, RoutingState, RoutingStats, update_routing_state
from rtlib.routing.assign import ROUTING_DECISIONS

Stats = tuple[RoutingStats | None, ...]


class RoutingTransformer(eqx.Module):
    """Decoder-only LM (causal) or encoder. `stages[i]` is a group of consecutive layers with the
    same head mix, its array leaves stacked on a leading layer axis. As the decoder of an
    encoder-decoder (`rtlib.nn.seq2seq`) its blocks cross-attend to the `memory` it is given."""

    embed: Embedding
    embed_proj: Linear | None
    # absolute positions: a table over seq_len, per-axis tables (images), or none
    positions: Float[Array, "seq dmodel"] | AxisPositions | None
    stages: tuple[Block, ...]
    final_norm: LayerNorm | None
    unembed: Linear | None
    causal: bool = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    scan_unroll: int = eqx.field(static=True)
    commitment: float = eqx.field(static=True)
    ema_decay: float = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    init_iters: int = eqx.field(static=True)

    def declare_params(self) -> Declarations:
        """The learned position table (rows are positions: never split; not a projection, so
        not decayed; per-axis tables declare their own) and the layer axis `lax.scan` runs
        over in front of every stage's arrays; the layers declare the rest."""
        return {"positions": ParamInfo((None, "embed"), decay=False), "stages": Stacked((None,))}

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[Array, "batch seq"] | None = None,
        inference: bool = False,
        memory: EncoderOutput | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], Stats]:
        """Logits and per-stage routing statistics (summed over the batch).

        `key` drives dropout and is required in training when dropout > 0. `mask` marks real
        (non-padding) tokens. `inference=True` disables dropout; the state is never changed here.
        `memory`: the encoder output that the blocks of an encoder-decoder's decoder read.
        Token ids must lie in [0, vocab_size): JAX gathers fill an id outside it with NaN, so
        its logits (and the loss) are NaN. Not checked here (a check would put a host callback
        in every compiled step); `rtlib train` checks the store's tokenizer against the spec.
        """
        logits, stats, _ = self._forward(tokens, state, key=key, mask=mask, inference=inference,
                                         memory=memory)
        return logits, stats

    def aux_loss(self, stats: Stats) -> Float[Array, ""]:
        """Commitment loss: beta * sum over routing layers of each layer's mean squared error."""
        total = jnp.zeros((), jnp.float32)
        for s in stats:
            if s is not None:
                total = total + jnp.sum(s.commit_loss)
        return self.commitment * total

    def update_state(self, state: RoutingState, stats: Stats) -> RoutingState:
        """One EMA step of every routing layer from globally summed statistics."""
        return update_routing_state(state, stats, decay=self.ema_decay, epsilon=self.epsilon)

    def init_routing(
        self,
        tokens: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray,
        mask: Bool[Array, "batch seq"] | None = None,
        memory: EncoderOutput | None = None,
    ) -> RoutingState:
        """Data-dependent init: each routing layer runs `routing.init_iters` Lloyd steps on its
        own q (and k) for this
        batch, layer by layer in one forward pass (later layers see initialised earlier ones).
        Pass a global batch; the result is marked initialised."""
        _, _, used = self._forward(tokens, state, key=None, mask=mask, inference=True,
                                   memory=memory,
                                   init_key=key, init_iters=self.init_iters)
        stages = tuple(None if c is None else KMeansState.from_centroids(c) for c in used)
        return RoutingState(stages, jnp.asarray(True))

    def prefill(
        self,
        tokens: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        capacity: int,
        memory: EncoderOutput | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], "DecodeCache"]:
        """Inference over a prompt in one pass: its logits (equal to `__call__`'s) and the cache
        that `decode` continues from. `capacity`: the longest sequence the cache will hold
        (prompt plus generated tokens); only full heads and balanced routing heads need it.
        Prompts of a batch share one length (no padding mask here)."""
        self._check(tokens.shape[1], state)
        if not self.causal:
            raise ValueError("prefill/decode generate left to right: they need a decoder "
                             "(model.kind: decoder)")
        if capacity < tokens.shape[1]:
            raise ValueError(f"capacity={capacity} is smaller than the prompt "
                             f"({tokens.shape[1]} tokens)")
        h = self._embed(tokens, 0)
        caches = []
        for blocks, kstate in zip(self.stages, state.stages, strict=True):
            params, static = eqx.partition(blocks, eqx.is_array)

            def body(x, xs, static=static):
                p, mu = xs
                return eqx.combine(p, static).prefill(x, mu, capacity=capacity, memory=memory)

            centroids = None if kstate is None else kstate.centroids
            h, cache = jax.lax.scan(body, h, (params, centroids))
            caches.append(cache)
        return self._logits(h), DecodeCache(tuple(caches), jnp.asarray(tokens.shape[1], jnp.int32),
                                            capacity)

    def decode(
        self,
        token: Int[Array, " batch"],
        state: RoutingState,
        cache: "DecodeCache",
    ) -> tuple[Float[Array, "batch vocab"], "DecodeCache"]:
        """Logits of the next position after one more token, and the extended cache."""
        pos = cache.pos
        if self.positions is not None:  # a learned table would silently clamp
            pos = eqx.error_if(pos, pos >= self.seq_len, "decode: position beyond seq_len, "
                               "where the learned position embeddings end")
        if any(c.holds_every_token for layer in cache.stages for c in layer):
            pos = eqx.error_if(pos, pos >= cache.capacity, "decode: the cache is full "
                               "(prefill with a larger capacity)")
        h = self._embed(token[:, None], pos)
        caches = []
        for blocks, kstate, stage_cache in zip(self.stages, state.stages, cache.stages,
                                               strict=True):
            params, static = eqx.partition(blocks, eqx.is_array)

            def body(x, xs, static=static):
                p, mu, c = xs
                return eqx.combine(p, static).decode(x, mu, c, pos)

            centroids = None if kstate is None else kstate.centroids
            h, new = jax.lax.scan(body, h, (params, centroids, stage_cache))
            caches.append(new)
        return self._logits(h)[:, 0], DecodeCache(tuple(caches), pos + 1, cache.capacity)

    def _check(self, n: int, state: RoutingState) -> None:
        # Learned positions stop at seq_len; rotary (or no) positions run longer sequences.
        if n > self.seq_len and self.positions is not None:
            raise ValueError(f"sequence of {n} tokens exceeds the model's seq_len={self.seq_len} "
                             "(learned position embeddings end there)")
        if len(state.stages) != len(self.stages):
            raise ValueError(f"routing state has {len(state.stages)} groups; the model has "
                             f"{len(self.stages)}: was it built from another spec?")

    def _embed(self, tokens, offset):
        h = self.embed(tokens)
        if self.embed_proj is not None:
            h = self.embed_proj(h)
        if isinstance(self.positions, AxisPositions):
            h = h + self.positions(offset + jnp.arange(tokens.shape[1]))[None]
        elif self.positions is not None:
            h = h + jax.lax.dynamic_slice_in_dim(self.positions, offset, tokens.shape[1])[None]
        return h

    def _logits(self, h):
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.unembed is not None:
            return self.unembed(h)
        if self.embed_proj is not None:
            h = h @ self.embed_proj.weight.T
        return self.embed.attend(h)

    def _forward(self, tokens, state, *, key, mask, inference, init_key=None, init_iters=10,
                 memory=None):
        self._check(tokens.shape[1], state)
        if key is None and self.dropout > 0 and not inference:
            raise ValueError("dropout > 0 in training needs a `key` (or pass inference=True)")
        keys = [None] * (len(self.stages) + 1) if key is None else \
            list(jax.random.split(key, len(self.stages) + 1))
        init_keys = [None] * len(self.stages) if init_key is None else \
            list(jax.random.split(init_key, len(self.stages)))
        h = dropout(self._embed(tokens, 0), self.dropout, keys[-1], inference)
        stats, used = [], []
        for blocks, kstate, k, ik in zip(self.stages, state.stages, keys, init_keys, strict=False):
            centroids = None if kstate is None else kstate.centroids
            h, s, c = scan_blocks(blocks, h, centroids, mask=mask, key=k, inference=inference,
                                  init_key=ik, init_iters=init_iters, remat=self.remat,
                                  memory=memory,
                                   unroll=self.scan_unroll)
            stats.append(s)
            used.append(c)
        return self._logits(h), tuple(stats), tuple(used)


class DecodeCache(eqx.Module):
    """Decoding state of a whole model: per stage, the layer-stacked caches of each head kind
    (`rtlib.nn.heads`), and the position of the next token. Its size does not depend on how many tokens were generated."""

    stages: tuple[LayerCache, ...]
    pos: Int[Array, ""]
    capacity: int = eqx.field(static=True)  # tokens the full / balanced buffers can hold


def scan_blocks(blocks, h, centroids, *, mask, key, inference, init_key, init_iters, remat,
                unroll=1, memory=None):
    """Run a stack of identical blocks with `lax.scan`, so compile time does not grow with depth.
    `memory`: the encoder output blocks with cross-attention read (the same in every layer)."""
    params, static = eqx.partition(blocks, eqx.is_array)
    n_layers = jax.tree.leaves(params)[0].shape[0]
    keys = None if key is None else jax.random.split(key, n_layers)
    init_keys = None if init_key is None else jax.random.split(init_key, n_layers)

    def body(x, xs):
        p, c, k, ik = xs
        block = eqx.combine(p, static)
        x, stats, used = block(x, c, mask=mask, key=k, inference=inference, init_key=ik,
                               init_iters=init_iters, memory=memory)
        return x, (stats, used)

    # remat keeps the routing decisions (a few integers per token) and the feed-forward input
    # (which its backward pass needs anyway) and recomputes the rest
    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(
            ROUTING_DECISIONS, FEED_FORWARD_INPUT))
    h, (stats, used) = jax.lax.scan(body, h, (params, centroids, keys, init_keys),
                                    unroll=min(unroll, n_layers))
    return h, stats, used
