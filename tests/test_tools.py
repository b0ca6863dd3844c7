"""The CLI's persistent compilation cache and the benchmark tool's bookkeeping."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtlib import compile_cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value,expected", [("off", None), ("0", None), ("", None),
                                            ("/x/y", Path("/x/y"))])
def test_cache_dir_follows_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.cache_dir() == expected


def test_cache_dir_defaults_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "rtlib" / "jax"


def test_enabled_cache_stores_compiled_programs(tmp_path):
    code = ("import jax, jax.numpy as jnp\n"
            "from rtlib import compile_cache\n"
            "compile_cache.MIN_COMPILE_SECONDS = 0\n"
            "print(compile_cache.enable())\n"
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n")
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())  # at least one compiled program written


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ratios_pair_each_length_and_keep_what_is_missing():
    bench = _bench()
    rows = [
        {"impl": "rtlib", "n": 4096, "tokens_per_s": 3000.0, "peak_rss_mb": 600.0,
         "s_per_step": 4096 / 3000, "floor_s": 1.0},
        {"impl": "routing-transformer", "n": 4096, "tokens_per_s": 1500.0,
         "peak_rss_mb": 1200.0},
        {"impl": "rtlib", "n": 16384, "tokens_per_s": 2000.0, "peak_rss_mb": 900.0,
         "s_per_step": 16384 / 2000, "floor_s": 4.0,
         "overrides": ["model.remat=true", "model.scan_unroll=1"]},
        {"impl": "routing-transformer", "n": 16384, "error": "exit -9: killed"},
    ]
    short, long = bench.train_ratios(rows)
    assert short["tokens_ratio"] == 2.0 and short["rss_ratio"] == 0.5
    assert abs(short["step_over_floor"] - 4096 / 3000) < 1e-12
    assert "tokens_ratio" not in long and long["rtlib_tokens_per_s"] == 2000.0
    text = bench._markdown({"train": rows, "ratios": [short, long]})
    assert "| 4,096 | 3,000 | 1,500 | 2.00 |" in text
    assert "routing-transformer n=16384: exit -9: killed" in text
    assert "- rtlib with `model.remat=true model.scan_unroll=1`" in text
