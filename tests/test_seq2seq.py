"""Encoder-decoders: the spec, cached decoding against the full forward pass, paired stores
(`data prepare --paired`, `data synth reverse`), `rtlib train / eval / generate --source`, and
training on a mesh of 8 fake devices against one (both new model kinds)."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_max_abs

from rtlib.build import build
from rtlib.cli import main
from rtlib.data.paired import (
    PairedStore,
    ReverseOptions,
    pack_pairs,
    prepare_pairs,
    synth_reverse,
)
from rtlib.data.prepare import assign_splits
from rtlib.errors import SourceError, SpecError, StoreError
from rtlib.objectives import seq2seq_loss, split_pairs
from rtlib.parallel import from_global, make_mesh
from rtlib.parallel.rules import batch_sharding
from rtlib.runs.sample import Sampling
from rtlib.runs.seq2seq import translate
from rtlib.spec.load import load_spec
from rtlib.train.run_dir import load_run
from rtlib.train.step import abstract_state, init_sharded, train_step_for

ROOT = Path(__file__).resolve().parent.parent
SEQ2SEQ = str(ROOT / "specs" / "seq2seq-tiny.yaml")
ENCODER = str(ROOT / "specs" / "encoder-tiny.yaml")
# A smaller encoder-decoder: one layer per stack, 8 source and 8 decoder positions.
SMALL = ["model.seq_len=8", "model.d_model=32", "model.n_layers=1", "model.decoder.seq_len=8",
         "model.decoder.n_layers=1", "model.feed_forward.hidden=64",
         "model.attention.heads.1.window=8", "model.decoder.attention.heads.0.window=8",
         "model.decoder.attention.heads.1.window=8", "model.routing.init=random"]


@pytest.fixture(scope="module")
def reverse_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reverse") / "store")
    # no validation split: training runs no evaluation of its own (one compilation fewer)
    synth_reverse(out, ReverseOptions(chars=6, train=512, valid=0, test=24), progress=False)
    return out


@pytest.mark.parametrize("overrides, message", [
    (["model.decoder=null"], r"model\.decoder: `kind: encoder_decoder` needs a `decoder`"),
    (["model.kind=decoder"], r"model\.decoder: only `kind: encoder_decoder` has a decoder"),
    (["model.decoder.end_id=258"], r"model\.decoder\.end_id: 258 is not a token id"),
    (["model.decoder.end_id=256"], r"model\.decoder\.end_id: equals start_id=256"),
    (["model.decoder.seq_len=20"],
     (r"model\.decoder\.attention\.heads\.0\.window: seq_len=20 is not a multiple of the "
      r"local window 16")),
    (["model.decoder.attention.heads.0.look_ahead=1"],
     r"model\.decoder\.attention\.heads\.0\.look_ahead: must be 0"),
    (["model.decoder.cross_attention.heads=3"], (r"model\.decoder\.cross_attention\.heads: "
                                                 r"d_model=64 is not divisible by 3 heads")),
    (["train.objective=mlm"], (r"train\.objective: 'mlm' does not train a model\.kind "
                               r"'encoder_decoder': it needs 'seq2seq'")),
    (["mesh.model=4"], r"mesh\.model: 2 full heads per layer do not split over mesh\.model=4"),
])
def test_the_spec_names_what_is_wrong(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(SEQ2SEQ, overrides)


def test_cached_decoding_matches_the_full_forward_pass():
    """Local and causal-routing self-attention, cross-attention from the cache (the source
    encoded once, padding masked), against teacher forcing over the whole target."""
    spec = load_spec(SEQ2SEQ, [*SMALL, "model.decoder.attention.heads.1.assignment=causal"])
    model, state = build(spec, key=jax.random.key(0))
    source = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    target = jax.random.randint(jax.random.key(2), (2, 8), 0, 256).at[:, 0].set(256)
    source_mask = jnp.arange(8)[None, :] < jnp.asarray([[8], [5]])
    forward = eqx.filter_jit(lambda m, s: m(s, target, state, source_mask=source_mask,
                                            inference=True)[0])
    full = forward(model, source)
    logits, cache = model.start(source, state, capacity=8, source_mask=source_mask)
    steps = [logits]
    decode = eqx.filter_jit(lambda m, t, c: m.decode(t, state, c))
    for i in range(1, 8):
        logits, cache = decode(model, target[:, i], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5, rtol=1e-5)
    # the padded source positions are never read
    again = forward(model, jnp.where(source_mask, source, 7))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(full))


def test_a_paired_jsonl_is_split_like_documents_and_its_halves_stay_aligned(tmp_path, capsys):
    lines = [json.dumps({"src": f"example {i}", "tgt": f"EXAMPLE {i}!", "n": i})
             for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[:25]) + "\n\n" +
                                          "\n".join(lines[25:]) + "\n")
    out = str(tmp_path / "store")
    args = ["data", "prepare", str(tmp_path / "pairs.jsonl"), out, "--paired", "--source-key",
            "src", "--target-key", "tgt", "--valid", "0.1", "--test", "0.1"]
    assert main(args) == 0
    assert "paired store, byte-level; train 32 examples" in capsys.readouterr().out
    store = PairedStore.open(out)
    ids = [f"pairs.jsonl:{n}" for n in [*range(1, 26), *range(27, 42)]]  # line 26 is empty
    chosen = assign_splits(ids, valid=0.1, test=0.1, seed=0)
    for split, indices in chosen.items():
        assert store.examples(split) == len(indices)
        for k, i in enumerate(indices):
            source, target = (bytes(x.astype(np.uint8)) for x in store.pair(split, k))
            assert source == f"example {i}".encode() and target == f"EXAMPLE {i}!".encode()
    assert main(args) == 0 and "already made from this source" in capsys.readouterr().out
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[:30]) + "\n")
    assert main(args) == 1 and "pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert PairedStore.open(out).manifest["source"]["examples"] == 30
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"src": "a", "tgt": 3}))
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: 'tgt' must be a string, got int"):
        prepare_pairs(str(tmp_path / "bad.jsonl"), str(tmp_path / "bad"), source_key="src",
                      target_key="tgt", progress=False)
    with pytest.raises(SourceError, match=r"'source' must be a string, got nothing \(keys: "
                                          r"'src', 'tgt', 'n'; choose others with --source-key"):
        prepare_pairs(str(tmp_path / "pairs.jsonl"), str(tmp_path / "bad"), progress=False)
    with pytest.raises(StoreError, match="not a paired store"):
        PairedStore.open(str(tmp_path / "store" / "source"))
    # a half replaced on its own is refused
    synth_reverse(str(tmp_path / "other"), ReverseOptions(train=40, valid=0, test=0),
                  progress=False)
    (tmp_path / "store" / "target").rename(tmp_path / "old-target")
    (tmp_path / "other" / "target").rename(tmp_path / "store" / "target")
    with pytest.raises(StoreError, match="its target half is not the one written with it"):
        PairedStore.open(out)


def test_synth_reverse_pairs_lines_with_their_reversal(reverse_store, tmp_path, capsys):
    store = PairedStore.open(reverse_store)
    assert [store.examples(s) for s in ("train", "test")] == [512, 24]
    assert "valid" not in store.manifest["splits"]
    lengths = set()
    for split in ("train", "test"):
        for i in range(store.examples(split)):
            source, target = store.pair(split, i)
            assert (target == source[::-1]).all() and source.size
            assert set(bytes(source.astype(np.uint8))) <= set(b"abcdefghijklmnopqrstuvwxyz")
            lengths.add(source.size)
    assert lengths == set(range(1, 7))
    # seeded: the same store again; each split has its own stream
    out = str(tmp_path / "again")
    assert main(["data", "synth", "reverse", out, "--chars", "6", "--train", "512", "--valid",
                 "0", "--test", "24"]) == 0
    assert PairedStore.open(out).manifest["source"] == store.manifest["source"]
    assert main(["data", "synth", "reverse", out, "--chars", "0"]) == 2
    assert "--chars must be >= 1, got 0" in capsys.readouterr().err
    rows = pack_pairs([store.pair("test", 0)], source_len=8, seq_len=8, start_id=256,
                      end_id=257)
    source, source_mask, target, target_mask = map(np.asarray, split_pairs(jnp.asarray(rows), 8))
    n = int(source_mask.sum())
    assert target[0, 0] == 256 and target[0, n + 1] == 257 and target_mask.sum() == n + 2
    assert (target[0, 1:n + 1] == source[0, :n][::-1]).all()


def test_train_eval_and_generate_an_encoder_decoder(reverse_store, text_store, tmp_path,
                                                     capsys):
    run = tmp_path / "run"
    args = ["train", SEQ2SEQ, *SMALL, f"data.path={reverse_store}", f"run.dir={run}",
            "train.steps=40", "train.batch_size=16", "train.warmup_steps=5",
            "run.log_every=1", "run.eval_every=0", "run.checkpoint_every=0",
            "run.sample_prompt=abc", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no validation tokens" in out and "sample (greedy target of 'abc')" in out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0
    assert main(["eval", str(run), "--split", "test", "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["examples"] == 24 and scored["tokens"] == PairedStore.open(
        reverse_store).num_tokens("test")
    # batched greedy decoding (eval) agrees with decoding one source at a time (generate)
    _, ts, _ = load_run(run)
    store = PairedStore.open(reverse_store)
    right = 0
    for i in range(store.examples("test")):
        source, target = store.pair("test", i)
        got = translate(ts.model, ts.routing, source, sampling=Sampling(0.0),
                        key=jax.random.key(0), vocab_limit=256)
        right += np.array_equal(got, target)
    assert scored["exact_match"] == right / 24
    assert main(["generate", str(run), "--source", "abc", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.strip()
    assert len(text) <= 7 and set(text) <= set("abcdefghijklmnopqrstuvwxyz")
    assert main(["generate", str(run), "--prompt", "abc"]) == 2
    assert "give --source TEXT" in capsys.readouterr().err
    assert main(["generate", str(run), "--source", "x" * 9]) == 2
    assert "the model reads at most model.seq_len=8" in capsys.readouterr().err
    assert main(["train", SEQ2SEQ, *SMALL, f"data.path={text_store}",
                 f"run.dir={tmp_path / 'wrong'}"]) == 1
    assert "a token store, not a paired store" in capsys.readouterr().err


def _steps(spec_path, overrides, batch, start=None, steps=2):
    """(losses, first state, final state) of `steps` training steps on the spec's mesh, from
    `start` laid out by the spec's rules (default: the spec's initial state)."""
    spec = load_spec(spec_path, overrides)
    mesh = make_mesh(spec)
    if start is None:
        ts = init_sharded(spec, mesh, key=jax.random.key(0))
    else:  # the same values (they do not depend on the mesh), one compilation fewer
        ts = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), start,
                          abstract_state(spec, mesh))
    first = jax.tree.map(np.asarray, ts)  # the step donates (deletes) its input
    step = train_step_for(spec, mesh)
    tokens = from_global(batch, batch_sharding(mesh, spec.mesh.rules))
    losses = []
    for _ in range(steps):
        ts, metrics = step(tokens, ts)
        losses.append(float(metrics["loss"]))
    return losses, first, ts


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_both_kinds_train_on_eight_devices_as_on_one(kind):
    rng = np.random.default_rng(0)
    if kind == "encoder":
        path, small = ENCODER, ["model.seq_len=16", "model.n_layers=1",
                                "model.attention.heads.0.window=8",
                                "model.attention.heads.1.window=8",
                                "model.routing.init=random"]
        batch = rng.integers(0, 256, (8, 17)).astype(np.int32)
    else:
        # full decoder heads: the decoder's head kinds are tested on meshes as decoders
        path, small = SEQ2SEQ, [*SMALL, "model.decoder.attention.heads=[{kind: full, count: 4}]"]
        pairs = [(rng.integers(97, 123, n), rng.integers(97, 123, n)) for n in (3, 8, 5, 1) * 2]
        batch = pack_pairs(pairs, source_len=8, seq_len=8, start_id=256, end_id=257)
    common = [*small, "train.batch_size=8", "train.warmup_steps=1", "train.schedule=constant"]
    one, start, ts1 = _steps(path, [*common, "mesh.data=1"], batch)
    many, _, ts8 = _steps(path, [*common, "mesh.data=4", "mesh.model=2"], batch,
                          start=start)
    np.testing.assert_allclose(many, one, rtol=2e-5)
    host = [jax.tree.map(np.asarray, eqx.filter(ts, eqx.is_array)) for ts in (ts8, ts1)]
    assert tree_max_abs(*host) < 1e-4
    centroids = [s.centroids for s in ts8.routing.stages if s is not None]
    assert centroids and all(c.sharding.is_fully_replicated for c in centroids)
    if kind == "encoder_decoder":  # teacher forcing: the loss is only on real target tokens
        model, routing = ts1.model, ts1.routing
        assert float(seq2seq_loss(model, routing, jnp.asarray(batch))[1][0]) > 0


def test_only_encoder_decoder_blocks_carry_cross_attention():
    """A decoder's parameter tree is the one checkpoints were written with before
    encoder-decoders existed (orbax refuses a restore whose tree has extra fields, even None):
    no block field for cross-attention there; the decoder stack of an encoder-decoder has it."""
    def paths(model):
        arrays = eqx.filter(model, eqx.is_array)
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            arrays, is_leaf=lambda x: x is None)[0]]

    decoder = eqx.filter_eval_shape(lambda: build(load_spec(str(ROOT / "specs" / "tiny.yaml")),
                                                  key=jax.random.key(0))[0])
    assert not [p for p in paths(decoder) if "cross" in p]
    seq2seq = eqx.filter_eval_shape(lambda: build(load_spec(SEQ2SEQ, SMALL),
                                                  key=jax.random.key(0))[0])
    assert [p for p in paths(seq2seq) if ".cross." in p]
