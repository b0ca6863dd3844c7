"""The byte-level tokenizer: token id = byte value (0-255). Lossless for any file, text or not."""

import numpy as np


class ByteTokenizer:
    vocab_size = 256
    dtype = np.uint8  # token ids as stored on disk

    def encode(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"token ids outside 0-255 cannot be bytes: {ids.min()}..{ids.max()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size}


def tokenizer_from_manifest(desc: dict) -> ByteTokenizer:
    if desc.get("kind") != "bytes":
        raise ValueError(f"unknown tokenizer {desc!r}; this rtlib reads byte-level stores only")
    return ByteTokenizer()
