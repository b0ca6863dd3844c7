"""Local (blocked) and full attention heads, in the `[batch, seq, heads, dim]` layout."""

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from kernels.dispatch import Backend
from kernels.grouped_attention import CallShape, choose_backend, grouped_attention
from rtlib.attention.core import check_inputs, masked_attention, valid_or_all, zero_padding


def local_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads vdim"],
    *,
    window: int,
    causal: bool = True,
    look_back: int = 1,
    look_ahead: int | None = None,
    q_mask: Bool[Array, "batch seq"] | None = None,
    kv_mask: Bool[Array, "batch seq"] | None = None,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
) -> Float[Array, "batch seq heads vdim"]:
    """Blocked local attention (ALGORITHM.md section 4).

    The sequence is cut into blocks of `window` tokens; a query block attends to itself and to
    `look_back` previous blocks (and `look_ahead` next blocks, default 0 when causal and 1 when
    not). With `causal`, a key is visible only at positions <= the query's. Padded queries
    (`q_mask` False) return zeros; padded keys (`kv_mask` False) are never attended to.

    `implementation` (None, "xla", "pallas_tpu", "pallas_gpu", or a preference list; see
    `kernels.dispatch`) picks who computes it; `interpret=True` runs a Pallas kernel in
    interpret mode (on CPU).
    """
    check_inputs("local_attention", q, k, v, q_mask=q_mask, kv_mask=kv_mask)
    batch, n, _, dim = q.shape
    if window < 1:
        raise ValueError(f"local_attention: window must be >= 1, got {window}")
    if look_ahead is None:
        look_ahead = 0 if causal else 1
    if causal and look_ahead:
        raise ValueError("local_attention: look_ahead must be 0 when causal=True")
    scale = dim**-0.5 if scale is None else scale
    q_valid = valid_or_all(q_mask, batch, n)
    k_valid = valid_or_all(kv_mask, batch, n)
    k, v = zero_padding(k, k_valid), zero_padding(v, k_valid)
    offsets = tuple(range(-look_back, look_ahead + 1))
    call = CallShape(block_q=window, block_k=window, dim=dim, vdim=v.shape[-1],
                     dtype=jnp.dtype(q.dtype), offsets=offsets, span=None, self_mask=False,
                     vdtype=jnp.dtype(v.dtype), interpret=interpret)
    backend = choose_backend(call, implementation)
    out = _local_grouped(q, k, v, k_valid, window=window, offsets=offsets, causal=causal,
                         scale=scale, backend=backend)
    return jnp.where(q_valid[:, :, None, None], out, 0).astype(v.dtype)


def _local_grouped(q, k, v, k_valid, *, window, offsets, causal, scale, backend: Backend):
    """Local attention as grouped attention over blocks of `window` tokens (no key copies:
    the kernels read neighbouring blocks in place); padded keys are segment -1."""
    batch, n, heads, _ = q.shape
    nb = -(-n // window)
    pad = nb * window - n

    def blocks(x):  # [B, n, H, D] -> [B, H, nb, W, D]
        x = jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
        return x.reshape(batch, nb, window, heads, -1).transpose(0, 3, 1, 2, 4)

    pos = jnp.broadcast_to(jnp.arange(nb * window, dtype=jnp.int32).reshape(nb, window),
                           (batch, heads, nb, window))
    ok = jnp.pad(k_valid, [(0, 0), (0, pad)]).reshape(batch, 1, nb, window)
    k_seg = jnp.broadcast_to(jnp.where(ok, 0, -1), pos.shape).astype(jnp.int32)
    out = grouped_attention(
        blocks(q), blocks(k), blocks(v), pos, pos, jnp.zeros_like(pos), k_seg, offsets=offsets,
        causal=causal, scale=scale, implementation=backend,
    )
    return out.transpose(0, 2, 3, 1, 4).reshape(batch, nb * window, heads, -1)[:, :n]


def full_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads vdim"],
    *,
    causal: bool = True,
    q_mask: Bool[Array, "batch seq"] | None = None,
    kv_mask: Bool[Array, "batch seq"] | None = None,
    scale: float | None = None,
) -> Float[Array, "batch seq heads vdim"]:
    """Dense attention with the same masking conventions as `local_attention`."""
    check_inputs("full_attention", q, k, v, q_mask=q_mask, kv_mask=kv_mask)
    batch, n, _, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    q_valid = valid_or_all(q_mask, batch, n)
    k_valid = valid_or_all(kv_mask, batch, n)
    k, v = zero_padding(k, k_valid), zero_padding(v, k_valid)
    mask = k_valid[:, None, None, :]
    if causal:
        mask = mask & jnp.tril(jnp.ones((n, n), bool))[None, None]
    out = masked_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
        scale=scale,
    ).transpose(0, 2, 1, 3)
    return jnp.where(q_valid[:, :, None, None], out, 0).astype(v.dtype)
