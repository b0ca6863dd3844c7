"""Training: the train state and jitted step, the optimiser, checkpoints, the run directory and
the loop made of parts (start or resume, step, finite check, log, checkpoint policy, validation).
"""

from rtlib.train.checkpoint import Checkpointer
from rtlib.train.checkpoint_policy import CheckpointPolicy
from rtlib.train.loop import NonFiniteLoss, TrainResult, train
from rtlib.train.metrics_log import METRICS_FILE, read_metrics
from rtlib.train.optim import decay_mask, learning_rate, make_optimizer
from rtlib.train.run_dir import load_run
from rtlib.train.step import TrainState, init_train_state, train_step_for

__all__ = ["METRICS_FILE", "CheckpointPolicy", "Checkpointer", "NonFiniteLoss", "TrainResult",
           "TrainState", "decay_mask", "init_train_state", "learning_rate", "load_run",
           "make_optimizer", "read_metrics", "train", "train_step_for"]
