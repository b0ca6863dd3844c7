"""Tokenizers of token stores.

- `ByteTokenizer`: token id = byte value (0-255). Lossless for any file, text or not.
- `SyntheticTokenizer`: the named ids of a synthetic task (`rtlib data synth`): special tokens
  and ranges such as keys `k0..k63`; text is whitespace-separated names (or plain ids).
"""

import numpy as np


class ByteTokenizer:
    """Token id = byte value: lossless for any file, text or not, with no vocabulary to fit."""

    vocab_size = 256
    dtype = np.uint8  # token ids as stored on disk
    unit = "byte"  # what one token is, for "bits per <unit>"

    def encode(self, data: bytes | str) -> np.ndarray:
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

    def encode(self, data: str) -> np.ndarray:
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
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside 0-{self.vocab_size - 1}: "
                             f"{ids.min()}..{ids.max()}")
        return " ".join(self.names[i] for i in ids)

    def describe(self) -> dict:
        """The manifest entry `tokenizer_from_manifest` rebuilds this tokenizer from."""
        return {"kind": "synthetic", "vocab_size": self.vocab_size, "specials": self.specials,
                "ranges": self.ranges}


Tokenizer = ByteTokenizer | SyntheticTokenizer


def tokenizer_from_manifest(desc: dict) -> Tokenizer:
    """The tokenizer a store's manifest describes (the inverse of `describe`)."""
    if desc.get("kind") == "bytes":
        return ByteTokenizer()
    if desc.get("kind") == "synthetic":
        return SyntheticTokenizer(desc["specials"], desc["ranges"])
    raise ValueError(f"unknown tokenizer {desc!r}; this rtlib reads byte-level and synthetic "
                     "stores only")
