"""`rtlib routes`: the clusters and attention rows it shows are the ones the model computes, its
files hold every token once per head, and bad arguments fail with one clear line."""

import contextlib
import functools
import html
import io
import json
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs

from rtlib.cli import main
from rtlib.data.tokenizer import ByteTokenizer
from rtlib.routing import routing_attention, routing_visibility
from rtlib.routing.assign import route_scores
from rtlib.runs.routes import head_routes, layer_inputs, token_labels, trace_routes
from rtlib.spec.load import load_spec
from rtlib.train.loop import train
from rtlib.train.run_dir import load_run, write_spec

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "specs" / "tiny.yaml")
FAST = ["train.steps=2", "train.batch_size=2", "mesh.data=1", "run.sample_tokens=0",
        "run.eval_every=0", "data.eval_tokens=256"]
# HTML-special characters and line breaks, all ASCII so that one byte is one visible label.
TEXT = 'def add(a, b):\n    return a + b  # <sum> & "more"\n' * 3
N, QUERY = 50, 10  # tokens shown (--max-tokens) and the query position


@pytest.fixture(scope="module")
def run(text_store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("routes") / "tiny"
    train(load_spec(TINY, [*FAST, f"data.path={text_store}", f"run.dir={run_dir}"]),
          progress=False, print_fn=lambda *_: None)
    return run_dir


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def shown(run, text, tmp_path_factory) -> tuple[Path, list[str]]:
    """`rtlib routes` once: (output directory, printed lines)."""
    out = tmp_path_factory.mktemp("shown")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["routes", str(run), "--text", str(text), "--out", str(out),
                   "--query", str(QUERY), "--max-tokens", str(N)])
    assert rc == 0
    return out, printed.getvalue().splitlines()


def test_writes_html_png_json_and_a_line_per_head(text, shown):
    out, lines = shown
    assert (out / "routes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f": {N} tokens of {text} (cut from {len(TEXT)}); query at position {QUERY} " \
        in lines[0]
    heads = [line for line in lines if line.startswith("layer ")]
    assert len(heads) == 4  # 2 layers x 2 routing heads
    assert all("clusters are some token's nearest" in h and "in no cluster" in h for h in heads)
    assert lines[-3:] == [f"wrote {out / f}" for f in ("routes.html", "routes.png",
                                                       "routes.json")]

    page = (out / "routes.html").read_text()
    assert all(f">{e}</span>" in page for e in ("&lt;", "&gt;", "&amp;", "&quot;"))  # escaped
    expected = [c.replace("\n", "↵\n") for c in TEXT[:N]]
    sections = page.split("<section")[1:]
    assert len(sections) == 4
    for section in sections:
        texts = re.findall(r'<div class="text">(.*?)</div>', section, flags=re.S)
        assert len(texts) == 2  # clusters, then the query's attention
        for block in texts:
            spans = re.findall(r"<span[^>]*>(.*?)</span>", block, flags=re.S)
            assert [html.unescape(s) for s in spans] == expected


def test_json_and_attention_rows_are_the_models(run, text, shown):
    """Attention rows times the values give each routing head's output as the layer itself
    computes it (`MixedAttention.attend`), memberships agree with the dense reference, the
    manual walk gives the model's logits, and routes.json holds the same numbers."""
    spec, ts, _ = load_run(run)
    tokens = jnp.asarray(ByteTokenizer().encode(TEXT)[:N])
    layers, h = layer_inputs(ts.model, ts.routing, tokens)
    logits, _ = eqx.filter_jit(lambda m, t, s: m(t, s, inference=True))(
        ts.model, tokens[None], ts.routing)
    assert max_abs(ts.model._logits(h), logits) < 1e-5

    routes = trace_routes(ts.model, ts.routing, tokens, jnp.arange(N, dtype=jnp.int32))
    assert [(r.layer, r.head) for r in routes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cfg = spec.model.group("routing")
    attend = eqx.filter_jit(lambda attn, *args: attn.attend(*args)[0])
    for layer in layers:
        attn = layer.attn
        inputs = attn.project(layer.x)
        routing = attn.kinds.index(attn.routing)
        qr, kr, _ = inputs[routing]
        v = jnp.concatenate([vk for _, _, vk in inputs], axis=2)
        first = attn.counts.local + attn.counts.full
        # Only the routing heads' values: the output projection then carries only their part.
        zeroed = tuple(t if i == routing else (t[0], t[1], jnp.zeros_like(t[2]))
                       for i, t in enumerate(inputs))
        want = attend(attn, zeroed, layer.centroids, None)
        mine = [r for r in routes if r.layer == layer.layer]
        heads = jnp.stack([jnp.asarray(r.weights) @ v[0, :, r.slot] for r in mine], axis=1)
        y = jnp.concatenate([jnp.zeros((N, first, v.shape[-1]), v.dtype), heads], axis=1)
        assert max_abs(attn.wo(y.reshape(1, N, -1)), want) < 1e-5
        for r in mine:
            _, _, s_q, s_k = route_scores(qr[0, :, r.head], kr[0, :, r.head],
                                          layer.centroids[r.head], norm=cfg.norm,
                                          shared_qk=cfg.shared_qk)
            valid = jnp.ones((N,), bool)
            member, mask = routing_visibility(s_q, s_k, valid, valid, window=r.window,
                                              assignment=r.assignment, causal=True)
            np.testing.assert_array_equal(r.members, member)
            np.testing.assert_array_equal(r.visible,
                                          jnp.any(member[:, :, None] & mask, axis=0))
            np.testing.assert_array_equal(r.nearest, jnp.argmax(s_q, -1))

    saved = json.loads((shown[0] / "routes.json").read_text())
    assert saved["query"] == QUERY and saved["tokens"] == [int(t) for t in tokens]
    assert saved["labels"] == token_labels(ByteTokenizer(), np.asarray(tokens))
    for r, head in zip(routes, saved["heads"], strict=True):
        assert (head["layer"], head["head"]) == (r.layer, r.head)
        assert head["nearest"] == r.nearest.tolist()
        assert head["members"] == [np.flatnonzero(r.members[:, p]).tolist() for p in range(N)]
        np.testing.assert_allclose(head["attention"], r.weights[QUERY], atol=1e-6)
        assert head["visible"] == np.flatnonzero(r.visible[QUERY]).tolist()
        assert max(head["visible"], default=0) <= QUERY  # a decoder looks back only


@pytest.mark.parametrize("assignment,causal,shared,self_mask", [
    ("balanced", True, True, False), ("balanced", False, False, False),
    ("causal", True, True, True), ("causal", False, False, False)])
def test_rows_reproduce_routing_attention(getkey, assignment, causal, shared, self_mask):
    """Both assignments, decoder and encoder, shared and separate keys, self masking."""
    n, dim, k, window = 24, 8, 3, 5
    q, kk, v = (jax.random.normal(getkey(), (n, dim), jnp.float32) for _ in range(3))
    mu = jax.random.normal(getkey(), (k, dim), jnp.float32)
    q_hat, k_hat, s_q, s_k = route_scores(q, kk, mu, norm="layernorm", shared_qk=shared)
    rows = jax.jit(functools.partial(
        head_routes, window=window, assignment=assignment, causal=causal, scale=dim**-0.5,
        self_mask=self_mask))
    _, _, weights, visible = rows(q_hat, k_hat, s_q, s_k, jnp.arange(n, dtype=jnp.int32))
    attend = jax.jit(functools.partial(routing_attention, window=window, assignment=assignment,
                                       causal=causal, self_mask=self_mask))
    want, _ = attend(q[None, :, None], None if shared else kk[None, :, None], v[None, :, None],
                     mu[None])
    assert max_abs(weights @ v, want[0, :, 0]) < 1e-5
    assert not jnp.any(jnp.where(visible, 0.0, weights))


def _error(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return rc, err[0]


def test_bad_arguments_fail_with_one_line(run, text, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["routes", str(run), "--text", str(text), "--out", out]
    rc, err = _error([*args, "--query", "64"], capsys)
    assert rc == 2 and "--query 64 is out of range" in err and "0-63" in err
    rc, err = _error([*args, "--max-tokens", "8", "--query", "-1"], capsys)
    assert rc == 2 and "0-7" in err
    rc, err = _error([*args, "--max-tokens", "65"], capsys)
    assert rc == 2 and "exceeds the model's seq_len=64" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, err = _error(["routes", str(run), "--text", str(empty), "--out", out], capsys)
    assert rc == 2 and "empty" in err
    rc, err = _error(["routes", str(run), "--text", str(tmp_path / "nope"), "--out", out],
                     capsys)
    assert rc == 2 and "no such file" in err
    rc, err = _error(["routes", str(tmp_path), "--text", str(text), "--out", out], capsys)
    assert rc == 1 and "not a run directory" in err
    # Every routing head turned local: refused from the spec, before any checkpoint is read.
    local = tmp_path / "local"
    local.mkdir()
    write_spec(local, load_spec(TINY, ["model.routing.skip_first=2"]))
    rc, err = _error(["routes", str(local), "--text", str(text), "--out", out], capsys)
    assert rc == 2 and "no routing heads" in err
    assert not (tmp_path / "out").exists()
