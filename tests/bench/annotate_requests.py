"""LVLM requests per figure and tiny-model CPU throughput of `annotate run --backend qwen` (issue 13).

    python tests/bench/annotate_requests.py [--figures 24] [--runs 3] [--decode-workers 0]

Over the demo's synthetic figures (annotate synth on real layouts and MedMNIST pictures, seed 100, as
`make demo` makes them), two runs of the real backend and engine:
- requests: answers as a good Qwen2.5-VL would give them (tests/tiny_qwen.Scripted), with each figure's
  true panels, labels and markers from the ground truth, after the tiny random Qwen2.5-VL has run every
  request for 32 new tokens: the plan's requests counted, and their cost on the tiny model timed;
- the tiny random model alone, every answer cut at 32 new tokens (no retry): it reads no panels, so each
  figure is one panel; timed.
Times are medians of --runs runs, as figures/s.
A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from annotate.config import AnnotateConfig  # noqa: E402
from annotate.engines import TransformersEngine  # noqa: E402
from annotate.lvlm_output import resized_size  # noqa: E402
from annotate.qwen import QwenBackend  # noqa: E402
from annotate.run import run_shard  # noqa: E402
from annotate.synth import synthesize  # noqa: E402
from conftest import DATA, roco_captions  # noqa: E402
from tiny_qwen import Scripted, build_tiny_qwen  # noqa: E402


def demo_figures(directory: Path, num: int) -> tuple[Path, list[dict]]:
    """`num` synthetic figures as `make demo` makes them (real layouts, MedMNIST pictures, seed 100) in
    `directory`, and their ground truth."""
    data = synthesize(directory, num, seed=100, layouts_csv=str(DATA / "layouts" / "zou_train.csv"),
                      medmnist_npz=str(DATA / "medmnist" / "pneumoniamnist.npz"))
    return data, [json.loads(line) for line in (data / "gt.jsonl").read_text().splitlines()]


def truth_answers(gt: list[dict], cfg: AnnotateConfig):
    """figure(height, width) for Scripted: the true panels and markers of the figure the model sees at
    that size (each figure is told apart by the sizes it is shown at)."""
    by_size = {}
    for figure in gt:
        for scale in cfg.panel_scales:
            width, height = max(28, round(figure["width"] * scale)), max(28, round(figure["height"] * scale))
            by_size.setdefault(resized_size(height, width, cfg.min_pixels, cfg.max_pixels), figure)

    def answer(height: int, width: int) -> list[dict]:
        figure = by_size[(height, width)]
        sx, sy = width / figure["width"], height / figure["height"]

        def scaled(box):
            return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]
        return ([{"bbox_2d": scaled(p["box"]), "label": p["label"]} for p in figure["panels"]]
                + [{"bbox_2d": scaled(r["marker_box"]), "label": r["marker_kind"]} for r in figure["regions"]])
    return answer


class Paid:
    """`scripted`'s answers, given after the real network has run the same inputs for `tokens` new tokens:
    what the requests cost on the tiny model, with the answers (and so the follow-up requests) of a good one."""

    def __init__(self, scripted: Scripted, generate, tokens: int = 32):
        self.scripted, self.generate, self.tokens = scripted, generate, tokens

    def __call__(self, **inputs):
        self.generate(**(inputs | {"max_new_tokens": self.tokens, "do_sample": False}))
        return self.scripted(**inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-workers", type=int, default=0, help="as annotate run's (0: decode in process)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    try:
        data, gt = demo_figures(tmp / "synth", args.figures)
        corpus = roco_captions()[:2000] + [json.dumps([{"bbox_2d": [n, n + 1, n + 50, n + 60], "label": "ABCD"[n % 4]}])
                                           for n in range(300)]
        model = build_tiny_qwen(tmp / "tiny-qwen", corpus)
        manifest = [str(data / "manifest.jsonl")]

        def timed(backend, name: str) -> tuple[dict, float]:
            seconds = []
            for _ in range(args.runs):
                backend.engine.counts.clear()
                shutil.rmtree(tmp / name, ignore_errors=True)
                start = time.perf_counter()
                summary = run_shard(manifest, tmp / name, backend, batch_size=8, decode_workers=args.decode_workers)
                seconds.append(time.perf_counter() - start)
            counts, median = backend.counts, statistics.median(seconds)
            print(f"{name}: {counts['requests']} requests in {counts['generate_calls']} generate calls for "
                  f"{summary['figures']} figures with {summary['panels']} panels: "
                  f"{counts['requests'] / summary['figures']:.2f} requests per figure, "
                  f"{counts['generate_calls'] / -(-summary['figures'] // 8):.1f} calls per batch of 8; seconds per "
                  f"run {[round(s, 1) for s in seconds]}, median {median:.1f} s = {summary['figures'] / median:.2f} "
                  f"figures/s")
            return summary, median

        cfg = AnnotateConfig()
        backend = QwenBackend(TransformersEngine(str(model), cfg), cfg)
        backend.engine.model.generate = Paid(Scripted(backend.engine, truth_answers(gt, cfg)), backend.engine.model.generate)
        timed(backend, "good answers")
        cfg = dataclasses.replace(AnnotateConfig(), max_new_tokens=32, max_retry_tokens=32)
        timed(QwenBackend(TransformersEngine(str(model), cfg), cfg), "random answers")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
