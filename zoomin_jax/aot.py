"""python -m zoomin_jax.aot --config CONFIG[:ARGS] [--config.key=value ...] --target TARGET [--json FILE]

Compiles each level's training step of a config for hardware that is not attached (zoomin_jax.targets:
TPU slices, H100 nodes) and says whether it fits, before a slice is paid for (MaxText's
train_compile is the model). The step is the one training runs: run_setup builds it as train does,
from the effective recipe on the target's device count (effective_recipe), with the run's mesh,
partition rules, shardings and donation, over abstract params, state and batches (batch_layout;
text-cache embeddings where the run would use them): nothing is allocated and no record is read.

Per level it prints the global and per-device batch; XLA's memory plan per device (arguments,
outputs, temporaries, generated code; their total against the device's HBM); XLA's FLOPs per device
next to the hand count (flops.py); a step-time estimate where one is sound (XLA's TPU cost model,
`optimal_seconds`, only when positive; else a roofline from XLA's FLOPs and bytes accessed against
the device's peaks) and the MFU it implies (hand count over estimate x peak); the collectives in the
optimised HLO (kind, count, bytes of their results); compile time. --json FILE writes the same.
Exits 1, naming the level and the bytes, when a step needs more than the HBM less --headroom.
"""
from __future__ import annotations

import os

# The target's devices are described, never started: JAX itself runs on the CPU (with libtpu or the
# CUDA plugin installed, another backend would otherwise try to start, or fail to).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu: no GCE metadata look-up (this is not a TPU VM)
# libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it would drive; here it
# drives none, and checks may run side by side (a test suite's workers, a launcher's check).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import collections  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from zoomin_jax import effective_recipe, flops, run_setup, targets  # noqa: E402
from zoomin_jax.batch_layout import batch_arrays  # noqa: E402
from zoomin_jax.data.device import batch_sharding  # noqa: E402
from zoomin_jax.errors import UserError  # noqa: E402
from zoomin_jax.recipes import JOINT, LEVELS  # noqa: E402

GiB = targets.GiB
# Triton's GEMM autotuning needs a GPU to time its tiles on; without one XLA's own GEMM emitters and
# cuBLAS calls are planned instead (the memory plan is what the check reads).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _array_bytes(kind: str, dims: str) -> int:
    size = _BYTES.get(kind) or int(kind[1:]) // 8
    for dim in filter(None, dims.split(",")):
        size *= int(dim)
    return size


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{kind: (count, bytes of their results)} of the collectives in optimised HLO text (an async
    pair counted once, at its start, by its result: the last array of the start's tuple)."""
    found = collections.defaultdict(lambda: [0, 0])
    for match in _COLLECTIVE.finditer(hlo_text):
        shape, kind, start = match.groups()
        arrays = _ARRAY.findall(shape)
        if start and arrays:
            arrays = arrays[-1:]
        found[kind][0] += 1
        found[kind][1] += sum(_array_bytes(*array) for array in arrays)
    return {kind: (count, size) for kind, (count, size) in sorted(found.items())}


@dataclasses.dataclass
class LevelReport:
    level: str
    global_batch: int
    per_device: int
    hbm_bytes: int
    hand_flops: float            # per device
    compile_s: float
    error: str | None = None     # XLA's own refusal (out of HBM): then no plan, and it does not fit
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    alias_bytes: int = 0
    xla_flops: float | None = None      # per device
    bytes_accessed: float | None = None
    estimate_s: float | None = None
    estimate_source: str = ""
    mfu: float | None = None
    collectives: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int | None:
        """What the step holds on a device at its peak: its buffers (arguments donated to outputs
        counted once) and its code."""
        if self.error:
            return None
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits(self, headroom: float) -> bool:
        return not self.error and self.total_bytes <= self.hbm_bytes * (1 - headroom)


def estimate(cost: dict | None, target: targets.Target) -> tuple[float | None, str]:
    """(seconds, source): XLA's TPU cost model when it gives a positive time, else a roofline from
    XLA's FLOPs and bytes accessed against the target's peaks, else none (GPU: no cost analysis)."""
    if not cost or "flops" not in cost:
        return None, "none (no XLA cost analysis for this target)"
    if cost.get("optimal_seconds", 0) > 0:
        return float(cost["optimal_seconds"]), "XLA TPU cost model"
    compute, memory = cost["flops"] / target.peak_flops, cost.get("bytes accessed", 0.0) / target.hbm_bandwidth
    return max(compute, memory), f"roofline ({'compute' if compute >= memory else 'memory'}-bound)"


def abstract_batch(level: str, batch: int, dims, mesh) -> dict:
    """ShapeDtypeStructs of a global batch laid out as training's to_global lays it."""
    where = batch_sharding(mesh, mesh.axis_names)
    return jax.tree.map(lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=where),
                        batch_arrays(level, batch, dims), is_leaf=lambda node: hasattr(node, "dtype"))


@dataclasses.dataclass
class Check:
    target: targets.Target
    recipe: effective_recipe.Recipe
    levels: list[LevelReport]
    lowered: dict                # level -> jax Lowered (its text is what a test compares with training's)


def check(config, target: targets.Target, compile_steps: bool = True, progress=None) -> Check:
    """Lowers (and compiles, unless `compile_steps` is False) every level step of `config` for
    `target`; `progress(line)` hears of each compile as it ends (they take minutes for ViT-L-14)."""
    devices = target.devices()
    config = config.copy_and_resolve_references()
    if config.get("total_steps") is None:
        # Derived from the records at start-up; a step's cost does not depend on it (the lr schedule's
        # constants only), and this check reads no record.
        config.total_steps = int(config.optim.get("warmup_steps", 0)) + 1
    config, recipe = run_setup.effective(config, devices)
    run = run_setup.setup(config, devices, abstract=True)
    dims = run.dims
    options = GPU_COMPILER_OPTIONS if target.platform == "cuda" else None
    reports, lowered = [], {}
    for level, _ in run.cycle.levels:
        batch = recipe.batch[LEVELS[0] if level == JOINT else level]
        lowered[level] = run.steps[level].lower(run.state, run.frozen, abstract_batch(level, batch, dims, run.mesh))
        if not compile_steps:
            continue
        shape = flops.step_shape(run.model_cfg, level, batch, dims, run.part.frozen_blocks, run.part.text_frozen,
                                 config.get("remat", "none"))
        report = LevelReport(level, batch, batch // recipe.devices, target.hbm_bytes,
                             flops.step_flops(run.model_cfg, shape) / recipe.devices, 0.0)
        tick = time.perf_counter()
        try:
            compiled = lowered[level].compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as err:  # XLA:TPU refuses a program over HBM itself
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            report.error, report.compile_s = str(err).splitlines()[0], time.perf_counter() - tick
            reports.append(report)
            if progress:
                progress(f"the {level} step does not fit the {target.name}: {report.error}")
            continue
        report.compile_s = time.perf_counter() - tick
        memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
        seconds, source = estimate(cost, target)
        report.argument_bytes, report.output_bytes = memory.argument_size_in_bytes, memory.output_size_in_bytes
        report.temp_bytes, report.code_bytes = memory.temp_size_in_bytes, memory.generated_code_size_in_bytes
        report.alias_bytes = memory.alias_size_in_bytes
        report.xla_flops = None if not cost else cost.get("flops")
        report.bytes_accessed = None if not cost else cost.get("bytes accessed")
        report.estimate_s, report.estimate_source = seconds, source
        report.mfu = None if seconds is None else report.hand_flops / seconds / target.peak_flops
        report.collectives = collectives(compiled.as_text())
        reports.append(report)
        if progress:
            progress(f"compiled the {level} step for {target.name} in {report.compile_s:.0f} s")
    return Check(target, recipe, reports, lowered)


def _gib(size: float) -> str:
    return f"{size / GiB:.3g}"


def table(result: Check) -> str:
    rows = [("level", "batch", "per dev", "args GiB", "out GiB", "temp GiB", "code GiB", "total GiB", "of HBM",
             "TFLOP/dev XLA", "TFLOP/dev hand", "step s", "MFU", "compile s")]
    for r in result.levels:
        if r.error:
            rows.append((r.level, str(r.global_batch), str(r.per_device), *["-"] * 7, f"{r.hand_flops / 1e12:.3g}",
                         "-", "-", f"{r.compile_s:.1f}"))
            continue
        rows.append((r.level, str(r.global_batch), str(r.per_device), _gib(r.argument_bytes), _gib(r.output_bytes),
                     _gib(r.temp_bytes), _gib(r.code_bytes), _gib(r.total_bytes), f"{r.total_bytes / r.hbm_bytes:.0%}",
                     "-" if r.xla_flops is None else f"{r.xla_flops / 1e12:.3g}", f"{r.hand_flops / 1e12:.3g}",
                     "-" if r.estimate_s is None else f"{r.estimate_s:.3g}", "-" if r.mfu is None else f"{r.mfu:.0%}",
                     f"{r.compile_s:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    for r in result.levels:
        if r.error:
            lines.append(f"{r.level}: XLA: {r.error}")
            continue
        lines.append(f"{r.level}: step time from {r.estimate_source}; collectives: " + (", ".join(
            f"{kind} x{count} ({size / GiB:.3g} GiB)" for kind, (count, size) in r.collectives.items()) or "none"))
    return "\n".join(lines)


def to_json(result: Check, headroom: float) -> dict:
    target = result.target
    return {"target": dataclasses.asdict(target), "devices": result.recipe.devices, "headroom": headroom,
            "recipe": result.recipe.to_json(),
            "levels": [dataclasses.asdict(r) | {"total_bytes": r.total_bytes, "fits": r.fits(headroom)}
                       for r in result.levels]}


def main(config, target_name: str, json_path: str | None, headroom: float) -> int:
    try:
        target = targets.get(target_name)
        result = check(config, target, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{config.model} for {target.name} ({len(target.devices())} x {target.chip}, "
          f"{target.hbm_bytes / GiB:.1f} GiB HBM each), compute {config.get('compute_dtype', 'float32')}, "
          f"remat {config.get('remat', 'none')}, attention {config.get('attention', 'xla')}")
    # Without total_steps the run's length (and its warm-up's share) comes from the records, unread here.
    print("\n".join(result.recipe.lines(steps=config.get("total_steps") is not None)))
    print(table(result), flush=True)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(to_json(result, headroom), out, indent=1)
    too_big = [r for r in result.levels if not r.fits(headroom)]
    for r in too_big:
        if r.error:
            print(f"error: the {r.level} step does not fit the {target.name}'s {r.hbm_bytes / GiB:.2f} GiB HBM per "
                  f"device (XLA: {r.error}): lower its batch, or set config.remat or config.compute_dtype", file=sys.stderr)
        else:
            print(f"error: the {r.level} step needs {r.total_bytes / GiB:.2f} GiB ({r.total_bytes} bytes) per device, "
                  f"over the {(1 - headroom) * r.hbm_bytes / GiB:.2f} GiB that leaves {headroom:.0%} of the "
                  f"{target.name}'s {r.hbm_bytes / GiB:.2f} GiB HBM free: lower its batch, or set config.remat or "
                  "config.compute_dtype", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])")
    _TARGET = flags.DEFINE_enum("target", None, list(targets.TARGETS), "hardware to compile for")
    _JSON = flags.DEFINE_string("json", None, "also write the report here")
    _HEADROOM = flags.DEFINE_float("headroom", 0.10, "share of HBM a step must leave free")
    flags.mark_flags_as_required(["config", "target"])
    app.run(lambda argv: sys.exit(main(_CONFIG.value, _TARGET.value, _JSON.value, _HEADROOM.value)))
