"""One attention layer whose heads mix local, full and routing attention."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from rtlib.attention import full_attention, local_attention
from rtlib.nn.layers import Linear, rotary
from rtlib.routing import RoutingStats, kmeans_init, normalize, routing_attention
from rtlib.spec.schema import HeadCounts, LocalHeads, ModelSpec, RoutingHeads


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

    def __init__(self, spec: ModelSpec, counts: HeadCounts, *, key: PRNGKeyArray):
        d, dh = spec.d_model, spec.head_dim
        self.counts, self.head_dim, self.causal = counts, dh, spec.causal
        self.local = spec.group("local") if counts.local else None
        self.routing = spec.group("routing") if counts.routing else None
        self.rotary = spec.embedding.positions == "rotary"
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
        b, n, _ = x.shape
        nl, nf, nr = self.counts.local, self.counts.full, self.counts.routing
        split = lambda t, h: t.reshape(b, n, h, self.head_dim)  # noqa: E731
        q = split(self.wq(x), self.counts.total)
        v = split(self.wv(x), self.counts.total)
        k = None if self.wk is None else split(self.wk(x), self.wk.weight.shape[1] // self.head_dim)
        outs = []
        if nl + nf:
            ql, kl = q[:, :, : nl + nf], k[:, :, : nl + nf]
            if self.rotary:
                ql, kl = rotary(ql), rotary(kl)
            if nl:
                outs.append(local_attention(
                    ql[:, :, :nl], kl[:, :, :nl], v[:, :, :nl], window=self.local.window,
                    causal=self.causal, look_back=self.local.look_back,
                    look_ahead=self.local.look_ahead, q_mask=mask, kv_mask=mask))
            if nf:
                outs.append(full_attention(ql[:, :, nl:], kl[:, :, nl:], v[:, :, nl : nl + nf],
                                           causal=self.causal, q_mask=mask, kv_mask=mask))
        stats = None
        if nr:
            cfg = self.routing
            qr = q[:, :, nl + nf :]
            kr = qr if cfg.shared_qk else k[:, :, nl + nf :]
            if cfg.rotary:
                qr = rotary(qr)
                kr = qr if cfg.shared_qk else rotary(kr)
            if init_key is not None:
                centroids = self._kmeans_init(qr, kr, mask, init_key, init_iters)
            out, stats = routing_attention(
                qr, kr, v[:, :, nl + nf :], centroids, window=cfg.window,
                assignment=cfg.assignment, causal=self.causal, norm=cfg.norm,
                logit_scale=cfg.logit_scale, q_mask=mask, kv_mask=mask, shared_qk=cfg.shared_qk,
                self_mask=cfg.self_mask)
            outs.append(out)
        y = jnp.concatenate(outs, axis=2).reshape(b, n, -1)
        return self.wo(y), stats, centroids

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
