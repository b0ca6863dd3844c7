"""Where documents come from: the embedded default corpus, one text file, a directory tree, or
images (a directory of PNG/JPEG files or an `.npy` array), each yielding `Document`s."""

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from rtlib.data.corpus import default_corpus_files
from rtlib.errors import BadArgument, SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id and a loader. Loading is deferred so collecting a
    large corpus reads nothing; `rtlib data prepare` streams the bytes when it writes them."""

    id: str  # stable name: the split of a document depends only on this and the seed
    load: Callable[[], bytes]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None


def file_documents(root: Path, files: list[Path]) -> list[Document]:
    """One document per file, named by its path under `root` so the train/valid/test split of
    a file does not depend on where the tree is mounted."""
    return [Document(p.relative_to(root).as_posix(), lambda p=p: _read(p)) for p in files]


def text_file_documents(path: Path, doc_bytes: int) -> list[Document]:
    """One file cut at line breaks into documents of about `doc_bytes`, so it can be split."""
    data = _read(path)
    docs, start = [], 0
    while start < len(data):
        stop = min(len(data), start + doc_bytes)
        if stop < len(data):
            newline = data.rfind(b"\n", start, stop)
            stop = newline + 1 if newline > start else stop
        docs.append(Document(f"{path.name}:{start}", lambda a=start, b=stop: data[a:b]))
        start = stop
    return docs


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


def collect(source: str, *, kind: str = "auto", glob: str | None = None,
            doc_bytes: int = 65536) -> tuple[list[Document], dict]:
    """Documents of `source` and a description of it for the manifest. A file or directory
    that cannot be read while collecting is a `SourceError` naming it (never silently left
    out); a `glob` must stay inside `source` (`BadArgument` otherwise)."""
    if glob is not None:
        check_glob(glob)
    try:
        return _collect(source, kind=kind, glob=glob, doc_bytes=doc_bytes)
    except OSError as e:
        raise SourceError(f"{e.filename or source}: cannot read: {e.strerror or e}") from None


def check_glob(pattern: str) -> None:
    """A `--glob` pattern is relative to SOURCE and cannot leave it."""
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith(("/", "~")) or ".." in parts:
        raise BadArgument(f"--glob {pattern!r}: a pattern must be relative to SOURCE and stay "
                          "inside it (no leading '/' or '~', no '..'), e.g. '**/*.txt'")


def _collect(source: str, *, kind: str, glob: str | None,
             doc_bytes: int) -> tuple[list[Document], dict]:
    if source == DEFAULT_SOURCE:
        root, files = default_corpus_files()
        return file_documents(root, files), {"kind": "default", "path": str(root),
                                             "glob": "**/*.py (no tests, no site-packages)"}
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
        return docs, {"kind": "images", "path": str(path.resolve()), "image_shape": shape}
    if path.is_file():
        return text_file_documents(path, doc_bytes), {"kind": "text", "path": str(path.resolve()),
                                                      "doc_bytes": doc_bytes}
    pattern = glob or "**/*"
    _check_listable(path, pattern)
    files = sorted((p for p in path.glob(pattern) if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise SourceError(f"{source}: no files match {pattern!r}")
    return file_documents(path, files), {"kind": "text", "path": str(path.resolve()),
                                         "glob": pattern}


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
