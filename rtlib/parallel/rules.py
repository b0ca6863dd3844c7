"""Logical axes: every array of the training state names its axes ("embed", "heads", ...), and
the spec's `mesh.rules` map those names onto mesh axes. One table, so parameters, optimiser
state and checkpoints restored onto another mesh all agree."""

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rtlib.spec.schema import AxisRules

# (owner attribute, leaf attribute) -> logical axes of one layer's array (`positions` is a leaf
# of the model itself, matched by its own name). Arrays of stacked layers (under `stages`) get
# a leading replicated layer axis. Anything not listed (routing
# state, step, key, optimiser counters, Adafactor's factored moments) is replicated.
_PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed", "weight"): ("vocab", "embed"),
    ("embed_proj", "weight"): (None, "embed"),
    ("wq", "weight"): ("embed", "heads"),
    ("wk", "weight"): ("embed", "heads"),
    ("wv", "weight"): ("embed", "heads"),
    ("wo", "weight"): ("heads", "embed"),
    ("w_in", "weight"): ("embed", "mlp"),
    ("w_in", "bias"): ("mlp",),
    ("w_out", "weight"): ("mlp", "embed"),
    ("w_out", "bias"): ("embed",),
    ("norm1", "weight"): ("embed",),
    ("norm1", "bias"): ("embed",),
    ("norm2", "weight"): ("embed",),
    ("norm2", "bias"): ("embed",),
    ("final_norm", "weight"): ("embed",),
    ("final_norm", "bias"): ("embed",),
    ("unembed", "weight"): ("embed", "vocab"),
    ("unembed", "bias"): ("vocab",),
}


def _names(path) -> list[str]:
    return [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]


def logical_spec(path, ndim: int) -> P:
    """The logical PartitionSpec of the array at `path` (a tree path) with `ndim` axes.
    Optimiser moments match by their path's tail, so they shard like their parameters."""
    names = _names(path)
    axes = (None, "embed") if names[-1:] == ["positions"] else \
        _PARAM_AXES.get(tuple(names[-2:]))
    if axes is not None and "stages" in names:
        axes = (None, *axes)
    if axes is None or len(axes) != ndim:
        return P(*([None] * ndim))
    return P(*axes)


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
    parameter (Adafactor's (1,) placeholders for vectors) are matched by path only."""
    def one(path, leaf):
        if not is_array_leaf(leaf):
            return None
        spec = to_mesh(logical_spec(path, leaf.ndim), rules, mesh)
        return P(*(None if axes is None or dim % axes_size(mesh, axes) else axes
                   for dim, axes in zip(leaf.shape, spec, strict=True)))

    return jax.tree_util.tree_map_with_path(one, tree)


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
