"""The CPU panel splitter on composites built from real layouts (zou_train.csv) and on hand cases."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from annotate.backends import HeuristicBackend
from annotate.heuristic import panel_kind, reading_order, split_panels
from annotate.labels import label_scores, read_labels
from annotate.metrics import panel_scores
from annotate.synth import synthesize
from conftest import DATA


@pytest.mark.slow
def test_panel_f1_and_labels_on_600_real_layouts(zou_composites):
    """The backend as `annotate run` calls it: panels grouped into labelled units with the caption's
    labels, then labels read. A third of zou's figures have panels without a letter, which the backend
    joins to the labelled panel beside them (docs/design.md §3) while the layout keeps them apart."""
    truths = [json.loads(line) for line in (zou_composites / "gt.jsonl").read_text().splitlines()]
    images = [Image.open(zou_composites / "images" / f"{truth['id']}.png") for truth in truths]
    proposals = HeuristicBackend().propose(images, [truth["caption"] for truth in truths])
    predicted = [[{"box": p["box"], "label": p["label"]} for p in proposal.panels] for proposal in proposals]
    scores = panel_scores(predicted, [t["panels"] for t in truths])
    print(scores)
    assert scores["figures"] == 600 and scores["panels"] > 1500
    # Measured F1 0.926 and label accuracy 0.888 (2026-12-01; 0.935 / 0.891 when first measured for
    # issue 16); before the labelled units (XY-cut leaves, labels read among the caption's only) 0.90+
    # and 0.891: the units trade a little recall on zou's unlabelled panels for real figures' sub-images.
    assert scores["f1"] >= 0.90
    assert scores["label_accuracy"] >= 0.85


def picture(rng, size):
    base = rng.normal(120, 30, (size[1] // 8 + 1, size[0] // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def test_gutter_and_touching_boundaries():
    rng = np.random.default_rng(0)
    canvas = Image.new("RGB", (410, 300), "white")
    canvas.paste(picture(rng, (200, 140)), (0, 0))
    canvas.paste(picture(rng, (200, 140)), (210, 0))      # 10 px gutter
    bright = Image.fromarray(np.full((150, 200, 3), 230, np.uint8))
    canvas.paste(picture(rng, (200, 150)), (0, 150))
    canvas.paste(bright, (200, 150))                       # touches its neighbour, no gutter
    # The caption names four panels (none of them lettered): touching panels are parted at their boundary.
    assert split_panels(canvas, caption_labels=list("ABCD")) == [
        [0, 0, 200, 140], [210, 0, 410, 140], [0, 150, 200, 300], [200, 150, 400, 300]]
    # Named by no caption, only pictures parted by gutters count as separate: the touching pair is one.
    assert split_panels(canvas) == [[0, 0, 200, 140], [210, 0, 410, 140], [0, 150, 400, 300]]


def test_reading_order():
    boxes = [[300, 10, 400, 100], [0, 0, 100, 100], [0, 120, 100, 220], [150, 5, 250, 105]]
    assert reading_order(boxes) == [[0, 0, 100, 100], [150, 5, 250, 105], [300, 10, 400, 100], [0, 120, 100, 220]]


def labelled_grid(letters, font, rng):
    """A 2×2 grid of textured panels, each with a letter on a white patch in its top-left corner."""
    canvas = Image.new("RGB", (420, 420), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = [[0, 0, 200, 200], [220, 0, 420, 200], [0, 220, 200, 420], [220, 220, 420, 420]]
    for box, letter in zip(boxes, letters):
        canvas.paste(picture(rng, (200, 200)), tuple(box[:2]))
        if letter:
            draw.rectangle([box[0] + 4, box[1] + 4, box[0] + 30, box[1] + 30], fill="white")
            draw.text((box[0] + 17, box[1] + 17), letter, fill="black", anchor="mm", font=font)
    return canvas, boxes


@pytest.mark.parametrize("font_name", ["pillow-default", "DejaVuSerif-Bold.ttf"])
def test_labels_are_read_not_assumed_in_reading_order(font_name):
    """Column-major lettering (A C / B D): reading order would say A B C D."""
    if font_name == "pillow-default":
        font = ImageFont.load_default(size=22)
    elif _has_font(font_name):
        font = ImageFont.truetype(font_name, 22)
    else:
        pytest.skip(f"{font_name} is not installed on this machine")
    canvas, boxes = labelled_grid(["A", "C", "B", "D"], font, np.random.default_rng(0))
    assert read_labels(canvas, boxes, ["A", "B", "C", "D"]) == ["A", "C", "B", "D"]
    # One label not printed: the three read ones stand, the fourth takes the one left over.
    canvas, boxes = labelled_grid(["A", "C", "", "D"], font, np.random.default_rng(1))
    assert read_labels(canvas, boxes, ["A", "B", "C", "D"]) == ["A", "C", "B", "D"]
    # A caption that names no labels: the clear glyphs are read all the same, the blank panel stays blank
    # (item 4 of issue 16: a confident glyph reading wins over the caption's label set).
    if font_name == "pillow-default":  # the templates' own face; other faces read too unsure to stand alone
        assert read_labels(canvas, boxes, []) == ["A", "C", "", "D"]


@pytest.mark.parametrize("letters", [
    # Charts trimmed to their axes leave the letters printed in their white margins outside the units
    # found: "b" sits nearer the bottom-left corner of the panel above than its own chart's top-left.
    (("a", (6, 6)), ("b", (6, 212))),
    # A letter centred under its panel, in the gutter over the next one's left end.
    (("a", (145, 204)), ("b", (56, 246))),
])
def test_a_label_in_a_gutter_is_read_as_the_panel_it_sits_by(letters):
    font = ImageFont.load_default(size=16)
    canvas = Image.new("RGB", (300, 440), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = [[0, 0, 300, 200], [50, 240, 290, 430]]
    for box in boxes:  # flat grey: no texture for a letter to be read in
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(120, 120, 120))
    for letter, at in letters:
        draw.rectangle([at[0] - 2, at[1] - 2, at[0] + 14, at[1] + 18], fill="white")
        draw.text(at, letter, fill="black", font=font)
    assert read_labels(canvas, boxes, ["a", "b"], in_order=False) == ["a", "b"]


def _has_font(name):
    try:
        ImageFont.truetype(name, 10)
        return True
    except OSError:
        return False


def test_label_score_prefers_the_printed_letter():
    font = ImageFont.load_default(size=40)
    canvas = Image.new("L", (60, 60), 0)
    ImageDraw.Draw(canvas).text((30, 30), "b", fill=255, anchor="mm", font=font)
    ink = np.asarray(canvas) > 127
    scores = dict(zip("abdhpq", label_scores(ink, list("abdhpq")), strict=True))
    assert max(scores, key=scores.get) == "b" and scores["b"] > 0.9


def test_panel_kind(tmp_path):
    """On a composite of a real layout with a photo and a chart (a few figures, not the 600 above: this
    test runs in make test-quick)."""
    figures = synthesize(tmp_path, num=12, seed=0, layouts_csv=str(DATA / "layouts" / "zou_train.csv"),
                         medmnist_npz=str(DATA / "medmnist" / "pneumoniamnist.npz"))
    truth = next(json.loads(line) for line in (figures / "gt.jsonl").read_text().splitlines()
                 if {p["kind"] for p in json.loads(line)["panels"]} == {"photo", "chart"})
    image = Image.open(figures / "images" / f"{truth['id']}.png")
    assert [panel_kind(image, p["box"]) for p in truth["panels"]] == [p["kind"] for p in truth["panels"]]
