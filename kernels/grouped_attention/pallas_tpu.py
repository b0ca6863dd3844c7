"""TPU backend: the grouped-attention kernels lowered by Mosaic TPU."""

from jax.experimental.pallas import tpu as pltpu

from kernels.dispatch import wrong_platform
from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.kernel import Launch

VMEM_BUDGET = 12 * 2**20  # inside the 16 MiB default scoped VMEM of v4 / v5e


def vmem_bytes(call: CallShape) -> int:
    """Estimated VMEM of the hungriest of the three kernels (the dK/dV one): double-buffered
    blocks, [b, 1] columns padded to 128 lanes and [1, b] rows to 8 sublanes, plus the float32
    [bq, bk] tiles (logits, probabilities, their gradient)."""
    item, width = call.dtype.itemsize, len(call.offsets)
    column, row = 128 * 4, 8 * 4  # bytes per element of a [b, 1] column / a [1, b] row
    keys = call.block_k * ((call.dim + call.vdim) * item * 2 + 2 * row)  # k, v (+ dk, dv)
    queries = call.block_q * ((call.dim + call.vdim) * item + 4 * column)  # q, do, 4 columns
    return 2 * (keys + width * queries) + 3 * 4 * call.block_q * call.block_k


def unsupported(call: CallShape) -> str | None:
    """Block shapes end in full array dims (legal for any W and D); the limit is VMEM."""
    if reason := wrong_platform("tpu", call.interpret):
        return reason
    need = vmem_bytes(call)
    if need > VMEM_BUDGET:
        return (f"blocks of {call.block_q}x{call.block_k} with head dims {call.dim}/{call.vdim} "
                f"need ~{need / 2**20:.0f} MiB of VMEM (limit {VMEM_BUDGET // 2**20})")
    return None


def launch(interpret: bool) -> Launch:
    """Both grid axes (groups, blocks) are independent: megacore chips may split either."""
    return Launch(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="grouped_attention_tpu",
    )
