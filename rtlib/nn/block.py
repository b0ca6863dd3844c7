"""A transformer block: mixed attention (and, in a decoder of an encoder-decoder,
cross-attention) and a feed-forward network, with residuals."""

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.attention import LayerCache, MixedAttention
from rtlib.nn.cross_attention import CrossAttention, EncoderOutput, no_memory_error
from rtlib.nn.layers import LayerNorm, Linear, dropout
from rtlib.routing import RoutingStats
from rtlib.spec.schema import HeadCounts, ModelSpec


class FeedForward(eqx.Module):
    """GELU or ReLU MLP, or GEGLU (gelu(x W_a) * (x W_b)) W_2."""

    w_in: Linear
    w_out: Linear
    activation: str = eqx.field(static=True)

    def __init__(self, spec: ModelSpec, *, key: PRNGKeyArray):
        ff = spec.feed_forward
        k1, k2 = jax.random.split(key)
        width = 2 * ff.hidden if ff.activation == "geglu" else ff.hidden
        self.w_in = Linear(spec.d_model, width, bias=ff.bias, key=k1, axes=("embed", "mlp"))
        self.w_out = Linear(ff.hidden, spec.d_model, bias=ff.bias, key=k2, axes=("mlp", "embed"))
        self.activation = ff.activation

    def __call__(self, x: Float[Array, "*batch dmodel"]) -> Float[Array, "*batch dmodel"]:
        h = self.w_in(x)
        if self.activation == "geglu":
            a, b = jax.numpy.split(h, 2, axis=-1)
            h = jax.nn.gelu(a) * b
        elif self.activation == "gelu":
            h = jax.nn.gelu(h)
        else:
            h = jax.nn.relu(h)
        return self.w_out(h)


class Block(eqx.Module):
    """Pre-norm: x + f(norm(x)) for each sublayer; post-norm (paper T2T "dan"): norm(x + f(x)).
    The sublayers: mixed self-attention, then (a decoder of an encoder-decoder only)
    cross-attention to the encoder's output, then the feed-forward network."""

    attn: MixedAttention
    cross: CrossAttention | None
    ffn: FeedForward
    norm1: LayerNorm
    norm_cross: LayerNorm | None
    norm2: LayerNorm
    pre_norm: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray,
                 cross: tuple[int, int] | None = None):
        """`cross`: (heads, head_dim) of a cross-attention sublayer, or None for none."""
        ka, kf = jax.random.split(key)
        kc = jax.random.fold_in(key, 2)  # apart from ka, kf: blocks without it keep their init
        self.attn = MixedAttention(spec, counts, key=ka)
        self.ffn = FeedForward(spec, key=kf)
        self.norm1 = LayerNorm(spec.d_model, axes=("embed",))
        self.norm2 = LayerNorm(spec.d_model, axes=("embed",))
        self.cross = None if cross is None else CrossAttention(spec.d_model, *cross, key=kc)
        self.norm_cross = None if cross is None else LayerNorm(spec.d_model, axes=("embed",))
        self.pre_norm = spec.norm == "pre"
        self.dropout = spec.dropout

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
        self._check(memory)
        # as without cross-attention, plus a third key for it
        keys = (None,) * 3 if key is None else (*jax.random.split(key), jax.random.fold_in(key, 2))
        drop = [lambda h, k=k: dropout(h, self.dropout, k, inference) for k in keys]
        x, (stats, used) = self._sublayer(
            x, self.norm1, lambda h: _split_first(self.attn(h, centroids, mask=mask,
                                                            init_key=init_key,
                                                            init_iters=init_iters)), drop[0])
        if self.cross is not None:
            x, _ = self._sublayer(x, self.norm_cross, lambda h: (self.cross(h, memory), None),
                                  drop[2])
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None), drop[1])
        return x, stats, used

    def prefill(self, x: Float[Array, "batch seq dmodel"],
                centroids: Float[Array, "rheads clusters hdim"] | None, *,
                capacity: int, memory: EncoderOutput | None = None,
                ) -> tuple[Float[Array, "batch seq dmodel"], LayerCache]:
        """Inference over a prompt, returning the attention's decoding cache (with
        cross-attention, its keys and values over the source last)."""
        self._check(memory)
        x, cache = self._sublayer(
            x, self.norm1, lambda h: self.attn.prefill(h, centroids, capacity=capacity))
        if self.cross is not None:
            x, cross = self._sublayer(x, self.norm_cross,
                                      lambda h: self.cross.prefill(h, memory))
            cache = (*cache, cross)
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None))
        return x, cache

    def decode(self, x: Float[Array, "batch 1 dmodel"],
               centroids: Float[Array, "rheads clusters hdim"] | None, cache: LayerCache,
               pos: Int[Array, ""]) -> tuple[Float[Array, "batch 1 dmodel"], LayerCache]:
        """One new token, reading and extending the cache."""
        own = cache if self.cross is None else cache[:-1]
        x, own = self._sublayer(x, self.norm1,
                                lambda h: self.attn.decode(h, centroids, own, pos))
        if self.cross is not None:
            x, cross = self._sublayer(x, self.norm_cross,
                                      lambda h: self.cross.decode(h, cache[-1]))
            own = (*own, cross)
        x, _ = self._sublayer(x, self.norm2, lambda h: (self.ffn(h), None))
        return x, own

    def _sublayer(self, x, norm, f, drop=lambda h: h):
        """One residual sublayer around `f(h) -> (out, extra)`; returns (x, extra)."""
        if self.pre_norm:
            h, extra = f(norm(x))
            return x + drop(h), extra
        h, extra = f(x)
        return norm(x + drop(h)), extra

    def _check(self, memory: EncoderOutput | None) -> None:
        problem = no_memory_error(memory, self.cross is not None)
        if problem is not None:
            raise ValueError(problem)


def _split_first(result):
    return result[0], result[1:]
