"""The embedded default corpus: the Python standard library source of the running interpreter.

Real text present on every machine with Python, so examples run offline.
"""

import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_bytes(limit: int) -> bytes:
    """The first `limit` bytes of the stdlib's top-level `.py` files, in sorted path order."""
    root = stdlib_root()
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}: is the stdlib installed?")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(chunks)[:limit]
