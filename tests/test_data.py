"""Token stores and the grain pipelines: round trips, splits, images, determinism, resume,
per-process sharding, and the errors a user meets with bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_corpus

from rtlib.cli import main
from rtlib.data.pipeline import eval_batches, train_dataset, train_iterator
from rtlib.data.prepare import assign_splits, prepare
from rtlib.data.sources import SourceError
from rtlib.data.store import MANIFEST, StoreError, TokenStore


def split_contents(store: TokenStore, split: str) -> list[bytes]:
    info = store.manifest["splits"][split]
    ends = [*info["boundaries"][1:], info["tokens"]]
    data = store.read(split, 0, info["tokens"]).astype(np.uint8).tobytes()
    return [data[a:b] for a, b in zip(info["boundaries"], ends, strict=True)]


def test_prepare_round_trip_directory(tmp_path):
    docs = write_corpus(tmp_path / "corpus")
    m = prepare(str(tmp_path / "corpus"), str(tmp_path / "store"), valid=0.2, test=0.2,
                progress=False)
    store = TokenStore.open(str(tmp_path / "store"))
    assert store.manifest == m and m["tokenizer"] == {"kind": "bytes", "vocab_size": 256}
    seen = []
    for split in ("train", "valid", "test"):
        contents = split_contents(store, split)
        assert len(contents) == m["splits"][split]["documents"] >= 1
        seen += contents
    # every document exactly once, byte for byte, split by document
    assert sorted(seen) == sorted(docs.values())
    assert m["source"]["documents"] == 12 and sum(len(d) for d in docs.values()) == sum(
        s["tokens"] for s in m["splits"].values())
    # deterministic: the same corpus and seed give the same digest and the same split
    again = prepare(str(tmp_path / "corpus"), str(tmp_path / "store2"), valid=0.2, test=0.2,
                    progress=False)
    assert again["source"]["sha256"] == m["source"]["sha256"]
    assert again["splits"] == m["splits"]


def test_prepare_to_a_kvstore_url_and_single_text_file(tmp_path):
    text = "".join(f"sentence number {i}.\n" for i in range(3000)).encode()
    (tmp_path / "book.txt").write_bytes(text)
    url = (tmp_path / "url-store").as_uri() + "/"
    m = prepare(str(tmp_path / "book.txt"), url, doc_bytes=4096, progress=False)
    store = TokenStore.open(url)
    pieces = [p for s in ("train", "valid", "test") for p in split_contents(store, s)]
    assert m["source"]["documents"] > 10 and all(p.endswith(b"\n") for p in pieces)
    assert sorted(b"".join(pieces).splitlines()) == sorted(text.splitlines())


def test_split_assignment_is_by_document_and_seeded():
    ids = [f"doc{i}" for i in range(100)]
    a = assign_splits(ids, valid=0.1, test=0.05, seed=0)
    assert a == assign_splits(ids, valid=0.1, test=0.05, seed=0)
    assert sorted(a["train"] + a["valid"] + a["test"]) == list(range(100))
    assert (len(a["valid"]), len(a["test"])) == (10, 5)
    assert a != assign_splits(ids, valid=0.1, test=0.05, seed=1)
    assert all(len(v) == 1 for k, v in assign_splits(ids[:3], valid=0.01, test=0.01,
                                                      seed=0).items())
    with pytest.raises(SourceError, match="need at least 3"):
        assign_splits(ids[:2], valid=0.1, test=0.1, seed=0)
    greedy = assign_splits(ids[:3], valid=0.05, test=0.9, seed=0)  # fractions that overflow
    assert sorted(sum(greedy.values(), [])) == [0, 1, 2] and all(greedy.values())


def test_images_from_pngs_and_npy(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "pngs" / f"im{i}.png")
    np.save(tmp_path / "images.npy", images)
    for source in (tmp_path / "pngs", tmp_path / "images.npy"):
        out = str(tmp_path / f"store-{source.name}")
        m = prepare(str(source), out, valid=0.2, test=0.2, progress=False)
        assert m["source"]["kind"] == "images" and m["source"]["image_shape"] == [4, 5, 3]
        got = sorted(split_contents(TokenStore.open(out), s)
                     for s in ("train", "valid", "test"))
        got = sorted(p for part in got for p in part)
        assert got == sorted(img.tobytes() for img in images)
    Image.fromarray(images[0][:3]).save(tmp_path / "pngs" / "odd.png")
    with pytest.raises(SourceError, match=r"odd\.png: image shape \[3, 5, 3\] differs"):
        prepare(str(tmp_path / "pngs"), str(tmp_path / "bad"), progress=False)


@pytest.mark.parametrize("case", ["missing", "no_match", "empty", "unreadable", "exists",
                                  "not_a_store", "bad_npy", "bad_fraction", "bad_doc_bytes"])
def test_prepare_errors_are_clear_and_lose_nothing(tmp_path, monkeypatch, capsys, case):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 4)
    out = tmp_path / "store"
    args = ["data", "prepare", str(corpus), str(out)]
    expected = {
        "missing": "no such file or directory", "no_match": "no files match '*.md'",
        "empty": "the corpus is empty", "unreadable": "cannot read: Permission denied",
        "exists": "from another source or split is already there; pass --force", "not_a_store": "no token store here",
        "bad_npy": "not a readable .npy array",
        "bad_fraction": "split fractions valid=1.5, test=0.05 must be in [0, 1)",
        "bad_doc_bytes": "doc_bytes must be >= 1, got 0",
    }[case]
    code = 2 if case.startswith("bad_") and case != "bad_npy" else 1
    if case == "missing":
        args[2] = str(tmp_path / "nope")
    elif case == "no_match":
        args += ["--glob", "*.md"]
    elif case == "empty":
        for p in corpus.rglob("*.txt"):
            p.write_bytes(b"")
    elif case == "unreadable":
        victim = sorted(corpus.rglob("*.txt"))[1]
        real = Path.read_bytes

        def read_bytes(self):  # tests run as root, where chmod 000 does not stop reads
            if self == victim:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        expected = f"{victim}: cannot read: Permission denied"
    elif case == "exists":
        assert main(args) == 0
        before = (out / MANIFEST).read_bytes()
        assert main(args) == 0  # the same source again: kept as it is
        assert "already prepared" in capsys.readouterr().out
        assert (out / MANIFEST).read_bytes() == before
        args += ["--seed", "1"]  # another split
    elif case == "not_a_store":
        with pytest.raises(StoreError, match=expected):
            TokenStore.open(str(out))
        return
    elif case == "bad_npy":
        (tmp_path / "x.npy").write_bytes(b"garbage")
        args[2] = str(tmp_path / "x.npy")
    elif case == "bad_fraction":
        args += ["--valid", "1.5"]
    elif case == "bad_doc_bytes":
        args[2] = str(sorted(corpus.rglob("*.txt"))[0])
        args += ["--doc-bytes", "0"]
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and expected in err
    if case == "exists":
        assert (out / MANIFEST).read_bytes() == before
    else:
        assert not (out / MANIFEST).exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenStore:
    root = tmp_path_factory.mktemp("pipe")
    write_corpus(root / "corpus", 30)
    prepare(str(root / "corpus"), str(root / "store"), progress=False)
    return TokenStore.open(str(root / "store"))


def batches(it, n):
    return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_resumable_and_shards_by_process(store):
    make = lambda seed=0, **kw: train_dataset(store, "train", seq_len=16, batch_size=4,
                                              seed=seed, **kw)
    a = batches(train_iterator(make(), threads=2, prefetch=2), 6)
    b = batches(train_iterator(make(), threads=1, prefetch=1), 6)
    assert all(x.shape == (4, 17) and x.dtype == np.int32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], batches(train_iterator(make(seed=1), threads=1,
                                                           prefetch=1), 1)[0])
    # windows are real contiguous slices of the split
    train = store.read("train", 0, store.num_tokens("train"))
    row = a[0][0]
    starts = [i for i in range(len(train) - 16) if np.array_equal(train[i:i + 17], row)]
    assert starts
    # resume from a saved iterator state
    it = train_iterator(make(), threads=2, prefetch=2)
    batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    it2 = train_iterator(make(), threads=2, prefetch=2)
    it2.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(batches(it2, 3), a[3:], strict=True))
    # two data shards read, between them, exactly the rows one process reads, in order
    p0 = batches(train_iterator(make(process_index=0, process_count=2), threads=1,
                                prefetch=1), 2)
    p1 = batches(train_iterator(make(process_index=1, process_count=2), threads=1,
                                prefetch=1), 2)
    for step in range(2):
        np.testing.assert_array_equal(np.concatenate([p0[step], p1[step]]), a[step])


def test_eval_batches_score_every_target_once(store):
    total = store.num_tokens("valid")
    data = store.read("valid", 0, total)
    targets = []
    for tokens, mask, answers in eval_batches(store, "valid", seq_len=16, batch_size=3):
        assert not answers.any()  # a text store has no answer mask
        assert tokens.shape == mask.shape == (3, 17)
        for row, m in zip(tokens, mask, strict=True):
            assert not row[~m].any()  # padding is zeros
            targets.append(row[1:][m[1:] & m[:-1]])
    np.testing.assert_array_equal(np.concatenate(targets), data[1:])
    capped = sum(int((m[:, 1:] & m[:, :-1]).sum()) for _, m, _ in
                 eval_batches(store, "valid", seq_len=16, batch_size=3, max_tokens=40))
    assert capped == 40


def test_force_replaces_a_store_only_when_the_new_one_is_complete(tmp_path, monkeypatch):
    from rtlib.data import prepare as prepare_module

    corpus = tmp_path / "corpus"
    write_corpus(corpus, 6)
    out = str(tmp_path / "store")
    first = prepare(str(corpus), out, progress=False)
    # a source that fails while being read leaves the old store untouched
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    for i in range(3):
        (empty / "a" / f"{i}.txt").write_bytes(b"")
    with pytest.raises(SourceError, match="empty"):
        prepare(str(empty), out, force=True, progress=False)
    assert TokenStore.open(out).manifest == first
    # an interruption while the new arrays are written leaves no manifest: never read as whole
    monkeypatch.setattr(prepare_module, "_flush", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), out, force=True, progress=False)
    with pytest.raises(StoreError, match="no token store here"):
        TokenStore.open(out)
