"""The Routing Transformer: embeddings, groups of identical blocks run by `lax.scan`, output.

The forward pass is pure. It reads the routing state and returns routing *statistics*; the
state only changes through `update_state` (one EMA step per optimiser step, after statistics
are summed over micro-batches and data-parallel replicas) or `init_routing`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.block import Block
from rtlib.nn.layers import Embedding, LayerNorm, Linear, dropout
from rtlib.routing import KMeansState, RoutingState, RoutingStats, update_routing_state

Stats = tuple[RoutingStats | None, ...]


class RoutingTransformer(eqx.Module):
    """Decoder-only LM (causal) or encoder. `stages[i]` is a group of consecutive layers with the
    same head mix, its array leaves stacked on a leading layer axis."""

    embed: Embedding
    embed_proj: Linear | None
    positions: Float[Array, "seq dmodel"] | None
    stages: tuple[Block, ...]
    final_norm: LayerNorm | None
    unembed: Linear | None
    causal: bool = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    commitment: float = eqx.field(static=True)
    ema_decay: float = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    init_iters: int = eqx.field(static=True)

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[Array, "batch seq"] | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq vocab"], Stats]:
        """Logits and per-stage routing statistics (summed over the batch).

        `key` drives dropout and is required in training when dropout > 0. `mask` marks real
        (non-padding) tokens. `inference=True` disables dropout; the state is never changed here.
        """
        logits, stats, _ = self._forward(tokens, state, key=key, mask=mask, inference=inference)
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
        return update_routing_state(state, stats, decay=self.ema_decay, eps=self.epsilon)

    def init_routing(
        self,
        tokens: Int[Array, "batch seq"],
        state: RoutingState,
        *,
        key: PRNGKeyArray,
        mask: Bool[Array, "batch seq"] | None = None,
    ) -> RoutingState:
        """Data-dependent init: each routing layer runs `routing.init_iters` Lloyd steps on its
        own q (and k) for this
        batch, layer by layer in one forward pass (later layers see initialised earlier ones).
        Pass a global batch; the result is marked initialised."""
        _, _, used = self._forward(tokens, state, key=None, mask=mask, inference=True,
                                   init_key=key, init_iters=self.init_iters)
        stages = tuple(None if c is None else KMeansState.from_centroids(c) for c in used)
        return RoutingState(stages, jnp.asarray(True))

    def _forward(self, tokens, state, *, key, mask, inference, init_key=None, init_iters=10):
        n = tokens.shape[1]
        if n > self.seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds the model's seq_len={self.seq_len}")
        if len(state.stages) != len(self.stages):
            raise ValueError(f"routing state has {len(state.stages)} groups; the model has "
                             f"{len(self.stages)}: was it built from another spec?")
        if key is None and self.dropout > 0 and not inference:
            raise ValueError("dropout > 0 in training needs a `key` (or pass inference=True)")
        keys = [None] * (len(self.stages) + 1) if key is None else \
            list(jax.random.split(key, len(self.stages) + 1))
        init_keys = [None] * len(self.stages) if init_key is None else \
            list(jax.random.split(init_key, len(self.stages)))
        h = self.embed(tokens)
        if self.embed_proj is not None:
            h = self.embed_proj(h)
        if self.positions is not None:
            h = h + self.positions[None, :n]
        h = dropout(h, self.dropout, keys[-1], inference)
        stats, used = [], []
        for blocks, kstate, k, ik in zip(self.stages, state.stages, keys, init_keys, strict=False):
            centroids = None if kstate is None else kstate.centroids
            h, s, c = _scan_blocks(blocks, h, centroids, mask=mask, key=k, inference=inference,
                                   init_key=ik, init_iters=init_iters, remat=self.remat)
            stats.append(s)
            used.append(c)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.unembed is not None:
            logits = self.unembed(h)
        else:
            if self.embed_proj is not None:
                h = h @ self.embed_proj.weight.T
            logits = self.embed.attend(h)
        return logits, tuple(stats), tuple(used)


def _scan_blocks(blocks, h, centroids, *, mask, key, inference, init_key, init_iters, remat):
    """Run a stack of identical blocks with `lax.scan`, so compile time does not grow with depth."""
    params, static = eqx.partition(blocks, eqx.is_array)
    n_layers = jax.tree.leaves(params)[0].shape[0]
    keys = None if key is None else jax.random.split(key, n_layers)
    init_keys = None if init_key is None else jax.random.split(init_key, n_layers)

    def body(x, xs):
        p, c, k, ik = xs
        block = eqx.combine(p, static)
        x, stats, used = block(x, c, mask=mask, key=k, inference=inference, init_key=ik,
                               init_iters=init_iters)
        return x, (stats, used)

    if remat:
        body = jax.checkpoint(body)
    h, (stats, used) = jax.lax.scan(body, h, (params, centroids, keys, init_keys))
    return h, stats, used
