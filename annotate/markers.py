"""CPU marker finder: solid-colour, white and black arrows and asterisks in a panel (path A of the
region mining, docs/design.md §3).

Authors draw arrows in one saturated colour that stands out from the picture, or in white or black on
grey images. So: pixels that are strongly saturated, grouped into connected components of one hue, and
near-white and near-black grey pixels grouped apart; a component is an arrow when it
is about one colour, elongated, and its width along the principal axis is clearly larger at one end
(the head) than along the rest (the shaft). That width asymmetry is what tells an arrow from a bar,
a chart line or a stained patch of tissue, whatever way the arrow points (so charts need no
special case: on the synthetic figures, skipping chart panels changed nothing). A component that is
not an arrow is an asterisk when it is small, about as wide as high, and a circle around its centre
crosses five to eight strokes, evenly spaced, that meet there (letters and digits cross fewer, or
unevenly, or not at their centre). An asterisk has no tip: its region is the area around it.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.measure import label, regionprops


@dataclasses.dataclass(frozen=True)
class MarkerConfig:
    min_chroma: int = 80                  # max-min of R, G, B: grey, white and black pixels are not a colour marker…
    max_grey_chroma: int = 30             # …but pixels this close to grey and as light or dark as these
    white_level: int = 225                # are white and black markers
    black_level: int = 30
    contrast_ring: int = 3                # pixels around a white or black component…
    min_contrast: int = 70                # …that are on average this much darker or lighter than it
    min_saturation: float = 0.65          # chroma / max channel: pastel and brownish tissue stays out
    hue_bins: int = 12                    # components are of one hue bin; bins are centred on pure hues (red, yellow…)
    min_length: float = 15.0              # pixels along the principal axis, at least
    min_length_fraction: float = 0.03     # of the panel's shorter side, at least…
    max_length_fraction: float = 0.6      # …and of its longer side, at most
    min_area: int = 40                    # pixels; fewer cannot show a shaft and a head, or five strokes
    colour_tolerance: int = 24            # a pixel is the marker's colour within this of its median (per channel)
    min_inside: int = 8                   # pixels off the outline needed to judge colour there, else all count
    min_uniform_fraction: float = 0.85    # share of those pixels that is the marker's colour
    min_elongation: float = 2.5           # major / minor axis length
    max_solidity: float = 0.75            # area / convex hull area: a head on a thin shaft leaves the hull half empty
    profile_bins: int = 10                # width samples along the principal axis
    head_fraction: float = 0.4            # the end of the axis searched for the head…
    shaft_fraction: float = 0.5           # …and the other end, whose median width is the shaft's
    min_head_ratio: float = 1.8           # head width / shaft width
    max_shaft_width: float = 0.3          # shaft width / length: thicker is a blob, not an arrow
    max_shaft_variation: float = 1.6      # widest / narrowest shaft sample: a shaft is a straight stroke
    min_asterisk_side: int = 8            # pixels: smaller cannot show its strokes…
    max_asterisk_fraction: float = 0.2    # …and at most this share of the panel's shorter side
    max_asterisk_aspect: float = 1.5      # longer / shorter side of its box
    asterisk_arms: tuple[int, int] = (5, 8)  # strokes a circle around its centre crosses
    asterisk_circle: float = 0.65         # that circle's radius, as a share of half the box's longer side
    max_arm_gap_ratio: float = 1.8        # widest / narrowest gap between strokes: evenly spaced


@functools.lru_cache(maxsize=4)
def _colour_table(cfg: MarkerConfig) -> np.ndarray:
    """Hue bin (1..hue_bins, bin 1 centred on red) of every colour at 6 bits per channel, 0 where it is
    not saturated enough. A look-up per pixel is several times cheaper than converting the panel to HSV."""
    levels = np.arange(64) * 4 + 2
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    hsv = rgb2hsv(colours.astype(np.uint8))[:, 0]
    hue, saturation, value = hsv[:, 0] * 360, hsv[:, 1], hsv[:, 2] * 255
    width = 360 / cfg.hue_bins
    bins = ((hue + width / 2) % 360 // width).astype(np.uint8) + 1
    saturated = (saturation >= cfg.min_saturation) & (saturation * value >= cfg.min_chroma)
    return np.where(saturated, bins, 0).astype(np.uint8)


def _arrow_score(region, pixels: np.ndarray, panel_short: float, panel_long: float,
                 cfg: MarkerConfig) -> tuple[float, np.ndarray | None]:
    """(0, None) when the component is not an arrow, else (a confidence in (0, 1], the (row, col) of
    its tip: the head's farthest pixel along the axis). Cheap tests first."""
    top, left, bottom, right = region.bbox
    min_length = max(cfg.min_length, cfg.min_length_fraction * panel_short)
    if np.hypot(bottom - top, right - left) < min_length:
        return 0.0, None
    # Principal axes from the pixels' covariance, as regionprops' axis lengths define them; its
    # moment-based route costs more than everything else here together.
    coords = region.coords
    offsets = coords - coords.mean(axis=0)
    variances, axes = np.linalg.eigh(offsets.T @ offsets / len(offsets))
    length, breadth = 4 * np.sqrt(np.maximum(variances[::-1], 0))
    if not min_length <= length <= cfg.max_length_fraction * panel_long:
        return 0.0, None
    if length < cfg.min_elongation * max(breadth, 1.0):
        return 0.0, None
    along = offsets @ axes[:, 1]
    span = along.max() - along.min() + 1
    index = np.minimum(((along - along.min()) / span * cfg.profile_bins).astype(int), cfg.profile_bins - 1)
    width = np.bincount(index, minlength=cfg.profile_bins) / (span / cfg.profile_bins)
    n_head = max(1, round(cfg.head_fraction * cfg.profile_bins))
    n_shaft = max(1, round(cfg.shaft_fraction * cfg.profile_bins))
    tip = coords[np.argmax(along)]
    if width[-n_head:].max() < width[:n_head].max():
        width, tip = width[::-1], coords[np.argmin(along)]
    head, shaft = width[-n_head:].max(), max(float(np.median(width[:n_shaft])), 1.0)
    # The tail's end sample is cut obliquely for a slanted arrow, so the shaft's evenness skips it.
    stroke = width[1:n_shaft]
    ratio = head / shaft
    if (ratio < cfg.min_head_ratio or shaft > cfg.max_shaft_width * span
            or stroke.max() > cfg.max_shaft_variation * max(stroke.min(), 0.5)):
        return 0.0, None
    uniform = _uniform_share(region, pixels, cfg)
    if uniform < cfg.min_uniform_fraction or region.solidity > cfg.max_solidity:
        return 0.0, None
    return float(uniform * min(1.0, ratio / (2 * cfg.min_head_ratio))), tip


def _uniform_share(region, pixels: np.ndarray, cfg: MarkerConfig) -> float:
    """The share of the component's pixels that are its median colour. Colour is judged inside the
    outline: JPEG smears a marker's edge pixels into the background."""
    top, left, bottom, right = region.bbox
    inside = ndimage.binary_erosion(region.image)
    colours = pixels[top:bottom, left:right][inside if inside.sum() >= cfg.min_inside else region.image]
    colours = colours.astype(np.int16)
    return float((np.abs(colours - np.median(colours, axis=0)).max(axis=1) <= cfg.colour_tolerance).mean())


def _asterisk_score(region, pixels: np.ndarray, panel_short: float, cfg: MarkerConfig) -> float:
    """0 when the component is not an asterisk, else a confidence in (0, 1]."""
    height, width = region.image.shape
    if not cfg.min_asterisk_side <= max(height, width) <= cfg.max_asterisk_fraction * panel_short:
        return 0.0
    if max(height, width) > cfg.max_asterisk_aspect * min(height, width):
        return 0.0
    # The pixels' centroid, not the box's centre: an odd number of strokes sits off-centre in its box.
    centre_row, centre_col = region.centroid_local
    if not region.image[round(centre_row), round(centre_col)]:
        return 0.0  # the strokes meet at the centre
    radius = cfg.asterisk_circle * max(height, width) / 2
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    rows = np.clip(np.round(centre_row + radius * np.sin(angles)).astype(int), 0, height - 1)
    cols = np.clip(np.round(centre_col + radius * np.cos(angles)).astype(int), 0, width - 1)
    on = region.image[rows, cols]
    if on.all():
        return 0.0
    on = np.roll(on, -int(np.argmin(on)))  # start off a stroke, so no stroke wraps around
    starts, ends = np.flatnonzero(on & ~np.roll(on, 1)), np.flatnonzero(on & ~np.roll(on, -1))
    if not cfg.asterisk_arms[0] <= len(starts) <= cfg.asterisk_arms[1]:
        return 0.0
    middles = (starts + ends) / 2  # each stroke's direction, as a sample index
    gaps = np.diff(np.append(middles, middles[0] + len(angles)))
    if gaps.max() > cfg.max_arm_gap_ratio * gaps.min():
        return 0.0
    uniform = _uniform_share(region, pixels, cfg)
    return uniform if uniform >= cfg.min_uniform_fraction else 0.0


def _stands_out(region, value: np.ndarray, lightness: int, cfg: MarkerConfig) -> bool:
    """A white (lightness 1) or black (-1) component is drawn on the picture, not a light or dark patch
    of it, when the pixels just around it are far darker (lighter) than it; black on white paper is
    text or line art (tick labels, letters, a diagram's lines), not a marker on a picture."""
    top, left, bottom, right = region.bbox
    r = cfg.contrast_ring
    y0, x0 = max(0, top - r), max(0, left - r)
    window = value[y0:bottom + r, x0:right + r]
    inside = np.zeros(window.shape, bool)
    inside[top - y0:bottom - y0, left - x0:right - x0] = region.image
    ring = ndimage.binary_dilation(inside, iterations=r) & ~inside
    if not ring.any() or (lightness < 0 and np.median(window[ring]) >= cfg.white_level):
        return False
    return lightness * (window[inside].mean() - window[ring].mean()) >= cfg.min_contrast


def find_markers(image: Image.Image, panel_box, cfg: MarkerConfig = MarkerConfig()) -> list[dict]:
    """Arrows and asterisks in one panel: {"box": [x0, y0, x1, y1] and "tip" in image pixels ([x, y];
    None for an asterisk), "kind": "arrow" or "asterisk", "score"}."""
    x0, y0, x1, y1 = (int(round(v)) for v in panel_box)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return []
    pixels = np.asarray(image.crop((x0, y0, x1, y1)).convert("RGB"))
    coarse = pixels >> 2
    code = coarse[..., 0].astype(np.uint32) << 12
    code |= coarse[..., 1].astype(np.uint32) << 6
    code |= coarse[..., 2]
    hues = _colour_table(cfg)[code]
    # White and black arrows, as on grey radiographs and MRI: near-white or near-black pixels without
    # colour, each its own layer (they never join a hue's component).
    grey = pixels.astype(np.int16)
    achromatic = (grey.max(axis=-1) - grey.min(axis=-1)) <= cfg.max_grey_chroma
    value = grey.mean(axis=-1)
    layers = [(label(hues, background=0, connectivity=2), 0),
              (label(achromatic & (value >= cfg.white_level), connectivity=2), 1),
              (label(achromatic & (value <= cfg.black_level), connectivity=2), -1)]
    short, long = min(x1 - x0, y1 - y0), max(x1 - x0, y1 - y0)
    markers = []
    for components, lightness in layers:
        # Components too small to be an arrow are dropped before regionprops measures anything.
        keep = np.bincount(components.ravel()) >= cfg.min_area
        keep[0] = False
        components *= keep[components]
        for region in regionprops(components):
            score, tip = _arrow_score(region, pixels, short, long, cfg)
            kind = "arrow"
            if not score:
                score, kind = _asterisk_score(region, pixels, short, cfg), "asterisk"
            if score > 0 and (lightness == 0 or _stands_out(region, value, lightness, cfg)):
                top, left, bottom, right = region.bbox
                markers.append({"box": [float(x0 + left), float(y0 + top), float(x0 + right), float(y0 + bottom)],
                                "tip": None if tip is None else [float(x0 + tip[1]), float(y0 + tip[0])],
                                "kind": kind, "score": score})
    return markers
