"""Online k-means: the EMA update against NumPy, and recovery of a separated mixture."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtlib import KMeansState, kmeans_init, kmeans_update
from rtlib.routing import centroid_scores
from rtlib.routing.stats import assignment_statistics


def numpy_ema(centroids, ema_sums, ema_counts, counts, sums, decay, eps):
    """ALGORITHM.md section 3, line by line."""
    ema_counts = decay * ema_counts + (1 - decay) * counts
    ema_sums = decay * ema_sums + (1 - decay) * sums
    total = ema_counts.sum(-1, keepdims=True)
    k = ema_counts.shape[-1]
    c = (ema_counts + eps) / (total + k * eps) * total
    return ema_sums / c[..., None], ema_sums, ema_counts


def test_ema_update_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    layers, heads, k, d = 3, 2, 5, 4
    state = KMeansState(
        jnp.asarray(rng.standard_normal((layers, heads, k, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((layers, heads, k, d)), jnp.float32),
        jnp.asarray(rng.uniform(0, 10, (layers, heads, k)), jnp.float32),
    )
    ref = [np.asarray(x, np.float64) for x in (state.centroids, state.ema_sums, state.ema_counts)]
    for step, decay in itertools.product(range(4), [0.999, 0.9]):
        counts = rng.integers(0, 20, (layers, heads, k)).astype(np.float32)
        counts[0, 0, step % k] = 0  # an empty cluster exercises the smoothing
        sums = rng.standard_normal((layers, heads, k, d)).astype(np.float32)
        state = kmeans_update(state, jnp.asarray(counts), jnp.asarray(sums), decay=decay,
                              epsilon=1e-5)
        ref = list(numpy_ema(*ref, counts, sums, decay, 1e-5))
        for ours, theirs in zip((state.centroids, state.ema_sums, state.ema_counts), ref,
                                strict=True):
            np.testing.assert_allclose(np.asarray(ours), theirs, rtol=2e-5, atol=1e-5)


def test_fresh_state_is_a_fixed_point_without_data():
    c = jax.random.normal(jax.random.key(0), (2, 3, 4))
    state = KMeansState.from_centroids(c)
    new = kmeans_update(state, jnp.zeros((2, 3)), jnp.zeros((2, 3, 4)), decay=0.9, epsilon=1e-5)
    np.testing.assert_allclose(new.centroids, c, rtol=1e-4)


def mixture(key, centres, per_cluster, noise):
    k, d = centres.shape
    pts = centres[:, None, :] + noise * jax.random.normal(key, (k, per_cluster, d))
    pts = pts.reshape(-1, d)
    return pts / jnp.linalg.norm(pts, axis=-1, keepdims=True)


def well_separated_centres(k, d):
    # Orthogonal unit directions: cosine 0 between any two centres.
    return jnp.eye(d, dtype=jnp.float32)[:k]


def matched_error(found, centres):
    """Max distance after matching each true centre to its nearest found centre (one-to-one)."""
    dist = np.linalg.norm(np.asarray(found)[:, None] - np.asarray(centres)[None], axis=-1)
    assert len(set(dist.argmin(0))) == len(centres), "two centres matched the same cluster"
    return dist.min(0).max()


def test_kmeans_init_recovers_mixture_centres():
    centres = well_separated_centres(6, 16)
    pts = mixture(jax.random.key(1), centres, 50, 0.05)
    found = kmeans_init(pts[None], 6, key=jax.random.key(2), iters=10)[0]
    assert matched_error(found, centres) < 0.05


def test_ema_kmeans_recovers_mixture_centres_online():
    """Online: stats of fresh batches drive the EMA from perturbed starts to the true centres."""
    k, d = 4, 8
    centres = well_separated_centres(k, d)
    start = centres + 0.15 * jax.random.normal(jax.random.key(3), centres.shape)
    state = KMeansState.from_centroids(start[None])
    step = jax.jit(lambda state, key: _ema_step(state, key, centres))
    for i in range(300):
        state = step(state, jax.random.key(100 + i))
    assert matched_error(state.centroids[0], centres) < 0.05
    assert matched_error(start, centres) > 0.2  # the test starts far enough away to mean it


def _ema_step(state, key, centres):
    pts = mixture(key, centres, 32, 0.05)
    scores = centroid_scores(pts, state.centroids[0])
    counts, sums, _ = assignment_statistics(pts, scores, state.centroids[0],
                                            jnp.ones(pts.shape[0], bool))
    return kmeans_update(state, counts[None], sums[None], decay=0.95, epsilon=1e-5)


def test_eps_is_a_deprecated_alias_of_epsilon():
    state = KMeansState.from_centroids(jax.random.normal(jax.random.key(2), (2, 3, 4)))
    counts, sums = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3, 4))
    new = kmeans_update(state, counts, sums, decay=0.9, epsilon=0.5)
    with pytest.warns(DeprecationWarning, match="epsilon"):
        old = kmeans_update(state, counts, sums, decay=0.9, eps=0.5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)
    # the smoothing constant does reach the update: a different one changes it
    assert not np.allclose(kmeans_update(state, counts, sums, decay=0.9).centroids, new.centroids)


def test_kmeans_functions_jit_and_vmap():
    x = jax.random.normal(jax.random.key(5), (3, 2, 40, 4))  # [layers, heads, points, dim]
    keys = jax.random.split(jax.random.key(6), 3)
    per_layer = jax.vmap(lambda x, k: kmeans_init(x, 5, key=k, iters=3))(x, keys)
    assert per_layer.shape == (3, 2, 5, 4)
    state = KMeansState.from_centroids(per_layer)
    counts = jnp.ones((3, 2, 5))
    sums = jnp.ones((3, 2, 5, 4))
    jitted = jax.jit(lambda s: kmeans_update(s, counts, sums, decay=0.9, epsilon=1e-5))(state)
    mapped = jax.vmap(lambda s, c, m: kmeans_update(s, c, m, decay=0.9, epsilon=1e-5))(
        state, counts, sums)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(mapped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_kmeans_init_never_seeds_from_padding():
    x = jnp.concatenate([jnp.ones((3, 4)), jnp.full((5, 4), 100.0)])[None]  # 3 valid, 5 padded
    valid = (jnp.arange(8) < 3)[None]
    found = kmeans_init(x, 5, key=jax.random.key(0), iters=3, valid=valid)
    np.testing.assert_array_equal(found, 1.0)
