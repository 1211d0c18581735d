"""Panel-label reader for the CPU backend: which of the caption's labels is printed in each panel.

No OCR engine: the caption already says which labels exist, so reading is a choice among a few
known strings. Candidates are isolated glyph groups in a panel's top and bottom bands (ink with
background all around, either polarity); each is compared with the caption's labels rendered in Pillow's
bundled font at several stroke weights (shape correlation after normalising size and position),
and panels get labels by a one-to-one assignment. Panels left without a confident glyph fall back
to reading order when the counts agree.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.morphology import convex_hull_image

from annotate.captions import label_key

GLYPH = 24  # side of the normalised glyph, in pixels
GLYPH_BLUR = 1.5  # Gaussian sigma: forgives stroke-weight and serif differences between typefaces


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    band_fraction: float = 0.3       # top and bottom bands searched, as a share of the panel's height…
    band_outside: float = 0.15       # …and how far they reach outside it
    min_height: int = 5              # glyph height in pixels…
    max_height_fraction: float = 0.3  # …and at most this share of the panel's shorter side
    max_width_ratio: float = 1.6     # of one character's width to its height
    max_fill: float = 0.8            # share of its box a glyph's ink fills at most, unless it is a bar…
    max_fill_width: float = 0.5      # …narrower than this share of its height ("I", "l", "1")
    ring: int = 1                    # background pixels required around a candidate
    ring_ink_fraction: float = 0.1   # ink allowed in that ring
    min_score: float = 0.55          # correlation with the rendered label to accept a reading of a caption label…
    confident_score: float = 0.75    # …and of a letter the caption does not name,
    confident_margin: float = 0.05   # that far above its next best reading,
    apart_margin: float = 0.3        # with background this share of its height all around…
    apart_ink_fraction: float = 0.02  # …holding at most this share of ink
    disc_fill: float = 0.7           # a circled label: its filled disc covers this share of its box…
    disc_holes: float = 0.1          # …the letter's holes this share of the disc…
    disc_letter_solidity: float = 0.7  # …and at most this share of their convex hull


@functools.lru_cache(maxsize=None)
def _template(label: str, stroke: int) -> tuple[np.ndarray, float]:
    font = ImageFont.load_default(size=64)
    canvas = Image.new("L", (64 * (len(label) + 1), 128), 0)
    ImageDraw.Draw(canvas).text((32, 32), label, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return _normalise(np.asarray(canvas) > 127)


def _normalise(ink: np.ndarray) -> tuple[np.ndarray, float]:
    """Ink cropped to its extent, centred on a square, resized to GLYPH², zero-mean unit-norm;
    and its log aspect ratio (the square hides it: "i", "l" and "f" all become a bar)."""
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = ink.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = ink * 255
    glyph = np.asarray(Image.fromarray(square).resize((GLYPH, GLYPH), Image.BILINEAR), np.float32)
    glyph = ndimage.gaussian_filter(glyph, GLYPH_BLUR)
    glyph -= glyph.mean()
    return glyph / max(float(np.linalg.norm(glyph)), 1e-6), float(np.log(w / h))


def label_scores(ink: np.ndarray, labels: list[str], aspect_weight: float = 0.5) -> list[float]:
    """Per label: the best shape correlation of a glyph's ink mask with the label rendered at any
    stroke weight, less `aspect_weight` per unit of log aspect-ratio difference."""
    glyph, aspect = _normalise(ink)
    return [max(float((glyph * template).sum()) - aspect_weight * abs(aspect - template_aspect)
                for template, template_aspect in (_template(label, stroke) for stroke in (0, 2, 4)))
            for label in labels]


def _edge_bands(box, width: int, height: int, cfg: LabelConfig):
    """The panel's top and bottom bands, where nearly all printed panel labels sit, reaching a
    little outside the box (labels sit just outside panels, or the split trimmed through one)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside, outside = max(1, int((y1 - y0) * cfg.band_fraction)), int((y1 - y0) * cfg.band_outside)
    for top, bottom in ((y0 - outside, y0 + inside), (y1 - inside, y1 + outside)):
        yield max(0, x0 - outside), max(0, top), min(width, x1 + outside), min(height, bottom)


def glyph_candidates(gray: np.ndarray, box, cfg: LabelConfig = LabelConfig()) -> list[tuple[np.ndarray, tuple, bool]]:
    """(ink mask, centre x/y in the image, whether it stands well apart) of each isolated glyph group in
    the box's edge bands. A light disc or square with dark holes (a circled label) gives its holes: the
    letter, not the disc."""
    x0, y0, x1, y1 = box
    max_height = cfg.max_height_fraction * min(x1 - x0, y1 - y0)
    candidates = []
    for wx0, wy0, wx1, wy1 in _edge_bands(box, gray.shape[1], gray.shape[0], cfg):
        window = gray[wy0:wy1, wx0:wx1]
        if window.size == 0 or int(window.max()) - int(window.min()) < 64:
            continue
        threshold = (int(window.max()) + int(window.min())) / 2
        for ink in (window < threshold, window > threshold):
            components, _ = ndimage.label(ink, structure=np.ones((3, 3)))
            pieces = [(n + 1, b) for n, b in enumerate(ndimage.find_objects(components))
                      if 2 <= b[0].stop - b[0].start <= max_height]
            for group in _glyph_groups(pieces):
                found = _isolated_ink(ink, components, group, cfg)
                if found is None:
                    continue
                mask, (gy, gx), apart = found
                h, w = mask.shape
                if h < cfg.min_height or w > cfg.max_width_ratio * h * len(group):
                    continue  # neither a glyph nor a circled one
                mask, (gy, gx) = _circled(mask, (gy, gx), cfg)
                h, w = mask.shape
                if mask.mean() > cfg.max_fill and w > cfg.max_fill_width * h:
                    continue  # a filled patch (a label's backing box, a blob): no letter fills its box
                if cfg.min_height <= h <= max_height and w <= cfg.max_width_ratio * h * len(group):
                    candidates.append((mask, (wx0 + gx + w / 2, wy0 + gy + h / 2), apart))
    return candidates


def _circled(mask: np.ndarray, origin: tuple[int, int], cfg: LabelConfig):
    """The letter inside a filled disc or square (its holes), else the mask itself; with its top-left.
    The holes of a letter's own counters ("D", "o") are convex blobs; a letter's strokes are not."""
    filled = ndimage.binary_fill_holes(mask)
    letter = filled & ~mask & ~ndimage.binary_dilation(~filled)  # not the anti-aliased rim
    if filled.mean() < cfg.disc_fill or letter.sum() < cfg.disc_holes * filled.sum():
        return mask, origin
    if letter.sum() > cfg.disc_letter_solidity * convex_hull_image(letter).sum():
        return mask, origin
    rows, cols = np.flatnonzero(letter.any(1)), np.flatnonzero(letter.any(0))
    return (letter[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1],
            (origin[0] + int(rows[0]), origin[1] + int(cols[0])))


def _isolated_ink(ink: np.ndarray, components: np.ndarray, group: list, cfg: LabelConfig):
    """The group's ink cropped to its extent, that extent's top-left (y, x), and whether a wide margin of
    background surrounds it, when at least a thin ring of background does."""
    ys = slice(min(b[0].start for _, b in group), max(b[0].stop for _, b in group))
    xs = slice(min(b[1].start for _, b in group), max(b[1].stop for _, b in group))
    member = ink[ys, xs] & np.isin(components[ys, xs], [n for n, _ in group])
    rows, cols = np.flatnonzero(member.any(1)), np.flatnonzero(member.any(0))
    y0, y1, x0, x1 = ys.start + rows[0], ys.start + rows[-1] + 1, xs.start + cols[0], xs.start + cols[-1] + 1
    if _ring_ink(ink, (y0, y1, x0, x1), cfg.ring) > cfg.ring_ink_fraction:
        return None
    margin = max(cfg.ring, int(round(cfg.apart_margin * (y1 - y0))))
    apart = _ring_ink(ink, (y0, y1, x0, x1), margin) <= cfg.apart_ink_fraction
    return member[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], (y0, x0), apart


def _ring_ink(ink: np.ndarray, extent, r: int) -> float:
    """Share of ink in the ring `r` pixels wide around an extent; 1 where the ring leaves the window
    (cannot tell it stands alone)."""
    y0, y1, x0, x1 = extent
    if y0 < r or x0 < r or y1 + r > ink.shape[0] or x1 + r > ink.shape[1]:
        return 1.0
    outer, inner = ink[y0 - r:y1 + r, x0 - r:x1 + r], ink[y0:y1, x0:x1]
    return float(outer.sum() - inner.sum()) / max(outer.size - inner.size, 1)


def label_vocabulary(caption_labels: list[str], panels: int) -> list[str]:
    """What a glyph may read as: the caption's labels, and the first letters of the alphabet (as many as
    panels, and two more) in the caption's case, or in both where its labels give none."""
    letters = [c for c in caption_labels if c.isalpha() and len(c) == 1]
    count = min(26, max(panels, len(caption_labels)) + 2)
    first = [chr(ord("a") + n) for n in range(count)]
    if letters and all(c.isupper() for c in letters):
        cases = [first_.upper() for first_ in first]
    elif letters and all(c.islower() for c in letters):
        cases = first
    else:
        cases = first + [c.upper() for c in first]
    return list(dict.fromkeys([*caption_labels, *cases]))


def _owner(centre, corners: np.ndarray) -> int:
    """The panel a glyph labels: one that contains it, else the one with the nearest of the two places a
    label outside its panel sits: above-left of its top-left corner, or centred under it. Not the nearest
    corner of any kind: a chart trimmed to its axes leaves its letter in the gutter, nearer the bottom-left
    corner of the panel above. Of the real zou layouts' label boxes outside every unit found (composites'
    tune slice), these two places name the right panel for 121 of 145, the top-left corner alone for 116,
    the nearest corner for 86."""
    cx, cy = centre
    inside = (corners[:, 0] <= cx) & (cx <= corners[:, 2]) & (corners[:, 1] <= cy) & (cy <= corners[:, 3])
    if inside.any():
        return int(np.argmax(inside))
    top_left = np.hypot(corners[:, 0] - cx, corners[:, 1] - cy)
    under = np.hypot((corners[:, 0] + corners[:, 2]) / 2 - cx, corners[:, 3] - cy)
    return int(np.argmin(np.minimum(top_left, under)))


def read_labels(image: Image.Image, boxes: list, caption_labels: list[str],
                cfg: LabelConfig = LabelConfig(), in_order: bool = True) -> list[str]:
    """The label printed in each panel ("" where none is read). Each glyph labels one panel (`_owner`).
    A glyph reads as one of the caption's labels when it matches it well enough, or as another letter
    (`label_vocabulary`) when it matches that confidently and stands well apart: a clear glyph wins over
    the caption. Labels are assigned one to one; with `in_order`, panels left without one take the
    caption's remaining labels in reading order when the counts agree (`fill_in_order`)."""
    labels = list(dict.fromkeys(label for label in caption_labels if label))
    if not boxes:
        return []
    vocabulary = label_vocabulary(labels, len(boxes))
    keys = [label_key(label, labels) for label in vocabulary]
    named = np.array([label in labels for label in vocabulary])
    gray = np.asarray(image.convert("L"))
    scores = np.full((len(boxes), len(vocabulary)), -1.0)
    corners = np.asarray(boxes, dtype=np.float64)
    seen = set()
    for box in boxes:
        for ink, centre, apart in glyph_candidates(gray, box, cfg):
            if (where := (round(centre[0]), round(centre[1]), ink.shape)) in seen:
                continue  # found again from a neighbour's bands
            seen.add(where)
            read = np.asarray(label_scores(ink, vocabulary))
            order = np.argsort(-read)
            runner_up = next((read[j] for j in order[1:] if keys[j] != keys[order[0]]), -1.0)
            confident = apart and read[order[0]] >= cfg.confident_score and read[order[0]] - runner_up >= cfg.confident_margin
            read = np.where(named | (confident & (np.arange(len(read)) == order[0])), read, -1.0)
            owner = _owner(centre, corners)
            scores[owner] = np.maximum(scores[owner], read)
    read = [""] * len(boxes)
    for i, j in zip(*linear_sum_assignment(-scores)):
        if scores[i, j] >= cfg.min_score and label_key(vocabulary[j], labels) not in {label_key(r, labels) for r in read}:
            read[i] = vocabulary[j]
    return fill_in_order(read, labels) if in_order else read


def fill_in_order(read: list[str], caption_labels: list[str]) -> list[str]:
    """Panels without a label read take the caption's labels not read, in reading order, when as many
    are left as panels."""
    labels = [label for label in caption_labels if label]
    taken = {label_key(r, labels) for r in read if r}
    rest = list(dict.fromkeys(label for label in labels if label_key(label, labels) not in taken))
    if len(rest) != read.count(""):
        return read
    rest = iter(rest)
    return [label or next(rest) for label in read]


def _glyph_groups(pieces: list, max_pieces: int = 3) -> list[list]:
    """Each ink piece alone, and runs of up to `max_pieces` that form one label: side by side on
    a line ("A1", "2b") or stacked (the dot of an "i", a small "b" whose stem and bowl threshold
    apart)."""
    ordered = sorted(pieces, key=lambda piece: piece[1][1].start)
    groups = [[piece] for piece in ordered]
    for n, first in enumerate(ordered):
        run, (ys, xs) = [first], first[1]
        for other in ordered[n + 1:n + max_pieces]:
            oy, ox = other[1]
            heights = (ys.stop - ys.start, oy.stop - oy.start)
            v_overlap = min(ys.stop, oy.stop) - max(ys.start, oy.start)
            beside = 0 <= ox.start - xs.stop <= 0.6 * max(heights) and v_overlap >= 0.5 * min(heights)
            stacked = ox.start < xs.stop and v_overlap >= -0.3 * max(heights)
            if not (beside or stacked):
                break
            run = [*run, other]
            ys = slice(min(ys.start, oy.start), max(ys.stop, oy.stop))
            xs = slice(xs.start, max(xs.stop, ox.stop))
            groups.append(run)
    return groups
