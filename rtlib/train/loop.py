"""`rtlib train`: the training job. Resumes an existing run directory exactly where it stopped.

Per step: one grain batch (this process's rows of the global batch), one jitted step on the
spec's mesh (donating the previous state), a finiteness check. On several processes every
process runs this same loop in lockstep; process 0 alone prints, shows progress and writes
metrics.jsonl and spec.yaml, and a stop signal seen by any process stops all of them at the
same step.
Every `run.log_every` steps a line in metrics.jsonl; every `run.eval_every` steps a validation
line; checkpoints every `run.checkpoint_every` steps or `run.checkpoint_minutes`, at the end and
on SIGTERM/SIGINT. A resumed run reproduces an uninterrupted one bit for bit: the checkpoint
holds every array that changes, the RNG key and the data iterator's position.
"""

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
from tqdm import tqdm

from rtlib import parallel
from rtlib.build import count_parameters
from rtlib.data.pipeline import train_dataset, train_iterator
from rtlib.data.store import StoreError, TokenStore
from rtlib.errors import NonFiniteLoss, UnsupportedModel
from rtlib.evaluate import evaluate
from rtlib.parallel.rules import batch_sharding
from rtlib.sample import Sampling, generate
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.optim import learning_rate
from rtlib.train.run_dir import METRICS_FILE, check_compatible, write_spec
from rtlib.train.step import abstract_state, init_routing, init_sharded, train_step_for

LN2 = math.log(2)




@dataclass
class TrainResult:
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)  # every step's loss of this invocation
    eval: dict | None = None
    stopped_by: str | None = None  # signal name when interrupted
    sample: str | None = None


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals are not ours to take
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Metrics:
    """metrics.jsonl: appended and flushed line by line; on resume, lines after the restored
    step (written after the last checkpoint, and about to be recomputed) are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")  # a kill mid-rewrite keeps the old file
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _NoMetrics:
    """What processes other than 0 write: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a killed process."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _headline(out: dict, unit: str) -> str:
    line = f"{out[f'bits_per_{unit}']:.3f} bits/{unit}"
    if "answer_accuracy" in out:
        line += f", answer accuracy {out['answer_accuracy']:.3f}"
    return line


def _open_data(spec: Spec) -> TokenStore:
    store = TokenStore.open(spec.data.path)
    vocab = store.tokenizer.vocab_size
    if vocab > spec.model.vocab_size:
        raise StoreError(f"{spec.data.path}: its tokenizer has {vocab} token ids but "
                         f"model.vocab_size is {spec.model.vocab_size}")
    return store


def train(spec: Spec, *, progress: bool = True, print_fn=print,
          devices: list | None = None) -> TrainResult:
    """Train (or resume) `spec.run_dir`. Starts `jax.distributed` first when the spec or the
    environment asks; `devices` (default: all) is what the spec's mesh is laid over."""
    if spec.model.kind != "decoder":
        raise UnsupportedModel("rtlib train optimises the next-token loss, which needs a decoder "
                         "(model.kind: decoder); an encoder needs a masked-token objective, "
                         "not implemented yet")
    parallel.initialize(spec.distributed)
    primary = jax.process_index() == 0
    if not primary:
        print_fn = lambda *args, **kwargs: None
        progress = False
    mesh = parallel.make_mesh(spec, devices)
    rules = spec.mesh.rules
    run_dir = Path(spec.run_dir)
    store = _open_data(spec)
    can_eval = "valid" in store.manifest["splits"] and store.num_tokens("valid") >= 2
    if not can_eval:
        print_fn(f"note: {spec.data.path} has no validation tokens: no evaluation")
    run_dir.mkdir(parents=True, exist_ok=True)
    n, batch = spec.model.seq_len, spec.train.batch_size
    unit = store.tokenizer.unit
    rows = batch_sharding(mesh, rules)
    shard, shards = parallel.data_shard(rows, (batch, n + 1))
    with_answers = spec.train.loss_on == "answers"
    dataset = train_dataset(store, "train", seq_len=n, batch_size=batch, seed=spec.run.seed,
                            process_index=shard, process_count=shards, answers=with_answers)
    batch_shape = (batch, 2, n + 1) if with_answers else (batch, n + 1)
    data = train_iterator(dataset, threads=spec.data.read_threads, prefetch=spec.data.prefetch)
    ckpt = Checkpointer(run_dir, keep=spec.run.keep)
    latest = ckpt.latest()
    tokens_seen = 0
    where = (f"mesh {dict(mesh.shape)} over {mesh.size} device(s)"
             + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if latest is None:
        ts = init_sharded(spec, mesh, key=jax.random.key(spec.run.seed))
        if primary:
            write_spec(run_dir, spec)
        print_fn(f"new run {run_dir}: {count_parameters(ts.model):,} parameters, "
                 f"{store.num_tokens('train'):,} training tokens in {spec.data.path}; {where}")
    else:
        meta = ckpt.read_meta(latest)
        changes = check_compatible(meta["spec"], spec, run_dir)
        ts, meta = ckpt.restore(latest, abstract_state(spec, mesh))
        data.set_state(meta["data"])
        tokens_seen = meta["tokens_seen"]
        if primary:
            write_spec(run_dir, spec)
        print_fn(f"resuming {run_dir} from step {latest} on {where}" +
                 (f" (spec changes: {'; '.join(changes)})" if changes else ""))
        if any(c.startswith("train.batch_size:") for c in changes):
            print_fn("note: train.batch_size changed: the data stream goes on from a "
                     "different position than an uninterrupted run's would")
        if any(c.startswith("train.steps:") for c in changes) and \
                spec.train.schedule == "cosine" and spec.train.decay_steps is None:
            print_fn("note: the cosine schedule ends at train.steps, which changed: learning "
                     "rates from here differ from the original plan (set train.decay_steps "
                     "to keep them)")
    start = int(ts.step)
    result = TrainResult(step=start, start_step=start)
    if start >= spec.train.steps:
        print_fn(f"{run_dir} is already at step {start} (train.steps={spec.train.steps}): "
                 "nothing to do; raise train.steps to train on")
        ckpt.close()
        return result
    metrics = _Metrics(run_dir / METRICS_FILE, start) if primary else _NoMetrics()
    step_fn = train_step_for(spec, mesh)
    lr_at = learning_rate(spec.train)
    last_saved, last_save_time = start, time.monotonic()
    last_eval: dict | None = None

    def meta_now() -> dict:
        return {"step": int(ts.step), "spec": spec.model_dump(mode="json"),
                "data": data.get_state(), "tokens_seen": tokens_seen}

    def save() -> None:
        nonlocal last_saved, last_save_time
        ckpt.save(ts, meta_now())
        last_saved, last_save_time = int(ts.step), time.monotonic()

    def run_eval(step: int) -> dict:
        nonlocal last_eval
        last_eval = {"step": step, **evaluate(ts.model, ts.routing, store, "valid",
                                              batch_size=batch, max_tokens=spec.data.eval_tokens,
                                              mesh=mesh, rules=rules)}
        metrics.write(last_eval)
        return last_eval

    bar = tqdm(total=spec.train.steps, initial=start, desc=f"train {run_dir.name}",
               unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    interval_tokens, interval_time = 0, 0.0

    def note(line: str) -> None:  # above the progress bar, on process 0 only
        if primary:
            bar.write(line)

    try:
        with _StopRequest() as stop:
            for step in range(start + 1, spec.train.steps + 1):
                t0 = time.perf_counter()
                tokens = parallel.global_batch(next(data), rows, batch_shape)
                if not bool(ts.routing.initialised):
                    ts = init_routing(tokens[:, 0] if with_answers else tokens, ts,
                                      key=jax.random.fold_in(jax.random.key(spec.run.seed),
                                                             0x5EED), mesh=mesh, rules=rules)
                    note("routing centroids initialised by k-means on the first batch")
                ts, m = step_fn(tokens, ts)
                loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    # A non-finite gradient poisons the parameters even when this loss is
                    # finite: never save that state.
                    what = f"loss ({loss})" if not math.isfinite(loss) else \
                        f"gradient norm ({grad_norm})"
                    kept = ckpt.latest()
                    where = (f"The last good checkpoint (step {kept}) is kept in "
                             f"{ckpt.directory}." if kept is not None else
                             "No checkpoint had been written yet.")
                    raise NonFiniteLoss(
                        f"non-finite {what} at step {step}; stopped without saving. {where} "
                        "Lower train.lr, add warm-up or clipping, then run the same command "
                        "again.")
                elapsed = time.perf_counter() - t0
                tokens_seen += batch * n
                result.losses.append(loss)
                result.step = step
                if step > start + 1:  # the first step of an invocation compiles
                    interval_tokens += batch * n
                    interval_time += elapsed
                speed = interval_tokens / interval_time if interval_time else None
                bar.update(1)
                bar.set_postfix(loss=f"{loss / LN2:.3f} bits", refresh=False,
                                **({"tok/s": f"{speed:,.0f}"} if speed else {}))
                if step % spec.run.log_every == 0 or step == start + 1 or \
                        step == spec.train.steps:
                    record = {"step": step, **{k: float(v) for k, v in m.items()},
                              "lr": float(lr_at(step - 1)), "tokens_per_s": speed,
                              "tokens_seen": tokens_seen,
                              f"bits_per_{unit}": float(m["lm_loss"]) / LN2, "step_s": elapsed}
                    metrics.write(record)
                    interval_tokens, interval_time = 0, 0.0
                if can_eval and spec.run.eval_every and step % spec.run.eval_every == 0:
                    out = run_eval(step)
                    note(f"step {step}: valid {_headline(out, unit)}")
                minutes = spec.run.checkpoint_minutes
                on_clock = bool(minutes) and time.monotonic() - last_save_time > 60 * minutes
                # Clocks and signals are per process; saving and stopping are collective.
                on_clock, stopping = parallel.any_process(on_clock, stop.signal is not None)
                if (spec.run.checkpoint_every and step % spec.run.checkpoint_every == 0) or \
                        on_clock:
                    save()
                if stopping:
                    stop.signal = stop.signal or signal.SIGTERM  # seen by another process
                    result.stopped_by = signal.Signals(stop.signal).name
                    break
        if result.step > last_saved:
            save()
        bar.close()
        if result.stopped_by:
            print_fn(f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved "
                     f"in {ckpt.directory}. Run the same command to resume.")
            return result
        if can_eval and (last_eval is None or last_eval["step"] != result.step):
            run_eval(result.step)
        result.eval = last_eval
        if last_eval is not None:
            print_fn(f"step {result.step}: valid {_headline(last_eval, unit)} "
                     f"over {last_eval['tokens']:,} tokens (uniform: "
                     f"{math.log2(store.tokenizer.vocab_size):.1f} bits/{unit})")
        if spec.run.sample_tokens:
            # One sequence: sampled on one device from a gathered copy, by process 0 only.
            model, routing = parallel.host_local((ts.model, ts.routing))
            tok = store.tokenizer
            try:
                prompt = tok.encode(spec.run.sample_prompt)
            except ValueError as e:  # a synthetic vocabulary has no text prompt
                prompt = None
                print_fn(f"no sample: run.sample_prompt cannot be encoded ({e})")
            if primary and prompt is not None:
                out = generate(model, routing, prompt,
                               max_new_tokens=spec.run.sample_tokens,
                               sampling=Sampling(temperature=0.8, top_p=0.95),
                               vocab_limit=tok.vocab_size, key=jax.random.key(spec.run.seed))
                result.sample = tok.decode(out)
                print_fn(f"sample (temperature 0.8, top-p 0.95):\n{result.sample}")
        return result
    finally:
        bar.close()
        metrics.close()
        ckpt.close()


