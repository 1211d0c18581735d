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

from zoomin_jax import flops, run_setup
from zoomin_jax.batch_layout import LAYOUTS, Dims, example_arrays
from zoomin_jax.data.packing import pack
from zoomin_jax.data.device import to_global
from zoomin_jax.recipes import JOINT, LEVELS
from zoomin_jax.run_setup import setup


def random_batch(level: str, rng: np.random.Generator, batch: int, dims: Dims) -> dict:
    """random_examples with their children packed as a step takes them (batch_layout.batch_arrays)."""
    if level == JOINT:
        return {name: random_batch(name, rng, batch, dims) for name in LEVELS}
    examples = random_examples(level, rng, batch, dims)
    if LAYOUTS[level].child is None:
        return examples
    return pack(examples, level, dims.shards, dims.slots_per_shard(level, batch))


def random_examples(level: str, rng: np.random.Generator, batch: int, dims: Dims) -> dict:
    """`batch` examples laid out as batch_layout.example_arrays says, with values like the sampler's:
    uint8 images, CLIP token rows (SOT, five words, EOT) or cached embeddings, distinct text ids,
    child masks with one childless parent, child boxes in token units."""
    layout = LAYOUTS[level]

    def texts(shape):
        if dims.text_cached:
            return rng.standard_normal(shape).astype(np.float32)
        out = np.zeros(shape, np.int32)
        out[..., 0], out[..., 1:6], out[..., 6] = 49406, rng.integers(300, 40000, (*shape[:-1], 5)), 49407
        return out

    def ids(shape):  # distinct
        return (rng.integers(0, 2**30) + np.arange(np.prod(shape))).reshape(shape).astype(np.int32)

    def mask(shape):
        out = rng.random(shape) > 0.3
        out[0] = False
        return out

    def boxes(shape):
        corner = rng.uniform(0, 2, (*shape[:-1], 2)).astype(np.float32)
        return np.concatenate([corner, corner + rng.uniform(0.5, 2, corner.shape).astype(np.float32)], -1)

    fill = {layout.image: lambda shape: rng.integers(0, 256, shape, dtype=np.uint8), layout.tokens: texts,
            layout.text_id: ids}
    if layout.child is not None:
        fill |= {layout.child_images: fill[layout.image], layout.child_tokens: texts, layout.child_text_id: ids,
                 layout.child_mask: mask, layout.child_grid_boxes: boxes}
    return {key: fill[key]((batch, *array.shape)) for key, array in example_arrays(level, dims).items()}


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
    batch_size = config.data.batch_size[LEVELS[0] if level == JOINT else level]
    dims = run.dims
    local = dataclasses.replace(dims, shards=len(run.mesh.local_devices))

    def batch():
        host = random_batch(level, rng, batch_size // jax.process_count(), local)
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
    shape = flops.step_shape(run.model_cfg, level, batch_size, dims, run.part.frozen_blocks, run.part.text_frozen,
                             config.get("remat", "none"))
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
    config, _ = run_setup.effective(config)
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
