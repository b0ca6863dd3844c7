"""The Pallas kernel bodies of grouped attention, shared by the TPU and GPU backends.

Arrays are laid out [G, N, B, D] (G = flattened batch x heads, N blocks of B rows). Query
positions and segments travel as [G, N, B, 1] columns and key ones as [G, N, 1, B] rows, so a
block's visibility mask is one broadcast compare and every block shape ends in full array dims
(legal for Mosaic TPU whatever B and D are). Key block `i + o` is read straight from the key
array through the BlockSpec index map (clamped at the ends and masked out there): local and
cluster-sorted layouts need no gathered copy of K and V in memory.

Forward: an online softmax over the key blocks, skipping blocks with no visible pair, saving
the log-sum-exp of each row. Backward: one kernel for dQ over query blocks and one for dK, dV
over key blocks, both recomputing the probabilities from the saved log-sum-exp (FlashAttention-2).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.grouped_attention.reference import visibility
from kernels.numerics import MASKED_LOGIT, SELF_LOGIT


@dataclasses.dataclass(frozen=True)
class Pattern:
    """The static part of a grouped-attention call (hashable: it keys the custom_vjp)."""

    offsets: tuple[int, ...]
    causal: bool
    span: int | None
    self_mask: bool
    scale: float


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a backend runs the kernels: compiler parameters and interpret mode."""

    compiler_params: Any = None
    interpret: Any = False
    name: str = "grouped_attention"


def _dot(a, b, contract: tuple[int, int]):
    """a . b over the given axes, accumulating in float32 (full precision for float32 inputs)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )


def _any(mask):
    """Whether any entry is True (a max, not reduce_or, which the Triton lowering lacks)."""
    return jnp.max(mask.astype(jnp.int32)) > 0


def _tile(pattern: Pattern, block_ok, q, k, qp, kp, qs, ks):
    """(mask, scaled logits) of one (query block, key block) tile."""
    mask = visibility(qp, kp, qs, ks, causal=pattern.causal, span=pattern.span) & block_ok
    s = _dot(q, k, (1, 1)) * pattern.scale
    if pattern.self_mask:
        s = jnp.where(kp == qp, SELF_LOGIT, s)
    return mask, jnp.where(mask, s, MASKED_LOGIT)


def _live(pattern: Pattern, block, n, qp, kp, qs, ks):
    """(block in range, tile has a visible pair). Skipping the other tiles is exact: a tile
    with no visible pair adds nothing to any row."""
    block_ok = (block >= 0) & (block < n)
    visible = visibility(qp, kp, qs, ks, causal=pattern.causal, span=pattern.span)
    return block_ok, block_ok & _any(visible)


def _tile_grads(pattern: Pattern, block_ok, q, k, v, qp, kp, qs, ks, do, lse, delta):
    """(probabilities, logit gradients) of one tile, recomputed from the saved lse."""
    mask, s = _tile(pattern, block_ok, q, k, qp, kp, qs, ks)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    ds = p * (_dot(do, v, (1, 1)) - delta)
    if pattern.self_mask:  # the self logit is a constant: no gradient through it
        ds = jnp.where(kp == qp, 0.0, ds)
    return p, ds


def _forward_kernel(pattern: Pattern, q_ref, qp_ref, qs_ref, *refs):
    *key_refs, o_ref, lse_ref = refs
    i, n = pl.program_id(1), pl.num_programs(1)
    q, qp, qs = q_ref[...], qp_ref[...], qs_ref[...]
    rows, vdim = o_ref.shape
    m = jnp.full((rows, 1), MASKED_LOGIT, jnp.float32)
    row_sum = jnp.zeros((rows, 1), jnp.float32)
    acc = jnp.zeros((rows, vdim), jnp.float32)
    for t, o in enumerate(pattern.offsets):
        k_ref, v_ref, kp_ref, ks_ref = key_refs[4 * t : 4 * t + 4]
        kp, ks = kp_ref[...], ks_ref[...]
        block_ok, live = _live(pattern, i + o, n, qp, kp, qs, ks)

        def update(carry, k_ref=k_ref, v_ref=v_ref, kp=kp, ks=ks, block_ok=block_ok):
            m, row_sum, acc = carry
            mask, s = _tile(pattern, block_ok, q, k_ref[...], qp, kp, qs, ks)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            corr = jnp.exp(m - m_new)
            v = v_ref[...]
            return (m_new, row_sum * corr + jnp.sum(p, axis=1, keepdims=True),
                    acc * corr + _dot(p.astype(v.dtype), v, (1, 0)))

        m, row_sum, acc = jax.lax.cond(live, update, lambda c: c, (m, row_sum, acc))
    nonempty = row_sum > 0
    o_ref[...] = (acc / jnp.where(nonempty, row_sum, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(jnp.where(nonempty, row_sum, 1.0))


def _dq_kernel(pattern: Pattern, q_ref, qp_ref, qs_ref, do_ref, lse_ref, delta_ref, *refs):
    *key_refs, dq_ref = refs
    i, n = pl.program_id(1), pl.num_programs(1)
    q, qp, qs = q_ref[...], qp_ref[...], qs_ref[...]
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
    dq = jnp.zeros(dq_ref.shape, jnp.float32)
    for t, o in enumerate(pattern.offsets):
        k_ref, v_ref, kp_ref, ks_ref = key_refs[4 * t : 4 * t + 4]
        kp, ks = kp_ref[...], ks_ref[...]
        block_ok, live = _live(pattern, i + o, n, qp, kp, qs, ks)

        def update(dq, k_ref=k_ref, v_ref=v_ref, kp=kp, ks=ks, block_ok=block_ok):
            k = k_ref[...]
            _, ds = _tile_grads(pattern, block_ok, q, k, v_ref[...], qp, kp, qs, ks, do, lse,
                                delta)
            return dq + _dot(ds.astype(k.dtype), k, (1, 0)) * pattern.scale

        dq = jax.lax.cond(live, update, lambda d: d, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(pattern: Pattern, k_ref, v_ref, kp_ref, ks_ref, *refs):
    *query_refs, dk_ref, dv_ref = refs
    j, n = pl.program_id(1), pl.num_programs(1)
    k, v, kp, ks = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]
    dk = jnp.zeros(dk_ref.shape, jnp.float32)
    dv = jnp.zeros(dv_ref.shape, jnp.float32)
    for t, o in enumerate(pattern.offsets):  # key block j serves query block j - o
        q_ref, qp_ref, qs_ref, do_ref, lse_ref, delta_ref = query_refs[6 * t : 6 * t + 6]
        qp, qs = qp_ref[...], qs_ref[...]
        block_ok, live = _live(pattern, j - o, n, qp, kp, qs, ks)

        def update(carry, q_ref=q_ref, qp=qp, qs=qs, do_ref=do_ref, lse_ref=lse_ref,
                   delta_ref=delta_ref, block_ok=block_ok):
            dk, dv = carry
            q, do = q_ref[...], do_ref[...]
            p, ds = _tile_grads(pattern, block_ok, q, k, v, qp, kp, qs, ks, do, lse_ref[...],
                                delta_ref[...])
            return (dk + _dot(ds.astype(q.dtype), q, (0, 0)) * pattern.scale,
                    dv + _dot(p.astype(do.dtype), do, (0, 0)))

        dk, dv = jax.lax.cond(live, update, lambda c: c, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _spec(block_shape: tuple[int, int], shift: int = 0) -> pl.BlockSpec:
    """Block (1, 1, *block_shape) of a [G, N, ...] array at block (g, clamp(i + shift))."""

    def index(g, i):
        n_minus_1 = pl.num_programs(1) - 1
        return g, jnp.clip(i + shift, 0, n_minus_1), 0, 0

    return pl.BlockSpec((None, None, *block_shape), index)


def _call(body: Callable, launch: Launch, grid, in_specs, out_shapes, out_specs, *args):
    return pl.pallas_call(
        body, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
        compiler_params=launch.compiler_params, interpret=launch.interpret, name=launch.name,
    )(*args)


def forward(pattern: Pattern, launch: Launch, q, k, v, qp, kp, qs, ks):
    """(out [G,N,Bq,Dv], lse [G,N,Bq,1]) on the kernel layout."""
    g, n, bq, d = q.shape
    bk, dv = k.shape[2], v.shape[-1]
    key_specs, key_args = [], []
    for o in pattern.offsets:
        key_specs += [_spec((bk, d), o), _spec((bk, dv), o), _spec((1, bk), o), _spec((1, bk), o)]
        key_args += [k, v, kp, ks]
    return _call(
        functools.partial(_forward_kernel, pattern), launch, (g, n),
        [_spec((bq, d)), _spec((bq, 1)), _spec((bq, 1)), *key_specs],
        (jax.ShapeDtypeStruct((g, n, bq, dv), v.dtype),
         jax.ShapeDtypeStruct((g, n, bq, 1), jnp.float32)),
        (_spec((bq, dv)), _spec((bq, 1))),
        q, qp, qs, *key_args,
    )


def backward(pattern: Pattern, launch: Launch, q, k, v, qp, kp, qs, ks, out, lse, d_out):
    """(dq, dk, dv) on the kernel layout, from the forward's output and log-sum-exp."""
    g, n, bq, d = q.shape
    bk, dv_dim = k.shape[2], v.shape[-1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    key_specs, key_args = [], []
    for o in pattern.offsets:
        key_specs += [_spec((bk, d), o), _spec((bk, dv_dim), o), _spec((1, bk), o),
                      _spec((1, bk), o)]
        key_args += [k, v, kp, ks]
    dq = _call(
        functools.partial(_dq_kernel, pattern), launch, (g, n),
        [_spec((bq, d)), _spec((bq, 1)), _spec((bq, 1)), _spec((bq, dv_dim)), _spec((bq, 1)),
         _spec((bq, 1)), *key_specs],
        jax.ShapeDtypeStruct(q.shape, q.dtype), _spec((bq, d)),
        q, qp, qs, d_out, lse, delta, *key_args,
    )
    query_specs, query_args = [], []
    for o in pattern.offsets:
        query_specs += [_spec((bq, d), -o), _spec((bq, 1), -o), _spec((bq, 1), -o),
                        _spec((bq, dv_dim), -o), _spec((bq, 1), -o), _spec((bq, 1), -o)]
        query_args += [q, qp, qs, d_out, lse, delta]
    dk, dv = _call(
        functools.partial(_dkv_kernel, pattern), launch, (g, n),
        [_spec((bk, d)), _spec((bk, dv_dim)), _spec((1, bk)), _spec((1, bk)), *query_specs],
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        (_spec((bk, d)), _spec((bk, dv_dim))),
        k, v, kp, ks, *query_args,
    )
    return dq, dk, dv
