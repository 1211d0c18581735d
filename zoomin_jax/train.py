"""python -m zoomin_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value]

Zoom-in training: the granularity cycle over figure / panel / region batches, one jitted step per
level on a device mesh, orbax checkpoints with exact resume, SIGTERM -> save and exit, a guard that
skips non-finite updates and stops after too many in a row. Logs one line per interval, TensorBoard
events and metrics.jsonl in the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from zoomin_jax import effective_recipe, evaluators, run_dir, run_setup, sharding, storage
from zoomin_jax.checkpoint import Checkpoints
from zoomin_jax.data import pipeline, samples, text_cache
from zoomin_jax.data.device import to_global
from zoomin_jax.data.source import RecordSource
from zoomin_jax.encoder import CLIPEncoder
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import merge
from zoomin_jax.models.config import get_preset
from zoomin_jax.recipes import JOINT, LEVELS
from zoomin_jax.tokenizer import tokenize

def build_text_cache(config, run: run_setup.Setup, directory: epath.Path) -> str:
    """The frozen text tower's embedding of every text in the records, computed once per run into
    the workdir by all processes together (each reads its share of the records and embeds its share
    of the distinct texts; see text_cache.build), reused on resume; the data pipeline then emits
    embeddings instead of tokens. Returns the local directory the workers open it from (a gs://
    cache's host mirror: text_cache.local)."""
    if not run.part.text_frozen:
        raise UserError("config.data.text_cache needs a frozen text tower (no text parameter in config.train_rules)")
    if not text_cache.is_built(directory):
        source = RecordSource(config.data.records, strict=config.data.strict)
        share = np.array_split(np.arange(len(source)), jax.process_count())[jax.process_index()]
        records = tqdm(share, desc="text cache: reading records", unit="record", mininterval=10,
                       disable=jax.process_index() != 0)
        context = config.data.get("context_text_prob", 0) > 0
        texts = (text for n in records if (record := source[int(n)]) is not None
                 for text in text_cache.record_texts(record, context))
        # A call per TEXTS_PER_DEVICE texts on every device of the run: 64 chips take 16k texts a
        # call, where a fixed global batch would leave each chip a handful and a round trip per handful.
        encoder = CLIPEncoder(run.model_cfg, merge(run.state["params"], run.frozen),
                              run_dir.preprocess_cfg(config, run.model_cfg), run.mesh,
                              batch_size=text_cache.TEXTS_PER_DEVICE * run.mesh.size)
        built = text_cache.build(directory, texts, lambda chunk: encoder.encode_text_share(tokenize(chunk)),
                                 encoder.process_batch_size)
        print(f"text cache: {built.texts} distinct texts, {built.embedded} of them embedded by process "
              f"{jax.process_index()}, in {directory}", flush=True)
    return text_cache.local(directory)


def sample_config(config, model_cfg) -> samples.SampleConfig:
    """The training examples' settings; the item settings are those held-out retrieval uses too."""
    data = config.data
    return samples.SampleConfig(
        image_size=model_cfg.vision.image_size, patch_size=model_cfg.vision.patch_size,
        max_panels=data.max_panels, max_regions=data.max_regions, lvlm_text_prob=data.lvlm_text_prob,
        context_text_prob=data.context_text_prob, min_visible=data.min_visible, crop_scale=tuple(data.crop_scale),
        train=True, **evaluators.item_settings(data))


def check_init(config) -> None:
    """A config that trains from a pretrained model (config.allow_random_init False: the paper's) and
    names none would train from a random init without a word: refuse it."""
    if not config.get("model_init") and not config.get("allow_random_init", True):
        raise UserError("config.model_init is not set: give the converted model's directory (config argument "
                        "init=DIR or --config.model_init=DIR), or the config argument init=random to train from "
                        "a random init")


# The region step of the v4 preset takes 160 examples a host every 0.07 s (compile check estimate):
# ~2,300 a second, 16 cores at the ~150 a core measured here (README, "Feeding a host").
MAX_DATA_WORKERS = 32


def data_workers(config) -> int:
    """config.data.workers grain worker processes per level, or for -1 the cores this process may use
    (SLURM's --cpus-per-task binds them) less one for the training loop, split between the levels
    that draw batches at once (one, or all three for the joint step), at least 1 and at most
    MAX_DATA_WORKERS each: the workers of the levels not in their turn sleep once their buffers are
    full, so alternating levels share the cores in time, and each worker's read threads hide the
    store's latency. With 0 on an accelerator every example is made in the training process, between
    steps: said once."""
    workers = int(config.data.workers)
    if workers < 0:
        at_once = len(LEVELS) if any(level == JOINT for level, _ in config.cycle) else 1
        workers = min(MAX_DATA_WORKERS, max(1, (len(os.sched_getaffinity(0)) - 1) // at_once))
    if workers == 0 and jax.default_backend() != "cpu":
        print(f"warning: config.data.workers is 0 on {jax.default_backend()}: every example is made in the "
              "training process while the chips wait; set config.data.workers=-1 (from the cores this process "
              "may use) or a count", file=sys.stderr, flush=True)
    return workers


def level_indexes(config, model_cfg) -> dict[str, pipeline.LevelIndex]:
    source = RecordSource(config.data.records, strict=config.data.strict)
    return pipeline.build_indexes(source, effective_recipe.cycle_levels(config), sample_config(config, model_cfg),
                                  progress=jax.process_index() == 0, process_index=jax.process_index(),
                                  process_count=jax.process_count(), data_shards=config.data.get("data_shards", 0))


def level_iterators(config, run: run_setup.Setup, indexes: dict, batch_sizes: dict, cache: str | None = None) -> dict:
    """{level: grain iterator of this process's batches}, children packed for this process's devices
    as the run's steps take them (run.dims)."""
    cfg = dataclasses.replace(sample_config(config, run.model_cfg), text_cache=cache)
    process_count = jax.process_count()
    iterators, workers = {}, data_workers(config)
    for level, index in indexes.items():
        if batch_sizes[level] % process_count:
            raise UserError(f"the global {level} batch {batch_sizes[level]} is not divisible by the "
                            f"{process_count} processes; change config.data's batch sizes")
        iterators[level] = iter(pipeline.make_dataset(
            config.data.records, level, batch_sizes[level] // process_count, seed=config.seed, cfg=cfg,
            strict=config.data.strict, num_epochs=None, index=index, cached_images=config.data.get("cached_images", 0),
            pack_children=(len(run.mesh.local_devices), run.dims.slots_per_shard(level, batch_sizes[level])),
            workers=workers))
    return iterators


class Logger:
    """One line per interval on stdout, metrics.jsonl and TensorBoard events (primary process).
    TensorBoard gets one series per level for every scalar a level logs (loss, grad_norm, lr and each
    term: "panel/loss"), and the interval's throughput once, under "train/"."""

    def __init__(self, workdir: epath.Path):
        self.active = jax.process_index() == 0
        if self.active:
            self.jsonl = storage.GrowingFile(workdir / "metrics.jsonl")
            self.writer = storage.summary_writer(workdir / "tensorboard")

    def write(self, step: int, level: str, metrics: dict, timing: dict | None = None) -> None:
        if not self.active:
            return
        timing = timing or {}
        line = json.dumps({"step": step, "level": level, "time": time.time(), **metrics, **timing}) + "\n"
        self.jsonl.write(line.encode())
        self.jsonl.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(f"{level}/{key}", value, step)
        for key, value in timing.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()
        shown = " ".join(f"{k}={v:.4g}" for k, v in (metrics | timing).items())
        print(f"step {step} [{level}] {shown}", flush=True)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.writer.close()


@dataclasses.dataclass
class Interval:
    """The steps one log line sums up. Its clock runs from its start to the moment its metrics are on
    the host (`elapsed` is read after the fetch), so device time still in flight when the interval
    closes is counted in it rather than in no interval; compilation and evaluation are paused out."""
    start: float = dataclasses.field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    checkpoint: float = 0.0
    steps: int = 0
    examples: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)  # level -> [device metrics of each step]

    def add(self, level: str, metrics: dict, examples: int) -> None:
        self.steps += 1
        self.examples += examples
        self.metrics.setdefault(level, []).append(metrics)  # device arrays: no host sync here

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def fetch(self, skipped_records: int) -> tuple[dict, dict, float]:
        """{level: metrics averaged over its steps}, the interval's timing (after the device is done),
        and when it ended: the next interval starts there, so the intervals tile the run's time."""
        history = jax.device_get(self.metrics)
        end = time.perf_counter()
        elapsed = end - self.start
        by_level = {}
        for level, steps in history.items():
            by_level[level] = {key: float(np.mean([m[key] for m in steps])) for key in steps[0]}
            by_level[level]["skipped_in_a_row"] = float(max(m["skipped_in_a_row"] for m in steps))
        timing = {"examples_per_s": self.examples / elapsed, "step_time_s": elapsed / self.steps,
                  "data_wait_s": self.data_wait / self.steps, "checkpoint_s": self.checkpoint,
                  "skipped_records": skipped_records}
        return by_level, timing, end


class Preemption:
    """Stopping on SIGTERM (SLURM, spot VMs) or a TPU maintenance notice, pod-wide (docs/design.md §9).
    With several processes, JAX's preemption service (started by jax.distributed.initialize; its own
    SIGTERM handler, and the TPU notice) makes every process agree on one step: `reached(step)` turns
    True on all of them at that step, so they save it together. A Python SIGTERM handler would replace
    the service's, so one is installed only for a single process, which has no service."""

    def __init__(self):
        self.pod, self.signal = jax.process_count() > 1, None
        if not self.pod:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def reached(self, step: int) -> bool:
        """Called at every step by every process (the service's protocol needs each step)."""
        if self.pod:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None


def use_compilation_cache(directory: str, workdir: epath.Path) -> None:
    """config.compilation_cache_dir: JAX's persistent compilation cache (local or gs://), so a restart
    (preemption, requeue) loads the three level steps instead of compiling them again; "workdir" is
    workdir/compilation_cache, "" leaves JAX's own setting (off, or JAX_COMPILATION_CACHE_DIR)."""
    if directory:
        path = workdir / "compilation_cache" if directory == "workdir" else epath.Path(directory)
        jax.config.update("jax_compilation_cache_dir", os.fspath(path))


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training to config.total_steps; returns the last logged metrics."""
    check_init(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.initialize_distributed()
    sharding.require_platform(config)
    use_compilation_cache(config.get("compilation_cache_dir", ""), workdir)
    indexes = level_indexes(config, get_preset(config.model))
    config, recipe = run_setup.effective(config, items={level: index.total for level, index in indexes.items()},
                                         child_histograms={level: index.child_histogram
                                                           for level, index in indexes.items()})
    heldout = evaluators.retrieval_items(config.get("evals", {}), config.data)
    if jax.process_index() == 0:
        print("\n".join(recipe.lines()), flush=True)
        for name, items in heldout.items():
            print(f"evals.{name}: retrieval items by " + ", ".join(f"{key}={value}" for key, value in items.items())
                  + " (config.data's, where the eval sets none)", flush=True)
        (workdir / "recipe.json").write_text(json.dumps(recipe.to_json() | {"heldout_items": heldout}, indent=1))
    batch_sizes = dict(recipe.batch)
    run = run_setup.setup(config)
    mesh, model_cfg, state, frozen, cycle, steps = run.mesh, run.model_cfg, run.state, run.frozen, run.cycle, run.steps
    cache = build_text_cache(config, run, workdir / "text_cache") if config.data.get("text_cache") else None
    iterators = level_iterators(config, run, indexes, batch_sizes, cache)
    skipped_indexing = next(iter(indexes.values())).skipped_records
    if skipped_indexing:
        print(f"skipping {skipped_indexing} records that failed to decode (config.data.strict=True stops instead)",
              flush=True)
    skipped_here = 0  # bad records this process's pipelines skipped since this start
    checkpoints = Checkpoints(workdir / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = checkpoints.restore(start, abstract, iterators)
        print(f"resumed from step {start} in {checkpoints.directory}", flush=True)
    step = int(state["step"])

    preemption = Preemption()
    logger = Logger(workdir)
    config_json = json.loads(config.to_json_best_effort())
    interval, compiled, last = Interval(), set(), {}
    try:
        while step < config.total_steps:
            level = cycle.level_at(step)
            tick = time.perf_counter()
            host = ({name: next(iterators[name]) for name in LEVELS} if level == JOINT
                    else next(iterators[level]))
            for one in host.values() if level == JOINT else [host]:
                skipped_here += int(one.pop(pipeline.SKIPPED).sum())
            batch = to_global(host, mesh, mesh.axis_names)
            interval.data_wait += time.perf_counter() - tick
            tick = time.perf_counter()
            state, metrics = steps[level](state, frozen, batch)
            if level not in compiled:  # the first call of a level compiles it: time that apart
                jax.block_until_ready(metrics)
                compiled.add(level)
                print(f"compiled the {level} step in {time.perf_counter() - tick:.1f} s", flush=True)
                interval.pause(time.perf_counter() - tick)
            step += 1
            interval.add(level, metrics, sum(batch_sizes.values()) if level == JOINT else batch_sizes[level])
            preempted = preemption.reached(step)
            tick = time.perf_counter()
            if checkpoints.save(step, state, iterators, config_json, force=preempted):
                interval.checkpoint += time.perf_counter() - tick  # the blocking part; the write goes on async
            if step % config.log_every == 0 or step == config.total_steps or preempted:
                # One line per level trained in the interval, each term averaged over its steps. The guard
                # is read here, not after every step: a per-step read would make the host wait for the
                # device before fetching the next batch.
                skipped = skipped_indexing + int(multihost_utils.process_allgather(np.int64(skipped_here)).sum())
                by_level, timing, ended = interval.fetch(skipped)
                for logged_level, last in by_level.items():
                    logger.write(step, logged_level, last, timing)
                worst = max(m["skipped_in_a_row"] for m in by_level.values())
                if worst >= config.max_bad_steps:
                    raise UserError(f"{int(worst)} non-finite updates in a row before step {step}; the last good "
                                    f"checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory} — "
                                    "lower config.optim.lr or check the data")
                interval = Interval(start=ended)
            if evals := evaluators.due(config.get("evals", {}), step, config.total_steps):
                tick = time.perf_counter()
                encoder = CLIPEncoder(model_cfg, merge(state["params"], frozen),
                                      run_dir.preprocess_cfg(config, model_cfg), mesh)
                logger.write(step, "eval", evaluators.run_evaluators(evals, encoder, data=config.data))
                interval.pause(time.perf_counter() - tick)  # evaluation time is not step time
            if preempted:
                print(f"preempted: stopped at step {step} with its checkpoint saved; rerun to resume", flush=True)
                break
        else:
            if not checkpoints.has(step):
                checkpoints.save(step, state, iterators, config_json, force=True)
    finally:
        checkpoints.close()
        logger.close()
    return last


def main(config, workdir: str | None) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
    if workdir is None or config is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 1
    try:
        train(config, workdir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Flags exist only when this module is the program: importing it (or anything that reads a
    # run) must not register --config / --workdir in someone else's program.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])")
    _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl and TensorBoard events go")
    app.run(lambda argv: sys.exit(main(_CONFIG.value, _WORKDIR.value)))
