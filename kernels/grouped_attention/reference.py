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
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

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
    """Grouped attention over concatenated key blocks, in float32, differentiated by autodiff."""
    if q.ndim > 3:  # leading batch axes: one vmap per axis
        one = functools.partial(grouped_attention_reference, offsets=offsets, causal=causal,
                                span=span, self_mask=self_mask, scale=scale)
        return jax.vmap(one)(q, k, v, q_pos, k_pos, q_seg, k_seg)
    out, _ = grouped_attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                   causal=causal, span=span, self_mask=self_mask, scale=scale)
    return out.astype(v.dtype)


def _windows(k, v, q_pos, k_pos, q_seg, k_seg, *, offsets, causal, span):
    """Each query block's keys, values and key positions side by side, and its mask."""
    kw, vw = neighbour_blocks(k, offsets, 0), neighbour_blocks(v, offsets, 0)
    kpw, ksw = neighbour_blocks(k_pos, offsets, 0), neighbour_blocks(k_seg, offsets, -1)
    mask = visibility(q_pos[:, :, None], kpw[:, None, :], q_seg[:, :, None], ksw[:, None, :],
                      causal=causal, span=span)
    return kw, vw, kpw, mask


def grouped_attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, *, offsets, causal, span,
                          self_mask, scale):
    """(float32 output, row log-sum-exp) of one [N, B, ...] sequence: what a kernel saves."""
    kw, vw, kpw, mask = _windows(k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                 causal=causal, span=span)
    f32 = jnp.float32
    logits = jnp.einsum("nqd,nkd->nqk", q.astype(f32), kw.astype(f32)) * scale
    if self_mask:
        logits = jnp.where(kpw[:, None, :] == q_pos[:, :, None], SELF_LOGIT, logits)
    logits = jnp.where(mask, logits, MASKED_LOGIT)
    row_max = jnp.max(logits, -1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, -1, keepdims=True)
    denom = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("nqk,nkd->nqd", weights / denom, vw.astype(f32))
    return out, (row_max + jnp.log(denom))[..., 0]


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
    f32 = jnp.float32
    kw, vw, kpw, mask = _windows(k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets,
                                 causal=causal, span=span)
    qpc = q_pos[:, :, None]
    qf, kf, vf, do = q.astype(f32), kw.astype(f32), vw.astype(f32), d_out.astype(f32)
    logits = jnp.einsum("nqd,nkd->nqk", qf, kf) * scale
    if self_mask:
        logits = jnp.where(kpw[:, None, :] == qpc, SELF_LOGIT, logits)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, MASKED_LOGIT) - lse[..., None]), 0.0)
    delta = jnp.sum(do * out.astype(f32), -1, keepdims=True)
    d_s = p * (jnp.einsum("nqd,nkd->nqk", do, vf) - delta)
    if self_mask:  # the self logit is a constant: no gradient through it
        d_s = jnp.where(kpw[:, None, :] == qpc, 0.0, d_s)
    dq = jnp.einsum("nqk,nkd->nqd", d_s, kf) * scale
    dk = _unwindow(jnp.einsum("nqk,nqd->nkd", d_s, qf) * scale, offsets)
    dv = _unwindow(jnp.einsum("nqk,nqd->nkd", p, do), offsets)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
