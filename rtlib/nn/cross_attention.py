"""Cross-attention: a decoder layer's queries over the encoder's output (full attention).

The keys and values are projections of the encoder output, the same at every decoding step, so
`prefill` computes them once and `decode` only reads them (`CrossCache`). No positions are
applied: which source token a target position needs is found by content, and the encoder's
own positions are already mixed into its output.
"""

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from rtlib.attention.core import masked_attention
from rtlib.nn.cache import DecodingCache, attend_buffer
from rtlib.nn.heads.base import BS, BSHD
from rtlib.nn.layers import Linear
from rtlib.parallel.context import per_device


class EncoderOutput(eqx.Module):
    """What the decoder attends to: the encoder's last hidden states and which source
    positions are real (False: padding, never attended to)."""

    h: Float[Array, "batch source dmodel"]
    mask: Bool[Array, "batch source"]


class CrossCache(DecodingCache):
    """One layer's cross-attention keys and values over the source, computed at prefill."""

    k: Float[Array, "batch source heads dim"]
    v: Float[Array, "batch source heads dim"]
    mask: Bool[Array, "batch source"]


class CrossAttention(eqx.Module):
    """Full multi-head attention from the decoder's positions to every real source position."""

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(self, d_model: int, heads: int, head_dim: int, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        into_heads = ("embed", "heads")
        self.wq = Linear(d_model, heads * head_dim, bias=False, key=kq, axes=into_heads)
        self.wk = Linear(d_model, heads * head_dim, bias=False, key=kk, axes=into_heads)
        self.wv = Linear(d_model, heads * head_dim, bias=False, key=kv, axes=into_heads)
        self.wo = Linear(heads * head_dim, d_model, bias=False, key=ko, axes=("heads", "embed"))
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, x: Float[Array, "batch seq dmodel"],
                 memory: EncoderOutput) -> Float[Array, "batch seq dmodel"]:
        return self.prefill(x, memory)[0]

    def prefill(self, x: Float[Array, "batch seq dmodel"],
                memory: EncoderOutput) -> tuple[Float[Array, "batch seq dmodel"], CrossCache]:
        """The outputs over `x` and the keys and values every later `decode` reads."""
        cache = CrossCache(self._split(self.wk(memory.h)), self._split(self.wv(memory.h)),
                           memory.mask)
        q = self._split(self.wq(x))

        def attend(q, k, v, m):
            out = masked_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                   v.transpose(0, 2, 1, 3), m[:, None, None, :],
                                   scale=self.head_dim**-0.5)
            return out.transpose(0, 2, 1, 3).astype(v.dtype)

        out = per_device(attend, q, cache.k, cache.v, cache.mask,
                         in_specs=(BSHD, BSHD, BSHD, BS), out_specs=BSHD)
        return self.wo(out.reshape(*x.shape[:2], -1)), cache

    def decode(self, x: Float[Array, "batch 1 dmodel"],
               cache: CrossCache) -> tuple[Float[Array, "batch 1 dmodel"], CrossCache]:
        """One new target position against the cached source keys and values."""
        q = self._split(self.wq(x))[:, 0]
        out = attend_buffer(q, cache.k, cache.v, cache.mask[:, None, None, :],
                            scale=self.head_dim**-0.5)
        return self.wo(out.astype(cache.v.dtype).reshape(x.shape[0], 1, -1)), cache

    def _split(self, t: Array) -> Array:
        return t.reshape(*t.shape[:2], self.heads, self.head_dim)


def no_memory_error(memory: EncoderOutput | None, has_cross: bool) -> str | None:
    """Why a block cannot run with this `memory`, or None."""
    if has_cross and memory is None:
        return "this decoder cross-attends to an encoder: pass `memory` (an EncoderOutput)"
    if memory is not None and not has_cross:
        return "`memory` was given, but these blocks have no cross-attention"
    return None

