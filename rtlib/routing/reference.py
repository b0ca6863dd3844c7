"""Dense reference for routing attention: materialise who-sees-whom as n x n masks.

O(n^2) per cluster and meant for tests and for reading. It shares only the assignment
(`balanced_members`, `nearest_cluster`) and `masked_attention` with the sparse path; the
gather, scatter, sorting, windowing and masking logic are written independently here.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from rtlib.attention.core import masked_attention, valid_or_all
from rtlib.routing.assign import (
    Assignment,
    LogitScale,
    Norm,
    balanced_members,
    logit_scale_value,
    nearest_cluster,
    resolve_masks,
    resolve_shared_qk,
    route_scores,
)


def routing_visibility(
    s_q: Float[Array, "seq clusters"],
    s_k: Float[Array, "seq clusters"],
    q_valid: Bool[Array, " seq"],
    k_valid: Bool[Array, " seq"],
    *,
    window: int,
    assignment: Assignment,
    causal: bool,
) -> tuple[Bool[Array, "groups seq"], Bool[Array, "groups seq seq"]]:
    """Per group (cluster for balanced, one group for causal): query membership and the mask.

    Balanced: mask[c, i, j] = i in Q_c and j in K_c, key valid, (causal) j <= i.
    Causal: query i in cluster c sees key j iff j is a valid key of cluster c and
    R(i) - W < r(j) <= R(i) (non-causal: |R(i) - r(j)| < W), where r(j) is j's 1-based rank by
    position among the keys of its cluster and R(i) the number of keys of cluster c at
    positions <= i.
    """
    n, num_clusters = s_q.shape
    pos = jnp.arange(n)
    before = pos[None, :] <= pos[:, None]  # [i, j]: j <= i
    if assignment == "balanced":
        qm = jnp.zeros((num_clusters, n), bool)
        qm = qm.at[jnp.arange(num_clusters)[:, None], balanced_members(s_q, q_valid, window)].set(True)
        km = jnp.zeros((num_clusters, n), bool)
        km = km.at[jnp.arange(num_clusters)[:, None], balanced_members(s_k, k_valid, window)].set(True)
        mask = qm[:, :, None] & km[:, None, :] & k_valid[None, None, :]
        if causal:
            mask = mask & before[None]
        return qm, mask
    qc = nearest_cluster(s_q, q_valid)
    kc = nearest_cluster(s_k, k_valid)
    same = (qc[:, None] == kc[None, :]) & (qc[:, None] < num_clusters)  # [i, j]
    # R(i): keys of i's cluster at positions <= i; r(j): keys of j's cluster at positions <= j.
    big_r = jnp.sum(same & before, axis=1)
    key_same = kc[:, None] == kc[None, :]
    r = jnp.sum(key_same & before, axis=1)
    gap = big_r[:, None] - r[None, :]
    mask = same & ((gap >= 0) & (gap < window) if causal else (jnp.abs(gap) < window))
    return q_valid[None, :], mask[None]


def routing_attention_dense(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"] | None,
    v: Float[Array, "batch seq heads vdim"],
    centroids: Float[Array, "heads clusters dim"],
    *,
    window: int,
    assignment: Assignment = "balanced",
    causal: bool = True,
    norm: Norm = "layernorm",
    logit_scale: LogitScale = "rsqrt_dim",
    mask: Bool[Array, "batch seq"] | None = None,
    q_mask: Bool[Array, "batch seq"] | None = None,
    kv_mask: Bool[Array, "batch seq"] | None = None,
    shared_qk: bool | None = None,
    self_mask: bool = False,
) -> Float[Array, "batch seq heads vdim"]:
    """Same contract as `routing_attention` (output only), computed with dense masks."""
    batch, n, _, dim = q.shape
    k, shared_qk = resolve_shared_qk(q, k, shared_qk)
    q_mask, kv_mask, _ = resolve_masks(mask, q_mask, kv_mask)
    window = min(window, n)
    scale = logit_scale_value(logit_scale, dim)
    q_valid, k_valid = valid_or_all(q_mask, batch, n), valid_or_all(kv_mask, batch, n)
    eye = jnp.eye(n, dtype=bool)

    def head(qh, kh, vh, mu, qv, kv):
        q_hat, k_hat, s_q, s_k = route_scores(qh, kh, mu, norm=norm, shared_qk=shared_qk)
        member, mask = routing_visibility(
            s_q, s_k, qv, kv, window=window, assignment=assignment, causal=causal
        )
        outs = jax.vmap(
            lambda m: masked_attention(q_hat, k_hat, vh, m, scale=scale,
                                       is_self=eye if self_mask else None)
        )(mask)  # [groups, n, vdim]
        hits = jnp.sum(member, axis=0).astype(jnp.float32)
        total = jnp.sum(jnp.where(member[:, :, None], outs, 0.0), axis=0)
        return jnp.where(qv[:, None], total / jnp.maximum(hits, 1.0)[:, None], 0.0)

    per_head = jax.vmap(head, in_axes=(1, 1, 1, 0, None, None), out_axes=1)
    out = jax.vmap(per_head, in_axes=(0, 0, 0, None, 0, 0))(q, k, v, centroids, q_valid, k_valid)
    return out.astype(v.dtype)
