"""Pure-jnp grouped attention: the definition every kernel of this op must match.

Layout (one head of one sequence; callers vmap over batch and heads): the sequence is cut into
`N` blocks; query block `i` attends to key blocks `i + o` for each `o` in `offsets` (blocks
outside `0..N-1` contribute nothing). A (query, key) pair is visible when

    q_seg == k_seg                         (same cluster / segment; k_seg < 0 never matches)
    and (not causal or k_pos <= q_pos)
    and (span is None or q_pos - k_pos < span   [causal]
                      or |q_pos - k_pos| < span [not causal])

and with `self_mask` the pair `k_pos == q_pos` gets the constant logit SELF_LOGIT. A query with
no visible key returns zeros. Softmax statistics are float32; the output has v's dtype.

`masked_attention` below is the dense primitive under this definition and under every XLA
attention path of rtlib: there is one copy of the masked softmax and its backward.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels.numerics import MASKED_LOGIT, SELF_LOGIT


def visibility(q_pos, k_pos, q_seg, k_seg, *, causal: bool, span: int | None):
    """The visibility rule above, broadcasting query arrays against key arrays."""
    mask = (q_seg == k_seg) & (k_seg >= 0)
    if causal:
        mask = mask & (k_pos <= q_pos)
    if span is not None:
        gap = q_pos - k_pos
        mask = mask & (gap < span) & ((gap > -span) | causal)
    return mask


def neighbour_blocks(x: Array, offsets: tuple[int, ...], fill) -> Array:
    """[N, B, ...] -> [N, len(offsets) * B, ...]: block i holds blocks i + o (fill outside)."""
    n = x.shape[0]
    lo, hi = max(0, -min(offsets)), max(0, max(offsets))
    padded = jnp.pad(x, [(lo, hi)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return jnp.concatenate([padded[lo + o : lo + o + n] for o in offsets], axis=1)


def masked_attention(
    q: Float[Array, "*batch q dim"],
    k: Float[Array, "*batch kv dim"],
    v: Float[Array, "*batch kv vdim"],
    mask: Bool[Array, "*#batch #q #kv"],
    *,
    scale: float,
    is_self: Bool[Array, "*#batch #q #kv"] | None = None,
) -> Float[Array, "*batch q vdim"]:
    """Softmax attention restricted to `mask`, in float32: the one dense primitive every XLA
    attention path (this op's reference, rtlib's full heads and decoding caches) reduces to.

    A query row with no visible key returns zeros (not NaN). `is_self` marks the (query, key)
    pairs whose logit is replaced by `SELF_LOGIT`.
    """
    return _masked_attention(q, k, v, mask, is_self, scale)


def _logits(q, k, is_self, scale):
    # Keys transposed to [dim, kv] first: XLA:CPU runs routing attention's small batched
    # q k^T products far faster from that layout than contracting both operands' last axes
    # (causal assignment, 16k tokens: 138 -> 45 ms), which more than pays for the copy
    # (forward + backward: about -11% balanced, -9% causal at 4k and 16k; performance.md).
    kt = jnp.swapaxes(k.astype(jnp.float32), -1, -2)
    logits = jnp.einsum("...qd,...dk->...qk", q.astype(jnp.float32), kt)
    logits = logits * scale
    return logits if is_self is None else jnp.where(is_self, SELF_LOGIT, logits)


def attention_lse(q, k, v, mask, is_self, scale):
    """(float32 output, log-sum-exp of the visible logits with a trailing 1 axis)."""
    logits = jnp.where(mask, _logits(q, k, is_self, scale), MASKED_LOGIT)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kd->...qd", weights, v.astype(jnp.float32))
    denom = jnp.where(denom > 0, denom, 1.0)
    return out / denom, row_max + jnp.log(denom)


def attention_grads(q, k, v, mask, is_self, scale, out, lse, d_out):
    """(dq, dk, dv) in float32 from the saved output and log-sum-exp (FlashAttention-2's
    formulas): the weights are recomputed, never stored."""
    f32 = jnp.float32
    logits = jnp.where(mask, _logits(q, k, is_self, scale), MASKED_LOGIT)
    p = jnp.where(mask, jnp.exp(logits - lse), 0.0)
    d_out = d_out.astype(f32)
    d_v = jnp.einsum("...qk,...qd->...kd", p, d_out)
    d_p = jnp.einsum("...qd,...kd->...qk", d_out, v.astype(f32))
    d_s = p * (d_p - jnp.sum(d_out * out.astype(f32), axis=-1, keepdims=True))
    if is_self is not None:  # the self logit is a constant: no gradient through it
        d_s = jnp.where(is_self, 0.0, d_s)
    d_q = jnp.einsum("...qk,...kd->...qd", d_s, k.astype(f32)) * scale
    d_k = jnp.einsum("...qk,...qd->...kd", d_s, q.astype(f32)) * scale
    return d_q, d_k, d_v


# The backward pass is written out rather than left to autodiff: autodiff of the normalisation
# recomputes p @ v inside a slow fused reduction and keeps the [q, kv] weights alive; here only
# q, k, v, the output and one log-sum-exp per row are saved.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _masked_attention(q, k, v, mask, is_self, scale):
    return attention_lse(q, k, v, mask, is_self, scale)[0]


def _masked_attention_fwd(q, k, v, mask, is_self, scale):
    out, lse = attention_lse(q, k, v, mask, is_self, scale)
    return out, (q, k, v, mask, is_self, out, lse)


def _masked_attention_bwd(scale, res, d_out):
    q, k, v, mask, is_self, out, lse = res
    d_q, d_k, d_v = attention_grads(q, k, v, mask, is_self, scale, out, lse, d_out)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def grouped_attention_reference(
    q: Float[Array, "*batch blocks bq dim"],
    k: Float[Array, "*batch blocks bk dim"],
    v: Float[Array, "*batch blocks bk vdim"],
    q_pos: Int[Array, "*batch blocks bq"],
    k_pos: Int[Array, "*batch blocks bk"],
    q_seg: Int[Array, "*batch blocks bq"],
    k_seg: Int[Array, "*batch blocks bk"],
    *,
    offsets: tuple[int, ...] = (0,),
    causal: bool,
    span: int | None = None,
    self_mask: bool = False,
    scale: float,
) -> Float[Array, "*batch blocks bq vdim"]:
    """Grouped attention over concatenated key blocks in float32 (by `masked_attention`, with
    its written-out backward): the op's "xla" implementation."""
    if q.ndim > 3:  # leading batch axes: one vmap per axis
        one = functools.partial(grouped_attention_reference, offsets=offsets, causal=causal,
                                span=span, self_mask=self_mask, scale=scale)
        return jax.vmap(one)(q, k, v, q_pos, k_pos, q_seg, k_seg)
    kw, vw, mask, is_self = _windows(k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                     causal=causal, span=span, self_mask=self_mask)
    return masked_attention(q, kw, vw, mask, scale=scale, is_self=is_self).astype(v.dtype)


def _windows(k, v, q_pos, k_pos, q_seg, k_seg, *, offsets, causal, span, self_mask):
    """Each query block's keys and values side by side, its mask and its self pairs."""
    kw, vw = neighbour_blocks(k, offsets, 0), neighbour_blocks(v, offsets, 0)
    kpw, ksw = neighbour_blocks(k_pos, offsets, 0), neighbour_blocks(k_seg, offsets, -1)
    mask = visibility(q_pos[:, :, None], kpw[:, None, :], q_seg[:, :, None], ksw[:, None, :],
                      causal=causal, span=span)
    is_self = (kpw[:, None, :] == q_pos[:, :, None]) if self_mask else None
    return kw, vw, mask, is_self


def grouped_attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, *, offsets, causal, span,
                          self_mask, scale):
    """(float32 output, row log-sum-exp) of one [N, B, ...] sequence: what a kernel saves."""
    kw, vw, mask, is_self = _windows(k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                     causal=causal, span=span, self_mask=self_mask)
    out, lse = attention_lse(q, kw, vw, mask, is_self, scale)
    return out, lse[..., 0]


def _unwindow(dw: Array, offsets: tuple[int, ...]) -> Array:
    """Adjoint of `neighbour_blocks`: [N, T * B, ...] -> [N, B, ...], summing each window's
    slice t back onto block i + offsets[t]."""
    n, width = dw.shape[0], dw.shape[1] // len(offsets)
    total = jnp.zeros((n, width, *dw.shape[2:]), dw.dtype)
    for t, o in enumerate(offsets):
        part = dw[:, t * width : (t + 1) * width]  # part[i] belongs to block i + o
        if o >= 0:
            total = total.at[o:].add(part[: n - o])
        else:
            total = total.at[: n + o].add(part[-o:])
    return total


def grouped_attention_backward(
    q: Float[Array, "*batch blocks bq dim"],
    k: Float[Array, "*batch blocks bk dim"],
    v: Float[Array, "*batch blocks bk vdim"],
    q_pos: Int[Array, "*batch blocks bq"],
    k_pos: Int[Array, "*batch blocks bk"],
    q_seg: Int[Array, "*batch blocks bq"],
    k_seg: Int[Array, "*batch blocks bk"],
    out: Float[Array, "*batch blocks bq vdim"],
    lse: Float[Array, "*batch blocks bq"],
    d_out: Float[Array, "*batch blocks bq vdim"],
    *,
    offsets: tuple[int, ...],
    causal: bool,
    span: int | None,
    self_mask: bool,
    scale: float,
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) from a kernel's saved output and row log-sum-exp (FlashAttention-2's
    formulas in jnp): the backward of kernels that have no backward kernel of their own."""
    if q.ndim > 3:
        one = functools.partial(grouped_attention_backward, offsets=offsets, causal=causal,
                                span=span, self_mask=self_mask, scale=scale)
        return jax.vmap(one)(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out)
    kw, vw, mask, is_self = _windows(k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                     causal=causal, span=span, self_mask=self_mask)
    dq, dkw, dvw = attention_grads(q, kw, vw, mask, is_self, scale, out, lse[..., None], d_out)
    dk, dv = _unwindow(dkw, offsets), _unwindow(dvw, offsets)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
