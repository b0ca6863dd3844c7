"""Decoding caches of routing heads.

- Causal assignment (`ClusterCache`): per head and cluster, a ring buffer of the W most recent
  keys (normalised) and values routed there: O(K W d) per head, whatever the length. A new
  token joins its key's nearest centroid, then its query reads its own cluster's buffer:
  exactly the full forward pass's "W most recent same-cluster tokens".
- Balanced assignment (`BalancedCache`, an approximation, see `BalancedCache.attend`): every
  key with its centroid scores, in a buffer of the generation's capacity.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rtlib.attention.core import masked_attention
from rtlib.nn.cache import EMPTY, DecodingCache, ring_fill, ring_push


class ClusterCache(DecodingCache):
    """Per (batch, head, cluster) the last `window` keys and values routed there, their
    positions, and how many tokens each cluster has received."""

    k: Float[Array, "batch heads clusters window dim"]
    v: Float[Array, "batch heads clusters window vdim"]
    pos: Int[Array, "batch heads clusters window"]
    count: Int[Array, "batch heads clusters"]

    @classmethod
    def fill(cls, cluster: Int[Array, "batch seq heads"],
             k_hat: Float[Array, "batch seq heads dim"], v: Float[Array, "batch seq heads vdim"],
             *, clusters: int, window: int) -> "ClusterCache":
        """Each key at slot (its index within its cluster) % window."""
        n = cluster.shape[1]

        def one(c, kh, vh):  # one (batch, head): c [seq], kh [seq, dim], vh [seq, vdim]
            onehot = jax.nn.one_hot(c, clusters, dtype=jnp.int32)
            before = jnp.cumsum(onehot, axis=0) - onehot
            index = jnp.take_along_axis(before, c[:, None], axis=1)[:, 0]  # index in cluster
            count = jnp.sum(onehot, axis=0)
            slot = jnp.where(index >= count[c] - window, index % window, window)  # older: drop
            put = lambda buf, x: buf.at[c, slot].set(x, mode="drop")  # noqa: E731
            k_buf = put(jnp.zeros((clusters, window, kh.shape[-1]), jnp.float32), kh)
            v_buf = put(jnp.zeros((clusters, window, vh.shape[-1]), vh.dtype), vh)
            pos = put(jnp.full((clusters, window), EMPTY, jnp.int32),
                      jnp.arange(n, dtype=jnp.int32))
            return k_buf, v_buf, pos, count

        per_head = jax.vmap(one, in_axes=(1, 1, 1))  # over heads (axis 2 of [b, n, h, d])
        return cls(*jax.vmap(per_head)(cluster, k_hat, v))

    def push(self, cluster: Int[Array, "batch heads"], k_hat: Float[Array, "batch heads dim"],
             v: Float[Array, "batch heads vdim"], pos: Int[Array, ""]) -> "ClusterCache":
        b, h = cluster.shape
        bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
        slot = self.count[bi, hi, cluster] % self.k.shape[3]
        return ClusterCache(self.k.at[bi, hi, cluster, slot].set(k_hat),
                            self.v.at[bi, hi, cluster, slot].set(v.astype(self.v.dtype)),
                            self.pos.at[bi, hi, cluster, slot].set(pos),
                            self.count.at[bi, hi, cluster].add(1))

    def attend(self, cluster: Int[Array, "batch heads"], q_hat: Float[Array, "batch heads dim"],
               pos: Int[Array, ""], *, scale: float,
               self_mask: bool) -> Float[Array, "batch heads vdim"]:
        """The query reads its own cluster's buffer."""
        b, h = cluster.shape
        bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
        k, v, held = (x[bi, hi, cluster] for x in (self.k, self.v, self.pos))
        visible = (held >= 0)[:, :, None, :]
        is_self = (held == pos)[:, :, None, :] if self_mask else None
        out = masked_attention(q_hat[:, :, None, :], k, v, visible, scale=scale, is_self=is_self)
        return out[:, :, 0]


class BalancedCache(DecodingCache):
    """Every key (normalised), value and centroid score, in a buffer of the capacity."""

    k: Float[Array, "batch slots heads dim"]
    v: Float[Array, "batch slots heads vdim"]
    score: Float[Array, "batch slots heads clusters"]
    pos: Int[Array, "batch slots"]

    @property
    def holds_every_token(self) -> bool:
        return True

    @classmethod
    def fill(cls, k_hat: Array, v: Array, s_k: Array, capacity: int) -> "BalancedCache":
        k_buf, held = ring_fill(k_hat, capacity)
        v_buf, _ = ring_fill(v, capacity)
        s_buf, _ = ring_fill(s_k, capacity)
        return cls(k_buf, v_buf, s_buf, held)

    def push(self, k_hat: Float[Array, "batch heads dim"], v: Float[Array, "batch heads vdim"],
             s_k: Float[Array, "batch heads clusters"], pos: Int[Array, ""]) -> "BalancedCache":
        k_buf, held = ring_push(self.k, self.pos, k_hat, pos)
        v_buf, _ = ring_push(self.v, self.pos, v, pos)
        s_buf, _ = ring_push(self.score, self.pos, s_k, pos)
        return BalancedCache(k_buf, v_buf, s_buf, held)

    def attend(self, q_hat: Float[Array, "batch heads dim"],
               q_scores: Float[Array, "batch heads clusters"], pos: Int[Array, ""], *,
               window: int, scale: float, self_mask: bool) -> Float[Array, "batch heads vdim"]:
        """The query attends to the `window` best-scored earlier keys (itself included) of its
        nearest centroid. In the full forward pass a token instead sits in every cluster whose
        top-W over the *whole* sequence includes it, and later tokens can push it out: the
        cached result differs (measured in docs/performance.md); it is exact when every
        cluster can hold every token (window >= length)."""
        cluster = jnp.argmax(q_scores, axis=-1)  # [b, h]
        score = jnp.take_along_axis(self.score, cluster[:, None, :, None], axis=3)[..., 0]
        score = jnp.where((self.pos >= 0)[:, :, None], score, -jnp.inf)  # [b, slots, h]
        top = jax.lax.top_k(score.transpose(0, 2, 1), min(window, score.shape[1]))[1]
        bi = jnp.arange(q_hat.shape[0])[:, None, None]
        hi = jnp.arange(q_hat.shape[1])[None, :, None]
        k = self.k[bi, top, hi]  # [b, h, W, dim]
        v = self.v[bi, top, hi]
        held = jnp.take_along_axis(self.pos[:, None, :], top, axis=2)  # [b, h, W]
        visible = (held >= 0)[:, :, None, :]
        is_self = (held == pos)[:, :, None, :] if self_mask else None
        out = masked_attention(q_hat[:, :, None, :], k, v, visible, scale=scale,
                               is_self=is_self)
        return out[:, :, 0]
