"""Run as two processes by test_text_cache: the two build one run's text cache through train.py's
own path, each noting every text it embedded and the size of its embedding calls, then check the
cache (its part in float16) against direct encoding in float32."""
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from zoomin_jax import run_dir, run_setup, sharding, train  # noqa: E402
from zoomin_jax.data import text_cache  # noqa: E402
from zoomin_jax.encoder import CLIPEncoder  # noqa: E402
from zoomin_jax.models.clip import merge  # noqa: E402


def main(records: str, out: str) -> None:
    sharding.initialize_distributed()
    process_id = jax.process_index()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for configs/
    from configs.demo_cpu import get_config
    config = get_config(f"records={records}")
    config.train_rules = (("visual/.*", 1.0), (".*", None))  # the text tower frozen
    config.data.text_cache = True
    run = run_setup.setup(config)
    embedded, calls = [], []
    tokenize, encode_text_share = train.tokenize, CLIPEncoder.encode_text_share
    train.tokenize = lambda texts: embedded.extend(texts) or tokenize(texts)
    CLIPEncoder.encode_text_share = lambda self, tokens: calls.append(self.process_batch_size) or encode_text_share(
        self, tokens)
    directory = train.build_text_cache(config, run, epath.Path(out) / "workdir" / "text_cache")
    train.tokenize, CLIPEncoder.encode_text_share = tokenize, encode_text_share

    texts = sorted(json.loads(epath.Path(out, "texts.json").read_text()))
    encoder = CLIPEncoder(run.model_cfg, merge(run.state["params"], run.frozen),
                          run_dir.preprocess_cfg(config, run.model_cfg), run.mesh)
    direct = encoder.encode_text(tokenize(texts))
    cached = text_cache.TextCache(directory).lookup(texts)
    part = np.load(epath.Path(directory) / text_cache.part_name(process_id, 2), mmap_mode="r")
    with open(f"{out}/process{process_id}.json", "w") as f:
        json.dump({"embedded": embedded, "calls": calls, "part_dtype": part.dtype.str,
                   "max_excess": float((np.abs(cached - direct) - 2**-11 * np.abs(direct)).max()),
                   "scale": float(np.abs(direct).max())}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
