"""What every head kind gives the mixed attention layer.

A head kind is a module without parameters: the mixed layer owns the q, k, v and output
projections, slices out each kind's heads and hands them over as `[batch, seq, heads, dim]`
arrays (decoding: `[batch, heads, dim]` for the one new token), then concatenates the outputs.
Each kind keeps its own decoding cache type.
"""

import abc

import equinox as eqx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from kernels.dispatch import candidates
from rtlib.nn.cache import DecodingCache
from rtlib.nn.layers import rotary as apply_rotary
from rtlib.spec.schema import ModelSpec

BSHD = P("batch", None, "heads", None)  # logical layout of q, k, v and outputs
BS = P("batch", None)


class AttentionHeads(eqx.Module):
    """One kind of head inside a mixed attention layer.

    `own_keys`: whether the kind needs its own key projection (shared-QK routing heads use
    their queries as keys). `rotary`: whether rotary positions apply to its q and k.
    `state` is the kind's per-layer state threaded by the model (the centroids, for routing
    heads; None for kinds without state).
    """

    count: eqx.AbstractVar[int]
    head_dim: eqx.AbstractVar[int]
    causal: eqx.AbstractVar[bool]
    rotary: eqx.AbstractVar[bool]

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: ModelSpec, count: int) -> "AttentionHeads":
        """`count` heads of this kind, configured by the spec's head group."""

    @property
    def own_keys(self) -> bool:
        return True

    def positions(self, q: Array, k: Array | None,
                  offset: Int[Array, ""] | int) -> tuple[Array, Array]:
        """q and k with positions applied (positions start at `offset`); without own keys,
        k is the (rotated) queries."""
        if self.rotary:
            q = apply_rotary(q, offset)
            k = None if k is None else apply_rotary(k, offset)
        return q, (q if k is None else k)

    @abc.abstractmethod
    def __call__(
        self,
        q: Float[Array, "batch seq heads dim"],
        k: Float[Array, "batch seq heads dim"],
        v: Float[Array, "batch seq heads vdim"],
        state: Array | None,
        *,
        mask: Bool[Array, "batch seq"] | None,
    ) -> tuple[Float[Array, "batch seq heads vdim"], object | None]:
        """(outputs, statistics for the kind's state or None), computed per device over the
        active mesh (see `rtlib.parallel`)."""

    @abc.abstractmethod
    def prefill(self, q: Array, k: Array, v: Array, state: Array | None, *,
                capacity: int) -> tuple[Float[Array, "batch seq heads vdim"], DecodingCache]:
        """`__call__`'s outputs over a prompt (no padding) and the cache it leaves;
        `capacity` is the longest sequence the cache will see."""

    @abc.abstractmethod
    def decode(self, q: Float[Array, "batch heads dim"], k: Float[Array, "batch heads dim"],
               v: Float[Array, "batch heads vdim"], state: Array | None, cache: DecodingCache,
               pos: Int[Array, ""]) -> tuple[Float[Array, "batch heads vdim"], DecodingCache]:
        """One new token at position `pos` (all earlier ones are in `cache`)."""


def implementation_of(spec: ModelSpec) -> str | tuple[str, ...] | None:
    """`attention.implementation` as a hashable static value (None, a name or a tuple)."""
    impl = spec.attention.implementation
    return tuple(impl) if isinstance(impl, list) else impl


def checks_vma(implementation: str | tuple[str, ...] | None) -> bool:
    """Our kernels (and splash) build their outputs without varying-manual-axes types, so
    shard_map checks them only on the pure-XLA path."""
    return set(candidates(implementation)) == {"xla"}
