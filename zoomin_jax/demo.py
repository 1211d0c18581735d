"""python -m zoomin_jax.demo --out out/demo [--seeds 0,1,2] [--figures 300] [--heldout 100]

The whole method on a laptop-class CPU, each stage through its real command line:
synthetic compound figures (real layouts and MedMNIST pictures when ../shared/data is there) ->
`annotate run --backend heuristic` -> records and an overlay gallery -> for each seed, train the
zoom-in demo config and the figure-only ablation from the same init, the two at once -> retrieval
at figure, panel and region level on held-out figures (ground-truth annotations) -> export the
zoom-in model to open_clip and verify it -> one results table (also OUT/results.json) -> the
benchmark table of seed 0's initial, figure-only and zoom-in models on the held-out figures and the
two MedMNIST sets of ../shared/data (OUT/benchmark/benchmark.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zoomin_jax.recipes import LEVELS

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZOOMIN_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = (("figure_only", "figure-only"), ("zoomin", "zoom-in"))
KS = (1, 5)
ANNOTATE_SHARDS = 2


class Stages:
    """Runs the demo's commands, printing each with the elapsed time; their output goes to the log."""

    def __init__(self, log: Path):
        self.start = time.perf_counter()
        self.log = log

    def run(self, *commands: tuple[str, list[str]], env: dict | None = None) -> None:
        """(title, args) commands, all at once: stages that need none of each other's output share the
        2 cores (each is partly single-threaded: start-up, compiling, drawing figures). Their output
        goes to the log one command after another, once all have finished."""
        started = []
        for title, args in commands:
            print(f"[{self.elapsed():6.0f} s] {title}: {' '.join(args)}", flush=True)
            output = tempfile.TemporaryFile("w+")
            started.append((args, output, subprocess.Popen([sys.executable, *args], stdout=output,
                                                           stderr=subprocess.STDOUT, cwd=REPO,
                                                           env=os.environ | (env or {}))))
        for args, output, process in started:
            process.wait()
            output.seek(0)
            with open(self.log, "a") as log:
                log.write(f"$ {' '.join(args)}\n{output.read()}")
            output.close()
        for args, _, process in started:
            if process.returncode:
                sys.exit(f"demo: `{' '.join(args)}` failed (exit {process.returncode}); its output is in {self.log}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def synth_args(out: Path, num: int, seed: int) -> list[str]:
    args = ["-m", "annotate", "synth", "--out", str(out), "--num", str(num), "--seed", str(seed)]
    layouts, pictures = SHARED / "layouts" / "zou_train.csv", SHARED / "medmnist" / "pneumoniamnist.npz"
    if layouts.exists() and pictures.exists():
        args += ["--layouts", str(layouts), "--medmnist", str(pictures)]
    return args


def final_eval(workdir: Path) -> dict:
    entries = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [entry for entry in entries if entry["level"] == "eval"][-1]


def recall(metrics: dict, level: str, k: int) -> float:
    """Mean of image->text and text->image R@k."""
    return (metrics[f"heldout/{level}/i2t_r{k}"] + metrics[f"heldout/{level}/t2i_r{k}"]) / 2


def table(results: dict, seeds: list[int]) -> str:
    header = "".join(f"{f'{level} R@{k}':>12}" for level in LEVELS for k in KS)
    lines = [f"{'':<22}{header}"]
    for variant, name in VARIANTS:
        rows = [(f"{name} seed {seed}", results[variant][seed]) for seed in seeds]
        for label, metrics in rows:
            lines.append(f"{label:<22}" + "".join(f"{recall(metrics, level, k):12.3f}" for level in LEVELS for k in KS))
        lines.append(f"{name + ' mean':<22}" + "".join(
            f"{statistics.mean(recall(m, level, k) for _, m in rows):12.3f}" for level in LEVELS for k in KS))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--figures", type=int, default=300, help="training figures")
    parser.add_argument("--heldout", type=int, default=100, help="held-out figures for evaluation")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the demo config's)")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    stages = Stages(out / "demo.log")
    print(f"zoom-in demo in {out} (commands and their output: {stages.log})", flush=True)

    stages.run(("synthetic training figures", synth_args(out / "synth", args.figures, seed=100)),
               ("synthetic held-out figures",
                [*synth_args(out / "heldout", args.heldout, seed=200), "--truth-records"]))
    # Two shards at once, as a cluster's array tasks run them: the heuristic backend uses one core, so
    # each shard decodes in its own process (no decode worker) and the two fill the 2 cores; merge
    # checks that every figure is in exactly one of them.
    manifest = str(out / "synth" / "manifest.jsonl")
    stages.run(*((f"annotate (heuristic backend), shard {shard} of {ANNOTATE_SHARDS}",
                  ["-m", "annotate", "run", "--input", manifest, "--out", str(out / "records"), "--backend",
                   "heuristic", "--num-shards", str(ANNOTATE_SHARDS), "--shard-index", str(shard),
                   "--shard-by", "figure", "--decode-workers", "0"]) for shard in range(ANNOTATE_SHARDS)))
    stages.run(("merge the shards", ["-m", "annotate", "merge", "--out", str(out / "records"), "--input", manifest]))
    stages.run(("annotation quality", ["-m", "annotate", "eval", "--pred", str(out / "records"),
                                       "--gt", str(out / "synth" / "gt.jsonl")]),
               ("overlay gallery", ["-m", "annotate", "show", "--records", str(out / "records"),
                                    "--out", str(out / "gallery"), "--limit", "40"]))

    records = out / "records" / "records-*.array_record"
    heldout = out / "heldout" / "truth" / "records-*.array_record"
    # Every seed's runs compile the same steps: the persistent cache compiles them once.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(out / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    results = {variant: {} for variant, _ in VARIANTS}
    for seed in seeds:
        workdirs = {variant: out / "runs" / f"{variant}-seed{seed}" for variant, _ in VARIANTS}
        stages.run(*((f"train {name}, seed {seed}",
                      ["-m", "zoomin_jax.train", f"--config=configs/demo_cpu.py:records={records},"
                       f"eval_records={heldout},variant={variant},seed={seed}", f"--workdir={workdirs[variant]}",
                       *([f"--config.total_steps={args.steps}"] if args.steps else [])])
                     for variant, name in VARIANTS), env=cache)
        for variant, workdir in workdirs.items():
            results[variant][seed] = final_eval(workdir)

    zoomin = out / "runs" / f"zoomin-seed{seeds[0]}"
    stages.run(("export zoom-in to open_clip", ["-m", "zoomin_jax.convert", "export", "--src", str(zoomin),
                                                "--out", str(out / "open_clip")]), env=cache)
    stages.run(("verify the export in open_clip", ["-m", "zoomin_jax.convert", "verify", "--flax", str(zoomin),
                                                   "--open-clip", str(out / "open_clip"), "--model", "test-tiny"]),
               env=cache)

    suite = out / "benchmark_suite.json"
    suite.write_text(json.dumps({"tasks": [{"name": "panel2patch_heldout", "path": str(heldout)},
                                           {"name": "breastmnist"}, {"name": "pneumoniamnist"}]}, indent=1) + "\n")
    runs = {name: out / "runs" / f"{variant}-seed{seeds[0]}" for variant, name in VARIANTS}
    stages.run(("benchmark: initial vs figure-only vs zoom-in",
                ["-m", "zoomin_jax.benchmark", "--model", f"initial={runs['zoom-in'] / '0'}",
                 *(arg for name, run in runs.items() for arg in ("--model", f"{name}={run}")), "--suite", str(suite),
                 "--data-root", str(SHARED), "--out", str(out / "benchmark")]), env=cache)

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nheld-out retrieval, R@k = mean of image->text and text->image "
          f"({int(results['zoomin'][seeds[0]]['heldout/figure/items'])} figures, "
          f"{int(results['zoomin'][seeds[0]]['heldout/panel/items'])} panels, "
          f"{int(results['zoomin'][seeds[0]]['heldout/region/items'])} regions):")
    print(table(results, seeds))
    print(f"\nbenchmark of seed {seeds[0]}'s models, a miniature (tiny models, {args.figures} synthetic training "
          f"figures, 28-pixel MedMNIST): R@k per direction and level, zero-shot top-1 and balanced accuracy; "
          f"differences from the initial model:")
    print((out / "benchmark" / "benchmark.md").read_text())
    print(f"\ndone in {stages.elapsed() / 60:.1f} min. Files:\n"
          f"  records      {out / 'records'}\n  gallery      {out / 'gallery' / 'index.html'}\n"
          f"  TensorBoard  tensorboard --logdir {out / 'runs'}\n  open_clip    {out / 'open_clip'} "
          f"(open_clip.create_model('local-dir:{out / 'open_clip'}'))\n  results      {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
