"""Text tokenizers as a property of the store (issue 15): trained (BPE, unigram, word-level) or
given as files (tokenizer.json, sentencepiece .model), saved in the store; bits per byte that
compare across tokenizers; `model.vocab_size: auto` and the refusals; the paper text specs,
shrunk, trained end to end on such stores; TensorBoard event files."""

import io
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from rtlib.cli import main
from rtlib.data.prepare import prepare
from rtlib.data.store import MANIFEST, StoreError, TokenStore
from rtlib.errors import SpecError
from rtlib.spec.load import load_spec
from rtlib.train.start import open_store

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat and dog ran to big red house café naïve 東京 über".split()
SPLIT = {"valid": 0.2, "test": 0.2, "progress": False}
TRAINED = {"bytes": {}, "bpe": {"train_tokenizer": "bpe", "vocab_size": 300},
           "unigram": {"train_tokenizer": "unigram", "vocab_size": 40},
           "word": {"train_tokenizer": "word", "vocab_size": 30}}


def known_texts(n: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, 120)) + ".\n" + "  ".join(rng.choice(WORDS, 30)) + "\n"
            for _ in range(n)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """One known text (JSON Lines) prepared with bytes and with each trained tokenizer."""
    root = tmp_path_factory.mktemp("tok")
    (root / "known.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                              for t in known_texts()))
    out = {}
    for name, kw in TRAINED.items():
        out[name] = str(root / name)
        prepare(str(root / "known.jsonl"), out[name], **SPLIT, **kw)
    out["source"] = str(root / "known.jsonl")
    return out


def documents(store: TokenStore, split: str) -> list[np.ndarray]:
    info = store.manifest["splits"][split]
    tokens = store.read(split, 0, info["tokens"])
    return np.split(tokens, info["boundaries"][1:])


def test_every_tokenizer_stores_the_same_text_and_byte_counts(stores):
    byte = TokenStore.open(stores["bytes"])
    assert byte.manifest["tokenizer"] == {"kind": "bytes", "vocab_size": 256}
    assert not (Path(stores["bytes"]) / "tokenizer.json").exists()
    texts = {s: [d.astype(np.uint8).tobytes().decode() for d in documents(byte, s)]
             for s in ("train", "valid", "test")}
    for name in ("bpe", "unigram", "word"):
        store = TokenStore.open(stores[name])
        m, tok = store.manifest, store.tokenizer
        assert m["tokenizer"]["model"] == name and tok.vocab_size == TRAINED[name]["vocab_size"]
        assert m["dtype"] == ("uint16" if name == "bpe" else "uint8")
        assert m["tokenizer"]["trained"]["on"] == "train split"
        for split, want in texts.items():
            info = m["splits"][split]
            # the byte count of a split is the text's, whatever the tokenizer
            assert info["bytes"] == byte.manifest["splits"][split]["bytes"] == sum(
                len(t.encode()) for t in want)
            assert info["documents"] == len(want)
            counts = store.read_token_bytes(split, 0, info["tokens"])
            assert counts.sum() == info["bytes"]
            docs = documents(store, split)
            assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)
            # each token's byte count is the bytes of text it ends: per document they add up
            ends = np.cumsum(counts)[np.cumsum([len(d) for d in docs]) - 1]
            assert np.array_equal(np.diff(ends, prepend=0), [len(t.encode()) for t in want])
            if name == "bpe":  # byte-level BPE is lossless
                assert [tok.decode(d[:-1]) for d in docs] == want
            if name == "word":  # words and line breaks, unknown ones as <unk>
                vocab = tok.tokenizer.get_vocab()
                for d, text in zip(docs, want, strict=True):
                    assert re.findall(r"\S+|\n", tok.decode(d[:-1])) == [
                        w if w in vocab else "<unk>" for w in re.findall(r"\S+|\n", text)]


def test_bits_per_byte_counts_exactly_the_bytes_scored(stores):
    store = TokenStore.open(stores["bpe"])
    n = store.num_tokens("valid")
    counts = store.read_token_bytes("valid", 0, n)
    assert store.text_bytes("valid", 1, n) == counts[1:].sum()  # a whole split's targets
    assert store.text_bytes("valid", 1, 41) == counts[1:41].sum()  # `max_tokens` of them
    byte = TokenStore.open(stores["bytes"])
    assert byte.text_bytes("valid", 1, 41) == 40


def test_files_as_tokenizers(stores, tmp_path):
    import sentencepiece

    trained = TokenStore.open(stores["bpe"])
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(trained.tokenizer.source)
    out = str(tmp_path / "from-file")
    m = prepare(stores["source"], out, tokenizer=str(tmp_path / "tok"), **SPLIT)
    assert m["tokenizer"]["from"] == str(tmp_path / "tok" / "tokenizer.json")
    again = TokenStore.open(out)
    for split in ("train", "valid"):
        assert np.array_equal(again.read(split, 0, again.num_tokens(split)),
                              trained.read(split, 0, trained.num_tokens(split)))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(known_texts()),
                                             model_writer=model, vocab_size=40, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    m = prepare(stores["source"], str(tmp_path / "sp"), tokenizer=str(tmp_path / "sp.model"),
                **SPLIT)
    sp = TokenStore.open(str(tmp_path / "sp"))
    assert m["tokenizer"]["kind"] == "sentencepiece" and sp.tokenizer.eos == "</s>"
    assert (tmp_path / "sp" / "tokenizer.model").read_bytes() == model.getvalue()
    info = m["splits"]["train"]
    assert sp.read_token_bytes("train", 0, info["tokens"]).sum() == info["bytes"] == \
        TokenStore.open(stores["bytes"]).manifest["splits"]["train"]["bytes"]
    assert sp.tokenizer.decode(documents(sp, "train")[0][:-1]).split() == \
        TokenStore.open(stores["bytes"]).tokenizer.decode(documents(
            TokenStore.open(stores["bytes"]), "train")[0]).split()


def test_rerun_keeps_the_store_and_another_tokenizer_needs_force(stores, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["data", "prepare", stores["source"], str(out), "--valid", "0.2", "--test", "0.2",
            "--train-tokenizer", "word", "--vocab-size", "30"]
    assert main(args) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*args[:-1], "29"]) == 1
    assert "a token store from another tokenizer is already there; pass --force" in \
        capsys.readouterr().err
    assert main([*args[:-4], "--force"]) == 0  # bytes: the tokenizer file goes with the rest
    assert not (out / "tokenizer.json").exists() and not (out / "train.token_bytes.zarr"
                                                          ).exists()


@pytest.mark.parametrize("case", ["missing_file", "not_a_tokenizer", "not_a_tokenizer_name",
                                  "no_eos", "bpe_too_small", "more_words_than_the_text",
                                  "size_without_training", "both", "images"])
def test_bad_tokenizers_are_one_clear_line(stores, tmp_path, capsys, case):
    out = tmp_path / "s"
    args = ["data", "prepare", stores["source"], str(out)]
    bad = tmp_path / "tokenizer.json"
    expected = {
        "missing_file": (1, f"{bad}: cannot read the tokenizer file: No such file"),
        "not_a_tokenizer": (1, f"{bad}: not a Hugging Face tokenizer.json"),
        "not_a_tokenizer_name": (1, "a tokenizer is a Hugging Face tokenizer.json"),
        "no_eos": (1, "none of the end-of-document tokens <eos>, </s>"),
        "bpe_too_small": (2, ("--vocab-size 256 is too small for a bpe tokenizer: it needs at "
                              "least 257")),
        "more_words_than_the_text": (2, ("the training split has only enough distinct words "
                                         "for a word vocabulary of 34 ids; ask for at most 34")),
        "size_without_training": (2, "--vocab-size is the size of a tokenizer to train"),
        "both": (2, "give either --tokenizer or --train-tokenizer, not both"),
        "images": (2, "images are stored as bytes"),
    }[case]
    if case == "missing_file":
        args += ["--tokenizer", str(bad)]
    elif case == "not_a_tokenizer":
        bad.write_text('{"model": 3}')
        args += ["--tokenizer", str(bad)]
    elif case == "not_a_tokenizer_name":
        args += ["--tokenizer", str(tmp_path / "vocab.txt")]
    elif case == "no_eos":
        from tokenizers import Tokenizer, models

        bad.write_text(Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="b")).to_str())
        args += ["--tokenizer", str(bad)]
    elif case == "bpe_too_small":
        args += ["--train-tokenizer", "bpe", "--vocab-size", "256"]
    elif case == "more_words_than_the_text":
        args += ["--train-tokenizer", "word", "--vocab-size", "5000", "--valid", "0.2"]
    elif case == "size_without_training":
        args += ["--vocab-size", "300"]
    elif case == "both":
        args += ["--train-tokenizer", "bpe", "--vocab-size", "300", "--tokenizer", str(bad)]
    elif case == "images":
        np.save(tmp_path / "im.npy", np.zeros((4, 2, 2, 3), np.uint8))
        args[2] = str(tmp_path / "im.npy")
        args += ["--train-tokenizer", "bpe", "--vocab-size", "300"]
    capsys.readouterr()
    assert main(args) == expected[0]
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and expected[1] in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not (out / MANIFEST).exists()


def test_vocab_size_auto_and_the_refusal_with_both_numbers(stores):
    spec = load_spec(ROOT / "specs" / "tiny.yaml", [f"data.path={stores['bpe']}",
                                                    "model.vocab_size=auto"])
    assert spec.model.vocab_size == 300
    open_store(spec)
    with pytest.raises(StoreError, match=r"its tokenizer has 300 token ids but model.vocab_size "
                                         r"is 256: set model.vocab_size to 300 \(or `auto`\)"):
        open_store(load_spec(ROOT / "specs" / "tiny.yaml", [f"data.path={stores['bpe']}"]))
    with pytest.raises(StoreError, match="made with a bpe tokenizer, but data.tokenizer is word"):
        open_store(spec.model_copy(update={"data": spec.data.model_copy(
            update={"tokenizer": "word"})}))
    with pytest.raises(SpecError, match="model.vocab_size: auto takes the vocabulary of the "
                                        "token store at data.path, but: no token store at"):
        load_spec(ROOT / "specs" / "tiny.yaml", ["data.path=/nonexistent/store",
                                                 "model.vocab_size=auto"])


SHRINK = ["model.n_layers=1", "model.d_model=32", "model.seq_len=64",
          "model.attention.head_dim=8", "model.attention.heads.0.count=2",
          "model.attention.heads.0.window=16", "model.attention.heads.1.count=2",
          "model.attention.heads.1.clusters=4", "model.attention.heads.1.window=16",
          "model.feed_forward.hidden=64", "model.vocab_size=auto", "model.routing.skip_first=0",
          "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "run.eval_every=0",
          "run.log_every=1", "data.eval_tokens=128", "run.sample_tokens=4",
          "run.sample_prompt=the", "mesh.data=1", "train.compute_dtype=float32"]


def board_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run's TensorBoard event files (TFRecord framing read by hand)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "tensorboard").iterdir()):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


@pytest.mark.parametrize("paper, tokenizer", [("wikitext103", "word"), ("pg19", "bpe")])
def test_paper_text_specs_train_on_their_tokenizers(stores, tmp_path, capsys, paper, tokenizer):
    """Each paper text spec, shrunk, trains on a store of the tokenizer it names; the run's
    closing sample (wikitext103), `eval` and `generate` (pg19: compiled once each) use it."""
    run_dir = tmp_path / paper
    extra = (["model.embedding.dim=16", "run.tensorboard=true"] if paper == "wikitext103" else
             ["run.sample_tokens=0"])
    args = ["train", str(ROOT / "specs" / "paper" / f"{paper}.yaml"), *SHRINK, *extra,
            f"data.path={stores[tokenizer]}", f"run.dir={run_dir}", "--no-progress"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "bits/token (" in said and "bits/byte)" in said
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = next(r for r in records if r.get("split") == "valid")
    store = TokenStore.open(stores[tokenizer])
    scored = store.text_bytes("valid", 1, valid["tokens"] + 1)
    assert math.isclose(valid["bits_per_byte"],
                        valid["nll"] * valid["tokens"] / (scored * math.log(2)), rel_tol=1e-9)
    if paper == "wikitext103":
        sample = next(r for r in records if r.get("split") == "sample")["text"]
        assert sample.startswith("the")
        # TensorBoard holds the same numbers as metrics.jsonl
        board = board_scalars(run_dir)
        assert board["valid/bits_per_byte"] == {2: pytest.approx(valid["bits_per_byte"])}
        assert board["train/loss"] == {r["step"]: pytest.approx(r["loss"]) for r in records
                                       if "split" not in r}
        return
    assert main(["eval", str(run_dir), "--no-progress", "--max-tokens", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert math.isclose(out["bits_per_byte"], out["nll"] * 100 / (
        store.text_bytes("valid", 1, 101) * math.log(2)), rel_tol=1e-9)
    assert main(["generate", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the cat") and len(printed) > len("the cat\n")
