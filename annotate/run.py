"""`annotate run`: one shard of the inputs -> records, failures and a summary; resumable, atomic.

Figures go to shard crc32(id) % num_shards, so every process reads all inputs and keeps its own
(and duplicate ids meet in one shard). Records are written in parts that become visible only when
closed; failures are appended line by line. After a crash a rerun treats the ids in closed parts and
in the failures file as done, drops the unfinished part, and redoes the rest, so each input id
ends up exactly once across records and failures. When the shard is complete its parts are merged
into DIR/records-SSSSS-of-NNNNN.array_record and DIR/summary-SSSSS-of-NNNNN.json is written.
"""
from __future__ import annotations

import collections
import json
import os
import time
import zlib
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from annotate.config import AnnotateConfig
from annotate.inputs import InputFailure, iter_inputs
from annotate.pipeline import Backend, FigureError, annotate_batch
from zoomin_jax import records

# The failure reason of an input that repeats an id already seen: the only way one id may be
# accounted for more than once (annotate merge relies on it).
DUPLICATE_ID_REASON = "duplicate id; an earlier figure has it"


def shard_of(figure_id: str, num_shards: int) -> int:
    return zlib.crc32(figure_id.encode("utf-8")) % num_shards


def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """Flags first, then SLURM array variables, then torchrun's RANK/WORLD_SIZE, else one shard."""
    if num_shards is not None:
        return num_shards, shard_index or 0
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        offset = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - offset
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"])
    return 1, 0


class ShardFiles:
    def __init__(self, out: Path, index: int, count: int):
        self.stem = stem = f"{index:05d}-of-{count:05d}"
        self.out = out
        self.records = out / f"records-{stem}.array_record"
        self.failures = out / f"failures-{stem}.jsonl"
        self.summary = out / f"summary-{stem}.json"
        self.part_glob = f"records-{stem}.part-*.array_record"

    def part(self, number: int) -> Path:
        return self.out / self.part_glob.replace("*", f"{number:05d}")

    def parts(self) -> list[Path]:
        return sorted(self.out.glob(self.part_glob))

    def read_failures(self) -> list[dict]:
        """Failure lines so far; a line cut off by a crash is dropped (its figure is redone)."""
        if not self.failures.exists():
            return []
        kept = []
        for line in self.failures.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                kept.append(json.loads(line))
        self.failures.write_text("".join(json.dumps(f) + "\n" for f in kept))
        return kept


class _Progress:
    """The open part and the failures file of a running shard."""

    def __init__(self, files: ShardFiles, part_size: int):
        self.files, self.part_size = files, part_size
        self.failures = open(files.failures, "a")
        self.writer, self.next_part = None, len(files.parts())
        self.counts = collections.Counter()

    def record(self, record: dict) -> None:
        if self.writer is None:
            self.writer = records.RecordWriter(self.files.part(self.next_part))
            self.next_part += 1
        self.writer.write(record)
        self.counts["figures"] += 1
        self.counts["panels"] += len(record["panels"])
        self.counts["regions"] += len(record["regions"])
        if self.writer.count >= self.part_size:
            self.close_part()

    def fail(self, figure_id: str, source: str, stage: str, reason: str) -> None:
        self.failures.write(json.dumps({"id": figure_id, "source": source, "stage": stage, "reason": reason}) + "\n")
        self.failures.flush()
        self.counts["failures"] += 1

    def close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        self.close_part()
        self.failures.close()


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_shard(inputs: list[str], out: str | Path, backend: Backend, num_shards: int = 1, shard_index: int = 0,
              cfg: AnnotateConfig = AnnotateConfig(), batch_size: int = 8, part_size: int = 256) -> dict:
    """Annotate this shard's figures; returns the summary (also written to the summary file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ShardFiles(out, shard_index, num_shards)
    if files.records.exists() and files.summary.exists():
        for part in files.parts():  # left by a crash between the summary and the clean-up
            part.unlink()
        return json.loads(files.summary.read_text())
    for partial in out.glob(files.part_glob + ".partial"):
        partial.unlink()  # records of an interrupted part are redone
    done = {f["id"] for f in files.read_failures()}
    for part in files.parts():
        done.update(r["figure_id"] for r in records.iter_records(part))
    resumed = len(done)
    start = time.perf_counter()
    progress = _Progress(files, part_size)
    seen: set[str] = set(done)

    def mine():
        for item in iter_inputs(inputs):
            if shard_of(item.figure_id, num_shards) != shard_index or item.figure_id in done:
                continue
            if isinstance(item, InputFailure):
                progress.fail(item.figure_id, item.source, item.stage, item.reason)
                seen.add(item.figure_id)
            elif item.figure_id in seen:
                progress.fail(item.figure_id, item.source, "read", DUPLICATE_ID_REASON)
            else:
                seen.add(item.figure_id)
                yield item

    try:
        bar = tqdm(desc=f"annotate shard {shard_index}/{num_shards}", unit="figure")
        for batch in _batches(mine(), batch_size):
            for figure, result in zip(batch, annotate_batch(batch, backend, cfg), strict=True):
                if isinstance(result, FigureError):
                    progress.fail(figure.figure_id, figure.source, result.stage, result.reason)
                else:
                    progress.record(result)
            bar.update(len(batch))
        bar.close()
    finally:
        progress.close()
    return _finish(files, progress.counts, resumed, time.perf_counter() - start, backend)


def _finish(files: ShardFiles, counts: collections.Counter, resumed: int, seconds: float, backend: Backend) -> dict:
    totals = collections.Counter()
    with records.RecordWriter(files.records) as writer:
        for part in files.parts():
            for record in records.iter_records(part):
                writer.write(record)
                totals["figures"] += 1
                totals["panels"] += len(record["panels"])
                totals["regions"] += len(record["regions"])
    failures = files.read_failures()
    by_reason = collections.Counter(f"{f['stage']}: {f['reason'].split(':')[0].split(' (')[0]}" for f in failures)
    summary = {"records": files.records.name, "figures": totals["figures"], "panels": totals["panels"],
               "regions": totals["regions"], "failures": len(failures), "failures_by_reason": dict(by_reason),
               "resumed_with_done": resumed, "backend": backend.name,
               "figures_per_hour_this_run": round(counts["figures"] / max(seconds, 1e-9) * 3600, 1)}
    tmp = files.summary.with_name(files.summary.name + ".partial")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, files.summary)
    for part in files.parts():
        part.unlink()
    return summary

