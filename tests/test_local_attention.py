"""Local and full attention heads against jax.nn.dot_product_attention with explicit masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs

from rtlib import full_attention, local_attention

B, N, H, D = 2, 24, 2, 8
LENGTHS = np.array([N, 17])


def blocked_mask(n, block, look_back, look_ahead, causal, kv_valid):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    near = (j // block >= i // block - look_back) & (j // block <= i // block + look_ahead)
    mask = near & ((j <= i) if causal else True)
    return mask[None, None] & kv_valid[:, None, None, :]  # [B, 1, n, n]


def reference(q, k, v, mask, q_valid):
    out = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
    return jnp.where(jnp.asarray(q_valid)[:, :, None, None], out, 0.0)


@pytest.mark.parametrize(
    "window,look_back,look_ahead,causal,padded",
    [(8, 1, 0, True, False), (8, 1, 0, True, True), (6, 2, 0, True, True),
     (8, 1, 1, False, False), (8, 1, 1, False, True), (5, 1, 0, True, False)],
)
def test_local_attention_matches_masked_dense(getkey, window, look_back, look_ahead, causal, padded):
    q, k, v = (jax.random.normal(getkey(), (B, N, H, D)) for _ in range(3))
    valid = np.arange(N)[None] < (LENGTHS if padded else np.array([N, N]))[:, None]
    mask = jnp.asarray(valid) if padded else None
    kw = dict(window=window, causal=causal, look_back=look_back, look_ahead=look_ahead,
              q_mask=mask, kv_mask=mask)
    ours = jax.jit(lambda q, k, v: local_attention(q, k, v, **kw))
    ref_mask = blocked_mask(N, window, look_back, look_ahead, causal, valid)
    assert max_abs(ours(q, k, v), reference(q, k, v, ref_mask, valid)) < 1e-5
    ct = jax.random.normal(getkey(), v.shape)
    g1 = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: jnp.sum(reference(*a, ref_mask, valid) * ct), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2, strict=True):
        assert max_abs(a, b) < 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_matches_dot_product_attention(getkey, causal):
    q, k, v = (jax.random.normal(getkey(), (B, N, H, D)) for _ in range(3))
    ours = full_attention(q, k, v, causal=causal)
    assert max_abs(ours, jax.nn.dot_product_attention(q, k, v, is_causal=causal)) < 1e-5


def test_local_attention_rejects_look_ahead_when_causal(getkey):
    q = jax.random.normal(getkey(), (B, N, H, D))
    with pytest.raises(ValueError, match="look_ahead must be 0"):
        local_attention(q, q, q, window=8, causal=True, look_ahead=1)


def test_local_attention_vmap_and_bf16(getkey):
    q, k, v = (jax.random.normal(getkey(), (B, N, H, D)) for _ in range(3))
    f = jax.jit(lambda q, k, v: local_attention(q, k, v, window=8))
    stacked = jax.vmap(f)(q[None], k[None], v[None])[0]
    assert max_abs(stacked, f(q, k, v)) < 1e-6
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = f(*low)
    assert out.dtype == jnp.bfloat16
    assert max_abs(out, f(*(x.astype(jnp.float32) for x in low))) < 2e-2


def _autodiff_attention(q, k, v, mask, is_self, scale):
    """The plain formula, differentiated by JAX: the reference for the hand-written backward."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k) * scale
    logits = jnp.where(is_self, -5e4, logits)
    logits = jnp.where(mask, logits, -1e30)
    weights = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(
        jnp.max(logits, axis=-1, keepdims=True))), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.einsum("...qk,...kd->...qd", weights, v) / jnp.where(denom > 0, denom, 1.0)


def test_masked_attention_backward_matches_autodiff(getkey):
    """A broadcast mask, self logits, and a query row with no visible key (zero output, zero
    gradient)."""
    from rtlib.attention.core import masked_attention

    q = jax.random.normal(getkey(), (2, 5, 4))
    k = jax.random.normal(getkey(), (2, 7, 4))
    v = jax.random.normal(getkey(), (2, 7, 3))
    ct = jax.random.normal(getkey(), (2, 5, 3))
    mask = jax.random.bernoulli(getkey(), 0.6, (1, 5, 7)).at[0, 2].set(False)
    is_self = jax.random.bernoulli(getkey(), 0.2, (2, 5, 7))

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v) * ct)

    ours = lambda q, k, v: masked_attention(q, k, v, mask, scale=0.5, is_self=is_self)  # noqa: E731
    ref = lambda q, k, v: _autodiff_attention(q, k, v, mask, is_self, 0.5)  # noqa: E731
    assert max_abs(ours(q, k, v), ref(q, k, v)) < 1e-6
    assert float(jnp.max(jnp.abs(ours(q, k, v)[:, 2]))) == 0.0
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert a.shape == b.shape
        assert max_abs(a, b) < 1e-5
    assert float(jnp.max(jnp.abs(g_ours[0][:, 2]))) == 0.0
