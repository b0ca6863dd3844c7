"""Grouped attention: the op routing and local attention reduce to.

Query block i of a sequence cut into N blocks attends to key blocks i + o (o in `offsets`),
with visibility decided by positions and segment ids (`reference.py` has the definition).
Balanced routing is N = clusters with offsets (0,); local attention and the cluster-sorted
causal assignment are offsets (-1, 0) (or (-1, 0, 1)) over blocks of the window.
"""

from kernels.grouped_attention.call import CallShape
from kernels.grouped_attention.op import choose_backend, choose_implementation, grouped_attention
from kernels.grouped_attention.reference import grouped_attention_reference, masked_attention

__all__ = ["CallShape", "choose_backend", "choose_implementation", "grouped_attention",
           "grouped_attention_reference", "masked_attention"]
