"""`rtlib data synth`: the synthetic long-range tasks, checked against an independent reading
of each example, their stores (determinism, answer masks, example-aligned windows), the answer
metrics of `rtlib eval`, training on answers only, and the errors for bad options."""

import json

import numpy as np
import pytest

from rtlib.cli import main
from rtlib.data.pipeline import eval_batches, train_dataset
from rtlib.data.store import StoreError, TokenStore
from rtlib.data.synth import SynthOptions, generate, synth

SMALL = dict(length=64, pairs=4, span=8, min_gap=16, train=24, valid=6, test=6)


def test_recall_answers_are_the_values_paired_with_each_queried_key():
    o = SynthOptions(**SMALL)
    tokens, answers = generate("recall", o, 50, np.random.default_rng(0))
    for row, ans in zip(tokens, answers, strict=True):
        pairs = {}
        for i in range(1, 1 + 2 * o.pairs, 2):
            pairs[row[i]] = (row[i + 1], i)
        assert len(pairs) == o.pairs  # distinct keys
        where = np.flatnonzero(ans)
        assert len(where) == o.pairs
        for pos in where:
            value, at = pairs[row[pos - 1]]  # the query key precedes its answer
            assert row[pos] == value
            assert pos - 1 - at >= o.length - 1 - 4 * o.pairs + 2 - 1  # beyond the filler gap
        # keys and values appear nowhere else: the filler only distracts
        assert np.isin(row[1 + 2 * o.pairs:o.length - 2 * o.pairs], list(pairs)).sum() == 0


def test_copy_answers_follow_the_previous_occurrence_of_the_current_token():
    o = SynthOptions(**SMALL)
    tokens, answers = generate("copy", o, 50, np.random.default_rng(1))
    offsets = set()
    for row, ans in zip(tokens, answers, strict=True):
        where = np.flatnonzero(ans)
        assert len(where) == o.span - 1
        for pos in where:
            earlier = np.flatnonzero(row[:pos - 1] == row[pos - 1])
            assert len(earlier) == 1  # span tokens are distinct and unlike the filler
            assert row[earlier[0] + 1] == row[pos]
            assert pos - earlier[0] >= o.min_gap + o.span + 1
            offsets.add(pos - earlier[0])
    assert len(offsets) > 5  # the distance varies: no fixed offset solves it


def test_synth_store_is_seeded_and_splits_are_independent(tmp_path):
    a = synth("recall", str(tmp_path / "a"), SynthOptions(**SMALL), progress=False)
    b = synth("recall", str(tmp_path / "b"), SynthOptions(**{**SMALL, "train": 40}),
              progress=False)
    sa, sb = TokenStore.open(str(tmp_path / "a")), TokenStore.open(str(tmp_path / "b"))
    for split in ("valid", "test"):
        n = sa.num_tokens(split)
        np.testing.assert_array_equal(sa.read(split, 0, n), sb.read(split, 0, n))
        np.testing.assert_array_equal(sa.read_answers(split, 0, n), sb.read_answers(split, 0, n))
    assert a["example_tokens"] == 64 and a["splits"]["valid"]["answers"] == 6 * 4
    assert sa.tokenizer.decode(sa.read("train", 0, 3)).startswith("<bos> k")
    # the same task and options again: kept; other options need --force
    assert synth("recall", str(tmp_path / "a"), SynthOptions(**SMALL), progress=False) == a
    with pytest.raises(StoreError, match="--force"):
        synth("recall", str(tmp_path / "a"), SynthOptions(**{**SMALL, "seed": 1}),
              progress=False)


def test_windows_start_on_example_boundaries(tmp_path):
    synth("copy", str(tmp_path / "s"), SynthOptions(**SMALL), progress=False)
    store = TokenStore.open(str(tmp_path / "s"))
    bos = store.tokenizer.first("bos")
    batches = train_dataset(store, "train", seq_len=63, batch_size=4, seed=0, answers=True)
    for i in range(3):
        batch = batches[i]
        assert batch.shape == (4, 2, 64)
        assert (batch[:, 0, 0] == bos).all() and batch[:, 1].sum() == 4 * (SMALL["span"] - 1)
    rows = 0
    for tokens, mask, answers in eval_batches(store, "valid", seq_len=100, batch_size=4):
        real = mask.any(axis=1)
        assert (tokens[real, 0] == bos).all() and (mask.sum(axis=1)[real] == 64).all()
        assert answers.sum() == real.sum() * (SMALL["span"] - 1)
        rows += int(real.sum())
    assert rows == SMALL["valid"]
    with pytest.raises(StoreError, match="model.seq_len >= 63"):
        next(eval_batches(store, "valid", seq_len=32, batch_size=4))


@pytest.mark.parametrize("args, message", [
    (["recall", "--pairs", "20", "--keys", "10"], "--pairs 20 needs at least as many --keys"),
    (["recall", "--length", "20", "--pairs", "8"], "leaves no filler"),
    (["copy", "--span", "40", "--length", "60"], "cannot hold"),
    (["recall", "--keys", "200", "--values", "100"], "does not fit"),
    (["recall", "--train", "0"], "--train must be >= 1"),
])
def test_bad_synth_options_are_one_clear_line(tmp_path, capsys, args, message):
    assert main(["data", "synth", args[0], str(tmp_path / "s"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_training_on_answers_and_the_answer_metrics(tmp_path, capsys, text_store):
    import jax.numpy as jnp

    from rtlib.train.run_dir import load_run

    store = str(tmp_path / "recall")
    assert main(["data", "synth", "recall", store, *[f"--{k.replace('_', '-')}={v}" for k, v
                                                      in SMALL.items()]]) == 0
    run = tmp_path / "run"
    args = ["train", "specs/tiny.yaml", "train.steps=4", "train.batch_size=4",
            "train.loss_on=answers", "run.eval_every=2", "run.log_every=1",
            "data.eval_tokens=4096", "mesh.data=1", f"data.path={store}", f"run.dir={run}", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no sample" in out and "answer accuracy" in out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x.get("split") == "valid"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all({"answer_accuracy", "answer_nll", "bits_per_token"} <= e.keys() and
               "bits_per_byte" not in e for e in evals)
    assert main(["eval", str(run), "--split", "test"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answers"] == SMALL["test"] * SMALL["pairs"]
    # the same figures from the model's logits, computed here
    spec, ts, _ = load_run(run)
    st = TokenStore.open(store)
    n = st.num_tokens("test")
    # as evaluation lays them out: one example per window of seq_len + 1, padding masked
    tokens = np.pad(st.read("test", 0, n).reshape(-1, 64), ((0, 0), (0, 1)))
    answers = np.pad(st.read_answers("test", 0, n).reshape(-1, 64), ((0, 0), (0, 1)))[:, 1:]
    mask = jnp.asarray(np.arange(65) < 64)[None].repeat(len(tokens), 0)
    tokens = jnp.asarray(tokens)
    logits, _ = ts.model(tokens[:, :-1], ts.routing, mask=mask[:, :-1], inference=True)
    logp = np.asarray(logits - jnp.max(logits, -1, keepdims=True), np.float64)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.asarray(tokens[:, 1:])
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    np.testing.assert_allclose(got["answer_nll"], nll[answers].mean(), rtol=1e-4)
    hit = (np.asarray(jnp.argmax(logits, -1)) == target)[answers].mean()
    np.testing.assert_allclose(got["answer_accuracy"], hit, atol=1e-6)
    # answers only on a store without answers: one clear line
    assert main([*args[:-3], f"data.path={text_store}", f"run.dir={tmp_path / 'r2'}",
                 "--no-progress"]) == 1
    assert "has no answer mask" in capsys.readouterr().err
