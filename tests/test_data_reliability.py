"""Reliability of token stores and their writers (issue 18): a store never returns data it does
not have (missing or truncated chunks are errors naming the chunk), `data prepare` / `data synth`
never delete what rtlib did not write, and bad sources or outputs are one clear line."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_corpus

from rtlib.cli import main
from rtlib.data import store as store_module
from rtlib.data.pipeline import eval_batches, train_dataset, train_iterator
from rtlib.data.prepare import prepare
from rtlib.data.sources import SourceError, collect
from rtlib.data.store import MANIFEST, MARKER, VERSION, StoreError, TokenStore
from rtlib.data.synth import SynthOptions, synth
from rtlib.errors import BadArgument

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"length": 64, "pairs": 4, "span": 8, "min_gap": 16, "train": 24, "valid": 6, "test": 6}
SYNTH_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 64 tokens: tiny stores still have many chunks."""
    monkeypatch.setattr(store_module, "CHUNK", 64)


def cli(capsys, *args) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `rtlib ARGS`."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.splitlines()


def one_error(code: int, err: list[str], expected_code: int, *fragments: str) -> None:
    """A failure is one line `error: ...` holding every fragment, and the expected exit code."""
    assert code == expected_code, err
    # stderr may hold a progress bar before it; the error is the last line and the only one
    assert err[-1].startswith("error: ") and sum(line.startswith("error: ") for line in err) == 1
    assert not any("Traceback" in line for line in err), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]


def text_store(tmp_path: Path, name: str = "store") -> str:
    write_corpus(tmp_path / "corpus", 12)
    out = str(tmp_path / name)
    prepare(str(tmp_path / "corpus"), out, valid=0.2, test=0.2, progress=False)
    return out


def synth_store(tmp_path: Path, name: str = "synth") -> str:
    out = str(tmp_path / name)
    synth("copy", out, SynthOptions(**SMALL), progress=False)
    return out


def chunk_files(out: str, array: str) -> list[Path]:
    return sorted((Path(out) / f"{array}.zarr" / "c").iterdir(), key=lambda p: int(p.name))


# 1. missing or truncated chunks are errors, never zeros


def test_every_chunk_is_stored_even_all_zeros(tmp_path):
    np.save(tmp_path / "black.npy", np.zeros((8, 8, 8), np.uint8))  # images of zero bytes
    out = str(tmp_path / "store")
    m = prepare(str(tmp_path / "black.npy"), out, valid=0.25, test=0.25, progress=False)
    assert m["version"] == VERSION == 2
    for split, info in m["splits"].items():
        assert len(chunk_files(out, split)) == -(-info["tokens"] // 64)  # none left out
    store = TokenStore.open(out)
    assert not store.read("train", 0, store.num_tokens("train")).any()


@pytest.mark.parametrize("array", ["train", "valid", "train.answers"])
def test_a_store_missing_chunks_is_refused_when_opened(tmp_path, capsys, array):
    """The issue's repro: `cp -r STORE BROKEN && rm BROKEN/train.zarr/c/*`."""
    good = synth_store(tmp_path) if "answers" in array else text_store(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    files = chunk_files(str(broken), array)
    assert len(files) > 1
    for f in files[1:]:
        f.unlink()
    with pytest.raises(StoreError, match=rf"{array}\.zarr/c/1 is missing \({len(files) - 1} "
                                         "chunks"):
        TokenStore.open(str(broken))
    TokenStore.open(good)  # the original is intact
    if array == "train":  # training refuses it at once: exit 1, one line
        code, err = cli(capsys, "train", ROOT / "specs" / "tiny.yaml", "train.steps=1",
                        f"data.path={broken}", f"run.dir={tmp_path / 'run'}", "--no-progress")
        one_error(code, err, 1, str(broken), "train.zarr/c/1 is missing")


def test_reads_of_a_chunk_lost_after_opening_are_errors(tmp_path):
    """Train windows, eval batches, `TokenStore.read` and answer masks: an error naming the store
    and the chunk, however the chunk went (deleted or truncated)."""
    text = TokenStore.open(text_store(tmp_path))
    recall = TokenStore.open(synth_store(tmp_path))
    for chunk in chunk_files(text.location, "train"):
        chunk.unlink()
    (Path(text.location) / "valid.zarr" / "c" / "1").unlink()
    with open(Path(recall.location) / "train.answers.zarr" / "c" / "2", "r+b") as f:
        f.truncate(10)
    missing = rf"{text.location}: chunk train\.zarr/c/0 is missing"
    with pytest.raises(StoreError, match=missing):
        text.read("train", 0, 10)
    with pytest.raises(StoreError, match=r"chunk train\.zarr/c/2 is missing"):
        text.read("train", 130, 300)  # the first failing chunk of the range
    with pytest.raises(StoreError, match=r"chunk train\.zarr/c/\d+ is missing"):  # in grain
        next(train_iterator(train_dataset(text, "train", seq_len=16, batch_size=4, seed=0),
                            threads=2, prefetch=2))
    with pytest.raises(StoreError, match=r"chunk valid\.zarr/c/1 is missing"):
        list(eval_batches(text, "valid", seq_len=16, batch_size=2))
    truncated = r"chunk train\.answers\.zarr/c/2 is unreadable \(truncated or corrupt"
    with pytest.raises(StoreError, match=truncated):
        recall.read_answers("train", 0, recall.num_tokens("train"))
    with pytest.raises(StoreError, match=truncated):
        [train_dataset(recall, "train", seq_len=63, batch_size=4, seed=0, answers=True)[i]
         for i in range(6)]
    np.testing.assert_array_equal(recall.read_answers("train", 0, 64)[:5], 0)  # chunk 0 is fine


def test_stores_written_before_the_fix_still_open(tmp_path):
    out = text_store(tmp_path)
    manifest = json.loads((Path(out) / MANIFEST).read_text())
    (Path(out) / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    (Path(out) / MARKER).unlink()  # older rtlib wrote no marker
    store = TokenStore.open(out)
    assert len(store.read("train", 0, 100)) == 100
    (Path(out) / "test.zarr" / "c" / "0").unlink()
    with pytest.raises(StoreError, match="manifest version 1 .* chunk of all zeros"):
        TokenStore.open(out)


@pytest.mark.parametrize("kind", ["prepare", "synth"])
def test_rerun_with_the_same_settings_repairs_a_damaged_store(tmp_path, capsys, kind):
    args = (["data", "prepare", tmp_path / "corpus", tmp_path / "s"] if kind == "prepare" else
            ["data", "synth", "copy", tmp_path / "s", *SYNTH_FLAGS])
    write_corpus(tmp_path / "corpus", 12)
    assert cli(capsys, *args)[0] == 0
    before = TokenStore.open(str(tmp_path / "s"))
    data = before.read("train", 0, before.num_tokens("train"))
    assert cli(capsys, *args)[0] == 0  # intact: kept
    chunk_files(str(tmp_path / "s"), "train")[0].unlink()
    assert cli(capsys, *args)[0] == 0  # damaged, same settings: written again, no --force
    np.testing.assert_array_equal(TokenStore.open(str(tmp_path / "s")).read(
        "train", 0, len(data)), data)


# 2. writers never delete what rtlib did not write


def foreign_directory(out: Path) -> dict[Path, bytes]:
    """A user's directory that happens to use rtlib's array names."""
    files = {out / "train.zarr" / "c" / "0": b"precious", out / "train.zarr" / "notes.txt": b"n",
             out / "valid.zarr" / "zarr.json": b"{}", out / "README": b"mine",
             out / "test.zarr" / "c" / "results.csv": b"1,2"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def writer_args(kind: str, tmp_path: Path, out: Path) -> list:
    write_corpus(tmp_path / "corpus", 12)
    if kind == "prepare":
        return ["data", "prepare", tmp_path / "corpus", out]
    return ["data", "synth", "recall", out, *SYNTH_FLAGS]


@pytest.mark.parametrize("kind", ["prepare", "synth"])
def test_a_foreign_directory_is_refused_and_force_deletes_only_rtlibs_keys(tmp_path, capsys,
                                                                          kind):
    out = tmp_path / "out"
    files = foreign_directory(out)
    args = writer_args(kind, tmp_path, out)
    code, err = cli(capsys, *args)
    one_error(code, err, 1, str(out), "not an rtlib token store and not empty", "--force")
    assert all(p.read_bytes() == data for p, data in files.items())  # nothing touched
    assert not (out / MARKER).exists()
    assert cli(capsys, *args, "--force")[0] == 0
    store = TokenStore.open(str(out))
    assert store.num_tokens("train") > 0
    written = {"train", "valid", "test"} | ({"train.answers", "valid.answers", "test.answers"}
                                            if kind == "synth" else set())
    assert {p.name for p in out.iterdir()} == {MANIFEST, MARKER, "README",
                                               *(f"{a}.zarr" for a in written)}
    # rtlib's own keys were replaced (chunk c/0, valid.zarr/zarr.json); all else survives
    kept = {p: d for p, d in files.items() if p.name not in ("0", "zarr.json")}
    assert all(p.read_bytes() == data for p, data in kept.items())
    # and a later --force replacement of the now-rtlib store keeps them too
    assert cli(capsys, *args, "--seed", "3", "--force")[0] == 0
    assert all(p.read_bytes() == data for p, data in kept.items())


@pytest.mark.parametrize("manifest", [b"[1, 2]", b"\xff garbage", b'{"format": "other"}'])
@pytest.mark.parametrize("kind", ["prepare", "synth"])
def test_a_manifest_that_is_not_rtlibs_is_not_an_rtlib_store(tmp_path, capsys, kind, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_bytes(manifest)
    with pytest.raises(StoreError, match="is not an rtlib token store manifest"):
        TokenStore.open(str(out))
    args = writer_args(kind, tmp_path, out)
    code, err = cli(capsys, *args)
    one_error(code, err, 1, "not an rtlib token store and not empty",
              f"its {MANIFEST} is not an rtlib token store manifest")
    assert (out / MANIFEST).read_bytes() == manifest
    assert cli(capsys, *args, "--force")[0] == 0
    TokenStore.open(str(out))


@pytest.mark.parametrize("kind", ["prepare", "synth"])
def test_an_interrupted_write_is_finished_by_a_rerun_without_force(tmp_path, capsys,
                                                                   monkeypatch, kind):
    from rtlib.data import prepare as prepare_module
    from rtlib.data import synth as synth_module

    out = tmp_path / "out"
    args = writer_args(kind, tmp_path, out)
    module = prepare_module if kind == "prepare" else synth_module
    real = module.wait

    def interrupt(future, location, doing):
        if doing == "write the arrays":
            raise KeyboardInterrupt
        return real(future, location, doing)

    monkeypatch.setattr(module, "wait", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in args])
    monkeypatch.undo()
    assert (out / MARKER).exists() and not (out / MANIFEST).exists()
    with pytest.raises(StoreError, match="no token store here"):
        TokenStore.open(str(out))
    assert cli(capsys, *args)[0] == 0
    TokenStore.open(str(out))


def test_an_empty_existing_directory_is_fine(tmp_path):
    write_corpus(tmp_path / "corpus", 6)
    (tmp_path / "out").mkdir()
    prepare(str(tmp_path / "corpus"), str(tmp_path / "out"), progress=False)
    TokenStore.open(str(tmp_path / "out"))


# 3. sources and outputs: one clear line


def test_one_document_source_names_it_and_suggests_no_held_out_splits(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("hello world\n")
    code, err = cli(capsys, "data", "prepare", tmp_path / "one", tmp_path / "s1")
    one_error(code, err, 1, f"{tmp_path / 'one'}: 1 document(s) (only.txt) cannot be split",
              "--valid 0 --test 0")
    (tmp_path / "book.txt").write_text("a short book\n")
    code, err = cli(capsys, "data", "prepare", tmp_path / "book.txt", tmp_path / "s2")
    one_error(code, err, 1, f"{tmp_path / 'book.txt'}: 1 document(s)", "--valid 0 --test 0",
              "--doc-bytes below 65536")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    for source, out in ((tmp_path / "one", tmp_path / "s1"), (tmp_path / "book.txt",
                                                              tmp_path / "s2")):
        assert cli(capsys, "data", "prepare", source, out, "--valid", "0", "--test", "0")[0] == 0
        assert TokenStore.open(str(out)).num_tokens("train") > 0


def test_empty_sources_and_empty_held_out_splits(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    code, err = cli(capsys, "data", "prepare", tmp_path / "empty.txt", tmp_path / "s")
    one_error(code, err, 1, f"{tmp_path / 'empty.txt'}: the corpus is empty")
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in "abcdefgh":  # one real document, the rest empty
        (corpus / f"{name}.txt").write_bytes(b"text\n" * 10 if name == "a" else b"")
    code, err = cli(capsys, "data", "prepare", corpus, tmp_path / "s", "--valid", "0.3",
                    "--test", "0")
    one_error(code, err, 1, "split got only empty documents")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
@pytest.mark.parametrize("kind", ["prepare", "synth"])
def test_output_that_is_a_file_is_one_line(tmp_path, capsys, where, kind):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "deeper" / "store"
    code, err = cli(capsys, *writer_args(kind, tmp_path, out))
    one_error(code, err, 1, f"{tmp_path / 'f'} is a file, not a directory")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        TokenStore.open(str(out))
    assert (tmp_path / "f").read_text() == "a file"


@pytest.mark.parametrize("pattern", ["/etc/*", "../*", "sub0/../../*", ""])
def test_globs_outside_the_source_are_refused(tmp_path, capsys, pattern):
    write_corpus(tmp_path / "corpus", 4)
    code, err = cli(capsys, "data", "prepare", tmp_path / "corpus", tmp_path / "s",
                    "--glob", pattern)
    one_error(code, err, 2, f"--glob {pattern!r}", "relative to SOURCE")
    with pytest.raises(BadArgument):
        collect(str(tmp_path / "corpus"), glob=pattern)
    assert not (tmp_path / "s").exists()


def test_unreadable_files_and_directories_while_collecting(tmp_path, monkeypatch):
    # tests run as root, where chmod 000 does not stop reads: permission errors are simulated
    write_corpus(tmp_path / "corpus", 6)
    victim = tmp_path / "corpus" / "sub1"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    # Path.glob alone would silently leave out sub1's files
    with pytest.raises(SourceError, match=f"{victim}: cannot list the directory: Permission"):
        collect(str(tmp_path / "corpus"))
    with pytest.raises(SourceError, match=f"{victim}: cannot list"):
        collect(str(tmp_path / "corpus"), glob="sub*/*.txt")
    # a directory the pattern cannot reach does not matter
    docs, _ = collect(str(tmp_path / "corpus"), glob="sub0/*.txt")
    assert docs and all(d.id.startswith("sub0/") for d in docs)
    monkeypatch.undo()

    def stat(self, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(SourceError, match="corpus: cannot read: Permission denied"):
        collect(str(tmp_path / "corpus"))
