"""When a training run saves a checkpoint, and when a stop signal ends it.

A run saves every `run.checkpoint_every` steps, when `run.checkpoint_minutes` have passed since
its last save, at the end, and when SIGTERM/SIGINT asks it to stop (a preempted job then loses
at most the step in flight); the `Checkpointer` keeps the newest `run.keep`. On several
processes the clocks and signals are each process's own, but saving and stopping are
collective: the decisions are agreed on in one all-gather per step, so every process saves and
stops after the same step.
"""

import signal
import time
from collections.abc import Callable

from rtlib import parallel
from rtlib.spec.schema import RunSpec


class StopRequest:
    """While entered, SIGTERM/SIGINT set `signal` instead of killing the process, so the loop
    can checkpoint after the current step; a second signal interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals are not ours to take
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: the user means it, give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class CheckpointPolicy:
    """Decides after each step whether to save and whether to stop; `save` is called to write
    the checkpoint (it must checkpoint the state after that step). Enter it around the loop to
    turn SIGTERM/SIGINT into "save and stop"; `stopped_by` then names the signal."""

    def __init__(self, run: RunSpec, *, step: int,
                 clock: Callable[[], float] = time.monotonic):
        self.every = run.checkpoint_every
        self.minutes = run.checkpoint_minutes
        self.clock = clock
        self.last_saved, self.last_save_time = step, clock()  # the state at `step` is on disk
        self.stopped_by: str | None = None
        self._stop = StopRequest()

    def __enter__(self) -> "CheckpointPolicy":
        self._stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.__exit__(*exc)

    def after_step(self, step: int, save: Callable[[], None]) -> bool:
        """Save if the step count or the clock says so; True when the run must stop now (a
        signal reached some process), the state then saved or left for `finish` to save."""
        on_clock = bool(self.minutes) and self.clock() - self.last_save_time > 60 * self.minutes
        on_clock, stopping = parallel.any_process(on_clock, self._stop.signal is not None)
        if (self.every and step % self.every == 0) or on_clock:
            self._save(step, save)
        if stopping:
            # A signal seen only by another process reads as SIGTERM here: the scheduler's.
            self._stop.signal = self._stop.signal or signal.SIGTERM
            self.stopped_by = signal.Signals(self._stop.signal).name
        return stopping

    def finish(self, step: int, save: Callable[[], None]) -> None:
        """At the end of the loop (finished or stopped): save unless `step` already is."""
        if step > self.last_saved:
            self._save(step, save)

    def _save(self, step: int, save: Callable[[], None]) -> None:
        save()
        self.last_saved, self.last_save_time = step, self.clock()
