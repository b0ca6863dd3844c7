"""Logical axes: every array of the training state names its axes ("embed", "heads", ...), and
the spec's `mesh.rules` map those names onto mesh axes.

Each layer declares its parameters where it creates them (`declare_params`: a `ParamInfo` per
array field: logical axes and whether weight decay applies), and `param_info` reads those
declarations off any tree that holds the modules. Parameters, the optimiser's moments (optax
builds them by mapping over the model, so they hold the same modules with the same
declarations) and checkpoints restored onto another mesh therefore all agree, and the decay
mask (`rtlib.train.optim.decay_mask`) comes from the same place."""

import dataclasses

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from rtlib.spec.schema import AxisRules


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter array as its layer declares it: the logical name of each axis (None: never
    split) and whether weight decay applies to it."""

    axes: tuple[str | None, ...]
    decay: bool


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Declared for a field holding layers stacked for `lax.scan` (e.g. by `eqx.filter_vmap`):
    their arrays carry these leading axes before the ones the layers declare."""

    axes: tuple[str | None, ...] = (None,)


Declarations = dict[str, ParamInfo | Stacked]


def param_info(tree: PyTree) -> PyTree[ParamInfo | None]:
    """`tree` with each declared parameter (array or `jax.ShapeDtypeStruct`) replaced by its
    `ParamInfo`, leading axes of stacked layers included; None at every other leaf (routing
    state, step, key, optimiser counters: replicated and never decayed).

    A module declares its own array fields through a `declare_params() -> Declarations`
    method; the walk goes through every module of `tree` by its fields, so it reads a model, a
    tree optax mapped over one (moments, masks) or a whole `TrainState` alike."""
    table: dict[tuple, ParamInfo] = {}
    _collect(tree, (), (), table)
    return jax.tree_util.tree_map_with_path(lambda path, _: table.get(path), tree)


def _collect(node, prefix: tuple, lead: tuple[str | None, ...],
             table: dict[tuple, ParamInfo]) -> None:
    """Record in `table` (by full key path) the declared arrays of `node` and of the modules
    below it, with `lead` (axes of enclosing stacks) before each declaration's own axes."""
    declare = getattr(node, "declare_params", None)
    own: Declarations = declare() if isinstance(node, eqx.Module) and declare else {}
    below = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))[0]
    for path, leaf in below:
        field = path[0].name if path and isinstance(path[0], jax.tree_util.GetAttrKey) else None
        got = own.get(field)
        if isinstance(leaf, eqx.Module):
            _collect(leaf, prefix + path, (*lead, *got.axes) if isinstance(got, Stacked) else lead,
                     table)
        elif isinstance(got, ParamInfo) and len(path) == 1:
            table[prefix + path] = ParamInfo((*lead, *got.axes), got.decay)


def logical_spec(info: ParamInfo | None, ndim: int) -> P:
    """The logical PartitionSpec of an array with `ndim` axes declared by `info` (`param_info`):
    replicated without a declaration, or where the array is not shaped like its parameter
    (Adafactor's factored statistics share their parameter's path, not its rank)."""
    if info is None or len(info.axes) != ndim:
        return P(*([None] * ndim))
    return P(*info.axes)


def mesh_axes(logical: str | None, rules: AxisRules, mesh) -> str | tuple[str, ...] | None:
    """Mesh axes a logical axis is split over, leaving out axes of size 1 (and axes this mesh
    does not have)."""
    if logical is None:
        return None
    axes = tuple(a for a in getattr(rules, logical)
                 if a in mesh.axis_names and mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def to_mesh(spec: P, rules: AxisRules, mesh) -> P:
    """A logical PartitionSpec in mesh axis names."""
    return P(*(mesh_axes(a, rules, mesh) for a in spec))


def batch_sharding(mesh: Mesh, rules: AxisRules | None = None) -> NamedSharding:
    """Where the rows of a [batch, ...] array of tokens live: split over the batch axes."""
    return NamedSharding(mesh, to_mesh(P("batch", None), rules or AxisRules(), mesh))


def is_array_leaf(x: object) -> bool:
    """A leaf that holds (or, abstractly, describes) an array: a JAX or NumPy array, or the
    `jax.ShapeDtypeStruct` that `eqx.filter_eval_shape` leaves in its place. One predicate, so
    code that shards, counts or checkpoints a tree treats built and abstract trees alike."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def state_specs(tree, rules: AxisRules, mesh) -> object:
    """PartitionSpecs (mesh axis names) for every array leaf of `tree` (None elsewhere). An
    axis that does not split evenly stays whole: optimiser statistics shaped unlike their
    parameter but of its rank (Adafactor's (1,) placeholders for vectors) take its
    declaration all the same."""
    def one(leaf, info):
        if not is_array_leaf(leaf):
            return None
        spec = to_mesh(logical_spec(info, leaf.ndim), rules, mesh)
        return P(*(None if axes is None or dim % axes_size(mesh, axes) else axes
                   for dim, axes in zip(leaf.shape, spec, strict=True)))

    # `param_info(tree)` has a None where `tree` has an undeclared leaf: mapping over `tree`
    # first hands that None to `one` as a whole.
    return jax.tree.map(one, tree, param_info(tree))


def state_shardings(tree, rules: AxisRules, mesh: Mesh) -> object:
    """NamedShardings for every array leaf of `tree` (None elsewhere)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(tree, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def axes_size(mesh, axes: str | tuple[str, ...]) -> int:
    """Devices along one mesh axis or a tuple of them."""
    n = 1
    for a in (axes,) if isinstance(axes, str) else axes:
        n *= mesh.shape[a]
    return n


def rules_key(rules: AxisRules | None) -> str:
    """The rules as a string: a static argument of jitted functions that read them from the
    active context while tracing (JAX's own cache knows the mesh, not our rules)."""
    return "" if rules is None else rules.model_dump_json()
