"""The active mesh and rules, and per-device attention under `jax.shard_map`.

`activate(mesh, rules)` is entered around tracing (the training step, evaluation). Inside it,
`per_device` runs attention with the batch split over the rules' batch axes and heads over the
heads axes, and `psum` sums per-device routing statistics over those axes. Outside it (or on a
one-device mesh) both are plain calls, so the same layer code serves one device and a pod.
"""

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rtlib.parallel.rules import axes_size, mesh_axes, state_specs, to_mesh
from rtlib.spec.schema import AxisRules

log = logging.getLogger(__name__)
_ACTIVE: contextvars.ContextVar[tuple[Mesh, AxisRules] | None] = contextvars.ContextVar(
    "rtlib_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: AxisRules | None = None) -> Iterator[Mesh]:
    """Make `mesh` (and the logical-axis `rules`) current for code traced inside."""
    token = _ACTIVE.set((mesh, rules or AxisRules()))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, AxisRules] | None:
    """The (mesh, rules) entered with `activate`, or None."""
    return _ACTIVE.get()


def per_device(fn: Callable, *args, in_specs: tuple, out_specs, check_vma: bool = True) -> object:
    """`fn(*args)` with each argument split as its logical spec says (e.g.
    `P("batch", None, "heads", None)`; None for an absent argument), under `jax.shard_map`.
    `fn` reduces what it returns across devices with `psum`. `check_vma=False` is for bodies
    that may run a Pallas kernel (ours declare no varying-manual-axes types).

    A plain call when no mesh is active, when every named axis has size 1, or when an argument
    does not split evenly (e.g. batch 1 when sampling on a data-parallel mesh); the results are
    the same, only the partitioning is left to XLA."""
    ctx = active()
    if ctx is None or jax.sharding.get_abstract_mesh().manual_axes:
        return fn(*args)
    mesh, rules = ctx
    is_spec = lambda x: isinstance(x, P)
    mesh_in = tuple(None if arg is None else to_mesh(spec, rules, mesh)
                    for arg, spec in zip(args, in_specs, strict=True))
    if all(a is None for s in mesh_in if s is not None for a in s):
        return fn(*args)
    for arg, spec in zip(args, mesh_in, strict=True):
        if spec is None:
            continue
        for dim, axes in zip(arg.shape, spec, strict=True):
            size = 1 if axes is None else axes_size(mesh, axes)
            if dim % size:
                log.debug("per_device: axis of %d does not split over %s; running unsplit",
                          dim, axes)
                return fn(*args)
    mesh_out = jax.tree.map(lambda s: to_mesh(s, rules, mesh), out_specs, is_leaf=is_spec)
    return jax.shard_map(fn, mesh=mesh, in_specs=mesh_in, out_specs=mesh_out,
                         check_vma=check_vma)(*args)


def psum(x: jax.Array, *logical: str) -> jax.Array:
    """Sum `x` over the devices that split the given logical axes (inside `per_device`);
    the identity elsewhere."""
    ctx = active()
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if ctx is None or not manual:
        return x
    mesh, rules = ctx
    axes = []
    for name in logical:
        got = mesh_axes(name, rules, mesh)
        axes += [] if got is None else [got] if isinstance(got, str) else list(got)
    axes = tuple(a for a in axes if a in manual)
    if not axes:
        return x
    # A per-device count that happens to be equal on every device (e.g. queries counted from
    # shapes) is still one device's share: mark it varying, then sum.
    same = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    if same:
        x = jax.lax.pcast(x, same, to="varying")
    return jax.lax.psum(x, axes)


def constrain(tree):
    """`tree` pinned to the shardings the rules give its arrays (inside a traced function under
    `activate`), so a step returns its state laid out exactly as it received it."""
    ctx = active()
    if ctx is None:
        return tree
    mesh, rules = ctx
    specs = state_specs(tree, rules, mesh)
    return jax.tree.map(
        lambda x, s: x if s is None else jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, s)), tree, specs, is_leaf=lambda x: x is None)


def constrain_as(x: jax.Array, logical: P) -> jax.Array:
    """`x` pinned to the sharding of a logical spec (identity when no mesh is active)."""
    ctx = active()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, to_mesh(logical, rules, mesh)))
