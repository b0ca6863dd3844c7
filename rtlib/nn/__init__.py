"""Model layers: the Routing Transformer, its blocks, the mixed attention layer and its head
kinds (`rtlib.nn.heads`), and small building blocks."""

from rtlib.nn.attention import MixedAttention
from rtlib.nn.block import Block, FeedForward
from rtlib.nn.heads import HEAD_KINDS, AttentionHeads
from rtlib.nn.layers import Embedding, LayerNorm, Linear
from rtlib.nn.model import DecodeCache, RoutingTransformer

__all__ = ["HEAD_KINDS", "AttentionHeads", "Block", "DecodeCache", "Embedding", "FeedForward",
           "LayerNorm", "Linear", "MixedAttention", "RoutingTransformer"]
