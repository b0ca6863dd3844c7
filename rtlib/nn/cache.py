"""Ring buffers of whole positions: the decoding cache of local and full heads (and the
buffer primitive of the routing heads' caches, `rtlib.nn.heads.routing_cache`).

Buffers hold their tokens' absolute positions (-1: empty slot). Everything is batched:
`[batch, slots, heads, dim]` like the attention inputs.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rtlib.attention.core import masked_attention

EMPTY = -1


class DecodingCache(eqx.Module):
    """One head kind's state between generated tokens (per layer)."""

    @property
    def holds_every_token(self) -> bool:
        """True when the buffer holds every token of the generation, so decoding past the
        capacity given to `prefill` is an error; False for buffers bounded by a window."""
        return False


def ring_fill(x: Array, slots: int, start: int = 0) -> tuple[Array, Int[Array, "batch slots"]]:
    """A buffer of `slots` holding the last `slots` rows (axis 1) of `x`, row p at p % slots,
    and the positions it holds (positions count from `start`)."""
    b, n = x.shape[:2]
    pos = jnp.arange(n, dtype=jnp.int32) + start
    slot = jnp.where(jnp.arange(n) >= n - slots, pos % slots, slots)  # older rows: dropped
    buf = jnp.zeros((b, slots, *x.shape[2:]), x.dtype).at[:, slot].set(x, mode="drop")
    held = jnp.full((slots,), EMPTY, jnp.int32).at[slot].set(pos, mode="drop")
    return buf, jnp.broadcast_to(held, (b, slots))


def ring_push(buf: Array, held: Int[Array, "batch slots"], x: Array,
              pos: Int[Array, ""]) -> tuple[Array, Int[Array, "batch slots"]]:
    """Write one row `x` [batch, ...] for position `pos` at slot pos % slots."""
    slot = pos % buf.shape[1]
    return buf.at[:, slot].set(x.astype(buf.dtype)), held.at[:, slot].set(pos)


class RingCache(DecodingCache):
    """Keys and values of the last `slots` positions. Local heads keep (look_back + 1) x
    window slots, enough for any query's blocks; full heads keep every token, in a buffer of
    the generation's capacity (`every_token`)."""

    k: Float[Array, "batch slots heads dim"]
    v: Float[Array, "batch slots heads vdim"]
    pos: Int[Array, "batch slots"]
    every_token: bool = eqx.field(static=True)

    @property
    def holds_every_token(self) -> bool:
        return self.every_token

    @classmethod
    def fill(cls, k: Array, v: Array, slots: int, *, every_token: bool) -> "RingCache":
        """The buffer after a prompt's `[batch, seq, heads, dim]` keys and values."""
        k_buf, held = ring_fill(k, slots)
        v_buf, _ = ring_fill(v, slots)
        return cls(k_buf, v_buf, held, every_token)

    def push(self, k: Float[Array, "batch heads dim"], v: Float[Array, "batch heads vdim"],
             pos: Int[Array, ""]) -> "RingCache":
        """The buffer with one more token at position `pos`."""
        k_buf, held = ring_push(self.k, self.pos, k, pos)
        v_buf, _ = ring_push(self.v, self.pos, v, pos)
        return RingCache(k_buf, v_buf, held, self.every_token)


def attend_buffer(q: Float[Array, "batch heads dim"], k: Float[Array, "batch slots heads dim"],
                  v: Float[Array, "batch slots heads vdim"], visible: Array, *, scale: float,
                  is_self: Array | None = None) -> Float[Array, "batch heads vdim"]:
    """One query per head against a buffer; `visible` (and `is_self`) broadcast to
    [batch, heads, 1, slots]."""
    out = masked_attention(q[:, :, None, :], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                           visible, scale=scale, is_self=is_self)
    return out[:, :, 0]
