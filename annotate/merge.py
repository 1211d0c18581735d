"""`annotate merge`: after all shards of `annotate run` are done, check that every input id was
accounted for exactly once and add up the shards' summaries.

A shard is finished when its records and summary files exist (what `annotate run` writes last);
any other shard of the count is missing, whatever it left behind. Each id must be one record or
one failure line across all shards; an id may repeat only as the run's duplicate-id failure for
an input that repeats it. Given the inputs, ids they hold but no finished shard has, and ids the
shards have but the inputs do not, are listed as well (not the ids of missing shards: rerunning
those shards is the fix).
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Sequence

from annotate.inputs import iter_inputs
from annotate.run import DUPLICATE_ID_REASON, ShardFiles, shard_of
from zoomin_jax import records

_SHARD_STEM = re.compile(r"-(\d{5,})-of-(\d{5,})\.")
_NAMED_IDS = 5  # ids an error line names; the report lists them all


def shard_indices_by_count(out: Path) -> dict[int, set[int]]:
    """Shard count -> indices of the shards that left a records, failures or summary file in OUT
    (names as ShardFiles writes them; part files of unfinished shards do not count)."""
    found: dict[int, set[int]] = collections.defaultdict(set)
    for path in out.iterdir():
        if match := _SHARD_STEM.search(path.name):
            index, count = int(match[1]), int(match[2])
            files = ShardFiles(out, index, count)
            if path in (files.records, files.failures, files.summary):
                found[count].add(index)
    return found


def _named(ids: Sequence[str]) -> str:
    more = len(ids) - _NAMED_IDS
    return ", ".join(ids[:_NAMED_IDS]) + (f" and {more} more" if more > 0 else "")


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

    totals, by_reason, per_shard = collections.Counter(), collections.Counter(), []
    entries, repeats_explained = collections.Counter(), collections.Counter()
    missing, unreadable = [], {}
    for index in range(num_shards):
        files = ShardFiles(out, index, num_shards)
        if not (files.records.exists() and files.summary.exists()):
            missing.append(index)
            continue
        try:
            summary = json.loads(files.summary.read_text())
            failures = files.read_failures(repair=False)  # a finished shard: read, never rewritten
            ids = [record["figure_id"] for record in records.iter_records(files.records)]
        except (ValueError, RuntimeError) as err:  # bad JSON, a bad record, a corrupt ArrayRecord file
            unreadable[index] = f"{files.stem} ({err})"
            continue
        entries.update(ids + [failure["id"] for failure in failures])
        repeats_explained.update(f["id"] for f in failures if f["reason"] == DUPLICATE_ID_REASON)
        totals.update({key: summary[key] for key in ("figures", "panels", "regions", "failures")})
        by_reason.update(summary["failures_by_reason"])
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
    duplicates = sorted(i for i, n in entries.items() if n - repeats_explained[i] > 1)
    if duplicates:
        problems.append(f"ids accounted for more than once in the shards ({len(duplicates)}): {_named(duplicates)}; "
                        f"were files of another run copied into {out}?")

    report = {"out": str(out), "num_shards": num_shards,
              **{key: totals[key] for key in ("figures", "panels", "regions", "failures")},
              "failures_by_reason": dict(sorted(by_reason.items())), "shards": per_shard,
              "missing_shards": [ShardFiles(out, i, num_shards).stem for i in missing],
              "unreadable_shards": list(unreadable.values()), "duplicate_ids": duplicates,
              "inputs": list(inputs) if inputs else None}
    if inputs:
        input_ids = {item.figure_id for item in iter_inputs(inputs)}
        unseen = input_ids - entries.keys()
        not_merged = set(missing) | unreadable.keys()
        awaited = {i for i in unseen if shard_of(i, num_shards) in not_merged}
        in_no_shard, not_in_inputs = sorted(unseen - awaited), sorted(entries.keys() - input_ids)
        if in_no_shard:
            problems.append(f"input ids in none of the finished shards ({len(in_no_shard)}): {_named(in_no_shard)}; "
                            f"were inputs added after annotate run? annotate them in a new run")
        if not_in_inputs:
            problems.append(f"ids in the shards but in none of the inputs ({len(not_in_inputs)}): "
                            f"{_named(not_in_inputs)}; give merge the same --input that annotate run got")
        report |= {"ids_in_shards_not_merged": len(awaited), "ids_in_no_shard": in_no_shard,
                   "ids_not_in_inputs": not_in_inputs}
    return report | {"complete": not problems, "problems": problems}
