"""`annotate merge`: after all shards of `annotate run` are done, check that every input id was
accounted for exactly once and add up the shards' records and failures.

A shard is finished when its summary exists (what `annotate run` writes last); any other shard of the count is missing, whatever it left behind. Each id must be one record or
one failure line across all shards; an id may repeat only as the run's duplicate-id failure for
an input that repeats it, or, when the run sharded by file, in shards whose files both hold it:
then one is kept (a record before a failure, then the lowest shard) and the others are listed as
resolved duplicates, left out of the totals. A failure of a whole input file (inputs.FILE_STAGE,
its path as id) is one failed file however many shards recorded it (all of them, sharding by
figure). Given the inputs, ids they hold but no finished shard has, and ids the shards have but
the inputs do not, are listed as well (not the ids of missing shards: rerunning those shards is the
fix).

A shard's ids, panel and region counts and warnings come from the indexes of its records files
(records-….index.msgpack), so merge reads no record; a file without a usable index (from before
indexes, or stale) is decoded instead and named in the report's decoded_shards with why and how to
write its index.
"""
from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from annotate.inputs import FILE_STAGE, InputFailure, expand_inputs, iter_inputs
from annotate.run import DUPLICATE_ID_REASON, ShardFiles, failure_key, file_shards, shard_of, warning_key
from zoomin_jax import records

_SHARD_STEM = re.compile(r"-(\d{5,})-of-(\d{5,})\.")
_NAMED_IDS = 5  # ids an error line names; the report lists them all


def shard_indices_by_count(out: Path) -> dict[int, set[int]]:
    """Shard count -> indices of the shards that left a records, index, failures or summary file in
    OUT (names as ShardFiles writes them; the parts folders of unfinished shards do not count)."""
    found: dict[int, set[int]] = collections.defaultdict(set)
    for path in out.iterdir():
        if path.is_file() and (match := _SHARD_STEM.search(path.name)):
            found[int(match[2])].add(int(match[1]))
    return found


def _named(ids: Sequence[str]) -> str:
    more = len(ids) - _NAMED_IDS
    return ", ".join(ids[:_NAMED_IDS]) + (f" and {more} more" if more > 0 else "")


def _shard_index(files: ShardFiles, decoded: list[str]) -> dict:
    """The finished shard's index columns over its records files, from their index files, else by
    decoding a file's records (why appended to `decoded`, and said on stderr)."""
    index = records.new_index()
    for path in files.records_files():
        try:
            held = records.load_index(path)
        except records.RecordError as err:
            print(f"merge: {err}; decoding its records instead", file=sys.stderr, flush=True)
            decoded.append(str(err))
            held = records.index_of(records.iter_records(path))
        records.add_index(index, held)
    return index


def merge(out: str | Path, inputs: Sequence[str] | None = None) -> dict:
    """The merged report of the shards in OUT; its "problems" are empty when they are complete."""
    out = Path(out)
    by_count = shard_indices_by_count(out)
    if not by_count:
        raise ValueError(f"{out} holds no shard files (summary-SSSSS-of-NNNNN.json and the like); "
                         f"run `annotate run --out {out}` first")
    num_shards = max(by_count, key=lambda count: (len(by_count[count]), count))
    problems = []
    if len(by_count) > 1:
        seen = ", ".join(f"{len(by_count[count])} with -of-{count:05d}" for count in sorted(by_count))
        problems.append(f"shard files in {out} disagree on the shard count ({seen}); only the {num_shards:05d} "
                        f"ones were merged: move the other run's files out of {out}")

    # id -> shard -> {"record": (panels, regions, warnings)} or {"failure": its line}
    entries: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    repeated_in_shard, repeat_lines, failed_files = set(), [], {}
    per_shard, shard_by, missing, unreadable, decoded = [], {}, [], {}, []
    for index in range(num_shards):
        files = ShardFiles(out, index, num_shards)
        if not files.summary.exists():
            missing.append(index)
            continue
        try:
            summary = json.loads(files.summary.read_text())
            failures = files.read_failures(repair=False)  # a finished shard: read, never rewritten
            held = _shard_index(files, decoded)
            found = [(figure_id, {"record": (len(kinds), len(regions), warnings)}) for figure_id, kinds, regions, warnings
                     in zip(held["ids"], held["panel_kinds"], held["region_panels"], held["warnings"], strict=True)]
        except (ValueError, RuntimeError) as err:  # bad JSON, a bad record, a corrupt ArrayRecord file
            unreadable[index] = f"{files.stem} ({err})"
            continue
        for failure in failures:
            if failure["stage"] == FILE_STAGE:
                failed_files.setdefault(failure["id"], failure)
            elif failure["reason"] == DUPLICATE_ID_REASON:
                repeat_lines.append(failure)
            else:
                found.append((failure["id"], {"failure": failure}))
        for figure_id, entry in found:
            if index in entries[figure_id]:
                repeated_in_shard.add(figure_id)
            entries[figure_id][index] = entry
        shard_by[index] = summary.get("shard_by", "figure")  # summaries from before file sharding lack it
        per_shard.append({"shard": files.stem, "figures": summary["figures"], "failures": summary["failures"],
                          "figures_per_hour": summary["figures_per_hour_this_run"]})
    if missing:
        names = ", ".join(f"{ShardFiles(out, i, num_shards).stem} (rerun array task {i})" for i in missing)
        problems.append(f"missing shards: {names}; rerun them with the same inputs (ANNOTATE_NUM_SHARDS={num_shards} "
                        f"sbatch --array={','.join(map(str, missing))} launch/slurm_annotate.sbatch, or annotate run "
                        f"--num-shards {num_shards} --shard-index I), which resumes what they left")
    if unreadable:
        problems.append(f"unreadable shards: {'; '.join(unreadable.values())}; delete their records, summary "
                        f"and failures files in {out} and rerun them")
    modes = sorted(set(shard_by.values()))
    if len(modes) > 1:
        problems.append(f"the shards in {out} were sharded differently ({' and '.join(modes)}: see shard_by in their "
                        f"summaries), so they do not partition the inputs: rerun them all with one --shard-by")
    by_file = modes == ["file"]

    totals, by_reason, warnings, resolved, repeated = _count_once(entries, by_file, out, num_shards)
    for failure in repeat_lines + list(failed_files.values()):
        by_reason[failure_key(failure["stage"], failure["reason"])] += 1
    duplicates = sorted(repeated_in_shard | repeated)
    if duplicates:
        problems.append(f"ids accounted for more than once in the shards ({len(duplicates)}): {_named(duplicates)}; "
                        f"were files of another run copied into {out}?")

    report = {"out": str(out), "num_shards": num_shards, "shard_by": modes,
              "figures": totals["figures"], "panels": totals["panels"], "regions": totals["regions"],
              "failures": sum(by_reason.values()), "failures_by_reason": dict(sorted(by_reason.items())),
              "warnings_by_reason": dict(sorted(warnings.items())), "failed_files": sorted(failed_files),
              "shards": per_shard, "missing_shards": [ShardFiles(out, i, num_shards).stem for i in missing],
              "unreadable_shards": list(unreadable.values()), "decoded_shards": decoded, "duplicate_ids": duplicates,
              "duplicates_resolved": resolved, "inputs": list(inputs) if inputs else None}
    if inputs:
        owners = _owners(expand_inputs(inputs), num_shards, by_file)
        merged = entries.keys() | failed_files.keys()
        unseen = owners.keys() - merged
        not_merged = set(missing) | unreadable.keys()
        awaited = {i for i in unseen if owners[i] & not_merged}
        in_no_shard, not_in_inputs = sorted(unseen - awaited), sorted(merged - owners.keys())
        if in_no_shard:
            problems.append(f"input ids in none of the finished shards ({len(in_no_shard)}): {_named(in_no_shard)}; "
                            f"were inputs added after annotate run? annotate them in a new run")
        if not_in_inputs:
            problems.append(f"ids in the shards but in none of the inputs ({len(not_in_inputs)}): "
                            f"{_named(not_in_inputs)}; give merge the same --input that annotate run got")
        report |= {"ids_in_shards_not_merged": len(awaited), "ids_in_no_shard": in_no_shard,
                   "ids_not_in_inputs": not_in_inputs}
    return report | {"complete": not problems, "problems": problems}


def _count_once(entries: dict[str, dict[int, dict]], by_file: bool, out: Path, num_shards: int):
    """Totals, failures and warnings by reason over one entry per id: a record before a failure, then
    the lowest shard. An id in several shards is a resolved duplicate when sharding by file, else
    (an id belongs to one shard) a repeated one."""
    totals, by_reason, warnings, resolved, repeated = (collections.Counter(), collections.Counter(),
                                                       collections.Counter(), [], set())
    for figure_id in sorted(entries):
        shards = entries[figure_id]
        kept = min(shards, key=lambda i: ("record" not in shards[i], i))
        if len(shards) > 1 and by_file:
            resolved.append({"id": figure_id, "kept": ShardFiles(out, kept, num_shards).stem,
                             "also_in": [ShardFiles(out, i, num_shards).stem for i in sorted(shards) if i != kept]})
        elif len(shards) > 1:
            repeated.add(figure_id)
        if "record" in shards[kept]:
            panels, regions, figure_warnings = shards[kept]["record"]
            totals.update(figures=1, panels=panels, regions=regions)
            warnings.update(map(warning_key, figure_warnings))
        else:
            by_reason[failure_key(shards[kept]["failure"]["stage"], shards[kept]["failure"]["reason"])] += 1
    return totals, by_reason, warnings, resolved, repeated


def _owners(paths: list[str], num_shards: int, by_file: bool) -> dict[str, set[int]]:
    """Each input id (a failed file's path for a whole-file failure) -> the shards that should hold it."""
    shard_of_file = file_shards(paths, num_shards)
    owners: dict[str, set[int]] = collections.defaultdict(set)
    for path in paths:
        for item in iter_inputs([path]):
            if by_file:
                owners[item.figure_id].add(shard_of_file[path])
            elif isinstance(item, InputFailure) and item.stage == FILE_STAGE:
                owners[item.figure_id].update(range(num_shards))
            else:
                owners[item.figure_id].add(shard_of(item.figure_id, num_shards))
    return owners
