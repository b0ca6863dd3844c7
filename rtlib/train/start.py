"""Start or resume a training run: the token store, the data iterator, the checkpointer and the
train state, either fresh from the seed or restored from the run directory's latest checkpoint.

Resuming is exact: the checkpoint holds every array that changes, the RNG key, the data
iterator's position and the tokens seen, so a resumed run reproduces an uninterrupted one bit
for bit (`Session.meta` is what each checkpoint records for that).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
from jax.sharding import Mesh, NamedSharding

from rtlib import parallel
from rtlib.build import count_parameters
from rtlib.data.pipeline import train_dataset, train_iterator
from rtlib.data.store import StoreError, TokenStore
from rtlib.parallel.rules import batch_sharding
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.run_dir import check_compatible, write_spec
from rtlib.train.step import TrainState, abstract_state, init_sharded


@dataclass
class Session:
    """One invocation's training run: what it reads from, saves to, and the state it advances
    (`ts`, `tokens_seen`), from step `start`. Only process 0 (`primary`) writes files."""

    spec: Spec
    mesh: Mesh
    store: TokenStore
    data: grain.DatasetIterator  # its position goes into every checkpoint
    checkpointer: Checkpointer
    ts: TrainState
    tokens_seen: int
    start: int
    primary: bool
    rows: NamedSharding  # how the global batch's rows lie over the mesh
    batch_shape: tuple[int, ...]

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    @property
    def unit(self) -> str:
        """What bits are counted per in logs: "byte" for byte-level stores, else "token"."""
        return self.store.tokenizer.unit

    @property
    def can_eval(self) -> bool:
        return has_validation(self.store)

    def meta(self) -> dict:
        """A checkpoint's JSON: with the arrays, exactly what an exact resume needs."""
        return {"step": int(self.ts.step), "spec": self.spec.model_dump(mode="json"),
                "data": self.data.get_state(), "tokens_seen": self.tokens_seen}

    def save(self) -> None:
        """Checkpoint the current state (every process takes part)."""
        self.checkpointer.save(self.ts, self.meta())

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(spec: Spec) -> TokenStore:
    """The spec's token store; refused (StoreError) when its token ids overflow the model's
    vocabulary, which would fail late and obscurely inside the embedding."""
    store = TokenStore.open(spec.data.path)
    vocab = store.tokenizer.vocab_size
    if vocab > spec.model.vocab_size:
        raise StoreError(f"{spec.data.path}: its tokenizer has {vocab} token ids but "
                         f"model.vocab_size is {spec.model.vocab_size}")
    return store


def has_validation(store: TokenStore) -> bool:
    """Whether the store has a validation split to evaluate on (two tokens make one target)."""
    return "valid" in store.manifest["splits"] and store.num_tokens("valid") >= 2


def _where(mesh: Mesh) -> str:
    return (f"mesh {dict(mesh.shape)} over {mesh.size} device(s)"
            + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))


def start_or_resume(spec: Spec, mesh: Mesh, *, primary: bool,
                    say: Callable[[str], None]) -> Session:
    """The run of `spec.run_dir` on `mesh`: a new one from `run.seed`, or the existing one
    restored from its latest checkpoint (refused when the spec changes array shapes). Says
    which, with notes on spec changes that alter what the continuation computes."""
    run_dir = Path(spec.run_dir)
    store = open_store(spec)
    if not has_validation(store):
        say(f"note: {spec.data.path} has no validation tokens: no evaluation")
    run_dir.mkdir(parents=True, exist_ok=True)
    n, batch = spec.model.seq_len, spec.train.batch_size
    rows = batch_sharding(mesh, spec.mesh.rules)
    shard, shards = parallel.data_shard(rows, (batch, n + 1))
    with_answers = spec.train.loss_on == "answers"
    dataset = train_dataset(store, "train", seq_len=n, batch_size=batch, seed=spec.run.seed,
                            process_index=shard, process_count=shards, answers=with_answers)
    data = train_iterator(dataset, threads=spec.data.read_threads, prefetch=spec.data.prefetch)
    checkpointer = Checkpointer(run_dir, keep=spec.run.keep)
    try:
        ts, tokens_seen = _fresh_or_restored(spec, mesh, store, data, checkpointer,
                                             primary=primary, say=say)
    except BaseException:
        checkpointer.close()
        raise
    return Session(spec=spec, mesh=mesh, store=store, data=data, checkpointer=checkpointer,
                   ts=ts, tokens_seen=tokens_seen, start=int(ts.step), primary=primary,
                   rows=rows, batch_shape=(batch, 2, n + 1) if with_answers else (batch, n + 1))


def _fresh_or_restored(spec: Spec, mesh: Mesh, store: TokenStore, data: grain.DatasetIterator,
                       checkpointer: Checkpointer, *, primary: bool,
                       say: Callable[[str], None]) -> tuple[TrainState, int]:
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
    changes = check_compatible(checkpointer.read_meta(latest)["spec"], spec, run_dir)
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
