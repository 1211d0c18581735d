"""python -m annotate {run,merge,captions,synth,eval,eval-captions,show,audit}: the Panel2Patch annotation stage's command line.

  run --input PATH|DIR|@LIST... --out DIR --backend heuristic|qwen|vllm [--model DIR] [--num-shards N
      [--shard-index I]] [--shard-by auto|file|figure] [--max-failure-rate R --failure-window M]
      figures (.jsonl manifests, WebDataset .tar shards, JATS .nxml) -> DIR/records-SSSSS-of-NNNNN
      .FFFFF.array_record, DIR/failures-….jsonl (id, stage, reason), DIR/summary-….json; resumable. The
      shard comes from the flags (the index, if not given, from SLURM_ARRAY_TASK_ID or RANK), else
      SLURM_ARRAY_TASK_ID/COUNT, else RANK/WORLD_SIZE. Exit status 143 after SIGTERM (the open part
      closed; a rerun finishes the shard), 3 when more than R of the figures failed, 1 on errors,
      including another process running the same shard. Text no encoder takes (invalid UTF-8, lone
      surrogates, control characters) is cleaned, each change a warning of the record.
  merge --out DIR [--input PATH|DIR|@LIST...] [--report FILE]
      after all shards ran: names missing shards and ids accounted for twice or (given the run's
      inputs) not at all, keeps one of an id that files of two shards hold; adds up the shards into
      FILE (default DIR/merged-summary.json). Exit 1 unless every shard is there and every input id
      is one record or one failure.

  captions --input captions.jsonl --out out.jsonl
      lines {"id", "caption"} -> lines {"id", "panels": [{"label", "text"}]}; a line that cannot be
      read goes to OUT.failures.jsonl with its line number and reason, never silently dropped.
  synth --out DIR --num N --seed S [--layouts CSV] [--medmnist NPZ] [--real-features] [--truth-records]
      compound figures with ground truth: DIR/images/*.png, DIR/manifest.jsonl, DIR/gt.jsonl; the
      layouts from a zou_train.csv (labelled panels) or clef2016_train.csv (no labels) shaped CSV.
  eval --pred DIR --gt GT.jsonl
      panel precision/recall/F1@0.5, label accuracy, region recall, caption-split scores (JSON).
  eval-captions --devset DEVSET.jsonl [--out REPORT.json] [--backend rules|qwen|vllm]
      label-set exact match and mean token-F1 of the multi-panel captions, kept-whole rate of the
      single-panel ones, per slice (tune, heldout); per style and per caption in the JSON.
  show --records DIR --out DIR [--limit N]
      overlay PNGs (panels, labels, regions, texts) and an index.html.
  audit sample --records [NAME=]DIR [--records [NAME=]DIR2 ...] --n N --seed S --out AUDIT
      a seeded sample of the figures every run holds, stratified (panel count, source, single vs compound).
  audit serve AUDIT [--port P]
      the review page on http://127.0.0.1:P/: runs side by side, answered per aspect with the keyboard;
      each finished figure one line of AUDIT/verdicts.jsonl (reviewer, UTC time); resumes per reviewer.
  audit report AUDIT
      share correct per run, aspect and stratum (95% Wilson), paired differences of runs (Newcombe),
      Cohen's kappa between reviewers, the figures judged wrong: AUDIT/report/report.md, .json, wrong/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from annotate.captions import split_caption
from zoomin_jax.errors import UserError


def _caption_of(line: str) -> tuple[str, str]:
    item = json.loads(line)
    if not isinstance(item, dict) or "id" not in item:
        raise ValueError("not a JSON object with an 'id'")
    caption = item.get("caption")
    if not isinstance(caption, str):
        raise ValueError(f"'caption' is {type(caption).__name__}, not a string")
    return str(item["id"]), caption


def add_lvlm_flags(parser: argparse.ArgumentParser) -> None:
    """How a qwen/vllm backend runs on a node: 7B on one GPU takes the defaults; 72B shards over 8 GPUs
    (--device-map auto, or --backend vllm --tensor-parallel-size 8)."""
    from annotate.backends import LvlmOptions
    from annotate.config import AnnotateConfig
    lvlm, defaults = parser.add_argument_group("LVLM (qwen, vllm)"), LvlmOptions()
    lvlm.add_argument("--max-new-tokens", type=int, default=AnnotateConfig.max_new_tokens,
                      help="token budget per answer; a cut answer is asked again with 4x, up to --max-retry-tokens")
    lvlm.add_argument("--max-retry-tokens", type=int, default=AnnotateConfig.max_retry_tokens)
    lvlm.add_argument("--lvlm-batch-size", type=int, default=defaults.batch_size,
                      help="qwen: requests per generate call (vllm schedules its own batches)")
    lvlm.add_argument("--device-map", help='qwen: transformers layer placement over the GPUs, e.g. "auto" for 72B')
    lvlm.add_argument("--max-memory", help="qwen: memory cap per device with --device-map, e.g. 0=70GiB,1=70GiB")
    lvlm.add_argument("--attn-implementation", help="qwen: sdpa, eager or flash_attention_2 (needs flash-attn)")
    lvlm.add_argument("--tensor-parallel-size", type=int, default=defaults.tensor_parallel_size,
                      help="vllm: GPUs to shard the model over")
    lvlm.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                      help="vllm: share of each GPU's memory for weights and KV cache")
    lvlm.add_argument("--max-model-len", type=int, help="vllm: context length cap (smaller frees KV cache)")
    lvlm.add_argument("--max-num-seqs", type=int,
                      help="vllm: sequences decoded at once (default: vLLM's); --batches-in-flight and "
                           "--batch-size decide how many there are to decode")


def lvlm_settings(args):
    """(AnnotateConfig, LvlmOptions) from the flags `add_lvlm_flags` defined."""
    import dataclasses

    from annotate.backends import LvlmOptions
    from annotate.config import AnnotateConfig
    cfg = dataclasses.replace(AnnotateConfig(), max_new_tokens=args.max_new_tokens,
                              max_retry_tokens=args.max_retry_tokens)
    return cfg, LvlmOptions(batch_size=args.lvlm_batch_size, device_map=args.device_map, max_memory=args.max_memory,
                            attn_implementation=args.attn_implementation,
                            tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                            max_num_seqs=args.max_num_seqs)


def caption_splitter(args):
    """captions -> [(panels, warnings)] for --backend: the rules, or an LVLM (UserError when it cannot
    be made)."""
    if args.backend == "rules":
        return lambda captions: [(split_caption(caption), []) for caption in captions]
    from annotate.backends import make_backend
    try:
        cfg, options = lvlm_settings(args)
        return make_backend(args.backend, args.model, cfg, options=options).split_captions
    except (ValueError, ImportError) as err:
        raise UserError(str(err)) from None


def add_caption_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="rules", choices=["rules", "qwen", "vllm"],
                        help="rules, or an LVLM that assigns clauses to panels (falls back to the rules per caption)")
    parser.add_argument("--model", help="model directory for LVLM backends")
    add_lvlm_flags(parser)


def cmd_captions(args) -> int:
    split = caption_splitter(args)
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
    try:
        num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
        cfg, options = lvlm_settings(args)
        backend = make_backend(args.backend, args.model, cfg, args.prefilter, options)
        # ValueError from here on: an input list or directory that names nothing.
        summary = run_shard(args.input, args.out, backend, num_shards, shard_index, cfg=cfg,
                            batch_size=args.batch_size, part_size=args.part_size, part_seconds=args.part_seconds,
                            file_records=args.file_records,
                            shard_by=args.shard_by, max_failure_rate=args.max_failure_rate,
                            failure_window=args.failure_window, decode_workers=args.decode_workers,
                            batches_in_flight=args.batches_in_flight or (1 if args.backend == "heuristic" else 3))
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
    out = synthesize(Path(args.out), args.num, args.seed, args.layouts, args.medmnist, args.real_features)
    print(f"synth: {args.num} figures in {out}", file=sys.stderr)
    if args.truth_records:
        print(f"synth: ground-truth records in {write_truth_records(out)}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from annotate.evaluate import evaluate
    print(json.dumps(evaluate(args.pred, args.gt), indent=2))
    return 0


def cmd_eval_captions(args) -> int:
    from annotate.evaluate import evaluate_captions, load_caption_devset
    entries, split = load_caption_devset(args.devset), caption_splitter(args)
    report = {"devset": args.devset, "backend": args.backend} | evaluate_captions(
        entries, lambda captions: [panels for panels, _ in split(captions)])
    print(f"{'slice':<8} {'kind':<7} {'captions':>8} {'label-set exact':>15} {'token-F1':>8} {'kept whole':>10}")
    for name, kinds in report["slices"].items():
        for kind, scores in kinds.items():
            exact = f"{scores['label_set_exact_match']:.3f}" if kind == "multi" else "-"
            whole = f"{scores['kept_whole_rate']:.3f}" if kind == "single" else "-"
            print(f"{name:<8} {kind:<7} {scores['captions']:>8} {exact:>15} {scores['mean_token_f1']:>8.3f} {whole:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"eval-captions: per style and per caption in {args.out}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    from annotate.gallery import write_gallery
    print(f"gallery: {write_gallery(args.records, args.out, args.limit)}", file=sys.stderr)
    return 0


def cmd_audit(args) -> int:
    if args.audit == "sample":
        from annotate.audit.sample import make_sample
        path = make_sample(args.records, args.n, args.seed, args.out)
        print(f"audit: sample of {args.n} figures in {path}; review it with `python -m annotate audit serve "
              f"{args.out}`", file=sys.stderr)
    elif args.audit == "serve":
        from annotate.audit.server import serve
        serve(args.dir, args.port)
    else:
        from annotate.audit.report import write_report
        path, skipped = write_report(args.dir)
        for problem in skipped:
            print(f"warning: {problem}", file=sys.stderr)
        print(f"audit: report in {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="annotate figures into ArrayRecord shards")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories (their .jsonl/.tar/.nxml/.xml files), or @FILE listing paths one per line")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="heuristic", choices=["heuristic", "qwen", "vllm"])
    p.add_argument("--model", help="model directory for LVLM backends")
    add_lvlm_flags(p)
    p.add_argument("--prefilter", action="store_true",
                   help="send figures the heuristic finds to be one panel past the LVLM")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--shard-index", type=int,
                   help="default with --num-shards: SLURM_ARRAY_TASK_ID, else RANK")
    p.add_argument("--shard-by", default="auto", choices=["auto", "file", "figure"],
                   help="file: each shard reads only its input files (file n of the sorted inputs -> shard n %% N); "
                        "figure: every shard reads every input, keeping crc32(id) %% N; auto (default): by file when "
                        "there are at least as many files as shards")
    p.add_argument("--max-failure-rate", type=float, default=0.5,
                   help="stop the shard with exit status 3 when more than this fraction of the last "
                        "--failure-window figures failed (1 never stops); this run's failures are then dropped, "
                        "so a rerun retries them")
    p.add_argument("--failure-window", type=int, default=100,
                   help="the recent figures --max-failure-rate looks at")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode-workers", type=int, default=max(0, min(8, len(os.sched_getaffinity(0)) - 1)),
                   help="processes that read and decode the next batches while the backend works (default: the "
                        "cores this process may use, less one, at most 8; 0 decodes in the main process)")
    p.add_argument("--batches-in-flight", type=int,
                   help="batches annotated at once, each in a host thread, so that the LVLM engine runs one "
                        "batch's requests while the host reads another's answers and builds its records "
                        "(default: 3 for qwen and vllm, 1 for heuristic, which has no engine to keep busy)")
    p.add_argument("--part-size", type=int, default=256, help="records per part file (the unit of resume)")
    p.add_argument("--part-seconds", type=float, default=300.0,
                   help="close a part this long after its first record even if not full, so a kill -9 loses "
                        "about this much work (SIGTERM closes it and exits with status 143)")
    p.add_argument("--file-records", type=int, default=2048,
                   help="records per records file of the finished shard: its parts are packed into files of at most "
                        "this many, so the disk holds the shard plus one such file while they are written")
    p = sub.add_parser("merge", help="check that the shards account for every input id once; sum their summaries")
    p.add_argument("--out", required=True, help="the folder the shards were written to")
    p.add_argument("--input", nargs="+",
                   help="the inputs annotate run got (files, directories, @FILE), to find ids no shard has (reads them "
                        "again, images undecoded)")
    p.add_argument("--report", help="merged report JSON (default OUT/merged-summary.json)")
    p = sub.add_parser("captions", help="split compound-figure captions per panel")
    p.add_argument("--input", required=True, help="JSONL with id and caption per line")
    p.add_argument("--out", required=True, help="output JSONL")
    add_caption_backend_flags(p)
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("synth", help="synthetic compound figures with ground truth")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", help="CSV of real layouts, no header: path,x1,y1,x2,y2,panel, then (zou_train.csv) the "
                                     "label box and letter lx1,ly1,lx2,ly2,label or (clef2016_train.csv) nothing; "
                                     "default: random grids")
    p.add_argument("--medmnist", help="MedMNIST .npz whose train_images also fill panels")
    p.add_argument("--real-features", action="store_true",
                   help="draw what real figures hold: sub-image grids in a panel, tick labels, diagrams joined by arrows, "
                        "white/black arrows (the one that stands out) and "
                        "asterisks, circled labels, a burned-in caption strip (default: one picture per panel)")
    p.add_argument("--truth-records", action="store_true",
                   help="also write the ground truth as records (DIR/truth/records-*.array_record), for evaluation")
    p = sub.add_parser("eval", help="score records against ground truth")
    p.add_argument("--pred", required=True, help="folder of records-*.array_record")
    p.add_argument("--gt", required=True, help="gt.jsonl as written by synth")
    p = sub.add_parser("eval-captions", help="score a caption splitter on a hand-made caption dev set")
    p.add_argument("--devset", required=True, help="dev set JSONL, e.g. tests/data/caption_devset.jsonl")
    p.add_argument("--out", default="caption-eval.json", help="report JSON (default: caption-eval.json)")
    add_caption_backend_flags(p)
    p = sub.add_parser("show", help="overlay gallery of records")
    p.add_argument("--records", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int)
    p = sub.add_parser("audit", help="judge runs' annotations in a browser and report their quality")
    audit = p.add_subparsers(dest="audit", required=True)
    q = audit.add_parser("sample", help="a seeded, stratified sample of the figures every run holds")
    q.add_argument("--records", action="append", required=True,
                   help="[NAME=]DIR: an `annotate run` output folder (NAME defaults to its folder name); repeat "
                        "for each run to compare on the same figures")
    q.add_argument("--n", type=int, default=2000, help="figures in the sample (default 2000)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="the audit folder (sample.json, the sampled records, verdicts)")
    q = audit.add_parser("serve", help="the review page on 127.0.0.1")
    q.add_argument("dir", help="the audit folder `audit sample` made")
    q.add_argument("--port", type=int, default=8765, help="default 8765; 0 picks a free one")
    q = audit.add_parser("report", help="shares, paired differences, agreement and the figures judged wrong")
    q.add_argument("dir", help="the audit folder")
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "merge": cmd_merge, "captions": cmd_captions, "synth": cmd_synth, "eval": cmd_eval,
                "eval-captions": cmd_eval_captions, "show": cmd_show, "audit": cmd_audit}
    try:
        return commands[args.command](args)
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
