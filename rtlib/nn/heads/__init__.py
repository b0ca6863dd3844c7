"""Head kinds of the mixed attention layer: one module each, one registry.

Adding a kind: a module here with an `AttentionHeads` subclass (`from_spec`, `__call__`,
`prefill`, `decode`, its own cache type), a line in `HEAD_KINDS`, and the kind in the spec
schema (`rtlib/spec/schema.py`: its head group, its field of `HeadCounts`, and its place in
that module's `HEAD_KINDS` order, which must match this one).
"""

from rtlib.nn.cache import DecodingCache, RingCache
from rtlib.nn.heads.base import AttentionHeads
from rtlib.nn.heads.full import FullAttentionHeads
from rtlib.nn.heads.local import LocalAttentionHeads
from rtlib.nn.heads.routing import RoutingAttentionHeads
from rtlib.nn.heads.routing_cache import BalancedCache, ClusterCache

# Kind name (a field of HeadCounts) -> module; a layer's heads are laid out in this order,
# which fixes where each kind's weights sit in the layer's projections.
HEAD_KINDS: dict[str, type[AttentionHeads]] = {
    "local": LocalAttentionHeads,
    "full": FullAttentionHeads,
    "routing": RoutingAttentionHeads,
}

__all__ = ["HEAD_KINDS", "AttentionHeads", "BalancedCache", "ClusterCache", "DecodingCache",
           "FullAttentionHeads", "LocalAttentionHeads", "RingCache", "RoutingAttentionHeads"]
