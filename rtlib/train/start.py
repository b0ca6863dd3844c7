"""Start or resume a training run: the token store, the data iterator, the checkpointer and the
train state, either fresh from the seed or restored from the run directory's latest checkpoint.

Resuming is exact: the checkpoint holds every array that changes, the RNG key, the data
iterator's position and the tokens seen, so a resumed run reproduces an uninterrupted one bit
for bit (`Session.meta` is what each checkpoint records for that). Each checkpoint also records
the token store's digest (`store_digest`): resuming on a store that changed since (prepared
again from another source, or another `data.path`) is refused unless asked for, and a store
replaced while the run reads it stops the run before its next save.

Process 0 holds an exclusive lock on the run directory (`run_dir.RunLock`) for the session's
lifetime: a second trainer on the same `run.dir` is refused.
"""

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
from jax.sharding import Mesh, NamedSharding

from rtlib import parallel
from rtlib.build import count_parameters
from rtlib.data import paired
from rtlib.data.images import check_axes, image_shape
from rtlib.data.pipeline import train_dataset, train_iterator
from rtlib.data.store import MANIFEST, StoreError, TokenStore, open_kvstore
from rtlib.errors import RunError
from rtlib.objectives import check_special_ids
from rtlib.parallel.rules import batch_sharding
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.run_dir import RunLock, check_compatible, make_run_dir, write_spec
from rtlib.train.step import TrainState, abstract_state, init_sharded


@dataclass
class Session:
    """One invocation's training run: what it reads from, saves to, and the state it advances
    (`ts`, `tokens_seen`), from step `start`. Only process 0 (`primary`) writes files."""

    spec: Spec
    mesh: Mesh
    store: TokenStore | paired.PairedStore
    data: grain.DatasetIterator  # its position goes into every checkpoint
    checkpointer: Checkpointer
    ts: TrainState
    tokens_seen: int
    start: int
    primary: bool
    rows: NamedSharding  # how the global batch's rows lie over the mesh
    batch_shape: tuple[int, ...]
    store_digest: str  # of the store as opened; recorded in every checkpoint
    lock: RunLock | None = None  # process 0's lock on the run directory

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    @property
    def unit(self) -> str:
        """What bits are counted per in logs: "dim" (a channel byte) for image stores, "byte"
        for other byte-level stores, else "token"."""
        return "dim" if image_shape(self.store.manifest) else self.store.tokenizer.unit

    @property
    def can_eval(self) -> bool:
        return has_validation(self.store)

    def meta(self) -> dict:
        """A checkpoint's JSON: with the arrays, exactly what an exact resume needs, and the
        digest of the store it was trained on."""
        return {"step": int(self.ts.step), "spec": self.spec.model_dump(mode="json"),
                "data": self.data.get_state(), "tokens_seen": self.tokens_seen,
                "store_digest": self.store_digest}

    def save(self) -> None:
        """Checkpoint the current state (every process takes part), unless the token store
        changed under the run (StoreError)."""
        self.check_store(int(self.ts.step))
        self.checkpointer.save(self.ts, self.meta())

    def check_store(self, step: int, *, collective: bool = True) -> None:
        """StoreError if the token store is no longer the one this session opened (e.g.
        `rtlib data prepare --force` on it while training): the state after `step` may hold
        batches of either, so it is not saved. With `collective`, every process must call it
        and all raise together; else only this process looks (e.g. after its read failed)."""
        now = current_digest(self.spec.data.path)
        changed = now != self.store_digest
        if collective:
            (changed,) = parallel.any_process(changed)
        if changed:
            kept = self.checkpointer.latest()
            raise StoreError(
                f"{self.spec.data.path} changed while this run was reading it (store digest "
                f"{_short(self.store_digest)} is now {_short(now)}; prepared again?); stopped "
                f"at step {step} without saving. "
                + (f"The newest checkpoint (step {kept}) was trained on the old store. "
                   if kept is not None else "")
                + "Restore the old store, or resume on this one with --accept-store-change.")

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(spec: Spec) -> TokenStore | paired.PairedStore:
    """The spec's token store; refused (StoreError) when its token ids overflow the model's
    vocabulary, which would fail late and obscurely inside the embedding, or when per-axis
    positions do not describe its images. An encoder-decoder's is a paired store."""
    if spec.model.kind == "encoder_decoder":
        return paired.open_for(spec)
    store = TokenStore.open(spec.data.path)
    vocab = store.tokenizer.vocab_size
    store.check_fits(spec.model.vocab_size, spec.data.tokenizer)
    check_axes(spec.model.embedding.axes, store)
    check_special_ids(spec, vocab, spec.data.path)
    return store


def store_digest(manifest: dict) -> str:
    """SHA-256 of a store's manifest without its creation time and format version: what its
    tokens are (source digest, split, tokenizer, counts, boundaries). The same source prepared
    again with the same settings has the same digest."""
    content = {k: v for k, v in manifest.items() if k not in ("created", "version")}
    return hashlib.sha256(json.dumps(content, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def current_digest(location: str) -> str | None:
    """The digest of the store at `location` now; None without a readable manifest (e.g.
    while it is being prepared again)."""
    try:
        found = open_kvstore(location).read(MANIFEST).result()
        return _digest_of(bytes(found.value)) if found.state == "value" else None
    except (ValueError, OSError, RuntimeError):  # unreadable: as good as no manifest
        return None


@functools.lru_cache(maxsize=4)
def _digest_of(manifest: bytes) -> str:
    # Checked at every save: an unchanged manifest (the same bytes) is not parsed again.
    return store_digest(json.loads(manifest))


def _short(digest: str | None) -> str:
    return digest[:16] if digest else "(no manifest)"


def has_validation(store: TokenStore | paired.PairedStore) -> bool:
    """Whether the store has a validation split to evaluate on (two tokens make one target)."""
    return "valid" in store.manifest["splits"] and store.num_tokens("valid") >= 2


def _where(mesh: Mesh) -> str:
    return (f"mesh {dict(mesh.shape)} over {mesh.size} device(s)"
            + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))


def lock_run_dir(run_dir: Path, *, primary: bool, say: Callable[[str], None]) -> RunLock | None:
    """Create the run directory and, on process 0, lock it; every process raises RunError
    when that fails anywhere (the decision is collective, so none waits for the others)."""
    lock, error = None, None
    try:
        make_run_dir(run_dir)
        if primary:
            lock = RunLock(run_dir)
            note = lock.acquire()
            if note:
                say(note)
    except RunError as e:
        error = e
    (failed,) = parallel.any_process(error is not None)
    if failed:
        if lock is not None:
            lock.release()
        raise error or RunError(f"{run_dir}: another process of this job could not use the "
                                "run directory (see its error)")
    return lock


def start_or_resume(spec: Spec, mesh: Mesh, *, primary: bool, say: Callable[[str], None],
                    accept_store_change: bool = False) -> Session:
    """The run of `spec.run_dir` on `mesh`: a new one from `run.seed`, or the existing one
    restored from its latest checkpoint (refused when the spec changes array shapes, or when
    the token store is not the one the checkpoint was trained on, unless
    `accept_store_change`). Says which, with notes on spec changes that alter what the
    continuation computes. Process 0 holds the run directory's lock until the session closes."""
    run_dir = Path(spec.run_dir)
    store = open_store(spec)
    digest = store_digest(store.manifest)
    if not has_validation(store):
        say(f"note: {spec.data.path} has no validation tokens: no evaluation")
    if isinstance(store, paired.PairedStore) and (note := paired.fit_note(
            store, spec.model.seq_len, spec.model.decoder.seq_len)):
        say(note)
    lock = lock_run_dir(run_dir, primary=primary, say=say)
    try:
        return _start(spec, mesh, store, digest, lock, primary=primary, say=say,
                      accept_store_change=accept_store_change)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _start(spec: Spec, mesh: Mesh, store: TokenStore | paired.PairedStore, digest: str,
           lock: RunLock | None, *,
           primary: bool, say: Callable[[str], None], accept_store_change: bool) -> Session:
    run_dir = Path(spec.run_dir)
    n, batch = spec.model.seq_len, spec.train.batch_size
    rows = batch_sharding(mesh, spec.mesh.rules)
    with_answers = spec.train.loss_on == "answers"
    batch_shape = (batch, 2, n + 1) if with_answers else (batch, n + 1)
    if isinstance(store, paired.PairedStore):
        batch_shape = (batch, paired.row_length(spec))
        shard, shards = parallel.data_shard(rows, batch_shape)
        dataset = paired.train_pairs(spec, store, process_index=shard, process_count=shards)
    else:
        shard, shards = parallel.data_shard(rows, (batch, n + 1))
        dataset = train_dataset(store, "train", seq_len=n, batch_size=batch,
                                seed=spec.run.seed, process_index=shard,
                                process_count=shards, answers=with_answers)
    data = train_iterator(dataset, threads=spec.data.read_threads, prefetch=spec.data.prefetch)
    checkpointer = Checkpointer(run_dir, keep=spec.run.keep)
    try:
        ts, tokens_seen = _fresh_or_restored(spec, mesh, store, data, checkpointer, digest,
                                             primary=primary, say=say,
                                             accept_store_change=accept_store_change)
    except BaseException:
        checkpointer.close()
        raise
    return Session(spec=spec, mesh=mesh, store=store, data=data, checkpointer=checkpointer,
                   ts=ts, tokens_seen=tokens_seen, start=int(ts.step), primary=primary,
                   rows=rows, batch_shape=batch_shape,
                   store_digest=digest, lock=lock)


def _check_store(saved: str | None, digest: str, spec: Spec, run_dir: Path, step: int, *,
                 accept: bool, say: Callable[[str], None]) -> None:
    """Refuse (StoreError) to resume on another store than the checkpoint's, unless `accept`.
    Checkpoints written before digests were recorded (`saved` None) resume as they are."""
    if saved is None or saved == digest:
        return
    if accept:
        say(f"note: {spec.data.path} is not the store this run was trained on (digest "
            f"{_short(saved)} -> {_short(digest)}); continuing on it as asked "
            "(--accept-store-change)")
        return
    raise StoreError(
        f"{run_dir} (step {step}) was trained on a token store with digest {_short(saved)}, "
        f"but {spec.data.path} now has digest {_short(digest)} (prepared again from another "
        "source, or another data.path?); its data position belongs to the old store. Restore "
        "the old store, use a new run.dir, or pass --accept-store-change to `rtlib train` to "
        "continue on this one.")


def _fresh_or_restored(spec: Spec, mesh: Mesh, store: TokenStore | paired.PairedStore,
                       data: grain.DatasetIterator,
                       checkpointer: Checkpointer, digest: str, *, primary: bool,
                       say: Callable[[str], None],
                       accept_store_change: bool) -> tuple[TrainState, int]:
    """(state, tokens seen): from the seed, or from the latest checkpoint, whose iterator
    position `data` takes on."""
    run_dir = Path(spec.run_dir)
    latest = checkpointer.latest()
    if latest is None:
        ts = init_sharded(spec, mesh, key=jax.random.key(spec.run.seed))
        if primary:
            write_spec(run_dir, spec)
        say(f"new run {run_dir}: {count_parameters(ts.model):,} parameters, "
            f"{store.num_tokens('train'):,} training tokens in {spec.data.path}; {_where(mesh)}")
        return ts, 0
    saved_meta = checkpointer.read_meta(latest)
    changes = check_compatible(saved_meta["spec"], spec, run_dir)
    _check_store(saved_meta.get("store_digest"), digest, spec, run_dir, latest,
                 accept=accept_store_change, say=say)
    ts, meta = checkpointer.restore(latest, abstract_state(spec, mesh))
    data.set_state(meta["data"])
    if primary:
        write_spec(run_dir, spec)
    say(f"resuming {run_dir} from step {latest} on {_where(mesh)}" +
        (f" (spec changes: {'; '.join(changes)})" if changes else ""))
    _note_changes(spec, changes, say)
    return ts, meta["tokens_seen"]


def _note_changes(spec: Spec, changes: list[str], say: Callable[[str], None]) -> None:
    """Allowed spec changes that still make the continuation differ from an uninterrupted
    run: said, so nobody expects the same curve."""
    if any(c.startswith("train.batch_size:") for c in changes):
        say("note: train.batch_size changed: the data stream goes on from a different position "
            "than an uninterrupted run's would")
    if any(c.startswith("train.steps:") for c in changes) and \
            spec.train.schedule == "cosine" and spec.train.decay_steps is None:
        say("note: the cosine schedule ends at train.steps, which changed: learning rates from "
            "here differ from the original plan (set train.decay_steps to keep them)")
