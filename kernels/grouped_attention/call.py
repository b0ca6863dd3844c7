"""What a backend needs to know about a grouped-attention call to accept or refuse it."""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The static facts of one call: block sizes, head dims, dtype and the mask pattern.

    `aligned` is the caller's promise that inside every group the keys are the queries in
    ascending position order and all valid, so the mask is plain causal (or none): the one
    pattern dense attention libraries (cuDNN) take. `dtype` is q's (and k's); `vdtype` v's.
    `interpret` asks for Pallas' interpret mode, which runs on any platform.
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
    vdtype: jnp.dtype | None = None  # None: v has q's dtype
    interpret: bool = False
    # Tokens of the whole sequence when the call is one cluster-sorted sequence (the causal
    # routing assignment): the splash route needs it; None for every other call.
    seq_len: int | None = None

    @property
    def same_dtypes(self) -> bool:
        return self.vdtype is None or self.vdtype == self.dtype
