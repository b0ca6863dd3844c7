"""Encoders trained by masked-token prediction: BERT's corruption (statistics, validation),
padding honoured end to end, non-causal attention, and `rtlib train / eval / generate` on an
encoder."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtlib.build import build
from rtlib.cli import main
from rtlib.errors import SpecError, StoreError
from rtlib.objectives import bert_corrupt
from rtlib.spec.load import load_spec
from rtlib.spec.schema import MaskedLMSpec
from rtlib.train.start import open_store

ROOT = Path(__file__).resolve().parent.parent
ENCODER = str(ROOT / "specs" / "encoder-tiny.yaml")
# A smaller encoder for the model-level tests: one layer, 16 tokens, random centroids.
SMALL = ["model.seq_len=16", "model.n_layers=1", "model.attention.heads.0.window=8",
         "model.attention.heads.1.window=8", "model.attention.heads.1.clusters=2",
         "model.routing.init=random"]


def test_bert_corruption_has_the_asked_for_statistics():
    mlm = MaskedLMSpec(rate=0.2, replace=0.7, random=0.2, mask_id=256)
    tokens = jax.random.randint(jax.random.key(0), (64, 512), 0, 256)
    mask = jnp.arange(512)[None, :] < jax.random.randint(jax.random.key(1), (64, 1), 100, 513)
    corrupted, chosen = bert_corrupt(tokens, jax.random.key(2), mlm, 257, mask=mask)
    corrupted, chosen, tokens, mask = map(np.asarray, (corrupted, chosen, tokens, mask))
    assert not (chosen & ~mask).any()  # padding is never chosen
    assert (corrupted[~chosen] == tokens[~chosen]).all()  # nor is anything else touched
    assert chosen.sum() / mask.sum() == pytest.approx(0.2, abs=0.01)
    picked, original = corrupted[chosen], tokens[chosen]
    masked = picked == 256
    changed = ~masked & (picked != original)
    assert masked.mean() == pytest.approx(0.7, abs=0.02)
    # a random replacement equals the original 1 time in 256: "changed" undercounts by that
    assert changed.mean() == pytest.approx(0.2 * 255 / 256, abs=0.02)
    assert (picked[~masked] < 256).all()  # random ids are other ids than the mask
    # the same key, the same corruption; another key, another
    again, _ = bert_corrupt(jnp.asarray(tokens), jax.random.key(2), mlm, 257,
                            mask=jnp.asarray(mask))
    other, _ = bert_corrupt(jnp.asarray(tokens), jax.random.key(3), mlm, 257,
                            mask=jnp.asarray(mask))
    assert (np.asarray(again) == corrupted).all() and (np.asarray(other) != corrupted).any()


@pytest.mark.parametrize("overrides, message", [
    (["train.mlm.mask_id=257"], (r"train\.mlm\.mask_id: 257 is not a token id of the model "
                                 r"\(vocab_size=257\)")),
    (["train.mlm.replace=0.9", "train.mlm.random=0.2"],
     r"train\.mlm\.random: replace=0\.9 \+ random=0\.2 exceeds 1"),
    (["train.mlm.rate=0.0"], r"train\.mlm\.rate"),
    (["train.objective=next_token"], (r"train\.objective: 'next_token' does not train a "
                                      r"model\.kind 'encoder': it needs 'mlm'")),
    (["model.kind=decoder"], r"train\.objective: 'mlm' does not train a model\.kind 'decoder'"),
    (["model.attention.heads.0.look_ahead=2", "model.kind=decoder", "train.objective=null"],
     r"model\.attention\.heads\.0\.look_ahead: must be 0"),
])
def test_masked_lm_options_are_validated(overrides, message):
    with pytest.raises(SpecError, match=message):
        load_spec(ENCODER, overrides)


def test_the_mask_id_must_not_be_a_token_of_the_data(text_store):
    spec = load_spec(ENCODER, [f"data.path={text_store}", "train.mlm.mask_id=10"])
    with pytest.raises(StoreError, match=r"train\.mlm\.mask_id=10 is a token of the data .*"
                                         r"ids 0\.\.255.*model\.vocab_size=257 with ids 256"):
        open_store(spec)
    assert load_spec(ENCODER).train.mlm.mask_token(257) == 256


@eqx.filter_jit
def _forward(model, state, tokens, mask):
    return model(tokens, state, mask=mask, inference=True)


@pytest.mark.parametrize("assignment", ["balanced", "causal"])
def test_padded_tokens_change_nothing_and_every_token_sees_both_sides(assignment):
    """The routing-transformer issue 27 check: an encoder's outputs at real positions and its
    routing statistics do not depend on what the padding holds (nor, since padding is never
    chosen, does the masked-LM loss); the mask has an effect; and a token's output depends on
    later tokens (non-causal routing and local heads with look-ahead)."""
    spec = load_spec(ENCODER, [*SMALL, f"model.attention.heads.1.assignment={assignment}"])
    model, state = build(spec, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    mask = jnp.arange(16)[None, :] < jnp.asarray([[16], [9]])
    refill = jnp.where(mask, tokens, jax.random.randint(jax.random.key(2), (2, 16), 0, 256))
    assert (refill != tokens).any()
    (a, sa), (b, sb) = _forward(model, state, tokens, mask), _forward(model, state, refill, mask)
    real = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(a)[real], np.asarray(b)[real])
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    unmasked, _ = _forward(model, state, refill, jnp.ones_like(mask))
    assert np.abs(np.asarray(unmasked)[1, :9] - np.asarray(b)[1, :9]).max() > 1e-4
    later = tokens.at[0, 12].set((tokens[0, 12] + 1) % 256)  # a token after position 3
    c, _ = _forward(model, state, later, mask)
    assert np.abs(np.asarray(c)[0, 3] - np.asarray(a)[0, 3]).max() > 1e-6


def test_an_encoder_trains_evaluates_and_does_not_generate(text_store, tmp_path, capsys):
    run = tmp_path / "encoder"
    common = [*SMALL, f"data.path={text_store}", "train.batch_size=8", "train.steps=40",
              "train.warmup_steps=2", "run.log_every=1", "run.eval_every=40",
              "run.checkpoint_every=0", "data.eval_tokens=512"]
    assert main(["train", ENCODER, *common, f"run.dir={run}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bits/masked byte, masked accuracy" in out and "sample" not in out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    valid = [r for r in lines if r.get("split") == "valid"]
    assert len(valid) == 1 and valid[0]["tokens"] > 0
    assert 0 < valid[0]["masked_accuracy"] < 1 and valid[0]["masked_bits"] < 8
    # the corruption is seeded: `rtlib eval` scores the split as the training run did
    assert main(["eval", str(run), "--max-tokens", "512", "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert {"masked_nll", "masked_bits", "masked_accuracy"} <= scored.keys()
    assert scored["masked_nll"] == pytest.approx(valid[0]["masked_nll"], rel=1e-5)
    assert scored["tokens"] == valid[0]["tokens"]
    assert main(["generate", str(run), "--prompt", "def "]) == 2
    assert "an encoder (masked-LM) run does not generate" in capsys.readouterr().err
