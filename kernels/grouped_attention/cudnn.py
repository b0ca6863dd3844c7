"""cuDNN route: `jax.nn.dot_product_attention(implementation="cudnn")` on aligned groups.

cuDNN's fused attention takes a causal mask or none, not positions or segments, so it serves
exactly the groups whose keys are their queries in position order (balanced routing with shared
QK and no padding): each cluster is then one short causal (or unmasked) sequence.
"""

import jax
import jax.numpy as jnp

from kernels.dispatch import wrong_platform
from kernels.grouped_attention.call import CallShape


def unsupported(call: CallShape) -> str | None:
    if reason := wrong_platform("cuda", False):
        return reason
    if not call.aligned or call.offsets != (0,) or call.span is not None:
        return "cuDNN takes only a plain causal mask: groups must be aligned and self-contained"
    if call.self_mask:
        return "cuDNN cannot give a token's own key the self-mask logit"
    if call.dtype not in (jnp.bfloat16, jnp.float16) or not call.same_dtypes:
        return f"cuDNN fused attention takes bfloat16/float16, not {call.dtype}"
    if call.dim != call.vdim or call.dim % 8 or call.dim > 128:
        return (f"cuDNN needs equal q/v head dims, a multiple of 8, <= 128; "
                f"got {call.dim}/{call.vdim}")
    return None


def run(q, k, v, *, causal: bool, scale: float):
    """[*batch, N, W, D] groups -> cuDNN's [batch, seq, heads, dim] layout with one head."""
    w = q.shape[-2]
    as_bthd = lambda x: x.reshape(-1, w, 1, x.shape[-1])  # noqa: E731
    out = jax.nn.dot_product_attention(
        as_bthd(q), as_bthd(k), as_bthd(v), scale=scale, is_causal=causal,
        implementation="cudnn",
    )
    return out.reshape(*q.shape[:-1], v.shape[-1])
