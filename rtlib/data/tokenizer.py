"""Tokenizers of token stores.

- `ByteTokenizer`: token id = byte value (0-255). Lossless for any file, text or not.
- `SyntheticTokenizer`: the named ids of a synthetic task (`rtlib data synth`): special tokens
  and ranges such as keys `k0..k63`; text is whitespace-separated names (or plain ids).
- `HFTokenizer`: a Hugging Face `tokenizers` tokenizer (`tokenizer.json`: BPE, Unigram,
  WordLevel, WordPiece), given as a file or trained by `rtlib data prepare --train-tokenizer`.
- `SentencePieceTokenizer`: a sentencepiece `.model`.

The last two are *text* tokenizers: `rtlib data prepare` ends every document with their
end-of-document token (`eos_id`), saves the tokenizer file inside the store (`file_name`) and
records its SHA-256 in the manifest, from which `tokenizer_from_manifest` rebuilds it.
`encode_batch` also gives, per token, where it ends in the text's UTF-8 bytes: what
`rtlib.data.prepare` turns into the bytes each token covers, for bits per byte.
"""

import hashlib
import importlib
import os
import re
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
from jaxtyping import Int

from rtlib.errors import BadArgument

# Token ids on disk: the narrowest unsigned type that holds every id of the vocabulary.
_DTYPES = ((1 << 8, np.uint8), (1 << 16, np.uint16), (1 << 32, np.uint32))


def require(module: str, what: str) -> ModuleType:
    """Import `module`, which `what` needs; BadArgument naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"tokenizers": "tokenizers", "sentencepiece": "sentencepiece",
                   "pyarrow.parquet": "pyarrow", "zstandard": "zstandard"}.get(module, module)
        raise BadArgument(f"{what} needs the {package} package: pip install {package} (or "
                          "install rtlib with its [text] extra)") from None


def token_dtype(vocab_size: int) -> type:
    """The on-disk dtype of a vocabulary: uint8 up to 256 ids, uint16 up to 65,536, else
    uint32."""
    return next(dtype for limit, dtype in _DTYPES if vocab_size <= limit)


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids outside 0-{vocab_size - 1}: {ids.min()}..{ids.max()}")
    return ids


class ByteTokenizer:
    """Token id = byte value: lossless for any file, text or not, with no vocabulary to fit."""

    vocab_size = 256
    dtype = np.uint8  # token ids as stored on disk
    unit = "byte"  # what one token is, for "bits per <unit>"
    eos_id = None  # documents follow each other with no separator: all 256 ids are bytes

    def encode(self, data: bytes | str) -> Int[np.ndarray, " tokens"]:
        """Token ids (int32) of `data`; a str is encoded as UTF-8 first."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of byte ids; invalid UTF-8 (a sample cut mid-character) decodes as U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"token ids outside 0-255 cannot be bytes: {ids.min()}..{ids.max()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """The manifest entry `tokenizer_from_manifest` rebuilds this tokenizer from."""
        return {"kind": "bytes", "vocab_size": self.vocab_size}


class SyntheticTokenizer:
    """Ids laid out as named specials, then named ranges (`{"k": 64}` gives k0..k63)."""

    dtype = np.uint8
    unit = "token"

    def __init__(self, specials: list[str], ranges: dict[str, int]):
        self.specials, self.ranges = list(specials), dict(ranges)
        self.names = [f"<{s}>" for s in self.specials] + [
            f"{p}{i}" for p, n in self.ranges.items() for i in range(n)]
        if len(self.names) > 256:
            raise ValueError(f"a synthetic vocabulary of {len(self.names)} ids does not fit the "
                             "uint8 token store (256 at most)")
        self.ids = {name: i for i, name in enumerate(self.names)}

    @property
    def vocab_size(self) -> int:
        """Number of ids: specials plus every range."""
        return len(self.names)

    def first(self, prefix: str) -> int:
        """The id of `prefix`0 (a range) or of `<prefix>` (a special)."""
        return self.ids[f"{prefix}0"] if prefix in self.ranges else self.ids[f"<{prefix}>"]

    def encode(self, data: str) -> Int[np.ndarray, " tokens"]:
        """Token ids (int32) of whitespace-separated names or plain ids (e.g. `<bos> k3 v7`)."""
        out = []
        for word in data.split():
            if word in self.ids:
                out.append(self.ids[word])
            elif word.isdigit() and int(word) < self.vocab_size:
                out.append(int(word))
            else:
                raise ValueError(f"{word!r} is not a token of this synthetic vocabulary "
                                 f"({', '.join(self.names[:3])}, ... {self.names[-1]})")
        return np.asarray(out, np.int32)

    def decode(self, ids) -> str:
        """The ids as space-separated names, the form `encode` reads back."""
        ids = _check_ids(ids, self.vocab_size)
        return " ".join(self.names[i] for i in ids)

    def describe(self) -> dict:
        """The manifest entry `tokenizer_from_manifest` rebuilds this tokenizer from."""
        return {"kind": "synthetic", "vocab_size": self.vocab_size, "specials": self.specials,
                "ranges": self.ranges}


def _utf8_ends(text: str, char_ends: np.ndarray) -> np.ndarray:
    """Character offsets into `text` as offsets into its UTF-8 encoding."""
    if text.isascii():
        return char_ends
    code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])[char_ends]


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`; documents end with its token `eos`.

    `model` names the vocabulary's kind (`bpe`, `unigram`, `word`, `wordpiece`); `origin` is
    how it was obtained (trained here, or the file it was read from), for the manifest."""

    unit = "token"
    file_name = "tokenizer.json"

    def __init__(self, tokenizer, *, eos: str, origin: dict, source: bytes | None = None):
        self.tokenizer = tokenizer
        self.eos = eos
        self.eos_id = tokenizer.token_to_id(eos)
        if self.eos_id is None:
            raise ValueError(f"{eos!r} is not a token of this tokenizer")
        self.origin = dict(origin)
        self.model = {"BPE": "bpe", "Unigram": "unigram", "WordLevel": "word",
                      "WordPiece": "wordpiece"}.get(type(tokenizer.model).__name__,
                                                    type(tokenizer.model).__name__.lower())
        # The file as given is saved verbatim; a trained tokenizer is serialised once.
        self.source = source if source is not None else tokenizer.to_str().encode()
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab_size)

    @classmethod
    def from_file_bytes(cls, data: bytes, *, eos: str, origin: dict) -> "HFTokenizer":
        """Parse a `tokenizer.json`'s bytes (ValueError when they are not one)."""
        tokenizers = require("tokenizers", "a Hugging Face tokenizer")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"not a Hugging Face tokenizer.json: {_line(e)}") from None
        return cls(tokenizer, eos=eos, origin=origin, source=data)

    def encode(self, data: bytes | str) -> Int[np.ndarray, " tokens"]:
        """Token ids (int32) of a text, without any special token added."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(data, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (token ids, the UTF-8 byte offset where each token ends); encoded in
        parallel by the library's thread pool."""
        out = []
        for text, enc in zip(texts, self.tokenizer.encode_batch(list(texts),
                                                                add_special_tokens=False),
                             strict=True):
            ids = np.asarray(enc.ids, np.int32)
            ends = np.asarray([end for _, end in enc.offsets], np.int64)
            out.append((ids, _utf8_ends(text, ends)))
        return out

    def decode(self, ids) -> str:
        """Text of ids (special tokens such as the end-of-document token shown)."""
        ids = _check_ids(ids, self.vocab_size)
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        if self.model == "word" and self.tokenizer.decoder is None:
            text = re.sub(r" ?\n ?", "\n", text)  # words are joined by spaces, lines kept
        return text

    def describe(self) -> dict:
        """The manifest entry `tokenizer_from_manifest` rebuilds this tokenizer from."""
        return {"kind": "hf", "model": self.model, "vocab_size": self.vocab_size,
                "eos": self.eos, "eos_id": self.eos_id, "file": self.file_name,
                "sha256": hashlib.sha256(self.source).hexdigest(), **self.origin}


class SentencePieceTokenizer:
    """A sentencepiece model; documents end with its piece `eos` (by default the model's own
    end-of-sentence piece)."""

    unit = "token"
    file_name = "tokenizer.model"
    model = "sentencepiece"

    def __init__(self, source: bytes, *, eos: str | None, origin: dict):
        sentencepiece = require("sentencepiece", "a sentencepiece tokenizer")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=source)
        except Exception as e:  # RuntimeError or OSError, depending on the version
            raise ValueError(f"not a sentencepiece model: {_line(e)}") from None
        self.source = source
        self.origin = dict(origin)
        self.vocab_size = self.sp.get_piece_size()
        self.dtype = token_dtype(self.vocab_size)
        if eos is None:
            if self.sp.eos_id() < 0:
                raise ValueError("the model has no end-of-sentence piece: name the piece that "
                                 "ends a document with --eos")
            eos = self.sp.id_to_piece(self.sp.eos_id())
        self.eos = eos
        self.eos_id = self.sp.piece_to_id(eos)
        if self.sp.id_to_piece(self.eos_id) != eos:  # unknown pieces map to <unk>
            raise ValueError(f"{eos!r} is not a piece of this model")

    def encode(self, data: bytes | str) -> Int[np.ndarray, " tokens"]:
        """Token ids (int32) of a text, without BOS/EOS."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        return np.asarray(self.sp.encode(data, out_type=int), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (token ids, the UTF-8 byte offset where each token ends)."""
        threads = os.cpu_count() or 1
        try:
            protos = self.sp.encode(list(texts), return_type="proto", num_threads=threads)
        except TypeError:  # sentencepiece before `return_type`
            protos = self.sp.encode(list(texts), out_type="immutable_proto", num_threads=threads)
        return [(np.asarray([p.id for p in proto.pieces], np.int32),
                 np.asarray([p.end for p in proto.pieces], np.int64)) for proto in protos]

    def decode(self, ids) -> str:
        """Text of ids."""
        return self.sp.decode(_check_ids(ids, self.vocab_size).tolist())

    def describe(self) -> dict:
        """The manifest entry `tokenizer_from_manifest` rebuilds this tokenizer from."""
        return {"kind": "sentencepiece", "model": self.model, "vocab_size": self.vocab_size,
                "eos": self.eos, "eos_id": self.eos_id, "file": self.file_name,
                "sha256": hashlib.sha256(self.source).hexdigest(), **self.origin}


TextTokenizer = HFTokenizer | SentencePieceTokenizer
Tokenizer = ByteTokenizer | SyntheticTokenizer | TextTokenizer


def tokenizer_name(desc: dict) -> str:
    """What a manifest's tokenizer is, in the words of `data.tokenizer`: `bytes`, `synthetic`,
    `bpe`, `unigram`, `word`, `wordpiece` or `sentencepiece`."""
    return desc.get("model") or desc.get("kind", "?")


def tokenizer_from_manifest(desc: dict, read: Callable[[str], bytes] | None = None) -> Tokenizer:
    """The tokenizer a store's manifest describes (the inverse of `describe`); `read(name)`
    gives a file of the store, for the tokenizers saved there (checked against their
    SHA-256)."""
    kind = desc.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "synthetic":
        return SyntheticTokenizer(desc["specials"], desc["ranges"])
    if kind in ("hf", "sentencepiece"):
        if read is None:
            raise ValueError(f"a {kind} tokenizer is read from its store's {desc['file']}")
        data = read(desc["file"])
        if hashlib.sha256(data).hexdigest() != desc["sha256"]:
            raise ValueError(f"{desc['file']} is not the tokenizer the manifest records (its "
                             "SHA-256 differs): the store is damaged; prepare it again")
        origin = {k: v for k, v in desc.items() if k in ORIGIN_KEYS}
        if kind == "hf":
            return HFTokenizer.from_file_bytes(data, eos=desc["eos"], origin=origin)
        return SentencePieceTokenizer(data, eos=desc["eos"], origin=origin)
    raise ValueError(f"unknown tokenizer {desc!r}; this rtlib reads byte-level, synthetic, "
                     "Hugging Face and sentencepiece stores")


ORIGIN_KEYS = ("trained", "from")  # how a text tokenizer was made, kept in its manifest entry


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
