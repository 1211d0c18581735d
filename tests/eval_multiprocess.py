"""Run as two processes by test_evaluate: retrieval on held-out records and zero-shot (its spec as
JSON), each process reading and embedding its share (jax.distributed on localhost, gloo; 4 CPU
devices each)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from zoomin_jax import evaluators, sharding  # noqa: E402
from zoomin_jax.encoder import CLIPEncoder  # noqa: E402
from zoomin_jax.model_dir import default_preprocess_cfg  # noqa: E402
from zoomin_jax.models.clip import CLIP  # noqa: E402
from zoomin_jax.models.config import get_preset  # noqa: E402


def main(pattern: str, level: str, zeroshot_spec: str, out: str) -> None:
    sharding.initialize_distributed()
    process_id = jax.process_index()
    cfg = get_preset("test-tiny")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    encoder = CLIPEncoder(cfg, params, default_preprocess_cfg(cfg), sharding.make_mesh((("data", -1),)), batch_size=16)
    embedded = []
    share = encoder.encode_uint8_share
    encoder.encode_uint8_share = lambda images, **kw: embedded.append(len(images)) or share(images, **kw)
    metrics = evaluators.retrieval(encoder, pattern, level, batch_size=10)
    classified = []
    share_images = encoder.encode_image_share
    encoder.encode_image_share = lambda pixels, **kw: classified.append(len(pixels)) or share_images(pixels, **kw)
    zeroshot = evaluators.zeroshot_eval(encoder, ConfigDict(json.loads(zeroshot_spec)))
    with open(f"{out}/process{process_id}.json", "w") as f:
        json.dump({"metrics": metrics, "embedded": sum(embedded), "calls": len(embedded), "zeroshot": zeroshot,
                   "classified": sum(classified), "zeroshot_calls": len(classified)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
