"""What every scorer of a split shares: where batches go (one device, or split over a mesh's
data axes) and the progress bar on stderr."""

import contextlib
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from rtlib.parallel import activate, from_global
from rtlib.parallel.rules import batch_sharding, rules_key
from rtlib.spec.schema import AxisRules


class Placement:
    """Batches on one device or split over `mesh`'s data axes: `with placement:` activates the
    mesh and its rules, `put` moves a host batch, `layout` is the rules key the jitted scorers
    take as a static argument (empty without a mesh)."""

    def __init__(self, mesh: Mesh | None, rules: AxisRules | None):
        self.mesh, self.rules = mesh, rules
        self.rows = None if mesh is None else batch_sharding(mesh, rules)
        self.layout = "" if mesh is None else rules_key(rules or AxisRules())

    def put(self, x: np.ndarray) -> Any:
        return jnp.asarray(x) if self.rows is None else from_global(x, self.rows)

    def __enter__(self):
        self._context = (contextlib.nullcontext() if self.mesh is None
                         else activate(self.mesh, self.rules))
        return self._context.__enter__()

    def __exit__(self, *exc) -> Any:
        return self._context.__exit__(*exc)


def progress_bar(total: int | float, split: str, *, progress: bool, unit: str = "tok") -> tqdm:
    """The scorers' bar: rate and ETA on stderr, gone when done."""
    return tqdm(total=total, unit=unit, unit_scale=unit == "tok", disable=not progress,
                desc=f"eval {split}", file=sys.stderr, dynamic_ncols=True, leave=False)


