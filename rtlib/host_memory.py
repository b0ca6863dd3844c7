"""Handing memory the process has freed back to the operating system.

XLA's compiler allocates and frees hundreds of MB of small objects while it compiles a large
program. glibc's allocator keeps freed small allocations in its heap, and the buffers a
compiled step then runs on are large enough to get fresh pages of their own: the process's
peak resident memory is then the compiler's leftovers plus the step (bench-4k at 16k tokens:
1,718 MB against 1,439 MB with the leftovers returned; docs/performance.md). Returning the
free heap pages after compiling costs a few milliseconds.
"""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only (not musl, macOS or Windows)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free heap pages to the operating system (glibc's
    `malloc_trim(0)`); False where the C library has no such call (nothing is done there)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
