"""TPU: the causal routing assignment (shared QK) by splash attention, where it applies.

On the sequence sorted by (cluster, position), the causal assignment is local attention with
segment ids: query i sees the sorted keys i - (W - 1) .. i (.. i + W - 1 when not causal) of
its own cluster. Splash attention takes exactly that as a static `LocalMask` plus dynamic
`SegmentIds`, skipping the blocks the local mask rules out, with its own backward kernels.
It cannot express the self-mask logit, and its blocks must divide the sequence.


It is the "pallas_tpu/splash" variant in the dispatch table of that call (tried before the
grouped kernel when "pallas_tpu" is a candidate).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from kernels.dispatch import wrong_platform
from kernels.grouped_attention.call import CallShape

BLOCK = 128
NAME = "pallas_tpu/splash"


def unsupported(call: CallShape) -> str | None:
    if reason := wrong_platform("tpu", call.interpret):
        return reason
    if call.seq_len is None:
        return "splash serves only the cluster-sorted causal routing assignment"
    if call.self_mask:
        return "splash attention cannot give a token's own key the self-mask logit"
    if call.seq_len % BLOCK:
        return f"splash blocks of {BLOCK} must divide the sequence length {call.seq_len}"
    return None


@functools.lru_cache(maxsize=32)
def _kernel(n: int, window: int, causal: bool, interpret: bool):
    # The mask is static (processed with NumPy once per shape); the clusters enter as segments.
    local = masks.LocalMask((n, n), (window - 1, 0 if causal else window - 1), 0)
    sizes = splash.BlockSizes(
        block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
        block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
    # Built outside any trace: the cached kernel holds concrete mask-info arrays, not tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(masks.MultiHeadMask([local]), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def sorted_local_attention(x, v, segments, *, window: int, causal: bool, scale: float,
                           interpret: bool):
    """One head: x [n, d] (queries = keys) and v [n, dv] in (cluster, position) order."""
    kernel = _kernel(x.shape[0], window, causal, interpret)
    ids = splash.SegmentIds(q=segments, kv=segments)
    out = kernel((x * scale)[None], x[None], v[None], segment_ids=ids)[0]
    return out.astype(jnp.float32)
