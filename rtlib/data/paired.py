"""Paired data for encoder-decoders: (source, target) examples as two aligned token stores.

A paired store at `OUT` is two ordinary token stores, `OUT/source` and `OUT/target`, in which
document i of a split is example i's source (resp. target), plus `OUT/manifest.json` (format
`rtlib-paired-store`), written last: without it the store is incomplete and never read. Both
sub-stores are written through `rtlib.data.store`'s writing API and keep its guarantees (every
chunk stored and checked when opened, only rtlib's own keys ever deleted); the paired manifest
records each one's digest, so a sub-store replaced on its own is refused.

Sources: `.jsonl` files with one JSON object per line (`rtlib data prepare --paired`; the key
names are configurable), split like documents (`rtlib.data.prepare.assign_splits`: by a seeded
hash of each example's id, `FILE:LINE`); and the synthetic `reverse` task (`rtlib data synth
reverse`): a line of letters and the same line reversed. Tokens are UTF-8 bytes.

Batches pack each pair into one int32 row: the source padded to the model's `seq_len`, then
`[start, target..., end]` padded to `decoder.seq_len + 1` (`rtlib.objectives.split_pairs`).
"""

import datetime
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grain
import numpy as np
from tqdm import tqdm

from rtlib.data.prepare import assign_splits, check_fractions
from rtlib.data.store import (
    FORMAT,
    MANIFEST,
    SPLITS,
    VERSION,
    TokenStore,
    begin_write,
    check_target,
    finish_write,
    open_kvstore,
    split_array,
    wait,
)
from rtlib.data.tokenizer import ByteTokenizer
from rtlib.errors import BadArgument, SourceError, StoreError
from rtlib.objectives import PAD, check_special_ids
from rtlib.spec.schema import Spec

PAIRED_FORMAT = "rtlib-paired-store"
FIELDS = ("source", "target")
CACHE_BYTES = 64 << 20  # a split smaller than this is read into memory once, whole
LETTERS = b"abcdefghijklmnopqrstuvwxyz"

Pair = tuple[bytes, bytes]


def paired_manifest(location: str) -> dict | None:
    """The manifest of the paired store at `location`, or None where there is none."""
    found = wait(open_kvstore(location).read(MANIFEST), location, f"read {MANIFEST}")
    if found.state != "value":
        return None
    try:
        manifest = json.loads(bytes(found.value))
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and \
        manifest.get("format") == PAIRED_FORMAT else None


def summary(location: str, manifest: dict, *, kept: bool = False) -> str:
    """What `rtlib data prepare --paired` and `rtlib data synth reverse` print."""
    counts = ", ".join(f"{s} {v['examples']:,} examples ({v['source_tokens']:,} source / "
                       f"{v['target_tokens']:,} target tokens, at most "
                       f"{v['max_source_tokens']} / {v['max_target_tokens']})"
                       for s, v in manifest["splits"].items())
    line = (f"{location}: paired store, byte-level; {counts}; source sha256 "
            f"{manifest['source']['sha256'][:16]}")
    return (f"{location}: already made from this source with these settings; kept\n"
            if kept else "") + line


# --- writing ---------------------------------------------------------------------------------


def write_pairs(out: str, splits: dict[str, list[Pair]], *, described: dict, settings: dict,
                force: bool = False, progress: bool = True) -> dict:
    """Write `splits` (split -> examples) as a paired store at `out`; returns its manifest.
    An intact paired store of the same content and settings is kept as it is; any other store
    there is replaced only with `force`."""
    digest = _digest(splits)
    kv = open_kvstore(out)
    old = _existing(out, kv, force=force)
    same = old is not None and old["source"].get("sha256") == digest and \
        old.get("split") == settings
    if old is not None and not force:
        if not same:
            raise StoreError(f"{out}: a paired store from another source or split is already "
                             "there; pass --force to replace it")
        try:
            PairedStore.open(out)
            return old
        except StoreError:
            pass  # damaged (e.g. a chunk lost): written again, nothing of it is lost
    # The paired manifest goes first (and any token store's arrays with --force), then each
    # half's: an interrupted write is never read as complete.
    begin_write(out, kv)
    tok = ByteTokenizer()
    subs, stats = {}, {s: {"examples": len(p)} for s, p in splits.items()}
    with tqdm(total=2 * sum(len(p) for p in splits.values()), desc=f"write {out}",
              unit="doc", disable=not progress) as bar:
        for index, name in enumerate(FIELDS):
            location = _join(out, name)
            sub_kv = open_kvstore(location)
            begin_write(location, sub_kv)
            parts = {}
            for split, pairs in splits.items():
                parts[split] = _write_split(location, split, [p[index] for p in pairs], tok)
                lengths = np.diff([*parts[split]["boundaries"], parts[split]["tokens"]])
                stats[split][f"max_{name}_tokens"] = int(lengths.max(initial=0))
                stats[split][f"{name}_tokens"] = parts[split]["tokens"]
                bar.update(len(pairs))
            manifest = {
                "format": FORMAT, "version": VERSION, "created": _now(),
                "tokenizer": tok.describe(), "dtype": np.dtype(tok.dtype).name,
                "source": {**described, "field": name, "sha256": digest}, "split": settings,
                "splits": parts,
            }
            finish_write(location, sub_kv, manifest)
            subs[name] = _content_digest(manifest)
    for split, info in stats.items():
        # what is scored: every target token and each example's end token
        info["tokens"] = info["target_tokens"] + info["examples"]
        info["documents"] = info["examples"]
    manifest = {"format": PAIRED_FORMAT, "version": 1, "created": _now(),
                "tokenizer": tok.describe(), "fields": list(FIELDS), "stores": subs,
                "source": {**described, "sha256": digest}, "split": settings, "splits": stats}
    finish_write(out, kv, manifest)
    return manifest


def _existing(out: str, kv, *, force: bool) -> dict | None:
    """The paired manifest at `out`, None when there is none; anything that is neither a
    paired store nor empty (nor an interrupted write) is refused unless `force`."""
    found = wait(kv.read(MANIFEST), out, f"read {MANIFEST}")
    if found.state == "value":
        try:
            manifest = json.loads(bytes(found.value))
        except ValueError:
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == PAIRED_FORMAT:
            return manifest
    if check_target(out, kv, force=force) is not None and not force:
        raise StoreError(f"{out}: a token store (not a paired one) is already there; pass "
                         "--force to replace it")
    return None


def _write_split(location: str, split: str, docs: list[bytes], tok: ByteTokenizer) -> dict:
    boundaries = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])
    total = int(boundaries[-1])
    array = split_array(location, split, create_shape=total, dtype=tok.dtype)
    if total:
        wait(array[0:total].write(np.frombuffer(b"".join(docs), np.uint8)), location,
             "write the arrays")
    return {"tokens": total, "bytes": total, "documents": len(docs),
            "boundaries": boundaries[:-1].tolist()}


def _digest(splits: dict[str, list[Pair]]) -> str:
    digest = hashlib.sha256()
    for split, pairs in splits.items():
        for source, target in pairs:
            digest.update(f"{split}\0{len(source)}\0{len(target)}\0".encode())
            digest.update(source)
            digest.update(target)
    return digest.hexdigest()


def _content_digest(manifest: dict) -> str:
    """A sub-store's manifest without its creation time: what it holds."""
    content = {k: v for k, v in manifest.items() if k not in ("created", "version")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def read_jsonl(source: str, *, source_key: str = "source",
               target_key: str = "target") -> tuple[list[str], list[Pair], dict]:
    """(example ids, pairs, description) of a `.jsonl` file or a directory of them (sorted by
    path). Every line must be a JSON object with string values under both keys."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise SourceError(f"{source}: no .jsonl file in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise SourceError(f"{source}: no such file or directory")
    ids, pairs = [], []
    for file in files:
        name = file.name if file == path else str(file.relative_to(path))
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{file}: cannot read as UTF-8 text: {e}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise SourceError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{where}: a line must be a JSON object with "
                                  f"{source_key!r} and {target_key!r}")
            pair = []
            for key in (source_key, target_key):
                value = record.get(key)
                if not isinstance(value, str):
                    found = ", ".join(map(repr, record)) or "none"
                    raise SourceError(
                        f"{where}: {key!r} must be a string, got "
                        f"{'nothing' if value is None else type(value).__name__} (keys: "
                        f"{found}; choose others with --source-key / --target-key)")
                pair.append(value.encode("utf-8"))
            ids.append(f"{name}:{number}")
            pairs.append((pair[0], pair[1]))
    if not pairs:
        raise SourceError(f"{source}: no examples (every line was empty)")
    described = {"kind": "jsonl", "path": str(path.resolve()), "files": len(files),
                 "keys": {"source": source_key, "target": target_key}, "examples": len(pairs)}
    return ids, pairs, described


def prepare_pairs(source: str, out: str, *, source_key: str = "source",
                  target_key: str = "target", valid: float = 0.05, test: float = 0.05,
                  seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """`rtlib data prepare --paired`: the examples of `source` (`.jsonl`) split by a seeded
    hash of their ids, written as a paired store at `out`; returns the manifest."""
    check_fractions(valid, test)
    ids, pairs, described = read_jsonl(source, source_key=source_key, target_key=target_key)
    try:
        chosen = assign_splits(ids, valid=valid, test=test, seed=seed)
    except SourceError as e:
        raise SourceError(f"{source}: {e}") from None
    splits = {split: [pairs[i] for i in idx] for split, idx in chosen.items()}
    settings = {"valid": valid, "test": test, "seed": seed, "by": "example"}
    return write_pairs(out, splits, described=described, settings=settings, force=force,
                       progress=progress)


@dataclass(frozen=True)
class ReverseOptions:
    """The synthetic `reverse` task: lines of 1 to `chars` lowercase letters, each paired with
    the line reversed; `train` / `valid` / `test` examples, drawn from `seed`."""

    chars: int = 12
    train: int = 4096
    valid: int = 256
    test: int = 256
    seed: int = 0

    def check(self) -> None:
        """BadArgument naming every flag out of range."""
        problems = [f"--{name} must be >= {low}, got {getattr(self, name)}"
                    for name, low in (("chars", 1), ("train", 1), ("valid", 0), ("test", 0))
                    if getattr(self, name) < low]
        if problems:
            raise BadArgument("; ".join(problems))


def reverse_examples(n: int, chars: int, rng: np.random.Generator) -> list[Pair]:
    """`n` (line, reversed line) pairs of 1 to `chars` lowercase letters."""
    lengths = rng.integers(1, chars + 1, n)
    letters = np.frombuffer(LETTERS, np.uint8)
    out = []
    for length in lengths:
        line = letters[rng.integers(0, len(letters), length)].tobytes()
        out.append((line, line[::-1]))
    return out


def synth_reverse(out: str, options: ReverseOptions = ReverseOptions(), *,
                  force: bool = False, progress: bool = True) -> dict:
    """`rtlib data synth reverse OUT`: a paired store of the reverse task. Each split draws from
    its own stream, so its examples do not depend on how many the others have."""
    options.check()
    splits = {split: reverse_examples(getattr(options, split), options.chars,
                                      np.random.default_rng([options.seed, index]))
              for index, split in enumerate(SPLITS) if getattr(options, split)}
    described = {"kind": "synthetic", "task": "reverse", "settings": asdict(options)}
    return write_pairs(out, splits, described=described,
                       settings={"by": "example", "seed": options.seed}, force=force,
                       progress=progress)


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedStore:
    """A paired store opened for reading: its manifest and the two token stores."""

    location: str
    manifest: dict
    source: TokenStore
    target: TokenStore
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def open(cls, location: str) -> "PairedStore":
        """Open and check the paired store at `location` (StoreError when it is missing,
        incomplete, not a paired store, or its two halves do not belong together)."""
        kv = open_kvstore(location)
        found = wait(kv.read(MANIFEST), location, f"read {MANIFEST}")
        if found.state != "value":
            raise StoreError(f"{location}: no paired store here ({MANIFEST} is missing; an "
                             "interrupted write also leaves none). Make one with `rtlib data "
                             f"prepare PAIRS.jsonl {location} --paired` or `rtlib data synth "
                             f"reverse {location}`")
        try:
            manifest = json.loads(bytes(found.value))
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != PAIRED_FORMAT:
            kind = "a token store" if isinstance(manifest, dict) and \
                manifest.get("format") == FORMAT else "not an rtlib store"
            raise StoreError(f"{location}: {kind}, not a paired store: an encoder-decoder "
                             "trains on (source, target) pairs (`rtlib data prepare "
                             "PAIRS.jsonl OUT --paired`)")
        halves = {name: TokenStore.open(_join(location, name)) for name in FIELDS}
        for name, store in halves.items():
            if _content_digest(store.manifest) != manifest["stores"][name]:
                raise StoreError(f"{location}: its {name} half is not the one written with "
                                 "it (replaced since?); prepare the paired store again")
        return cls(location, manifest, halves["source"], halves["target"])

    @property
    def tokenizer(self) -> ByteTokenizer:
        """The tokenizer of both halves."""
        return self.target.tokenizer

    def num_tokens(self, split: str) -> int:
        """Target tokens of `split` the loss scores (each example's end token included)."""
        self._check_split(split)
        return int(self.manifest["splits"][split]["tokens"])

    def examples(self, split: str) -> int:
        """Examples in `split`."""
        self._check_split(split)
        return int(self.manifest["splits"][split]["examples"])

    def has_answers(self, split: str) -> bool:
        """Paired stores have no answer masks (kept for code that asks any store)."""
        return False

    def pair(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Example `index` of `split`: (source ids, target ids), int32."""
        return self._document(self.source, split, index), \
            self._document(self.target, split, index)

    def _document(self, store: TokenStore, split: str, index: int) -> np.ndarray:
        info = store.manifest["splits"][split]
        bounds = info["boundaries"]
        start = bounds[index]
        stop = bounds[index + 1] if index + 1 < len(bounds) else info["tokens"]
        if info["tokens"] > CACHE_BYTES:
            return store.read(split, start, stop)
        key = (id(store), split)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = store.read(split, 0, info["tokens"])
        return self._cache[key][start:stop]

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.location}: no split {split!r}; it has "
                             f"{', '.join(self.manifest['splits'])}")


def pack_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], *, source_len: int, seq_len: int,
               start_id: int, end_id: int) -> np.ndarray:
    """int32 [len(pairs), source_len + seq_len + 1]: per pair the source (cut to `source_len`)
    padded with `PAD`, then `[start, target (cut to seq_len - 1), end]` padded with `PAD`."""
    rows = np.full((len(pairs), source_len + seq_len + 1), PAD, np.int32)
    for row, (source, target) in zip(rows, pairs, strict=True):
        source, target = source[:source_len], target[:seq_len - 1]
        row[:len(source)] = source
        decoder = row[source_len:]
        decoder[0] = start_id
        decoder[1:1 + len(target)] = target
        decoder[1 + len(target)] = end_id
    return rows


def fit_note(store: PairedStore, source_len: int, seq_len: int) -> str | None:
    """A note when some examples of the store are longer than the model takes (they are cut)."""
    too_long = [f"{split}: sources up to {info['max_source_tokens']} tokens, targets up to "
                f"{info['max_target_tokens']}" for split, info in store.manifest["splits"].items()
                if info["max_source_tokens"] > source_len or
                info["max_target_tokens"] > seq_len - 1]
    if not too_long:
        return None
    return (f"note: {store.location} has examples longer than the model takes (model.seq_len="
            f"{source_len} source tokens, decoder.seq_len - 1 = {seq_len - 1} target tokens); "
            f"they are cut ({'; '.join(too_long)})")


def paired_dataset(store: PairedStore, split: str, *, source_len: int, seq_len: int,
                   start_id: int, end_id: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Batches of packed pairs, int32 [batch_size // process_count, source_len + seq_len + 1]:
    this data shard's rows of every global batch, examples shuffled by `seed`, epoch after
    epoch (as `rtlib.data.pipeline.train_dataset` does for windows)."""
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} is not divisible by {process_count} "
                         "processes")
    n = store.examples(split)
    if n == 0:
        raise StoreError(f"{store.location}: split {split!r} has no examples")

    def read(index: int) -> np.ndarray:
        return pack_pairs([store.pair(split, index)], source_len=source_len, seq_len=seq_len,
                          start_id=start_id, end_id=end_id)[0]

    return (grain.MapDataset.range(n)
            .shuffle(seed=seed)
            .repeat()
            .map(read)
            .batch(batch_size // process_count, drop_remainder=True)
            [process_index::process_count])


def pair_batches(store: PairedStore, split: str, *, source_len: int, seq_len: int,
                 start_id: int, end_id: int, batch_size: int, max_tokens: int | None = None
                 ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Every example of `split` once, in order (or the first ones holding `max_tokens` target
    tokens): (packed batch [batch_size, row] padded with empty rows, the full targets of its
    real rows, for exact match)."""
    n = store.examples(split)
    if n == 0:
        raise StoreError(f"{store.location}: split {split!r} has no examples to evaluate")
    taken, scored = 0, 0
    while taken < n and (max_tokens is None or scored < max_tokens):
        pairs = []
        while len(pairs) < batch_size and taken < n and (max_tokens is None or
                                                         scored < max_tokens):
            pairs.append(store.pair(split, taken))
            scored += len(pairs[-1][1]) + 1
            taken += 1
        rows = pack_pairs(pairs, source_len=source_len, seq_len=seq_len, start_id=start_id,
                          end_id=end_id)
        batch = np.full((batch_size, rows.shape[1]), PAD, np.int32)
        batch[:len(rows)] = rows
        yield batch, [t for _, t in pairs]


def open_for(spec: Spec) -> PairedStore:
    """An encoder-decoder spec's paired store, refused (StoreError) when its tokens overflow the
    model's vocabulary or the decoder's start and end ids are tokens of the data."""
    store = PairedStore.open(spec.data.path)
    vocab = store.tokenizer.vocab_size
    if vocab > spec.model.vocab_size:
        raise StoreError(f"{spec.data.path}: its tokenizer has {vocab} token ids but "
                         f"model.vocab_size is {spec.model.vocab_size}")
    check_special_ids(spec, vocab, spec.data.path)
    return store


def train_pairs(spec: Spec, store: PairedStore, *, process_index: int = 0,
                process_count: int = 1) -> grain.MapDataset:
    """`paired_dataset` of the training split with the spec's lengths, ids, batch and seed."""
    m = spec.model
    return paired_dataset(store, "train", source_len=m.seq_len, seq_len=m.decoder.seq_len,
                          start_id=m.decoder.start_id, end_id=m.decoder.end_id,
                          batch_size=spec.train.batch_size, seed=spec.run.seed,
                          process_index=process_index, process_count=process_count)


def row_length(spec: Spec) -> int:
    """Length of a packed batch row of an encoder-decoder spec."""
    return spec.model.seq_len + spec.model.decoder.seq_len + 1
