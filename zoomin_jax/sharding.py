"""Device mesh, parameter partitioning by regex rules, and multi-host start-up (docs/design.md §8).

Parameters are addressed by their path in the param tree joined with "/" (open_clip's names:
"visual/transformer/resblocks/23/mlp/c_fc/kernel"). Rules are (regex, how) pairs, first match wins:
how is "fsdp" (split the largest dimension the fsdp axis divides) or "replicate".
"""
from __future__ import annotations

import math
import os
import re

import jax
from jax._src import clusters  # JAX's own cluster detection: jax 0.10.2 has no public API for it
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zoomin_jax.errors import UserError

DEFAULT_PARTITION_RULES = ((".*", "fsdp"),)
# config.platform: what a config is sized for. "accelerator" is a GPU or a TPU.
PLATFORMS = ("accelerator", "gpu", "tpu", "any")
# The clusters whose processes start jax.distributed without being told to, in the order JAX tries
# them. Not Kubernetes (every pod has its variables, one-pod jobs too: a Kubernetes job asks with
# ZOOMIN_CLUSTER=auto) and not mpi4py (opt-in in JAX as well).
CLUSTERS = (clusters.OmpiCluster, clusters.SlurmCluster, clusters.GceTpuCluster, clusters.GkeTpuCluster)
ZOOMIN_PROCESS_VARIABLES = ("ZOOMIN_COORDINATOR", "ZOOMIN_NUM_PROCESSES", "ZOOMIN_PROCESS_ID")


def _sizes(axes, count: int, key: str, unit: str) -> list[int]:
    """The sizes of ((name, size), ...) spanning `count` units, its one -1 ("the rest") resolved."""
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1 or any(size < 1 and size != -1 for size in sizes):
        raise UserError(f"{key} {tuple(axes)}: sizes must be positive, and only one may be -1 (the rest)")
    if -1 in sizes:
        sizes[sizes.index(-1)] = count // math.prod(size for size in sizes if size != -1)
    if math.prod(sizes) != count:
        raise UserError(f"{key} {tuple(axes)} makes {math.prod(sizes)} {unit}, but there are {count}; change {key} "
                        "(a size -1 takes the rest)")
    return sizes


def make_mesh(axes, devices=None, dcn_axes=()) -> Mesh:
    """A mesh with the axes ((name, size), ...) (at most one size -1, "the rest of the devices"),
    laid out by jax.make_mesh, which follows the TPU torus. On a multi-slice TPU (devices whose
    slice_index differ) `axes` cover one slice and `dcn_axes` ((name, size), ... over the same
    names, -1 = the rest of the slices) spread axes over the slices, whose data-centre network is far
    slower than the chips' own links: mesh axis `name` then spans size x dcn size devices."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    if unknown := [name for name, _ in dcn_axes if name not in names]:
        raise UserError(f"config.dcn_mesh names {unknown}, which config.mesh {names} lacks; use its axis names")
    # CPU and GPU devices have no slice_index: one slice.
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices > 1 and not dcn_axes:
        raise UserError(f"the {len(devices)} devices form {slices} TPU slices; set config.dcn_mesh, e.g. "
                        "(('data', -1),) to split the data axis over them")
    dcn = dict(zip((name for name, _ in dcn_axes), _sizes(dcn_axes, slices, "config.dcn_mesh", "slices")))
    sizes = _sizes(axes, len(devices) // slices, "config.mesh", "devices" if slices == 1 else "devices per slice")
    axis_types = (AxisType.Auto,) * len(names)  # classic jit + NamedSharding, not explicit sharding
    if slices == 1:
        return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(sizes, [dcn.get(name, 1) for name in names], devices)
    return Mesh(grid, names, axis_types=axis_types)


def config_mesh(config, devices=None) -> Mesh:
    """The mesh of a training config over `devices` (default: all): config.mesh, and config.dcn_mesh
    (if any) over TPU slices."""
    return make_mesh(tuple(tuple(axis) for axis in config.mesh), devices,
                     dcn_axes=tuple(tuple(axis) for axis in config.get("dcn_mesh") or ()))


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




def initialize_distributed() -> None:
    """jax.distributed.initialize for multi-process runs, decided from the environment alone (asking
    jax for its devices would start the backend, after which initialize() is refused):
    - ZOOMIN_COORDINATOR / ZOOMIN_NUM_PROCESSES / ZOOMIN_PROCESS_ID (launch/gpu_local.py), and
      ZOOMIN_LOCAL_DEVICE_IDS ("3" or "0,1") where processes share a host's GPUs, each taking its own;
    - a cluster JAX finds by itself (CLUSTERS: Cloud TPU VMs through their metadata server, a SLURM
      job step, mpirun) when it has more than one process: a bare salloc shell is no job step, and
      a one-task step would be pinned to one GPU (JAX gives each SLURM task GPU SLURM_LOCALID);
    - ZOOMIN_CLUSTER=auto: initialize() with no arguments, wherever JAX can find its peers (launch/tpu.py);
    - otherwise (a laptop, one process) nothing.
    ZOOMIN_HEARTBEAT_TIMEOUT_S bounds how long the others run on once a process died: then JAX's
    coordination service stops every process with an error (default 100 s)."""
    env = os.environ
    heartbeat = {"heartbeat_timeout_seconds": int(env["ZOOMIN_HEARTBEAT_TIMEOUT_S"])
                 } if "ZOOMIN_HEARTBEAT_TIMEOUT_S" in env else {}
    given = [key for key in ZOOMIN_PROCESS_VARIABLES if key in env]
    if given:
        if missing := [key for key in ZOOMIN_PROCESS_VARIABLES if key not in env]:
            raise UserError(f"{', '.join(given)} set without {', '.join(missing)}: a multi-process run needs all "
                            f"of {', '.join(ZOOMIN_PROCESS_VARIABLES)} (launch/gpu_local.py sets them)")
        if int(env["ZOOMIN_NUM_PROCESSES"]) > 1:
            local = env.get("ZOOMIN_LOCAL_DEVICE_IDS")
            jax.distributed.initialize(coordinator_address=env["ZOOMIN_COORDINATOR"],
                                       num_processes=int(env["ZOOMIN_NUM_PROCESSES"]),
                                       process_id=int(env["ZOOMIN_PROCESS_ID"]),
                                       local_device_ids=[int(i) for i in local.split(",")] if local else None,
                                       **heartbeat)
        return
    cluster = next((cluster for cluster in CLUSTERS if cluster.is_env_present()), None)  # the one JAX will use
    if env.get("ZOOMIN_CLUSTER") == "auto" or (cluster and cluster.get_process_count() > 1):
        jax.distributed.initialize(**heartbeat)


def require_platform(config) -> None:
    """Stops a run on the wrong kind of device before it spends hours there: without its CUDA or TPU
    plugin (or with the GPUs hidden) JAX falls back to the CPU with only a warning. config.platform
    says what the config is sized for (PLATFORMS; "any" runs anywhere). Call after
    initialize_distributed: this starts the backend."""
    wanted, found = config.get("platform") or "any", jax.default_backend()
    if wanted not in PLATFORMS:
        raise UserError(f"config.platform={wanted!r} is not one of {', '.join(PLATFORMS)}")
    if wanted == "any" or found == wanted or (wanted == "accelerator" and found != "cpu"):
        return
    raise UserError(f"config.platform={wanted!r}, but JAX runs on {found} ({jax.device_count()} "
                    f"{jax.devices()[0].device_kind} devices): install the jax plugin for the accelerator (e.g. "
                    f"jax[cuda12] or jax[tpu]) and check that it sees the devices, or pass --config.platform=any "
                    "to run here anyway")
