"""GPU backend: Mosaic GPU where the shapes allow it, else the Triton-lowered kernels.

Mosaic GPU (`mosaic_gpu.py`, sm90 warpgroup matrix products) is preferred: Pallas' Triton
backend is deprecated. Its `wgmma` needs bfloat16/float16 and tiles that are multiples of 64,
so float32 calls and small tiles (W or head dim < 64) run the same kernel bodies as the TPU
backend (`kernel.py`), lowered through Triton, which needs powers of two >= 16. Which one ran
is logged at INFO on `rtlib.kernels`.
"""

import logging

from jax.experimental.pallas import triton as pltriton

from kernels.dispatch import wrong_platform
from kernels.grouped_attention import mosaic_gpu
from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.kernel import Launch, Pattern
from kernels.grouped_attention.pallas import pallas_grouped_attention

log = logging.getLogger("rtlib.kernels")


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def triton_unsupported(call: CallShape) -> str | None:
    """Triton tiles are powers of two and its matrix units need every dimension >= 16."""
    sizes = dict(block_q=call.block_q, block_k=call.block_k, dim=call.dim, vdim=call.vdim)
    bad = [f"{k}={v}" for k, v in sizes.items() if not _pow2(v)]
    if bad:
        return f"Triton needs powers of two >= 16; got {', '.join(bad)}"
    return None


def unsupported(call: CallShape) -> str | None:
    if reason := wrong_platform("cuda", call.interpret):
        return reason
    mosaic, triton = mosaic_gpu.unsupported(call), triton_unsupported(call)
    if mosaic is None or triton is None:
        return None
    return f"Mosaic GPU: {mosaic}; Triton: {triton}"


def triton_launch(interpret: bool) -> Launch:
    return Launch(
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="grouped_attention_gpu",
    )


def run(q, k, v, q_pos, k_pos, q_seg, k_seg, *, call: CallShape, pattern: Pattern,
        interpret: bool):
    reason = mosaic_gpu.unsupported(call)
    if reason is None:
        return mosaic_gpu.mosaic_grouped_attention(q, k, v, q_pos, k_pos, q_seg, k_seg,
                                                   pattern=pattern, interpret=interpret)
    log.info("grouped_attention: pallas_gpu runs the Triton kernels (Mosaic GPU: %s)", reason)
    return pallas_grouped_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, pattern=pattern,
                                    launch=triton_launch(interpret))
