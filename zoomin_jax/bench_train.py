"""python -m zoomin_jax.bench_train --config configs/X.py[:arg] [--config.key=value] [--steps N]

Compile time and step time per level for a training config on this machine, on random batches
shaped like the config's as training feeds them: each process its share of the global batch, and
cached text embeddings instead of token ids where config.data.text_cache is on (the data pipeline
has its own benchmark: zoomin_jax.data.bench). Step times are medians over N steps after the
compiling one, each waited for.
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from zoomin_jax.data.device import to_global
from zoomin_jax.recipes import JOINT, LEVELS
from zoomin_jax.train import global_batch_sizes, setup


def random_batch(level: str, rng: np.random.Generator, batch: int, size: int, children: int = 3,
                 text_dim: int | None = None) -> dict:
    """A batch shaped like `data.samples` makes for `level`: uint8 images, CLIP token rows (SOT,
    five words, EOT) or, given `text_dim`, text-cache embeddings, child masks with one childless
    parent, region boxes in token units."""
    if level == JOINT:
        return {name: random_batch(name, rng, batch, size, children, text_dim) for name in LEVELS}

    def images(*lead):
        return rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8)

    def tokens(*lead):
        if text_dim:
            return rng.standard_normal((*lead, text_dim)).astype(np.float32)
        out = np.zeros((*lead, 77), np.int32)
        out[..., 0], out[..., 1:6], out[..., 6] = 49406, rng.integers(300, 40000, (*lead, 5)), 49407
        return out

    out = {"image": images(batch), "tokens": tokens(batch)}
    if level != "region":
        child = "panel" if level == "figure" else "region"
        mask = rng.random((batch, children)) > 0.3
        mask[0] = False
        out |= {f"{child}_images": images(batch, children), f"{child}_tokens": tokens(batch, children),
                f"{child}_mask": mask}
    if level == "panel":
        corner = rng.uniform(0, 2, (batch, children, 2)).astype(np.float32)
        out["region_grid_boxes"] = np.concatenate([corner, corner + rng.uniform(0.5, 2, (batch, children, 2))], -1)
    return out


def main(config, timed_steps: int) -> int:
    logging.set_verbosity(logging.WARNING)
    if config.get("total_steps") is None:  # derived from the records in training; a step costs the same
        config.total_steps = timed_steps + 1
    run = setup(config)
    rng = np.random.default_rng(0)
    state = run.state
    text_dim = run.model_cfg.embed_dim if config.data.get("text_cache") else None
    batch_sizes = global_batch_sizes(config)
    print(f"{config.model} on {jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
          f"process(es), mesh {dict(run.mesh.shape)}, texts as {'cached embeddings' if text_dim else 'token ids'}")
    for level, _ in run.cycle.levels:
        children = config.data.max_panels if level == "figure" else config.data.max_regions
        size = run.model_cfg.vision.image_size
        times = []
        for _ in range(timed_steps + 1):
            batch_size = batch_sizes[LEVELS[0] if level == JOINT else level]
            host = random_batch(level, rng, batch_size // jax.process_count(), size, children, text_dim)
            batch = to_global(host, run.mesh, run.mesh.axis_names)
            tick = time.perf_counter()
            state, metrics = run.steps[level](state, run.frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - tick)
        print(f"{level:>7}: batch {batch_size}, first call (compile + step) {times[0]:.1f} s, "
              f"step median {statistics.median(times[1:]):.3f} s over {len(times) - 1} "
              f"(min {min(times[1:]):.3f}, max {max(times[1:]):.3f}); compiled {run.steps[level]._cache_size()}x",
              flush=True)
    return 0


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])")
    _STEPS = flags.DEFINE_integer("steps", 5, "timed steps per level after compilation")
    app.run(lambda argv: sys.exit(main(_CONFIG.value, _STEPS.value)))
