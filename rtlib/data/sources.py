"""Where documents come from: the embedded default corpus, text files and trees of them
(plain, `.gz` or `.zst`), JSON Lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one document per
line, its text under a key), Parquet (`.parquet`: one document per row of a string column, read
in batches), or images (a directory of PNG/JPEG files or an `.npy` array).

`open_corpus` gives a `Corpus`, which streams its documents in a fixed order, each as a
sequence of byte pieces, so no document (and no file) needs to fit in memory whole: a text
file of a tree is one document read in pieces of `PIECE_BYTES`; a single text file is cut at
line breaks into documents of about `doc_bytes`. Formats are told by the file name: `.jsonl`
(or `.ndjson`) and `.parquet`, each possibly followed by `.gz` / `.zst` (not Parquet, which
compresses inside); everything else is text. Document ids name the file, and for JSON Lines
the line (from 1) and for Parquet the row (from 0), e.g. `shard-00.jsonl.gz:17`.
"""

import fnmatch
import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from rtlib.data.corpus import default_corpus_files
from rtlib.data.tokenizer import require
from rtlib.errors import BadArgument, SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SOURCE = "default"
PIECE_BYTES = 1 << 20  # documents are read in pieces of this size (files up to it in one read)
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH = 1024  # rows per Parquet read


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id and a loader. Loading is deferred so collecting a
    large corpus reads nothing; `pieces`, where given, streams the same bytes in parts."""

    id: str  # stable name: the split of a document depends only on this and the seed
    load: Callable[[], bytes]
    pieces: Callable[[], Iterator[bytes]] | None = None

    def read(self) -> Iterator[bytes]:
        """The document's bytes, in pieces."""
        return self.pieces() if self.pieces is not None else iter((self.load(),))


def file_format(path: Path) -> tuple[str, str | None]:
    """(`text` / `jsonl` / `parquet`, compression `gz` / `zst` / None) from a file's name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1], "text") if suffixes else "text"
    if fmt == "parquet" and compression:
        raise SourceError(f"{path}: Parquet compresses inside the file; give the .parquet "
                          "file itself")
    return fmt, compression


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None


@contextmanager
def _opened(path: Path, compression: str | None):
    """`path` as a binary stream, decompressed; read errors become SourceErrors naming it."""
    # EOFError: a truncated .gz; zlib.error: corrupt deflate data
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if compression == "zst":
        errors += (require("zstandard", f"{path}").ZstdError,)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if compression == "gz":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == "zst":
            zstd = require("zstandard", f"{path}")
            stream = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True), PIECE_BYTES)
        else:
            stream = io.BufferedReader(raw, PIECE_BYTES)
        yield stream
    except errors as e:
        what = f"not valid {compression} data" if compression else "cannot read"
        raise SourceError(f"{path}: {what}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        raw.close()


class _WholeFile:
    """A text file that is one document (a file of a tree)."""

    def __init__(self, path: Path, name: str, compression: str | None):
        self.path, self.name, self.compression = path, name, compression

    def pieces(self) -> Iterator[bytes]:
        if self.compression is None and self.path.stat().st_size <= PIECE_BYTES:
            yield _read(self.path)  # a small file in one read
            return
        with _opened(self.path, self.compression) as f:
            while block := f.read(PIECE_BYTES):
                yield block

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        yield self.name, self.pieces()

    def listing(self) -> list[Document]:
        return [Document(self.name, lambda: b"".join(self.pieces()), self.pieces)]


class _CutFile:
    """A single text file cut at line breaks into documents of about `doc_bytes`, so that it
    can be split: each cut is the last line break before `doc_bytes` (or `doc_bytes` itself
    when there is none); a document is named by its byte offset."""

    def __init__(self, path: Path, compression: str | None, doc_bytes: int):
        self.path, self.compression, self.doc_bytes = path, compression, doc_bytes

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        size, start, buf, eof = self.doc_bytes, 0, bytearray(), False
        with _opened(self.path, self.compression) as f:
            while True:
                while not eof and len(buf) <= size:  # enough to know whether more follows
                    block = f.read(max(PIECE_BYTES, size + 1 - len(buf)))
                    eof = not block
                    buf += block
                if not buf:
                    return
                stop = len(buf)
                if len(buf) > size:
                    newline = buf.rfind(b"\n", 0, size)
                    stop = newline + 1 if newline > 0 else size
                piece = bytes(buf[:stop])
                del buf[:stop]
                yield f"{self.path.name}:{start}", iter((piece,))
                start += stop

    def listing(self) -> list[Document]:
        return _scanned(self)


_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


class _JsonLines:
    """JSON Lines: each non-blank line an object whose `text_key` holds one document."""

    def __init__(self, path: Path, name: str, compression: str | None, text_key: str):
        self.path, self.name, self.compression, self.key = path, name, compression, text_key

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        with _opened(self.path, self.compression) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield f"{self.name}:{line_no}", iter((self._text(line, line_no),))

    def _text(self, line: bytes, line_no: int) -> bytes:
        where = f"{self.path}:{line_no}"
        try:
            record = json.loads(line.rstrip(b"\r\n"))
        except UnicodeDecodeError:
            raise SourceError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object with a {self.key!r} field, got "
                              f"{_JSON_TYPES.get(type(record), type(record).__name__)}")
        if self.key not in record:
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise SourceError(f"{where}: no {self.key!r} field (its fields: {keys}); name the "
                              "text field with --text-key")
        text = record[self.key]
        if not isinstance(text, str):
            raise SourceError(f"{where}: {self.key!r} is "
                              f"{_JSON_TYPES.get(type(text), type(text).__name__)}, not a string")
        return text.encode("utf-8", errors="replace")  # a lone surrogate escape becomes '?'

    def listing(self) -> list[Document]:
        return _scanned(self)


class _Parquet:
    """A Parquet file: each row's string column `text_key` is one document; read in batches
    of `PARQUET_BATCH` rows (a row group at most is held in memory)."""

    def __init__(self, path: Path, name: str, text_key: str):
        self.path, self.name, self.key = path, name, text_key

    def _file(self):
        pq = require("pyarrow.parquet", f"{self.path}")
        import pyarrow as pa

        try:
            pf = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{self.path}: not a readable Parquet file: {e}") from None
        schema = pf.schema_arrow
        if self.key not in schema.names:
            raise SourceError(f"{self.path}: no column {self.key!r} (its columns: "
                              f"{', '.join(map(repr, schema.names[:8]))}); name the text "
                              "column with --text-key")
        kind = schema.field(self.key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind)):
            raise SourceError(f"{self.path}: column {self.key!r} holds {kind}, not strings")
        return pf

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        import pyarrow as pa

        pf, row = self._file(), 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[self.key]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        raise SourceError(f"{self.path}: row {row}: {self.key!r} is null, not "
                                          "a string")
                    yield f"{self.name}:{row}", iter((text.encode("utf-8", errors="replace"),))
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{self.path}: cannot read row {row} on: {e}") from None

    def listing(self) -> list[Document]:
        return _scanned(self)


class _Listed:
    """Documents already listed (images)."""

    def __init__(self, docs: list[Document]):
        self.docs = docs

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        for doc in self.docs:
            yield doc.id, doc.read()

    def listing(self) -> list[Document]:
        return list(self.docs)


def _scanned(unit) -> list[Document]:
    """Documents of a unit that has to be read to be listed; each `load` reads it again up to
    the document (fine for inspection, which is what listing is for; prepare streams)."""
    ids = []
    for doc_id, pieces in unit.documents():
        for _ in pieces:
            pass
        ids.append(doc_id)

    def load(wanted: str) -> bytes:
        for doc_id, pieces in unit.documents():
            data = b"".join(pieces)
            if doc_id == wanted:
                return data
        raise SourceError(f"{wanted}: no longer in its file")

    return [Document(i, lambda i=i: load(i)) for i in ids]


@dataclass(frozen=True)
class Corpus:
    """The documents of a source, in a fixed order (`documents` streams them, and can be
    called again for another pass), with the source's description for the manifest."""

    described: dict
    units: list = field(repr=False)

    def documents(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        """(id, byte pieces) of every document in order; consume each document's pieces
        before asking for the next."""
        for unit in self.units:
            yield from unit.documents()

    def listing(self) -> list[Document]:
        """Every document as a `Document` (reads JSON Lines and cut files to list them)."""
        return [doc for unit in self.units for doc in unit.listing()]

    def plain_bytes(self) -> int | None:
        """Bytes of content when they are known from file sizes (uncompressed text), else
        None."""
        total = 0
        for unit in self.units:
            if isinstance(unit, _WholeFile | _CutFile) and unit.compression is None:
                total += unit.path.stat().st_size
            else:
                return None
        return total


def file_documents(root: Path, files: list[Path]) -> list[Document]:
    """One document per file, named by its path under `root` so the train/valid/test split of
    a file does not depend on where the tree is mounted."""
    return [d for p in files for d in _WholeFile(p, p.relative_to(root).as_posix(),
                                                 None).listing()]


def image_documents(source: Path) -> tuple[list[Document], list[int]]:
    """Images as documents of channel bytes (row-major H x W x C); returns the image shape."""
    if source.suffix == ".npy":
        try:
            arr = np.load(source, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SourceError(f"{source}: not a readable .npy array: {e}") from None
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0:
            raise SourceError(f"{source}: expected a non-empty uint8 array [N, H, W] or "
                              f"[N, H, W, C], got {arr.dtype} {list(arr.shape)}")
        return ([Document(f"{i:08d}", lambda i=i: np.ascontiguousarray(arr[i]).tobytes())
                 for i in range(len(arr))], list(arr.shape[1:]))
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{source}: no {'/'.join(IMAGE_SUFFIXES)} images found")
    first = _load_image(files[0])

    def load(p: Path) -> bytes:
        img = _load_image(p)
        if img.shape != first.shape:
            raise SourceError(f"{p}: image shape {list(img.shape)} differs from "
                              f"{list(first.shape)} of {files[0]}")
        return img.tobytes()

    return ([Document(p.relative_to(source).as_posix(), lambda p=p: load(p)) for p in files],
            list(first.shape))


def _only_images(directory: Path) -> bool:
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() in IMAGE_SUFFIXES for p in files)


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise SourceError(f"{path}: cannot read as an image: {e}") from None


def open_corpus(source: str, *, kind: str = "auto", glob: str | None = None,
                doc_bytes: int = 65536, text_key: str = "text") -> Corpus:
    """The corpus of `source`. A file or directory that cannot be listed is a `SourceError`
    naming it (never silently left out); one that cannot be read is, when it is read. A `glob`
    must stay inside `source` (`BadArgument` otherwise)."""
    if glob is not None:
        check_glob(glob)
    try:
        return _open_corpus(source, kind=kind, glob=glob, doc_bytes=doc_bytes,
                            text_key=text_key)
    except OSError as e:
        raise SourceError(f"{e.filename or source}: cannot read: {e.strerror or e}") from None


def collect(source: str, *, kind: str = "auto", glob: str | None = None,
            doc_bytes: int = 65536, text_key: str = "text") -> tuple[list[Document], dict]:
    """Documents of `source` as a list, and a description of it for the manifest (see
    `open_corpus`; JSON Lines and single text files are read once to be listed)."""
    corpus = open_corpus(source, kind=kind, glob=glob, doc_bytes=doc_bytes, text_key=text_key)
    try:
        return corpus.listing(), corpus.described
    except OSError as e:
        raise SourceError(f"{e.filename or source}: cannot read: {e.strerror or e}") from None


def check_glob(pattern: str) -> None:
    """A `--glob` pattern is relative to SOURCE and cannot leave it."""
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith(("/", "~")) or ".." in parts:
        raise BadArgument(f"--glob {pattern!r}: a pattern must be relative to SOURCE and stay "
                          "inside it (no leading '/' or '~', no '..'), e.g. '**/*.txt'")


def _open_corpus(source: str, *, kind: str, glob: str | None, doc_bytes: int,
                 text_key: str) -> Corpus:
    if source == DEFAULT_SOURCE:
        root, files = default_corpus_files()
        return Corpus({"kind": "default", "path": str(root),
                       "glob": "**/*.py (no tests, no site-packages)"},
                      [_WholeFile(p, p.relative_to(root).as_posix(), None) for p in files])
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory (use `default` for the "
                          "embedded corpus)")
    if kind == "auto":
        kind = "images" if path.suffix == ".npy" or (path.is_dir() and glob is None and
                                                      _only_images(path)) else "text"
    if kind == "images":
        if path.is_dir():
            _check_listable(path, "**/*")
        docs, shape = image_documents(path)
        return Corpus({"kind": "images", "path": str(path.resolve()), "image_shape": shape},
                      [_Listed(docs)])
    described = {"kind": "text", "path": str(path.resolve())}
    if path.is_file():
        fmt, compression = file_format(path)
        if fmt == "text":
            described["doc_bytes"] = doc_bytes
            unit = _CutFile(path, compression, doc_bytes)
        else:
            unit = _structured(path, path.name, fmt, compression, text_key)
        return Corpus(_with_formats(described, {fmt}, {compression}, text_key), [unit])
    pattern = glob or "**/*"
    _check_listable(path, pattern)
    files = sorted((p for p in path.glob(pattern) if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise SourceError(f"{source}: no files match {pattern!r}")
    units, formats, compressions = [], set(), set()
    for p in files:
        fmt, compression = file_format(p)
        name = p.relative_to(path).as_posix()
        units.append(_WholeFile(p, name, compression) if fmt == "text" else
                     _structured(p, name, fmt, compression, text_key))
        formats.add(fmt)
        compressions.add(compression)
    return Corpus(_with_formats({**described, "glob": pattern}, formats, compressions,
                                text_key), units)


def _structured(path: Path, name: str, fmt: str, compression: str | None, text_key: str):
    return (_JsonLines(path, name, compression, text_key) if fmt == "jsonl" else
            _Parquet(path, name, text_key))


def _with_formats(described: dict, formats: set[str], compressions: set[str | None],
                  text_key: str) -> dict:
    """The source's description, naming formats other than plain text (a corpus of plain
    text files is described as before they existed)."""
    if formats != {"text"}:
        described["formats"] = sorted(formats)
    if formats - {"text"}:
        described["text_key"] = text_key
    if compressions - {None}:
        described["compression"] = sorted(c for c in compressions if c)
    return described


def _check_listable(root: Path, pattern: str) -> None:
    """Raise for a directory under `root` that cannot be listed and could hold files matching
    `pattern`: `Path.glob` would silently skip it, leaving its files out of the corpus."""
    parts = PurePosixPath(pattern).parts

    def reachable(rel: tuple[str, ...]) -> bool:  # could the pattern match below rel?
        for i, name in enumerate(rel):
            if i < len(parts) and parts[i] == "**":
                return True
            if i >= len(parts) - 1 or not fnmatch.fnmatchcase(name, parts[i]):
                return False
        return True

    def fail(e: OSError):
        raise SourceError(f"{e.filename}: cannot list the directory: {e.strerror or e}")

    for top, dirs, _ in os.walk(root, onerror=fail):
        rel = Path(top).relative_to(root).parts
        dirs[:] = [d for d in dirs if reachable((*rel, d))]
