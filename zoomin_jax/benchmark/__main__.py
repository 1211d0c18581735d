"""python -m zoomin_jax.benchmark --model [LABEL=]PATH [--model …] --suite SUITE --data-root DIR [--out DIR]

Runs every task of a suite (built-in: biomedical, medmnist; or a JSON file, see suites.py) on each
model and writes OUT/benchmark.json and OUT/benchmark.md: a column per model and the difference of
each later model from the first, each with a 95% bootstrap interval. A task whose data is not under
DIR is skipped with one line saying what to download. The first model is the reference (e.g. the
BMC-CLIP start, then the trained run). One process; models are loaded one at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path

from zoomin_jax.errors import UserError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(model_specs: list[str], suite: str, data_root: Path, *, bootstrap: int = 1000, seed: int = 0,
        batch_size: int = 64, open_clip_model: str | None = None, limit: int = 0) -> dict:
    """The results dict that benchmark.json holds (see report.markdown for the table)."""
    from zoomin_jax.benchmark import models, stats, suites, tasks

    suite_name, suite_tasks = suites.load_suite(suite)
    labelled = [models.label_and_path(spec) for spec in model_specs]
    if len({label for label, _ in labelled}) != len(labelled):
        raise UserError("two --model share a label; name them LABEL=PATH")
    results = {"suite": suite_name, "data_root": str(data_root), "models": dict(labelled),
               "bootstrap": bootstrap, "seed": seed, "tasks": {}}
    runnable = []
    for task in suite_tasks:
        task = dataclasses.replace(task, limit=limit) if limit else task
        reason = tasks.missing(task, data_root)
        if reason:
            _log(f"skipped {task.name}: {reason}")
            results["tasks"][task.name] = {"status": "skipped", "reason": reason}
        else:
            runnable.append(task)
    measured = {task.name: {} for task in runnable}
    # Each model is loaded once (a ViT-L takes seconds and GBs) and runs every task; a task's data is
    # read again for each model rather than held across all of them.
    for label, path in labelled:
        start = time.perf_counter()
        encoder = models.load(path, open_clip_model, batch_size)
        _log(f"{label}: loaded {path} in {time.perf_counter() - start:.1f} s")
        for task in runnable:
            start = time.perf_counter()
            measured[task.name][label] = tasks.measure(task, data_root, encoder, batch_size)
            _log(f"{label}: {task.name} in {time.perf_counter() - start:.1f} s")
        del encoder
    labels = [label for label, _ in labelled]
    for task in runnable:
        per_model = measured[task.name]
        metrics = {}
        for metric in per_model[labels[0]]:
            own, diffs = stats.compare([per_model[label][metric] for label in labels], bootstrap,
                                       seed + zlib.crc32(f"{task.name}/{metric}".encode()))
            metrics[metric] = {"n": per_model[labels[0]][metric].n,
                               "models": {label: interval.as_dict() for label, interval in zip(labels, own)},
                               "diff": {label: interval.as_dict() for label, interval in zip(labels[1:], diffs)}}
        results["tasks"][task.name] = {"status": "ok", "kind": task.kind, "metrics": metrics}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="[LABEL=]PATH: a model directory, a training run, or an open_clip checkpoint")
    parser.add_argument("--suite", default="biomedical", help="biomedical, medmnist, or a suite JSON file")
    parser.add_argument("--data-root", type=Path, required=True, help="where the suite's data lies")
    parser.add_argument("--out", type=Path, help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--open-clip-model", help="architecture of bare open_clip weight files (e.g. ViT-L-14)")
    parser.add_argument("--limit", type=int, default=0, help="the first N examples of each task (0: all)")
    args = parser.parse_args(argv)
    from zoomin_jax.benchmark import report
    try:
        results = run(args.model, args.suite, args.data_root, bootstrap=args.bootstrap, seed=args.seed,
                      batch_size=args.batch_size, open_clip_model=args.open_clip_model, limit=args.limit)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    table = report.markdown(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "benchmark.md").write_text(table)
        _log(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
