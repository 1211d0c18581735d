"""Parsing realistic Qwen2.5-VL grounding answers into boxes in original pixels."""
import pytest

from annotate.lvlm_output import parse_boxes, parse_caption_split, parse_panel_answer, parse_region_answer, resized_size


@pytest.mark.parametrize("original,seen", [
    ((468, 634), (476, 644)),      # a real medicat figure: rounded to multiples of 28
    ((4000, 3000), (1148, 840)),   # shrunk under max_pixels
    ((28, 28), (56, 56)),          # a MedMNIST image, grown to min_pixels
])
def test_smart_resize_cases(original, seen):
    assert resized_size(*original, min_pixels=56 * 56, max_pixels=28 * 28 * 1280) == seen


def test_boxes_map_back_to_original_pixels():
    answer = '```json\n[{"bbox_2d": [322, 238, 644, 476], "label": "B"}]\n```'
    parsed = parse_boxes(answer, original_size=(468, 634), seen_size=(476, 644))
    assert parsed.items == [{"box": [317.0, 234.0, 634.0, 468.0], "label": "B", "group": ""}] and parsed.problems == []
    parsed = parse_boxes('[{"bbox_2d": [28, 28, 56, 56], "label": "a"}]', (28, 28), (56, 56))
    assert parsed.items[0]["box"] == [14.0, 14.0, 28.0, 28.0]
    parsed = parse_boxes('[{"bbox_2d": [0, 0, 840, 1148], "label": "A"}]', (4000, 3000), (1148, 840))
    assert parsed.items[0]["box"] == [0.0, 0.0, 3000.0, 4000.0]


def test_prose_around_fenced_json():
    answer = ('Sure! The figure has two panels:\n```json\n[\n  {"bbox_2d": [10, 12, 300, 400], "label": "A"},\n'
              '  {"bbox_2d": [310, 12, 600, 400], "label": "B"}\n]\n```\nPanel A shows a stained section.')
    parsed = parse_boxes(answer, (476, 644), (476, 644))
    assert [i["label"] for i in parsed.items] == ["A", "B"] and parsed.problems == []


def test_truncated_answer_keeps_complete_objects():
    answer = '```json\n[{"bbox_2d": [10, 12, 300, 400], "label": "A"}, {"bbox_2d": [310, 12, 60'
    parsed = parse_boxes(answer, (476, 644), (476, 644))
    assert parsed.items == [{"box": [10.0, 12.0, 300.0, 400.0], "label": "A", "group": ""}]
    assert parsed.problems == ["truncated or malformed JSON; kept the complete objects"]


def test_wrong_keys_and_bad_boxes_are_reported():
    answer = ('[{"box": [1, 2, 30, 40], "text": "C"}, {"coords": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3]},'
              ' {"bbox_2d": [700, 500, 900, 600], "label": "D"}, {"bbox_2d": [600, 400, 700, 500], "label": "E"},'
              ' {"bbox_2d": ["a", 1, 2, 3]}, "A"]')
    parsed = parse_boxes(answer, (476, 644), (476, 644))
    assert parsed.items == [{"box": [1.0, 2.0, 30.0, 40.0], "label": "C", "group": ""},
                            {"box": [600.0, 400.0, 644.0, 476.0], "label": "E", "group": ""}]
    reasons = " | ".join(parsed.problems)
    assert reasons.count("no 4-number box") == 3 and "outside the 644x476 input" in reasons
    assert "clipped to the image" in reasons and "not an object" in reasons


@pytest.mark.parametrize("answer", ["", "I cannot identify any panels in this image.", "```json\n```",
                                    "[]", "null", "\x00\xff garbage"])
def test_garbage_gives_no_boxes_and_a_reason(answer):
    parsed = parse_boxes(answer, (476, 644), (476, 644))
    assert parsed.items == [] and len(parsed.problems) == 1


def test_caption_split_answers():
    answer = ('Here is the split:\n```json\n[{"label": "(A)", "text": "PAS stain; arrows mark crescents."},\n'
              ' {"label": "B", "caption": "Electron micrograph."}, {"label": "B", "text": "Scale bar 1 um."},\n'
              ' {"panel": "C"}]\n```\nLet me know if you need more.')
    texts, problems = parse_caption_split(answer)
    assert texts == {"A": "PAS stain; arrows mark crescents.", "B": "Electron micrograph. Scale bar 1 um."}
    assert problems == ['no label and text in {"panel": "C"}']
    truncated, problems = parse_caption_split('[{"label": "a", "text": "x y"}, {"label": "b", "te')
    assert truncated == {"a": "x y"} and problems[0].startswith("truncated")
    assert parse_caption_split("[]") == ({}, [])  # one image: no panel texts, nothing wrong
    assert parse_caption_split('[{"label": "", "text": "Kidney."}, {"label": "A", "text": "PAS."}]') == (
        {"": "Kidney.", "A": "PAS."}, [])
    assert parse_caption_split("The caption has two panels.") == (
        {}, ["no JSON panel texts in answer: 'The caption has two panels.'"])
    assert parse_caption_split("") == ({}, ["empty answer"])


def test_panel_answers_give_a_description_and_phrase_boxes():
    whole = ('```json\n{"description": "An H&E section with \\"crescents\\".", "boxes": [{"bbox_2d": [56, 14, 112, 42], '
             '"label": "arrows mark crescents"}]}\n```')
    description, parsed = parse_panel_answer(whole, (100, 200), (56, 112))
    assert description == 'An H&E section with "crescents".' and parsed.problems == []
    assert parsed.items == [{"box": [100.0, 25.0, 200.0, 75.0], "label": "arrows mark crescents", "group": "boxes"}]
    # Cut at the budget after one box: the description and that box are kept.
    cut = ('{"description": "A chest CT.", "boxes": [{"bbox_2d": [0, 0, 28, 28], "label": "nodule"}, '
           '{"bbox_2d": [1, 2, 3')
    description, parsed = parse_panel_answer(cut, (56, 56), (56, 56))
    assert description == "A chest CT." and [i["label"] for i in parsed.items] == ["nodule"]
    assert parsed.problems == ["truncated or malformed JSON; kept the description and complete boxes"]
    # Cut inside the description itself; and a description with brackets that look like a list.
    assert parse_panel_answer('{"description": "A chest CT of the', (56, 56), (56, 56))[0] == "A chest CT of the"
    description, parsed = parse_panel_answer('{"description": "Lesion [1] marked", "boxes": []}', (56, 56), (56, 56))
    assert (description, parsed.items, parsed.problems) == ("Lesion [1] marked", [], [])


@pytest.mark.parametrize("answer,description,problem", [
    ("A stained section of kidney.", "A stained section of kidney.", "no JSON object in answer; kept it as the description"),
    ("", "", "empty answer"),
    ('{"boxes": []}', "", "no description in answer"),
])
def test_panel_answers_without_the_object(answer, description, problem):
    got, parsed = parse_panel_answer(answer, (56, 56), (56, 56))
    assert got == description and parsed.items == [] and parsed.problems == [problem]


@pytest.mark.parametrize("answer,expected", [
    ('```json\n{"description": "a crescent in a glomerulus", "shows": true}\n```',
     ("a crescent in a glomerulus", True, [])),
    ('{"description": "empty background", "shows": "no"}', ("empty background", False, [])),
    ('{"description": "a nucleus"}', ("a nucleus", None, [])),  # asked for a description only
    ('{"description": "a dark nuc', ("a dark nuc", None, ["truncated or malformed JSON; kept the description"])),
    ('{"shows": false, "description": "fat cells", ', ("fat cells", False,
                                                       ["truncated or malformed JSON; kept the description"])),
    ("Fat cells.", ("Fat cells.", None, ["no JSON object in answer; kept it as the description"])),
    ('{"shows": "maybe"}', ("", None, ["no description in answer"])),
    ("", ("", None, ["empty answer"])),
])
def test_region_answers_give_a_description_and_a_verdict(answer, expected):
    assert parse_region_answer(answer) == expected
