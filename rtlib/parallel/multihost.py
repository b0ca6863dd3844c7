"""Multi-host plumbing: starting `jax.distributed`, global batches from per-process data,
agreeing on a stop, and host-local copies of sharded arrays."""

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from rtlib.errors import DistributedError
from rtlib.spec.schema import DistributedSpec

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") \
            from None


def multi_process_environment() -> str | None:
    """Why the environment looks like one process of several (None when it does not)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    # srun sets the step's task count; a shell inside `salloc -n 4` is still one process.
    if os.environ.get("SLURM_JOB_ID") and (_env_int("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return "SLURM job step with several tasks"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI job with several ranks"
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts and "," in hosts:
        return "multi-host TPU slice"
    return None


def initialize(spec: DistributedSpec) -> bool:
    """Start `jax.distributed` if `spec` (or, with `initialize: auto`, the environment) asks;
    returns whether it did. Call before anything touches a device."""
    if spec.initialize == "never" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    reason = multi_process_environment()
    if spec.initialize == "auto" and reason is None and spec.coordinator is None:
        return False
    kwargs = {"coordinator_address": spec.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"),
              "num_processes": _env_int("JAX_NUM_PROCESSES"),
              "process_id": _env_int("JAX_PROCESS_ID")}
    log.info("initialising jax.distributed (%s)", reason or "spec asks")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=spec.init_timeout_s,
                                   heartbeat_timeout_seconds=spec.heartbeat_timeout_s)
    except (ValueError, RuntimeError) as e:
        raise DistributedError(
            f"jax.distributed.initialize failed ({e}). For a job JAX cannot detect, set "
            "JAX_COORDINATOR_ADDRESS=host:port (process 0's address), JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID in every process, or distributed.coordinator in the spec") from None
    return True


def data_shard(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """(index, count): this process reads rows [index * b, (index + 1) * b) of every global
    batch, b = rows // count. Processes holding the same rows (model parallel across hosts)
    get the same index."""
    rows = global_shape[0]
    local = sorted({idx[0].indices(rows)[:2]
                    for idx in sharding.addressable_devices_indices_map(global_shape).values()})
    start, stop = local[0][0], local[-1][1]
    covered = sum(b - a for a, b in local)
    if covered != stop - start or rows % (stop - start) or start % (stop - start):
        raise DistributedError(f"this process's devices hold rows {local} of the batch, not "
                               "one aligned block: use a mesh whose data axes follow "
                               "process order (the default device order does) and the same "
                               "number of devices on every process")
    return start // (stop - start), rows // (stop - start)


def global_batch(local: np.ndarray, sharding: NamedSharding,
                 global_shape: tuple[int, ...]) -> jax.Array:
    """One global array from each process's rows (`data_shard`)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def from_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a NumPy array every process holds in full (evaluation batches)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag True on every process when it is True on any, in one collective. Decisions
    that start collectives (stop after this step, save a checkpoint now) must be the same on
    every process, even when each comes from a local signal or clock."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(x) for x in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))


def host_local(tree):
    """Every array of `tree` gathered in full onto this process's first device (for work done
    outside the mesh, e.g. sampling at the end of a run)."""
    device = jax.local_devices()[0]
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: jax.device_put(x, device) if isinstance(x, (jax.Array, np.ndarray))
                        else x, tree)
