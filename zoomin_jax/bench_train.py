"""python -m zoomin_jax.bench_train --config configs/X.py[:arg] [--config.key=value] [--steps N]

Compile time and step time per level for a training config on this machine, on random batches
shaped like the config's as training feeds them: each process its share of the global batch, and
cached text embeddings instead of token ids where config.data.text_cache is on (the data pipeline
has its own benchmark: zoomin_jax.data.bench). Step times are medians over N steps after the
compiling one, each waited for.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from zoomin_jax import flops
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


def matmul_peak(dtype=np.float32, n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """FLOP/s of an n x n matmul, median of `repeats` after a warm-up, by jax on the default device
    and by numpy on the host (numpy only for float32): the rate a step's matmuls could reach here."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    flops = 2 * n ** 3
    on_device = jax.jit(lambda x, y: x @ y)
    x, y = jax.device_put(a.astype(dtype)), jax.device_put(b.astype(dtype))
    rates = {"jax": flops / _median_seconds(lambda: on_device(x, y).block_until_ready(), repeats)}
    if np.dtype(dtype) == np.float32:
        rates["numpy"] = flops / _median_seconds(lambda: a @ b, repeats)
    return rates


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


@dataclasses.dataclass
class LevelResult:
    level: str
    batch: int
    images: int
    compile_s: float
    step_s: float          # median
    xla_flops: float       # XLA's cost analysis of the compiled step (all devices' work)
    hand_flops: float      # zoomin_jax.flops
    memory_bytes: float    # XLA's buffer plan per device: arguments + outputs + temporaries - aliased
    reference_s: float | None = None


def bench_level(run, config, level: str, timed_steps: int, rng: np.random.Generator) -> LevelResult:
    batch_size = global_batch_sizes(config)[LEVELS[0] if level == JOINT else level]
    children = config.data.max_panels if level == "figure" else config.data.max_regions
    text_cached = bool(config.data.get("text_cache"))
    text_dim = run.model_cfg.embed_dim if text_cached else None
    size = run.model_cfg.vision.image_size

    def batch():
        host = random_batch(level, rng, batch_size // jax.process_count(), size, children, text_dim)
        return to_global(host, run.mesh, run.mesh.axis_names)

    state, first = run.state, batch()
    tick = time.perf_counter()
    compiled = run.steps[level].lower(state, run.frozen, first).compile()
    compile_s = time.perf_counter() - tick
    memory = compiled.memory_analysis()
    times = []
    for n in range(timed_steps + 1):  # the first is a warm-up
        inputs = first if n == 0 else batch()
        tick = time.perf_counter()
        state, metrics = compiled(state, run.frozen, inputs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    run.state = state
    shape = flops.step_shape(run.model_cfg, level, batch_size, children, run.part.frozen_blocks,
                             run.part.text_frozen, text_cached, config.get("remat", "none"))
    return LevelResult(level, batch_size, shape.images, compile_s, statistics.median(times[1:]),
                       float(compiled.cost_analysis()["flops"]), float(flops.step_flops(run.model_cfg, shape)),
                       float(memory.argument_size_in_bytes + memory.output_size_in_bytes
                             + memory.temp_size_in_bytes - memory.alias_size_in_bytes))


def table(results: list[LevelResult], peak: float, devices: int) -> str:
    rows = [("level", "batch", "images", "compile s", "step s", "examples/s", "GFLOP/step XLA", "GFLOP/step hand",
             "GFLOP/s", "of peak", "memory GB", "open_clip s", "speed-up")]
    for r in results:
        achieved = r.hand_flops / r.step_s / devices
        rows.append((r.level, str(r.batch), str(r.images), f"{r.compile_s:.1f}", f"{r.step_s:.3f}",
                     f"{r.batch / r.step_s:.2f}", f"{r.xla_flops / 1e9:.1f}", f"{r.hand_flops / 1e9:.1f}",
                     f"{achieved / 1e9:.1f}", f"{achieved / peak:.0%}", f"{r.memory_bytes / 2**30:.2f}",
                     "-" if r.reference_s is None else f"{r.reference_s:.3f}",
                     "-" if r.reference_s is None else f"{r.reference_s / r.step_s:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main(config, timed_steps: int, reference: str | None) -> int:
    logging.set_verbosity(logging.WARNING)
    if config.get("total_steps") is None:  # derived from the records in training; a step costs the same
        config.total_steps = timed_steps + 1
    run = setup(config)
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    dtype = np.dtype(config.get("compute_dtype", "float32"))
    peaks = matmul_peak(dtype)
    peak = max(peaks.values())
    print(f"{config.model} on {jax.device_count()} {device.platform} device(s) ({device.device_kind}) in "
          f"{jax.process_count()} process(es), mesh {dict(run.mesh.shape)}, compute {dtype.name}, texts as "
          f"{'cached embeddings' if config.data.get('text_cache') else 'token ids'}, {timed_steps} timed steps")
    print("matmul peak per device (2048^3, median of 7): "
          + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in peaks.items()), flush=True)
    results = []
    for level, _ in run.cycle.levels:
        result = bench_level(run, config, level, timed_steps, rng)
        if reference == "open_clip":
            from zoomin_jax import bench_open_clip
            result.reference_s = bench_open_clip.step_seconds(config, run, level, timed_steps)
        results.append(result)
        print(f"{level}: step {result.step_s:.3f} s (median of {timed_steps}), compile {result.compile_s:.1f} s"
              + ("" if result.reference_s is None else f", open_clip {result.reference_s:.3f} s"), flush=True)
    print(table(results, peak, jax.device_count()))
    print("GFLOP/s and 'of peak' are per device, from the hand count (matmul work; flops.py) against the best "
          "matmul rate above; XLA's count is of everything the compiled step does.")
    return 0


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])")
    _STEPS = flags.DEFINE_integer("steps", 10, "timed steps per level after a warm-up")
    _REFERENCE = flags.DEFINE_enum("reference", None, ["open_clip"], "also time the same step in open_clip (PyTorch)")
    app.run(lambda argv: sys.exit(main(_CONFIG.value, _STEPS.value, _REFERENCE.value)))
