"""What a training run shows and records: the progress bar, the printed lines and metrics.jsonl.

Every `run.log_every` steps (and on an invocation's first and the run's last step) a metrics
line with the step's losses, routing statistics, learning rate and throughput. Throughput
leaves out an invocation's first step, which compiles. Only process 0 prints, shows progress
and writes; the others' logs are silent, so a multi-process job reads like a single one.
"""

import math
from collections.abc import Callable

from tqdm import tqdm

from rtlib.train.metrics_log import open_metrics_log
from rtlib.train.optim import learning_rate
from rtlib.train.start import Session
from rtlib.train.stepper import StepOutcome

LN2 = math.log(2)


class TrainLog:
    """The log of one invocation of a run starting at `session.start`; `say` prints (e.g. the
    final summary) and `note` prints above the progress bar, both on process 0 only."""

    def __init__(self, session: Session, *, progress: bool, say: Callable[[str], None]):
        spec = session.spec
        self.session = session
        self.say = say
        self.unit = session.unit
        self.last_step = spec.train.steps
        self.log_every = spec.run.log_every
        self.tokens_per_step = spec.train.batch_size * spec.model.seq_len
        self.lr_at = learning_rate(spec.train)
        self.metrics = open_metrics_log(session.run_dir, session.start, primary=session.primary,
                                        tensorboard=spec.run.tensorboard)
        self.bar = tqdm(total=spec.train.steps, initial=session.start,
                        desc=f"train {session.run_dir.name}", unit="step",
                        disable=not (progress and session.primary), dynamic_ncols=True,
                        mininterval=1.0)
        self._tokens, self._seconds = 0, 0.0  # since the last metrics line

    def note(self, line: str) -> None:
        """A line above the progress bar (on process 0 only)."""
        if self.session.primary:
            self.bar.write(line)

    def write(self, record: dict) -> None:
        """A metrics line as is (e.g. an evaluation's)."""
        self.metrics.write(record)

    def step(self, out: StepOutcome) -> None:
        """Advance the bar; on logging steps, the step's metrics line."""
        step = out.step
        if step > self.session.start + 1:  # the first step of an invocation compiles
            self._tokens += self.tokens_per_step
            self._seconds += out.seconds
        speed = self._tokens / self._seconds if self._seconds else None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{out.loss / LN2:.3f} bits", refresh=False,
                             **({"tok/s": f"{speed:,.0f}"} if speed else {}))
        if step % self.log_every == 0 or step == self.session.start + 1 or \
                step == self.last_step:
            self.metrics.write({
                "step": step, **{k: float(v) for k, v in out.metrics.items()},
                "lr": float(self.lr_at(step - 1)), "tokens_per_s": speed,
                "tokens_seen": self.session.tokens_seen,
                f"bits_per_{self.unit}": float(out.metrics["lm_loss"]) / LN2,
                "step_s": out.seconds})
            self._tokens, self._seconds = 0, 0.0

    def end_progress(self) -> None:
        """Take the bar off the terminal before the closing lines are printed."""
        self.bar.close()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
