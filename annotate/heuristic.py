"""CPU panel splitter: recursive XY-cuts at background gutters or at straight panel boundaries, then
the pieces grouped into labelled units.

A cut goes where a band of rows (or columns) is all background — the gutter between panels — or,
for panels that touch, where the change across one line stands far above the texture around it
over content on both sides. Each piece is trimmed to its content and split again until nothing cuts.
Lines of text at the figure's top and bottom (a burned-in caption) are peeled off first. The cuts make a
tree whose leaves are sub-images; `annotate.labels` reads the label printed at each leaf, and walking
the tree, leaves with no label of their own join the labelled unit they sit beside in layout order (a
grid of micrographs under one letter is one panel). Where no label is read, a figure stays one panel
unless its parts are clearly separate pictures; where the caption names letters that were not read,
separate parts stay apart (as the panels of the missed letters) when that comes nearer the caption's
count. Panels come back in reading order.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

from annotate.captions import label_key
from annotate.labels import LabelConfig, read_labels


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
    # A gutter this thin (pixels) is crossed, not a cut, where the ink along one side of it is at most this
    # share of the ink along the other, and faces it (`_Splitter._bridged`).
    bridge_gap: int = 3
    bridge_share: float = 0.2
    # Parts of a figure without labels are separate pictures when a gutter parts them and each is a
    # picture (content over this share of its box) of at least this share of the largest one's area.
    picture_fill: float = 0.5
    picture_area_ratio: float = 0.2
    # A text strip (a burned-in caption, a line of the page) at the figure's top or bottom: this many times
    # as wide as high, ink in at least this share of its columns, in glyphs of at most this height, most
    # of them shorter than the line.
    text_aspect: float = 3.0
    text_fill: float = 0.4
    text_max_glyph: int = 40


@dataclasses.dataclass
class Node:
    """A piece of the XY-cut tree: its box, and the pieces a cut along `axis` (0: rows) made of it."""
    box: tuple[int, int, int, int]
    children: list["Node"] = dataclasses.field(default_factory=list)
    axis: int | None = None
    gutter: bool = False  # cut at background gutters, not at touching boundaries


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
        self.background = _background_value(gray)
        self.foreground = np.abs(gray - self.background) > cfg.background_tolerance
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
                if b - a >= self.cfg.min_gutter and a >= min_size and length - b >= min_size
                and not self._bridged(fg, axis, a, b)]

    def _bridged(self, fg: np.ndarray, axis: int, start: int, end: int) -> bool:
        """A thin gutter that a connector crosses (a diagram's arrow stopping short of its box): on one side
        the ink along it is a short stretch (the arrow's end) facing ink across from it (the box's edge),
        where pictures parted by a thin line meet along their whole edges."""
        if end - start > self.cfg.bridge_gap:
            return False
        before, after = (fg[start - 1], fg[end]) if axis == 0 else (fg[:, start - 1], fg[:, end])
        shorter, longer = sorted((int(before.sum()), int(after.sum())))
        return bool((before & after).any()) and shorter <= self.cfg.bridge_share * longer

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

    def split(self, box, depth=0) -> Node | None:
        """The XY-cut tree of a box, None where it holds no panel."""
        box = self.trim(box)
        if box is None:
            return None
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
                    children = [node for piece in pieces if (node := self.split(piece, depth + 1))]
                    if len(children) == 1:
                        return children[0]
                    return Node(box, children, axis, find == "gutter") if children else None
        if (x1 - x0) < self.min_w or (y1 - y0) < self.min_h:
            return None
        if self.foreground[y0:y1, x0:x1].mean() < self.cfg.min_content_fraction:
            return None
        return Node(box)

    def without_text_strips(self, box):
        """The figure's box less the lines of text at its top and bottom (a burned-in caption, a running
        head), peeled one line at a time, however thin: the cuts' minimum panel size would leave them on
        the panels beside them."""
        box = self.trim(box)
        while box is not None:
            x0, y0, x1, y1 = box
            gutters = _runs(~self.foreground[y0:y1, x0:x1].any(axis=1))
            if not gutters:
                return box
            (first_start, first_end), (last_start, last_end) = gutters[0], gutters[-1]
            if self.is_text_strip(self.trim((x0, y0 + last_end, x1, y1))):
                box = self.trim((x0, y0, x1, y0 + last_start))
            elif self.is_text_strip(self.trim((x0, y0, x1, y0 + first_start))):
                box = self.trim((x0, y0 + first_end, x1, y1))
            else:
                return box
        return None

    def is_text_strip(self, box, root=None) -> bool:
        """A line of text (at the top or bottom of `root`, where given): wide, its ink (against its own
        background, a grey caption bar too) only glyph-sized pieces, and those close together, as letters
        are (a row of tick labels is sparse)."""
        x0, y0, x1, y1 = box
        if root is not None and not (y0 <= root[1] + 2 or y1 >= root[3] - 2):
            return False
        if (x1 - x0) < self.cfg.text_aspect * (y1 - y0):
            return False
        piece = self.gray[y0:y1, x0:x1]
        ink = np.abs(piece - np.median(piece)) > 4 * self.cfg.background_tolerance
        pieces = ndimage.find_objects(ndimage.label(ink)[0])
        if len(pieces) < 4 or ink.any(axis=0).mean() < self.cfg.text_fill:
            return False
        heights = [p[0].stop - p[0].start for p in pieces]
        # Most letters stand shorter than their line (ascenders and descenders set its height).
        return max(heights) <= self.cfg.text_max_glyph and np.median(heights) <= 0.8 * (y1 - y0)

    def is_picture(self, box) -> bool:
        x0, y0, x1, y1 = box
        return self.foreground[y0:y1, x0:x1].mean() >= self.cfg.picture_fill


def _union(boxes):
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def leaves(node: Node | None) -> list[tuple[int, int, int, int]]:
    if node is None:
        return []
    return [node.box] if not node.children else [leaf for child in node.children for leaf in leaves(child)]


class _Grouper:
    """Leaves grouped into labelled units along the tree (module docstring)."""

    def __init__(self, splitter: _Splitter, label_of: dict, keep_separate: bool):
        # keep_separate: the caption names labels left unread, so separate parts stay apart even beside a
        # labelled one (they may be the panels whose letters were missed).
        self.splitter, self.label_of, self.keep_separate = splitter, label_of, keep_separate
        self.among = [label for label in label_of.values() if label]

    def separate(self, node: Node, parts: list[list]) -> bool:
        """Whether the parts are separate pictures: parted by gutters, none much smaller than the largest,
        and, in a figure that names no labels, each a picture (a diagram's parts are not)."""
        boxes = [_union([u[0] for u in part]) for part in parts]
        largest = max(_area(b) for b in boxes)
        # Touching panels parted at a sharp boundary count where the caption says panels were missed.
        return (node.gutter or self.keep_separate) and all(_area(b) >= self.splitter.cfg.picture_area_ratio * largest
                                   and (self.keep_separate or self.splitter.is_picture(b)) for b in boxes)

    def units(self, node: Node) -> list[list]:
        """[box, label] of each unit in the node."""
        if not node.children:
            return [[node.box, self.label_of[node.box]]] if node.box in self.label_of else []
        parts = [part for child in node.children if (part := self.units(child))]
        if not parts:
            return []
        labelled = [n for n, part in enumerate(parts) if any(label for _, label in part)]
        keys = {label_key(label, self.among) for n in labelled for _, label in parts[n]}
        separate = self.separate(node, parts)
        if len(keys) <= 1 and not (separate and (not keys or self.keep_separate)):
            every = [u for part in parts for u in part]
            return [[_union([u[0] for u in every]), next((label for _, label in every if label), "")]]
        if not labelled or (separate and self.keep_separate):
            return [u for part in parts for u in part]
        # Unlabelled parts join the labelled part before them (the one after them when they come first),
        # each of their units the unit it lines up with across the cut.
        across = (0, 2) if node.axis == 0 else (1, 3)
        result = []
        for n, part in enumerate(parts):
            if n in labelled:
                result += part
                continue
            before = [m for m in labelled if m < n]
            host = parts[before[-1] if before else labelled[0]]
            for box, _ in part:
                overlap = [min(box[across[1]], h[0][across[1]]) - max(box[across[0]], h[0][across[0]]) for h in host]
                target = host[int(np.argmax(overlap))]
                target[0] = _union([target[0], box])
        return result


def _blank_outside_rows(image: Image.Image, body, splitter: _Splitter) -> Image.Image:
    """The image with the rows above and below the body (the peeled lines of text) painted background:
    a caption's "(A)" is no panel's letter. Blanked rather than cropped, so a letter at the figure's edge
    still has the background around it that reading asks for; the image itself where nothing was peeled
    (no copy per figure)."""
    if not (splitter.foreground[:body[1]].any() or splitter.foreground[body[3]:].any()):
        return image
    pixels = np.array(image.convert("RGB"))
    pixels[:body[1]] = pixels[body[3]:] = int(splitter.background)
    return Image.fromarray(pixels)


def _expected(caption_labels, read_keys: set[str]) -> set[str]:
    """The label keys a figure should show: the caption's, or where it names none, the letters up to the
    last one read ("a", "d" read: a to d)."""
    if named := {label_key(label, caption_labels) for label in caption_labels if label}:
        return named
    letters = [key for key in read_keys if len(key) == 1 and key.isalpha()]
    return {chr(c) for c in range(ord("a"), ord(max(letters)) + 1)} if letters else set()


def panel_units(image: Image.Image, caption_labels=(), cfg: SplitConfig = SplitConfig(),
                label_cfg: LabelConfig = LabelConfig()) -> list[tuple[list[float], str]]:
    """(box, label read) of each labelled unit, in reading order (module docstring)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    splitter = _Splitter(gray, cfg)
    body = splitter.without_text_strips((0, 0, gray.shape[1], gray.shape[0]))
    tree = splitter.split(body) if body is not None else None
    if tree is None:
        return []
    boxes = [box for box in leaves(tree) if not splitter.is_text_strip(box, tree.box)]
    labels = read_labels(_blank_outside_rows(image, body, splitter), boxes, list(caption_labels),
                         label_cfg, in_order=False)
    read_keys = {label_key(label, caption_labels) for label in labels if label}
    label_of, expected = dict(zip(boxes, labels)), _expected(caption_labels, read_keys)
    units = _Grouper(splitter, label_of, keep_separate=False).units(tree)
    if not expected <= read_keys:
        # Letters were missed: separate parts may be their panels. Kept apart where that comes nearer
        # the number of panels the caption names (a labelled panel's sub-images are no missed panels).
        apart = _Grouper(splitter, label_of, keep_separate=True).units(tree)
        if abs(len(apart) - len(expected)) < abs(len(units) - len(expected)):
            units = apart
    by_box = {tuple(box): label for box, label in units}
    return [([float(v) for v in box], by_box[tuple(box)]) for box in reading_order([tuple(b) for b, _ in units])]


def split_panels(image: Image.Image, cfg: SplitConfig = SplitConfig(), caption_labels=(),
                 label_cfg: LabelConfig = LabelConfig()) -> list[list[float]]:
    """Panel boxes [x0, y0, x1, y1] in image pixels, in reading order: the labelled units of
    `panel_units`."""
    return [box for box, _ in panel_units(image, caption_labels, cfg, label_cfg)]


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
