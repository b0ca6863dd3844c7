"""The differentiable Pallas op: layout changes around the kernels and their custom_vjp."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.grouped_attention import kernel
from kernels.grouped_attention.kernel import Launch, Pattern


def _to_kernel_layout(q, k, v, q_pos, k_pos, q_seg, k_seg):
    """[*batch, N, B, ...] -> [G, N, B, ...]; positions as columns (queries) and rows (keys)."""
    n, bq, bk = q.shape[-3], q.shape[-2], k.shape[-2]

    def flat(x, tail):
        return x.reshape(-1, n, *tail)

    i32 = jnp.int32
    return (flat(q, q.shape[-2:]), flat(k, k.shape[-2:]), flat(v, v.shape[-2:]),
            flat(q_pos.astype(i32), (bq, 1)), flat(k_pos.astype(i32), (1, bk)),
            flat(q_seg.astype(i32), (bq, 1)), flat(k_seg.astype(i32), (1, bk)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(pattern, launch, q, k, v, qp, kp, qs, ks):
    return kernel.forward(pattern, launch, q, k, v, qp, kp, qs, ks)[0]


def _attend_fwd(pattern, launch, q, k, v, qp, kp, qs, ks):
    out, lse = kernel.forward(pattern, launch, q, k, v, qp, kp, qs, ks)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _attend_bwd(pattern, launch, res, d_out):
    q, k, v, qp, kp, qs, ks, out, lse = res
    dq, dk, dv = kernel.backward(pattern, launch, q, k, v, qp, kp, qs, ks, out, lse, d_out)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def pallas_grouped_attention(
    q: Float[Array, "*batch blocks bq dim"],
    k: Float[Array, "*batch blocks bk dim"],
    v: Float[Array, "*batch blocks bk vdim"],
    q_pos: Int[Array, "*batch blocks bq"],
    k_pos: Int[Array, "*batch blocks bk"],
    q_seg: Int[Array, "*batch blocks bq"],
    k_seg: Int[Array, "*batch blocks bk"],
    *,
    pattern: Pattern,
    launch: Launch,
) -> Float[Array, "*batch blocks bq vdim"]:
    """Grouped attention (see `reference.py`) by the Pallas kernels, with a custom_vjp."""
    out = _attend(pattern, launch, *_to_kernel_layout(q, k, v, q_pos, k_pos, q_seg, k_seg))
    return out.reshape(*q.shape[:-1], v.shape[-1])
