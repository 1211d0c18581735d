"""Run as two processes by test_data: each reads its slice of the panel level and the two build one
global batch over all 8 devices (4 per process) with jax.distributed on localhost (gloo)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from zoomin_jax import sharding  # noqa: E402
from zoomin_jax.data.device import to_global  # noqa: E402
from zoomin_jax.data.pipeline import make_dataset  # noqa: E402
from zoomin_jax.data.samples import SampleConfig  # noqa: E402


def main(pattern: str, out: str) -> None:
    sharding.initialize_distributed()
    process_id = jax.process_index()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    local = next(iter(make_dataset(pattern, "panel", 4, seed=2, process_index=jax.process_index(),
                                   process_count=jax.process_count(), cfg=SampleConfig(image_size=32, patch_size=8))))
    batch = to_global(local, mesh)
    # Sum of each example's tokens: small enough to gather, and it identifies the examples.
    signature = jax.jit(lambda tokens: tokens.sum(axis=1), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(batch["tokens"])
    result = {"global_shape": list(batch["image"].shape), "local_signature": local["tokens"].sum(axis=1).tolist(),
              "global_signature": np.asarray(signature).tolist()}
    with open(f"{out}/process{process_id}.json", "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
