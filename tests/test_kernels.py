"""Pallas kernels (kernels/): interpret mode against the pure-jnp reference (forward and
gradients), the dispatcher, the model under shard_map, and lowering for real TPU and GPU."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs, tree_max_abs
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from kernels.dispatch import KernelUnavailable, candidates, target_platform
from kernels.grouped_attention import (
    CallShape,
    choose_implementation,
    grouped_attention,
    grouped_attention_reference,
)
from kernels.grouped_attention.reference import grouped_attention_backward, grouped_attention_lse
from rtlib import local_attention, routing_attention
from rtlib.objectives import next_token_loss
from rtlib.parallel import activate, from_global, make_mesh
from rtlib.parallel.rules import batch_sharding
from rtlib.routing import normalize
from rtlib.spec import SpecError, load_spec
from rtlib.train.step import init_sharded

PALLAS = ["pallas_tpu", "pallas_gpu"]


def grouped_inputs(seed, *, g, n, bq, bk, d, dv, segments, dtype=jnp.float32):
    """Random q, k, v with positions laid out block by block and random segments (-1 = key
    never visible)."""
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(g, n, b, d)), dtype) for b in (bq, bk))
    v = jnp.asarray(rng.normal(size=(g, n, bk, dv)), dtype)
    q_pos = jnp.asarray(np.broadcast_to(np.arange(n * bq).reshape(n, bq), (g, n, bq)), jnp.int32)
    # Key positions are distinct within a group, as in every real layout (a token is one key).
    k_pos = jnp.asarray(np.stack([rng.permutation(2 * n * max(bq, bk))[: n * bk]
                                  for _ in range(g)]).reshape(g, n, bk), jnp.int32)
    q_seg = jnp.asarray(rng.integers(0, segments, (g, n, bq)), jnp.int32)
    k_seg = jnp.asarray(rng.integers(-1, segments, (g, n, bk)), jnp.int32)
    return (q, k, v), (q_pos, k_pos, q_seg, k_seg)


def value_and_grads(fn, qkv, ints, ct):
    """((loss, grads), output) in one compiled call."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, *ints).astype(jnp.float32) * ct)  # noqa: E731
    both = jax.jit(lambda *a: (jax.value_and_grad(loss, argnums=(0, 1, 2))(*a), fn(*a, *ints)))
    return both(*qkv)


# Each example compiles three interpret-mode kernels (~5 s): few examples, no shrinking.
@settings(max_examples=4, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate])
@given(
    impl=st.sampled_from(PALLAS),
    n=st.integers(1, 3),
    offsets=st.sampled_from([(0,), (-1, 0), (-1, 0, 1)]),
    causal=st.booleans(),
    span=st.sampled_from([None, 5]),
    self_mask=st.booleans(),
    segments=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(impl, n, offsets, causal, span, self_mask, segments, seed):
    # Triton needs power-of-two tiles >= 16; TPU takes any size (8 and 4 here).
    bq, bk, d = (16, 16, 16) if impl == "pallas_gpu" else (8, 4, 8)
    qkv, ints = grouped_inputs(seed, g=2, n=n, bq=bq, bk=bk, d=d, dv=d, segments=segments)
    kw = dict(offsets=offsets, causal=causal, span=span, self_mask=self_mask, scale=0.3)
    ct = jax.random.normal(jax.random.key(seed), qkv[2].shape[:-2] + (bq, d))
    (val, grads), out = value_and_grads(
        lambda *a: grouped_attention(*a, **kw, implementation=impl, interpret=True), qkv, ints, ct)
    (ref_val, ref_grads), ref_out = value_and_grads(
        lambda *a: grouped_attention_reference(*a, **kw), qkv, ints, ct)
    assert max_abs(out, ref_out) < 1e-5
    assert abs(float(val - ref_val)) < 1e-4
    assert tree_max_abs(grads, ref_grads) < 1e-4


@pytest.mark.parametrize("offsets,causal,span,self_mask", [
    ((0,), True, None, True), ((-1, 0), True, 6, False), ((-1, 0, 1), False, 5, True)])
def test_backward_from_lse_equals_autodiff(offsets, causal, span, self_mask):
    """The jnp backward that the Mosaic GPU kernel uses, from a saved log-sum-exp, against
    autodiff of the plain forward (`grouped_attention_lse` has no custom_vjp; the reference op
    itself runs `masked_attention`, whose backward is the same written-out formulas)."""
    qkv, ints = grouped_inputs(5, g=2, n=3, bq=8, bk=8, d=8, dv=8, segments=2)
    kw = dict(offsets=offsets, causal=causal, span=span, self_mask=self_mask, scale=0.3)
    ct = jax.random.normal(jax.random.key(5), qkv[2].shape)

    @jax.jit
    def both(qkv, ct):
        out, lse = jax.vmap(lambda *a: grouped_attention_lse(*a, **kw))(*qkv, *ints)
        ours = grouped_attention_backward(*qkv, *ints, out, lse, ct, **kw)
        plain = jax.vmap(lambda *a: grouped_attention_lse(*a, **kw)[0])
        _, vjp = jax.vjp(lambda *x: plain(*x, *ints), *qkv)
        return ours, vjp(ct)

    ours, autodiff = both(qkv, ct)
    assert tree_max_abs(ours, autodiff) < 1e-5


def test_mosaic_gpu_kernel_in_gpu_interpret_mode():
    """bf16 64-wide tiles take the Mosaic GPU kernel (wgmma), run by GPU interpret mode."""
    (q, k, v), ints = grouped_inputs(7, g=1, n=2, bq=64, bk=64, d=64, dv=64, segments=2,
                                     dtype=jnp.bfloat16)
    kw = dict(offsets=(-1, 0), causal=True, span=100, self_mask=True, scale=0.125)
    call = CallShape(block_q=64, block_k=64, dim=64, vdim=64, dtype=jnp.dtype(jnp.bfloat16),
                     offsets=(-1, 0), span=100, self_mask=True)
    from kernels.grouped_attention import mosaic_gpu
    assert mosaic_gpu.unsupported(call) is None
    ct = jax.random.normal(jax.random.key(7), v.shape)
    (val, grads), out = value_and_grads(
        lambda *a: grouped_attention(*a, **kw, implementation="pallas_gpu", interpret=True),
        (q, k, v), ints, ct)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    (_, ref_grads), ref_out = value_and_grads(
        lambda *a: grouped_attention_reference(*a, **kw), f32, ints, ct)
    assert max_abs(out, ref_out) < 2e-2  # bf16 output rounding (|out| <= ~3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert max_abs(g, r) < 1e-2 * float(jnp.max(jnp.abs(r)))
    # Under vmap (batch and heads), through balanced routing, against the XLA path.
    rng = np.random.default_rng(8)
    x, vals = (jnp.asarray(rng.normal(size=(2, 128, 2, 64)), jnp.bfloat16) for _ in range(2))
    mu = normalize(jnp.asarray(rng.normal(size=(2, 2, 64)), jnp.float32), "layernorm")
    route = lambda **impl: routing_attention(x, None, vals, mu, window=64, **impl)[0]  # noqa: E731
    assert max_abs(jax.jit(lambda: route(implementation="pallas_gpu", interpret=True))(),
                   route(implementation="xla")) < 3e-2  # bf16 outputs (|out| <= ~3)


def test_bfloat16_kernel_matches_float32_reference():
    qkv, ints = grouped_inputs(3, g=2, n=2, bq=8, bk=8, d=16, dv=16, segments=2,
                               dtype=jnp.bfloat16)
    kw = dict(offsets=(-1, 0), causal=True, span=None, self_mask=False, scale=0.25)
    out = grouped_attention(*qkv, *ints, **kw, implementation="pallas_tpu", interpret=True)
    ref = grouped_attention_reference(*(x.astype(jnp.float32) for x in qkv), *ints, **kw)
    assert out.dtype == jnp.bfloat16
    assert max_abs(out, ref) < 3e-2


ROUTING_CASES = [  # (assignment, causal, shared, self_mask, padded)
    ("balanced", True, True, False, False),
    ("balanced", True, False, False, True),
    ("balanced", False, True, True, True),
    ("causal", True, True, True, True),
    ("causal", False, True, False, False),
]


@pytest.mark.parametrize("assignment,causal,shared,self_mask,padded", ROUTING_CASES)
def test_routing_attention_kernel_matches_xla(assignment, causal, shared, self_mask, padded):
    rng = np.random.default_rng(0)
    b, n, h, d = 2, 29, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    mu = normalize(jnp.asarray(rng.normal(size=(h, 3, d)), jnp.float32), "layernorm")
    mask = jnp.asarray(rng.random((b, n)) > 0.2) if padded else None
    kw = dict(window=8, assignment=assignment, causal=causal, self_mask=self_mask, q_mask=mask,
              kv_mask=mask)
    key = None if shared else k

    def run(q, v, **impl):
        return routing_attention(q, key, v, mu, **kw, **impl)

    def outputs_and_grads(q, v, **impl):
        def loss(q, v):
            out, stats = run(q, v, **impl)
            return jnp.sum(out * v) + stats.commit_loss, (out, stats)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(q, v)

    g_xla, (out_xla, st_xla) = jax.jit(
        lambda q, v: outputs_and_grads(q, v, implementation="xla"))(q, v)
    kernel = jax.jit(lambda q, v: outputs_and_grads(q, v, implementation="pallas_tpu",
                                                    interpret=True))
    g_ker, (out_ker, st_ker) = kernel(q, v)
    assert max_abs(out_ker, out_xla) < 1e-5
    assert tree_max_abs(st_ker, st_xla) == 0.0  # the routing itself does not change
    assert tree_max_abs(g_ker, g_xla) < 1e-5
    if assignment == "causal" and causal:  # still bit-for-bit causal through the kernel
        t = 17
        moved = kernel(q.at[:, t + 1:].multiply(-3.0), v.at[:, t + 1:].set(7.0))[1][0]
        assert np.array_equal(np.asarray(moved[:, : t + 1]), np.asarray(out_ker[:, : t + 1]))


def test_causal_routing_on_tpu_takes_splash_attention():
    """Shared QK, no self-mask, 128 | n: the TPU route is splash attention on the
    cluster-sorted sequence (LocalMask + SegmentIds), in interpret mode here."""
    rng = np.random.default_rng(2)
    q, v = (jnp.asarray(rng.normal(size=(1, 256, 2, 32)), jnp.float32) for _ in range(2))
    mu = normalize(jnp.asarray(rng.normal(size=(2, 4, 32)), jnp.float32), "layernorm")
    kw = dict(window=32, assignment="causal")

    def outputs_and_grads(**impl):
        def loss(q, v):
            out = routing_attention(q, None, v, mu, **kw, **impl)[0]
            return jnp.sum(out * v), out

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(q, v)

    step = lambda q, v: routing_attention(  # noqa: E731
        q, None, v, mu, **kw, implementation="pallas_tpu", interpret=True)[0]
    assert "splash" in str(jax.make_jaxpr(step)(q, v))
    g_ker, out_ker = outputs_and_grads(implementation="pallas_tpu", interpret=True)
    g_xla, out_xla = outputs_and_grads(implementation="xla")
    assert max_abs(out_ker, out_xla) < 1e-5
    assert tree_max_abs(g_ker, g_xla) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_kernel_matches_xla(causal):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 3, 16)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 37)) > 0.2)
    kw = dict(window=8, causal=causal, look_back=1, q_mask=mask, kv_mask=mask)

    def outputs_and_grads(**impl):
        def loss(q, k, v):
            out = local_attention(q, k, v, **kw, **impl)
            return jnp.sum(out * v), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    g_ker, out_ker = outputs_and_grads(implementation="pallas_tpu", interpret=True)
    g_xla, out_xla = outputs_and_grads(implementation="xla")
    assert max_abs(out_ker, out_xla) < 1e-5
    assert tree_max_abs(g_ker, g_xla) < 1e-5


def shape(**kw):
    base = dict(block_q=16, block_k=16, dim=64, vdim=64, dtype=jnp.dtype(jnp.bfloat16),
                offsets=(0,), span=None, self_mask=False, aligned=True)
    return CallShape(**{**base, **kw})


def test_dispatch_by_name_preference_and_backend(caplog):
    assert candidates(None) == ("xla",)  # CPU: no kernel backend by default
    assert choose_implementation(shape(), None) == "xla"
    with pytest.raises(KernelUnavailable, match="on a CPU they run only with interpret=True"):
        choose_implementation(shape(), "pallas_tpu")
    with caplog.at_level(logging.DEBUG, logger="rtlib.kernels"):
        assert choose_implementation(shape(), ["pallas_gpu", "xla"]) == "xla"
    assert "skipping pallas_gpu: its kernels are for cuda; on a CPU" in caplog.text
    caplog.clear()
    with target_platform("tpu"):
        assert candidates(None) == ("pallas_tpu", "xla")
    with target_platform("cuda"):
        assert choose_implementation(shape(), None) == "pallas_gpu"
        assert choose_implementation(shape(), "cudnn") == "cudnn"
    odd = shape(block_q=12, block_k=12, interpret=True)
    with pytest.raises(KernelUnavailable, match="Mosaic GPU: Mosaic GPU tiles are multiples of "
                       "64; got block_q=12, block_k=12; Triton: Triton needs powers of two >= "
                       "16; got block_q=12, block_k=12"):
        choose_implementation(odd, "pallas_gpu")
    with caplog.at_level(logging.DEBUG, logger="rtlib.kernels"):
        assert choose_implementation(odd, ["pallas_gpu", "pallas_tpu"]) == "pallas_tpu"
    assert "skipping pallas_gpu: Mosaic GPU: " in caplog.text
    with target_platform("cuda"), pytest.raises(
            KernelUnavailable, match="cuDNN fused attention takes bfloat16/float16"):
        choose_implementation(shape(dtype=jnp.dtype(jnp.float32)), "cudnn")
    with target_platform("cuda"), pytest.raises(KernelUnavailable, match="self-mask"):
        choose_implementation(shape(self_mask=True), ["cudnn"])
    with pytest.raises(KernelUnavailable, match="VMEM"):
        choose_implementation(shape(block_q=4096, block_k=4096, interpret=True), "pallas_tpu")
    with pytest.raises(ValueError, match="unknown name 'triton'"):
        choose_implementation(shape(), "triton")
    with pytest.raises(ValueError, match="empty sequence"):
        choose_implementation(shape(), [])
    with pytest.raises(ValueError, match="unknown name 'triton'"):
        choose_implementation(shape(), ["xla", "triton"])


def test_dispatch_refuses_kernels_for_another_platform(monkeypatch, caplog):
    import kernels.dispatch

    monkeypatch.setattr(kernels.dispatch, "platform", lambda: "cuda")
    with caplog.at_level(logging.DEBUG, logger="rtlib.kernels"):
        assert choose_implementation(shape(), ["pallas_tpu", "xla"]) == "xla"
    assert "its kernels are for tpu, this is cuda (interpret=False)" in caplog.text
    assert choose_implementation(shape(interpret=True), "pallas_tpu") == "pallas_tpu"
    monkeypatch.setattr(kernels.dispatch, "platform", lambda: "tpu")
    with pytest.raises(KernelUnavailable, match="pallas_gpu: its kernels are for cuda, this is "
                       "tpu.*cudnn: its kernels are for cuda, this is tpu"):
        choose_implementation(shape(), ["pallas_gpu", "cudnn"])


def test_causal_assignment_with_unshared_qk_has_no_kernel():
    q = jnp.ones((1, 8, 1, 8))
    with pytest.raises(KernelUnavailable, match="only the XLA path implements it"):
        routing_attention(q, q * 2, q, jnp.ones((1, 2, 8)), window=4, assignment="causal",
                          implementation="pallas_tpu")


def test_spec_key_selects_the_kernel_under_shard_map():
    """A model with `attention.implementation: pallas_tpu` (interpret mode) on data 4 x
    model 2 gives the 1-device XLA loss and gradients: the kernels run inside shard_map."""
    batch = np.random.default_rng(0).integers(0, 256, (8, 65)).astype(np.int32)
    common = ["model.routing.init=random", "model.n_layers=1",
              "model.attention.heads.0.count=4", "model.attention.heads.1.count=4"]
    results = []
    for extra in (["mesh.data=1"], ["mesh.data=4", "mesh.model=2",
                                     "model.attention.implementation=pallas_tpu",
                                     "model.attention.interpret=true"]):
        spec = load_spec("specs/tiny.yaml", [*common, *extra])
        mesh = make_mesh(spec)
        ts = init_sharded(spec, mesh, key=jax.random.key(0))
        tokens = from_global(batch, batch_sharding(mesh, spec.mesh.rules))
        fn = eqx.filter_jit(eqx.filter_value_and_grad(
            lambda m, r, t: next_token_loss(m, r, t)[0]))
        with activate(mesh, spec.mesh.rules):
            results.append(fn(ts.model, ts.routing, tokens))
    (loss1, g1), (loss8, g8) = results
    assert abs(float(loss8) - float(loss1)) < 1e-5
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    with pytest.raises(SpecError, match="implementation"):
        load_spec("specs/tiny.yaml", ["model.attention.implementation=triton"])
    with pytest.raises(SpecError, match="implementation"):
        load_spec("specs/tiny.yaml", ["model.attention.implementation=[]"])
    spec = load_spec("specs/tiny.yaml", ["model.attention.implementation=[pallas_gpu, xla]"])
    assert spec.model.attention.implementation == ["pallas_gpu", "xla"]


# --- lowering for the real platforms (no device needed) ------------------------------------

def lowered(fn, platform, *args):
    """Export `fn` (value and gradients) for `platform`; returns the StableHLO text."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    unstable = [jax.export.DisabledSafetyCheck.custom_call(t)
                for t in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2", "__cudnn$fmhaSoftmax",
                          "__cudnn$fmhaSoftmaxBackward")]
    with target_platform(platform):  # choose implementations for the platform, not this CPU
        return jax.export.export(step, platforms=[platform], disabled_checks=unstable)(
            *args).mlir_module()


# (implementation, platform, dtype, custom call, kernels in forward + backward)
EXPORTS = [("pallas_tpu", "tpu", jnp.bfloat16, "tpu_custom_call", 3),
           ("pallas_gpu", "cuda", jnp.bfloat16, "mosaic_gpu_v2", 1),  # jnp backward
           ("pallas_gpu", "cuda", jnp.float32, "__gpu$xla.gpu.triton", 3)]


@pytest.mark.parametrize("impl,platform,dtype,marker,kernels", EXPORTS)
def test_kernels_lower_for_their_platform(impl, platform, dtype, marker, kernels):
    (q, k, v), ints = grouped_inputs(0, g=2, n=4, bq=128, bk=128, d=64, dv=64, segments=2,
                                     dtype=dtype)
    kw = dict(offsets=(-1, 0), causal=True, span=128, self_mask=True, scale=0.125,
              implementation=impl)
    text = lowered(lambda q, k, v: grouped_attention(q, k, v, *ints, **kw), platform, q, k, v)
    assert text.count("@" + marker) == kernels
    if dtype != jnp.bfloat16:
        return
    # The model-level paths lower too (balanced and causal routing, local attention).
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    mu = jnp.zeros((2, 4, 64), jnp.float32)
    for assignment in ("balanced", "causal"):
        text = lowered(lambda q, v, a=assignment: routing_attention(
            q, None, v, mu, window=64, assignment=a, implementation=impl)[0], platform, x, x)
        assert text.count("@" + marker) == kernels
    text = lowered(lambda q, k, v: local_attention(q, k, v, window=64, implementation=impl),
                   platform, x, x, x)
    assert text.count("@" + marker) == kernels


def test_cudnn_route_lowers_for_cuda(monkeypatch):
    # cuDNN's version probe needs CUDA libraries; this machine has none, so it is stubbed.
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda cap: True)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda cap: False)
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    mu = jnp.zeros((2, 4, 64), jnp.float32)
    text = lowered(lambda q, v: routing_attention(
        q, None, v, mu, window=64, implementation="cudnn")[0], "cuda", x, x)
    assert "__cudnn$fmhaSoftmax" in text and "__cudnn$fmhaSoftmaxBackward" in text
