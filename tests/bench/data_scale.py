"""What the training input costs a host at BIOMEDICA scale, without 24M figures (issue 27).

    PYTHONPATH=. python tests/bench/data_scale.py [--figures 350000,3000000,24000000] [--processes 64,32]

For each figure count, shard indexes (and tiny ArrayRecord files of one byte a record, for the record
counts and sizes the indexes are checked against: no image bytes) are synthesized in a temporary
folder: panels per figure drawn from the 9,642 real layouts of ../shared/data/layouts/zou_train.csv
(median 2, mean 2.53), regions per panel Poisson(1.0), box sides large enough to be kept. Then, in a
fresh process per (figures, processes), process 0 of P builds the three level indexes and the
datasets' example makers as training does. Reported per process:
  start-up   seconds from the RecordSource to the three level indexes (median of --runs),
  RSS        peak resident memory of that process (ru_maxrss), and its part over what the imports
             took: the indexes and everything built on the way; and the largest of the processes
             that read the shard indexes (pipeline._index_workers: 2 on 2 cores, from 64 shards on),
  rows file  the local disk the level rows take (the file the data workers memory-map),
  pickled    what each grain worker unpickles for its level (its copy of the dataset's state),
and per figure count the text cache: distinct texts (1 + 2 per panel + 2 per region: caption,
panel text and LVLM description, region text_sub and text_lvlm), its size in the bucket (float16,
2 D + 16 bytes a text at D = 768), and the local disk a host's mirror of a gs:// cache takes (its
index, 16 bytes a text, text_cache.local). --tree DIR measures another checkout (before: the code
as it was; its level index holds every process's rows).
A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = REPO.parent / "shared" / "data" / "layouts" / "zou_train.csv"
SHARD_FIGURES = 10_000
EMBED_DIM = 768


def panel_counts() -> np.ndarray:
    """Panels per figure of the real layouts."""
    figures: dict[str, int] = {}
    with open(LAYOUTS) as f:
        for row in csv.reader(f):
            figures[row[0]] = figures.get(row[0], 0) + (row[5] == "panel")
    return np.array([count for count in figures.values() if count], np.int64)


def write_shards(folder: Path, figures: int, seed: int = 0) -> dict:
    """Shard files of `figures` synthesized index entries; the totals."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from zoomin_jax import records
    rng, counts = np.random.default_rng(seed), panel_counts()
    totals = {"figures": figures, "panels": 0, "regions": 0}
    shards = -(-figures // SHARD_FIGURES)
    for shard in range(shards):
        n = min(SHARD_FIGURES, figures - shard * SHARD_FIGURES)
        panels = rng.choice(counts, n)
        regions = [rng.poisson(1.0, p) for p in panels]
        path = folder / f"records-{shard:05d}-of-{shards:05d}.array_record"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for _ in range(n):
            writer.write(b"x")
        writer.close()
        index = {"ids": [f"f{shard}-{k}" for k in range(n)],
                 "panel_kinds": [[0] * int(p) for p in panels], "panel_sides": [[200.0] * int(p) for p in panels],
                 "region_panels": [[j for j, r in enumerate(per) for _ in range(r)] for per in regions],
                 "region_sides": [[40.0] * int(per.sum()) for per in regions], "warnings": [[] for _ in range(n)]}
        Path(records.index_path(path)).write_bytes(records.encode_index(index, path.stat().st_size))
        totals["panels"] += int(panels.sum())
        totals["regions"] += int(sum(per.sum() for per in regions))
    return totals


def measure(pattern: str, processes: int, runs: int) -> dict:
    """In this (fresh) process: process 0 of `processes` builds the level indexes `runs` times."""
    from zoomin_jax.data import pipeline
    from zoomin_jax.data.samples import SampleConfig
    from zoomin_jax.data.source import RecordSource
    from zoomin_jax.recipes import LEVELS
    seconds, before = [], resident_bytes()
    for _ in range(runs):
        start = time.perf_counter()
        source = RecordSource(pattern)
        try:
            indexes = pipeline.build_indexes(source, LEVELS, SampleConfig(), process_index=0, process_count=processes)
        except TypeError:  # before: every process indexed every item
            indexes = pipeline.build_indexes(source, LEVELS, SampleConfig())
        seconds.append(time.perf_counter() - start)
    rows_bytes = sum(index.rows.nbytes for index in indexes.values())
    if hasattr(pipeline, "_Example") and "workers" in pipeline.make_dataset.__code__.co_varnames:
        pickled = sum(len(pickle.dumps(pipeline._Example(source, level, SampleConfig(), index, 64, 0, 1 << 40, 0, True)))
                      for level, index in indexes.items())
    else:  # before: grain pickled the dataset, rows included, into every worker
        pickled = rows_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"startup_s": statistics.median(seconds), "rss_bytes": peak, "rss_over_imports_bytes": peak - before,
            "index_worker_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "rows_bytes": rows_bytes, "pickled_per_worker_bytes": pickled,
            "items": {level: index.total if hasattr(index, "total") else len(index.rows)
                      for level, index in indexes.items()}}


def gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", default="350000,3000000,24000000")
    parser.add_argument("--processes", default="64,32", help="P: 64 hosts of a v5e-256; 4 SLURM nodes x 8 ranks")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", default=str(REPO), help="the checkout whose zoomin_jax is measured")
    parser.add_argument("--measure", nargs=3, metavar=("PATTERN", "PROCESSES", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), int(args.measure[2]))))
        return
    for figures in map(int, args.figures.split(",")):
        with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
            start = time.perf_counter()
            totals = write_shards(Path(tmp), figures)
            texts = totals["figures"] + 2 * totals["panels"] + 2 * totals["regions"]
            print(f"{figures:,} figures: {totals['panels']:,} panels, {totals['regions']:,} regions, "
                  f"{-(-figures // SHARD_FIGURES)} shards written in {time.perf_counter() - start:.0f} s; text cache "
                  f"{texts:,} texts: {gib(texts * (2 * EMBED_DIM + 16))} in the bucket, a host's gs:// mirror "
                  f"{gib(texts * 16)}", flush=True)
            for processes in map(int, args.processes.split(",")):
                env = dict(os.environ, PYTHONPATH=args.tree, JAX_PLATFORMS="cpu")
                done = subprocess.run([sys.executable, __file__, "--measure", f"{tmp}/*.array_record", str(processes),
                                       str(args.runs)], env=env, capture_output=True, text=True, check=True)
                got = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  P={processes}: start-up {got['startup_s']:.1f} s (median of {args.runs}), RSS "
                      f"{gib(got['rss_bytes'])} ({gib(got['rss_over_imports_bytes'])} over the imports; the largest index "
                      f"worker's {gib(got['index_worker_rss_bytes'])}), rows file {gib(got['rows_bytes'])}, pickled per worker "
                      f"{gib(got['pickled_per_worker_bytes'])}, items {got['items']}", flush=True)


if __name__ == "__main__":
    main()
