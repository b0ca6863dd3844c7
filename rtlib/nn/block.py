"""A transformer block: mixed attention and a feed-forward network, with residuals."""

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.attention import LayerCache, MixedAttention
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
    """Pre-norm: x + f(norm(x)). Post-norm (paper T2T "dan"): norm(x + f(x))."""

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
    ) -> tuple[Float[Array, "batch seq dmodel"], RoutingStats | None, Array | None]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        drop = lambda h, k: dropout(h, self.dropout, k, inference)  # noqa: E731
        x, (stats, used) = self._residual(
            x, lambda h: _split_first(self.attn(h, centroids, mask=mask, init_key=init_key,
                                                init_iters=init_iters)),
            lambda h: drop(h, k1), lambda h: drop(h, k2))
        return x, stats, used

    def prefill(self, x: Float[Array, "batch seq dmodel"],
                centroids: Float[Array, "rheads clusters hdim"] | None, *,
                capacity: int) -> tuple[Float[Array, "batch seq dmodel"], LayerCache]:
        """Inference over a prompt, returning the attention's decoding cache."""
        return self._residual(x, lambda h: self.attn.prefill(h, centroids, capacity=capacity))

    def decode(self, x: Float[Array, "batch 1 dmodel"],
               centroids: Float[Array, "rheads clusters hdim"] | None, cache: LayerCache,
               pos: Int[Array, ""]) -> tuple[Float[Array, "batch 1 dmodel"], LayerCache]:
        """One new token, reading and extending the cache."""
        return self._residual(x, lambda h: self.attn.decode(h, centroids, cache, pos))

    def _residual(self, x, attend, drop1=lambda h: h, drop2=lambda h: h):
        """Pre- or post-norm residual wiring around `attend(h) -> (out, extra)`."""
        if self.pre_norm:
            h, extra = attend(self.norm1(x))
            x = x + drop1(h)
            return x + drop2(self.ffn(self.norm2(x))), extra
        h, extra = attend(x)
        x = self.norm1(x + drop1(h))
        return self.norm2(x + drop2(self.ffn(x))), extra


def _split_first(result):
    return result[0], result[1:]
