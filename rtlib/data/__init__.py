"""Data: token stores (zarr v3 via tensorstore), preparing them from corpora and images,
synthetic tasks, tokenizers, and the grain pipelines that feed training and evaluation."""

from rtlib.data.pipeline import eval_batches, train_dataset, train_iterator
from rtlib.data.prepare import prepare
from rtlib.data.sources import Document, SourceError, collect
from rtlib.data.store import StoreError, TokenStore
from rtlib.data.synth import SynthOptions, synth
from rtlib.data.tokenizer import ByteTokenizer, SyntheticTokenizer, tokenizer_from_manifest

__all__ = ["ByteTokenizer", "Document", "SourceError", "StoreError", "SynthOptions",
           "SyntheticTokenizer", "TokenStore", "collect", "eval_batches", "prepare", "synth",
           "tokenizer_from_manifest", "train_dataset", "train_iterator"]
