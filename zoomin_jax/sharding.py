"""Device mesh, parameter partitioning by regex rules, and multi-host start-up (DESIGN.md §7).

Parameters are addressed by their path in the param tree joined with "/" (open_clip's names:
"visual/transformer/resblocks/23/mlp/c_fc/kernel"). Rules are (regex, how) pairs, first match wins:
how is "fsdp" (split the largest dimension the fsdp axis divides) or "replicate".
"""
from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomin_jax.errors import UserError

DEFAULT_PARTITION_RULES = ((".*", "fsdp"),)


def make_mesh(axes, devices=None) -> Mesh:
    """axes: ((name, size), ...) with at most one size -1 meaning "the rest of the devices"."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = [name for name, _ in axes], [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise UserError(f"mesh {tuple(axes)}: only one axis may be -1")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {tuple(axes)} needs {math.prod(sizes)} devices, but there are {len(devices)}; "
                        "change config.mesh")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names),
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def path_name(path) -> str:
    """A jax key path (or tuple of keys) as "a/b/0/c"."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def match_rules(rules, name: str, what: str):
    for pattern, value in rules:
        if re.fullmatch(pattern, name):
            return value
    raise UserError(f"no {what} rule matches parameter {name!r}; end the rules with ('.*', ...)")


def _spec(shape, how: str, mesh: Mesh, min_size: int) -> PartitionSpec:
    if how == "replicate" or "fsdp" not in mesh.shape or math.prod(shape) < min_size:
        return PartitionSpec()
    if how != "fsdp":
        raise UserError(f"partition rule value {how!r} is not 'fsdp' or 'replicate'")
    fsdp = mesh.shape["fsdp"]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return PartitionSpec(*([None] * dim + ["fsdp"]))
    return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_PARTITION_RULES, min_size: int = 2 ** 14):
    """A NamedSharding per leaf of a param-shaped tree (arrays or ShapeDtypeStructs); leaves smaller
    than `min_size` elements are replicated (splitting them costs more than it saves)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _spec(leaf.shape, match_rules(rules, path_name(path), "partition"),
                                                     mesh, min_size)), tree)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize for multi-host runs. On TPU pods and SLURM it finds everything
    itself (ZOOMIN_CLUSTER=auto asks for that where no variable below shows it, as launch/tpu.py
    does); elsewhere (GPU/CPU hosts, launch/gpu_local.py) pass the coordinator address, process count
    and id, or set ZOOMIN_COORDINATOR / ZOOMIN_NUM_PROCESSES / ZOOMIN_PROCESS_ID. A single process
    does nothing. ZOOMIN_HEARTBEAT_TIMEOUT_S bounds how long the others run on once a process
    died: then JAX's coordination service stops every process with an error (default 100 s)."""
    coordinator = coordinator or os.environ.get("ZOOMIN_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("ZOOMIN_NUM_PROCESSES", "0")) or None
    if process_id is None and "ZOOMIN_PROCESS_ID" in os.environ:
        process_id = int(os.environ["ZOOMIN_PROCESS_ID"])
    heartbeat = {"heartbeat_timeout_seconds": int(os.environ["ZOOMIN_HEARTBEAT_TIMEOUT_S"])
                 } if "ZOOMIN_HEARTBEAT_TIMEOUT_S" in os.environ else {}
    if coordinator is None and num_processes is None:
        # Asking jax for its backend would start it, after which initialize() is refused: look at
        # the environment the TPU runtime and SLURM set instead.
        if os.environ.get("ZOOMIN_CLUSTER") == "auto" or any(
                key in os.environ for key in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "SLURM_JOB_ID")):
            jax.distributed.initialize(**heartbeat)
        return
    if num_processes == 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               **heartbeat)
