"""The embedded default corpus: the Python standard library source of the running interpreter.

Real text present on every machine with Python, so the README's main command runs offline.
Third-party packages (`site-packages`) and the stdlib's own test suites are left out: the first
differ between machines, the second are mostly generated-looking fixtures.
"""

import sysconfig
from pathlib import Path

from rtlib.errors import SourceError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> tuple[Path, list[Path]]:
    """(root, the stdlib's `.py` files under it in sorted relative-path order)."""
    root = stdlib_root()
    files = sorted(
        (p for p in root.rglob("*.py")
         if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SourceError(f"{root}: no Python source files for the `default` corpus: is the "
                          "stdlib installed?")
    return root, files
