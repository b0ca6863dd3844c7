"""The numeric core every attention path shares: masked softmax attention, plain and blocked.

Routing, local and full heads, and the dense references the tests use, all reduce to these two
functions, so there is exactly one place where logits, masking and the softmax are computed.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels.numerics import MASKED_LOGIT, SELF_LOGIT


def valid_or_all(
    mask: Bool[Array, "batch seq"] | None, batch: int, n: int
) -> Bool[Array, "batch seq"]:
    """A padding mask (True = real token), or all-True when there is none."""
    return jnp.ones((batch, n), bool) if mask is None else mask.astype(bool)


def zero_padding(
    x: Float[Array, "batch seq *rest"], valid: Bool[Array, "batch seq"]
) -> Float[Array, "batch seq *rest"]:
    """Zero the padded rows, so that whatever they held (even NaN) cannot reach a sum."""
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def masked_attention(
    q: Float[Array, "*batch q dim"],
    k: Float[Array, "*batch kv dim"],
    v: Float[Array, "*batch kv vdim"],
    mask: Bool[Array, "*#batch #q #kv"],
    *,
    scale: float,
    is_self: Bool[Array, "*#batch #q #kv"] | None = None,
) -> Float[Array, "*batch q vdim"]:
    """Softmax attention restricted to `mask`, computed in float32.

    A query row with no visible key returns zeros (not NaN). `is_self` marks the (query, key)
    pairs whose logit is replaced by `SELF_LOGIT`.
    """
    return _masked_attention(q, k, v, mask, is_self, scale)


def _forward(q, k, v, mask, is_self, scale):
    """(output, log-sum-exp of the visible logits) in float32."""
    f32 = jnp.float32
    logits = jnp.einsum("...qd,...kd->...qk", q.astype(f32), k.astype(f32)) * scale
    if is_self is not None:
        logits = jnp.where(is_self, SELF_LOGIT, logits)
    logits = jnp.where(mask, logits, MASKED_LOGIT)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kd->...qd", weights, v.astype(f32))
    denom = jnp.where(denom > 0, denom, 1.0)
    return out / denom, row_max + jnp.log(denom)


# The backward pass is written out (FlashAttention's formulas) rather than left to autodiff:
# autodiff of the normalisation recomputes p @ v inside a slow fused reduction and keeps the
# [q, kv] weights alive; here only q, k, v, the output and one log-sum-exp per row are saved,
# and the weights are recomputed from them.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _masked_attention(q, k, v, mask, is_self, scale):
    return _forward(q, k, v, mask, is_self, scale)[0]


def _masked_attention_fwd(q, k, v, mask, is_self, scale):
    out, lse = _forward(q, k, v, mask, is_self, scale)
    return out, (q, k, v, mask, is_self, out, lse)


def _masked_attention_bwd(scale, res, d_out):
    q, k, v, mask, is_self, out, lse = res
    f32 = jnp.float32
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    logits = jnp.einsum("...qd,...kd->...qk", qf, kf) * scale
    if is_self is not None:
        logits = jnp.where(is_self, SELF_LOGIT, logits)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, MASKED_LOGIT) - lse), 0.0)
    d_out = d_out.astype(f32)
    d_v = jnp.einsum("...qk,...qd->...kd", p, d_out)
    d_p = jnp.einsum("...qd,...kd->...qk", d_out, vf)
    d_s = p * (d_p - jnp.sum(d_out * out, axis=-1, keepdims=True))
    if is_self is not None:  # the self logit is a constant: no gradient through it
        d_s = jnp.where(is_self, 0.0, d_s)
    d_q = jnp.einsum("...qk,...kd->...qd", d_s, kf) * scale
    d_k = jnp.einsum("...qk,...qd->...kd", d_s, qf) * scale
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)

MaskFn = Callable[[Int[Array, "..."], Int[Array, "..."]], Bool[Array, "..."]]


def blocked_attention(
    q: Float[Array, "seq dim"],
    k: Float[Array, "seq dim"],
    v: Float[Array, "seq vdim"],
    *,
    block: int,
    look_back: int,
    look_ahead: int,
    visible: MaskFn,
    scale: float,
    is_self: MaskFn | None = None,
) -> Float[Array, "seq vdim"]:
    """Attention where query block b sees key blocks b - look_back .. b + look_ahead.

    `visible(qi, ki)` receives broadcastable int arrays of query and key *indices into this
    sequence* and returns which pairs may attend; out-of-range and padding indices are masked
    here. The sequence is padded internally to a multiple of `block`. Cost is
    O(seq * block * (look_back + 1 + look_ahead) * dim), never O(seq^2).
    """
    n = q.shape[0]
    pad = (-n) % block
    nb = (n + pad) // block
    width = look_back + 1 + look_ahead

    def blocks(x: Array, fill: float | int = 0) -> Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(nb, block, *x.shape[1:])

    def windows(xb: Array, fill: float | int) -> Array:
        # Key windows by static shifts of the block axis: no gather.
        padded = jnp.pad(
            xb,
            [(look_back, look_ahead)] + [(0, 0)] * (xb.ndim - 1),
            constant_values=fill,
        )
        return jnp.concatenate([padded[i : i + nb] for i in range(width)], axis=1)

    q_idx = blocks(jnp.arange(n, dtype=jnp.int32), -1)  # [nb, block]; padding is -1
    k_idx = windows(q_idx, -1)  # [nb, width * block]
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    in_range = (qi >= 0) & (ki >= 0)
    qc, kc = jnp.maximum(qi, 0), jnp.maximum(ki, 0)
    mask = in_range & visible(qc, kc)
    self_pairs = None if is_self is None else in_range & is_self(qc, kc)
    out = masked_attention(
        blocks(q),
        windows(blocks(k), 0),
        windows(blocks(v), 0),
        mask,
        scale=scale,
        is_self=self_pairs,
    )
    return out.reshape(nb * block, -1)[:n]
