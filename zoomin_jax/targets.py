"""The hardware a training config is compiled for before launch (zoomin_jax.aot), without it
attached: TPU slices through libtpu's topology descriptions, GPU nodes through XLA's GPU target
description (assets/h100_sxm.txtpb). Both need the `aot` extra (libtpu, jax-cuda12-plugin) and JAX
on its CPU backend (JAX_PLATFORMS=cpu): the devices are described, never started.

Per device: HBM, and the peaks a roofline reads (dense bf16 matmul FLOP/s, HBM bytes/s; at JAX's
default precision TPUs run float32 matmuls as bf16 passes and H100s as TF32, so the bf16 peak is the
one a float32 step is held to as well). v4 and v5p chips are described as JAX runs them, one
"megacore" device per chip (a v4-128 is 64 chips, 64 devices), as MaxText's train_compile does; by
default libtpu lists each TensorCore, which jax.make_mesh refuses for TPUs after v3.
"""
from __future__ import annotations

import dataclasses
import functools
from importlib import resources

from zoomin_jax.errors import UserError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str          # "tpu" or "cuda"
    topology: str          # libtpu's topology name, or the GPU topology "slices x hosts x devices"
    hbm_bytes: int         # per device
    peak_flops: float      # per device, dense bf16
    hbm_bandwidth: float   # per device, bytes/s
    chip: str
    chip_config: str = "default"   # libtpu's chip configuration ("megacore": one device per chip)

    def devices(self) -> list:
        """The target's devices as XLA describes them (nothing is started)."""
        return _topology(self.platform, self.topology, self.chip_config).devices


def _tpu(name, topology, chip, hbm_gib, tflops, gbps, chip_config="default"):
    return Target(name, "tpu", topology, hbm_gib * GiB, tflops * 1e12, gbps * 1e9, chip, chip_config)


def _h100(name, topology):
    # H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3; the memory XLA plans against is the target
    # description's (84,929,347,584 bytes, 79.1 GiB).
    return Target(name, "cuda", topology, 84_929_347_584, 989e12, 3.35e12, "NVIDIA H100 80GB HBM3")


TARGETS = {target.name: target for target in (
    _tpu("v5e-8", "v5e:2x4", "TPU v5e", 16, 197, 819),
    _tpu("v5e-16", "v5e:4x4", "TPU v5e", 16, 197, 819),
    _tpu("v5e-64", "v5e:8x8", "TPU v5e", 16, 197, 819),
    _tpu("v5e-256", "v5e:16x16", "TPU v5e", 16, 197, 819),
    _tpu("v4-8", "v4:2x2x1", "TPU v4", 32, 275, 1200, "megacore"),
    _tpu("v4-128", "v4:4x4x4", "TPU v4", 32, 275, 1200, "megacore"),
    _tpu("v5p-128", "v5p:4x4x4", "TPU v5p", 95, 459, 2765, "megacore"),
    _h100("h100x2", "1x1x2"),
    _h100("h100x8", "1x1x8"),
    _h100("h100x32", "1x4x8"),
)}


def get(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.cache
def _topology(platform: str, topology: str, chip_config: str = "default"):
    from jax.experimental import topologies
    try:
        if platform == "tpu":
            return topologies.get_topology_desc(topology_name=topology, platform="tpu", chip_config_name=chip_config)
        config = resources.files("zoomin_jax").joinpath("assets/h100_sxm.txtpb").read_text()
        return topologies.get_topology_desc("zoomin", "cuda", target_config=config, topology=topology)
    except Exception as err:  # the plugin's own errors: not installed, or a topology it does not know
        extra = "libtpu" if platform == "tpu" else "jax-cuda12-plugin"
        raise UserError(f"cannot describe the {platform} topology {topology} ({str(err).splitlines()[0]}): install "
                        f"the aot extra (pip install -e '.[aot]', which brings {extra}) and run with "
                        "JAX_PLATFORMS=cpu") from err
