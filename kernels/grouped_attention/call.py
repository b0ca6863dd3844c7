"""What a backend needs to know about a grouped-attention call to accept or refuse it."""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The static facts of one call: block sizes, head dims, dtype and the mask pattern.

    `aligned` is the caller's promise that inside every group the keys are the queries in
    ascending position order and all valid, so the mask is plain causal (or none): the one
    pattern dense attention libraries (cuDNN) take.
    """

    block_q: int
    block_k: int
    dim: int
    vdim: int
    dtype: jnp.dtype
    offsets: tuple[int, ...]
    span: int | None
    self_mask: bool
    aligned: bool = False
