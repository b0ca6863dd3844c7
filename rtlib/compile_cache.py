"""JAX's persistent compilation cache for the command line.

Each `rtlib generate` / `eval` / `train` process compiles the same programs again; on 2 CPU cores
that is most of the seconds before the first token. With the cache on, a second call with the
same model and shapes loads the compiled executables from disk instead.

Where: `$RTLIB_COMPILE_CACHE` when set (`off`, `0` or an empty value turn the cache off), else
`$XDG_CACHE_HOME/rtlib/jax` (`~/.cache/rtlib/jax`). The library itself never turns it on: code
that imports rtlib keeps whatever JAX configuration its author chose.
"""

import os
from pathlib import Path

ENV = "RTLIB_COMPILE_CACHE"
OFF = ("", "0", "off", "false", "no")
# Programs that compile faster than this are not worth a disk write and a lookup.
MIN_COMPILE_SECONDS = 0.5


def cache_dir() -> Path | None:
    """The directory the CLI caches compiled programs in, or None when it is turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rtlib" / "jax"


def enable() -> Path | None:
    """Turn JAX's persistent compilation cache on at `cache_dir()`; returns the directory.

    Must run before the process compiles anything (JAX sets its cache up at the first compile).
    A directory that cannot be created leaves the cache off rather than failing the command.
    """
    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
