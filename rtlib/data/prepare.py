"""`rtlib data prepare`: documents -> deterministic train/valid/test split -> token store.

The source is streamed, never held: memory stays flat whatever its size (about 50 bytes per
document for its split rank, size and boundary, plus bounded buffers). It is read in passes:

1. **read**: every document's id and bytes go into the source's SHA-256 (in source order) and
   the document gets its rank for the split; a bad file, line or row fails here, before `out`
   is touched, and a store already made from exactly this source and these settings is kept;
2. **train** (only with `--train-tokenizer`): the tokenizer learns from the training split;
3. **write**: documents are tokenized in batches of about `BATCH_BYTES` (the tokenizer's own
   threads work on a batch in parallel), each text tokenizer's document followed by its
   end-of-document token, and appended to its split's arrays in blocks of `WRITE_BLOCK` tokens.

Byte-level stores have no separator (all 256 ids are bytes; the manifest's boundaries mark the
documents) and are what they were before text tokenizers existed, array for array.
"""

import datetime
import hashlib
from array import array
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from rtlib.data import store as store_module
from rtlib.data.sources import PIECE_BYTES, Corpus, SourceError, open_corpus
from rtlib.data.store import (
    FORMAT,
    SPLITS,
    TOKEN_BYTES,
    VERSION,
    begin_write,
    check_target,
    finish_write,
    keep_existing,
    open_kvstore,
    split_array,
    wait,
)
from rtlib.data.tokenizer import ByteTokenizer, TextTokenizer
from rtlib.data.tokenizer_train import check_trainable, load_tokenizer, train_tokenizer_on
from rtlib.errors import BadArgument

WRITE_BLOCK = 4 << 20  # tokens buffered per split before a tensorstore write
BATCH_BYTES = 1 << 20  # text handed to the tokenizer at once
# Pieces of text a tokenizer trains on: `tokenizers` holds 256 of them in a buffer.
TRAIN_PIECE_BYTES = 64 << 10
MAX_TOKEN_BYTES = (1 << 16) - 1  # SPLIT.token_bytes.zarr is uint16
DIGEST = "documents in source order"  # how source.sha256 is computed (see `_scan`)


def check_fractions(valid: float, test: float) -> None:
    """The split fractions must be in [0, 1) and leave room for train."""
    if not 0 <= valid < 1 or not 0 <= test < 1 or valid + test >= 1:
        raise BadArgument(f"split fractions valid={valid}, test={test} must be in [0, 1) and "
                          "sum to less than 1")


def rank_key(doc_id: str, seed: int) -> bytes:
    """What a document is ranked by for the split: a seeded hash of its id."""
    return hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8", "surrogateescape")).digest()


def assign_splits(ids: list[str], *, valid: float, test: float, seed: int) -> dict[str, list[int]]:
    """Indices of documents per split. Documents are ranked by a seeded hash of their id, so a
    document's split depends only on its name, the seed and the corpus size, never on file
    contents or listing order. Each non-zero fraction gets at least one document."""
    keys = np.frombuffer(b"".join(rank_key(i, seed) for i in ids), "S32")
    return {s: idx.tolist() for s, idx in _assign(keys, ids[:3], valid=valid, test=test).items()}


def _assign(keys: np.ndarray, first_ids: list[str], *, valid: float,
            test: float) -> dict[str, np.ndarray]:
    """`assign_splits` from the documents' rank keys (`rank_key`, one S32 per document)."""
    check_fractions(valid, test)
    n = len(keys)
    wanted = [int(f > 0) for f in (valid, test)]
    if n < 1 + sum(wanted):
        named = f" ({', '.join(first_ids)})" if 0 < n <= 3 else ""
        raise SourceError(f"{n} document(s){named} cannot be split into train"
                          f"{'/valid' if valid else ''}{'/test' if test else ''}: need at least "
                          f"{1 + sum(wanted)}; pass --valid 0 --test 0 to put every document "
                          "in train")
    rank = np.argsort(keys, kind="stable")
    # train keeps at least one document, and so does each requested held-out split
    n_test = min(max(wanted[1], round(test * n)), n - 1 - wanted[0])
    n_valid = min(max(wanted[0], round(valid * n)), n - 1 - n_test)
    out = {"test": np.sort(rank[:n_test]), "valid": np.sort(rank[n_test:n_test + n_valid]),
           "train": np.sort(rank[n_test + n_valid:])}
    return {s: out[s] for s in SPLITS}


def prepare(source: str, out: str, *, kind: str = "auto", glob: str | None = None,
            valid: float = 0.05, test: float = 0.05, seed: int = 0, doc_bytes: int = 65536,
            text_key: str = "text", tokenizer: str = "bytes", train_tokenizer: str | None = None,
            vocab_size: int | None = None, eos: str | None = None, force: bool = False,
            progress: bool = True) -> dict:
    """Tokenise `source` into a token store at `out`; returns the manifest.

    `tokenizer` is `bytes` or the path of a tokenizer file (`tokenizer.json`, or a
    sentencepiece `.model`; `eos` names its end-of-document token); `train_tokenizer`
    (`bpe`, `unigram`, `word`) with `vocab_size` trains one on the training split instead.

    An existing intact store made from the same source with the same split and tokenizer
    settings is left as it is (and its manifest returned); another existing store is only
    replaced with `force`. `out` must be empty, an rtlib store or one an interrupted run left;
    anything else needs `force`, and even then only rtlib's own keys are deleted
    (`rtlib.data.store.begin_write`). The manifest is written last: an interrupted run leaves
    no manifest, so nothing half-written is ever read.
    """
    if doc_bytes < 1:
        raise BadArgument(f"doc_bytes must be >= 1, got {doc_bytes}")
    check_fractions(valid, test)
    chosen, request = _tokenizer_request(tokenizer, train_tokenizer, vocab_size, eos)
    kv = open_kvstore(out)
    old = check_target(out, kv, force=force)  # before reading the corpus: fail fast
    corpus = open_corpus(source, kind=kind, glob=glob, doc_bytes=doc_bytes, text_key=text_key)
    if corpus.described["kind"] == "images" and request != {"kind": "bytes"}:
        raise BadArgument("images are stored as bytes: --tokenizer and --train-tokenizer are "
                          "for text")
    # Read everything before touching `out`: a source error must not cost an existing store.
    scan = _scan(corpus, seed, source, progress)
    if not scan.total:
        raise SourceError(f"{source}: the corpus is empty (0 bytes in {len(scan.sizes)} "
                          "document(s))")
    try:
        splits = _assign(scan.keys, scan.first_ids, valid=valid, test=test)
    except SourceError as e:
        hint = (f", or a --doc-bytes below {doc_bytes} to cut the file into more documents"
                if "doc_bytes" in corpus.described else "")
        raise SourceError(f"{source}: {e}{hint}") from None
    where = np.zeros(len(scan.sizes), np.uint8)
    for code, (split, idx) in enumerate(splits.items()):
        where[idx] = code
        if len(idx) and not scan.sizes[idx].any():  # a split of empty documents: useless
            names = _names(corpus, idx[:3]) + (", ..." if len(idx) > 3 else "")
            fix = "lower --valid/--test" if split == "train" else f"pass --{split} 0"
            raise SourceError(f"{source}: the {split} split got only empty documents ({names}): "
                              f"add documents, change --seed or {fix}")
    settings = {"valid": valid, "test": test, "seed": seed, "by": "document"}
    same_data = old is not None and not force and old.get("split") == settings and \
        old.get("source", {}).get("sha256") == (
            scan.digest if old["source"].get("digest") == DIGEST else
            _legacy_digest(corpus, where, scan, progress))  # a byte store of older rtlib
    same = same_data and _request_of(old.get("tokenizer", {})) == request
    what = "tokenizer" if same_data else "source or split"
    if (kept := keep_existing(out, old, same=same, force=force, what=what)):
        return kept  # already prepared from exactly this: nothing to do
    if chosen is None:  # trained before `out` is touched: a failure must not cost the old store
        chosen = train_tokenizer_on(train_tokenizer, vocab_size,
                                    _training_texts(corpus, where, progress))
    # From here on the old store (if any) is gone: its manifest goes first, so an interrupted
    # write leaves no manifest and is never read as complete.
    begin_write(out, kv)
    if not isinstance(chosen, ByteTokenizer):
        wait(kv.write(chosen.file_name, chosen.source), out, f"write {chosen.file_name}")
    written = _write(corpus, where, scan, chosen, out, progress)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokenizer": chosen.describe(), "dtype": np.dtype(chosen.dtype).name,
        "source": {**corpus.described, "documents": len(scan.sizes), "sha256": scan.digest,
                   "digest": DIGEST},
        "split": settings,
        "splits": written,
    }
    finish_write(out, kv, manifest)
    return manifest


def _tokenizer_request(tokenizer: str, train: str | None, vocab_size: int | None,
                       eos: str | None) -> tuple[ByteTokenizer | TextTokenizer | None, dict]:
    """(the tokenizer, or None when it is still to be trained; what was asked for, as
    `_request_of` reads it back from a manifest). Files are read here: an unreadable one fails
    before anything else."""
    if train is not None:
        if tokenizer != "bytes":
            raise BadArgument("give either --tokenizer or --train-tokenizer, not both")
        if eos is not None:
            raise BadArgument("--eos names the end-of-document token of a --tokenizer file; a "
                              "trained tokenizer's is <eos>")
        check_trainable(train, vocab_size)
        return None, {"trained": {"model": train, "vocab_size": vocab_size,
                                  "on": "train split"}}
    if vocab_size is not None:
        raise BadArgument("--vocab-size is the size of a tokenizer to train: add "
                          "--train-tokenizer bpe|unigram|word")
    if tokenizer == "bytes":
        if eos is not None:
            raise BadArgument("--eos is for a --tokenizer file: byte-level stores have no "
                              "end-of-document token")
        return ByteTokenizer(), {"kind": "bytes"}
    chosen = load_tokenizer(tokenizer, eos=eos)
    return chosen, {"sha256": chosen.describe()["sha256"], "eos": chosen.eos}


def _request_of(desc: dict) -> dict:
    """What a manifest's tokenizer entry was asked for (compared with `_tokenizer_request`)."""
    if desc.get("kind") == "bytes":
        return {"kind": "bytes"}
    if "trained" in desc:
        return {"trained": desc["trained"]}
    return {"sha256": desc.get("sha256"), "eos": desc.get("eos")}


class _Scan:
    """Pass 1: per document its rank key and size; the source's digest."""

    def __init__(self):
        self.keys = bytearray()  # 32 bytes per document
        self.sizes = array("q")
        self.first_ids: list[str] = []
        self.digest = ""
        self.total = 0


def _progress(desc: str, total: int | None, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress, dynamic_ncols=True, mininterval=0.5)


def _count(bar: tqdm, documents: int, of: int | None = None) -> None:
    if documents % 512 == 0 or documents == of:  # a postfix per document would cost more
        bar.set_postfix_str(f"{documents:,}{'' if of is None else f'/{of:,}'} documents",
                            refresh=False)


def _scan(corpus: Corpus, seed: int, source: str, progress: bool) -> _Scan:
    """The digest covers every document's id, bytes and size, in source order (the split
    settings are compared separately), so equal digests mean the same documents."""
    scan, digest = _Scan(), hashlib.sha256()
    with _progress(f"read {source}", corpus.plain_bytes(), progress) as bar:
        for doc_id, pieces in corpus.documents():
            name = doc_id.encode("utf-8", "surrogateescape")
            digest.update(name + b"\0")
            size = 0
            for piece in pieces:
                digest.update(piece)
                size += len(piece)
                bar.update(len(piece))
            digest.update(b"\0%d\0" % size)
            scan.keys += rank_key(doc_id, seed)
            scan.sizes.append(size)
            if len(scan.first_ids) < 3:
                scan.first_ids.append(doc_id)
            _count(bar, len(scan.sizes))
        _count(bar, len(scan.sizes), len(scan.sizes))
    scan.keys = np.frombuffer(bytes(scan.keys), "S32")
    scan.sizes = np.frombuffer(scan.sizes, np.int64)
    scan.digest, scan.total = digest.hexdigest(), int(scan.sizes.sum())
    return scan


def _legacy_digest(corpus: Corpus, where: np.ndarray, scan: _Scan, progress: bool) -> str:
    """source.sha256 as stores made before streaming computed it (split by split, empty
    documents left out), so that preparing the same source again keeps such a store rather
    than asking for --force. Reads only each split's own documents of a file tree."""
    digest = hashlib.sha256()
    with _progress("compare with the existing store", scan.total, progress) as bar:
        for code, split in enumerate(SPLITS):
            for i, (doc_id, pieces) in enumerate(corpus.documents()):
                if where[i] == code and scan.sizes[i]:
                    digest.update(f"{split}\0{doc_id}\0{scan.sizes[i]}\0".encode(
                        "utf-8", "surrogateescape"))
                    for piece in pieces:
                        digest.update(piece)
                        bar.update(len(piece))
    return digest.hexdigest()


def _names(corpus: Corpus, indices) -> str:
    wanted = {int(i) for i in indices}
    return ", ".join(doc_id for i, (doc_id, _) in enumerate(corpus.documents()) if i in wanted)


def _text_pieces(pieces: Iterable[bytes], size: int | None = None) -> Iterator[str]:
    """A document's bytes as text pieces of about `size` (default `PIECE_BYTES`), cut after a
    line break (else between two characters) so that no character is split; invalid UTF-8
    becomes U+FFFD."""
    size = size or PIECE_BYTES
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) > size:
            cut = buf.rfind(b"\n", 0, size) + 1
            if cut == 0:
                cut = size
                while cut > size - 3 and buf[cut] & 0xC0 == 0x80:  # mid-character
                    cut -= 1
            yield buf[:cut].decode("utf-8", errors="replace")
            del buf[:cut]
    if buf:
        yield buf.decode("utf-8", errors="replace")


def _training_texts(corpus: Corpus, where: np.ndarray, progress: bool):
    """Text of the training split's documents, for training a tokenizer (held-out text never
    shapes the vocabulary)."""
    with _progress("train tokenizer", None, progress) as bar:
        for i, (_, pieces) in enumerate(corpus.documents()):
            if where[i] == 0:  # train
                for text in _text_pieces(pieces, TRAIN_PIECE_BYTES):
                    bar.update(len(text))
                    yield text


def _fit(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint16 counts, the excess): a count beyond 65,535 (only a run of dropped whitespace that
    long) passes its excess on to the next token, so sums over runs of tokens stay exact."""
    excess = 0
    if len(counts) and counts.max() > MAX_TOKEN_BYTES:
        for j in range(len(counts)):
            total = int(counts[j]) + excess
            counts[j] = min(total, MAX_TOKEN_BYTES)
            excess = total - int(counts[j])
    return counts.astype(np.uint16), excess


class _SplitWriter:
    """One split's arrays, written in blocks of whole chunks as tokens arrive. Tokens wait in
    a staging buffer allocated once (a fresh block every time would make the allocator's
    footprint grow with the corpus). The array is created at its first write, with its final
    shape when that is the only write (so a small split has one chunk of exactly its size),
    and grown by a metadata resize before each later write: the finished array is the one a
    single write of known size would have made."""

    def __init__(self, out: str, split: str, dtype, with_bytes: bool):
        self.out, self.split, self.dtype = out, split, dtype
        self.names = [split] + ([f"{split}.{TOKEN_BYTES}"] if with_bytes else [])
        self.dtypes = [dtype, np.uint16][:len(self.names)]
        chunk = store_module.CHUNK
        self.capacity = -(-max(WRITE_BLOCK, chunk) // chunk) * chunk  # whole chunks
        self.stage: list[np.ndarray] = []  # allocated at the first token
        self.buffered = self.written = self.documents = self.bytes = 0
        self.arrays = None
        self.boundaries = array("q")
        self.carry = 0  # text bytes no token covered yet: they go with the next token

    def start_document(self) -> None:
        self.boundaries.append(self.written + self.buffered)
        self.documents += 1

    def add(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        if not self.stage:
            self.stage = [np.empty(self.capacity, d) for d in self.dtypes]
        parts = [ids] if counts is None else [ids, counts]
        done = 0
        while done < len(ids):
            take = min(len(ids) - done, self.capacity - self.buffered)
            for stage, part in zip(self.stage, parts, strict=True):
                stage[self.buffered:self.buffered + take] = part[done:done + take]
            self.buffered += take
            done += take
            if self.buffered == self.capacity:
                self._write()

    def add_text(self, ids: np.ndarray, ends: np.ndarray, text_bytes: int) -> None:
        """Tokens of `text_bytes` of text ending at byte offsets `ends`: each token counts the
        bytes since the previous one ended."""
        self.bytes += text_bytes
        ends = np.maximum.accumulate(np.clip(ends, 0, text_bytes))
        counts = np.diff(ends, prepend=0)
        if len(counts):
            counts[0] += self.carry
            self.carry = text_bytes - int(ends[-1])
        else:
            self.carry += text_bytes
        counts, excess = _fit(counts)
        self.carry += excess
        self.add(ids, counts)

    def end_document(self, eos_id: int) -> None:
        """The end-of-document token, which counts the bytes after the last token."""
        counts, self.carry = _fit(np.asarray([self.carry], np.int64))
        self.add(np.asarray([eos_id], self.dtype), counts)

    def finish(self) -> dict:
        if self.buffered or self.arrays is None:  # an empty split still gets its array
            self._write()
        info = {"tokens": self.written, "bytes": self.bytes, "documents": self.documents,
                "boundaries": self.boundaries.tolist()}
        if len(self.names) > 1:
            info[TOKEN_BYTES] = True
        return info

    def _write(self) -> None:
        n, size = self.buffered, self.written + self.buffered
        if self.arrays is None:
            self.arrays = [split_array(self.out, name, create_shape=size, dtype=dtype)
                           for name, dtype in zip(self.names, self.dtypes, strict=True)]
        else:
            self.arrays = [wait(a.resize(exclusive_max=[size]), self.out, "grow the arrays")
                           for a in self.arrays]
        for a, stage in zip(self.arrays, self.stage or [np.zeros(0, self.dtype)] * len(
                self.names), strict=True):
            _flush(a, self.written, stage[:n], self.out)
        self.written, self.buffered = size, 0


def _flush(array, pos: int, data: np.ndarray, out: str) -> int:
    if len(data):
        wait(array[pos:pos + len(data)].write(data), out, "write the arrays")
    return pos + len(data)


def _write(corpus: Corpus, where: np.ndarray, scan: _Scan, tokenizer, out: str,
           progress: bool) -> dict:
    """Pass 3: every document into its split's arrays (empty documents are dropped). A
    document whose size differs from the first pass (the source changed meanwhile) stops
    the write: the digest would not describe the store."""
    text = not isinstance(tokenizer, ByteTokenizer)
    writers = [_SplitWriter(out, split, tokenizer.dtype, with_bytes=text) for split in SPLITS]
    batch = _Batch(tokenizer, writers) if text else None
    n, i = len(scan.sizes), -1
    with _progress(f"write {out}", scan.total, progress) as bar:
        for i, (doc_id, pieces) in enumerate(corpus.documents()):
            if i >= n:
                raise SourceError(f"{doc_id}: not in the source when it was first read (it "
                                  "changed meanwhile): run again")
            writer, read = writers[where[i]], _Counted(pieces, bar)
            if text:
                batch.start(writer)
                for piece in _text_pieces(read):
                    batch.add(writer, piece)
                batch.end(writer)
            else:
                if scan.sizes[i]:
                    writer.start_document()
                for piece in read:
                    writer.add(np.frombuffer(piece, np.uint8))
                writer.bytes += read.size
            size = read.size
            if size != scan.sizes[i]:
                raise SourceError(f"{doc_id}: {size} bytes now, {scan.sizes[i]} when first read "
                                  "(the source changed meanwhile): run again")
            _count(bar, i + 1, n)
        if i + 1 != n:
            raise SourceError(f"{corpus.described.get('path', 'the source')}: {i + 1} documents "
                              f"now, {n} when first read (it changed meanwhile): run again")
        if batch is not None:
            batch.run()
    return {split: w.finish() for split, w in zip(SPLITS, writers, strict=True)}


class _Counted:
    """A document's pieces, counted (`size`) and shown on the progress bar as they are read."""

    def __init__(self, pieces: Iterable[bytes], bar: tqdm):
        self.pieces, self.bar, self.size = pieces, bar, 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            self.size += len(piece)
            self.bar.update(len(piece))
            yield piece


class _Batch:
    """Text pieces waiting to be tokenized together, with the documents' starts and ends
    between them; run in order, so each split receives its documents in source order. An
    empty document (no piece) is dropped."""

    def __init__(self, tokenizer: TextTokenizer, writers: list[_SplitWriter]):
        self.tokenizer, self.writers = tokenizer, writers
        self.items: list[tuple[_SplitWriter, str | None]] = []  # None: end of document
        self.bytes = 0
        self.pending: _SplitWriter | None = None  # a document started, no piece yet

    def start(self, writer: _SplitWriter) -> None:
        self.pending = writer

    def add(self, writer: _SplitWriter, text: str) -> None:
        if self.pending is not None:
            self.items.append((writer, ""))  # "": start of a document
            self.pending = None
        self.items.append((writer, text))
        self.bytes += len(text)
        if self.bytes >= BATCH_BYTES:
            self.run()

    def end(self, writer: _SplitWriter) -> None:
        if self.pending is None:  # the document had text
            self.items.append((writer, None))
        self.pending = None

    def run(self) -> None:
        texts = [t for _, t in self.items if t]
        encoded = iter(self.tokenizer.encode_batch(texts))
        for writer, text in self.items:
            if text is None:
                writer.end_document(self.tokenizer.eos_id)
            elif not text:
                writer.start_document()
            else:
                ids, ends = next(encoded)
                writer.add_text(ids.astype(writer.dtype), ends, len(text.encode("utf-8")))
        self.items, self.bytes = [], 0
