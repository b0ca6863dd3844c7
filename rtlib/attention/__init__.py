"""Attention primitives shared by every head kind."""

from rtlib.attention.core import blocked_attention, masked_attention
from rtlib.attention.local import full_attention, local_attention

__all__ = ["blocked_attention", "full_attention", "local_attention", "masked_attention"]
