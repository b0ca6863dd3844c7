"""`rtlib train`: the training job. Resumes an existing run directory exactly where it stopped.

`train` drives parts that each own one concern: `start.start_or_resume` (run directory lock,
store, data iterator, checkpointer, state), `stepper.Stepper` (one jitted step and its health
check, `finite`), `train_log.TrainLog` (progress bar, printed lines, metrics.jsonl),
`checkpoint_policy` (when to save, signals) and `eval_and_sample` (validation, the closing
sample). On several processes every process runs this same loop in lockstep; process 0 alone
locks the run directory, prints, shows progress and writes metrics.jsonl and spec.yaml, and a
stop signal seen by any process stops all of them at the same step. A resumed run reproduces an
uninterrupted one bit for bit; a finished run rerun writes a final evaluation or sample that a
kill prevented, else has nothing to do.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from rtlib import parallel
from rtlib.costs import check_fits, training_bytes
from rtlib.errors import NonFiniteLoss
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint_policy import CheckpointPolicy
from rtlib.train.eval_and_sample import Validation, final_sample, missing_at_end
from rtlib.train.start import Session, start_or_resume
from rtlib.train.step import train_step_for
from rtlib.train.stepper import Stepper
from rtlib.train.train_log import TrainLog

__all__ = ["NonFiniteLoss", "TrainResult", "train"]  # NonFiniteLoss: what a diverged run raises


@dataclass
class TrainResult:
    """What one invocation of `train` did: where it started and ended, every step's loss, the
    final validation, and why it stopped early (a signal's name) or the sample it ended with."""

    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)  # every step's loss of this invocation
    eval: dict | None = None
    stopped_by: str | None = None  # signal name when interrupted
    sample: str | None = None


def _silent(*args, **kwargs) -> None:
    pass


def train(spec: Spec, *, progress: bool = True, print_fn: Callable[..., None] = print,
          devices: list | None = None, accept_store_change: bool = False) -> TrainResult:
    """Train (or resume) `spec.run_dir`. Starts `jax.distributed` first when the spec or the
    environment asks; `devices` (default: all) is what the spec's mesh is laid over.
    `accept_store_change` resumes on a token store other than the checkpoint's (refused
    otherwise). A finished run rerun makes what a kill kept it from writing: its final
    evaluation and sample."""
    parallel.initialize(spec.distributed)
    # Before anything is allocated: an asynchronously dispatched initialisation that cannot fit
    # would otherwise sit at 0% CPU instead of failing. A floor (perfectly sharded over the
    # processes), so only specs that cannot fit anywhere are refused.
    check_fits(training_bytes(spec.model) // jax.process_count(), "training this spec "
               "(float32 parameters, gradients and optimiser state, before any activation)",
               "model.n_layers, model.d_model, model.feed_forward.hidden or model.vocab_size")
    primary = jax.process_index() == 0
    say = print_fn if primary else _silent
    with start_or_resume(spec, parallel.make_mesh(spec, devices), primary=primary, say=say,
                         accept_store_change=accept_store_change) as session:
        result = TrainResult(step=session.start, start_step=session.start)
        if session.start >= spec.train.steps:
            if session.start == spec.train.steps:
                _finish_ended_run(session, result, say=say)
            if result.eval is None and result.sample is None:
                say(f"{session.run_dir} is already at step {session.start} (train.steps="
                    f"{spec.train.steps}): nothing to do; raise train.steps to train on")
            return result
        with TrainLog(session, progress=progress, say=say) as log:
            step_once = Stepper(session, train_step_for(spec, session.mesh), note=log.note)
            validation = Validation(session, log)
            checkpoints = CheckpointPolicy(spec.run, step=session.start)
            with checkpoints:  # SIGTERM/SIGINT now mean: save after this step and stop
                for step in range(session.start + 1, spec.train.steps + 1):
                    out = step_once(step)
                    result.losses.append(out.loss)
                    result.step = step
                    log.step(out)
                    validation.after_step(step)
                    if checkpoints.after_step(step, session.save):
                        break
            checkpoints.finish(result.step, session.save)
            log.end_progress()
            if checkpoints.stopped_by:
                result.stopped_by = checkpoints.stopped_by
                say(f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved "
                    f"in {session.checkpointer.directory}. Run the same command to resume.")
                return result
            result.eval = validation.at_end(result.step)
            if spec.run.sample_tokens:
                result.sample = final_sample(session, log)
            return result


def _finish_ended_run(session: Session, result: TrainResult, *,
                      say: Callable[[str], None]) -> None:
    """A run at its last step whose final evaluation or sample is missing (killed after the
    last checkpoint): make them now, into `result`."""
    eval_missing, sample_missing = missing_at_end(session)
    if not (eval_missing or sample_missing):
        return
    missing = {(True, True): "evaluation and sample are", (True, False): "evaluation is",
               (False, True): "sample is"}[eval_missing, sample_missing]
    say(f"{session.run_dir} is at its last step {session.start}, but its final {missing} "
        "missing: making them now")
    with TrainLog(session, progress=False, say=say) as log:
        if eval_missing:
            result.eval = Validation(session, log).at_end(session.start)
        if sample_missing:
            result.sample = final_sample(session, log)
