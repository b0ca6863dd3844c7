"""A transformer block: mixed attention (and, in a decoder of an encoder-decoder,
cross-attention) and a feed-forward network, with residuals."""

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.attention import LayerCache, MixedAttention
from rtlib.nn.cross_attention import CrossAttention, EncoderOutput, no_memory_error
from rtlib.nn.feed_forward import FeedForward
from rtlib.nn.layers import LayerNorm, Linear, dropout
from rtlib.routing import RoutingStats
from rtlib.spec.schema import HeadCounts, ModelSpec


class Block(eqx.Module):
    """Pre-norm: x + f(norm(x)) for each sublayer; post-norm (paper T2T "dan"): norm(x + f(x)).
    The sublayers: mixed self-attention, then the feed-forward network (`CrossBlock` adds
    cross-attention between them). No cross-attention fields here: a decoder's parameter tree,
    and so every checkpoint written before encoder-decoders existed, stays as it was."""

    attn: MixedAttention
    ffn: FeedForward
    norm1: LayerNorm
    norm2: LayerNorm
    pre_norm: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray):
        ka, kf = jax.random.split(key)
        self.attn = MixedAttention(spec, counts, key=ka)
        self.ffn = FeedForward(spec, key=kf)
        self.norm1 = LayerNorm(spec.d_model, axes=("embed",))
        self.norm2 = LayerNorm(spec.d_model, axes=("embed",))
        self.pre_norm = spec.norm == "pre"
        self.dropout = spec.dropout

    def cross_parts(self) -> tuple[CrossAttention, LayerNorm] | None:
        """(cross-attention, its norm), or None for a block without cross-attention."""
        return None

    def __call__(
        self,
        x: Float[Array, "batch seq dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        *,
        mask: Bool[Array, "batch seq"] | None,
        key: PRNGKeyArray | None,
        inference: bool,
        init_key: PRNGKeyArray | None = None,
        init_iters: int = 10,
        memory: EncoderOutput | None = None,
    ) -> tuple[Float[Array, "batch seq dmodel"], RoutingStats | None, Array | None]:
        """`memory`: the encoder output a decoder block with cross-attention reads."""
        cross = self._check(memory)
        # as without cross-attention, plus a third key for it
        keys = (None,) * 3 if key is None else (*jax.random.split(key), jax.random.fold_in(key, 2))
        drop = [lambda h, k=k: dropout(h, self.dropout, k, inference) for k in keys]
        x, (stats, used) = self._sublayer(
            x, self.norm1, lambda h: _split_first(self.attn(h, centroids, mask=mask,
                                                            init_key=init_key,
                                                            init_iters=init_iters)), drop[0])
        if cross is not None:
            x, _ = self._sublayer(x, cross[1], lambda h: (cross[0](h, memory), None), drop[2])
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None), drop[1])
        return x, stats, used

    def prefill(self, x: Float[Array, "batch seq dmodel"],
                centroids: Float[Array, "rheads clusters hdim"] | None, *,
                capacity: int, memory: EncoderOutput | None = None,
                ) -> tuple[Float[Array, "batch seq dmodel"], LayerCache]:
        """Inference over a prompt, returning the attention's decoding cache (with
        cross-attention, its keys and values over the source last)."""
        cross = self._check(memory)
        x, cache = self._sublayer(
            x, self.norm1, lambda h: self.attn.prefill(h, centroids, capacity=capacity))
        if cross is not None:
            x, kv = self._sublayer(x, cross[1], lambda h: cross[0].prefill(h, memory))
            cache = (*cache, kv)
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None))
        return x, cache

    def decode(self, x: Float[Array, "batch 1 dmodel"],
               centroids: Float[Array, "rheads clusters hdim"] | None, cache: LayerCache,
               pos: Int[Array, ""]) -> tuple[Float[Array, "batch 1 dmodel"], LayerCache]:
        """One new token, reading and extending the cache."""
        cross = self.cross_parts()
        own = cache if cross is None else cache[:-1]
        x, own = self._sublayer(x, self.norm1,
                                lambda h: self.attn.decode(h, centroids, own, pos))
        if cross is not None:
            x, kv = self._sublayer(x, cross[1], lambda h: cross[0].decode(h, cache[-1]))
            own = (*own, kv)
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None))
        return x, own

    def _sublayer(self, x, norm, f, drop=lambda h: h):
        """One residual sublayer around `f(h) -> (out, extra)`; returns (x, extra)."""
        if self.pre_norm:
            h, extra = f(norm(x))
            return x + drop(h), extra
        h, extra = f(x)
        return norm(x + drop(h)), extra

    def _check(self, memory: EncoderOutput | None) -> tuple[CrossAttention, LayerNorm] | None:
        cross = self.cross_parts()
        problem = no_memory_error(memory, cross is not None)
        if problem is not None:
            raise ValueError(problem)
        return cross


class CrossBlock(Block):
    """A decoder block of an encoder-decoder: `Block`'s sublayers with cross-attention to the
    encoder's output between self-attention and the feed-forward network."""

    cross: CrossAttention
    norm_cross: LayerNorm

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray,
                 cross: tuple[int, int]):
        """`cross`: (heads, head_dim) of the cross-attention sublayer."""
        super().__init__(spec, counts, key=key)
        # a key apart from the self-attention's and feed-forward's (Block's split of `key`)
        self.cross = CrossAttention(spec.d_model, *cross, key=jax.random.fold_in(key, 2))
        self.norm_cross = LayerNorm(spec.d_model, axes=("embed",))

    def cross_parts(self) -> tuple[CrossAttention, LayerNorm]:
        """(cross-attention, its norm)."""
        return self.cross, self.norm_cross


def _split_first(result):
    return result[0], result[1:]
