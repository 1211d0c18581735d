"""Per-level grain datasets: an index of items, shuffled from a seed, sliced per JAX process,
mapped to examples, batched. The same seed gives the same batches; process slices are disjoint
and together cover every item once per epoch."""
from __future__ import annotations

import collections
import dataclasses

import grain
import numpy as np
from tqdm import tqdm

from zoomin_jax.batch_layout import LAYOUTS
from zoomin_jax.data import samples, shard_index
from zoomin_jax.data.packing import PackChildren
from zoomin_jax.data.source import RecordSource
from zoomin_jax.errors import UserError
from zoomin_jax.recipes import LEVELS


@dataclasses.dataclass
class LevelIndex:
    """Items of one level as (record, item) rows, the children each can hold at most (data.packing
    sizes child slots from them); records that failed to decode are counted."""
    rows: np.ndarray
    skipped_records: int
    child_counts: np.ndarray


def build_indexes(source: RecordSource, levels, cfg: samples.SampleConfig,
                  progress: bool = False) -> dict[str, LevelIndex]:
    """Each level's index from the shards' index files, reading no record (a shard without a usable
    index is decoded once for all levels: see shard_index). `progress`: a progress line with ETA."""
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    rows, counts, skipped = {level: [] for level in levels}, {level: [] for level in levels}, 0
    for shard in tqdm(range(len(source.paths)), desc="level indexes", unit="shard", mininterval=10,
                      disable=not progress):
        items, failed = shard_index.shard_items(source, shard)
        skipped += failed
        for level in levels:
            level_rows, child_counts = shard_index.level_rows(items, level, cfg)
            rows[level].append(level_rows)
            counts[level].append(child_counts)
    return {level: LevelIndex(np.concatenate(rows[level]), skipped, np.concatenate(counts[level])) for level in levels}


def build_index(source: RecordSource, level: str, cfg: samples.SampleConfig) -> LevelIndex:
    return build_indexes(source, (level,), cfg)[level]


class _Example:
    """Module-level callable (picklable for grain's spawned workers). Keeps the last `cached_images`
    decoded images: on a dataset that small, each image is decoded once per worker, not once per
    sample (decoding is most of the time of a sample)."""

    def __init__(self, source: RecordSource, level: str, cfg: samples.SampleConfig, cached_images: int = 0):
        self.source, self.level, self.cfg, self.cached_images = source, level, cfg, cached_images
        self.decoded = collections.OrderedDict()

    def _image(self, index: int, record: dict):
        if not self.cached_images:
            return samples.decode_image(record)
        image = self.decoded.pop(index, None)
        self.decoded[index] = samples.decode_image(record) if image is None else image
        if len(self.decoded) > self.cached_images:
            self.decoded.popitem(last=False)
        return self.decoded[index]

    def __call__(self, row, rng: np.random.Generator):
        index = int(row[0])
        record = self.source[index]
        image = self._image(index, record)
        if self.level == "figure":
            return samples.figure_example(record, self.cfg, rng, image)
        if self.level == "panel":
            return samples.panel_example(record, int(row[1]), self.cfg, rng, image)
        return samples.region_example(record, int(row[1]), self.cfg, rng, image)


def item_rows(index: LevelIndex, *, seed: int, process_index: int, process_count: int,
              shuffle: bool = True, num_epochs: int | None = 1) -> grain.MapDataset:
    """This process's (record, item) rows: see `_global_rows`, then every process_count-th row from
    process_index, so the slices are disjoint and together are the one-process stream."""
    return _global_rows(index, seed, shuffle, num_epochs)[process_index::process_count]


def _global_rows(index: LevelIndex, seed: int, shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
    """Every process's rows in one stream: a seeded shuffle, a new permutation each epoch (grain
    seeds a repeated shuffle per epoch)."""
    dataset = grain.MapDataset.source(index.rows)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(num_epochs)


def make_dataset(patterns, level: str, batch_size: int, *, seed: int = 0, cfg=samples.SampleConfig(),
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True, strict: bool = False,
                 num_epochs: int | None = 1, index: LevelIndex | None = None, drop_remainder: bool = True,
                 cached_images: int = 0, pack_children: tuple[int, int] | None = None) -> grain.MapDataset:
    """Batches of this process's slice of one level, for `num_epochs` epochs (None: forever;
    evaluation keeps the last, smaller batch: drop_remainder=False). Global batch k holds the same
    examples, crops and text draws whatever the process count. `pack_children`: (this process's devices,
    child slots per device): children packed as a training step takes them (data.packing); without
    it, in their slots per example."""
    source = RecordSource(patterns, strict=strict)
    index = index or build_index(source, level, cfg)
    if len(index.rows) == 0:
        raise UserError(f"{patterns} holds no {level}-level items (records without "
                        f"{'regions' if level == 'region' else 'panels'}?); annotate with a backend that finds them.")
    # The random draws are seeded by an example's position in the global stream, before the
    # process slice: seeded after it, example k of every process would get the same crop, and a
    # run's augmentation would change with its process count.
    examples = _global_rows(index, seed, shuffle, num_epochs).random_map(
        _Example(source, level, cfg, cached_images), seed=seed + 1)
    batches = examples[process_index::process_count].batch(batch_size, drop_remainder=drop_remainder)
    if pack_children is None or LAYOUTS[level].child is None:
        return batches
    return batches.map(PackChildren(level, *pack_children))


def batch_iterator(dataset: grain.MapDataset, num_workers: int = 0, prefetch: int = 2,
                   worker_buffer: int = 4) -> grain.DatasetIterator:
    """An iterator whose position `get_state()` captures and `set_state()` restores, also in a fresh
    process; with num_workers > 0 examples are made in spawned worker processes, each keeping
    `worker_buffer` batches ready."""
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run
            flags.FLAGS.mark_as_parsed()  # nothing has parsed them
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                     per_worker_buffer_size=worker_buffer))
    return iter(iterable)
