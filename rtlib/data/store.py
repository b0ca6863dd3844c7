"""Token stores: one zarr3 array of token ids per split, written and read with tensorstore, plus
`manifest.json` (tokenizer, counts, document boundaries, source digest).

A location is a local directory or any tensorstore kvstore URL (`file:///abs/dir/`, `gs://b/p/`,
`memory://x/`). The manifest is written last, so a store without one is incomplete and is never
read.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from rtlib.data.tokenizer import Tokenizer, tokenizer_from_manifest
from rtlib.errors import StoreError

MANIFEST = "manifest.json"
FORMAT = "rtlib-token-store"
SPLITS = ("train", "valid", "test")
ANSWERS = "answers"  # SPLIT.answers.zarr: the answer mask of a synthetic task
CHUNK = 1 << 20  # tokens per zarr chunk: 1 MiB of bytes, a good unit for local and object stores

def kvstore_url(location: str) -> str:
    """A tensorstore kvstore URL for a local path or URL, always ending in '/'."""
    url = location if "://" in location else Path(location).expanduser().resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def open_kvstore(location: str) -> ts.KvStore:
    """The kvstore at a store location; failures become a `StoreError` naming the location,
    since tensorstore's own messages do not."""
    try:
        return ts.KvStore.open(kvstore_url(location)).result()
    except Exception as e:  # tensorstore raises ValueError subclasses with terse text
        raise StoreError(f"{location}: cannot open as a tensorstore kvstore: {e}") from None


def split_array(location: str, split: str, *, create_shape: int | None = None,
                dtype=np.uint8) -> ts.TensorStore:
    """One split's zarr3 token array: opened for reading, or with `create_shape` created
    (replacing any old one) in chunks of `CHUNK` tokens."""
    spec = {"driver": "zarr3", "kvstore": kvstore_url(location) + f"{split}.zarr/"}
    if create_shape is None:
        return ts.open(spec, open=True, read=True).result()
    return ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(np.dtype(dtype).name),
                   shape=[create_shape],
                   chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, min(CHUNK,
                                                                       create_shape))])).result()


@dataclass(frozen=True)
class TokenStore:
    """A prepared token store opened for reading (see `TokenStore.open`): the manifest and
    one tensorstore array per split (and per answer mask); reads return NumPy arrays."""

    location: str
    manifest: dict
    arrays: dict  # split -> tensorstore array

    @classmethod
    def open(cls, location: str) -> "TokenStore":
        """Open the store at `location`, checking its manifest and array sizes up front so a
        missing, foreign or damaged store fails here with a `StoreError`, not mid-training."""
        kv = open_kvstore(location)
        found = kv.read(MANIFEST).result()
        if found.state != "value":
            raise StoreError(f"{location}: no token store here ({MANIFEST} is missing; an "
                             f"interrupted `rtlib data prepare` also leaves none). Make one with "
                             f"`rtlib data prepare SOURCE {location}`")
        try:
            manifest = json.loads(bytes(found.value))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            arrays = {s: split_array(location, s) for s in manifest["splits"]}
            # answer masks of synthetic tasks (`rtlib data synth`), one per split
            arrays.update({f"{s}.{ANSWERS}": split_array(location, f"{s}.{ANSWERS}")
                           for s, info in manifest["splits"].items() if "answers" in info})
        except Exception as e:
            raise StoreError(f"{location}: unreadable token store: {e}") from None
        for split, info in manifest["splits"].items():
            for name in (split, f"{split}.{ANSWERS}"):
                if name in arrays and arrays[name].shape[0] != info["tokens"]:
                    raise StoreError(f"{location}: {name!r} holds {arrays[name].shape[0]} "
                                     f"tokens, the manifest says {info['tokens']}: the store "
                                     "is damaged; prepare it again")
        return cls(location, manifest, arrays)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the store was written with (from its manifest)."""
        return tokenizer_from_manifest(self.manifest["tokenizer"])

    @property
    def example_tokens(self) -> int | None:
        """Tokens per example when every document is one fixed-length example (synthetic
        tasks): windows then start on example boundaries. None for running text."""
        return self.manifest.get("example_tokens")

    def has_answers(self, split: str) -> bool:
        """Whether `split` has an answer mask (stores of `rtlib data synth`)."""
        return f"{split}.{ANSWERS}" in self.arrays

    def read_answers(self, split: str, start: int, stop: int) -> np.ndarray:
        """The answer mask [start, stop) of a split (bool); see `has_answers`."""
        self._check_split(split)
        return np.asarray(self.arrays[f"{split}.{ANSWERS}"][start:stop].read().result(), bool)

    def num_tokens(self, split: str) -> int:
        """Tokens in `split`, from the manifest (no read)."""
        self._check_split(split)
        return int(self.manifest["splits"][split]["tokens"])

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) of a split as int32."""
        self._check_split(split)
        return np.asarray(self.arrays[split][start:stop].read().result(), np.int32)

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.location}: no split {split!r}; it has "
                             f"{', '.join(self.manifest['splits'])}")
