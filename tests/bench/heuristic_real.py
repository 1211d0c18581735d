"""The CPU (heuristic) backend on real figures (issue 16 items 2 and 4):

    python tests/bench/heuristic_real.py [--per-caption 2] [--only composites|medicat] [--json OUT]

- medicat: the 10 real MedICaT figures hand-annotated in tests/data/medicat_truth.jsonl (labelled-panel
  F1@0.5, label accuracy, marker recall, single-panel figures kept single);
- composites: real layouts (zou_train.csv) paired with the real multi-panel captions of
  tests/data/caption_devset.jsonl whose labels fit them, rendered by annotate.synth with real pictures
  (PneumoniaMNIST and scikit-image's), per slice of the caption dev set (tune, heldout): "plain" with one
  picture per panel, "real" with what real figures hold (sub-images, ticks, circled labels, white and
  black arrows, caption strips).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from annotate.backends import HeuristicBackend  # noqa: E402
from annotate.evaluate import (evaluate_backend, is_multi_panel, layout_composites, load_caption_devset,  # noqa: E402
                               medicat_figures)
from annotate.synth import load_layouts  # noqa: E402
from conftest import DATA  # noqa: E402


def row(name: str, scores: dict, seconds: float) -> str:
    p, m, s = scores["panels"], scores["markers"], scores["single"]
    return (f"{name:<26} figures {p['figures']:>4}  panels {p['panels']:>4}  P {p['precision']:.3f}  R {p['recall']:.3f}"
            f"  F1 {p['f1']:.3f}  label acc {p['label_accuracy']:.3f} ({p['labelled_panels']})"
            f"  marker R {m['recall']:.3f} P {m['precision']:.3f} ({m['markers']})"
            f"  single {s['kept_single']}/{s['figures']}  {seconds:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-caption", type=int, default=2)
    parser.add_argument("--only", choices=("composites", "medicat"))
    parser.add_argument("--json")
    args = parser.parse_args()
    backend, report = HeuristicBackend(), {}
    if args.only != "composites":
        start = time.perf_counter()
        report["medicat"] = evaluate_backend(backend, medicat_figures(TESTS / "data" / "medicat_truth.jsonl",
                                                                      DATA / "figures" / "medicat"))
        print(row("medicat", report["medicat"], time.perf_counter() - start))
    if args.only != "medicat":
        layouts = load_layouts(DATA / "layouts" / "zou_train.csv")
        entries = [e for e in load_caption_devset(TESTS / "data" / "caption_devset.jsonl") if is_multi_panel(e)]
        medmnist = np.load(DATA / "medmnist" / "pneumoniamnist.npz")["train_images"]
        for kind in ("plain", "real"):
            for split in ("tune", "heldout"):
                start = time.perf_counter()
                figures = layout_composites(layouts, [e for e in entries if e["split"] == split], per_caption=args.per_caption,
                                            medmnist=medmnist, real_features=kind == "real")
                name = f"composites/{kind}/{split}"
                report[name] = evaluate_backend(backend, figures)
                print(row(name, report[name], time.perf_counter() - start))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
