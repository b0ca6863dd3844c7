"""Model layers: the Routing Transformer, the encoder-decoder, their blocks, the mixed attention
layer and its head kinds (`rtlib.nn.heads`), cross-attention, and small building blocks."""

from rtlib.nn.attention import MixedAttention
from rtlib.nn.block import Block, CrossBlock
from rtlib.nn.feed_forward import FeedForward
from rtlib.nn.cross_attention import CrossAttention, EncoderOutput
from rtlib.nn.heads import HEAD_KINDS, AttentionHeads
from rtlib.nn.layers import Embedding, LayerNorm, Linear
from rtlib.nn.model import DecodeCache, RoutingTransformer
from rtlib.nn.seq2seq import EncoderDecoder

__all__ = ["HEAD_KINDS", "AttentionHeads", "Block", "CrossBlock", "CrossAttention", "DecodeCache", "Embedding",
           "EncoderDecoder", "EncoderOutput", "FeedForward", "LayerNorm", "Linear",
           "MixedAttention", "RoutingTransformer"]
