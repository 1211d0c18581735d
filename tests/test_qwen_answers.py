"""Every answer shape Qwen2.5-VL gives to our grounding prompts, read into what the records get
(issue 26, item 3). The answers are written the way Qwen2.5-VL-7B/72B answer: its trained grounding
form (a list of {"bbox_2d", "label"}, fenced or not), prose before or after, a single object, an
object of several box lists, answers cut mid-object at the token budget, and boxes repeated by a
decoding loop. FIGURE answers give panels (labels) and markers (kinds); PANEL answers a description
and phrase boxes."""
import json

import pytest

from annotate.lvlm_output import parse_boxes, parse_panel_answer
from annotate.qwen import read_figure_items

SIZE = (480, 640)  # (height, width) of the figure, as seen: no rescaling here
A, B, C, D = [10, 10, 310, 230], [330, 10, 630, 230], [10, 250, 310, 470], [330, 250, 630, 470]
MARK, MARK2 = [100, 100, 124, 118], [400, 300, 420, 330]


def boxes(*pairs) -> str:
    return json.dumps([{"bbox_2d": box, "label": label} for box, label in pairs])


FIGURE_ANSWERS = [
    # (answer, caption labels, panel labels, marker kinds)
    (f"```json\n{boxes((A, 'A'), (B, 'B'))}\n```", ["A", "B"], ["A", "B"], []),
    (boxes((A, "A"), (B, "B"), (C, "C"), (D, "D")), [], ["A", "B", "C", "D"], []),
    (f"Here are the panels and markers:\n```json\n{boxes((A, 'A'), (B, 'B'))}\n```", [], ["A", "B"], []),
    (f"{boxes((A, 'A'), (B, 'B'), (C, 'C'), (D, 'D'))}\nThe figure has four panels.", [], ["A", "B", "C", "D"], []),
    (boxes((A, "(A)"), (B, "(B)")), ["A", "B"], ["A", "B"], []),
    (boxes((A, "A"), (B, "B")), ["a", "b"], ["a", "b"], []),
    (boxes((A, "Panel A"), (B, "panel B")), [], ["A", "B"], []),
    (boxes((A, "A"), (MARK, "white arrow")), [], ["A"], ["arrow"]),
    (boxes((A, "A"), (MARK, "arrow 1"), (MARK2, "arrow 2")), [], ["A"], ["arrow", "arrow"]),
    (boxes((A, "A"), (MARK, "*")), [], ["A"], ["asterisk"]),
    (boxes((A, "A"), (MARK, "red circle")), [], ["A"], ["circle"]),
    (boxes((A, "A"), (MARK, "arrowheads")), [], ["A"], ["arrowhead"]),
    (boxes((A, "A"), (MARK, "→")), [], ["A"], ["arrow"]),
    (boxes((A, "A"), (MARK, "Asterisks (**)")), [], ["A"], ["asterisk"]),
    (boxes((A, "A"), (MARK2, "Star")), [], ["A"], ["asterisk"]),
    (boxes((A, "A"), ([20, 200, 300, 226], "inset")), [], ["A"], ["inset"]),
    (boxes((A, "A"), ([200, 440, 300, 450], "scale bar")), [], ["A"], []),  # neither: dropped
    (boxes((A, "A"), (B, "microscopy image")), [], ["A"], []),  # a description, not a label: dropped
    (boxes((A, "A"), ([600, 20, 606, 26], "B")), [], ["A"], []),  # a 6-pixel "panel": dropped
    (json.dumps({"bbox_2d": A, "label": "A"}), [], ["A"], []),  # a single object, not a list
    (json.dumps({"panels": [{"bbox_2d": A, "label": "A"}, {"bbox_2d": B, "label": "B"}],
                 "markers": [{"bbox_2d": MARK, "label": "arrow"}]}), [], ["A", "B"], ["arrow"]),
    (json.dumps({"panels": [{"bbox_2d": A, "label": "A"}], "markers": [{"bbox_2d": MARK, "label": "1"}]}),
     [], ["A"], ["none"]),  # a marker the model numbered: a marker of no known kind
    (f'```json\n[{{"bbox_2d": {A}, "label": "A"}}, {{"bbox_2d": [330, 10, 6', [], ["A"], []),  # cut mid-object
    (f'[{{"bbox_2d": {A}, "label": "A"}}, {{"bbox_2d": {MARK}, "label": "arrow"}}, {{"bbox_2d": [330, 1', [],
     ["A"], ["arrow"]),
    (boxes((A, "A"), (B, "B"), (B, "B"), (B, "B"), (B, "B"), (B, "B")), [], ["A", "B"], []),  # decoding loop
    (boxes((A, "i"), (B, "ii")), ["i", "ii"], ["i", "ii"], []),
    (boxes((A, "top left"), (B, "top right")), [], ["topleft", "topright"], []),
    (boxes((A, ""),), [], [""], []),  # an unlabelled panel
    (boxes((A, "A1"), (B, "A2")), [], ["A1", "A2"], []),
    (json.dumps([{"bbox": A, "text": "C"}, {"box": B, "name": "D"}]), [], ["C", "D"], []),  # other key names
]


@pytest.mark.parametrize("answer, caption_labels, panels, markers", FIGURE_ANSWERS)
def test_figure_answers_give_their_panels_and_markers(answer, caption_labels, panels, markers):
    parsed = parse_boxes(answer, SIZE, SIZE)
    found, found_markers, dropped = read_figure_items(parsed.items, (SIZE[1], SIZE[0]), caption_labels)
    assert [panel["label"] for panel in found] == panels
    assert [marker["kind"] for marker in found_markers] == markers
    if "scale bar" in answer or "microscopy" in answer:
        assert len(dropped) == 1 and "names neither a panel nor a marker kind" in dropped[0]
    if "[600, 20, 606, 26]" in answer:
        assert len(dropped) == 1 and "too small for a panel" in dropped[0]
    if answer.count(json.dumps(B)) > 2:
        assert "4 repeated boxes dropped" in parsed.problems


CROP = (280, 280)
PHRASES = [([28, 28, 84, 84], "crescent"), ([140, 140, 196, 224], "nodule")]

PANEL_ANSWERS = [
    # (answer, description, phrase labels)
    (f"```json\n{boxes(*PHRASES)}\n```", "", ["crescent", "nodule"]),
    (boxes(*PHRASES), "", ["crescent", "nodule"]),
    (f"The phrases are located as follows:\n{boxes(*PHRASES)}", "", ["crescent", "nodule"]),
    (json.dumps({"bbox_2d": PHRASES[0][0], "label": "crescent"}), "", ["crescent"]),
    (json.dumps({"description": "An H&E section.", "boxes": [{"bbox_2d": b, "label": l} for b, l in PHRASES]}),
     "An H&E section.", ["crescent", "nodule"]),
    (json.dumps({"description": "A chest CT.", "regions": [{"bbox_2d": PHRASES[1][0], "label": "nodule"}]}),
     "A chest CT.", ["nodule"]),
    ('{"description": "A glomerulus.", "boxes": [{"bbox_2d": [28, 28, 84, 84], "label": "crescent"}, {"bbox_2d": [14',
     "A glomerulus.", ["crescent"]),
    ("A glomerulus with a cellular crescent.", "A glomerulus with a cellular crescent.", []),
]


@pytest.mark.parametrize("answer, description, labels", PANEL_ANSWERS)
def test_panel_answers_give_their_description_and_phrase_boxes(answer, description, labels):
    got, parsed = parse_panel_answer(answer, CROP, CROP)
    assert got == description
    assert [item["label"] for item in parsed.items] == labels
    assert all(item["box"] == [float(v) for v in box] for item, (box, _) in
               zip(parsed.items, [p for p in PHRASES if p[1] in labels]))


def test_the_table_holds_thirty_answers_or_more():
    assert len(FIGURE_ANSWERS) + len(PANEL_ANSWERS) >= 30
