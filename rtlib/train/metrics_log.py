"""`metrics.jsonl`, a run's log: one JSON object per line, each with its `step`.

Training lines hold the step's losses, learning rate, parameter norm and speed; validation
lines also have `"split": "valid"`, and the closing sample is a `"split": "sample"` line with
its `text`. The writer appends and flushes line by line, so a killed process leaves at
most one torn last line; a resumed run first drops the lines past its checkpoint (they are
about to be written again). The reader skips whatever is not a whole line with a step.
It imports no jax itself, so its functions never start an accelerator (importing it still
imports the `rtlib` package).

With `run.tensorboard: true` every line's numbers also go to TensorBoard event files in
`RUN_DIR/tensorboard/` (tag `SPLIT/KEY`: `train/loss`, `valid/bits_per_byte`; the closing
sample as text). They are a view for TensorBoard, not a record: a resumed run starts a new
event file that tells TensorBoard to drop the older files' steps after the checkpoint.
"""

import json
import math
import sys
from pathlib import Path

from rtlib.errors import RunError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def record_of(line: str) -> dict | None:
    """A metrics line as a dict; None for a torn or foreign line (no whole object, no step)."""
    try:
        record = json.loads(line)
        int(record["step"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    return record if isinstance(record, dict) else None


def step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a killed process."""
    record = record_of(line)
    return None if record is None else int(record["step"])


def _lines(path: Path) -> list[str]:
    # json.dumps writes ASCII only, so an undecodable byte can only be in a torn line, which
    # record_of then drops: never a reason to fail the whole file.
    return path.read_text(errors="replace").splitlines()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every whole record of a run's metrics.jsonl, in file order; torn, blank or stepless
    lines (a killed process, a hand edit) are skipped, not fatal."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists() and not path.is_file():
        raise RunError(f"{path} is not a file; it should be the run's metrics log")
    if not path.is_file():
        raise RunError(f"{run_dir}: no {METRICS_FILE} (has this run taken a step yet?)")
    try:
        return [r for r in map(record_of, _lines(path)) if r is not None]
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({e.strerror or e})") from None


class MetricsLog:
    """The writer of `metrics.jsonl`. On resume from `resume_step`, lines after it (written
    after the last checkpoint, and about to be recomputed) are dropped first, so each step is
    logged once."""

    def __init__(self, path: Path, resume_step: int, *, tensorboard: bool = False):
        self.path = path
        self.board = _board(path.parent / TENSORBOARD_DIR, resume_step) if tensorboard else None
        if path.exists() and not path.is_file():
            raise RunError(f"{path} is not a file; move it aside: it is where this run keeps "
                           "its metrics log")
        try:
            if path.exists():
                kept = [line for line in _lines(path)
                        if (step := step_of(line)) is not None and step <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")  # a kill mid-rewrite keeps the old file
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
            self.file = path.open("a")
        except OSError as e:
            raise RunError(f"{path}: cannot write the metrics log ({e.strerror or e})") from None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a reader (or a kill) sees whole lines as soon as they are made
        if self.board is not None:
            _to_board(self.board, record)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


class NoMetricsLog:
    """What processes other than 0 write: nothing (process 0 holds the whole log)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics_log(run_dir: Path, resume_step: int, *, primary: bool,
                     tensorboard: bool = False) -> MetricsLog | NoMetricsLog:
    """The run's metrics log on process 0 (`primary`), a sink elsewhere; with `tensorboard`
    also TensorBoard event files."""
    if not primary:
        return NoMetricsLog()
    return MetricsLog(run_dir / METRICS_FILE, resume_step, tensorboard=tensorboard)


def _board(directory: Path, resume_step: int):
    # tensorboardX imports torch whenever it is installed, only to accept torch tensors; we
    # write Python floats. A torch runtime loaded into this JAX process crashed XLA's compiler
    # (a segfault in our test suite), so torch is kept out while tensorboardX loads.
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` now raises ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RunError("run.tensorboard: true needs the tensorboardX package: pip install "
                       "tensorboardX (or rtlib's [tensorboard] extra)") from None
    finally:
        if hide:
            del sys.modules["torch"]
    try:
        # purge_step: TensorBoard discards what earlier files logged at or after this step
        return SummaryWriter(str(directory), purge_step=resume_step + 1 if resume_step else None,
                             flush_secs=30)
    except OSError as e:
        raise RunError(f"{directory}: cannot write TensorBoard files ({e.strerror or e})"
                       ) from None


def _to_board(board, record: dict) -> None:
    step, split = int(record["step"]), record.get("split", "train")
    if split == "sample":
        board.add_text("sample", str(record.get("text", "")), step)
        return
    for key, value in record.items():
        if key not in ("step", "split") and isinstance(value, int | float) and \
                not isinstance(value, bool) and math.isfinite(value):
            board.add_scalar(f"{split}/{key}", value, step)
