"""Full heads: every (earlier, in a decoder) token, O(n^2); decoding keeps every key."""

from typing import final

import equinox as eqx
from jaxtyping import Array, Int

from rtlib.attention import full_attention
from rtlib.nn.cache import RingCache, attend_buffer
from rtlib.nn.heads.base import BS, BSHD, AttentionHeads
from rtlib.parallel.context import per_device
from rtlib.spec.schema import ModelSpec


@final
class FullAttentionHeads(AttentionHeads):
    count: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)

    @classmethod
    def from_spec(cls, spec: ModelSpec, count: int) -> "FullAttentionHeads":
        return cls(count=count, head_dim=spec.head_dim, causal=spec.causal,
                   rotary=spec.embedding.positions == "rotary")

    def __call__(self, q, k, v, state, *, mask):
        out = per_device(
            lambda q, k, v, m: full_attention(q, k, v, causal=self.causal, q_mask=m, kv_mask=m),
            q, k, v, mask, in_specs=(BSHD, BSHD, BSHD, BS), out_specs=BSHD)
        return out, None

    def prefill(self, q, k, v, state, *, capacity):
        out, _ = self(q, k, v, state, mask=None)
        return out, RingCache.fill(k, v, capacity, every_token=True)

    def decode(self, q, k, v, state, cache: RingCache, pos: Int[Array, ""]):
        cache = cache.push(k, v, pos)
        out = attend_buffer(q, cache.k, cache.v, (cache.pos >= 0)[:, None, None, :],
                            scale=self.head_dim**-0.5)
        return out, cache
