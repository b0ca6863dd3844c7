"""rtlib's side of the seam with kernels/: padding helpers, and attention under a mask function.

The masked softmax and its backward live once, in `kernels.grouped_attention.reference`
(`masked_attention`, re-exported here): local heads, the block patterns of routing heads and
the kernels' reference reach it through the grouped-attention op, whose "xla" implementation
it is; full heads, the causal assignment with unshared QK (every query its own key window) and
the decoding caches call it directly on dense masks.
"""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels.grouped_attention.reference import masked_attention, neighbour_blocks

__all__ = ["blocked_attention", "check_inputs", "masked_attention", "valid_or_all",
           "zero_padding"]


def check_inputs(op: str, q: Array, k: Array | None, v: Array, **masks: Array | None) -> None:
    """Shapes and dtypes of `[batch, seq, heads, dim]` attention inputs, checked up front so
    a mistake names the argument (as Equinox does) instead of surfacing as a JAX shape error
    deep inside, or as an integer output."""
    def fail(message: str):
        raise ValueError(f"{op}: {message}")

    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if x.ndim != 4:
            fail(f"{name} must be [batch, seq, heads, dim], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            fail(f"{name} must be a floating-point array, got {x.dtype}")
    if k is not None and k.shape != q.shape:
        fail(f"k has shape {tuple(k.shape)}; it must match q's {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        fail(f"v has shape {tuple(v.shape)}; its batch, seq and heads must match q's "
             f"{tuple(q.shape[:3])}")
    for name, m in masks.items():
        if m is not None and tuple(m.shape) != tuple(q.shape[:2]):
            fail(f"{name} must be [batch, seq] = {tuple(q.shape[:2])}, got {tuple(m.shape)}")


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
    """Attention where query block b sees key blocks b - look_back .. b + look_ahead, under an
    arbitrary mask function (for masks that positions and segment ids cannot express; rtlib's
    own heads use the grouped-attention op).

    `visible(qi, ki)` receives broadcastable int arrays of query and key *indices into this
    sequence* and returns which pairs may attend; out-of-range and padding indices are masked
    here. The sequence is padded internally to a multiple of `block`. Cost is
    O(seq * block * (look_back + 1 + look_ahead) * dim), never O(seq^2).
    """
    n = q.shape[0]
    pad = (-n) % block
    nb = (n + pad) // block
    offsets = tuple(range(-look_back, look_ahead + 1))

    def blocks(x: Array, fill: float | int = 0) -> Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(nb, block, *x.shape[1:])

    q_idx = blocks(jnp.arange(n, dtype=jnp.int32), -1)  # [nb, block]; padding is -1
    k_idx = neighbour_blocks(q_idx, offsets, -1)  # [nb, width * block]
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    in_range = (qi >= 0) & (ki >= 0)
    qc, kc = jnp.maximum(qi, 0), jnp.maximum(ki, 0)
    mask = in_range & visible(qc, kc)
    self_pairs = None if is_self is None else in_range & is_self(qc, kc)
    out = masked_attention(blocks(q), neighbour_blocks(blocks(k), offsets, 0),
                           neighbour_blocks(blocks(v), offsets, 0), mask, scale=scale,
                           is_self=self_pairs)
    return out.reshape(nb * block, -1)[:n]
