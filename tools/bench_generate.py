"""Generation speed with and without the decoding cache, on this machine.

    python tools/bench_generate.py [--spec specs/small.yaml] [--prompt 512] [--new 2048]
                                   [--no-cache-steps 32]

Builds the spec's model with causal assignment in its routing heads (random weights: speed does
not depend on them), then times `rtlib.runs.sample.generate` producing `--new` tokens after a
`--prompt`-token prompt with the cache, and without it (every token recomputes the whole
sequence, a fixed-size buffer of prompt + new tokens, so every step costs the same: it is timed
over `--no-cache-steps` tokens). Also reports the largest logit difference between the two
paths over the first steps, and the cache's size. Prints one JSON object.

    python tools/bench_generate.py --deviation RUN_DIR [--length 64]

measures instead how far cached decoding is from recomputation for a trained run (the balanced
assignment's approximation): on validation text, the logits of every position from the cache
against those of a full forward pass over the prefix up to that position.
"""

import argparse
import json
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from rtlib.build import build
from rtlib.runs.sample import Sampling, generate
from rtlib.spec.load import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="specs/small.yaml")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=2048)
    ap.add_argument("--no-cache-steps", type=int, default=32)
    ap.add_argument("--assignment", default="causal", choices=["causal", "balanced"])
    ap.add_argument("--deviation", metavar="RUN_DIR", help="measure cached-vs-recomputed "
                    "logits of a trained run instead of speed")
    ap.add_argument("--length", type=int, default=64, help="tokens scored by --deviation")
    args = ap.parse_args()
    if args.deviation:
        print(json.dumps(deviation(args.deviation, args.length), indent=1))
        return
    spec = load_spec(args.spec, ["model.routing.init=random"]).model
    heads = [h.model_copy(update={"assignment": args.assignment}) if h.kind == "routing" else h
             for h in spec.attention.heads]
    spec = spec.model_copy(update={"attention": spec.attention.model_copy(
        update={"heads": heads})})
    model, state = build(spec, key=jax.random.key(0))
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (args.prompt,), 0, 256))
    greedy = Sampling(temperature=0.0)
    key = jax.random.key(2)

    # Without the cache every step recomputes a buffer of prompt + new tokens (the size of a
    # real run of that length), so a few steps give its rate.
    total = args.prompt + args.new
    steps = args.no_cache_steps

    def timed(new: int, use_cache: bool) -> tuple[float, np.ndarray]:
        kw = dict(sampling=greedy, key=key, use_cache=use_cache, capacity=total)
        generate(model, state, prompt, max_new_tokens=2, **kw)  # compile
        t0 = time.perf_counter()
        out = generate(model, state, prompt, max_new_tokens=new, **kw)
        return time.perf_counter() - t0, out

    t_cache, out_cache = timed(args.new, True)
    t_plain, out_plain = timed(steps, False)
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        eqx.filter_eval_shape(lambda: model.prefill(jnp.asarray(prompt)[None], state,
                                                    capacity=total)[1])))
    print(json.dumps({
        "spec": args.spec, "assignment": args.assignment, "prompt": args.prompt,
        "new_tokens": args.new, "device": platform.processor() or platform.machine(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "cached_tokens_per_s": args.new / t_cache,
        "no_cache_tokens_per_s": steps / t_plain, "no_cache_timed_tokens": steps,
        "speedup": (args.new / t_cache) / (steps / t_plain),
        "greedy_tokens_equal_over_first_steps": bool(np.array_equal(
            out_cache[: args.prompt + steps], out_plain)),
        "cache_bytes": cache_bytes,
    }, indent=1))


def deviation(run_dir: str, length: int) -> dict:
    from rtlib.data.store import TokenStore
    from rtlib.train.run_dir import load_run

    spec, ts, step = load_run(run_dir)
    model, state = ts.model, ts.routing
    store = TokenStore.open(spec.data.path)
    length = min(length, store.num_tokens("valid"))
    tokens = jnp.asarray(store.read("valid", 0, length))[None]
    _, cache = eqx.filter_jit(model.prefill)(tokens[:, :1], state, capacity=length)
    cached = [eqx.filter_jit(model)(tokens[:, :1], state, inference=True)[0][0, 0]]
    decode = eqx.filter_jit(model.decode)
    for t in range(1, length):
        logits, cache = decode(tokens[:, t], state, cache)
        cached.append(logits[0])
    cached = jnp.stack(cached)

    @eqx.filter_jit
    def prefix_logits(t):  # the full pass over tokens[:t + 1], padded to one fixed length
        mask = jnp.arange(length)[None] <= t
        return model(jnp.where(mask, tokens, 0), state, mask=mask, inference=True)[0][0, t]

    full = jnp.stack([prefix_logits(jnp.asarray(t)) for t in range(length)])
    p_full, p_cached = jax.nn.log_softmax(full), jax.nn.log_softmax(cached)
    kl = jnp.sum(jnp.exp(p_full) * (p_full - p_cached), axis=-1)
    nll = lambda lp: -float(jnp.mean(lp[jnp.arange(length - 1), tokens[0, 1:]]))  # noqa: E731
    return {
        "run_dir": run_dir, "step": step, "assignment": [h.assignment for h in
                                                           spec.model.attention.heads
                                                           if h.kind == "routing"],
        "positions": length, "max_abs_logit_diff": float(jnp.max(jnp.abs(full - cached))),
        "mean_abs_logit_diff": float(jnp.mean(jnp.abs(full - cached))),
        "argmax_agreement": float(jnp.mean(jnp.argmax(full, -1) == jnp.argmax(cached, -1))),
        "mean_kl_full_to_cached_nats": float(jnp.mean(kl)),
        "nll_full": nll(p_full), "nll_cached": nll(p_cached),
    }


if __name__ == "__main__":
    main()
