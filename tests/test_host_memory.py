"""Freed memory goes back to the operating system: the allocator call itself, and the train
step compiling once, ahead of its first run, with the compiler's leftovers released between."""

import ctypes
import ctypes.util
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from rtlib import host_memory
from rtlib.spec.load import load_spec
from rtlib.train import step as step_module
from rtlib.train.run_dir import fresh_state

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def test_release_returns_freed_heap_pages():
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "malloc_trim") or not os.path.exists("/proc/self/statm"):
        assert host_memory.release_freed_memory() is False
        pytest.skip("no glibc malloc_trim here: release_freed_memory is a no-op")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 120 MB in 1 KB blocks (below the mmap threshold: heap memory), touched, then freed
    # below a block that stays allocated, so free() alone cannot shrink the heap.
    blocks = [libc.malloc(1024) for _ in range(120_000)]
    for b in blocks:
        ctypes.memset(b, 1, 1024)
    pin = libc.malloc(1024)
    for b in blocks:
        libc.free(b)
    before = resident_mb()
    assert host_memory.release_freed_memory() is True
    after = resident_mb()
    libc.free(pin)
    assert before - after > 60, (before, after)


def test_train_step_compiles_once_before_its_first_run_and_releases_memory(monkeypatch):
    spec = load_spec(str(ROOT / "specs" / "tiny.yaml"),
                     ["train.batch_size=2", "model.seq_len=32", "mesh.data=1"])
    events = []
    monkeypatch.setattr(step_module, "release_freed_memory", lambda: events.append("release"))

    def on_duration(name, seconds, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append("compile")

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        state = fresh_state(spec)
        batch = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
        step = step_module.train_step_for(spec)
        events.clear()
        state, metrics = step(batch, state)
        jax.block_until_ready(metrics)
        assert events == ["compile", "release"]  # compiled once, released before running
        state, metrics = step(batch, state)
        jax.block_until_ready(metrics)
        assert events == ["compile", "release"]
        assert np.isfinite(float(metrics["loss"]))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
