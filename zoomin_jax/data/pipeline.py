"""Per-level grain datasets: each JAX process indexes its own items of a level, shuffles them each
epoch from a seed, makes their examples in read threads (and worker processes), skipping and
counting bad records, and batches them.

The items of a level are dealt to S data shards (config.data.data_shards; default: one per process):
item number g of the level (shards in order, then records, then items) goes to data shard g mod S, an
arithmetic rule every process applies while reading the shard indexes, and process p of P owns the
data shards p·S/P … (p+1)·S/P − 1. So a process keeps n/P rows (int32), not the level's n, and its
data workers memory-map them from one file instead of each unpickling a copy. Each data shard
shuffles its items anew every epoch; a process's batch k is the k-th sub-batch of each of its data
shards, in order, so global batch k (the processes' batches in process order) is the same for every
process count that divides S: 1 process x 8 devices trains on what 2 x 4 do when both set S = 2. An
example's random draws (crop, children, text) are seeded by the run's seed, the epoch and g.

Examples are made `read_threads` at a time (record reads are I/O: an object store's latency is
hidden behind the others) and batched after that map, so a batch is the work of many threads, not
of one. A record whose bytes or image cannot be decoded is skipped (config.data.strict stops
instead, naming it), and the batch that follows counts it in SKIPPED.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grain
import numpy as np
from tqdm import tqdm

from zoomin_jax.batch_layout import LAYOUTS
from zoomin_jax.data import samples, shard_index
from zoomin_jax.data.packing import PackChildren
from zoomin_jax.data.source import RecordSource
from zoomin_jax.errors import UserError
from zoomin_jax.image_decode import ImageError
from zoomin_jax.recipes import LEVELS

SKIPPED = "skipped_records"  # per example: bad records skipped just before it (the trainer sums and drops it)
BAD_RECORD = "bad record"  # a bad record's example: not None, which grain gives the missing end of a last batch


@dataclasses.dataclass
class LevelIndex:
    """One level's items as (record, item) int32 rows, this process's data shards only (the module
    docstring says which), shard after shard from `starts`; `total`: items over all processes;
    `child_histogram[c]`: items of all processes whose example can hold c children (data.packing
    sizes child slots from it); records that failed to decode while indexing are counted."""
    rows: np.ndarray
    starts: np.ndarray        # [shards here + 1]: where each of this process's data shards starts in rows
    first_shard: int          # the number of this process's first data shard
    data_shards: int          # S, over all processes
    total: int
    child_histogram: np.ndarray
    skipped_records: int


def _add_counts(histogram: np.ndarray, added: np.ndarray) -> np.ndarray:
    if len(added) > len(histogram):
        histogram = np.pad(histogram, (0, len(added) - len(histogram)))
    histogram[:len(added)] += added
    return histogram


def _index_workers(shards: int) -> int:
    """Processes that read shard indexes at start-up: the cores this process may use, at most 8
    (decoding an index file is Python work: one core each), none for a few shards (spawning costs more)."""
    return min(8, len(os.sched_getaffinity(0))) if shards >= 64 else 0


def _shard_levels(source: RecordSource, levels, cfg: samples.SampleConfig, workers: int):
    """shard_index.shard_levels of every shard, in order, in `workers` spawned processes (0: here)."""
    read = functools.partial(shard_index.shard_levels, strict=source.strict, levels=tuple(levels), cfg=cfg)
    firsts = [source.shard_records(shard).start for shard in range(len(source.paths))]
    if workers <= 1:
        yield from map(read, source.paths, firsts)
        return
    # A window of shards in flight, not all of them: results read faster than this process takes
    # them in would wait here (3.6 GiB at 24M figures when every shard was submitted at once).
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = collections.deque()
        for path, first_record in zip(source.paths, firsts):
            pending.append(pool.submit(read, path, first_record))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_indexes(source: RecordSource, levels, cfg: samples.SampleConfig, progress: bool = False,
                  process_index: int = 0, process_count: int = 1, data_shards: int = 0,
                  index_workers: int | None = None) -> dict[str, LevelIndex]:
    """Each level's index (this process's data shards; `data_shards` 0: one per process) from the
    shards' index files, reading no record (a shard without a usable index is decoded once for all
    levels: see shard_index), in `index_workers` processes (None: _index_workers). `progress`: a
    progress line with ETA."""
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    data_shards = data_shards or process_count
    if data_shards % process_count:
        raise UserError(f"config.data.data_shards={data_shards} is not a multiple of the {process_count} processes; "
                        "set it to one (0: one data shard per process)")
    if len(source) >= 2**31:
        raise UserError(f"{len(source)} records are more than int32 rows can number; split the run's records")
    here = data_shards // process_count
    first = process_index * here
    rows = {level: [[np.zeros((0, 2), np.int32)] for _ in range(here)] for level in levels}
    seen = dict.fromkeys(levels, 0)
    histograms = {level: np.zeros(1, np.int64) for level in levels}
    skipped = 0
    workers = _index_workers(len(source.paths)) if index_workers is None else index_workers
    for parts, failed in tqdm(_shard_levels(source, levels, cfg, workers), total=len(source.paths),
                              desc="level indexes", unit="shard", mininterval=10, disable=not progress):
        skipped += failed
        for level, (level_rows, child_histogram) in parts.items():
            for t in range(here):
                # A copy: a strided view would keep the shard's every row alive.
                rows[level][t].append(level_rows[(first + t - seen[level]) % data_shards::data_shards].copy())
            histograms[level] = _add_counts(histograms[level], child_histogram)
            seen[level] += len(level_rows)
    indexes = {}
    for level in levels:
        shards = [np.concatenate(blocks) for blocks in rows[level]]
        indexes[level] = LevelIndex(np.concatenate(shards), np.cumsum([0] + [len(b) for b in shards]), first,
                                    data_shards, seen[level], histograms[level], skipped)
    return indexes


def build_index(source: RecordSource, level: str, cfg: samples.SampleConfig, process_index: int = 0,
                process_count: int = 1, data_shards: int = 0) -> LevelIndex:
    return build_indexes(source, (level,), cfg, process_index=process_index, process_count=process_count,
                         data_shards=data_shards)[level]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


class _SharedRows:
    """A process's rows in a file its data workers memory-map: pickled as the file's name, so a
    spawned worker holds no copy of its own. The file goes when the process that wrote it exits, or,
    after a kill -9, when the next one starts on the host."""

    def __init__(self, rows: np.ndarray):
        for stale in Path(tempfile.gettempdir()).glob("zoomin_jax-rows-*-*"):
            if not _alive(int(stale.name.split("-")[2])):
                shutil.rmtree(stale, ignore_errors=True)
        directory = tempfile.mkdtemp(prefix=f"zoomin_jax-rows-{os.getpid()}-")
        atexit.register(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "rows.npy")
        np.save(self.path, rows)
        self._rows = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_rows": None}

    def __getitem__(self, k: int) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows[k]


class _Example:
    """Module-level callable (picklable for grain's spawned workers): element i of the dataset -> the
    example of the stream position it holds (see `position` and the module docstring), None past the
    end of a finite stream, or BAD_RECORD (unless strict). Keeps the last `cached_images` decoded
    images: on a dataset that small, each image is decoded once per worker, not once per sample
    (decoding is most of the time of a sample)."""

    def __init__(self, source: RecordSource, level: str, cfg: samples.SampleConfig, index: LevelIndex, batch_size: int,
                 workers: int, length: int, seed: int, shuffle: bool, cached_images: int = 0):
        self.source, self.level, self.cfg, self.cached_images = source, level, cfg, cached_images
        self.rows, self.starts = _SharedRows(index.rows), index.starts.tolist()
        self.first_shard, self.data_shards = index.first_shard, index.data_shards
        self.batch_size, self.sub_batch = batch_size, batch_size // (len(self.starts) - 1)
        self.workers, self.length, self.seed, self.shuffle = workers, length, seed, shuffle
        self.decoded = collections.OrderedDict()

    def position(self, element: int) -> int:
        """The stream position element `element` holds. grain deals the elements to its W workers one
        by one (worker w gets w, w + W, ...), each batches its own, and their batches are read in turn:
        so element w + W·(j·b + t) is example t of batch j·W + w, and every batch holds the positions
        it holds without workers."""
        if self.workers <= 1:
            return element
        rest, worker = divmod(element, self.workers)
        batch, t = divmod(rest, self.batch_size)
        return (batch * self.workers + worker) * self.batch_size + t

    def _image(self, index: int, record: dict):
        if not self.cached_images:
            return samples.decode_image(record)
        image = self.decoded.pop(index, None)
        self.decoded[index] = samples.decode_image(record) if image is None else image
        if len(self.decoded) > self.cached_images:
            self.decoded.popitem(last=False)
        return self.decoded[index]

    def item(self, position: int) -> tuple[int, int, int]:
        """(epoch, row number in `rows`, item number in the level) of a stream position."""
        batch, in_batch = divmod(position, self.batch_size)
        shard, in_sub_batch = divmod(in_batch, self.sub_batch)
        length = self.starts[shard + 1] - self.starts[shard]
        epoch, k = divmod(batch * self.sub_batch + in_sub_batch, length)
        if self.shuffle:  # a seed per data shard and epoch, whatever process holds the shard
            mixed = ((self.seed * 1_000_003 + self.first_shard + shard) * 1_000_003 + epoch) % 2**32
            k = grain.experimental.index_shuffle(k, max_index=length - 1, seed=mixed, rounds=4)
        return epoch, self.starts[shard] + k, self.first_shard + shard + k * self.data_shards

    def __call__(self, element: int):
        position = self.position(element)
        if position >= self.length:
            return None
        epoch, row, item_number = self.item(position)
        record_index, item = map(int, self.rows[row])
        rng = np.random.default_rng((self.seed, epoch, item_number))
        record = self.source[record_index]
        if record is None:  # the source said why when strict
            return BAD_RECORD
        try:
            image = self._image(record_index, record)
        except ImageError as err:
            if self.source.strict:
                raise UserError(f"{self.source.where(record_index)} has an {err}; rerun without strict mode to skip "
                                "it.") from None
            return BAD_RECORD
        if self.level == "figure":
            return samples.figure_example(record, self.cfg, rng, image)
        if self.level == "panel":
            return samples.panel_example(record, item, self.cfg, rng, image)
        return samples.region_example(record, item, self.cfg, rng, image)


class _CountSkipped(grain.IterDataset):
    """Drops the BAD_RECORD a bad record's example is and counts it, in SKIPPED of the next example."""

    def __iter__(self):
        return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self.skipped = 0

    def __next__(self) -> dict:
        while (example := next(self._parent)) is BAD_RECORD:
            self.skipped += 1
        example[SKIPPED], self.skipped = np.int32(self.skipped), 0
        return example

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)


def make_dataset(patterns, level: str, batch_size: int, *, seed: int = 0, cfg=samples.SampleConfig(),
                 process_index: int = 0, process_count: int = 1, data_shards: int = 0, shuffle: bool = True,
                 strict: bool = False, num_epochs: int | None = 1, index: LevelIndex | None = None,
                 drop_remainder: bool = True, cached_images: int = 0, pack_children: tuple[int, int] | None = None,
                 read_threads: int = 16, workers: int = 0, worker_buffer: int = 4) -> grain.IterDataset:
    """Batches of this process's items of one level (`patterns`: record shards, or a RecordSource of
    them), for `num_epochs` epochs (None: forever; evaluation keeps the last, smaller batch:
    drop_remainder=False), examples made in `read_threads` threads (0: one at a time) in each of
    `workers` spawned processes (0: in this one) that keep `worker_buffer` batches ready; the same
    batches whatever the worker count. `pack_children`: (this process's devices, child slots per
    device): children packed as a training step takes them (data.packing); without it, in their slots
    per example. Its iterator's position `get_state()` captures and `set_state()` restores, also in a
    fresh process."""
    source = patterns if isinstance(patterns, RecordSource) else RecordSource(patterns, strict=strict)
    index = index or build_index(source, level, cfg, process_index, process_count, data_shards)
    here = len(index.starts) - 1
    if index.total == 0:
        raise UserError(f"{patterns} holds no {level}-level items (records without "
                        f"{'regions' if level == 'region' else 'panels'}?); annotate with a backend that finds them.")
    if min(np.diff(index.starts)) == 0:
        raise UserError(f"{patterns} holds {index.total} {level}-level items, fewer than the {index.data_shards} data "
                        f"shards: give the run more records, or fewer data shards (config.data.data_shards)")
    if batch_size % here:
        raise UserError(f"the batch of {batch_size} does not split into this process's {here} data shards; set "
                        "config.data.data_shards so that each process's batch does")
    if num_epochs is not None and here > 1:
        raise ValueError("a dataset of several data shards per process runs forever (num_epochs=None)")
    length = sys.maxsize if num_epochs is None else len(index.rows) * num_epochs
    span = batch_size * max(workers, 1)  # whole rounds of batches over the workers: see _Example.position
    examples = grain.MapDataset.range(sys.maxsize if num_epochs is None else -(-length // span) * span).map(
        _Example(source, level, cfg, index, batch_size, workers, length, seed, shuffle, cached_images))
    # A buffer of two batches: enough to keep the threads busy, where grain's default (500
    # examples) would hold hundreds of MB of pixels in every worker.
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads))
    batches = _CountSkipped(examples.to_iter_dataset(read)).batch(batch_size, drop_remainder=drop_remainder)
    if pack_children is not None and LAYOUTS[level].child is not None:
        batches = batches.map(PackChildren(level, *pack_children))
    if workers == 0:
        return batches
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run
        flags.FLAGS.mark_as_parsed()  # nothing has parsed them
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer))
