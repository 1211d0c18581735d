"""`annotate synth --layouts`: the real zou_train.csv (labelled panels) and clef2016_train.csv (no label
columns) layouts; a malformed row is named by its file and line."""
import json
import re

import pytest

from annotate.__main__ import main
from annotate.synth import load_layouts
from conftest import DATA
from zoomin_jax.errors import UserError

CLEF = DATA / "layouts" / "clef2016_train.csv"


def test_clef_layouts_have_no_label_columns_and_make_unlabelled_figures(tmp_path):
    layouts = load_layouts(CLEF)
    assert len(layouts) == 6782 and sum(len(layout.panels) for layout in layouts) == 27315
    assert all(label_box is None and label == "" for layout in layouts for _, label_box, label in layout.panels)
    first = layouts[0]  # its first row: ...11373_2007_9226_Fig1_HTML.jpg,0,0,123,128,panel
    assert first.name.endswith("11373_2007_9226_Fig1_HTML.jpg") and first.panels[0][0] == [0.0, 0.0, 123.0, 128.0]

    assert main(["synth", "--out", str(tmp_path), "--num", "3", "--seed", "4", "--layouts", str(CLEF)]) == 0
    truth = [json.loads(line) for line in (tmp_path / "gt.jsonl").read_text().splitlines()]
    names = {layout.name: layout for layout in layouts}
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(truth) == 3 and all(panel["label"] == "" for figure in truth for panel in figure["panels"])
    for figure, line in zip(truth, manifest, strict=True):  # each figure drawn on its CLEF layout's boxes
        assert [panel["box"] for panel in figure["panels"]] == [box for box, _, _ in names[line["layout"]].panels]


def test_zou_layouts_keep_their_letters_and_their_unlabelled_panels():
    panels = [panel for layout in load_layouts(DATA / "layouts" / "zou_train.csv") for panel in layout.panels]
    unlabelled = [label for _, label_box, label in panels if label_box is None]
    assert len(panels) == 26916 and 0 < len(unlabelled) < len(panels) and set(unlabelled) == {""}
    assert sum(label.isalpha() for _, label_box, label in panels if label_box) > 0.9 * (len(panels) - len(unlabelled))


@pytest.mark.parametrize("row, says", [
    ("c.jpg,0,0,10", "a layout row has 6 fields"),
    ("c.jpg,0,0,10,10,panel,1,1,5", "this one 9"),
    ("c.jpg,0,x,10,10,panel", "the panel box 0,x,10,10 is not four numbers"),
    ("c.jpg,10,0,5,10,panel", "with x1 < x2"),
    ("c.jpg,0,0,nan,10,panel", "the panel box 0,0,nan,10"),
    ("c.jpg,0,0,10,10,panel,,1,5,5,a", "the label box ,1,5,5 is not four numbers"),
])
def test_a_malformed_layout_row_is_named_by_file_and_line(tmp_path, capsys, row, says):
    path = tmp_path / "layouts.csv"
    path.write_text(f"a.jpg,0,0,10,10,panel,1,1,5,5,a\nb.jpg,0,0,10,10,panel\n\n{row}\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:4: .*{re.escape(says)}"):
        load_layouts(path)
    assert main(["synth", "--out", str(tmp_path / "out"), "--num", "1", "--layouts", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {path}:4: ")
