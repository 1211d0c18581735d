"""python -m annotate {run,merge,captions,synth,eval,show}: the Panel2Patch annotation stage's command line.

  run --input PATH... --out DIR --backend heuristic|qwen|vllm [--model DIR] [--num-shards N --shard-index I]
      figures (.jsonl manifests, WebDataset .tar shards, JATS .nxml) -> DIR/records-SSSSS-of-NNNNN
      .array_record, DIR/failures-….jsonl (id, stage, reason), DIR/summary-….json; resumable. The
      shard comes from the flags, else SLURM_ARRAY_TASK_ID/COUNT, else RANK/WORLD_SIZE. SIGTERM
      closes the open part and exits with status 143; a rerun finishes the shard.
  merge --out DIR [--input PATH...] [--report FILE]
      after all shards ran: names missing shards and ids accounted for twice or (given the run's
      inputs) not at all; sums the summaries into FILE (default DIR/merged-summary.json). Exit 1
      unless every shard is there and every input id is one record or one failure.

  captions --input captions.jsonl --out out.jsonl
      lines {"id", "caption"} -> lines {"id", "panels": [{"label", "text"}]}; a line that cannot be
      read goes to OUT.failures.jsonl with its line number and reason, never silently dropped.
  synth --out DIR --num N --seed S [--layouts CSV] [--medmnist NPZ] [--truth-records]
      compound figures with ground truth: DIR/images/*.png, DIR/manifest.jsonl, DIR/gt.jsonl.
  eval --pred DIR --gt GT.jsonl
      panel precision/recall/F1@0.5, label accuracy, region recall, caption-split scores (JSON).
  show --records DIR --out DIR [--limit N]
      overlay PNGs (panels, labels, regions, texts) and an index.html.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from annotate.captions import split_caption


def _caption_of(line: str) -> tuple[str, str]:
    item = json.loads(line)
    if not isinstance(item, dict) or "id" not in item:
        raise ValueError("not a JSON object with an 'id'")
    caption = item.get("caption")
    if not isinstance(caption, str):
        raise ValueError(f"'caption' is {type(caption).__name__}, not a string")
    return str(item["id"]), caption


def cmd_captions(args) -> int:
    if args.backend == "rules":
        def split(captions):
            return [(split_caption(caption), []) for caption in captions]
    else:
        from annotate.backends import make_backend
        try:
            split = make_backend(args.backend, args.model).split_captions
        except (ValueError, ImportError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    out, failures_path = Path(args.out), Path(f"{args.out}.failures.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    tmp_out, tmp_failures = Path(f"{out}.partial"), Path(f"{failures_path}.partial")
    with open(args.input, "rb") as source, open(tmp_out, "w") as sink, open(tmp_failures, "w") as failures:
        batch: list[tuple[str, str]] = []

        def flush():
            if not batch:
                return
            for (figure_id, _), (panels, warnings) in zip(batch, split([c for _, c in batch]), strict=True):
                line = {"id": figure_id, "panels": panels} | ({"warnings": warnings} if warnings else {})
                sink.write(json.dumps(line) + "\n")
            batch.clear()

        for number, raw in enumerate(tqdm(source, desc="captions", unit="caption"), start=1):
            if not raw.strip():
                continue
            try:
                batch.append(_caption_of(raw.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as err:
                failures.write(json.dumps({"line": number, "stage": "read", "reason": str(err)}) + "\n")
                failed += 1
                continue
            done += 1
            if len(batch) == args.batch_size:
                flush()
        flush()
    os.replace(tmp_out, out)
    os.replace(tmp_failures, failures_path)
    print(f"captions: {done} split, {failed} failed ({failures_path})", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from annotate.backends import make_backend
    from annotate.run import run_shard, shard_from_env
    num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
    if not 0 <= shard_index < num_shards:
        print(f"error: shard index {shard_index} is outside 0..{num_shards - 1}", file=sys.stderr)
        return 1
    try:
        backend = make_backend(args.backend, args.model, prefilter=args.prefilter)
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = run_shard(args.input, args.out, backend, num_shards, shard_index,
                        batch_size=args.batch_size, part_size=args.part_size, part_seconds=args.part_seconds)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args) -> int:
    from annotate.merge import merge
    try:
        report = merge(args.out, args.input)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = Path(args.report or Path(args.out) / "merged-summary.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"merge: {len(report['shards'])} of {report['num_shards']} shards: {report['figures']} figures, "
          f"{report['panels']} panels, {report['regions']} regions, {report['failures']} failures; report in {path}")
    for problem in report["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    return 0 if report["complete"] else 1


def cmd_synth(args) -> int:
    from annotate.synth import synthesize, write_truth_records
    out = synthesize(Path(args.out), args.num, args.seed, args.layouts, args.medmnist)
    print(f"synth: {args.num} figures in {out}", file=sys.stderr)
    if args.truth_records:
        print(f"synth: ground-truth records in {write_truth_records(out)}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from annotate.evaluate import evaluate
    print(json.dumps(evaluate(args.pred, args.gt), indent=2))
    return 0


def cmd_show(args) -> int:
    from annotate.gallery import write_gallery
    print(f"gallery: {write_gallery(args.records, args.out, args.limit)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="annotate figures into ArrayRecord shards")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="heuristic", choices=["heuristic", "qwen", "vllm"])
    p.add_argument("--model", help="model directory for LVLM backends")
    p.add_argument("--prefilter", action="store_true",
                   help="send figures the heuristic finds to be one panel past the LVLM")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--shard-index", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--part-size", type=int, default=256, help="records per part file (the unit of resume)")
    p.add_argument("--part-seconds", type=float, default=300.0,
                   help="close a part this long after its first record even if not full, so a kill -9 loses "
                        "about this much work (SIGTERM closes it after the current batch and exits with status 143)")
    p = sub.add_parser("merge", help="check that the shards account for every input id once; sum their summaries")
    p.add_argument("--out", required=True, help="the folder the shards were written to")
    p.add_argument("--input", nargs="+",
                   help="the inputs annotate run got, to find ids no shard has (reads them again, images undecoded)")
    p.add_argument("--report", help="merged report JSON (default OUT/merged-summary.json)")
    p = sub.add_parser("captions", help="split compound-figure captions per panel")
    p.add_argument("--input", required=True, help="JSONL with id and caption per line")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--backend", default="rules", choices=["rules", "qwen", "vllm"],
                   help="rules, or an LVLM that assigns clauses to panels (falls back to the rules per caption)")
    p.add_argument("--model", help="model directory for LVLM backends")
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("synth", help="synthetic compound figures with ground truth")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", help="CSV of real layouts shaped like zou_train.csv (default: random grids)")
    p.add_argument("--medmnist", help="MedMNIST .npz whose train_images also fill panels")
    p.add_argument("--truth-records", action="store_true",
                   help="also write the ground truth as records (DIR/truth/records-*.array_record), for evaluation")
    p = sub.add_parser("eval", help="score records against ground truth")
    p.add_argument("--pred", required=True, help="folder of records-*.array_record")
    p.add_argument("--gt", required=True, help="gt.jsonl as written by synth")
    p = sub.add_parser("show", help="overlay gallery of records")
    p.add_argument("--records", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "merge": cmd_merge, "captions": cmd_captions, "synth": cmd_synth, "eval": cmd_eval,
                "show": cmd_show}
    try:
        return commands[args.command](args)
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
