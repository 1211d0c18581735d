"""`annotate run`: one shard of the inputs -> records, failures and a summary; resumable, atomic.

Figures go to shard crc32(id) % num_shards, so every process reads all inputs and keeps its own
(and duplicate ids meet in one shard). Records are written in parts that become visible only when
closed: when they hold part_size records, when part_seconds have passed since their first record,
and on SIGTERM. Next to each closed part a sidecar (…part-PPPPP.ids.json) lists its figure ids and
their panel and region counts, so a rerun and the final concatenation read no records to learn
what the parts hold. Failures are appended line by line. After a crash a rerun treats the ids in
closed parts and in the failures file as done, drops the unfinished part, and redoes the rest, so
each input id ends up exactly once across records and failures.

SIGTERM (SLURM's notice before it kills a preempted or timed-out task) stops the shard after the
current batch: its part is closed with its sidecar and the process exits with status 143 (128 +
SIGTERM, what SIGTERM's default action would give), leaving the shard for a rerun to finish.

When the shard is complete its parts' serialized records are copied, never decoded, into
DIR/records-SSSSS-of-NNNNN.array_record (one file per shard is what annotate merge, eval, show and
the tests read by name), keeping the first record of an id that two parts hold, and
DIR/summary-SSSSS-of-NNNNN.json is written.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
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
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM
_COPY_CHUNK = 64  # records per read when concatenating: bounded memory with images inside


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


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


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

    @staticmethod
    def sidecar(part: Path) -> Path:
        return part.with_name(part.name.removesuffix(".array_record") + ".ids.json")

    def remove_parts(self) -> None:
        for part in self.parts():
            self.sidecar(part).unlink(missing_ok=True)
            part.unlink()

    def read_failures(self, repair: bool = True) -> list[dict]:
        """Failure lines so far; a line cut off by a crash is dropped (its figure is redone) and, with
        `repair`, removed from the file before a running shard appends to it again."""
        if not self.failures.exists():
            return []
        kept = [json.loads(line) for line in self.failures.read_text().splitlines(keepends=True)
                if line.endswith("\n")]
        if repair:
            _replace_text(self.failures, "".join(json.dumps(f) + "\n" for f in kept))
        return kept


def _part_index(part: Path) -> tuple[dict, int]:
    """The part's sidecar {"ids", "panels", "regions"} (lists in record order) and how many
    records were decoded for it: none, unless the part has no sidecar (a crash between closing the
    part and writing it, or a part from before sidecars), which is then written."""
    sidecar = ShardFiles.sidecar(part)
    if sidecar.exists():
        return json.loads(sidecar.read_text()), 0
    index = {"ids": [], "panels": [], "regions": []}
    for record in records.iter_records(part):
        index["ids"].append(record["figure_id"])
        index["panels"].append(len(record["panels"]))
        index["regions"].append(len(record["regions"]))
    _replace_text(sidecar, json.dumps(index))
    return index, len(index["ids"])


class _Progress:
    """The open part and the failures file of a running shard."""

    def __init__(self, files: ShardFiles, part_size: int, part_seconds: float):
        self.files, self.part_size, self.part_seconds = files, part_size, part_seconds
        self.failures = open(files.failures, "a")
        self.writer, self.next_part = None, len(files.parts())
        self.index, self.opened = {}, 0.0
        self.counts = collections.Counter()

    def record(self, record: dict) -> None:
        if self.writer is None:
            self.writer = records.RecordWriter(self.files.part(self.next_part))
            self.next_part += 1
            self.index, self.opened = {"ids": [], "panels": [], "regions": []}, time.monotonic()
        self.writer.write(record)
        self.index["ids"].append(record["figure_id"])
        self.index["panels"].append(len(record["panels"]))
        self.index["regions"].append(len(record["regions"]))
        self.counts["figures"] += 1
        self.counts["panels"] += len(record["panels"])
        self.counts["regions"] += len(record["regions"])
        if self.writer.count >= self.part_size:
            self.close_part()

    def fail(self, figure_id: str, source: str, stage: str, reason: str) -> None:
        self.failures.write(json.dumps({"id": figure_id, "source": source, "stage": stage, "reason": reason}) + "\n")
        self.failures.flush()
        self.counts["failures"] += 1

    def close_part_if_due(self) -> None:
        if self.writer is not None and time.monotonic() - self.opened >= self.part_seconds:
            self.close_part()

    def close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            _replace_text(ShardFiles.sidecar(self.writer.path), json.dumps(self.index))
            self.writer = None

    def close(self) -> None:
        self.close_part()
        self.failures.close()


class _StopOnSigterm:
    """While entered, SIGTERM only sets `requested`; the batch loop stops at the next batch
    boundary. Only the main thread may install signal handlers, so elsewhere SIGTERM keeps its
    handler."""

    requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *_):
        if self.installed:
            # None: a handler set outside Python, which Python cannot reinstall; the default is closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)

    def exit_if_requested(self, files: ShardFiles, counts: collections.Counter) -> None:
        if self.requested:
            print(f"annotate: SIGTERM: shard {files.stem} stopped after {counts['figures']} figures and "
                  f"{counts['failures']} failures this run, its parts closed; rerun to finish it", file=sys.stderr)
            raise SystemExit(SIGTERM_EXIT_STATUS)


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
              cfg: AnnotateConfig = AnnotateConfig(), batch_size: int = 8, part_size: int = 256,
              part_seconds: float = 300.0) -> dict:
    """Annotate this shard's figures; returns the summary (also written to the summary file).
    On SIGTERM it raises SystemExit(143) once what was done is durable (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ShardFiles(out, shard_index, num_shards)
    if files.records.exists() and files.summary.exists():
        files.remove_parts()  # left by a crash between the summary and the clean-up
        return json.loads(files.summary.read_text())
    for partial in out.glob(f"records-{files.stem}.part-*.partial"):
        partial.unlink()  # records of an interrupted part are redone; a sidecar is rebuilt from its part
    done = {f["id"] for f in files.read_failures()}
    resume = collections.Counter()
    for part in files.parts():
        index, decoded = _part_index(part)
        done.update(index["ids"])
        resume["parts_from_sidecars"] += decoded == 0
        resume["records_decoded"] += decoded
    resumed = len(done)
    start = time.perf_counter()
    with _StopOnSigterm() as stop:
        progress = _Progress(files, part_size, part_seconds)
        seen: set[str] = set(done)

        def mine():
            for item in iter_inputs(inputs):
                if stop.requested:
                    return
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
            with tqdm(desc=f"annotate shard {shard_index}/{num_shards}", unit="figure") as bar:
                for batch in _batches(mine(), batch_size):
                    if stop.requested:
                        break
                    for figure, result in zip(batch, annotate_batch(batch, backend, cfg), strict=True):
                        if isinstance(result, FigureError):
                            progress.fail(figure.figure_id, figure.source, result.stage, result.reason)
                        else:
                            progress.record(result)
                    progress.close_part_if_due()
                    bar.update(len(batch))
        finally:
            progress.close()
        stop.exit_if_requested(files, progress.counts)
        return _finish(files, progress.counts, resumed, resume, time.perf_counter() - start, backend, stop)


def _finish(files: ShardFiles, counts: collections.Counter, resumed: int, resume: collections.Counter,
            seconds: float, backend: Backend, stop: _StopOnSigterm) -> dict:
    from array_record.python.array_record_module import ArrayRecordReader
    totals, recorded = collections.Counter(), set()
    with records.RecordWriter(files.records) as writer:
        for part in files.parts():
            stop.exit_if_requested(files, counts)  # the unfinished .partial is removed on the way out
            index, _ = _part_index(part)
            keep = []
            for n, figure_id in enumerate(index["ids"]):
                if figure_id not in recorded:  # a part that repeats an id: the first record is kept
                    recorded.add(figure_id)
                    keep.append(n)
                    totals["panels"] += index["panels"][n]
                    totals["regions"] += index["regions"][n]
            reader = ArrayRecordReader(str(part))
            try:
                if reader.num_records() != len(index["ids"]):
                    raise RuntimeError(f"{ShardFiles.sidecar(part)} lists {len(index['ids'])} ids but {part} holds "
                                       f"{reader.num_records()} records; delete the sidecar and rerun to rebuild it")
                for start in range(0, len(keep), _COPY_CHUNK):
                    for data in reader.read(keep[start:start + _COPY_CHUNK]):
                        writer.write_encoded(data)
            finally:
                reader.close()
    # A record wins over a failure line for its id, and one failure line per id is kept, save the
    # duplicate-id lines that stand for repeated inputs: each id is accounted for once.
    failures, failed = [], set()
    for failure in files.read_failures(repair=False):  # rewritten once, deduplicated, below
        if failure["reason"] == DUPLICATE_ID_REASON or (failure["id"] not in recorded and failure["id"] not in failed):
            failures.append(failure)
            failed.add(failure["id"])
    _replace_text(files.failures, "".join(json.dumps(f) + "\n" for f in failures))
    by_reason = collections.Counter(f"{f['stage']}: {f['reason'].split(':')[0].split(' (')[0]}" for f in failures)
    summary = {"records": files.records.name, "figures": len(recorded), "panels": totals["panels"],
               "regions": totals["regions"], "failures": len(failures), "failures_by_reason": dict(by_reason),
               "resumed_with_done": resumed, "resume_parts_from_sidecars": resume["parts_from_sidecars"],
               "resume_records_decoded": resume["records_decoded"], "backend": backend.name,
               "figures_this_run": counts["figures"],
               "figures_per_hour_this_run": round(counts["figures"] / max(seconds, 1e-9) * 3600, 1)}
    _replace_text(files.summary, json.dumps(summary, indent=2) + "\n")
    files.remove_parts()
    return summary
