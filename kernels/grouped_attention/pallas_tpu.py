"""TPU backend: the grouped-attention kernels lowered by Mosaic TPU."""

from jax.experimental.pallas import tpu as pltpu

from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.kernel import Launch


def unsupported(call: CallShape) -> str | None:
    """Every block shape ends in full array dims, so Mosaic takes any size; the limit is VMEM."""
    # Double-buffered q, o and one (k, v) pair per offset, plus the float32 [bq, bk] tile.
    itemsize = call.dtype.itemsize
    live = 2 * itemsize * (call.block_q * (call.dim + call.vdim)
                           + len(call.offsets) * call.block_k * (call.dim + call.vdim))
    live += 4 * 3 * call.block_q * call.block_k
    if live > 12 * 2**20:  # stay inside the 16 MiB default scoped VMEM of v4/v5e
        return (f"blocks of {call.block_q}x{call.block_k} with head dims {call.dim}/{call.vdim} "
                f"need ~{live / 2**20:.0f} MiB of VMEM (limit 12)")
    return None


def launch(interpret: bool) -> Launch:
    """Both grid axes (groups, blocks) are independent: megacore chips may split either."""
    return Launch(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="grouped_attention_tpu",
    )
