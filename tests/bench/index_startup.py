"""Start-up of the training data (the figure, panel and region level indexes) from shard indexes vs
by decoding every record, as before indexes (issue 14).

    PYTHONPATH=. python tests/bench/index_startup.py [--records 20000] [--shards 20] [--runs 5]

The 10 real MedICaT figures annotated by the heuristic backend, replicated (new figure ids, the
same images, panels and regions) into --records records over --shards shards in a temporary folder
(removed at the end; nothing is committed). Each run builds the three level indexes in this process
from a fresh RecordSource: with the index files (after), and with them moved aside (before: each
record, image bytes included, read and decoded). Reported: the median time of --runs runs, and the
bytes this process read meanwhile (/proc/self/io rchar: every read system call, page cache hits
included, so the file system's cache does not hide what a host on gs:// would fetch); the level
indexes of both ways are checked to be the same.
A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from annotate.backends import HeuristicBackend  # noqa: E402
from annotate.run import run_shard  # noqa: E402
from test_launch_annotate import medicat_figures  # noqa: E402
from zoomin_jax import records  # noqa: E402
from zoomin_jax.data.pipeline import build_indexes  # noqa: E402
from zoomin_jax.data.samples import SampleConfig  # noqa: E402
from zoomin_jax.data.source import RecordSource  # noqa: E402
from zoomin_jax.recipes import LEVELS  # noqa: E402


def bytes_read() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])


def write_shards(folder: Path, num_records: int, num_shards: int) -> str:
    """The real figures annotated once, then copied into num_records records; their glob."""
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in medicat_figures()))
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        run_shard([str(manifest)], folder / "annotated", HeuristicBackend())
    figures = list(records.iter_records(sorted((folder / "annotated").glob("records-*.array_record"))))
    per_shard = -(-num_records // num_shards)
    for shard in range(num_shards):
        with records.RecordWriter(folder / "data" / f"records-{shard:05d}-of-{num_shards:05d}.array_record") as writer:
            for n in range(shard * per_shard, min(num_records, (shard + 1) * per_shard)):
                figure = figures[n % len(figures)]
                writer.write(figure | {"figure_id": f"{figure['figure_id']}-{n}"})
    return str(folder / "data" / "records-*.array_record")


def measure(pattern: str, runs: int) -> tuple[list[float], list[int], dict]:
    """Seconds and bytes read per run, and the level indexes' rows."""
    seconds, read = [], []
    for _ in range(runs):
        before, start = bytes_read(), time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # "no shard index" warnings, one per shard
            indexes = build_indexes(RecordSource(pattern), LEVELS, SampleConfig())
        seconds.append(time.perf_counter() - start)
        read.append(bytes_read() - before)
    return seconds, read, {level: index.rows.tolist() for level, index in indexes.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.records, args.shards)
        shards = sorted(Path(tmp, "data").glob("records-*.array_record"))
        data_bytes = sum(path.stat().st_size for path in shards)
        index_bytes = sum(Path(records.index_path(path)).stat().st_size for path in shards)
        print(f"{args.records} records in {args.shards} shards: {data_bytes / 2**20:.1f} MiB of records, "
              f"{index_bytes / 2**20:.2f} MiB of shard indexes ({index_bytes / args.records:.0f} B per figure)",
              flush=True)
        after = measure(pattern, args.runs)
        for path in shards:
            os.rename(records.index_path(path), records.index_path(path) + ".aside")
        before = measure(pattern, args.runs)
        assert before[2] == after[2], "the level indexes differ with and without the shard indexes"
        print(f"items: {', '.join(f'{level} {len(rows)}' for level, rows in after[2].items())}")
        for name, (seconds, read, _) in (("before (decoding)", before), ("after (index)", after)):
            print(f"{name}: median {statistics.median(seconds):.3f} s, {statistics.median(read) / 2**20:.2f} MiB read; "
                  f"runs {[round(s, 3) for s in seconds]} s", flush=True)
        print(f"speed-up {statistics.median(before[0]) / statistics.median(after[0]):.0f}x, "
              f"{statistics.median(before[1]) / statistics.median(after[1]):.0f}x fewer bytes read")


if __name__ == "__main__":
    main()
