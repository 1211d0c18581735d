"""CPU panel splitter: recursive XY-cuts at background gutters or at straight panel boundaries.

A cut goes where a band of rows (or columns) is all background — the gutter between panels — or,
for panels that touch, where the change across one line stands far above the texture around it
over content on both sides. Each piece is trimmed to its content and split again until nothing cuts.
Panels come back in reading order; `annotate.labels` reads which caption label each one carries.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    background_tolerance: float = 12.0   # grey levels from the background value
    min_gutter: int = 1                  # rows/columns of background that separate panels
    edge_step: float = 12.0              # mean grey-level change across a touching boundary…
    edge_ratio: float = 4.0              # …and how far above the change between nearby lines
    edge_fill: float = 0.5               # share of the line that is content on both sides
    min_panel_fraction: float = 0.08     # of the figure's width/height, per side
    min_panel_pixels: int = 24
    min_content_fraction: float = 0.02   # a piece with less foreground is a stray mark, not a panel
    max_depth: int = 6


def _background_value(gray: np.ndarray) -> float:
    """Figures sit on white, sometimes black: whichever more of the border is."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 0.0 if (border <= 10).mean() > (border >= 245).mean() else 255.0


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2], edges[1::2]))


class _Splitter:
    def __init__(self, gray: np.ndarray, cfg: SplitConfig):
        self.gray, self.cfg = gray, cfg
        self.foreground = np.abs(gray - _background_value(gray)) > cfg.background_tolerance
        h, w = gray.shape
        self.min_w = max(cfg.min_panel_pixels, cfg.min_panel_fraction * w)
        self.min_h = max(cfg.min_panel_pixels, cfg.min_panel_fraction * h)

    def trim(self, box):
        x0, y0, x1, y1 = box
        fg = self.foreground[y0:y1, x0:x1]
        rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
        if len(rows) == 0:
            return None
        return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1

    def _gutter_cuts(self, fg: np.ndarray, axis: int, min_size: float) -> list[int]:
        empty = ~fg.any(axis=1 - axis)  # axis 0: rows of background
        length = len(empty)
        return [(a + b) // 2 for a, b in _runs(empty)
                if b - a >= self.cfg.min_gutter and a >= min_size and length - b >= min_size]

    def _edge_cuts(self, gray: np.ndarray, fg: np.ndarray, axis: int, min_size: float) -> list[int]:
        """Lines where two touching panels meet: across them the change between neighbouring lines
        jumps far above its local level (texture), over the pixels that are content on both sides."""
        if axis == 1:
            gray, fg = gray.T, fg.T
        both = fg[:-1] & fg[1:]  # [n-1, m]
        filled = both.mean(axis=1)
        change = (np.abs(np.diff(gray, axis=0)) * both).sum(axis=1) / np.maximum(both.sum(axis=1), 1)
        cuts = []
        for i in np.flatnonzero((filled >= self.cfg.edge_fill) & (change >= self.cfg.edge_step)):
            cut = int(i) + 1
            if cut < min_size or len(gray) - cut < min_size:
                continue
            window = np.concatenate([change[max(0, i - 8):i], change[i + 1:i + 9]])
            if change[i] >= self.cfg.edge_ratio * max(float(np.median(window)), 1.0):
                cuts.append(cut)
        return [c for n, c in enumerate(cuts) if n == 0 or c - cuts[n - 1] > 1]

    def split(self, box, depth=0) -> list[tuple[int, int, int, int]]:
        box = self.trim(box)
        if box is None:
            return []
        x0, y0, x1, y1 = box
        if depth < self.cfg.max_depth:
            fg, gray = self.foreground[y0:y1, x0:x1], self.gray[y0:y1, x0:x1]
            for axis, find in ((0, "gutter"), (1, "gutter"), (0, "edge"), (1, "edge")):
                min_size = self.min_h if axis == 0 else self.min_w
                cuts = (self._gutter_cuts(fg, axis, min_size) if find == "gutter"
                        else self._edge_cuts(gray, fg, axis, min_size))
                if cuts:
                    bounds = [0, *cuts, (y1 - y0) if axis == 0 else (x1 - x0)]
                    pieces = [(x0, y0 + a, x1, y0 + b) if axis == 0 else (x0 + a, y0, x0 + b, y1)
                              for a, b in zip(bounds[:-1], bounds[1:])]
                    return [leaf for piece in pieces for leaf in self.split(piece, depth + 1)]
        if (x1 - x0) < self.min_w or (y1 - y0) < self.min_h:
            return []
        if self.foreground[y0:y1, x0:x1].mean() < self.cfg.min_content_fraction:
            return []
        return [box]


def split_panels(image: Image.Image, cfg: SplitConfig = SplitConfig()) -> list[list[float]]:
    """Panel boxes [x0, y0, x1, y1] in image pixels, in reading order."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    splitter = _Splitter(gray, cfg)
    boxes = splitter.split((0, 0, gray.shape[1], gray.shape[0]))
    return [[float(v) for v in box] for box in reading_order(boxes)]


def reading_order(boxes):
    """Rows first (boxes whose vertical spans overlap by half share a row), then left to right."""
    rows: list[list] = []
    for box in sorted(boxes, key=lambda b: (b[1], b[0])):
        for row in rows:
            top, bottom = min(b[1] for b in row), max(b[3] for b in row)
            overlap = min(bottom, box[3]) - max(top, box[1])
            if overlap >= 0.5 * min(box[3] - box[1], bottom - top):
                row.append(box)
                break
        else:
            rows.append([box])
    return [box for row in rows for box in sorted(row, key=lambda b: b[0])]


def panel_kind(image: Image.Image, box) -> str:
    """'chart' when the crop is mostly flat background with few colours, else 'photo'."""
    crop = np.asarray(image.crop(tuple(int(v) for v in box)).convert("RGB").resize((64, 64)), dtype=np.int16)
    flat = (np.abs(crop - crop.reshape(-1, 3).max(0)).max(-1) < 12).mean()
    colours = len(np.unique((crop // 32).reshape(-1, 3), axis=0))
    return "chart" if flat > 0.45 and colours < 24 else "photo"
