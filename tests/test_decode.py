"""Cached decoding: prefill + decode equal the full forward pass for local, full and causal
routing heads; generation with and without the cache agrees; the cache does not grow."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs

from rtlib.build import build
from rtlib.cli import main
from rtlib.runs.sample import Sampling, generate
from rtlib.spec.load import load_spec

ROOT = Path(__file__).resolve().parent.parent
TINY_CAUSAL = ROOT / "specs" / "tiny-causal.yaml"
MIXED = ("model.attention.heads=[{kind: local, count: 1, window: 16, look_back: 2}, "
         "{kind: full, count: 1}, {kind: routing, count: 2, clusters: 4, window: 16, "
         "assignment: causal, self_mask: true, rotary: true}]")


def model_for(*overrides, path=TINY_CAUSAL, seed=0):
    spec = load_spec(path, ["model.routing.init=random", *overrides]).model
    return build(spec, key=jax.random.key(seed))


def cached_logits(model, state, tokens, prompt):
    pre, cache = eqx.filter_jit(model.prefill)(tokens[:, :prompt], state,
                                               capacity=tokens.shape[1])
    decode = eqx.filter_jit(model.decode)
    steps = []
    for t in range(prompt, tokens.shape[1]):
        logits, cache = decode(tokens[:, t], state, cache)
        steps.append(logits)
    return jnp.concatenate([pre, jnp.stack(steps, axis=1)], axis=1), cache


@pytest.mark.parametrize("overrides", [
    (),  # the shipped tiny-causal: 2 local + 2 causal routing heads with shared QK
    ("model.attention.heads.1.shared_qk=false", "model.attention.heads.1.norm=l2"),
    (MIXED, "model.embedding.positions=learned", "model.norm=post"),
], ids=["tiny-causal", "unshared-l2", "local-full-selfmask-rotary-learned-postnorm"])
def test_cached_logits_equal_the_full_forward_at_every_step(overrides, getkey):
    model, state = model_for(*overrides)
    tokens = jax.random.randint(getkey(), (2, 60), 0, 256)
    full, _ = eqx.filter_jit(model)(tokens, state, inference=True)
    cached, cache = cached_logits(model, state, tokens, prompt=7)
    assert max_abs(cached, full) < 1e-5
    assert int(cache.pos) == 60


def test_greedy_tokens_match_with_and_without_cache_beyond_seq_len(getkey):
    model, state = model_for()
    prompt = np.asarray(jax.random.randint(getkey(), (5,), 0, 256))
    kw = dict(max_new_tokens=90, sampling=Sampling(temperature=0.0), key=getkey())
    with_cache = generate(model, state, prompt, **kw)
    without = generate(model, state, prompt, use_cache=False, **kw)
    assert len(with_cache) == 95 > model.seq_len
    np.testing.assert_array_equal(with_cache, without)


def test_the_cache_does_not_grow_with_generated_tokens(getkey):
    model, state = model_for()
    tokens = jax.random.randint(getkey(), (1, 8), 0, 256)

    def nbytes(cache):
        return sum(x.nbytes for x in jax.tree.leaves(cache))

    def shapes(cache):
        return [x.shape for x in jax.tree.leaves(cache)]

    _, short = model.prefill(tokens, state, capacity=16)
    _, long = model.prefill(tokens, state, capacity=100_000)
    assert shapes(short) == shapes(long)
    grown = short
    for t in range(40):
        _, grown = eqx.filter_jit(model.decode)(jnp.asarray([t]), state, grown)
    assert shapes(grown) == shapes(short)
    # local ring (2 blocks of 16) + per-cluster rings (4 clusters x 16) for 2 heads x 2 layers
    layers, heads, dim, clusters, window, slots = 2, 2, 8, 4, 16, 32
    floats = layers * (2 * slots * heads * dim + 2 * heads * clusters * window * dim)
    ints = layers * (slots + heads * clusters * window + heads * clusters) + 1
    assert nbytes(grown) == 4 * (floats + ints)


def test_balanced_cache_is_exact_when_one_cluster_holds_everything(getkey):
    model, state = model_for("model.attention.heads.1.assignment=balanced",
                             "model.attention.heads.1.clusters=1",
                             "model.attention.heads.1.window=64")
    tokens = jax.random.randint(getkey(), (1, 50), 0, 256)
    full, _ = eqx.filter_jit(model)(tokens, state, inference=True)
    cached, _ = cached_logits(model, state, tokens, prompt=3)
    assert max_abs(cached, full) < 1e-5


def test_limits_of_the_cache_are_errors_or_fallbacks(getkey):
    model, state = model_for("model.embedding.positions=learned")
    kw = dict(sampling=Sampling(temperature=0.0), key=getkey())
    # past seq_len a learned-position model falls back to a sliding window of recomputation
    long = generate(model, state, np.array([1, 2]), max_new_tokens=70, **kw)
    np.testing.assert_array_equal(long, generate(model, state, np.array([1, 2]),
                                                 max_new_tokens=70, use_cache=False, **kw))
    _, cache = model.prefill(jnp.asarray([[1, 2]]), state, capacity=2)
    cache = eqx.tree_at(lambda c: c.pos, cache, jnp.asarray(64, jnp.int32))
    with pytest.raises(Exception, match="position beyond seq_len"):
        jax.block_until_ready(model.decode(jnp.asarray([3]), state, cache))
    with pytest.raises(ValueError, match="capacity=1 is smaller than the prompt"):
        model.prefill(jnp.asarray([[1, 2]]), state, capacity=1)
    encoder, enc_state = model_for("model.kind=encoder")
    with pytest.raises(ValueError, match="need a decoder"):
        encoder.prefill(jnp.asarray([[1, 2]]), enc_state, capacity=4)


def test_cli_generate_is_the_same_with_and_without_the_cache(text_store, tmp_path, capsys):
    from rtlib.train.loop import train

    run_dir = tmp_path / "causal"
    train(load_spec(TINY_CAUSAL, [f"data.path={text_store}", f"run.dir={run_dir}",
                                  "train.steps=3", "train.batch_size=4", "run.sample_tokens=0",
                                  "data.eval_tokens=128", "mesh.data=1"]), progress=False)
    capsys.readouterr()
    args = ["generate", str(run_dir), "--prompt", "line 3 of", "--max-new-tokens", "80",
            "--temperature", "0"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main([*args, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and len(cached) > 80
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
