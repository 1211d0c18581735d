"""Panels per figure and what training crops leave of them, on the real layouts (issue 15 items 2, 9).

    PYTHONPATH=. python tests/bench/crops.py [--draws 5] [--seed 0]

Reads ../shared/data/layouts/zou_train.csv (9,642 PMC figures, single-panel ones included) and
clef2016_train.csv (6,782 ImageCLEF 2016 compound figures): panel boxes only, no image sizes, so a
figure is taken to span (0, 0) to the far corner of its panels.
- panels per figure: the distribution, and for a padded maximum K the share of figures whose
  panels all fit and the share of all panels that fit (the rest are sampled per epoch);
- crops: the figure view of open_clip's eval transform, and --draws random resized crops per
  figure (data.samples.random_rect) at several scale ranges; per view, the share of panels that
  keep at least SampleConfig.min_visible of their box in view (those the figure is paired with),
  the share wholly in view, and the mean share of a panel's area in view.
A benchmark, not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import DATA  # noqa: E402
from zoomin_jax.data import samples  # noqa: E402

LAYOUTS = ("zou_train.csv", "clef2016_train.csv")
MAXIMA = (4, 6, 8)
SCALES = ((0.5, 1.0), (0.9, 1.0), (1.0, 1.0))


def figures(name: str) -> list[np.ndarray]:
    """[panels, 4] boxes of each figure of a layout file (rows: path, x0, y0, x1, y1, ...)."""
    boxes = collections.defaultdict(list)
    with open(DATA / "layouts" / name, newline="") as f:
        for row in csv.reader(f):
            boxes[row[0]].append([float(v) for v in row[1:5]])
    return [np.array(b) for b in boxes.values()]


def panel_counts(layout: list[np.ndarray]) -> str:
    counts = np.array([len(boxes) for boxes in layout])
    fit = ", ".join(f"K={k}: {np.mean(counts <= k):.1%} of figures, {np.minimum(counts, k).sum() / counts.sum():.1%}"
                    " of panels" for k in MAXIMA)
    return (f"{len(counts)} figures, {counts.sum()} panels; per figure mean {counts.mean():.2f}, median "
            f"{np.median(counts):g}, p75 {np.percentile(counts, 75):g}, p90 {np.percentile(counts, 90):g}, "
            f"p95 {np.percentile(counts, 95):g}, max {counts.max()}\n    fit whole: {fit}")


def visibility(layout: list[np.ndarray], cfg: samples.SampleConfig, draws: int, rng) -> str:
    shares = []
    for boxes in layout:
        size = int(boxes[:, 2].max()), int(boxes[:, 3].max())
        for _ in range(draws if cfg.train else 1):
            rect = samples.random_rect(*size, rng, cfg) if cfg.train else samples.eval_rect(*size, cfg.image_size)
            shown = samples.shown_box(rect, (0, 0, *size))
            shares += [samples.visible_fraction(box, shown) for box in boxes]
    shares = np.array(shares)
    return (f"paired (>= {cfg.min_visible:g} in view) {np.mean(shares >= cfg.min_visible):.1%}, wholly in view "
            f"{np.mean(shares >= 1 - 1e-9):.1%}, mean area in view {shares.mean():.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5, help="random crops per figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name in LAYOUTS:
        layout = figures(name)
        print(f"{name}: {panel_counts(layout)}")
        print(f"    eval view: {visibility(layout, samples.SampleConfig(), args.draws, rng)}")
        for scale in SCALES:
            cfg = dataclasses.replace(samples.SampleConfig(), train=True, crop_scale=scale)
            print(f"    random resized crop, scale {scale}: {visibility(layout, cfg, args.draws, rng)}")


if __name__ == "__main__":
    main()
