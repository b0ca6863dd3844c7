"""`rtlib data prepare`: documents -> deterministic train/valid/test split -> token store."""

import datetime
import hashlib

import numpy as np
from tqdm import tqdm

from rtlib.data.sources import Document, SourceError, collect
from rtlib.data.store import (
    FORMAT,
    SPLITS,
    VERSION,
    begin_write,
    check_target,
    finish_write,
    keep_existing,
    open_kvstore,
    split_array,
    wait,
)
from rtlib.data.tokenizer import ByteTokenizer
from rtlib.errors import BadArgument

WRITE_BLOCK = 8 << 20  # bytes buffered per tensorstore write


def check_fractions(valid: float, test: float) -> None:
    """The split fractions must be in [0, 1) and leave room for train."""
    if not 0 <= valid < 1 or not 0 <= test < 1 or valid + test >= 1:
        raise BadArgument(f"split fractions valid={valid}, test={test} must be in [0, 1) and "
                          "sum to less than 1")


def assign_splits(ids: list[str], *, valid: float, test: float, seed: int) -> dict[str, list[int]]:
    """Indices of documents per split. Documents are ranked by a seeded hash of their id, so a
    document's split depends only on its name, the seed and the corpus size, never on file
    contents or listing order. Each non-zero fraction gets at least one document."""
    check_fractions(valid, test)
    wanted = [int(f > 0) for f in (valid, test)]
    if len(ids) < 1 + sum(wanted):
        named = f" ({', '.join(ids)})" if 0 < len(ids) <= 3 else ""
        raise SourceError(f"{len(ids)} document(s){named} cannot be split into train"
                          f"{'/valid' if valid else ''}{'/test' if test else ''}: need at least "
                          f"{1 + sum(wanted)}; pass --valid 0 --test 0 to put every document "
                          "in train")
    rank = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode())
                  .digest())
    # train keeps at least one document, and so does each requested held-out split
    n_test = min(max(wanted[1], round(test * len(ids))), len(ids) - 1 - wanted[0])
    n_valid = min(max(wanted[0], round(valid * len(ids))), len(ids) - 1 - n_test)
    out = {"test": sorted(rank[:n_test]), "valid": sorted(rank[n_test:n_test + n_valid]),
           "train": sorted(rank[n_test + n_valid:])}
    return {s: out[s] for s in SPLITS}


def prepare(source: str, out: str, *, kind: str = "auto", glob: str | None = None,
            valid: float = 0.05, test: float = 0.05, seed: int = 0, doc_bytes: int = 65536,
            force: bool = False, progress: bool = True) -> dict:
    """Tokenise `source` into a token store at `out`; returns the manifest.

    An existing intact store made from the same source with the same split settings is left as
    it is (and its manifest returned); another existing store is only replaced with `force`.
    `out` must be empty, an rtlib store or one an interrupted run left; anything else needs
    `force`, and even then only rtlib's own keys are deleted (`rtlib.data.store.begin_write`).
    The manifest is written last: an interrupted run leaves no manifest, so nothing
    half-written is ever read.
    """
    if doc_bytes < 1:
        raise BadArgument(f"doc_bytes must be >= 1, got {doc_bytes}")
    check_fractions(valid, test)
    kv = open_kvstore(out)
    old = check_target(out, kv, force=force)  # before reading the corpus: fail fast
    docs, described = collect(source, kind=kind, glob=glob, doc_bytes=doc_bytes)
    tokenizer = ByteTokenizer()
    # Read everything before touching `out`: a source error must not cost an existing store.
    with tqdm(total=len(docs), desc=f"read {source}", unit="doc", disable=not progress) as bar:
        data = [_load(d, bar) for d in docs]
    if not any(data):
        raise SourceError(f"{source}: the corpus is empty (0 bytes in {len(docs)} document(s))")
    try:
        chosen = assign_splits([d.id for d in docs], valid=valid, test=test, seed=seed)
    except SourceError as e:
        hint = (f", or a --doc-bytes below {doc_bytes} to cut the file into more documents"
                if "doc_bytes" in described else "")
        raise SourceError(f"{source}: {e}{hint}") from None
    contents = {split: [(docs[i].id, data[i]) for i in idx] for split, idx in chosen.items()}
    for split, part in contents.items():
        if part and not any(d for _, d in part):  # a split of empty documents: useless
            names = ", ".join(name for name, _ in part[:3]) + (", ..." if len(part) > 3 else "")
            fix = "lower --valid/--test" if split == "train" else f"pass --{split} 0"
            raise SourceError(f"{source}: the {split} split got only empty documents ({names}): "
                              f"add documents, change --seed or {fix}")
    digest = _digest(contents)
    settings = {"valid": valid, "test": test, "seed": seed, "by": "document"}
    same = old is not None and old.get("source", {}).get("sha256") == digest and \
        old.get("split") == settings
    if (kept := keep_existing(out, old, same=same, force=force, what="source or split")):
        return kept  # already prepared from exactly this: nothing to do
    # From here on the old store (if any) is gone: its manifest goes first, so an interrupted
    # write leaves no manifest and is never read as complete.
    begin_write(out, kv)
    splits = {split: _write_split(out, split, part, tokenizer)
              for split, part in contents.items()}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokenizer": tokenizer.describe(), "dtype": np.dtype(tokenizer.dtype).name,
        "source": {**described, "documents": len(docs), "sha256": digest},
        "split": settings,
        "splits": splits,
    }
    finish_write(out, kv, manifest)
    return manifest


def _load(doc: Document, bar) -> bytes:
    data = doc.load()
    bar.update(1)
    return data


def _digest(contents: dict[str, list[tuple[str, bytes]]]) -> str:
    """SHA-256 over every non-empty document with its split and name, in store order."""
    digest = hashlib.sha256()
    for split, docs in contents.items():
        for name, data in docs:
            if data:
                digest.update(f"{split}\0{name}\0{len(data)}\0".encode())
                digest.update(data)
    return digest.hexdigest()


def _write_split(out: str, split: str, docs: list[tuple[str, bytes]],
                 tokenizer: ByteTokenizer) -> dict:
    """Write one split (empty documents are dropped). The corpus is held in memory once;
    corpora larger than memory need a streaming writer, not needed so far."""
    docs = [(name, data) for name, data in docs if data]
    boundaries = np.concatenate([[0], np.cumsum([len(d) for _, d in docs], dtype=np.int64)])
    array = split_array(out, split, create_shape=int(boundaries[-1]), dtype=tokenizer.dtype)
    pos, buffer, buffered = 0, [], 0
    for _, data in docs:
        buffer.append(data)
        buffered += len(data)
        if buffered >= WRITE_BLOCK:
            pos = _flush(array, pos, buffer, out)
            buffer, buffered = [], 0
    _flush(array, pos, buffer, out)
    return {"tokens": int(boundaries[-1]), "bytes": int(boundaries[-1]), "documents": len(docs),
            "boundaries": boundaries[:-1].tolist()}


def _flush(array, pos: int, buffer: list[bytes], out: str) -> int:
    if not buffer:
        return pos
    data = np.frombuffer(b"".join(buffer), np.uint8)
    wait(array[pos:pos + len(data)].write(data), out, "write the arrays")
    return pos + len(data)
