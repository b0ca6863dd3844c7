"""Token stores: one zarr3 array of token ids per split, written and read with tensorstore, plus
`manifest.json` (tokenizer, counts, document boundaries, source digest).

Token ids are stored as uint8 for vocabularies of up to 256 ids (byte-level and synthetic
stores), uint16 up to 65,536 and uint32 beyond. A store made with a text tokenizer (a Hugging
Face or sentencepiece one) also holds that tokenizer's file (`tokenizer.json` /
`tokenizer.model`, its SHA-256 in the manifest) and, per split, `SPLIT.token_bytes.zarr`: the
UTF-8 bytes of text each token stands for (uint16; whitespace a word-level tokenizer drops is
counted with the next token, a document's trailing bytes with its end-of-document token), so
the bits per byte of any run of tokens is exact (`TokenStore.text_bytes`). Each split's
`bytes` in the manifest is its documents' UTF-8 byte count, whatever the tokenizer.

A location is a local directory or any tensorstore kvstore URL (`file:///abs/dir/`, `gs://b/p/`,
`memory://x/`). The manifest is written last, so a store without one is incomplete and is never
read.

A store never returns data it does not have. zarr leaves out a chunk equal to the fill value (0
here) and, by default, reads a missing chunk as fill values, so a deleted chunk would read as
zeros. Stores are therefore written with tensorstore's `store_data_equal_to_fill_value` (every
chunk is stored, zeros included) and read with `fill_missing_data_reads: false` (a missing
chunk is a NOT_FOUND error; a truncated one fails to decode). `TokenStore.open` also lists each
array's chunks, so a store missing one is refused when opened rather than mid-training, and
every read that still fails becomes a `StoreError` naming the store and the chunk. Manifest
version 2 marks stores written this way; version 1 stores (older rtlib) are read the same way
and are intact unless a chunk of all zeros was left out (practically never for text, images or
synthetic tasks), which is then reported with the advice to prepare the store again.

Writers (`rtlib data prepare`, `rtlib data synth`) only write into an empty location, an rtlib
store, or one they started (marked by `rtlib-store.json`); with `force` into any location, and
even then they delete only rtlib's own keys: the manifest and the chunks and metadata of the
`SPLIT.zarr` / `SPLIT.answers.zarr` / `SPLIT.token_bytes.zarr` arrays and the tokenizer file.
"""

import functools
import json
import os
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from rtlib.data.tokenizer import Tokenizer, tokenizer_from_manifest, tokenizer_name
from rtlib.errors import RtlibError, StoreError

MANIFEST = "manifest.json"
MARKER = "rtlib-store.json"  # written before anything else: this location is an rtlib store
FORMAT = "rtlib-token-store"
VERSION = 2  # 2: every chunk is stored (see the module docstring); 1: zero chunks may be absent
SPLITS = ("train", "valid", "test")
ANSWERS = "answers"  # SPLIT.answers.zarr: the answer mask of a synthetic task
TOKEN_BYTES = "token_bytes"  # SPLIT.token_bytes.zarr: text bytes per token (text tokenizers)
EXTRAS = (ANSWERS, TOKEN_BYTES)  # arrays that come with a split's tokens, one element per token
ARRAYS = (*SPLITS, *(f"{s}.{e}" for e in EXTRAS for s in SPLITS))  # every array rtlib writes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # text tokenizers saved in the store
CHUNK = 1 << 20  # tokens per zarr chunk: 1 MiB of bytes, a good unit for local and object stores


def kvstore_url(location: str) -> str:
    """A tensorstore kvstore URL for a local path or URL, always ending in '/'."""
    url = location if "://" in location else Path(location).expanduser().resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def local_path(location: str) -> Path | None:
    """The local directory of a location (a path or a file:// URL); None for other URLs."""
    if "://" not in location:
        return Path(location).expanduser()
    if location.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    return None


def open_kvstore(location: str) -> ts.KvStore:
    """The kvstore at a store location; failures become a `StoreError` naming the location,
    since tensorstore's own messages do not. A local location that is a file, or lies under
    one, is refused here (tensorstore would report such a store as merely missing)."""
    path = local_path(location)
    if path is not None:
        for p in (path, *path.parents):
            try:
                if p.is_dir():
                    break
                if p.exists():
                    raise StoreError(f"{location}: {p} is a file, not a directory: a token "
                                     "store is a directory")
            except OSError as e:
                raise StoreError(f"{location}: cannot access {p}: {e.strerror or e}") from None
    try:
        return ts.KvStore.open(kvstore_url(location)).result()
    except Exception as e:  # tensorstore raises ValueError subclasses with terse text
        raise StoreError(f"{location}: cannot open as a tensorstore kvstore: {_line(e)}") from None


def wait(future, location: str, doing: str):
    """The result of a tensorstore future; its errors (ValueError with terse text, or OSError)
    become one-line `StoreError`s naming the location and what was being done."""
    try:
        return future.result()
    except RtlibError:
        raise
    except (ValueError, OSError) as e:
        raise StoreError(f"{location}: cannot {doing}: {_line(e)}") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def split_array(location: str, split: str, *, create_shape: int | None = None,
                dtype=np.uint8) -> ts.TensorStore:
    """One split's zarr3 token array: opened for reading (a missing chunk is an error), or with
    `create_shape` created in chunks of `CHUNK` tokens, every chunk stored. Creating expects
    the old array's keys deleted first (`begin_write`): nothing else under it is deleted."""
    spec = {"driver": "zarr3", "kvstore": kvstore_url(location) + f"{split}.zarr/"}
    if create_shape is None:
        return ts.open({**spec, "fill_missing_data_reads": False}, open=True, read=True).result()
    return wait(ts.open({**spec, "store_data_equal_to_fill_value": True}, create=True,
                        dtype=ts.dtype(np.dtype(dtype).name), shape=[create_shape],
                        chunk_layout=ts.ChunkLayout(
                            chunk_shape=[max(1, min(CHUNK, create_shape))])),
                location, f"create the array {split}.zarr")


def parse_manifest(raw: bytes) -> dict | None:
    """The manifest in `raw` if it is an rtlib token store's (a JSON object of our format),
    else None."""
    try:
        manifest = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def existing_manifest(location: str) -> dict | None:
    """The manifest of the rtlib store at `location`, or None where there is none (nothing
    there, or something else). `StoreError` only when the location cannot be read."""
    kv = open_kvstore(location)
    found = wait(kv.read(MANIFEST), location, f"read {MANIFEST}")
    return parse_manifest(bytes(found.value)) if found.state == "value" else None


def check_target(location: str, kv: ts.KvStore, *, force: bool) -> dict | None:
    """Before writing a store at `location`: the manifest of the rtlib store already there
    (None if there is none). A location that holds anything but an rtlib store (or one an
    interrupted writer left, marked by `MARKER`) is refused unless `force`."""
    found = wait(kv.read(MANIFEST), location, f"read {MANIFEST}")
    if found.state == "value":
        manifest = parse_manifest(bytes(found.value))
        if manifest is not None:
            return manifest
        foreign = f"its {MANIFEST} is not an rtlib token store manifest"
    elif wait(kv.read(MARKER), location, f"read {MARKER}").state == "value":
        return None  # an rtlib store whose writing was interrupted: nothing to keep
    else:
        entry = _any_entry(location, kv)
        foreign = entry and f"it holds {entry!r}"
    if foreign and not force:
        raise StoreError(f"{location}: not an rtlib token store and not empty ({foreign}); "
                         "rtlib writes a store only into an empty directory or its own store: "
                         "choose another output, or pass --force to write there anyway "
                         "(replacing only rtlib's manifest.json and SPLIT.zarr arrays)")
    return None


def _any_entry(location: str, kv: ts.KvStore) -> str | None:
    """Some entry at `location`, or None when it is empty (or does not exist)."""
    path = local_path(location)
    if path is None:
        keys = wait(kv.list(), location, "list its keys")
        return keys[0].decode(errors="replace") if keys else None
    try:
        with os.scandir(path) as entries:
            return next((e.name for e in entries), None)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"{location}: cannot list: {e.strerror or e}") from None


def begin_write(location: str, kv: ts.KvStore) -> None:
    """Make `location` ready for new arrays: mark it as rtlib's, drop the manifest (so an
    interrupted write is never read as complete), then delete rtlib's own arrays (their
    metadata and numbered chunks) and tokenizer file, and nothing else."""
    if wait(kv.read(MARKER), location, f"read {MARKER}").state != "value":
        wait(kv.write(MARKER, json.dumps({
            "format": FORMAT, "note": "an rtlib token store; it is complete once "
            f"{MANIFEST} exists"}).encode()), location, f"write {MARKER}")
    wait(kv.write(MANIFEST, None), location, f"delete {MANIFEST}")
    for name in ARRAYS:
        prefix = f"{name}.zarr/"
        keys = wait(kv.list(ts.KvStore.KeyRange(prefix, f"{name}.zarr0"),
                            strip_prefix_length=len(prefix)), location, f"list {prefix}")
        keys = [k.decode(errors="replace") for k in keys]
        # only existing keys: deleting an absent one would leave an empty directory behind
        deletes = [kv.write(prefix + k, None) for k in keys
                   if k == "zarr.json" or (k.startswith("c/") and k[2:].isdigit())]
        for d in deletes:
            wait(d, location, f"delete the old array {name}.zarr")
        _remove_if_empty(location, f"{name}.zarr/c", f"{name}.zarr")
    for name in TOKENIZER_FILES:
        if wait(kv.read(name), location, f"read {name}").state == "value":
            wait(kv.write(name, None), location, f"delete {name}")


def _remove_if_empty(location: str, *directories: str) -> None:
    """Remove a local store's directories left empty by deleting their keys (tensorstore keeps
    them), so that an array the new store lacks leaves no trace; never one holding anything."""
    path = local_path(location)
    for directory in directories if path is not None else ():
        try:
            (path / directory).rmdir()
        except OSError:  # absent, or not empty: someone else's files stay
            pass


def finish_write(location: str, kv: ts.KvStore, manifest: dict) -> None:
    """Write the manifest: from now on the store is complete and readable."""
    wait(kv.write(MANIFEST, json.dumps(manifest, indent=1).encode()), location,
         f"write {MANIFEST}")


def keep_existing(location: str, old: dict | None, *, same: bool, force: bool,
                  what: str) -> dict | None:
    """Before (re)writing a store: the existing manifest `old` to return as it is (an intact
    store made from the same input, `same`), or None to write. A different store is refused
    unless `force`; the same store, damaged (e.g. a chunk lost), is written again (nothing of
    it is lost)."""
    if old is None or force:
        return None
    if not same:
        raise StoreError(f"{location}: a token store from another {what} is already there; "
                         "pass --force to replace it")
    return old if is_intact(location) else None


def is_intact(location: str) -> bool:
    """Whether the store at `location` opens (manifest, array sizes, every chunk present)."""
    try:
        TokenStore.open(location)
    except StoreError:
        return False
    return True


def read_tokenizer(location: str, manifest: dict) -> Tokenizer:
    """The tokenizer of the store at `location` with this manifest (reading its tokenizer file,
    if it has one); StoreError when that cannot be done."""
    kv = None

    def read(name: str) -> bytes:
        nonlocal kv
        kv = kv or open_kvstore(location)
        found = wait(kv.read(name), location, f"read {name}")
        if found.state != "value":
            raise StoreError(f"{location}: {name} is missing: the store is damaged; prepare it "
                             "again")
        return bytes(found.value)

    try:
        return tokenizer_from_manifest(manifest["tokenizer"], read)
    except ValueError as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{location}: unusable tokenizer: {e}") from None


def store_tokenizer(location: str) -> Tokenizer:
    """The tokenizer of the store at `location`, reading only its manifest and tokenizer file
    (not its arrays): what `rtlib generate` decodes with. StoreError without a store."""
    manifest = existing_manifest(location)
    if manifest is None:
        raise StoreError(f"{location}: no token store here ({MANIFEST} is missing), so no "
                         "tokenizer to encode and decode with")
    return read_tokenizer(location, manifest)


def _chunk_size(array: ts.TensorStore) -> int:
    return int(array.chunk_layout.read_chunk.shape[0])


@dataclass(frozen=True)
class TokenStore:
    """A prepared token store opened for reading (see `TokenStore.open`): the manifest and
    one tensorstore array per split (and per answer mask); reads return NumPy arrays."""

    location: str
    manifest: dict
    arrays: dict  # split -> tensorstore array

    @classmethod
    def open(cls, location: str) -> "TokenStore":
        """Open the store at `location`, checking its manifest, array sizes and chunks up front
        so a missing, foreign or damaged store fails here with a `StoreError`, not
        mid-training."""
        kv = open_kvstore(location)
        found = wait(kv.read(MANIFEST), location, f"read {MANIFEST}")
        if found.state != "value":
            raise StoreError(f"{location}: no token store here ({MANIFEST} is missing; an "
                             f"interrupted `rtlib data prepare` also leaves none). Make one with "
                             f"`rtlib data prepare SOURCE {location}`")
        manifest = parse_manifest(bytes(found.value))
        if manifest is None:
            raise StoreError(f"{location}: unreadable token store: its {MANIFEST} is not an "
                             f"rtlib token store manifest (a JSON object with format {FORMAT!r})")
        try:
            arrays = {s: split_array(location, s) for s in manifest["splits"]}
            # answer masks of synthetic tasks (`rtlib data synth`), bytes per token of text
            # tokenizers: one per split
            arrays.update({f"{s}.{e}": split_array(location, f"{s}.{e}")
                           for s, info in manifest["splits"].items() for e in EXTRAS
                           if e in info})
            sizes = {s: int(info["tokens"]) for s, info in manifest["splits"].items()}
        except Exception as e:
            raise StoreError(f"{location}: unreadable token store: {_line(e)}") from None
        store = cls(location, manifest, arrays)
        for name, array in arrays.items():
            tokens = sizes[name.split(".")[0]]
            if array.shape[0] != tokens:
                raise StoreError(f"{location}: {name!r} holds {array.shape[0]} "
                                 f"tokens, the manifest says {tokens}: the store "
                                 "is damaged; prepare it again")
            store._check_chunks(kv, name)
        return store

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the store was written with (from its manifest, and for a text
        tokenizer the file saved in the store)."""
        return read_tokenizer(self.location, self.manifest)

    def check_fits(self, vocab_size: int, tokenizer: str | None = None) -> None:
        """StoreError unless a model of `vocab_size` ids can read this store (and, when
        `tokenizer` names one, the store was made with that kind of tokenizer): a larger id
        would fail late and obscurely inside the embedding."""
        vocab = self.manifest["tokenizer"]["vocab_size"]
        if vocab > vocab_size:
            raise StoreError(f"{self.location}: its tokenizer has {vocab:,} token ids but "
                             f"model.vocab_size is {vocab_size:,}: set model.vocab_size to "
                             f"{vocab} (or `auto`)")
        have = tokenizer_name(self.manifest["tokenizer"])
        if tokenizer is not None and tokenizer != have:
            raise StoreError(f"{self.location}: made with a {have} tokenizer, but data.tokenizer "
                             f"is {tokenizer}: prepare the store with that tokenizer (see "
                             "docs/data.md), or set data.tokenizer to null to accept any")

    def text_bytes(self, split: str, start: int, stop: int) -> int | None:
        """UTF-8 bytes of text that tokens [start, stop) of a split stand for: the tokens
        themselves in a byte-level store, the sum of `SPLIT.token_bytes.zarr` in a store of a
        text tokenizer; None where tokens are not text (synthetic tasks)."""
        self._check_split(split)
        stop = min(stop, self.num_tokens(split))
        if self.tokenizer.unit == "byte":
            return max(0, stop - start)
        name = f"{split}.{TOKEN_BYTES}"
        if name not in self.arrays:
            return None
        if stop == self.num_tokens(split):  # (an evaluation of a whole split) the rest
            return int(self.manifest["splits"][split]["bytes"]) - self._sum(name, 0, start)
        return self._sum(name, start, stop)

    def _sum(self, name: str, start: int, stop: int) -> int:
        total, block = 0, 1 << 24
        for a in range(start, stop, block):  # in blocks: a whole split need not fit in memory
            total += int(self._read(name, a, min(stop, a + block)).sum(dtype=np.int64))
        return total

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
        return np.asarray(self._read(f"{split}.{ANSWERS}", start, stop), bool)

    def read_token_bytes(self, split: str, start: int, stop: int) -> np.ndarray:
        """Text bytes per token [start, stop) of a split of a text tokenizer's store (int64)."""
        self._check_split(split)
        if f"{split}.{TOKEN_BYTES}" not in self.arrays:
            raise StoreError(f"{self.location}: split {split!r} records no bytes per token "
                             "(only stores of text tokenizers do)")
        return np.asarray(self._read(f"{split}.{TOKEN_BYTES}", start, stop), np.int64)

    def num_tokens(self, split: str) -> int:
        """Tokens in `split`, from the manifest (no read)."""
        self._check_split(split)
        return int(self.manifest["splits"][split]["tokens"])

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) of a split as int32."""
        self._check_split(split)
        return np.asarray(self._read(split, start, stop), np.int32)

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.location}: no split {split!r}; it has "
                             f"{', '.join(self.manifest['splits'])}")

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of array `name`; a missing or unreadable chunk is a
        `StoreError` naming it (found by reading the range's chunks one by one)."""
        array = self.arrays[name]
        try:
            return array[start:stop].read().result()
        except ValueError as error:
            size, total = _chunk_size(array), array.shape[0]
            first, last = max(0, start) // size, max(start, min(stop, total) - 1) // size
            for chunk in range(first, last + 1):
                try:
                    array[chunk * size:min(total, (chunk + 1) * size)].read().result()
                except ValueError as e:
                    raise self._damaged(name, [chunk], e) from None
            raise StoreError(f"{self.location}: cannot read {name}.zarr "
                             f"[{start}, {stop}): {_line(error)}") from None

    def _check_chunks(self, kv: ts.KvStore, name: str) -> None:
        """Refuse the store if array `name` lacks any of its chunk keys (listed, not read)."""
        array = self.arrays[name]
        prefix = f"{name}.zarr/c/"
        keys = wait(kv.list(ts.KvStore.KeyRange(prefix, f"{name}.zarr/c0"),
                            strip_prefix_length=len(prefix)), self.location, f"list {prefix}")
        have = {k.decode(errors="replace") for k in keys}
        expected = -(-array.shape[0] // _chunk_size(array))
        missing = [c for c in range(expected) if str(c) not in have]
        if missing:
            raise self._damaged(name, missing, None)

    def _damaged(self, name: str, chunks: Iterable[int], error: Exception | None) -> StoreError:
        chunks = list(chunks)
        what = (f"chunk {name}.zarr/c/{chunks[0]} is missing" if error is None or
                _line(error).startswith("NOT_FOUND") else
                f"chunk {name}.zarr/c/{chunks[0]} is unreadable (truncated or corrupt: "
                f"{_line(error)})")
        if len(chunks) > 1:
            what += f" ({len(chunks)} chunks of {name}.zarr are missing)"
        older = ("; stores of manifest version 1 (an older rtlib) may also have left out a "
                 "chunk of all zeros" if self.manifest.get("version", 1) < VERSION else "")
        return StoreError(f"{self.location}: {what}: the store is damaged{older}; make it "
                          "again: the `rtlib data prepare` (or `rtlib data synth`) that made it, "
                          "run again, rewrites it")
