"""`annotate run`: one shard of the inputs -> records, failures and a summary; resumable, atomic.

Sharding (--shard-by, default auto: by file when there are at least as many input files as shards,
else by figure). By file: the expanded input files, sorted, are dealt round robin, file n to shard
n % num_shards, so each task opens only its own files and gets as many as any other, give or take
one (crc32 of the path would leave some tasks twice the files of others at a few files per task,
and an array runs as long as its slowest task); the rule depends only on the inputs, so every task
and any resubmission agree when given the same --input. An id held by files of two shards is then
annotated in both, and annotate merge keeps one. By figure (few large inputs, e.g. one manifest):
figure id -> shard crc32(id) % num_shards; every task reads every input and keeps its own, so
duplicate ids meet in one shard; a failure of a whole file (inputs.FILE_STAGE) is recorded by every
shard, since each of them lost that file's figures.

A lock (OUT/lock-SSSSS-of-NNNNN, flock) keeps a second process off a running shard: a requeued task
whose old copy still runs exits 1 instead of interleaving parts with it. The kernel drops the lock
with the process, kill -9 included, so a rerun is never blocked by a dead one.

Records are written in parts (OUT/parts-SSSSS-of-NNNNN/PPPPP.array_record, a folder of its own so
that nothing reading OUT's *.array_record sees a running shard) that become visible only when
closed: when they hold part_size records, when part_seconds have passed since their first record,
and on SIGTERM. Each closed part has its shard index next to it (PPPPP.index.msgpack,
records.RecordWriter writes it: figure ids, panel kinds and sides, region panels and sides,
warnings), so a rerun and the packing at the end read no records to learn what the parts hold.
Failures are appended line by line.
Before a record is encoded its text is cleaned (annotate.text: the inputs' when read, the backend's
answers here, each change a warning of the record); a record that still cannot be encoded is a
failure of stage "write", so no figure's text or values stop the shard.
After a crash a rerun treats the ids in closed parts, in the shard's records files and in the
failures file as done, drops the unfinished part, and redoes the rest, so each input id ends up
exactly once across records and failures.

Batches are annotated `batches_in_flight` at a time, in host threads, through one engine thread
(engine_worker.py): their results are written in input order.

SIGTERM (SLURM's notice before it kills a preempted or timed-out task) stops the shard at the
backend's next generate call (faults.STOP), or between batches: the batches in flight are abandoned
without a failure line, the open part is closed with its index and the process exits with status
143 (128 + SIGTERM, what SIGTERM's default action would give), leaving the shard for a rerun.

A fault of the engine or its device (faults.EngineFault: a CUDA error, a dead vLLM engine, an aborted
generation) stops the shard the same way with status 4 (ENGINE_FAULT_EXIT_STATUS) and one line
naming the error: no figure of the batches in flight is written down as failed, and the rerun
redoes them.

When more than max_failure_rate of the last failure_window figures failed (a wrong model, bad
inputs: failing through a whole shard would cost its hours for nothing), the shard stops after the
batch with status 3 (FAILURE_RATE_EXIT_STATUS), its parts kept and this run's failure lines
dropped, so a rerun after the fix retries those figures. A window, not the run's total: a cause that
starts after 30k good figures is seen within failure_window figures.

Each failure line says whether it is final (a property of the figure) or transient (an I/O error
reading it): a rerun skips the final ones and tries the transient ones again, the last line of an
id standing.

When the shard is complete its parts become its records files, DIR/records-SSSSS-of-NNNNN.FFFFF
.array_record, each with its index (records-….index.msgpack: what training builds its level indexes
from and annotate merge counts from): runs of consecutive parts are packed into files of at most
file_records records, their serialized records copied, never decoded, and each part is deleted as
soon as the file holding its records is closed; a part that fills a file alone is renamed. So the
disk never holds more than the shard plus one file (one copy of the whole shard is what a single
file per shard cost), and a crash while packing loses nothing: a record already in a records file
wins over its part, which the rerun deletes. An id two parts hold keeps its first record. Then
DIR/summary-SSSSS-of-NNNNN.json is written, last: totals, failures and warnings by reason, the
records files, and the input files this shard read (inputs_read), which shows what each task opened.
A shard is finished when its summary exists.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from annotate.config import AnnotateConfig
from annotate.inputs import FILE_STAGE, Figure, InputFailure, expand_inputs, iter_inputs
from annotate.decode import decoded_batches
from annotate.faults import STOP, EngineFault, StopRequested
from annotate.pipeline import Backend, FigureError, annotate_batch
from annotate.text import clean_strings
from zoomin_jax import records

# The failure reason of an input that repeats an id already seen: the only way one id may be
# accounted for more than once (annotate merge relies on it).
DUPLICATE_ID_REASON = "duplicate id; an earlier figure has it"
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM
FAILURE_RATE_EXIT_STATUS = 3
ENGINE_FAULT_EXIT_STATUS = 4
SHARD_BY = ("auto", "file", "figure")
_COPY_CHUNK = 64  # records per read when concatenating: bounded memory with images inside
# What varies from figure to figure in a message: quoted names and phrases, boxes, JSON, parentheses.
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\{[^}]*\}|\([^)]*\)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def shard_of(figure_id: str, num_shards: int) -> int:
    return zlib.crc32(figure_id.encode("utf-8")) % num_shards


def resolve_shard_by(shard_by: str, files: Sequence[str], num_shards: int) -> str:
    """"file" or "figure" for --shard-by, from the expanded input files (see the module docstring)."""
    if shard_by not in SHARD_BY:
        raise ValueError(f"--shard-by {shard_by!r} is not one of {', '.join(SHARD_BY)}")
    if shard_by == "auto":
        return "file" if len(files) >= num_shards else "figure"
    return shard_by


def file_shards(files: Sequence[str], num_shards: int) -> dict[str, int]:
    """Input file -> its shard when sharding by file: round robin over the sorted files."""
    return {path: n % num_shards for n, path in enumerate(sorted(files))}


def reason_of(message: str, fields: int = 1) -> str:
    """A failure reason or warning as a count key: its first `fields` ':'-separated parts (a failure's
    first part says what failed, an exception's own text follows), with what varies from figure to
    figure written as * (quoted, bracketed, parenthesised) and N (numbers)."""
    plain = _NUMBER.sub("N", _VARYING.sub("*", message))
    return " ".join(":".join(plain.split(":")[:fields]).split())


def failure_key(stage: str, reason: str) -> str:
    return f"{stage}: {reason_of(reason)}"


def warning_key(warning: str) -> str:
    # A warning reads "where: what" (figure@1.0: box ... clipped), so both parts are kept.
    return reason_of(warning, fields=2)


def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """Flags first, then SLURM array variables, then torchrun's RANK/WORLD_SIZE, else one shard.
    --num-shards alone takes the index from SLURM_ARRAY_TASK_ID or RANK as it is: with the count
    given, the array index is the shard index (as with the sbatch script's ANNOTATE_NUM_SHARDS), so
    --array=5,17 reruns shards 5 and 17. ValueError when the index cannot be known."""
    env = os.environ
    if num_shards is None:
        if shard_index is not None:
            raise ValueError(f"--shard-index {shard_index} needs --num-shards: give the shard count as well")
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            offset = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - offset
        if "WORLD_SIZE" in env and "RANK" in env:
            return int(env["WORLD_SIZE"]), int(env["RANK"])
        return 1, 0
    if shard_index is None:
        index = env.get("SLURM_ARRAY_TASK_ID", env.get("RANK"))
        if index is None:
            raise ValueError(f"--num-shards {num_shards} without --shard-index, and neither SLURM_ARRAY_TASK_ID "
                             f"nor RANK is set: give --shard-index I (0..{num_shards - 1})")
        shard_index = int(index)
    return num_shards, shard_index


def _stop(message: str, status: int):
    print(f"annotate: {message}", file=sys.stderr)
    raise SystemExit(status)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardFiles:
    def __init__(self, out: Path, index: int, count: int):
        self.stem = stem = f"{index:05d}-of-{count:05d}"
        self.out = out
        self.failures = out / f"failures-{stem}.jsonl"
        self.summary = out / f"summary-{stem}.json"
        self.lock = out / f"lock-{stem}"
        self.parts_dir = out / f"parts-{stem}"

    def part(self, number: int) -> Path:
        return self.parts_dir / f"{number:05d}.array_record"

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("*.array_record"))

    def records_file(self, number: int) -> Path:
        return self.out / f"records-{self.stem}.{number:05d}.array_record"

    def records_files(self) -> list[Path]:
        """The shard's records files, in order (all of them once the shard is finished)."""
        return sorted(self.out.glob(f"records-{self.stem}.[0-9]*.array_record"))

    def remove_partials(self) -> None:
        """What a crash left half written: a part, a records file, an index (rebuilt from its file)."""
        for partial in [*self.parts_dir.glob("*.partial"), *self.out.glob(f"records-{self.stem}.*.partial")]:
            partial.unlink()

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


def _next_number(paths: list[Path]) -> int:
    """The number after the highest of the files numbered PPPPP or ….PPPPP.array_record."""
    return max((int(path.name.removesuffix(".array_record").rsplit(".", 1)[-1]) for path in paths), default=-1) + 1


def _part_index(part: Path) -> tuple[dict, int]:
    """The index (records.INDEX_COLUMNS) of a part or records file and how many records were decoded
    for it: none, unless it has no usable index (a crash between closing the file and writing its
    index, a file from before indexes), which is then written."""
    try:
        return records.load_index(part), 0
    except records.RecordError:
        index = records.index_of(records.iter_records(part))
        records.write_index(part, index)
        return index, len(index["ids"])


class _Progress:
    """The open part and the failures file of a running shard."""

    def __init__(self, files: ShardFiles, part_size: int, part_seconds: float, failure_window: int):
        self.files, self.part_size, self.part_seconds = files, part_size, part_seconds
        self.failures = open(files.failures, "a")
        self.failures_before = self.failures.tell()  # the lines of earlier runs end here
        self.writer, self.next_part, self.opened = None, _next_number(files.parts()), 0.0
        self.counts, self.reasons = collections.Counter(), collections.Counter()
        self.recent = collections.deque(maxlen=failure_window)  # True: the figure failed

    def record(self, figure: Figure, record: dict) -> None:
        """Writes the figure's record, or its failure (stage "write") when the record cannot be encoded."""
        try:  # all before a part is opened for it
            # The last step before encoding cleans the backend's answers (labels, descriptions, warnings);
            # the inputs' text was cleaned as it was read, and the notes of both join the record's warnings.
            record, notes = clean_strings(record)
            record["annotation"]["warnings"] = [*record["annotation"]["warnings"], *figure.notes, *notes]
            data, entry = records.encode(record), records.index_entry(record)
        except Exception as err:  # a value msgpack cannot take, a record the schema refuses
            self.fail(figure.figure_id, figure.source, "write", f"encoding raised {type(err).__name__}: {err}")
            return
        if self.writer is None:
            self.writer = records.RecordWriter(self.files.part(self.next_part))
            self.next_part += 1
            self.opened = time.monotonic()
        self.writer.write_encoded(data, entry)
        self.counts["figures"] += 1
        self.recent.append(False)
        self.counts["panels"] += len(record["panels"])
        self.counts["regions"] += len(record["regions"])
        if self.writer.count >= self.part_size:
            self.close_part()

    def fail(self, figure_id: str, source: str, stage: str, reason: str, final: bool = True) -> None:
        # Ids and sources are clean (inputs.py); an exception's text may quote anything.
        line, _ = clean_strings({"id": figure_id, "source": source, "stage": stage, "reason": reason,
                                 "final": final})
        self.failures.write(json.dumps(line) + "\n")
        self.failures.flush()
        self.counts["failures"] += 1
        self.recent.append(True)
        self.reasons[failure_key(stage, reason)] += 1

    def failing(self, max_rate: float) -> bool:
        """More than max_rate of the last failure_window figures failed."""
        return len(self.recent) == self.recent.maxlen and sum(self.recent) > max_rate * len(self.recent)

    def exit_failing(self, max_rate: float) -> None:
        """Once closed: stops the shard past max_rate (see the module docstring), dropping this run's failures."""
        os.truncate(self.files.failures, self.failures_before)
        top = "; ".join(f"{reason} ({count})" for reason, count in self.reasons.most_common(3))
        _stop(f"shard {self.files.stem} stopped: {sum(self.recent)} of the last {len(self.recent)} figures failed "
              f"(more than --max-failure-rate {max_rate:g}); top reasons this run: {top}. Its records are kept "
              f"and this run's failures are not: fix the cause and rerun to retry them", FAILURE_RATE_EXIT_STATUS)

    def close_part_if_due(self) -> None:
        if self.writer is not None and time.monotonic() - self.opened >= self.part_seconds:
            self.close_part()

    def close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
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
        STOP.set()  # the backend stops at its next generate call

    def __enter__(self):
        STOP.clear()
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *_):
        STOP.clear()  # also set when the shard stopped early with batches in flight (_in_flight)
        if self.installed:
            # None: a handler set outside Python, which Python cannot reinstall; the default is closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)

    def exit_if_requested(self, files: ShardFiles, counts: collections.Counter) -> None:
        if self.requested:
            _stop(f"SIGTERM: shard {files.stem} stopped after {counts['figures']} figures and {counts['failures']} "
                  f"failures this run, its parts closed; rerun to finish it", SIGTERM_EXIT_STATUS)


@contextlib.contextmanager
def _shard_lock(files: ShardFiles):
    """Held while the shard runs (see the module docstring); the lock file stays, only its lock goes."""
    with open(files.lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _stop(f"shard {files.stem} is being run by another process, which holds {files.lock}; let it finish "
                  f"or stop it, then rerun", 1)
        yield


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _in_flight(batches: Iterable, annotate, depth: int):
    """(batch, results) of each batch, in order, with `depth` batches annotated at once in host threads
    (annotate(batch, decoded) -> results): while one batch's answers are read and its records built,
    the next one's requests keep the engine busy (engine_worker.py). Raises what a batch raised. When
    it stops early, the batches still in flight stop at their next generate call (faults.STOP)."""
    pool = ThreadPoolExecutor(depth, thread_name_prefix="batch")
    pending: collections.deque = collections.deque()
    try:
        for batch, decoded in batches:
            pending.append((batch, pool.submit(annotate, batch, decoded)))
            if len(pending) >= depth:
                batch, future = pending.popleft()
                yield batch, future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, future.result()
    finally:
        if pending:
            STOP.set()
        pool.shutdown(wait=True, cancel_futures=True)


def run_shard(inputs: Sequence[str], out: str | Path, backend: Backend, num_shards: int = 1, shard_index: int = 0,
              cfg: AnnotateConfig = AnnotateConfig(), batch_size: int = 8, part_size: int = 256,
              part_seconds: float = 300.0, file_records: int = 2048, shard_by: str = "auto",
              max_failure_rate: float = 0.5, failure_window: int = 100, decode_workers: int = 0,
              batches_in_flight: int = 1) -> dict:
    """Annotate this shard's figures; returns the summary (also written to the summary file). `inputs`
    as inputs.expand_inputs takes them; figures are decoded in `decode_workers` processes ahead of the
    backend (0: in this process) and `batches_in_flight` batches are annotated at once (_in_flight).
    Raises SystemExit(143) on SIGTERM once what was done is
    durable, SystemExit(4) on an engine fault, SystemExit(3) past max_failure_rate, SystemExit(1)
    while another process runs the shard."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ShardFiles(out, shard_index, num_shards)
    paths = expand_inputs(inputs)
    shard_by = resolve_shard_by(shard_by, paths, num_shards)
    if shard_by == "file":
        owner = file_shards(paths, num_shards)
        paths = [path for path in paths if owner[path] == shard_index]
    with _shard_lock(files):
        if files.summary.exists():
            return json.loads(files.summary.read_text())
        files.remove_partials()
        done = {f["id"] for f in files.read_failures() if f.get("final", True)}
        resume = collections.Counter()
        for path in [*files.records_files(), *files.parts()]:  # records files: left by a crash while packing
            index, decoded = _part_index(path)
            done.update(index["ids"])
            resume["parts_from_indexes"] += decoded == 0
            resume["records_decoded"] += decoded
        resumed = len(done)
        inputs_read: list[str] = []
        lvlm_before = collections.Counter(getattr(backend, "counts", {}))
        busy_before = getattr(backend, "busy_seconds", 0.0)
        start = time.perf_counter()
        with _StopOnSigterm() as stop:
            progress = _Progress(files, part_size, part_seconds, failure_window)
            seen: set[str] = set(done)

            def mine():
                for path in paths:
                    inputs_read.append(path)
                    for item in iter_inputs([path]):
                        if stop.requested:
                            return
                        whole_file = isinstance(item, InputFailure) and item.stage == FILE_STAGE
                        if item.figure_id in done or (shard_by == "figure" and not whole_file
                                                      and shard_of(item.figure_id, num_shards) != shard_index):
                            continue
                        if isinstance(item, InputFailure):
                            progress.fail(item.figure_id, item.source, item.stage, item.reason)
                            seen.add(item.figure_id)
                        elif item.figure_id in seen:
                            progress.fail(item.figure_id, item.source, "read", DUPLICATE_ID_REASON)
                        else:
                            seen.add(item.figure_id)
                            yield item

            failing, fault = False, None
            batches = decoded_batches(_batches(mine(), batch_size), cfg, decode_workers)
            annotated = _in_flight(batches, lambda batch, decoded: annotate_batch(batch, backend, cfg, decoded),
                                   batches_in_flight)
            try:
                with tqdm(desc=f"annotate shard {shard_index}/{num_shards}", unit="figure") as bar:
                    for batch, results in annotated:
                        for figure, result in zip(batch, results, strict=True):
                            if isinstance(result, FigureError):
                                progress.fail(figure.figure_id, figure.source, result.stage, result.reason,
                                              result.final)
                            else:
                                progress.record(figure, result)
                        progress.close_part_if_due()
                        bar.update(len(batch))
                        if stop.requested or (failing := progress.failing(max_failure_rate)):
                            break
            except StopRequested:  # the batches in flight are abandoned, without a failure line, on either
                pass
            except EngineFault as err:
                fault = err
            finally:
                annotated.close()
                progress.close()
            # After the bar's last line, so the reason is the log's last line.
            if failing:
                progress.exit_failing(max_failure_rate)
            # First: on SIGTERM vLLM aborts its requests in flight, and the fault that follows is the stop's.
            stop.exit_if_requested(files, progress.counts)
            if fault is not None:
                _stop(f"engine fault, shard {files.stem} stopped after {progress.counts['figures']} figures this run "
                      f"with its parts closed and no failure line for the batches in flight: {fault}. Fix the node "
                      f"or the engine and rerun to redo them", ENGINE_FAULT_EXIT_STATUS)
            seconds = time.perf_counter() - start
            about = {"shard_by": shard_by, "inputs_read": inputs_read, "resumed_with_done": resumed,
                     "resume_parts_from_indexes": resume["parts_from_indexes"],
                     "resume_records_decoded": resume["records_decoded"], "backend": backend.name,
                     "figures_this_run": progress.counts["figures"],
                     "figures_per_hour_this_run": round(progress.counts["figures"] / max(seconds, 1e-9) * 3600, 1)}
            if hasattr(backend, "counts"):  # an LVLM's requests and blocking generate calls this run
                lvlm = collections.Counter(backend.counts) - lvlm_before
                about |= {"lvlm_requests": lvlm["requests"], "lvlm_generate_calls": lvlm["generate_calls"],
                          "lvlm_requests_per_figure": round(lvlm["requests"] / max(progress.counts["figures"], 1), 2),
                          "lvlm_engine_busy_share": round((getattr(backend, "busy_seconds", 0.0) - busy_before)
                                                                / max(seconds, 1e-9), 3)}
            return _finish(files, about, stop, progress.counts, file_records)


def _remove_part(part: Path) -> None:
    part.unlink()
    Path(records.index_path(part)).unlink(missing_ok=True)


def _pack(files: ShardFiles, file_records: int, stop: _StopOnSigterm, counts: collections.Counter) -> dict:
    """Turns the shard's parts into its records files (see the module docstring); returns the index
    of all its records."""
    from array_record.python.array_record_module import ArrayRecordReader
    kept = records.new_index()
    for path in files.records_files():
        records.add_index(kept, _part_index(path)[0])
    recorded = set(kept["ids"])
    groups, size = [], file_records  # runs of consecutive parts of at most file_records new records
    for part in files.parts():
        index, _ = _part_index(part)
        new = [n for n, figure_id in enumerate(index["ids"]) if figure_id not in recorded]
        recorded.update(index["ids"][n] for n in new)
        if not new:  # its records went into a records file before a crash
            _remove_part(part)
            continue
        if size + len(new) > file_records:
            groups.append([])
            size = 0
        groups[-1].append((part, index, new))
        size += len(new)
    number = _next_number(files.records_files())
    for group in groups:
        stop.exit_if_requested(files, counts)  # an unfinished .partial is removed by the rerun
        target = files.records_file(number)
        if len(group) == 1 and len(group[0][2]) == len(group[0][1]["ids"]):
            # The index first: a crash between the two renames leaves the part whole (its index is
            # rebuilt) and an index without a records file, which the next file of its number replaces.
            os.replace(records.index_path(group[0][0]), records.index_path(target))
            os.replace(group[0][0], target)
        else:
            with records.RecordWriter(target) as writer:
                for part, index, new in group:
                    reader = ArrayRecordReader(str(part))
                    try:
                        for start in range(0, len(new), _COPY_CHUNK):
                            chunk = new[start:start + _COPY_CHUNK]
                            for n, data in zip(chunk, reader.read(chunk), strict=True):
                                writer.write_encoded(data, records.entry_at(index, n))
                    finally:
                        reader.close()
            for part, _, _ in group:
                _remove_part(part)
        for _, index, new in group:
            for n in new:
                records.add_entry(kept, records.entry_at(index, n))
        number += 1
    shutil.rmtree(files.parts_dir, ignore_errors=True)  # empty, or an index whose part was renamed
    return kept


def _finish(files: ShardFiles, about: dict, stop: _StopOnSigterm, counts: collections.Counter,
            file_records: int) -> dict:
    """Packs the parts into the shard's records files and writes its summary (`about` and the
    totals)."""
    kept = _pack(files, file_records, stop, counts)
    recorded = set(kept["ids"])
    warnings = collections.Counter(warning_key(w) for figure in kept["warnings"] for w in figure)
    # A record wins over a failure line for its id, and one failure line per id is kept, its last (a
    # transient failure tried again), save the duplicate-id lines that stand for repeated inputs: each
    # id is accounted for once.
    lines = files.read_failures(repair=False)  # rewritten once, deduplicated, below
    last = {failure["id"]: n for n, failure in enumerate(lines) if failure["reason"] != DUPLICATE_ID_REASON}
    failures = [failure for n, failure in enumerate(lines) if failure["reason"] == DUPLICATE_ID_REASON
                or (failure["id"] not in recorded and last[failure["id"]] == n)]
    _replace_text(files.failures, "".join(json.dumps(f) + "\n" for f in failures))
    by_reason = collections.Counter(failure_key(f["stage"], f["reason"]) for f in failures)
    summary = {"records": [path.name for path in files.records_files()], "figures": len(recorded),
               "panels": sum(map(len, kept["panel_kinds"])), "regions": sum(map(len, kept["region_panels"])),
               "failures": len(failures), "failures_transient": sum(not f.get("final", True) for f in failures),
               "failures_by_reason": dict(by_reason), "warnings_by_reason": dict(warnings), **about}
    _replace_text(files.summary, json.dumps(summary, indent=2) + "\n")
    return summary
