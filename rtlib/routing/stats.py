"""Routing statistics: what one forward pass tells the centroid update and the loss.

Every field is additive, so statistics from micro-batches, examples and data-parallel replicas
combine by plain summation (`rtlib.sum_stats`, or `jax.lax.psum` on the fields); the EMA
update and the derived metrics are computed from the sums.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from rtlib.routing.assign import nearest_cluster


class RoutingStats(eqx.Module):
    """Sufficient statistics of one routing attention call (leading dims: e.g. layers).

    - `counts`, `sums`: argmax assignments of every non-padded normalised query (and key, when
      QK is not shared): how many vectors went to each centroid, and their sum. No gradient.
    - `sq_error`: sum over those vectors of |x_hat - centroid|^2 (carries the commitment gradient).
    - `covered`, `queries`: non-padded queries that sit in at least one cluster, and all
      non-padded queries (summed over heads).
    """

    counts: Float[Array, "*lead heads clusters"]
    sums: Float[Array, "*lead heads clusters dim"]
    sq_error: Float[Array, "*lead"]
    covered: Float[Array, "*lead"]
    queries: Float[Array, "*lead"]

    @property
    def commit_loss(self) -> Float[Array, "*lead"]:
        """Mean over routed vectors and dimensions of (x_hat - sg(mu_assigned))^2 (unweighted)."""
        n = jnp.sum(self.counts, axis=(-2, -1)) * self.sums.shape[-1]
        return self.sq_error / jnp.maximum(n, 1.0)

    @property
    def coverage(self) -> Float[Array, "*lead"]:
        """Fraction of non-padded queries that are in at least one cluster."""
        return self.covered / jnp.maximum(self.queries, 1.0)


def assignment_statistics(
    x_hat: Float[Array, "seq dim"],
    scores: Float[Array, "seq clusters"],
    centroids: Float[Array, "clusters dim"],
    valid: Bool[Array, " seq"] | None,
) -> tuple[Float[Array, " clusters"], Float[Array, "clusters dim"], Float[Array, ""]]:
    """(counts, sums, squared error) of the argmax assignment of the valid vectors of one head
    (`valid=None`: all of them)."""
    k = centroids.shape[0]
    # Segment sums and a gather, O(seq * dim): one-hot matmuls would cost O(seq * clusters *
    # dim), which grows as seq^2 at a fixed cluster size. Padded tokens get id k: dropped.
    cluster = nearest_cluster(scores, valid)
    weight = jnp.ones(cluster.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    counts = jax.ops.segment_sum(weight, cluster, num_segments=k)
    sums = jax.ops.segment_sum(jax.lax.stop_gradient(x_hat).astype(jnp.float32), cluster,
                               num_segments=k)
    mu = jax.lax.stop_gradient(centroids).astype(jnp.float32)
    assigned = mu[jnp.minimum(cluster, k - 1)]
    err = jnp.sum(jnp.square(x_hat - assigned), axis=-1)
    return counts, sums, jnp.sum(err if valid is None else jnp.where(valid, err, 0.0))
