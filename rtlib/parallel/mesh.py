"""The device mesh of a spec: axis sizes resolved against the devices present."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rtlib.errors import MeshError
from rtlib.spec.schema import MESH_AXES, Spec, mesh_problem


def mesh_shape(spec: Spec, device_count: int) -> dict[str, int]:
    """Axis sizes with the -1 filled from `device_count`. Without a -1 the product may be
    smaller than the device count on one process (the first devices are used), never larger."""
    sizes = {a: getattr(spec.mesh, a) for a in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [a for a, v in sizes.items() if v == -1]
    if free:
        if device_count % known:
            raise MeshError(f"mesh: {device_count} devices do not split into "
                            f"{' x '.join(f'mesh.{a}={v}' for a, v in sizes.items() if v != -1)}"
                            f" x mesh.{free[0]}=-1")
        sizes[free[0]] = device_count // known
    elif known > device_count:
        raise MeshError(f"mesh: {' x '.join(f'mesh.{a}={v}' for a, v in sizes.items())} needs "
                        f"{known} devices; {device_count} are present (set one axis to -1 to "
                        "fill from the device count)")
    problem = mesh_problem(spec, sizes)
    if problem is not None:
        raise MeshError(f"{problem[0]}: {problem[1]} (mesh {_describe(sizes)} on "
                        f"{device_count} devices)")
    return sizes


def make_mesh(spec: Spec, devices: list | None = None) -> Mesh:
    """The spec's mesh over `devices` (default: every device of every process).

    Axis types are Auto on purpose: parameters carry shardings from the logical-axis rules and
    XLA propagates them through the step; only attention is written per device (`shard_map`).
    Explicit axes would make every array op state its sharding, and Equinox's helpers do not
    support them yet."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    used = math.prod(sizes.values())
    if used < len(devices):
        if jax.process_count() > 1:
            raise MeshError(f"mesh: {_describe(sizes)} uses {used} of the {len(devices)} "
                            "devices of this multi-process job; every device must be used")
        devices = devices[:used]
    shape = tuple(sizes[a] for a in MESH_AXES)
    if used == len(jax.devices()):
        # jax.make_mesh orders devices for the hardware's interconnect (and by process).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                             devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a}={v}" for a, v in sizes.items())


def single_device_mesh(device=None) -> Mesh:
    """A mesh of one device (every axis size 1): where a restored run is evaluated or sampled
    when no other mesh is asked for."""
    device = device or jax.local_devices()[0]
    return Mesh(np.asarray([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))
