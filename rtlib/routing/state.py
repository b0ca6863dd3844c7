"""The routing state of a whole model, threaded explicitly through forward and update."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from rtlib.routing.kmeans import KMeansState, kmeans_update
from rtlib.routing.stats import RoutingStats


class RoutingState(eqx.Module):
    """Centroid state for every routing layer of a model: not a parameter, never mutated.

    `stages[i]` holds the stacked `[layers, heads, clusters, dim]` k-means state of the i-th
    group of identical layers, or None when that group has no routing heads. `initialised`
    records whether the centroids came from data (or were declared ready by a random init), so a
    restored checkpoint is never re-initialised.
    """

    stages: tuple[KMeansState | None, ...]
    initialised: Bool[Array, ""]


def update_routing_state(
    state: RoutingState,
    stats: tuple[RoutingStats | None, ...],
    *,
    decay: float,
    epsilon: float = 1e-5,
    eps: float | None = None,
) -> RoutingState:
    """One EMA step for every routing layer, from statistics already summed over the global
    batch and every micro-batch of the optimiser step. `eps` is `epsilon`'s deprecated name."""
    if eps is not None:
        warnings.warn("update_routing_state(eps=...) is deprecated: pass epsilon=...",
                      DeprecationWarning, stacklevel=2)
        epsilon = eps
    if len(stats) != len(state.stages):
        raise ValueError(f"{len(stats)} stats groups for {len(state.stages)} state groups")
    stages = tuple(
        None if s is None else kmeans_update(s, st.counts, st.sums, decay=decay, epsilon=epsilon)
        for s, st in zip(state.stages, stats, strict=True)
    )
    return RoutingState(stages, state.initialised)


def sum_stats(stats: tuple[RoutingStats | None, ...], axis: int = 0) -> tuple[RoutingStats | None, ...]:
    """Sum per-stage statistics over a leading axis (e.g. stacked micro-batches)."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=axis), stats)
