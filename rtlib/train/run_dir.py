"""A run directory: `spec.yaml` (the resolved spec), `checkpoints/`, `metrics.jsonl`, plots.

Opening a run for evaluation or sampling, and refusing to resume a run whose arrays a changed
spec would not fit.
"""

from pathlib import Path

import equinox as eqx
import jax
import yaml
from jax.sharding import Mesh

from rtlib.errors import RunError
from rtlib.parallel import single_device_mesh
from rtlib.spec.load import SpecError, validate_spec
from rtlib.spec.schema import Spec
from rtlib.train.checkpoint import Checkpointer
from rtlib.train.metrics_log import METRICS_FILE  # noqa: F401  (its format's module owns it)
from rtlib.train.step import TrainState, abstract_state, init_train_state

SPEC_FILE = "spec.yaml"




def write_spec(run_dir: Path, spec: Spec) -> None:
    path = run_dir / SPEC_FILE
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(f"# Resolved spec of this run (written by rtlib train).\n"
                   f"{yaml.safe_dump(spec.model_dump(mode='json'), sort_keys=False)}")
    tmp.replace(path)


def fresh_state(spec: Spec) -> TrainState:
    """The spec's initial state on the default device (`init_sharded` lays it on a mesh)."""
    return init_train_state(spec, key=jax.random.key(spec.run.seed))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, as `key: old -> new`."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def check_compatible(saved: dict, spec: Spec, run_dir: Path) -> list[str]:
    """Refuse (RunError) when the arrays of `spec` differ in shape from the saved run's; else
    return the keys that changed (allowed, e.g. train.steps or train.lr)."""
    old = validate_spec(saved, source=str(run_dir / SPEC_FILE))
    changes = spec_changes(old.model_dump(mode="json"), spec.model_dump(mode="json"))

    def shapes(s: Spec):
        abstract = eqx.filter_eval_shape(init_train_state, s, key=jax.random.key(0))
        return jax.tree.structure(abstract), [(x.shape, x.dtype) for x in
                                              jax.tree.leaves(abstract)]

    if changes and shapes(old) != shapes(spec):
        shaping = [c for c in changes if c.split(":")[0].startswith(("model.", "train."))]
        raise RunError(
            f"{run_dir} was trained with another spec, and this one changes the shapes of its "
            f"arrays, so it cannot resume there. Changed keys:\n  " + "\n  ".join(shaping) +
            f"\nUse a new run.dir (e.g. `run.dir={run_dir}-2`), or the spec in "
            f"{run_dir / SPEC_FILE}.")
    return changes


def load_run(run_dir: str | Path, step: int | None = None, *,
             mesh: Mesh | None = None) -> tuple[Spec, TrainState, int]:
    """(spec, trained state, step) of a run directory's latest (or given) checkpoint, its
    arrays laid out on `mesh` (default: one device), whatever mesh trained it."""
    run_dir = Path(run_dir)
    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory ({SPEC_FILE} is missing); train one "
                       f"with `rtlib train SPEC run.dir={run_dir}`")
    try:
        spec = validate_spec(yaml.safe_load(path.read_text()), source=str(path))
    except (SpecError, yaml.YAMLError) as e:
        raise RunError(f"{path}: unreadable run spec: {e}") from None
    ckpt = Checkpointer(run_dir, keep=spec.run.keep)
    try:
        steps = ckpt.steps()
        if not steps:
            raise RunError(f"{run_dir}: no checkpoint yet (checkpoints/ is empty)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise RunError(f"{run_dir}: no checkpoint at step {step}; there are {steps}")
        ts, _ = ckpt.restore(step, abstract_state(spec, mesh or single_device_mesh()))
    finally:
        ckpt.close()
    return spec, ts, step


