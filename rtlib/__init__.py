"""rtlib: the Routing Transformer in JAX.

Functional API (batched `[batch, seq, heads, dim]`, the layout of `jax.nn.dot_product_attention`):
`routing_attention`, `local_attention`, `full_attention`, `kmeans_update`, `kmeans_init`.
Models from specs: `load_spec` -> `build` -> `(model, state)`; `model(tokens, state)` returns
`(logits, stats)` and `model.update_state(state, stats)` advances the centroids.
"""

import kernels as _kernels

if not getattr(_kernels, "RTLIB_KERNELS", False):
    raise ImportError(
        f"the package `kernels` imported from {getattr(_kernels, '__file__', None) or _kernels} is "
        "not rtlib's Pallas kernels: another installed distribution uses the same top-level name "
        "(e.g. Hugging Face's `kernels`). Install rtlib in an environment without it.")

from rtlib.attention import full_attention, local_attention
from rtlib.build import abstract_build, build, count_parameters
from rtlib.nn.model import RoutingTransformer
from rtlib.objectives import next_token_loss
from rtlib.routing import (
    KMeansState,
    RoutingState,
    RoutingStats,
    kmeans_init,
    kmeans_update,
    routing_attention,
    routing_attention_dense,
    sum_stats,
    update_routing_state,
)
from rtlib.spec import ModelSpec, Spec, SpecError, load_spec

__version__ = "0.1.0"

__all__ = [
    "KMeansState",
    "ModelSpec",
    "RoutingState",
    "RoutingStats",
    "RoutingTransformer",
    "Spec",
    "SpecError",
    "abstract_build",
    "build",
    "count_parameters",
    "full_attention",
    "kmeans_init",
    "kmeans_update",
    "load_spec",
    "local_attention",
    "next_token_loss",
    "routing_attention",
    "routing_attention_dense",
    "sum_stats",
    "update_routing_state",
]
