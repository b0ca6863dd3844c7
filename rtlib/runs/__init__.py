"""What you do with a trained model or run directory: score it (`rtlib.runs.evaluate.evaluate`,
`causality_audit`), sample from it (`generate`; an encoder-decoder: `translate`; an image
model: `sample_images`, `save_grid`), plot its curves (`plot_run`) and look at its routes
(`trace_routes`, `write_routes`). `evaluate` is not re-exported here, where its name would hide
its module."""

from rtlib.runs.evaluate import causality_audit
from rtlib.runs.images import sample_images, save_grid
from rtlib.runs.plot import plot_run
from rtlib.runs.routes import HeadRoutes, trace_routes, write_routes
from rtlib.runs.sample import Sampling, generate
from rtlib.runs.seq2seq import translate

__all__ = ["HeadRoutes", "Sampling", "causality_audit", "generate", "plot_run",
           "sample_images", "save_grid", "trace_routes", "translate", "write_routes"]
