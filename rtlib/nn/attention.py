"""One attention layer whose heads mix kinds (local, full, routing; see `rtlib.nn.heads`).

The layer owns the projections: it projects every head at once, hands each kind its slice of
q, k and v, and concatenates what the kinds return before one output projection.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.heads import HEAD_KINDS, AttentionHeads, DecodingCache, RoutingAttentionHeads
from rtlib.nn.layers import Linear
from rtlib.routing import RoutingStats
from rtlib.spec.schema import HeadCounts, ModelSpec

# Per kind present, in HEAD_KINDS order: that kind's (q, k, v).
KindInputs = tuple[tuple[Array, Array, Array], ...]
LayerCache = tuple[DecodingCache, ...]  # one per kind present, in HEAD_KINDS order


class MixedAttention(eqx.Module):
    """Heads in `HEAD_KINDS` order ([local | full | routing]), one output projection over all.

    Kinds without their own keys (shared-QK routing heads) have no columns in `wk`.
    """

    wq: Linear
    wk: Linear | None
    wv: Linear
    wo: Linear
    kinds: tuple[AttentionHeads, ...]
    counts: HeadCounts = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray):
        d, dh = spec.d_model, spec.head_dim
        self.counts, self.head_dim = counts, dh
        self.kinds = tuple(cls.from_spec(spec, getattr(counts, name))
                           for name, cls in HEAD_KINDS.items() if getattr(counts, name))
        k_heads = sum(kind.count for kind in self.kinds if kind.own_keys)
        kq, kk, kv, ko = jax.random.split(key, 4)
        into_heads = ("embed", "heads")
        self.wq = Linear(d, counts.total * dh, bias=False, key=kq, axes=into_heads)
        self.wk = (Linear(d, k_heads * dh, bias=False, key=kk, axes=into_heads)
                   if k_heads else None)
        self.wv = Linear(d, counts.total * dh, bias=False, key=kv, axes=into_heads)
        self.wo = Linear(counts.total * dh, d, bias=False, key=ko, axes=("heads", "embed"))

    @property
    def routing(self) -> RoutingAttentionHeads | None:
        """The layer's routing heads (the kind whose state is the centroids), if any."""
        return next((k for k in self.kinds if isinstance(k, RoutingAttentionHeads)), None)

    def __call__(
        self,
        x: Float[Array, "batch seq dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        *,
        mask: Bool[Array, "batch seq"] | None,
        init_key: PRNGKeyArray | None = None,
        init_iters: int = 10,
    ) -> tuple[Float[Array, "batch seq dmodel"], RoutingStats | None, Array | None]:
        """Returns (output, routing statistics, centroids used). With `init_key`, the routing
        heads first initialise their centroids by k-means on this batch's q (and k)."""
        inputs = self.project(x)
        if init_key is not None and self.routing is not None:
            q, k, _ = inputs[self.kinds.index(self.routing)]
            centroids = self.routing.kmeans_init(q, k, mask, init_key, init_iters)
        out, stats = self.attend(inputs, centroids, mask)
        return out, stats, centroids

    def project(self, x: Float[Array, "batch seq dmodel"],
                offset: Int[Array, ""] | int = 0) -> KindInputs:
        """Each kind's (q, k, v), `[batch, seq, heads, dim]`, positions from `offset`."""
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, -1, self.head_dim)  # noqa: E731
        q, v = split(self.wq(x)), split(self.wv(x))
        k = None if self.wk is None else split(self.wk(x))
        inputs, first, first_k = [], 0, 0
        for kind in self.kinds:
            heads = slice(first, first + kind.count)
            kk = None
            if kind.own_keys:
                kk = k[:, :, first_k: first_k + kind.count]
                first_k += kind.count
            qk = kind.positions(q[:, :, heads], kk, offset)
            inputs.append((*qk, v[:, :, heads]))
            first += kind.count
        return tuple(inputs)

    def attend(self, inputs: KindInputs, centroids: Array | None,
               mask: Bool[Array, "batch seq"] | None
               ) -> tuple[Float[Array, "batch seq dmodel"], RoutingStats | None]:
        """Every kind on its inputs, outputs concatenated and projected."""
        outs, stats = [], None
        for kind, (q, k, v) in zip(self.kinds, inputs, strict=True):
            out, kind_stats = kind(q, k, v, self._state(kind, centroids), mask=mask)
            outs.append(out)
            stats = kind_stats if kind_stats is not None else stats
        b, n = inputs[0][2].shape[:2]
        return self.wo(jnp.concatenate(outs, axis=2).reshape(b, n, -1)), stats

    def prefill(
        self,
        x: Float[Array, "batch seq dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        *,
        capacity: int,
    ) -> tuple[Float[Array, "batch seq dmodel"], LayerCache]:
        """The forward pass over a prompt (exactly `__call__`'s outputs) and the decoding cache
        it leaves; `capacity` is the longest sequence the cache will see (full and balanced
        heads keep every token; local and causal routing heads need no more than their
        windows)."""
        outs, caches = [], []
        inputs = self.project(x)
        for kind, (q, k, v) in zip(self.kinds, inputs, strict=True):
            out, cache = kind.prefill(q, k, v, self._state(kind, centroids), capacity=capacity)
            outs.append(out)
            caches.append(cache)
        b, n = x.shape[:2]
        return self.wo(jnp.concatenate(outs, axis=2).reshape(b, n, -1)), tuple(caches)

    def decode(
        self,
        x: Float[Array, "batch 1 dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        cache: LayerCache,
        pos: Int[Array, ""],
    ) -> tuple[Float[Array, "batch 1 dmodel"], LayerCache]:
        """One new token at position `pos` (all earlier ones are in `cache`)."""
        outs, caches = [], []
        inputs = self.project(x, pos)
        for kind, (q, k, v), c in zip(self.kinds, inputs, cache, strict=True):
            out, c = kind.decode(q[:, 0], k[:, 0], v[:, 0], self._state(kind, centroids), c, pos)
            outs.append(out.astype(v.dtype))
            caches.append(c)
        y = jnp.concatenate(outs, axis=1).reshape(x.shape[0], 1, -1)
        return self.wo(y), tuple(caches)

    def _state(self, kind: AttentionHeads, centroids: Array | None) -> Array | None:
        return centroids if kind is self.routing else None
