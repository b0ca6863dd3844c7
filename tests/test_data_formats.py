"""The formats `rtlib data prepare` reads (issue 15): compressed text, JSON Lines, Parquet, and
trees of them; clear errors naming the file and line or row; the streaming writer's
guarantees (same store whatever the piece and block sizes, reruns keep it, interruptions leave
nothing readable, stores made before streaming are kept)."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from rtlib.cli import main
from rtlib.data import prepare as prepare_module
from rtlib.data import sources
from rtlib.data import store as store_module
from rtlib.data.prepare import prepare
from rtlib.data.store import MANIFEST, StoreError, TokenStore

DOCS = [f"document {i}: " + "".join(f"line {j} é ü 東 {'x' * (j % 7)}\n" for j in range(i + 3))
        for i in range(12)]
SPLIT = {"valid": 0.2, "test": 0.2, "progress": False}


def contents(out: str) -> list[bytes]:
    """Every document of a byte store, whatever its split."""
    store = TokenStore.open(out)
    docs = []
    for split, info in store.manifest["splits"].items():
        data = store.read(split, 0, info["tokens"]).astype(np.uint8).tobytes()
        ends = [*info["boundaries"][1:], info["tokens"]]
        docs += [data[a:b] for a, b in zip(info["boundaries"], ends, strict=True)]
    return sorted(docs)


def write_jsonl(path: Path, records: list, compress=None) -> None:
    """One JSON object a line (None: a blank line)."""
    data = "".join("\n" if r is None else json.dumps(r) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def write_parquet(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=5)


def test_every_format_gives_the_same_documents(tmp_path):
    want = sorted(d.encode() for d in DOCS)
    tree = tmp_path / "tree"
    for i, doc in enumerate(DOCS):  # a tree mixing plain and compressed files
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        data = doc.encode()
        name, data = [(f"{i}.txt", data), (f"{i}.txt.gz", gzip.compress(data)),
                      (f"{i}.txt.zst", zstandard.ZstdCompressor().compress(data))][i % 3]
        (tree / f"d{i % 3}" / name).write_bytes(data)
    m = prepare(str(tree), str(tmp_path / "tree-store"), **SPLIT)
    assert contents(str(tmp_path / "tree-store")) == want
    assert m["source"]["compression"] == ["gz", "zst"] and "formats" not in m["source"]
    records = [{"id": i, "text": d} for i, d in enumerate(DOCS)]
    for compress in (None, "gz", "zst"):
        name = "docs.jsonl" + (f".{compress}" if compress else "")
        write_jsonl(tmp_path / name, [*records[:5], None, *records[5:]], compress)
        m = prepare(str(tmp_path / name), str(tmp_path / f"store-{name}"), **SPLIT)
        assert contents(str(tmp_path / f"store-{name}")) == want
        assert m["source"]["formats"] == ["jsonl"] and m["source"]["text_key"] == "text"
    write_parquet(tmp_path / "docs.parquet", body=DOCS, n=list(range(len(DOCS))))
    m = prepare(str(tmp_path / "docs.parquet"), str(tmp_path / "pq"), text_key="body", **SPLIT)
    assert contents(str(tmp_path / "pq")) == want and m["source"]["text_key"] == "body"
    # documents are named by file and line (JSON Lines, from 1; blank lines skipped) or row
    # (Parquet, from 0)
    ids = [d.id for d in sources.collect(str(tmp_path / "docs.jsonl"))[0]]
    assert ids == [f"docs.jsonl:{i}" for i in (*range(1, 6), *range(7, 14))]
    ids = [d.id for d in sources.collect(str(tmp_path / "docs.parquet"), text_key="body")[0]]
    assert ids == [f"docs.parquet:{i}" for i in range(12)]


def test_a_compressed_book_is_cut_like_the_plain_one(tmp_path):
    book = "".join(f"sentence {i} of the book.\n" for i in range(3000)).encode()
    (tmp_path / "book.txt").write_bytes(book)
    (tmp_path / "book.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(book))
    plain = [d.load() for d in sources.collect(str(tmp_path / "book.txt"), doc_bytes=4096)[0]]
    packed = [d.load() for d in sources.collect(str(tmp_path / "book.txt.zst"),
                                                doc_bytes=4096)[0]]
    assert plain == packed and b"".join(plain) == book and len(plain) > 10
    assert all(p.endswith(b"\n") and len(p) <= 4096 for p in plain)


@pytest.mark.parametrize("case", ["invalid_json", "not_an_object", "missing_key", "not_a_string",
                                  "not_utf8", "bad_gzip", "parquet_no_column",
                                  "parquet_not_strings", "parquet_null", "not_parquet"])
def test_bad_input_names_the_file_and_line_or_row(tmp_path, capsys, case):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": d} for d in DOCS])
    out = tmp_path / "store"
    assert main(["data", "prepare", str(good), str(out)]) == 0  # a store that must survive
    before = (out / MANIFEST).read_bytes()
    src = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:4]]
    if case == "invalid_json":
        lines[2] = '{"text": "unterminated}'
        expected = f"{src}:3: invalid JSON: Unterminated string"
    elif case == "not_an_object":
        lines[1] = '["text"]'
        expected = f"{src}:2: expected a JSON object with a 'text' field, got an array"
    elif case == "missing_key":
        lines[3] = json.dumps({"body": "x", "id": 3})
        expected = f"{src}:4: no 'text' field (its fields: 'body', 'id'); name the text field " \
                   "with --text-key"
    elif case == "not_a_string":
        lines[0] = json.dumps({"text": 12})
        expected = f"{src}:1: 'text' is a number, not a string"
    if src.suffix == ".jsonl":
        src.write_text("\n".join(lines) + "\n")
    if case == "not_utf8":
        src.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
        expected = f"{src}:2: not UTF-8 text"
    elif case == "bad_gzip":
        src = tmp_path / "bad.txt.gz"
        src.write_bytes(gzip.compress("".join(DOCS).encode())[:-30])  # truncated
        expected = f"{src}: not valid gz data"
    elif case.startswith("parquet"):
        src = tmp_path / "bad.parquet"
        texts = [*DOCS[:6], None] if case == "parquet_null" else DOCS[:6]
        write_parquet(src, **({"body": texts} if case == "parquet_no_column" else
                              {"text": list(range(6))} if case == "parquet_not_strings" else
                              {"text": texts}))
        expected = {"parquet_no_column": f"{src}: no column 'text' (its columns: 'body'); name "
                                         "the text column with --text-key",
                    "parquet_not_strings": f"{src}: column 'text' holds int64, not strings",
                    "parquet_null": f"{src}: row 6: 'text' is null, not a string"}[case]
    elif case == "not_parquet":
        src = tmp_path / "bad.parquet"
        src.write_bytes(b"PAR1 but not really")
        expected = f"{src}: not a readable Parquet file"
    capsys.readouterr()
    assert main(["data", "prepare", str(src), str(out), "--force"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err[-1]
    assert sum(line.startswith("error: ") for line in err) == 1
    assert (out / MANIFEST).read_bytes() == before  # read before writing: nothing lost


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_small_pieces_and_blocks_make_the_same_store(tmp_path, monkeypatch, capsys, tokenizer):
    """A document read in many pieces, written in many blocks, of many chunks: the same arrays
    as in one piece and one write; rerunning keeps it as it is."""
    long = "".join(f"a long line number {i} of words\n" for i in range(400))  # ~13 kB
    (tmp_path / "c").mkdir()
    for i, doc in enumerate([*DOCS, long, long.upper()]):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(doc)
    kw = {} if tokenizer == "bytes" else {"train_tokenizer": "bpe", "vocab_size": 290}
    prepare(str(tmp_path / "c"), str(tmp_path / "one"), **SPLIT, **kw)
    monkeypatch.setattr(sources, "PIECE_BYTES", 512)
    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 512)
    monkeypatch.setattr(prepare_module, "WRITE_BLOCK", 100)
    monkeypatch.setattr(prepare_module, "BATCH_BYTES", 300)
    monkeypatch.setattr(store_module, "CHUNK", 64)
    out = tmp_path / "many"
    m = prepare(str(tmp_path / "c"), str(out), **{**SPLIT, "progress": True}, **kw)
    err = capsys.readouterr().err
    assert "14/14 documents" in err and "B/s" in err  # progress in bytes and documents
    a, b = TokenStore.open(str(tmp_path / "one")), TokenStore.open(str(out))
    assert a.manifest["splits"] == b.manifest["splits"]
    assert len(list((out / "train.zarr" / "c").iterdir())) > 10
    for split, info in m["splits"].items():
        assert np.array_equal(a.read(split, 0, info["tokens"]), b.read(split, 0, info["tokens"]))
        if tokenizer == "bpe":
            assert np.array_equal(a.read_token_bytes(split, 0, info["tokens"]),
                                  b.read_token_bytes(split, 0, info["tokens"]))
    before = files_of(out)
    again = prepare(str(tmp_path / "c"), str(out), **SPLIT, **kw)
    assert again == m and files_of(out) == before  # kept as it is, not rewritten


def test_an_interrupted_text_store_write_leaves_nothing_readable(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    out = str(tmp_path / "store")
    kw = {"train_tokenizer": "word", "vocab_size": 20, **SPLIT}
    first = prepare(str(tmp_path / "docs.jsonl"), out, **kw)

    calls = []

    def flush(*args):  # the first split's tokens are written, then its bytes per token: stop
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    real = prepare_module._flush
    monkeypatch.setattr(prepare_module, "_flush", flush)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "docs.jsonl"), out, **{**kw, "vocab_size": 21}, force=True)
    with pytest.raises(StoreError, match="no token store here"):
        TokenStore.open(out)
    monkeypatch.undo()
    assert prepare(str(tmp_path / "docs.jsonl"), out, **kw)["splits"] == first["splits"]


def test_a_store_made_before_streaming_is_kept(tmp_path):
    """Stores whose source digest was computed split by split (rtlib before streaming) are
    recognised: preparing the same source again keeps them rather than asking for --force."""
    (tmp_path / "c").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "c" / f"{i}.txt").write_text(doc)
    out = tmp_path / "store"
    m = prepare(str(tmp_path / "c"), str(out), **SPLIT)
    old = hashlib.sha256()  # the digest as it was computed then
    store = TokenStore.open(str(out))
    for split, info in m["splits"].items():
        data = store.read(split, 0, info["tokens"]).astype(np.uint8).tobytes()
        ends = [*info["boundaries"][1:], info["tokens"]]
        names = sorted((f"{i}.txt" for i, d in enumerate(DOCS) if d.encode() in
                        [data[a:b] for a, b in zip(info["boundaries"], ends, strict=True)]),
                       key=lambda n: n)
        for name in names:
            doc = (tmp_path / "c" / name).read_bytes()
            old.update(f"{split}\0{name}\0{len(doc)}\0".encode() + doc)
    legacy = {**m, "source": {k: v for k, v in m["source"].items() if k != "digest"}}
    legacy["source"]["sha256"] = old.hexdigest()
    (out / MANIFEST).write_text(json.dumps(legacy))
    assert prepare(str(tmp_path / "c"), str(out), **SPLIT) == legacy
    legacy["source"]["sha256"] = "0" * 64  # another source
    (out / MANIFEST).write_text(json.dumps(legacy))
    with pytest.raises(StoreError, match="from another source or split"):
        prepare(str(tmp_path / "c"), str(out), **SPLIT)
