"""Run as two processes by test_sharding: each starts jax.distributed from the ZOOMIN_* variables,
restores one model directory into fsdp shardings over both processes' 8 devices (4 each) and
checks the shards it holds against the saved params; then reads it whole, as export does."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from zoomin_jax import model_dir, sharding  # noqa: E402


def by_name(tree) -> dict:
    return {sharding.path_name(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def main(directory: str, saved_npz: str, out: str) -> None:
    sharding.initialize_distributed()
    cfg = model_dir.config_of(model_dir.read_meta(directory), directory)
    mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
    shardings = model_dir.param_shardings(cfg, mesh)
    wanted, saved = by_name(shardings), np.load(saved_npz)
    shards, devices = 0, set()
    for name, leaf in by_name(model_dir.initial_params(directory, cfg, seed=0, shardings=shardings)).items():
        assert leaf.sharding == wanted[name], name
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), saved[name][shard.index], err_msg=name)
            shards, devices = shards + 1, devices | {shard.device.id}
    whole = by_name(model_dir.params_numpy(directory, cfg))
    assert all(np.array_equal(whole[name], saved[name]) for name in saved)
    with open(f"{out}/process{jax.process_index()}.json", "w") as f:
        json.dump({"process": jax.process_index(), "processes": jax.process_count(),
                   "local_devices": jax.local_device_count(), "shards": shards, "devices": sorted(devices)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
