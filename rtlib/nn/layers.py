"""Small batched building blocks (they act on the last axis, any leading shape).

Each layer with parameters takes the logical axes of its arrays (`axes=`, a static field) from
whoever creates it and declares them with whether weight decay applies (`declare_params`), so
sharding and the decay mask come from here (`rtlib.parallel.rules.param_info`)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from rtlib.parallel.rules import Declarations, ParamInfo

Axes = tuple[str | None, ...]


def _along_last(p: Array, x: Array) -> Array:
    """`p` shaped to broadcast over `x`'s leading axes (explicit, so rank promotion never hides
    a shape bug)."""
    return p.astype(x.dtype).reshape((1,) * (x.ndim - p.ndim) + p.shape)


def _init(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    return jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5


class Linear(eqx.Module):
    """y = x W (+ b) over the last axis. `axes` names W's (din, dout) axes; b lies along dout."""

    weight: Float[Array, "din dout"]
    bias: Float[Array, " dout"] | None
    axes: Axes = eqx.field(static=True)

    def __init__(self, din: int, dout: int, *, bias: bool, key: PRNGKeyArray, axes: Axes):
        self.weight = _init(key, (din, dout), din)
        self.bias = jnp.zeros((dout,), jnp.float32) if bias else None
        self.axes = tuple(axes)

    def declare_params(self) -> Declarations:
        """The matrix decays, the bias does not."""
        return {"weight": ParamInfo(self.axes, decay=True),
                "bias": ParamInfo(self.axes[-1:], decay=False)}

    def __call__(self, x: Float[Array, "*batch din"]) -> Float[Array, "*batch dout"]:
        y = x @ self.weight.astype(x.dtype)
        return y if self.bias is None else y + _along_last(self.bias, y)


class LayerNorm(eqx.Module):
    """LayerNorm with learned gain and bias, statistics in float32."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    axes: Axes = eqx.field(static=True)
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, eps: float = 1e-5, *, axes: Axes):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.axes = tuple(axes)
        self.eps = eps

    def declare_params(self) -> Declarations:
        """Gain and bias along `axes`; decaying the gain towards 0 would fight the
        normalisation, so neither decays."""
        return {"weight": ParamInfo(self.axes, decay=False),
                "bias": ParamInfo(self.axes, decay=False)}

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        # einsum, not `y * weight`: the gradient of the weight is then a dot_general over the
        # tokens, which XLA:CPU runs much faster than its fused multiply-reduce
        # (docs/performance.md).
        y = jnp.einsum("...d,d->...d", y, self.weight.astype(y.dtype)) + \
            _along_last(self.bias, y)
        return y.astype(x.dtype)


class Embedding(eqx.Module):
    """Token embedding table; `attend` reuses it as a tied output projection."""

    weight: Float[Array, "vocab dim"]
    axes: Axes = eqx.field(static=True)

    def __init__(self, vocab: int, dim: int, *, key: PRNGKeyArray, axes: Axes):
        self.weight = jax.random.normal(key, (vocab, dim), jnp.float32) * dim**-0.5
        self.axes = tuple(axes)

    def declare_params(self) -> Declarations:
        """The table decays like any projection matrix."""
        return {"weight": ParamInfo(self.axes, decay=True)}

    def __call__(self, tokens: Int[Array, "*batch"]) -> Float[Array, "*batch dim"]:
        return jnp.take(self.weight, tokens, axis=0)

    def attend(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch vocab"]:
        return x @ self.weight.astype(x.dtype).T


class AxisPositions(eqx.Module):
    """Learned positions of a grid laid out row-major (an image's rows, columns and channels):
    one table per axis, summed, so position (r, c, ch) gets rows[r] + cols[c] + channels[ch]
    (the paper's image models; T2T `add_positional_embedding_nd`). Far fewer parameters than a
    table per position, and every row shares what it learns about columns and channels.

    The per-axis tables are stacked in one array: axis i's rows start at `starts[i]`."""

    weight: Float[Array, "rows dim"]
    shape: tuple[int, ...] = eqx.field(static=True)
    axes: Axes = eqx.field(static=True)

    def __init__(self, shape: tuple[int, ...], dim: int, *, key: PRNGKeyArray, axes: Axes):
        self.shape = tuple(shape)
        # the scale of the 1-d learned table (rtlib.build)
        self.weight = jax.random.normal(key, (sum(self.shape), dim), jnp.float32) * 0.02
        self.axes = tuple(axes)

    @property
    def starts(self) -> tuple[int, ...]:
        """Where each axis's table begins in `weight`."""
        return tuple(sum(self.shape[:i]) for i in range(len(self.shape)))

    def declare_params(self) -> Declarations:
        """Rows are positions (never split); not a projection, so not decayed (like the 1-d
        learned table)."""
        return {"weight": ParamInfo(self.axes, decay=False)}

    def __call__(self, positions: Int[Array, "*batch"]) -> Float[Array, "*batch dim"]:
        """The embedding of flat (row-major) positions, each in [0, prod(shape))."""
        parts = [jnp.take(self.weight, start + positions // math.prod(self.shape[i + 1:]) % size,
                          axis=0)
                 for i, (size, start) in enumerate(zip(self.shape, self.starts, strict=True))]
        return sum(parts[1:], parts[0])


def rotary(x: Float[Array, "batch seq heads dim"],
           offset: Int[Array, ""] | int = 0) -> Float[Array, "batch seq heads dim"]:
    """Rotary position embedding over positions offset..offset+seq-1 (an odd last channel is
    left as is). `offset` places one decoded token at its absolute position."""
    n, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    if half == 0:
        return x
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    positions = jnp.arange(n, dtype=jnp.float32) + jnp.asarray(offset, jnp.float32)
    angle = positions[:, None] * freq[None, :]  # [seq, half]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    xf = x.astype(jnp.float32)
    a, b, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos, rest], axis=-1)
    return out.astype(x.dtype)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None, inference: bool) -> Array:
    """Inverted dropout; identity in inference, at rate 0, or without a key."""
    if inference or rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
