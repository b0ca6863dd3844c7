"""The training state and the jitted training step.

`TrainState` is everything that changes during training and goes into a checkpoint: the model,
the routing (centroid) state, the optimiser state, the step and the RNG key. The step is pure:
old state in, new state and metrics out; the old state's buffers are donated.
"""

import contextlib
import functools
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int, PRNGKeyArray, UInt32

from rtlib.build import build
from rtlib.host_memory import release_freed_memory
from rtlib.nn.model import Stats
from rtlib.nn.seq2seq import EncoderDecoder, Model
from rtlib.objectives import masked_lm_loss, next_token_loss, seq2seq_loss, split_pairs
from rtlib.parallel import activate, constrain, constrain_as, state_shardings
from rtlib.parallel.rules import is_array_leaf, rules_key
from rtlib.routing import RoutingState
from rtlib.spec.schema import OBJECTIVE_OF_KIND, AxisRules, ModelSpec, Spec, TrainSpec
from rtlib.train.optim import make_optimizer, schedule_key


class TrainState(eqx.Module):
    """Everything training changes, and so everything a checkpoint must hold for an exact
    resume: model, routing state, optimiser state, step counter and RNG key."""

    model: Model
    routing: RoutingState
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: UInt32[Array, "2"]  # raw key data: checkpoints hold plain arrays


def abstract_state(spec: Spec, mesh: Mesh) -> TrainState:
    """The spec's `TrainState` as shapes, dtypes and shardings on `mesh` (no arrays): the
    target a checkpoint is restored onto."""
    abstract = eqx.filter_eval_shape(init_train_state, spec, key=jax.random.key(0))
    shardings = state_shardings(abstract, spec.mesh.rules, mesh)
    return jax.tree.map(lambda x, s: x if s is None else jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=s), abstract, shardings, is_leaf=lambda x: x is None)


def init_sharded(spec: Spec, mesh: Mesh, *, key: PRNGKeyArray) -> TrainState:
    """`init_train_state` with every array created directly in its sharding on `mesh` (a
    model too large for one device never exists unsharded). The values do not depend on the
    mesh."""
    abstract = abstract_state(spec, mesh)
    arrays, static = eqx.partition(abstract, is_array_leaf)
    shardings = jax.tree.map(lambda x: x.sharding, arrays)
    make = jax.jit(lambda k: eqx.filter(init_train_state(spec, key=k), eqx.is_array),
                   out_shardings=shardings)
    with activate(mesh, spec.mesh.rules):
        state = eqx.combine(make(key), static)
    release_freed_memory()  # what compiling `make` left behind (rtlib.host_memory)
    return state


def init_train_state(spec: Spec, *, key: PRNGKeyArray) -> TrainState:
    """The spec's state at step 0, from `key` alone (so a seed reproduces a run): the built
    model and routing state, a fresh optimiser state and the key for the steps' randomness."""
    k_build, k_train = jax.random.split(key)
    model, routing = build(spec.model, key=k_build)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes weak Python scalars freely
        opt_state = make_optimizer(spec.train).init(eqx.filter(model, eqx.is_array))
    return TrainState(model, routing, opt_state, jnp.zeros((), jnp.int32),
                      jax.random.key_data(k_train))


def _compute_dtype(model: Model, dtype: str) -> Model:
    """The model with float parameters cast for the forward pass; gradients flow back to the
    float32 masters through the cast. The routing state (centroids) is not touched."""
    if dtype == "float32":
        return model
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)


def routing_metrics(stats: Stats) -> dict[str, Array]:
    """Cluster occupancy (share of routed vectors per cluster: min, max, normalised entropy
    averaged over heads) and coverage, over every routing layer of one step."""
    shares, entropies, coverage = [], [], []
    for s in stats:
        if s is None:
            continue
        k = s.counts.shape[-1]
        share = s.counts / jnp.maximum(jnp.sum(s.counts, axis=-1, keepdims=True), 1.0)
        shares.append(share.reshape(-1))
        ent = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.maximum(share, 1e-30)), 0.0), -1)
        entropies.append((ent / jnp.log(float(max(k, 2)))).reshape(-1))
        coverage.append(s.coverage.reshape(-1))
    if not shares:
        return {}
    share, ent, cov = (jnp.concatenate(x) for x in (shares, entropies, coverage))
    return {"occupancy_min": jnp.min(share), "occupancy_max": jnp.max(share),
            "occupancy_entropy": jnp.mean(ent), "coverage": jnp.mean(cov)}


def train_step_for(spec: Spec, mesh: Mesh | None = None):
    """The jitted step for a spec: `step(batch, state) -> (state, metrics)`; `batch` is tokens
    [batch, seq_len + 1] (the masked-LM objective reads the first seq_len), or
    [batch, 2, seq_len + 1] (tokens, answer mask) with `train.loss_on: answers`, or packed
    (source, target) pairs [batch, seq_len + decoder.seq_len + 1] for an encoder-decoder
    (`rtlib.objectives.split_pairs`). With a `mesh`, the
    batch is split over the data axes and the state keeps the shardings of `mesh.rules`
    (`init_sharded`). Cached by the settings that shape it, so a resumed, extended or repeated
    run in the same process reuses the compiled program. The first call compiles before it
    runs and returns the compiler's freed memory to the OS in between (`rtlib.host_memory`)."""
    step = _train_step(json.dumps({"model": spec.model.model_dump(mode="json"),
                                   "train": schedule_key(spec.train),
                                   "rules": spec.mesh.rules.model_dump(mode="json")},
                                  sort_keys=True))
    rules = spec.mesh.rules
    compiled = False

    def run(batch: Int[Array | np.ndarray, "batch *seq_plus_one"], ts: TrainState):
        nonlocal compiled
        with activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
            if not compiled:
                # Compile ahead of the first call and give the compiler's freed memory back
                # before the step allocates its own: the process's peak memory is then the
                # larger of the two, not their sum (rtlib.host_memory). The call below finds
                # the compiled program in jit's cache.
                step.lower(batch, ts).compile()
                release_freed_memory()
                compiled = True
            return step(batch, ts)

    return run


@functools.lru_cache(maxsize=8)
def _train_step(key: str):
    settings = json.loads(key)
    train = TrainSpec.model_validate(settings["train"])
    objective = train.objective or OBJECTIVE_OF_KIND[ModelSpec.model_validate(
        settings["model"]).kind]
    optimizer = make_optimizer(train)
    micro = train.micro_batches
    dtype = train.compute_dtype

    def loss_fn(model, routing, batch, key):
        model = _compute_dtype(model, dtype)
        if objective == "mlm":  # windows of seq_len + 1 tokens: the encoder reads seq_len
            return masked_lm_loss(model, routing, batch[:, :-1], train.mlm, key=key)
        if objective == "seq2seq":
            return seq2seq_loss(model, routing, batch, key=key)
        # batch: tokens [b, n + 1], or [b, 2, n + 1] = tokens and answer mask (loss_on answers)
        tokens, targets = (batch, None) if batch.ndim == 2 else (batch[:, 0], batch[:, 1] > 0)
        return next_token_loss(model, routing, tokens, key=key, targets_mask=targets)

    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    def one(model, routing, tokens, key):
        (loss, (lm, commit, stats)), grads = grad_fn(model, routing, tokens, key)
        return grads, jnp.stack([loss, lm, commit]), stats

    @functools.partial(eqx.filter_jit, donate="all-except-first")
    def step(batch: Int[Array, "batch *seq_plus_one"], ts: TrainState):
        key = jax.random.wrap_key_data(ts.key)
        key, k_step = jax.random.split(key)
        # Every micro-batch is split over the data axes, not held by a few devices.
        tokens = constrain_as(batch.reshape(micro, batch.shape[0] // micro, *batch.shape[1:]),
                              P(None, "batch", *[None] * (batch.ndim - 1)))
        keys = jax.random.split(k_step, micro)
        if micro == 1:
            grads, losses, stats = one(ts.model, ts.routing, tokens[0], keys[0])
        else:
            def body(acc, xs):
                out = one(ts.model, ts.routing, *xs)
                return jax.tree.map(jnp.add, acc, out), None

            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), eqx.filter_eval_shape(
                one, ts.model, ts.routing, tokens[0], keys[0]))
            (grads, losses, stats), _ = jax.lax.scan(body, zeros, (tokens, keys))
            # Gradients and losses average over micro-batches; statistics stay sums, so the
            # one EMA step below sees the whole batch.
            grads = jax.tree.map(lambda g: g / micro, grads)
            losses = losses / micro
        params = eqx.filter(ts.model, eqx.is_array)
        with jax.numpy_dtype_promotion("standard"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, ts.opt_state, params)
            # How far this step moved the parameters, relative to their size (checked by
            # rtlib.train.finite before the new state can reach a checkpoint).
            update_ratio = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(params),
                                                                  jnp.finfo(jnp.float32).tiny)
        model = eqx.apply_updates(ts.model, updates)
        with jax.numpy_dtype_promotion("standard"):
            param_norm = optax.tree.norm(eqx.filter(model, eqx.is_array))
        routing = model.update_state(ts.routing, stats)
        new = constrain(TrainState(model, routing, opt_state, ts.step + 1,
                                   jax.random.key_data(key)))
        metrics = {"loss": losses[0], "lm_loss": losses[1], "commit_loss": losses[2],
                   "grad_norm": grad_norm, "param_norm": param_norm,
                   "update_ratio": update_ratio, **routing_metrics(stats)}
        return new, metrics

    return step


def init_routing(tokens: Int[Array, "batch row"], ts: TrainState, *,
                 key: PRNGKeyArray, mesh: Mesh | None = None,
                 rules: AxisRules | None = None) -> TrainState:
    """Data-dependent centroid initialisation (`routing.init: kmeans`) from a (global)
    training batch (tokens, or an encoder-decoder's packed pairs); on `mesh` the centroids
    come out replicated on every device."""
    if mesh is None:
        return _init_routing(tokens, ts, key, "")
    with activate(mesh, rules):
        return _init_routing(tokens, ts, key, rules_key(rules or AxisRules()))


@eqx.filter_jit
def _init_routing(tokens, ts, key, layout: str):  # layout: static, see rules_key
    model = ts.model
    if isinstance(model, EncoderDecoder):
        source, source_mask, target, target_mask = split_pairs(tokens, model.source_len)
        routing = model.init_routing(source, target[:, :-1], ts.routing, key=key,
                                     source_mask=source_mask, target_mask=target_mask[:, :-1])
    else:
        routing = model.init_routing(tokens[:, :-1], ts.routing, key=key)
    routing = constrain(routing)
    return eqx.tree_at(lambda t: t.routing, ts, routing)
