"""Routing attention against the oracles of ALGORITHM.md section 7."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs

from rtlib import routing_attention, routing_attention_dense
from rtlib.routing import normalize

B, N, H, D, K = 2, 16, 2, 8, 4
WINDOW = {"balanced": 6, "causal": 3}  # balanced: 24 slots > 16 tokens, so tokens share clusters


def make_inputs(key, n=N, dtype=jnp.float32):
    ks = jax.random.split(key, 5)
    q, k, v = (jax.random.normal(kk, (B, n, H, D)).astype(dtype) for kk in ks[:3])
    mu = normalize(jax.random.normal(ks[3], (H, K, D)), "layernorm")
    return q, k, v, mu


PADDING = jnp.arange(N)[None, :] < jnp.array([[N], [11]])


@pytest.mark.parametrize(
    "assignment,causal,shared,padded",
    list(itertools.product(["balanced", "causal"], [True, False], [True, False], [False, True])),
)
def test_matches_dense_reference(getkey, assignment, causal, shared, padded):
    q, k, v, mu = make_inputs(getkey())
    mask = PADDING if padded else None
    kw = dict(window=WINDOW[assignment], assignment=assignment, causal=causal, q_mask=mask,
              kv_mask=mask, shared_qk=shared)
    ct = jax.random.normal(getkey(), v.shape)

    def loss(fn, q, k, v):
        out = fn(q, q if shared else k, v, mu, **kw)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out * ct), out

    (_, sparse), g_sparse = jax.jit(jax.value_and_grad(
        lambda *a: loss(routing_attention, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, dense), g_dense = jax.jit(jax.value_and_grad(
        lambda *a: loss(routing_attention_dense, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert max_abs(sparse, dense) < 1e-5
    for a, b in zip(g_sparse, g_dense, strict=True):
        assert max_abs(a, b) < 1e-4
    assert float(jnp.abs(sparse).max()) > 0.1  # not trivially zero
    if padded:
        assert float(jnp.abs(sparse[1, 11:]).max()) == 0.0


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_shared_qk_with_distinct_mask_objects_and_options(getkey, assignment):
    """The general path (masks that are different objects) and self_mask / scale / l2 options."""
    q, _, v, mu = make_inputs(getkey())
    q_mask, kv_mask = PADDING, jnp.array(PADDING)
    for opts in [dict(), dict(self_mask=True), dict(logit_scale="none", norm="l2")]:
        kw = dict(window=WINDOW[assignment], assignment=assignment, **opts)

        @jax.jit
        def run(q, v, q_mask, kv_mask):
            general, _ = routing_attention(q, q, v, mu, q_mask=q_mask, kv_mask=kv_mask, **kw)
            fast, _ = routing_attention(q, q, v, mu, q_mask=q_mask, kv_mask=q_mask, **kw)
            explicit, _ = routing_attention(q, None, v, mu, mask=q_mask, **kw)
            ref = routing_attention_dense(q, q, v, mu, q_mask=q_mask, kv_mask=kv_mask, **kw)
            return general, fast, explicit, ref

        general, fast, explicit, ref = run(q, v, q_mask, kv_mask)
        assert max_abs(general, ref) < 1e-5
        assert max_abs(fast, ref) < 1e-5
        assert max_abs(explicit, fast) == 0.0  # `mask=` is the fast path, spelled out
    with pytest.raises(ValueError, match="either mask= .* or q_mask= / kv_mask="):
        routing_attention(q, None, v, mu, window=4, mask=q_mask, kv_mask=kv_mask)


@pytest.mark.parametrize("causal", [True, False])
def test_one_cluster_of_all_tokens_is_full_attention(getkey, causal):
    q, k, v, mu = make_inputs(getkey())
    mu1 = mu[:, :1]

    def ours(q, k, v):
        return routing_attention(q, k, v, mu1, window=N, causal=causal)[0]

    def full(q, k, v):
        qh, kh = normalize(q, "layernorm"), normalize(k, "layernorm")
        return jax.nn.dot_product_attention(qh, kh, v, scale=D**-0.5, is_causal=causal)

    assert max_abs(ours(q, k, v), full(q, k, v)) < 1e-5
    ct = jax.random.normal(getkey(), v.shape)
    g1 = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(lambda *a: jnp.sum(full(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g1, g2, strict=True):
        assert max_abs(a, b) < 1e-4


@pytest.mark.parametrize("shared", [True, False])
def test_causal_assignment_past_outputs_ignore_the_future_bit_for_bit(getkey, shared):
    n = 48
    q, k, v, mu = make_inputs(getkey(), n=n)
    f = jax.jit(lambda q, k, v: routing_attention(q, q if shared else k, v, mu, window=5,
                                                  assignment="causal", shared_qk=shared)[0])
    base = f(q, k, v)
    for t in [0, 7, 23, 46]:
        future = (jnp.arange(n) > t)[None, :, None, None]
        new = [jnp.where(future, jax.random.normal(getkey(), x.shape), x) for x in (q, k, v)]
        changed = f(*new)
        assert bool(jnp.array_equal(base[:, : t + 1], changed[:, : t + 1])), t
        assert not bool(jnp.array_equal(base[:, t + 1 :], changed[:, t + 1 :]))


@pytest.mark.parametrize("causal", [True, False])
def test_causal_assignment_in_blocks_of_a_quarter_window(getkey, causal):
    """From MIN_SPLIT_WINDOW up the XLA path lays clusters out in blocks of W / 4 with several
    key blocks per query block: same values as the oracle, and still bit-exact causality."""
    from rtlib.routing.attention import MIN_SPLIT_WINDOW

    n, window, clusters = 192, MIN_SPLIT_WINDOW, 3
    ks = jax.random.split(getkey(), 5)
    q, v = (jax.random.normal(kk, (1, n, H, D)) for kk in ks[:2])
    mu = normalize(jax.random.normal(ks[2], (H, clusters, D)), "layernorm")
    kw = dict(window=window, assignment="causal", causal=causal)
    f = jax.jit(lambda q, v: routing_attention(q, None, v, mu, **kw)[0])
    base = f(q, v)
    assert max_abs(base, routing_attention_dense(q, None, v, mu, **kw)) < 1e-5
    if causal:
        t = 100
        future = (jnp.arange(n) > t)[None, :, None, None]
        new = [jnp.where(future, jax.random.normal(kk, q.shape), x) for kk, x in zip(ks[3:], (q, v))]
        changed = f(*new)
        assert bool(jnp.array_equal(base[:, : t + 1], changed[:, : t + 1]))
        assert not bool(jnp.array_equal(base[:, t + 1 :], changed[:, t + 1 :]))


@pytest.mark.parametrize("shared", [True, False])
def test_balanced_gradients_from_future_inputs_are_exactly_zero(getkey, shared):
    q, k, v, mu = make_inputs(getkey())
    t = 9

    def past(q, k, v):
        out, _ = routing_attention(q, q if shared else k, v, mu, window=WINDOW["balanced"],
                                   shared_qk=shared)
        return jnp.sum(out[:, : t + 1] ** 2)

    grads = jax.grad(past, argnums=(0, 1, 2))(q, k, v)
    for g in grads[: 3 if not shared else 1] + grads[2:]:
        assert float(jnp.abs(g[:, t + 1 :]).max()) == 0.0
    assert float(jnp.abs(grads[0][:, : t + 1]).max()) > 0.0


def test_statistics_match_a_numpy_transcription(getkey):
    q, k, v, mu = make_inputs(getkey())
    for shared in (True, False):
        _, stats = routing_attention(q, q if shared else k, v, mu, window=4, q_mask=PADDING,
                                     kv_mask=PADDING, shared_qk=shared)
        vecs = [np.asarray(normalize(q, "layernorm"))]
        if not shared:
            vecs.append(np.asarray(normalize(k, "layernorm")))
        valid = np.asarray(PADDING)
        counts = np.zeros((H, K))
        sums = np.zeros((H, K, D))
        err = 0.0
        for x in vecs:
            for b, i, h in itertools.product(range(B), range(N), range(H)):
                if not valid[b, i]:
                    continue
                a = int(np.argmax(x[b, i, h] @ np.asarray(mu[h]).T))
                counts[h, a] += 1
                sums[h, a] += x[b, i, h]
                err += float(np.sum((x[b, i, h] - np.asarray(mu[h, a])) ** 2))
        np.testing.assert_allclose(stats.counts, counts)
        np.testing.assert_allclose(stats.sums, sums, atol=1e-4)
        np.testing.assert_allclose(stats.sq_error, err, rtol=1e-5)
        np.testing.assert_allclose(stats.commit_loss, err / (counts.sum() * D), rtol=1e-5)
        assert float(stats.queries) == valid.sum() * H
        assert 0.0 < float(stats.coverage) <= 1.0


def test_commitment_gradient_reaches_queries_only(getkey):
    q, _, v, mu = make_inputs(getkey())
    g_q, g_mu = jax.grad(
        lambda q, mu: routing_attention(q, q, v, mu, window=4)[1].commit_loss, argnums=(0, 1)
    )(q, mu)
    assert float(jnp.abs(g_q).max()) > 0
    assert float(jnp.abs(g_mu).max()) == 0.0


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_jit_vmap_and_bf16(getkey, assignment):
    q, k, v, mu = make_inputs(getkey())
    kw = dict(window=WINDOW[assignment], assignment=assignment)
    eager, stats = routing_attention(q, k, v, mu, **kw)
    jitted, _ = jax.jit(lambda q, k, v: routing_attention(q, k, v, mu, **kw))(q, k, v)
    assert max_abs(eager, jitted) < 1e-6
    # vmap over an extra leading axis (e.g. micro-batches): per-slice results and summed stats
    stacked = jax.vmap(lambda q, k, v: routing_attention(q, k, v, mu, **kw))(
        q[None], k[None], v[None])
    assert max_abs(stacked[0][0], eager) < 1e-6
    assert max_abs(stacked[1].counts[0], stats.counts) == 0.0
    # bf16 inputs: routed and attended in float32, so the result equals the float32 computation
    # on the same (rounded) inputs up to the rounding of the output.
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out16, stats16 = routing_attention(q16, k16, v16, mu, **kw)
    out32, stats32 = routing_attention(*(x.astype(jnp.float32) for x in (q16, k16, v16)), mu, **kw)
    assert out16.dtype == jnp.bfloat16
    assert stats16.sums.dtype == jnp.float32 and stats16.sq_error.dtype == jnp.float32
    assert max_abs(out16, out32) < 2e-2
    assert max_abs(stats16.counts, stats32.counts) == 0.0


def test_bad_arguments_raise_clear_errors(getkey):
    q, k, v, mu = make_inputs(getkey())
    with pytest.raises(ValueError, match="window must be >= 1"):
        routing_attention(q, k, v, mu, window=0)
    with pytest.raises(ValueError, match="k=None means shared QK"):
        routing_attention(q, None, v, mu, window=4, shared_qk=False)
    # Literal-typed options are rejected by jaxtyping+beartype under test, by us otherwise.
    with pytest.raises((ValueError, TypeError)):
        routing_attention(q, k, v, mu, window=4, assignment="topk")
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's check fires first when enabled
        routing_attention(q, k, v, mu[:1], window=4)
    with pytest.raises(ValueError, match="self_mask"):
        routing_attention(q, k, v, mu, window=4, self_mask=True)
    with pytest.raises((ValueError, TypeError)):
        routing_attention(q, k, v, mu, window=4, norm="rms")


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_window_longer_than_the_sequence_acts_as_the_sequence(getkey, assignment):
    q, _, v, mu = make_inputs(getkey())
    long, _ = routing_attention(q, None, v, mu, window=N + 7, assignment=assignment)
    exact, _ = routing_attention(q, None, v, mu, window=N, assignment=assignment)
    assert max_abs(long, exact) == 0.0


def test_shared_qk_spellings_agree_under_jit(getkey):
    q, _, v, mu = make_inputs(getkey())
    by_none = jax.jit(lambda q, v: routing_attention(q, None, v, mu, window=4))(q, v)
    by_flag = jax.jit(lambda q, k, v: routing_attention(q, k, v, mu, window=4, shared_qk=True))(
        q, jnp.zeros_like(q), v)
    by_identity = routing_attention(q, q, v, mu, window=4)
    for other in (by_flag, by_identity):
        assert max_abs(by_none[0], other[0]) < 1e-6  # jit vs eager rounding only
        assert max_abs(by_none[1].counts, other[1].counts) == 0.0
    assert float(by_none[1].counts.sum()) == B * N * H  # each token counted once, not twice


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_nan_in_padded_rows_cannot_leak(getkey, assignment):
    q, k, v, mu = make_inputs(getkey())
    poisoned = [jnp.where(PADDING[:, :, None, None], x, jnp.nan) for x in (q, k, v)]
    kw = dict(window=WINDOW[assignment], assignment=assignment, q_mask=PADDING, kv_mask=PADDING,
              shared_qk=False)
    out, stats = routing_attention(*poisoned, mu, **kw)
    clean, clean_stats = routing_attention(q, k, v, mu, **kw)
    assert bool(jnp.all(jnp.isfinite(out))) and max_abs(out, clean) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(stats))
    assert max_abs(stats.sums, clean_stats.sums) == 0.0
