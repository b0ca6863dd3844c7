"""Data: token stores (zarr v3 via tensorstore), preparing them from corpora and images,
synthetic tasks, tokenizers, and the grain pipelines that feed training and evaluation.

`rtlib.data.prepare.prepare` and `rtlib.data.synth.synth` write stores; they are not re-exported
here, where their names would hide their modules.
"""

from rtlib.data.pipeline import eval_batches, train_dataset, train_iterator
from rtlib.data.sources import Document, SourceError, collect
from rtlib.data.store import StoreError, TokenStore
from rtlib.data.synth import SynthOptions
from rtlib.data.tokenizer import ByteTokenizer, SyntheticTokenizer, tokenizer_from_manifest

__all__ = ["ByteTokenizer", "Document", "SourceError", "StoreError", "SynthOptions",
           "SyntheticTokenizer", "TokenStore", "collect", "eval_batches",
           "tokenizer_from_manifest", "train_dataset", "train_iterator"]
