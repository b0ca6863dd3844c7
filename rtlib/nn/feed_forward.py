"""The feed-forward network, with a backward pass that saves only its input.

Autodiff of `w_out(gelu(w_in(x)))` keeps the pre-activation, GELU's tanh and the activation
for the backward pass: three [tokens, hidden] arrays per layer (hidden = 4 d_model), the
largest residuals of a long-sequence step. The custom VJP here saves only x and, in the
backward pass, recomputes it piece by piece along the sequence, at most `chunk` tokens at a
time (one extra x W_in product, a sixth more feed-forward arithmetic), just before it needs
it, so no [tokens, hidden] array outlives its piece. Values and gradients are those of plain
autodiff (tested)."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray

from rtlib.nn.layers import Linear, _along_last
from rtlib.spec.schema import ModelSpec

# The name of the saved input: a remat policy that saves it (rtlib.nn.model.scan_blocks) spares
# recomputing the residual add and the norm that produce it.
FEED_FORWARD_INPUT = "feed_forward_input"


def activate(h: Float[Array, "*batch width"], activation: str) -> Float[Array, "*batch hidden"]:
    """The hidden activation: GELU (tanh form), ReLU, or GEGLU (gelu(a) * b of h's halves)."""
    if activation == "geglu":
        a, b = jnp.split(h, 2, axis=-1)
        return jax.nn.gelu(a) * b
    if activation == "gelu":
        return jax.nn.gelu(h)
    if activation == "relu":
        return jax.nn.relu(h)
    raise ValueError(f"unknown activation {activation!r}; expected 'gelu', 'relu' or 'geglu'")


def _affine(x: Array, w: Array, b: Array | None) -> Array:
    """x W (+ b), as `Linear` computes it."""
    y = x @ w.astype(x.dtype)
    return y if b is None else y + _along_last(b, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def mlp(x: Float[Array, "*batch din"], w_in: Float[Array, "din width"], b_in: Array | None,
        w_out: Float[Array, "hidden dout"], b_out: Array | None, activation: str,
        chunk: int) -> Float[Array, "*batch dout"]:
    """act(x W_in + b_in) W_out + b_out; the backward pass works on at most `chunk` tokens
    at a time where the sequence length allows."""
    return _affine(activate(_affine(x, w_in, b_in), activation), w_out, b_out)


def _mlp_fwd(x, w_in, b_in, w_out, b_out, activation, chunk):
    res = (checkpoint_name(x, FEED_FORWARD_INPUT), w_in, b_in, w_out, b_out)
    return mlp(x, w_in, b_in, w_out, b_out, activation, chunk), res


def _pieces(shape: tuple[int, ...], chunk: int) -> int:
    """How many pieces to cut the sequence axis (the second last) into so that a piece of
    every sequence together holds at most `chunk` tokens (halving while the length allows).
    Pieces cut the sequence, never the batch, whose sharding they then keep."""
    tokens, n, pieces = math.prod(shape[:-1]), shape[-2] if len(shape) > 1 else 1, 1
    while tokens // pieces > chunk and n % (2 * pieces) == 0:
        pieces *= 2
    return pieces


def _mlp_bwd(activation, chunk, res, dy):
    x, w_in, b_in, w_out, b_out = res

    def one(xc, dyc):  # one piece: (dx, dW_in, db_in, dW_out, db_out)
        xm, dym = xc.reshape(-1, xc.shape[-1]), dyc.reshape(-1, dyc.shape[-1])
        h = _affine(xm, w_in, b_in)
        g, act_vjp = jax.vjp(lambda h: activate(h, activation), h)
        (dh,) = act_vjp(dym @ w_out.astype(dym.dtype).T)
        f32 = lambda t: t.astype(jnp.float32)  # weight gradients in float32
        return ((dh @ w_in.astype(dh.dtype).T).reshape(xc.shape), f32(xm.T @ dh),
                f32(jnp.sum(dh, 0)), f32(g.T @ dym), f32(jnp.sum(dym, 0)))

    pieces = _pieces(x.shape, chunk)
    if pieces == 1:
        dx, dw_in, db_in, dw_out, db_out = one(x, dy)
    else:
        def split(t):  # [*batch, n, d] -> [pieces, *batch, n / pieces, d]
            t = t.reshape(*t.shape[:-2], pieces, t.shape[-2] // pieces, t.shape[-1])
            return jnp.moveaxis(t, -3, 0)

        def body(acc, xs):
            dx, *grads = one(*xs)
            return jax.tree.map(jnp.add, acc, tuple(grads)), dx

        zeros = (jnp.zeros(w_in.shape, jnp.float32), jnp.zeros(w_in.shape[-1:], jnp.float32),
                 jnp.zeros(w_out.shape, jnp.float32), jnp.zeros(w_out.shape[-1:], jnp.float32))
        (dw_in, db_in, dw_out, db_out), dx = jax.lax.scan(body, zeros, (split(x), split(dy)))
        dx = jnp.moveaxis(dx, 0, -3).reshape(x.shape)
    return (dx.astype(x.dtype), dw_in.astype(w_in.dtype),
            None if b_in is None else db_in.astype(b_in.dtype), dw_out.astype(w_out.dtype),
            None if b_out is None else db_out.astype(b_out.dtype))


mlp.defvjp(_mlp_fwd, _mlp_bwd)

BACKWARD_CHUNK = 4096  # tokens per piece of the backward pass (measured in performance.md)


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
        return mlp(x, self.w_in.weight, self.w_in.bias, self.w_out.weight, self.w_out.bias,
                   self.activation, BACKWARD_CHUNK)
