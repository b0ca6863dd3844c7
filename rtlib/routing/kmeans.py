"""Online k-means over normalised queries/keys: the EMA update and a data-dependent init.

Both are pure functions of arrays (ALGORITHM.md section 3); nothing is mutated.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray


class KMeansState(eqx.Module):
    """Centroids and the EMA accumulators that produce them (leading dims: layers, heads...).

    Invariant: `centroids` is what `kmeans_update` derives from the accumulators. A fresh state
    holds every centroid with a pseudo-count of one vector (`ema_sums = centroids`,
    `ema_counts = 1`), so the update is well defined before any data has arrived; after a few
    thousand steps at decay 0.999 the prior has no visible weight.
    """

    centroids: Float[Array, "*lead clusters dim"]
    ema_sums: Float[Array, "*lead clusters dim"]
    ema_counts: Float[Array, "*lead clusters"]

    @classmethod
    def from_centroids(cls, centroids: Float[Array, "*lead clusters dim"]) -> "KMeansState":
        """A fresh state around `centroids` (float32), each with a pseudo-count of one."""
        centroids = centroids.astype(jnp.float32)
        return cls(centroids, centroids, jnp.ones(centroids.shape[:-1], jnp.float32))


def kmeans_update(
    state: KMeansState,
    counts: Float[Array, "*lead clusters"],
    sums: Float[Array, "*lead clusters dim"],
    *,
    decay: float = 0.999,
    epsilon: float = 1e-5,
    eps: float | None = None,
) -> KMeansState:
    """One EMA step of the paper's online k-means, from statistics summed over the global batch.

    ema_counts <- decay * ema_counts + (1 - decay) * counts
    ema_sums   <- decay * ema_sums   + (1 - decay) * sums
    c = (ema_counts + epsilon) / (N + K * epsilon) * N,  N = sum_k ema_counts   (Laplace smoothing)
    centroids  <- ema_sums / c

    `epsilon` is the spec's `model.routing.epsilon`; `eps` is its deprecated former name.
    """
    if eps is not None:
        # kept for one release so callers of the old keyword get a warning, not a TypeError
        warnings.warn("kmeans_update(eps=...) is deprecated: pass epsilon=...",
                      DeprecationWarning, stacklevel=2)
        epsilon = eps
    # Python numbers only are checked (a traced decay, e.g. a schedule, is the caller's to keep
    # in range): decay 2 or epsilon -1 would silently blow the centroids up.
    if isinstance(decay, (int, float)) and not 0.0 < decay < 1.0:
        raise ValueError(f"kmeans_update: decay must be in (0, 1), got {decay}")
    if isinstance(epsilon, (int, float)) and not epsilon > 0.0:
        raise ValueError(f"kmeans_update: epsilon must be > 0, got {epsilon}")
    counts = jax.lax.stop_gradient(counts).astype(jnp.float32)
    sums = jax.lax.stop_gradient(sums).astype(jnp.float32)
    ema_counts = decay * state.ema_counts + (1.0 - decay) * counts
    ema_sums = decay * state.ema_sums + (1.0 - decay) * sums
    total = jnp.sum(ema_counts, axis=-1, keepdims=True)
    k = ema_counts.shape[-1]
    smoothed = (ema_counts + epsilon) / (total + k * epsilon) * total
    return KMeansState(ema_sums / smoothed[..., None], ema_sums, ema_counts)


def kmeans_init(
    x: Float[Array, "*lead points dim"],
    num_clusters: int,
    *,
    key: PRNGKeyArray,
    iters: int = 10,
    valid: Bool[Array, "*lead points"] | None = None,
) -> Float[Array, "*lead clusters dim"]:
    """Data-dependent centroids: `num_clusters` distinct random valid points, then Lloyd steps.

    Padded points (`valid` False) never seed or move a centroid; with fewer valid points than
    clusters, valid points seed several centroids.
    Assignment is by dot product, as in routing. A cluster that loses all its points keeps its
    previous centre. Leading dims (e.g. heads) are independent problems with independent keys.
    """
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    lead, (m, _) = x.shape[:-2], x.shape[-2:]
    if num_clusters > m:
        raise ValueError(f"kmeans_init: {num_clusters} clusters but only {m} points")
    valid = jnp.ones(x.shape[:-1], bool) if valid is None else jnp.broadcast_to(valid, x.shape[:-1])
    flat_x = x.reshape(-1, *x.shape[-2:])
    flat_valid = valid.reshape(-1, m)
    keys = jax.random.split(key, flat_x.shape[0])

    def one(xs, ok, k):
        # Distinct valid points first: random priorities, invalid points last.
        priority = jnp.where(ok, jax.random.uniform(k, (m,)), 2.0)
        # With fewer valid points than clusters, seed the rest from valid points again.
        n_valid = jnp.maximum(jnp.sum(ok), 1)
        mu = xs[jnp.argsort(priority)[jnp.arange(num_clusters) % n_valid]]

        def lloyd(mu, _):
            assign = jnp.argmax(xs @ mu.T, axis=-1)
            onehot = jnp.where(ok[:, None], jax.nn.one_hot(assign, num_clusters), 0.0)
            counts = onehot.sum(0)
            means = (onehot.T @ xs) / jnp.maximum(counts, 1.0)[:, None]
            return jnp.where(counts[:, None] > 0, means, mu), None

        mu, _ = jax.lax.scan(lloyd, mu, None, length=iters)
        return mu

    return jax.vmap(one)(flat_x, flat_valid, keys).reshape(*lead, num_clusters, x.shape[-1])
