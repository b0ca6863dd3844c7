"""Data, FSDP and model parallelism on a named mesh, and multi-host start-up."""

from rtlib.parallel.context import activate, active, constrain, constrain_as, per_device, psum
from rtlib.parallel.mesh import MeshError, make_mesh, mesh_shape, single_device_mesh
from rtlib.parallel.multihost import (
    DistributedError,
    any_process,
    data_shard,
    from_global,
    global_batch,
    host_local,
    initialize,
)
from rtlib.parallel.rules import (
    ParamInfo,
    Stacked,
    is_array_leaf,
    logical_spec,
    param_info,
    state_shardings,
    state_specs,
)

__all__ = [
    "DistributedError",
    "MeshError",
    "ParamInfo",
    "Stacked",
    "activate",
    "active",
    "any_process",
    "constrain",
    "constrain_as",
    "data_shard",
    "from_global",
    "global_batch",
    "host_local",
    "initialize",
    "is_array_leaf",
    "logical_spec",
    "make_mesh",
    "mesh_shape",
    "param_info",
    "per_device",
    "psum",
    "single_device_mesh",
    "state_shardings",
    "state_specs",
]
