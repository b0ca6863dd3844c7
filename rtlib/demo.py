"""`rtlib demo`: build a spec, initialise routing from data, take a few optimiser steps on the
embedded default corpus and show the loss, bits per byte and the routing at work.

This is a short demonstration of the library's pieces end to end, not the training job (which
adds data pipelines, checkpoints and evaluation).
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtlib.build import build, count_parameters
from rtlib.corpus import default_corpus_bytes
from rtlib.objectives import next_token_loss
from rtlib.spec.schema import Spec

LN2 = float(np.log(2.0))


def run_demo(spec: Spec, *, steps: int, batch: int, seed: int, lr: float, print_fn=print) -> dict:
    model_spec = spec.model
    if model_spec.vocab_size < 256:
        raise ValueError("the demo feeds raw bytes: it needs vocab_size >= 256")
    n = model_spec.seq_len
    data = np.frombuffer(default_corpus_bytes(4_000_000), np.uint8).astype(np.int32)
    split = int(len(data) * 0.95)
    train, valid = data[:split], data[split:]
    rng = np.random.default_rng(seed)

    def sample(source: np.ndarray) -> jax.Array:
        starts = rng.integers(0, len(source) - n - 1, size=batch)
        return jnp.asarray(np.stack([source[s : s + n + 1] for s in starts]))

    key = jax.random.key(seed)
    key, k_build, k_init = jax.random.split(key, 3)
    model, state = build(model_spec, key=k_build)
    print_fn(f"spec {spec.name or '?'}: {count_parameters(model):,} parameters, "
             f"{model_spec.n_layers} layers, seq_len {n}, batch {batch}")
    if not bool(state.initialised):
        state = eqx.filter_jit(model.init_routing)(sample(train)[:, :-1], state, key=k_init)
        print_fn("routing centroids initialised by k-means on the first batch")

    optimizer = optax.adamw(lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, state, opt_state, tokens, key):
        grad_fn = eqx.filter_value_and_grad(next_token_loss, has_aux=True)
        (_, (lm, commit, stats)), grads = grad_fn(model, state, tokens, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, model.update_state(state, stats), opt_state, lm, commit, stats

    @eqx.filter_jit
    def eval_loss(model, state, tokens):
        return next_token_loss(model, state, tokens, inference=True)[1][0]

    def bits_per_byte() -> float:
        return float(np.mean([eval_loss(model, state, sample(valid)) for _ in range(4)])) / LN2

    start_bpb = bits_per_byte()
    print_fn(f"valid bits/byte before training: {start_bpb:.3f} (uniform: 8.000)")
    every = max(1, steps // 10)
    t0 = None  # throughput is measured after the first (compiling) step
    for step in range(1, steps + 1):
        key, k = jax.random.split(key)
        model, state, opt_state, lm, commit, stats = train_step(model, state, opt_state,
                                                                 sample(train), k)
        if t0 is None:
            jax.block_until_ready(lm)
            t0 = time.perf_counter()
        if step % every == 0 or step == steps:
            lm = float(lm)
            speed = (step - 1) * batch * n / max(time.perf_counter() - t0, 1e-9)
            cover = [float(s.coverage.mean()) for s in stats if s is not None]
            print_fn(f"step {step:4d}/{steps}  lm {lm / LN2:.3f} bits/byte  "
                     f"commit {float(commit):.2e}  coverage {np.mean(cover) if cover else 1:.2f}  "
                     f"{speed:,.0f} tokens/s")
    end_bpb = bits_per_byte()
    occupancy = [np.asarray(s.ema_counts) for s in state.stages if s is not None]
    print_fn(f"valid bits/byte after {steps} steps: {end_bpb:.3f}")
    if occupancy:
        occ = np.concatenate([o.reshape(-1, o.shape[-1]) for o in occupancy])
        frac = occ / occ.sum(-1, keepdims=True)
        print_fn(f"cluster occupancy per head (EMA share): min {frac.min():.3f}  "
                 f"max {frac.max():.3f}  (uniform {1 / occ.shape[-1]:.3f})")
    return {"bits_per_byte_before": start_bpb, "bits_per_byte_after": end_bpb, "steps": steps}
