"""Local heads: blocked attention over a window (ALGORITHM.md section 4); decoding keeps a
ring buffer of the last (look_back + 1) x window keys and values, enough for any query."""

import functools
from typing import final

import equinox as eqx
from jaxtyping import Array, Int

from rtlib.attention import local_attention
from rtlib.nn.cache import RingCache, attend_buffer
from rtlib.nn.heads.base import BS, BSHD, AttentionHeads, checks_vma, implementation_of
from rtlib.parallel.context import per_device
from rtlib.spec.schema import ModelSpec


@final
class LocalAttentionHeads(AttentionHeads):
    count: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    window: int = eqx.field(static=True)
    look_back: int = eqx.field(static=True)
    look_ahead: int | None = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)
    implementation: str | tuple[str, ...] | None = eqx.field(static=True)
    interpret: bool = eqx.field(static=True)

    @classmethod
    def from_spec(cls, spec: ModelSpec, count: int) -> "LocalAttentionHeads":
        cfg = spec.group("local")
        return cls(count=count, head_dim=spec.head_dim, causal=spec.causal, window=cfg.window,
                   look_back=cfg.look_back, look_ahead=cfg.look_ahead,
                   rotary=spec.embedding.positions == "rotary",
                   implementation=implementation_of(spec), interpret=spec.attention.interpret)

    def __call__(self, q, k, v, state, *, mask):
        local = functools.partial(
            local_attention, window=self.window, causal=self.causal, look_back=self.look_back,
            look_ahead=self.look_ahead, implementation=self.implementation,
            interpret=self.interpret)
        out = per_device(lambda q, k, v, m: local(q, k, v, q_mask=m, kv_mask=m), q, k, v, mask,
                         in_specs=(BSHD, BSHD, BSHD, BS), out_specs=BSHD,
                         check_vma=checks_vma(self.implementation))
        return out, None

    def prefill(self, q, k, v, state, *, capacity):
        out, _ = self(q, k, v, state, mask=None)
        return out, RingCache.fill(k, v, (self.look_back + 1) * self.window, every_token=False)

    def decode(self, q, k, v, state, cache: RingCache, pos: Int[Array, ""]):
        cache = cache.push(k, v, pos)
        w = self.window
        visible = (cache.pos >= 0) & (cache.pos // w >= pos // w - self.look_back)
        out = attend_buffer(q, cache.k, cache.v, visible[:, None, None, :],
                            scale=self.head_dim**-0.5)
        return out, cache

