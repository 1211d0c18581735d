"""Synthetic compound figures with ground truth, for the demo and for measuring the annotators.

Layouts are random grids or real ones from a CSV shaped like ../shared/data/layouts/zou_train.csv
(path,px1,py1,px2,py2,panel,lx1,ly1,lx2,ly2,label; no header; empty label columns for a panel with
no letter) or, with no label columns at all, like clef2016_train.csv (path,x1,y1,x2,y2,panel).
Panels are filled with real pictures that ship inside scikit-image (IHC stain, fluorescent cells,
fundus, microaneurysms, a CT phantom), optional MedMNIST arrays, or procedurally drawn charts; panel
letters are drawn in their label boxes; arrows point at objects; and each caption says what is drawn
(kind, stain, colour, count), so a model can learn from it.

What real figures hold and one picture per panel would hide is drawn too: a labelled panel made of
two or three sub-images (one letter for them all), plots with axes, ticks and tick labels, diagrams
whose boxes are joined by black arrows (line art, not markers), white and black arrows on grey
pictures, asterisks beside what they mark, circled labels (a letter in a disc), and a burned-in
caption strip under the panels (`text_strips` in the truth: text, not a panel).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from zoomin_jax.errors import UserError

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "orange": (230, 130, 20),
           "purple": (120, 50, 160), "yellow": (255, 235, 0), "cyan": (0, 210, 230)}
# Arrows in colours that stand out on the pictures; region texts name the colour and what is under it.
ARROW_COLOURS = ("yellow", "cyan", "red", "green")
GREY_ARROW_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}  # on grey pictures, as on MRI and X-ray
SUB_IMAGES = 0.25      # share of photo panels made of several sub-images
CIRCLED_LABELS = 0.3   # share of figures whose letters sit in discs
CAPTION_STRIP = 0.3    # share of figures with a burned-in caption strip under the panels
ASTERISKS = 0.3        # share of markers that are asterisks beside the object rather than arrows at it
DIAGRAMS = 0.1         # share of panels that are diagrams: boxes joined by arrows
DIAGRAM_WORDS = ("ligand", "receptor", "kinase", "transcription", "cytokine", "inflammation", "fibrosis",
                 "apoptosis", "stem cell", "progenitor", "neuron", "T cell")


@dataclasses.dataclass
class Layout:
    name: str
    width: int
    height: int
    panels: list[tuple[list[float], list[float] | None, str]]  # (panel box, label box, label)


class Picture(NamedTuple):
    pixels: np.ndarray
    description: str
    grey: bool  # decided once per picture: testing the whole picture per panel was a third of synthesis


@functools.lru_cache(maxsize=1)
def _pictures() -> dict[str, Picture]:
    from skimage import data
    from skimage.data import shepp_logan_phantom
    phantom = (shepp_logan_phantom() * 255).astype(np.uint8)
    pictures = {"ihc": (data.immunohistochemistry(), "immunohistochemistry of tissue with brown DAB stain"),
                "cells": (data.cell(), "phase-contrast micrograph of cells"),
                "fundus": (data.retina(), "fundus photograph of the retina"),
                "microaneurysms": (data.microaneurysms(), "fundus detail with microaneurysms"),
                "phantom": (phantom, "axial CT slice of a head phantom")}
    return {name: Picture(pixels, description, _is_grey(pixels)) for name, (pixels, description) in pictures.items()}


_LAYOUT_FIELDS = {6: "path,x1,y1,x2,y2,panel", 11: "path,x1,y1,x2,y2,panel,lx1,ly1,lx2,ly2,label"}


def _box(values: list[str], what: str, where: str) -> list[float]:
    try:
        box = [float(v) for v in values]
    except ValueError:
        box = []
    if not (len(box) == 4 and all(np.isfinite(box)) and box[0] < box[2] and box[1] < box[3]):
        raise UserError(f"{where}: the {what} {','.join(values)} is not four numbers x1,y1,x2,y2 with x1 < x2 "
                        f"and y1 < y2; fix or remove that row")
    return box


def _layout_panel(row: list[str], where: str) -> tuple[list[float], list[float] | None, str]:
    """One CSV row as (panel box, label box or None, label); UserError naming `where` if malformed."""
    if len(row) not in _LAYOUT_FIELDS:
        shapes = " or ".join(f"{n} fields ({fields})" for n, fields in _LAYOUT_FIELDS.items())
        raise UserError(f"{where}: a layout row has {shapes}, this one {len(row)}; fix or remove that row")
    box = _box(row[1:5], "panel box", where)
    if len(row) == 6 or not any(row[6:11]):  # CLEF rows, and zou rows of a panel with no letter
        return box, None, ""
    return box, _box(row[6:10], "label box", where), row[10]


def load_layouts(csv_path: str | Path, margin: int = 4) -> list[Layout]:
    """Figures of a layout CSV (zou_train or clef2016_train shaped, see the module docstring); the canvas
    is the panels' extent plus a margin. UserError naming file and line of a malformed row."""
    rows = collections.defaultdict(list)
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if row:  # not a blank line
                rows[row[0]].append(_layout_panel(row, f"{csv_path}:{reader.line_num}"))
    layouts = []
    for name, panels in rows.items():
        # Zou's labels write a lowercase figure's "c" as "C" (they look alike); a real caption and
        # the drawn letter would agree, so use the figure's majority case throughout.
        letters = [label for _, _, label in panels if label.isalpha()]
        lower = sum(label.islower() for label in letters) * 2 > len(letters)
        panels = [(box, label_box, label.lower() if lower else label.upper() if letters else label)
                  for box, label_box, label in panels]
        width = int(max(p[0][2] for p in panels)) + margin
        height = int(max(p[0][3] for p in panels)) + margin
        layouts.append(Layout(name, width, height, panels))
    return layouts


def grid_layout(rng: np.random.Generator, name: str) -> Layout:
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    cell, gap = int(rng.integers(160, 260)), int(rng.integers(6, 20))
    panels = []
    for n in range(rows * cols):
        r, c = divmod(n, cols)
        x0, y0 = gap + c * (cell + gap), gap + r * (cell + gap)
        label = "ABCDEFGH"[n]
        panels.append(([x0, y0, x0 + cell, y0 + cell], [x0 + 4, y0 + 4, x0 + 30, y0 + 30], label))
    return Layout(name, gap + cols * (cell + gap), gap + rows * (cell + gap), panels)


# Panel letters are drawn in several typefaces, so the CPU label reader (whose templates use
# Pillow's bundled font) is measured on faces it has not seen. DejaVu ships with most Linux
# systems; where a face is missing, Pillow's bundled font stands in.
LABEL_FONTS = ("pillow-default", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSans.ttf",
               "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed-Bold.ttf")


def _font(name: str, size: int) -> tuple[ImageFont.FreeTypeFont, str]:
    if name != "pillow-default":
        try:
            return ImageFont.truetype(name, max(8, size)), name
        except OSError:
            pass
    return ImageFont.load_default(size=max(8, size)), "pillow-default"


def _fill_picture(rng, picture: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A random crop of the picture, with the panel's aspect ratio, resized to fill the panel."""
    w, h = size
    ph, pw = picture.shape[:2]
    scale = rng.uniform(0.5, 1.0) * min(pw / w, ph / h)
    cw, ch = max(2, int(w * scale)), max(2, int(h * scale))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    return Image.fromarray(picture[y:y + ch, x:x + cw]).convert("RGB").resize((w, h), Image.BILINEAR)


def _draw_chart(rng, size: tuple[int, int], ticks: bool = True) -> tuple[Image.Image, str]:
    """A bar chart or line plot with axes, and with ticks and tick labels unless told not to."""
    w, h = size
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = ((int(w * 0.16), int(h * 0.08), int(w * 0.96), int(h * 0.84)) if ticks
                                else (int(w * 0.1), int(h * 0.08), int(w * 0.96), int(h * 0.9)))
    axis = max(1, w // 150)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=axis)
    tick_font, _ = _font("DejaVuSans.ttf", max(8, min(w, h) // 18))
    for n in range(5 if ticks else 0):  # y ticks 0, 25, ... 100
        y = bottom - n * (bottom - top) / 4
        draw.line([(left - 4, y), (left, y)], fill="black", width=axis)
        draw.text((left - 6, y), str(25 * n), fill="black", anchor="rm", font=tick_font)
    colour = str(rng.choice(list(COLOURS)))
    count = int(rng.integers(2, 7))
    if rng.random() < 0.5:
        step = (right - left) / count
        for n in range(count):
            bar_top = bottom - (bottom - top) * rng.uniform(0.2, 0.95)
            draw.rectangle([left + n * step + step * 0.2, bar_top, left + (n + 1) * step - step * 0.2, bottom],
                           fill=COLOURS[colour])
            if ticks:
                draw.text((left + (n + 0.5) * step, bottom + 4), str(n + 1), fill="black", anchor="mt", font=tick_font)
        return image, f"bar chart of {count} groups in {colour}"
    xs = np.linspace(left + 4, right, count + 2)
    ys = bottom - (bottom - top) * rng.uniform(0.1, 0.95, size=count + 2)
    draw.line(list(zip(xs, ys)), fill=COLOURS[colour], width=max(2, w // 100))
    for n, x in enumerate(xs if ticks else []):
        draw.line([(x, bottom), (x, bottom + 4)], fill="black", width=axis)
        draw.text((x, bottom + 6), str(n), fill="black", anchor="mt", font=tick_font)
    return image, f"line plot of {count + 2} time points in {colour}"


def _draw_diagram(rng, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """Two to four labelled boxes in a row (or a column), each joined to the next by a black arrow."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    words = [str(word) for word in rng.choice(DIAGRAM_WORDS, size=int(rng.integers(2, 5)), replace=False)]
    across = w >= h
    slot = (w if across else h) / len(words)
    font, _ = _font("DejaVuSans.ttf", max(8, int(min(w, h) / 14)))
    line = max(2, int(min(w, h) / 80))
    boxes = []
    for n, word in enumerate(words):
        # The boxes fill most of the panel, as a drawn diagram does: its extent is the panel's.
        if across:
            box = [n * slot + slot * 0.1, h * 0.1, (n + 1) * slot - slot * 0.1, h * 0.9]
        else:
            box = [w * 0.1, n * slot + slot * 0.1, w * 0.9, (n + 1) * slot - slot * 0.1]
        draw.rectangle(box, outline="black", width=line)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), word, fill="black", anchor="mm", font=font)
        boxes.append(box)
    for start, end in zip(boxes, boxes[1:]):
        if across:
            tail, tip = (start[2] + line, (start[1] + start[3]) / 2), (end[0] - line, (end[1] + end[3]) / 2)
        else:
            tail, tip = ((start[0] + start[2]) / 2, start[3] + line), ((end[0] + end[2]) / 2, end[1] - line)
        draw.line([tail, tip], fill="black", width=line)
        head = max(4.0, 3.0 * line)
        (dx, dy) = (1, 0) if across else (0, 1)
        draw.polygon([tip, (tip[0] - head * dx - head * 0.6 * dy, tip[1] - head * dy - head * 0.6 * dx),
                      (tip[0] - head * dx + head * 0.6 * dy, tip[1] - head * dy + head * 0.6 * dx)], fill="black")
    return image, "diagram of " + " to ".join(words)


def _sub_images(rng, picture: np.ndarray, size: tuple[int, int], gap: int = 4) -> tuple[Image.Image, int]:
    """Two or three crops of the picture side by side (or stacked), parted by white gutters; and how many."""
    w, h = size
    count = int(rng.integers(2, 4))
    across = w >= h
    panel = Image.new("RGB", size, "white")
    length = ((w if across else h) - gap * (count - 1)) // count
    for n in range(count):
        offset = n * (length + gap)
        crop = _fill_picture(rng, picture, (length, h) if across else (w, length))
        panel.paste(crop, (offset, 0) if across else (0, offset))
    return panel, count


def _is_grey(picture: np.ndarray) -> bool:
    return picture.ndim == 2 or bool(np.ptp(picture.astype(np.int16), axis=-1).max() <= 8)


def _draw_label(draw: ImageDraw.ImageDraw, rng, label_box, label: str, circled: bool) -> str:
    """The letter in its label box, on a white patch or in a white disc; the font's name."""
    lx0, ly0, lx1, ly1 = label_box
    font, font_name = _font(LABEL_FONTS[int(rng.integers(len(LABEL_FONTS)))],
                            int((ly1 - ly0) * (0.65 if circled else 0.9)))
    if circled:
        side = max(lx1 - lx0, ly1 - ly0)
        cx, cy = (lx0 + lx1) / 2, (ly0 + ly1) / 2
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill="white", outline="black")
    else:
        draw.rectangle([lx0, ly0, lx1, ly1], fill="white")
    draw.text(((lx0 + lx1) / 2, (ly0 + ly1) / 2), label, fill="black", anchor="mm", font=font)
    return font_name


def _caption_strip(image: Image.Image, caption: str) -> tuple[Image.Image, list[float]]:
    """The figure with its caption's first words burned in under it, as PDF-extracted figures have."""
    size = max(10, image.width // 45)
    font, _ = _font("DejaVuSans.ttf", size)
    strip = int(size * 2.6)
    out = Image.new("RGB", (image.width, image.height + strip), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    words, line = caption.split(), ""
    for word in words:  # one line of the caption, as far as it fits
        if draw.textlength(f"{line} {word}", font=font) > image.width - 2 * size:
            break
        line = f"{line} {word}".strip()
    draw.text((size, image.height + size // 2), line, fill="black", font=font)
    left, top, right, bottom = draw.textbbox((size, image.height + size // 2), line, font=font)
    return out, [float(left), float(top), float(right), float(bottom)]


def _draw_arrow(draw: ImageDraw.ImageDraw, tip, length: float, colour) -> list[float]:
    """An arrow from the upper left pointing at `tip`; returns its bounding box."""
    tx, ty = tip
    tail = (tx - length, ty - length)
    width = max(2, int(length / 8))
    draw.line([tail, (tx, ty)], fill=colour, width=width)
    head = length * 0.4
    draw.polygon([(tx, ty), (tx - head, ty - head * 0.35), (tx - head * 0.35, ty - head)], fill=colour)
    return [tail[0] - width, tail[1] - width, tx + width, ty + width]


def _draw_asterisk(draw: ImageDraw.ImageDraw, centre, radius: float, colour, arms: int) -> list[float]:
    """An asterisk of `arms` strokes from `centre`, one pointing up; returns its bounding box."""
    cx, cy = centre
    width = max(2, int(round(radius / 3)))
    ends = [(cx + radius * math.sin(2 * math.pi * k / arms), cy - radius * math.cos(2 * math.pi * k / arms))
            for k in range(arms)]
    for end in ends:
        draw.line([(cx, cy), end], fill=colour, width=width)
    xs, ys = [x for x, _ in ends], [y for _, y in ends]
    return [min(xs) - width / 2, min(ys) - width / 2, max(xs) + width / 2, max(ys) + width / 2]


def render(layout: Layout, rng: np.random.Generator, medmnist: np.ndarray | None = None,
           real_features: bool = True) -> tuple[Image.Image, dict]:
    """The figure image and its ground truth (panels with label, kind, text; regions; caption; the
    boxes of burned-in text strips). Without `real_features`, one picture per panel, plain charts and
    coloured arrows only, drawn as before they were added (the same figures from the same seed)."""
    image = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(image)
    pictures = _pictures()
    circled = real_features and rng.random() < CIRCLED_LABELS
    panels, regions, clauses = [], [], []
    for panel_id, (box, label_box, label) in enumerate(layout.panels):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        size = (max(1, x1 - x0), max(1, y1 - y0))
        grey, sub_images = False, 1
        if real_features and min(size) >= 100 and rng.random() < DIAGRAMS:
            content, description = _draw_diagram(rng, size)
            kind = "other"
        elif rng.random() < 0.3:
            content, description = _draw_chart(rng, size, ticks=real_features)
            kind = "chart"
        elif medmnist is not None and rng.random() < 0.25:
            content = Image.fromarray(medmnist[int(rng.integers(len(medmnist)))]).convert("RGB").resize(size)
            description, kind, grey = "chest radiograph", "photo", True
        else:
            name = str(rng.choice(sorted(pictures)))
            picture, description, grey = pictures[name]
            kind = "photo"
            if real_features and min(size) >= 120 and rng.random() < SUB_IMAGES:
                content, sub_images = _sub_images(rng, picture, size)
                description = f"{sub_images} views of {description}"
            else:
                content = _fill_picture(rng, picture, size)
        image.paste(content, (x0, y0))
        text = description
        if kind == "photo" and min(size) >= 60 and rng.random() < 0.6:
            target = (x0 + size[0] * rng.uniform(0.45, 0.8), y0 + size[1] * rng.uniform(0.45, 0.8))
            length = min(size) * 0.18
            if real_features and grey and rng.random() < 0.5:  # as authors do: white where the picture is dark
                cx, cy, reach = int(target[0] - x0), int(target[1] - y0), max(4, int(length))
                around = np.asarray(content.convert("L"))[max(0, cy - reach):cy + 1, max(0, cx - reach):cx + 1]
                colour = "white" if around.mean() < 128 else "black"
                rgb = GREY_ARROW_COLOURS[colour]
            else:
                colour = ARROW_COLOURS[int(rng.integers(len(ARROW_COLOURS)))]
                rgb = COLOURS[colour]
            marker = "asterisk" if real_features and rng.random() < ASTERISKS else "arrow"
            if marker == "asterisk":  # just above and left of what it marks
                radius = max(6.0, min(size) * 0.035)
                centre = (target[0] - 1.2 * radius, target[1] - 1.2 * radius)
                marker_box = _draw_asterisk(draw, centre, radius, rgb, int(rng.integers(5, 7)))
            else:
                marker_box = _draw_arrow(draw, target, length, rgb)
            side = min(size) * 0.2
            region_box = [target[0] - side / 2, target[1] - side / 2, target[0] + side / 2, target[1] + side / 2]
            regions.append({"panel_id": panel_id, "box": [float(v) for v in region_box],
                            "marker_box": [float(v) for v in marker_box], "marker_kind": marker,
                            "text_sub": f"{description}, marked by a {colour} {marker}"})
            text += f"; a {colour} {marker} marks the {description}"  # as real captions say what markers mark
        font_name = _draw_label(draw, rng, label_box, label, circled) if label_box is not None else None
        panels.append({"panel_id": panel_id, "label": label, "box": [float(x0), float(y0), float(x1), float(y1)],
                       "kind": kind, "text": text, "label_font": font_name, "circled": circled and label_box is not None,
                       "sub_images": sub_images})
        clauses.append(f"({label}) {text[0].upper()}{text[1:]}." if label else f"{text[0].upper()}{text[1:]}.")
    caption = "Representative biomedical images and measurements. " + " ".join(clauses)
    strips = []
    if real_features and rng.random() < CAPTION_STRIP:
        image, strip = _caption_strip(image, f"Figure {int(rng.integers(1, 9))}. {caption}")
        strips.append(strip)
    return image, {"panels": panels, "regions": regions, "caption": caption, "text_strips": strips,
                   "width": image.width, "height": image.height}


def synthesize(out: Path, num: int, seed: int, layouts_csv: str | None = None,
               medmnist_npz: str | None = None, real_features: bool = False) -> Path:
    """Write out/images/*.png, out/manifest.jsonl (for `annotate run`) and out/gt.jsonl (`render`)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    medmnist = np.load(medmnist_npz)["train_images"] if medmnist_npz else None
    if layouts_csv:
        pool = load_layouts(layouts_csv)
        picks = rng.choice(len(pool), size=min(num, len(pool)), replace=False)
        layouts = [pool[int(i)] for i in sorted(picks)]
    else:
        layouts = [grid_layout(rng, f"grid{n}") for n in range(num)]
    with open(out / "manifest.jsonl", "w") as manifest, open(out / "gt.jsonl", "w") as gt:
        for n, layout in enumerate(layouts):
            figure_id = f"synth-{seed}-{n:05d}"
            image, truth = render(layout, rng, medmnist, real_features)
            # zlib level 1: the same pixels, and encoding at the default level was a third of synthesis.
            image.save(out / "images" / f"{figure_id}.png", compress_level=1)
            manifest.write(json.dumps({"id": figure_id, "image": f"images/{figure_id}.png",
                                       "caption": truth["caption"], "layout": layout.name}) + "\n")
            gt.write(json.dumps({"id": figure_id, **truth}) + "\n")
    return out


def write_truth_records(out: Path) -> Path:
    """The ground truth as figure records (out/truth/records-00000-of-00001.array_record): perfect
    annotations, for scoring the scorer and feeding the data pipeline regions."""
    from zoomin_jax import records
    path = out / "truth" / "records-00000-of-00001.array_record"
    with records.RecordWriter(path) as writer:
        for truth in map(json.loads, (out / "gt.jsonl").read_text().splitlines()):
            width, height = truth["width"], truth["height"]
            panels = [records.new_panel(panel_id=p["panel_id"], label=p["label"], box=p["box"], text=p["text"],
                                        kind=p["kind"]) for p in truth["panels"]]
            regions = [records.new_region(panel_id=r["panel_id"], box=records.clip_box(r["box"], width, height),
                                          marker_box=records.clip_box(r["marker_box"], width, height),
                                          marker_kind=r["marker_kind"], text_sub=r["text_sub"], source="fused")
                       for r in truth["regions"]]
            writer.write(records.new_figure(
                figure_id=truth["id"], source="synth", image_bytes=(out / "images" / f"{truth['id']}.png").read_bytes(),
                width=width, height=height, caption=truth["caption"], panels=panels, regions=regions))
    return path
