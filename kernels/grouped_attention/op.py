"""The grouped-attention op: one entry point over the reference, the kernels and cuDNN."""

from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.dispatch import Backend, choose
from kernels.grouped_attention import cudnn, pallas_gpu, pallas_tpu
from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.kernel import Pattern
from kernels.grouped_attention.pallas import pallas_grouped_attention
from kernels.grouped_attention.reference import grouped_attention_reference


def backends(call: CallShape) -> dict[str, Callable[[], str | None]]:
    """This op's dispatch table for a call: each backend's reason to refuse it (or None)."""
    return {
        "xla": lambda: None,
        "pallas_tpu": lambda: pallas_tpu.unsupported(call),
        "pallas_gpu": lambda: pallas_gpu.unsupported(call),
        "cudnn": lambda: cudnn.unsupported(call),
    }


def choose_implementation(call: CallShape, implementation: str | Sequence[str] | None) -> str:
    """The implementation that will run a call of this shape (see kernels.dispatch)."""
    return choose("grouped_attention", implementation, backends(call))


def choose_backend(call: CallShape, implementation: str | Sequence[str] | None,
                   extra: dict[str, Callable[[], str | None]] | None = None) -> Backend:
    """`choose_implementation` as a `Backend` to pass down; `extra` adds variants (e.g. the
    splash route) ahead of this op's own table."""
    table = {**(extra or {}), **backends(call)}
    return Backend(choose("grouped_attention", implementation, table), call.interpret)


def grouped_attention(
    q: Float[Array, "*batch blocks bq dim"],
    k: Float[Array, "*batch blocks bk dim"],
    v: Float[Array, "*batch blocks bk vdim"],
    q_pos: Int[Array, "*batch blocks bq"],
    k_pos: Int[Array, "*batch blocks bk"],
    q_seg: Int[Array, "*batch blocks bq"],
    k_seg: Int[Array, "*batch blocks bk"],
    *,
    offsets: tuple[int, ...] = (0,),
    causal: bool,
    span: int | None = None,
    self_mask: bool = False,
    scale: float,
    aligned: bool = False,
    implementation: str | Sequence[str] | Backend | None = None,
    interpret: bool = False,
) -> Float[Array, "*batch blocks bq vdim"]:
    """Grouped attention (definition in `reference.py`) by the chosen implementation.

    `implementation` is a request (see kernels.dispatch) or a `Backend` already chosen by
    the caller (then `interpret` is the backend's). `interpret=True` runs a Pallas
    implementation in interpret mode (on CPU, for tests); `aligned` is the promise described
    in `CallShape`.
    """
    if isinstance(implementation, Backend):
        interpret = implementation.interpret
    offsets = tuple(int(o) for o in offsets)
    call = CallShape(
        block_q=q.shape[-2], block_k=k.shape[-2], dim=q.shape[-1], vdim=v.shape[-1],
        dtype=jnp.dtype(q.dtype), offsets=offsets, span=span, self_mask=self_mask,
        aligned=aligned, vdtype=jnp.dtype(v.dtype), interpret=interpret,
    )
    name = (implementation.name if isinstance(implementation, Backend)
            else choose_implementation(call, implementation))
    if name == "xla":
        return grouped_attention_reference(
            q, k, v, q_pos, k_pos, q_seg, k_seg, offsets=offsets, causal=causal, span=span,
            self_mask=self_mask, scale=scale,
        )
    if name == "cudnn":
        return cudnn.run(q, k, v, causal=causal, scale=scale)
    pattern = Pattern(offsets=offsets, causal=causal, span=span, self_mask=self_mask,
                      scale=float(scale))
    if name == "pallas_gpu":
        return pallas_gpu.run(q, k, v, q_pos, k_pos, q_seg, k_seg, call=call, pattern=pattern,
                              interpret=interpret)
    if name == "pallas_tpu":
        return pallas_grouped_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, pattern=pattern,
                                        launch=pallas_tpu.launch(interpret))
    raise ValueError(f"grouped_attention: backend {name!r} does not run grouped calls")
