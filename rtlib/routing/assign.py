"""Who goes with whom: normalisation, centroid scores and the two assignment modes.

Everything here works on one head of one sequence; callers vmap over batch and heads. All
routing math is float32 whatever the input dtype (bf16 ties would reorder clusters).
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

# The name of the memberships (top-k members, nearest centroids): a remat policy saves these
# few integers so that recomputing a block does not redo the scores, top-k and argmax.
ROUTING_DECISIONS = "routing_decisions"

Norm = Literal["layernorm", "l2"]
Assignment = Literal["balanced", "causal"]
LogitScale = Literal["rsqrt_dim", "none"]

LAYERNORM_EPS = 1e-6  # the paper code's layer_norm(scaling=False) epsilon
L2_EPS = 1e-12


def normalize(x: Float[Array, "*batch dim"], norm: Norm) -> Float[Array, "*batch dim"]:
    """The routing normalisation: LayerNorm without gain or bias (paper), or unit L2 (lucidrains)."""
    x = x.astype(jnp.float32)
    if norm == "layernorm":
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + LAYERNORM_EPS)
    if norm == "l2":
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), L2_EPS))
    raise ValueError(f"unknown routing norm {norm!r}; expected 'layernorm' or 'l2'")


def logit_scale_value(logit_scale: LogitScale, dim: int) -> float:
    """`rsqrt_dim` (Lingvo, lucidrains) or `none` (the paper code: raw dot products)."""
    if logit_scale == "rsqrt_dim":
        return dim**-0.5
    if logit_scale == "none":
        return 1.0
    raise ValueError(f"unknown logit_scale {logit_scale!r}; expected 'rsqrt_dim' or 'none'")


def centroid_scores(
    x_hat: Float[Array, "seq dim"], centroids: Float[Array, "clusters dim"]
) -> Float[Array, "seq clusters"]:
    """Dot products with the centroids (not Euclidean distances), in float32. Scores only
    decide memberships (top-k, argmax), so no gradient flows through them: the backward pass
    skips this O(seq * clusters * dim) product."""
    return jnp.einsum("nd,kd->nk", jax.lax.stop_gradient(x_hat).astype(jnp.float32),
                      jax.lax.stop_gradient(centroids).astype(jnp.float32))


def resolve_shared_qk(
    q: Float[Array, "*shape"], k: Float[Array, "*shape"] | None, shared_qk: bool | None
) -> tuple[Float[Array, "*shape"], bool]:
    """(keys, shared?): shared QK is `k=None`, `k is q`, or `shared_qk=True` (k then ignored)."""
    if shared_qk is None:
        shared_qk = k is None or k is q
    if k is None and not shared_qk:
        raise ValueError("k=None means shared QK; it cannot be combined with shared_qk=False")
    return (q if k is None else k), shared_qk


def resolve_masks(
    mask: Bool[Array, "batch seq"] | None,
    q_mask: Bool[Array, "batch seq"] | None,
    kv_mask: Bool[Array, "batch seq"] | None,
) -> tuple[Bool[Array, "batch seq"] | None, Bool[Array, "batch seq"] | None, bool]:
    """(query mask, key mask, one mask for both?): `mask` is one padding mask for queries and
    keys; `q_mask` / `kv_mask` are separate ones (the same object counts as one mask)."""
    if mask is not None:
        if q_mask is not None or kv_mask is not None:
            raise ValueError("pass either mask= (one padding mask for queries and keys) or "
                             "q_mask= / kv_mask=, not both")
        return mask, mask, True
    return q_mask, kv_mask, kv_mask is q_mask


def route_scores(
    q: Float[Array, "seq dim"],
    k: Float[Array, "seq dim"],
    centroids: Float[Array, "clusters dim"],
    *,
    norm: Norm,
    shared_qk: bool,
) -> tuple[Float[Array, "seq dim"], Float[Array, "seq dim"], Float[Array, "seq clusters"],
           Float[Array, "seq clusters"]]:
    """(q_hat, k_hat, query scores, key scores) of one head; with shared QK, k is ignored."""
    q_hat = normalize(q, norm)
    k_hat = q_hat if shared_qk else normalize(k, norm)
    s_q = centroid_scores(q_hat, centroids)
    return q_hat, k_hat, s_q, s_q if shared_qk else centroid_scores(k_hat, centroids)


def nearest_cluster(
    scores: Float[Array, "seq clusters"], valid: Bool[Array, " seq"] | None
) -> Int[Array, " seq"]:
    """Argmax assignment; invalid (padded) tokens get the out-of-range id `clusters`
    (`valid=None`: no padding)."""
    nearest = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    nearest = checkpoint_name(nearest, ROUTING_DECISIONS)
    return nearest if valid is None else jnp.where(valid, nearest, scores.shape[-1])


def balanced_members(
    scores: Float[Array, "seq clusters"], valid: Bool[Array, " seq"] | None, window: int
) -> Int[Array, "clusters window"]:
    """Top-`window` tokens of every centroid, sorted by position (the paper's assignment).

    Padded tokens score -inf, so they are only taken when a cluster has fewer than `window`
    valid candidates; callers mask them out of attention (`valid=None`: no padding).
    """
    masked = scores if valid is None else jnp.where(valid[:, None], scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked.T, window)
    return checkpoint_name(jnp.sort(idx, axis=-1).astype(jnp.int32), ROUTING_DECISIONS)
