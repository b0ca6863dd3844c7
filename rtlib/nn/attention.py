"""One attention layer whose heads mix local, full and routing attention."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from kernels.dispatch import candidates
from rtlib.attention import full_attention, local_attention
from rtlib.nn.cache import (
    AttentionCache,
    attend_buffer,
    balanced_decode,
    cluster_attend,
    cluster_fill,
    cluster_push,
    ring_fill,
    ring_push,
)
from rtlib.nn.layers import Linear, rotary
from rtlib.parallel.context import per_device, psum
from rtlib.routing import RoutingStats, kmeans_init, normalize, routing_attention
from rtlib.routing.assign import logit_scale_value, route_scores
from rtlib.spec.schema import HeadCounts, LocalHeads, ModelSpec, RoutingHeads

_BSHD = P("batch", None, "heads", None)  # logical layout of q, k, v and outputs
_BS = P("batch", None)


class MixedAttention(eqx.Module):
    """Heads in the order [local | full | routing], one output projection over all of them.

    With shared QK the routing heads have no key projection (k = q), as in the paper.
    """

    wq: Linear
    wk: Linear | None
    wv: Linear
    wo: Linear
    counts: HeadCounts = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    local: LocalHeads | None = eqx.field(static=True)
    routing: RoutingHeads | None = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)
    # `attention.implementation` as a hashable value (None, a name or a tuple of names).
    implementation: str | tuple[str, ...] | None = eqx.field(static=True)
    interpret: bool = eqx.field(static=True)

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray):
        d, dh = spec.d_model, spec.head_dim
        self.counts, self.head_dim, self.causal = counts, dh, spec.causal
        self.local = spec.group("local") if counts.local else None
        self.routing = spec.group("routing") if counts.routing else None
        self.rotary = spec.embedding.positions == "rotary"
        impl = spec.attention.implementation
        self.implementation = tuple(impl) if isinstance(impl, list) else impl
        self.interpret = spec.attention.interpret
        shared = self.routing is not None and self.routing.shared_qk
        k_heads = counts.total - (counts.routing if shared else 0)
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq = Linear(d, counts.total * dh, bias=False, key=kq)
        self.wk = Linear(d, k_heads * dh, bias=False, key=kk) if k_heads else None
        self.wv = Linear(d, counts.total * dh, bias=False, key=kv)
        self.wo = Linear(counts.total * dh, d, bias=False, key=ko)

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
        heads = self._project(x)
        if init_key is not None and self.counts.routing:
            centroids = self._kmeans_init(heads[2], heads[3], mask, init_key, init_iters)
        out, stats = self._attend(*heads, centroids, mask)
        return out, stats, centroids

    def _project(self, x, offset: Int[Array, ""] | int = 0):
        """(q, k of local + full heads, q, k of routing heads, v), positions from `offset`."""
        b, n, _ = x.shape
        nl, nf, nr = self.counts.local, self.counts.full, self.counts.routing
        split = lambda t, h: t.reshape(b, n, h, self.head_dim)
        q = split(self.wq(x), self.counts.total)
        v = split(self.wv(x), self.counts.total)
        k = None if self.wk is None else split(self.wk(x), self.wk.weight.shape[1] // self.head_dim)
        ql = kl = qr = kr = None
        if nl + nf:
            ql, kl = q[:, :, : nl + nf], k[:, :, : nl + nf]
            if self.rotary:
                ql, kl = rotary(ql, offset), rotary(kl, offset)
        if nr:
            cfg = self.routing
            qr = q[:, :, nl + nf :]
            kr = qr if cfg.shared_qk else k[:, :, nl + nf :]
            if cfg.rotary:
                qr = rotary(qr, offset)
                kr = qr if cfg.shared_qk else rotary(kr, offset)
        return ql, kl, qr, kr, v

    def _attend(self, ql, kl, qr, kr, v, centroids, mask):
        """Each head kind runs per device (batch and heads split over the active mesh, see
        `rtlib.parallel`); routing statistics are summed over every device before they leave."""
        b, n = v.shape[:2]
        nl, nf, nr = self.counts.local, self.counts.full, self.counts.routing
        kernel = dict(implementation=self.implementation, interpret=self.interpret)
        # Our kernels (and splash) build their outputs without varying-manual-axes types, so
        # shard_map checks them only on the pure-XLA path.
        check_vma = set(candidates(self.implementation)) == {"xla"}
        outs = []
        if nl:
            local = functools.partial(
                local_attention, window=self.local.window, causal=self.causal,
                look_back=self.local.look_back, look_ahead=self.local.look_ahead, **kernel)
            outs.append(per_device(
                lambda q, k, v, m: local(q, k, v, q_mask=m, kv_mask=m),
                ql[:, :, :nl], kl[:, :, :nl], v[:, :, :nl], mask,
                in_specs=(_BSHD, _BSHD, _BSHD, _BS), out_specs=_BSHD, check_vma=check_vma))
        if nf:
            outs.append(per_device(
                lambda q, k, v, m: full_attention(q, k, v, causal=self.causal, q_mask=m,
                                                  kv_mask=m),
                ql[:, :, nl:], kl[:, :, nl:], v[:, :, nl: nl + nf], mask,
                in_specs=(_BSHD, _BSHD, _BSHD, _BS), out_specs=_BSHD))
        stats = None
        if nr:
            cfg = self.routing

            def route(q, k, v, mu, m):
                out, st = routing_attention(
                    q, k, v, mu, window=cfg.window, assignment=cfg.assignment,
                    causal=self.causal, norm=cfg.norm, logit_scale=cfg.logit_scale, q_mask=m,
                    kv_mask=m, shared_qk=cfg.shared_qk, self_mask=cfg.self_mask, **kernel)
                # Per-head sums over the whole batch; head-summed scalars over all devices.
                return out, (psum(st.counts, "batch"), psum(st.sums, "batch"),
                             *(psum(x, "batch", "heads")
                               for x in (st.sq_error, st.covered, st.queries)))

            out, fields = per_device(
                route, qr, None if cfg.shared_qk else kr, v[:, :, nl + nf:], centroids, mask,
                in_specs=(_BSHD, None if cfg.shared_qk else _BSHD, _BSHD, P("heads", None, None),
                          _BS),
                out_specs=(_BSHD, (P("heads", None), P("heads", None, None), P(), P(), P())),
                check_vma=check_vma)
            stats = RoutingStats(*fields)
            outs.append(out)
        y = jnp.concatenate(outs, axis=2).reshape(b, n, -1)
        return self.wo(y), stats

    def prefill(
        self,
        x: Float[Array, "batch seq dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        *,
        capacity: int,
    ) -> tuple[Float[Array, "batch seq dmodel"], AttentionCache]:
        """The forward pass over a prompt (exactly `__call__`'s outputs) and the decoding cache
        it leaves; `capacity` is the longest sequence the cache will see (full and balanced
        heads keep every token; local and causal routing heads need no more than their
        windows)."""
        _, kl, qr, kr, v = heads = self._project(x)
        out, _ = self._attend(*heads, centroids, None)
        nl, nf = self.counts.local, self.counts.full
        fields = {}
        if nl:
            slots = (self.local.look_back + 1) * self.local.window
            fields["local_k"], fields["local_pos"] = ring_fill(kl[:, :, :nl], slots)
            fields["local_v"], _ = ring_fill(v[:, :, :nl], slots)
        if nf:
            fields["full_k"], fields["full_pos"] = ring_fill(kl[:, :, nl:], capacity)
            fields["full_v"], _ = ring_fill(v[:, :, nl: nl + nf], capacity)
        if self.counts.routing:
            cfg = self.routing
            vr = v[:, :, nl + nf:]
            _, k_hat, _, s_k = self._route(qr, kr, centroids)
            if cfg.assignment == "causal":
                (fields["route_k"], fields["route_v"], fields["route_pos"],
                 fields["route_count"]) = cluster_fill(jnp.argmax(s_k, -1), k_hat, vr,
                                                       clusters=cfg.clusters, window=cfg.window)
            else:
                fields["bal_k"], fields["bal_pos"] = ring_fill(k_hat, capacity)
                fields["bal_v"], _ = ring_fill(vr, capacity)
                fields["bal_score"], _ = ring_fill(s_k, capacity)
        cache = AttentionCache(**fields)
        return out, cache

    def decode(
        self,
        x: Float[Array, "batch 1 dmodel"],
        centroids: Float[Array, "rheads clusters hdim"] | None,
        cache: AttentionCache,
        pos: Int[Array, ""],
    ) -> tuple[Float[Array, "batch 1 dmodel"], AttentionCache]:
        """One new token at position `pos` (all earlier ones are in `cache`)."""
        ql, kl, qr, kr, v = (None if t is None else t[:, 0] for t in self._project(x, pos))
        nl, nf = self.counts.local, self.counts.full
        outs = []
        if nl:
            k_buf, held = ring_push(cache.local_k, cache.local_pos, kl[:, :nl], pos)
            v_buf, _ = ring_push(cache.local_v, cache.local_pos, v[:, :nl], pos)
            w = self.local.window
            visible = (held >= 0) & (held // w >= pos // w - self.local.look_back)
            outs.append(attend_buffer(ql[:, :nl], k_buf, v_buf, visible[:, None, None, :],
                                      scale=self.head_dim**-0.5))
            cache = eqx.tree_at(lambda c: (c.local_k, c.local_v, c.local_pos), cache,
                                (k_buf, v_buf, held))
        if nf:
            k_buf, held = ring_push(cache.full_k, cache.full_pos, kl[:, nl:], pos)
            v_buf, _ = ring_push(cache.full_v, cache.full_pos, v[:, nl: nl + nf], pos)
            outs.append(attend_buffer(ql[:, nl:], k_buf, v_buf, (held >= 0)[:, None, None, :],
                                      scale=self.head_dim**-0.5))
            cache = eqx.tree_at(lambda c: (c.full_k, c.full_v, c.full_pos), cache,
                                (k_buf, v_buf, held))
        if self.counts.routing:
            cfg = self.routing
            vr = v[:, nl + nf:]
            q_hat, k_hat, s_q, s_k = self._route(qr, kr, centroids)
            scale = logit_scale_value(cfg.logit_scale, self.head_dim)
            if cfg.assignment == "causal":
                cache = cluster_push(cache, jnp.argmax(s_k, -1), k_hat, vr, pos)
                outs.append(cluster_attend(cache, jnp.argmax(s_q, -1), q_hat, pos, scale=scale,
                                           self_mask=cfg.self_mask))
            else:
                bk, held = ring_push(cache.bal_k, cache.bal_pos, k_hat, pos)
                bv, _ = ring_push(cache.bal_v, cache.bal_pos, vr, pos)
                bs, _ = ring_push(cache.bal_score, cache.bal_pos, s_k, pos)
                cache = eqx.tree_at(lambda c: (c.bal_k, c.bal_v, c.bal_score, c.bal_pos), cache,
                                    (bk, bv, bs, held))
                outs.append(balanced_decode(cache, q_hat, s_q, pos, window=cfg.window,
                                            scale=scale, self_mask=cfg.self_mask))
        y = jnp.concatenate([o.astype(v.dtype) for o in outs], axis=1).reshape(x.shape[0], 1, -1)
        return self.wo(y), cache

    def _route(self, qr, kr, centroids):
        """Normalised q, k of the routing heads and their centroid scores, [..., heads, *],
        by the same `route_scores` as the full forward pass (so both pick the same clusters)."""
        cfg = self.routing

        def per_head(q, k, mu):  # q, k: [..., dim] of one head, flattened to [points, dim]
            flat = lambda t: t.reshape(-1, t.shape[-1])
            out = route_scores(flat(q), flat(k), mu, norm=cfg.norm, shared_qk=cfg.shared_qk)
            return tuple(t.reshape(*q.shape[:-1], t.shape[-1]) for t in out)

        return jax.vmap(per_head, in_axes=(-2, -2, 0), out_axes=-2)(qr, kr, centroids)

    def _kmeans_init(self, qr, kr, mask, key, iters):
        cfg = self.routing
        vectors = [qr] if cfg.shared_qk else [qr, kr]
        # [heads, points, dim]: every (example, position) of q (and k) is a point.
        x = jnp.concatenate(
            [normalize(t, cfg.norm).transpose(2, 0, 1, 3).reshape(t.shape[2], -1, t.shape[3])
             for t in vectors], axis=1)
        valid = None
        if mask is not None:
            valid = jnp.tile(mask.reshape(-1), len(vectors))
        return kmeans_init(x, cfg.clusters, key=key, iters=iters, valid=valid)
