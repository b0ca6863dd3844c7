"""Routing heads (ALGORITHM.md section 2): attention among tokens routed to the same centroid.
Their state is the layer's centroids; their statistics feed the k-means update."""

from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from rtlib.nn.heads.base import BS, BSHD, AttentionHeads, checks_vma, implementation_of
from rtlib.nn.heads.routing_cache import BalancedCache, ClusterCache
from rtlib.parallel.context import per_device, psum
from rtlib.routing import RoutingStats, kmeans_init, normalize, routing_attention
from rtlib.routing.assign import logit_scale_value, route_scores
from rtlib.spec.schema import ModelSpec, RoutingHeads


@final
class RoutingAttentionHeads(AttentionHeads):
    count: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    config: RoutingHeads = eqx.field(static=True)
    implementation: str | tuple[str, ...] | None = eqx.field(static=True)
    interpret: bool = eqx.field(static=True)

    @classmethod
    def from_spec(cls, spec: ModelSpec, count: int) -> "RoutingAttentionHeads":
        return cls(count=count, head_dim=spec.head_dim, causal=spec.causal,
                   config=spec.group("routing"), implementation=implementation_of(spec),
                   interpret=spec.attention.interpret)

    @property
    def own_keys(self) -> bool:
        return not self.config.shared_qk  # shared QK: k = q, as in the paper

    @property
    def rotary(self) -> bool:
        return self.config.rotary

    def __call__(self, q, k, v, centroids, *, mask):
        """Routing statistics leave summed over every device: per-head sums over the whole
        batch, head-summed scalars over all devices."""
        cfg = self.config
        shared = cfg.shared_qk

        def route(q, k, v, mu, m):
            out, st = routing_attention(
                q, k, v, mu, window=cfg.window, assignment=cfg.assignment, causal=self.causal,
                norm=cfg.norm, logit_scale=cfg.logit_scale, mask=m,
                shared_qk=shared, self_mask=cfg.self_mask, implementation=self.implementation,
                interpret=self.interpret)
            return out, (psum(st.counts, "batch"), psum(st.sums, "batch"),
                         *(psum(x, "batch", "heads")
                           for x in (st.sq_error, st.covered, st.queries)))

        out, fields = per_device(
            route, q, None if shared else k, v, centroids, mask,
            in_specs=(BSHD, None if shared else BSHD, BSHD, P("heads", None, None), BS),
            out_specs=(BSHD, (P("heads", None), P("heads", None, None), P(), P(), P())),
            check_vma=checks_vma(self.implementation))
        return out, RoutingStats(*fields)

    def prefill(self, q, k, v, centroids, *, capacity):
        out, _ = self(q, k, v, centroids, mask=None)
        cfg = self.config
        _, k_hat, _, s_k = self.scores(q, k, centroids)
        if cfg.assignment == "causal":
            cache = ClusterCache.fill(jnp.argmax(s_k, -1), k_hat, v, clusters=cfg.clusters,
                                      window=cfg.window)
        else:
            cache = BalancedCache.fill(k_hat, v, s_k, capacity)
        return out, cache

    def decode(self, q, k, v, centroids, cache, pos: Int[Array, ""]):
        cfg = self.config
        q_hat, k_hat, s_q, s_k = self.scores(q, k, centroids)
        scale = logit_scale_value(cfg.logit_scale, self.head_dim)
        if cfg.assignment == "causal":
            cache = cache.push(jnp.argmax(s_k, -1), k_hat, v, pos)
            out = cache.attend(jnp.argmax(s_q, -1), q_hat, pos, scale=scale,
                               self_mask=cfg.self_mask)
        else:
            cache = cache.push(k_hat, v, s_k, pos)
            out = cache.attend(q_hat, s_q, pos, window=cfg.window, scale=scale,
                               self_mask=cfg.self_mask)
        return out, cache

    def scores(self, q: Float[Array, "*lead heads dim"], k: Float[Array, "*lead heads dim"],
               centroids: Float[Array, "heads clusters dim"]):
        """Normalised q, k and their centroid scores, [..., heads, *], by the same
        `route_scores` as the full forward pass (so both pick the same clusters)."""
        cfg = self.config

        def per_head(q, k, mu):  # q, k: [..., dim] of one head, flattened to [points, dim]
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            out = route_scores(flat(q), flat(k), mu, norm=cfg.norm, shared_qk=cfg.shared_qk)
            return tuple(t.reshape(*q.shape[:-1], t.shape[-1]) for t in out)

        return jax.vmap(per_head, in_axes=(-2, -2, 0), out_axes=-2)(q, k, centroids)

    def kmeans_init(self, q: Float[Array, "batch seq heads dim"],
                    k: Float[Array, "batch seq heads dim"], mask: Bool[Array, "batch seq"] | None,
                    key: PRNGKeyArray, iters: int) -> Float[Array, "heads clusters dim"]:
        """Centroids by k-means over this batch's normalised q (and k): every (example,
        position) is a point."""
        cfg = self.config
        vectors = [q] if cfg.shared_qk else [q, k]
        x = jnp.concatenate(  # [heads, points, dim]
            [normalize(t, cfg.norm).transpose(2, 0, 1, 3).reshape(t.shape[2], -1, t.shape[3])
             for t in vectors], axis=1)
        valid = None if mask is None else jnp.tile(mask.reshape(-1), len(vectors))
        return kmeans_init(x, cfg.clusters, key=key, iters=iters, valid=valid)
