"""Decoding caches: what an attention layer keeps between generated tokens.

- Local heads: a ring buffer of the last (look_back + 1) x window keys and values, enough for
  any query's blocks. Full heads: every key, in a buffer of the generation's capacity.
- Routing heads with causal assignment: per head and cluster, a ring buffer of the W most
  recent keys (normalised) and values routed there: O(K W d) per head, whatever the length.
  A new token joins its key's nearest centroid, then its query reads its own cluster's buffer:
  exactly the full forward pass's "W most recent same-cluster tokens".
- Routing heads with balanced assignment (an approximation, see `balanced_decode`): every key
  with its centroid scores, in a buffer of the generation's capacity.

Buffers hold their tokens' absolute positions (-1: empty slot). Everything is batched:
`[batch, slots, heads, dim]` like the attention inputs.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rtlib.attention.core import masked_attention

EMPTY = -1


class AttentionCache(eqx.Module):
    """One attention layer's decoding state; fields of absent head kinds are None."""

    # Dimension names differ per head kind: each kind has its own slot and head counts.
    local_k: Float[Array, "batch lslots lheads dim"] | None = None
    local_v: Float[Array, "batch lslots lheads dim"] | None = None
    local_pos: Int[Array, "batch lslots"] | None = None
    full_k: Float[Array, "batch fslots fheads dim"] | None = None
    full_v: Float[Array, "batch fslots fheads dim"] | None = None
    full_pos: Int[Array, "batch fslots"] | None = None
    route_k: Float[Array, "batch rheads clusters window dim"] | None = None
    route_v: Float[Array, "batch rheads clusters window dim"] | None = None
    route_pos: Int[Array, "batch rheads clusters window"] | None = None
    route_count: Int[Array, "batch rheads clusters"] | None = None
    bal_k: Float[Array, "batch bslots rheads dim"] | None = None
    bal_v: Float[Array, "batch bslots rheads dim"] | None = None
    bal_score: Float[Array, "batch bslots rheads clusters"] | None = None
    bal_pos: Int[Array, "batch bslots"] | None = None


# ---- ring buffers of whole positions (local, full and balanced heads) -------------------------

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


def attend_buffer(q: Float[Array, "batch heads dim"], k: Float[Array, "batch slots heads dim"],
                  v: Float[Array, "batch slots heads vdim"], visible: Array, *, scale: float,
                  is_self: Array | None = None) -> Float[Array, "batch heads vdim"]:
    """One query per head against a buffer; `visible` (and `is_self`) broadcast to
    [batch, heads, 1, slots]."""
    out = masked_attention(q[:, :, None, :], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                           visible, scale=scale, is_self=is_self)
    return out[:, :, 0]


# ---- per-cluster buffers (routing heads, causal assignment) -----------------------------------

def cluster_fill(cluster: Int[Array, "batch seq heads"], k_hat: Float[Array, "batch seq heads dim"],
                 v: Float[Array, "batch seq heads vdim"], *, clusters: int, window: int):
    """Per (batch, head, cluster) the last `window` keys and values routed there, each at slot
    (its index within the cluster) % window, their positions, and each cluster's count."""
    n = cluster.shape[1]

    def one(c, kh, vh):  # one (batch, head): c [seq], kh [seq, dim], vh [seq, vdim]
        onehot = jax.nn.one_hot(c, clusters, dtype=jnp.int32)
        before = jnp.cumsum(onehot, axis=0) - onehot
        index = jnp.take_along_axis(before, c[:, None], axis=1)[:, 0]  # index within cluster
        count = jnp.sum(onehot, axis=0)
        slot = jnp.where(index >= count[c] - window, index % window, window)  # older: dropped
        put = lambda buf, x: buf.at[c, slot].set(x, mode="drop")  # noqa: E731
        k_buf = put(jnp.zeros((clusters, window, kh.shape[-1]), jnp.float32), kh)
        v_buf = put(jnp.zeros((clusters, window, vh.shape[-1]), vh.dtype), vh)
        pos = put(jnp.full((clusters, window), EMPTY, jnp.int32), jnp.arange(n, dtype=jnp.int32))
        return k_buf, v_buf, pos, count

    per_head = jax.vmap(one, in_axes=(1, 1, 1))  # over heads (axis 2 of [b, n, h, d] inputs)
    return jax.vmap(per_head)(cluster, k_hat, v)


def cluster_push(cache: AttentionCache, cluster: Int[Array, "batch heads"],
                 k_hat: Float[Array, "batch heads dim"], v: Float[Array, "batch heads vdim"],
                 pos: Int[Array, ""]) -> AttentionCache:
    b, h = cluster.shape
    window = cache.route_k.shape[3]
    bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
    slot = cache.route_count[bi, hi, cluster] % window
    return eqx.tree_at(
        lambda c: (c.route_k, c.route_v, c.route_pos, c.route_count), cache,
        (cache.route_k.at[bi, hi, cluster, slot].set(k_hat),
         cache.route_v.at[bi, hi, cluster, slot].set(v.astype(cache.route_v.dtype)),
         cache.route_pos.at[bi, hi, cluster, slot].set(pos),
         cache.route_count.at[bi, hi, cluster].add(1)))


def cluster_attend(cache: AttentionCache, cluster: Int[Array, "batch heads"],
                   q_hat: Float[Array, "batch heads dim"], pos: Int[Array, ""], *, scale: float,
                   self_mask: bool) -> Float[Array, "batch heads vdim"]:
    b, h = cluster.shape
    bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
    k, v, held = (x[bi, hi, cluster] for x in (cache.route_k, cache.route_v, cache.route_pos))
    visible = (held >= 0)[:, :, None, :]
    is_self = (held == pos)[:, :, None, :] if self_mask else None
    out = masked_attention(q_hat[:, :, None, :], k, v, visible, scale=scale, is_self=is_self)
    return out[:, :, 0]


# ---- balanced assignment (approximation) ------------------------------------------------------

def balanced_decode(cache: AttentionCache, q_hat: Float[Array, "batch heads dim"],
                    q_scores: Float[Array, "batch heads clusters"], pos: Int[Array, ""], *,
                    window: int, scale: float, self_mask: bool) -> Float[Array, "batch heads vdim"]:
    """The query attends to the `window` best-scored earlier keys (itself included) of its
    nearest centroid. In the full forward pass a token instead sits in every cluster whose
    top-W over the *whole* sequence includes it, and later tokens can push it out: the cached
    result differs (measured in docs/performance.md); it is exact when every cluster can hold
    every token (window >= length)."""
    cluster = jnp.argmax(q_scores, axis=-1)  # [b, h]
    score = jnp.take_along_axis(cache.bal_score, cluster[:, None, :, None], axis=3)[..., 0]
    score = jnp.where((cache.bal_pos >= 0)[:, :, None], score, -jnp.inf)  # [b, slots, h]
    top = jax.lax.top_k(score.transpose(0, 2, 1), min(window, score.shape[1]))[1]  # [b, h, W]
    bi, hi = jnp.arange(q_hat.shape[0])[:, None, None], jnp.arange(q_hat.shape[1])[None, :, None]
    k = cache.bal_k[bi, top, hi]  # [b, h, W, dim]
    v = cache.bal_v[bi, top, hi]
    held = jnp.take_along_axis(cache.bal_pos[:, None, :], top, axis=2)  # [b, h, W]
    visible = (held >= 0)[:, :, None, :]
    is_self = (held == pos)[:, :, None, :] if self_mask else None
    out = masked_attention(q_hat[:, :, None, :], k, v, visible, scale=scale, is_self=is_self)
    return out[:, :, 0]
