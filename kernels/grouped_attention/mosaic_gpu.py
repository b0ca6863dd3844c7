"""GPU backend, Mosaic GPU (sm90 warpgroup) forward kernel of grouped attention.

One warpgroup per (group, query block): TMA copies of the query block, its key/value blocks
(i + o for each offset, clamped and masked at the ends) and their position/segment vectors
into shared memory, then per key block S = Q K^T by `wgmma`, the mask from positions and
segments in the WGMMA register layout, an online softmax, and O += P V by `wgmma`. The row
log-sum-exp is written next to the output. The backward pass is
`reference.grouped_attention_backward` (jnp, from the saved log-sum-exp; tested equal to
autodiff of the reference).

K is passed transposed ([G, N, D, Bk]) and P goes through shared memory: both keep every
`wgmma` operand a plain shared-memory ref, the only form GPU interpret mode (which the CPU
tests use) can execute. The tiling/swizzle transforms and register layout casts that the
real lowering needs are dropped in interpret mode, which models plain arrays.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.dispatch import platform, targeted
from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.kernel import Pattern
from kernels.grouped_attention.reference import grouped_attention_backward, visibility
from kernels.numerics import MASKED_LOGIT, SELF_LOGIT

SMEM_LIMIT = 200 * 1024  # of the 227 KiB an sm90 block may use


def smem_bytes(call: CallShape) -> int:
    t, item = len(call.offsets), call.dtype.itemsize
    return item * (call.block_q * call.dim + t * call.block_k * (call.dim + call.vdim)
                   + call.block_q * call.block_k) + 4 * 3 * (call.block_q + t * call.block_k)


def _hopper() -> str | None:
    """Why the default GPU has no `wgmma` (sm90 only), or None (also when no GPU is asked
    about: exporting under `target_platform("cuda")`, or interpreting)."""
    if platform() != "cuda" or targeted():
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and str(capability) != "9.0":
        return f"wgmma needs compute capability 9.0 (sm90); this GPU is {capability}"
    return None


def unsupported(call: CallShape) -> str | None:
    if not call.interpret and (reason := _hopper()):
        return reason
    if call.dtype not in (jnp.bfloat16, jnp.float16):
        return f"Mosaic GPU wgmma takes bfloat16/float16, not {call.dtype}"
    if not call.same_dtypes:
        return f"q and v dtypes differ ({call.dtype}, {call.vdtype})"
    bad = [f"{name}={size}" for name, size in (("block_q", call.block_q),
           ("block_k", call.block_k), ("dim", call.dim), ("vdim", call.vdim)) if size % 64]
    if bad:
        return f"Mosaic GPU tiles are multiples of 64; got {', '.join(bad)}"
    if call.dim != call.vdim:
        return f"the output is staged in q's buffer: dim must equal vdim ({call.dim}/{call.vdim})"
    if max(call.block_k, call.vdim) > 256:
        return f"wgmma's N is at most 256; got block_k={call.block_k}, vdim={call.vdim}"
    if smem_bytes(call) > SMEM_LIMIT:
        return f"needs {smem_bytes(call) // 1024} KiB of shared memory (limit 200)"
    return None


def forward(pattern: Pattern, q, k, v, qp, kp, qs, ks, *, interpret: bool):
    """(out [G,N,Bq,Dv], lse [G,N,Bq]) for [G,N,B,...] inputs and [G,N,B] positions/segments."""
    g, n, bq, d = q.shape
    bk, dv = k.shape[2], v.shape[-1]
    offsets, dtype = pattern.offsets, q.dtype
    width = len(offsets)
    k_t = jnp.swapaxes(k, -1, -2)  # [G, N, D, Bk]
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def transforms():
        if interpret:
            return ()
        return plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)

    def body(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref,
             q_smem, k_smem, v_smem, p_smem, qp_smem, qs_smem, kp_smem, ks_smem, lse_smem,
             bars):
        gi, i = lax.axis_index("group"), lax.axis_index("block")
        copies = [(q_ref.at[gi, i], q_smem), (qp_ref.at[gi, i], qp_smem),
                  (qs_ref.at[gi, i], qs_smem)]
        for t, o in enumerate(offsets):
            j = jnp.clip(i + o, 0, n - 1)
            copies += [(k_ref.at[gi, j], k_smem.at[t]), (v_ref.at[gi, j], v_smem.at[t]),
                       (kp_ref.at[gi, j], kp_smem.at[t]), (ks_ref.at[gi, j], ks_smem.at[t])]
        for b, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[b])
        for b in range(len(copies)):
            plgpu.barrier_wait(bars.at[b])
        q_pos = lax.broadcast_in_dim(cast(qp_smem[...], row), (bq, bk), [0])
        q_seg = lax.broadcast_in_dim(cast(qs_smem[...], row), (bq, bk), [0])
        m = cast(jnp.full((bq,), MASKED_LOGIT, jnp.float32), row)
        row_sum = cast(jnp.full((bq,), 0.0, jnp.float32), row)
        acc = cast(jnp.full((bq, dv), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        for t, o in enumerate(offsets):
            k_pos = lax.broadcast_in_dim(cast(kp_smem.at[t][...], col), (bq, bk), [1])
            k_seg = lax.broadcast_in_dim(cast(ks_smem.at[t][...], col), (bq, bk), [1])
            mask = visibility(q_pos, k_pos, q_seg, k_seg, causal=pattern.causal,
                              span=pattern.span) & ((i + o >= 0) & (i + o < n))

            def scores(acc_ref, t=t):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[t])
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32)) * pattern.scale
            if pattern.self_mask:
                s = jnp.where(k_pos == q_pos, SELF_LOGIT, s)
            s = jnp.where(mask, s, MASKED_LOGIT)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.where(mask, jnp.exp(s - lax.broadcast_in_dim(m_new, (bq, bk), [0])), 0.0)
            corr = jnp.exp(m - m_new)
            row_sum = row_sum * corr + p.sum(axis=1)
            m = m_new
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()

            acc = acc * lax.broadcast_in_dim(corr, (bq, dv), [0])
            if interpret:  # the interpreter has no run_state: a fresh accumulator, then add

                def values(acc_ref, t=t):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[t])
                    return acc_ref[...]

                acc = acc + pl.run_scoped(values, plgpu.ACC((bq, dv), jnp.float32))
            else:  # accumulate in place: one float32 accumulator in registers, not two

                def accumulate(acc_ref, t=t):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[t])

                acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
        l_safe = jnp.where(row_sum > 0, row_sum, 1.0)
        q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, (bq, dv), [0])).astype(dtype)
        lse_smem[...] = m + jnp.log(l_safe)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[gi, i])  # q's buffer stages the output
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[gi, i])
        plgpu.wait_smem_to_gmem(0)

    if dv != d:
        raise ValueError("the Mosaic GPU kernel stages the output in q's buffer: dim == vdim")
    scratch = [
        plgpu.SMEM((bq, d), dtype, transforms=transforms()),
        plgpu.SMEM((width, d, bk), dtype, transforms=transforms()),
        plgpu.SMEM((width, bk, dv), dtype, transforms=transforms()),
        plgpu.SMEM((bq, bk), dtype, transforms=transforms()),
        plgpu.SMEM((bq,), jnp.int32), plgpu.SMEM((bq,), jnp.int32),
        plgpu.SMEM((width, bk), jnp.int32), plgpu.SMEM((width, bk), jnp.int32),
        plgpu.SMEM((bq,), jnp.float32),
        plgpu.Barrier(num_barriers=3 + 4 * width),
    ]
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((g, n, bq, dv), dtype),
                  jax.ShapeDtypeStruct((g, n, bq), jnp.float32)),
        scratch_types=scratch, grid=(g, n), grid_names=("group", "block"),
        interpret=_gpu_interpret_params() if interpret else None,
    )(q, k_t, v, qp, kp, qs, ks)


def _gpu_interpret_params():
    # A private jax module (no public name in jax 0.10): imported only when interpreting.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(pattern, interpret, q, k, v, qp, kp, qs, ks):
    return forward(pattern, q, k, v, qp, kp, qs, ks, interpret=interpret)[0]


def _attend_fwd(pattern, interpret, q, k, v, qp, kp, qs, ks):
    out, lse = forward(pattern, q, k, v, qp, kp, qs, ks, interpret=interpret)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _attend_bwd(pattern, interpret, res, d_out):
    q, k, v, qp, kp, qs, ks, out, lse = res
    grads = grouped_attention_backward(
        q, k, v, qp, kp, qs, ks, out, lse, d_out, offsets=pattern.offsets,
        causal=pattern.causal, span=pattern.span, self_mask=pattern.self_mask,
        scale=pattern.scale)
    return (*grads, None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def mosaic_grouped_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, pattern: Pattern,
                             interpret: bool):
    """Grouped attention over [*batch, N, B, ...] by the Mosaic GPU kernel (custom_vjp)."""
    n, bq, bk = q.shape[-3], q.shape[-2], k.shape[-2]

    def flat(x, tail):
        return x.reshape(-1, n, *tail)

    i32 = jnp.int32
    out = _attend(pattern, interpret, flat(q, q.shape[-2:]), flat(k, k.shape[-2:]),
                  flat(v, v.shape[-2:]), flat(q_pos.astype(i32), (bq,)),
                  flat(k_pos.astype(i32), (bk,)), flat(q_seg.astype(i32), (bq,)),
                  flat(k_seg.astype(i32), (bk,)))
    return out.reshape(*q.shape[:-1], v.shape[-1])
