"""Data: token stores (zarr v3 via tensorstore), preparing them from corpora (text, compressed,
JSON Lines, Parquet) and images, synthetic tasks, tokenizers (bytes, Hugging Face,
sentencepiece; docs/data.md), and the grain pipelines that feed training and evaluation.

`rtlib.data.prepare.prepare` and `rtlib.data.synth.synth` write stores; they are not re-exported
here, where their names would hide their modules.
"""

from rtlib.data.pipeline import eval_batches, train_dataset, train_iterator
from rtlib.data.sources import Corpus, Document, SourceError, collect, open_corpus
from rtlib.data.store import StoreError, TokenStore
from rtlib.data.synth import SynthOptions
from rtlib.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    SyntheticTokenizer,
    tokenizer_from_manifest,
)

__all__ = ["ByteTokenizer", "Corpus", "Document", "HFTokenizer", "SentencePieceTokenizer",
           "SourceError", "StoreError", "SynthOptions", "SyntheticTokenizer", "TokenStore",
           "collect", "eval_batches", "open_corpus", "tokenizer_from_manifest", "train_dataset",
           "train_iterator"]
