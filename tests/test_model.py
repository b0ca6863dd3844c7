"""The model built from specs: purity of the routing state, statistics, variants, scan."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_tree_allclose, max_abs, tree_max_abs
from jax.sharding import PartitionSpec as P

from rtlib import build, kmeans_update, load_spec, next_token_loss, sum_stats

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "specs" / "tiny.yaml"


def tiny(*overrides):
    return load_spec(TINY, list(overrides)).model


def tokens(key, batch=4, n=64):
    return jax.random.randint(key, (batch, n), 0, 256)


@pytest.fixture(scope="module")
def tiny_model():
    return build(tiny(), key=jax.random.key(0))


def test_forward_shapes_and_stats(tiny_model, getkey):
    model, state = tiny_model
    assert not bool(state.initialised)  # tiny.yaml asks for k-means init
    logits, stats = eqx.filter_jit(model)(tokens(getkey()), state)
    assert logits.shape == (4, 64, 256) and logits.dtype == jnp.float32
    (s,) = stats
    assert s.counts.shape == (2, 2, 4) and s.sums.shape == (2, 2, 4, 8)
    # every non-padded token of every routing head of every layer is counted once (shared QK)
    np.testing.assert_array_equal(s.counts.sum((1, 2)), [4 * 64 * 2] * 2)
    assert float(model.aux_loss(stats)) > 0


def test_statistics_compose_over_microbatches_and_shards(tiny_model, getkey):
    """Gradient accumulation and data parallelism: per-part statistics summed equal the
    statistics of the whole batch, so one EMA step on the sum is the global update."""
    model, state = tiny_model
    batch = tokens(getkey(), batch=8)
    fwd = eqx.filter_jit(lambda m, s, t: m(t, s)[1])
    whole = fwd(model, state, batch)
    parts = [fwd(model, state, batch[i : i + 2]) for i in range(0, 8, 2)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *parts)
    summed = sum_stats(stacked)
    np.testing.assert_array_equal(summed[0].counts, whole[0].counts)
    assert_tree_allclose(summed, whole, rtol=1e-5, atol=1e-4)
    one_step = model.update_state(state, summed)
    assert_tree_allclose(one_step, model.update_state(state, whole), rtol=1e-5, atol=1e-6)
    # the update is kmeans_update of every stage with the model's decay and epsilon
    expected = kmeans_update(state.stages[0], whole[0].counts, whole[0].sums,
                             decay=0.999, epsilon=1e-5)
    assert tree_max_abs(model.update_state(state, whole).stages[0], expected) < 1e-6


def test_psum_of_shard_statistics_under_shard_map(tiny_model, getkey):
    model, state = tiny_model
    # Auto axes: jit may reshard the unplaced inputs to the in_specs.
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = tokens(getkey(), batch=8)

    def per_shard(params, t):
        m = eqx.combine(params, static)
        _, stats = m(t, state)
        return jax.tree.map(lambda x: jax.lax.psum(x, "data"), stats)

    params, static = eqx.partition(model, eqx.is_array)
    global_stats = jax.jit(jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=True,
    ))(params, batch)
    whole = eqx.filter_jit(lambda m, t: m(t, state)[1])(model, batch)
    np.testing.assert_array_equal(global_stats[0].counts, whole[0].counts)
    assert_tree_allclose(global_stats, whole, rtol=1e-5, atol=1e-4)


def test_inference_is_deterministic_and_leaves_state_alone(getkey):
    model, state = build(tiny("model.dropout=0.2"), key=getkey())
    before = jax.tree.map(np.asarray, state)
    batch = tokens(getkey(), n=65)
    loss = eqx.filter_jit(lambda m, s, t, k, inf: next_token_loss(m, s, t, key=k, inference=inf)[0],
                          )
    a = loss(model, state, batch, getkey(), True)
    b = loss(model, state, batch, getkey(), True)
    assert float(a) == float(b)
    assert float(loss(model, state, batch, getkey(), False)) != float(a)  # dropout active
    assert tree_max_abs(before, state) == 0.0
    with pytest.raises(ValueError, match="needs a `key`"):
        model(batch[:, :64], state)


def test_init_routing_from_a_batch(tiny_model, getkey):
    model, state = tiny_model
    batch = tokens(getkey())
    new = eqx.filter_jit(model.init_routing)(batch, state, key=getkey())
    assert bool(new.initialised) and not bool(state.initialised)
    assert max_abs(new.stages[0].centroids, state.stages[0].centroids) > 0.1
    np.testing.assert_array_equal(new.stages[0].ema_counts, 1.0)
    # initialised centroids fit this batch better than random ones
    _, s_old = model(batch, state)
    _, s_new = model(batch, new)
    assert float(jnp.sum(s_new[0].commit_loss)) < float(jnp.sum(s_old[0].commit_loss))


def test_causal_assignment_model_logits_ignore_the_future_bit_for_bit(getkey):
    spec = tiny("model.attention.heads.1.assignment=causal", "model.attention.heads.1.window=5",
                "model.attention.heads=[{kind: local, count: 1, window: 16}, {kind: full, "
                "count: 1}, {kind: routing, count: 2, clusters: 4, window: 5, "
                "assignment: causal}]")
    model, state = build(spec, key=getkey())
    fwd = eqx.filter_jit(lambda m, t: m(t, state)[0])
    base_tokens = tokens(getkey(), batch=2)
    base = fwd(model, base_tokens)
    for t in (3, 30, 62):
        changed = jnp.where(jnp.arange(64) > t, tokens(getkey(), batch=2), base_tokens)
        out = fwd(model, changed)
        assert bool(jnp.array_equal(out[:, : t + 1], base[:, : t + 1])), t


VARIANTS = {
    "encoder-postnorm-tied-factorised-learned-unshared-full-remat": [
        "model.kind=encoder", "model.norm=post", "model.embedding={dim: 16, positions: learned, "
        "tied: true}", "model.feed_forward={hidden: 48, activation: geglu, bias: false}",
        "model.attention.heads=[{kind: local, count: 1, window: 16}, {kind: full, count: 1}, "
        "{kind: routing, count: 2, clusters: 4, window: 16, shared_qk: false}]",
        "model.remat=true"],
    "per-layer-mix-causal-l2-selfmask-relu-dropout": [
        "model.attention.layer_heads=[{local: 4}, {local: 2, routing: 2}]",
        "model.attention.heads.1={kind: routing, count: 2, clusters: 4, window: 8, "
        "assignment: causal, norm: l2, self_mask: true, rotary: true}",
        "model.feed_forward.activation=relu", "model.dropout=0.1", "model.n_layers=2"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_variants_run_and_differentiate(name, getkey):
    spec = tiny(*VARIANTS[name])
    model, state = build(spec, key=getkey())
    grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(next_token_loss, has_aux=True))
    (loss, (lm, commit, stats)), grads = grad_fn(model, state, tokens(getkey(), n=65),
                                                 key=getkey())
    assert np.isfinite(float(loss)) and float(commit) > 0
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array))]
    assert all(np.isfinite(norms)) and max(norms) > 0
    if name.startswith("per-layer"):
        assert len(model.stages) == 2 and state.stages[0] is None and stats[0] is None
        assert state.stages[1].centroids.shape == (1, 2, 4, 8)


def test_skip_first_turns_routing_into_local_heads():
    spec = tiny("model.n_layers=3", "model.routing.skip_first=2")
    model, state = build(spec, key=jax.random.key(0))
    assert [c.routing for c in spec.layer_plan()] == [0, 0, 2]
    assert len(model.stages) == 2 and state.stages[0] is None
    assert state.stages[1].centroids.shape[0] == 1


def test_scan_keeps_the_program_size_independent_of_depth():
    sizes = []
    for layers in (2, 6):
        model, state = build(tiny(f"model.n_layers={layers}"), key=jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda m, t: m(t, state))(model, jnp.zeros((1, 64), jnp.int32))
        sizes.append(len(jaxpr.eqns))
    assert sizes[0] == sizes[1]


def test_a_few_adam_steps_lower_the_loss(tiny_model):
    model, state = tiny_model
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 20, np.uint8)
    batch = jnp.asarray(np.stack([text[i : i + 65] for i in range(0, 32, 4)]).astype(np.int32))
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, opt_state):
        (loss, (_, _, stats)), g = eqx.filter_value_and_grad(next_token_loss, has_aux=True)(
            model, state, batch)
        updates, opt_state = opt.update(g, opt_state)
        return eqx.apply_updates(model, updates), model.update_state(state, stats), opt_state, loss

    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts with floats
        for _ in range(15):
            model, state, opt_state, loss = step(model, state, opt_state)
            losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]


def test_sequences_shorter_than_the_windows_run(tiny_model, getkey):
    model, state = tiny_model
    logits, stats = eqx.filter_jit(model)(tokens(getkey(), batch=2, n=10), state)
    assert logits.shape == (2, 10, 256) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_array_equal(stats[0].counts.sum((1, 2)), [2 * 10 * 2] * 2)


@pytest.mark.parametrize("activation,bias,chunk", [("gelu", False, 5), ("relu", True, 3),
                                                   ("geglu", True, 100)])
def test_the_feed_forward_backward_pass_equals_autodiff(activation, bias, chunk, getkey):
    """The lean custom VJP (saves x, recomputes piece by piece along the sequence: 4 pieces of
    2 x 2 tokens for chunk 5, 8 of 2 x 1 for chunk 3, one piece for chunk 100) gives plain
    autodiff's values and gradients."""
    from rtlib.nn.feed_forward import _pieces, activate, mlp

    width = 2 * 16 if activation == "geglu" else 16
    x = jax.random.normal(getkey(), (2, 8, 8))
    w_in, w_out = jax.random.normal(getkey(), (8, width)), jax.random.normal(getkey(), (16, 8))
    b_in = jax.random.normal(getkey(), (width,)) if bias else None
    b_out = jax.random.normal(getkey(), (8,)) if bias else None
    probe = jax.random.normal(getkey(), (2, 8, 8))

    def plain(x, w_in, b_in, w_out, b_out):
        h = x @ w_in + (0 if b_in is None else b_in[None, None])
        return activate(h, activation) @ w_out + (0 if b_out is None else b_out[None, None])

    def loss(f):
        return lambda *args: jnp.sum(f(*args) * probe)

    args = (x, w_in, b_in, w_out, b_out)
    lean = lambda *a: mlp(*a, activation, chunk)
    assert max_abs(lean(*args), plain(*args)) < 1e-5
    argnums = (0, 1, 2, 3, 4) if bias else (0, 1, 3)
    assert_tree_allclose(jax.grad(loss(lean), argnums)(*args),
                         jax.grad(loss(plain), argnums)(*args), rtol=1e-5, atol=1e-4)
    assert [_pieces((2, 8, 8), c) for c in (5, 3, 100, 1)] == [4, 8, 1, 8]
    assert _pieces((3, 7, 8), 4) == 1  # an odd length is not cut
    with pytest.raises(ValueError, match="unknown activation"):
        activate(x, "swish")


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_remat_gives_the_gradients_of_the_plain_backward_pass(assignment, getkey):
    """Remat keeps the routing decisions and the feed-forward input (named residuals) and
    recomputes the rest: the loss, gradients and statistics equal those without remat."""
    x = tokens(getkey(), batch=2, n=64)
    out = []
    for remat in (False, True):
        spec = tiny(f"model.remat={str(remat).lower()}", "model.scan_unroll=1",
                    f"model.attention.heads.1.assignment={assignment}")
        model, routing = build(spec, key=jax.random.key(0))
        (loss, (_, _, stats)), grads = eqx.filter_value_and_grad(
            lambda m: next_token_loss(m, routing, x), has_aux=True)(model)
        out.append((loss, grads, stats))
    (loss, grads, stats), (loss_r, grads_r, stats_r) = out
    assert abs(float(loss) - float(loss_r)) < 1e-6
    assert_tree_allclose(grads_r, grads, rtol=1e-5, atol=1e-6)
    assert_tree_allclose(stats_r, stats, rtol=1e-5, atol=1e-5)
