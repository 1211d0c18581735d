"""Caption decomposition on real hand-split captions, real single-figure captions, and the styles."""
import csv
import json

import pytest

from annotate.captions import caption_label, label_key, split_caption, split_from_answer
from annotate.metrics import caption_split_scores, token_f1
from conftest import DATA, run_cli


def test_prostate_hand_splits():
    splits = json.loads((DATA / "captions" / "prostate_caption_splits.json").read_text())
    predicted = [split_caption(entry["caption"]) for entry in splits.values()]
    reference = [[{"label": s["label"]["text"], "text": s["caption"]} for s in entry["gt_subfigures"]]
                 for entry in splits.values()]
    scores = caption_split_scores(predicted, reference)
    print(scores)
    assert scores["captions"] == 196 and scores["panels"] == 849
    assert scores["label_set_exact_match"] >= 0.90
    assert scores["mean_token_f1"] >= 0.80


def test_roco_single_figure_captions_stay_whole():
    with open(DATA / "captions" / "roco_test_captions.tsv", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t")]
    single = sum(len(split_caption(c)) == 1 for c in captions) / len(captions)
    print(f"ROCO one-panel rate {single:.4f} of {len(captions)}")
    assert single >= 0.97


@pytest.mark.parametrize("caption,expected", [
    ("Renal biopsy. (A–C) PAS stain. (D) Electron microscopy.",
     {"A": "Renal biopsy. PAS stain.", "B": "Renal biopsy. PAS stain.", "C": "Renal biopsy. PAS stain.",
      "D": "Renal biopsy. Electron microscopy."}),
    ("Tumour growth. (A and B) Xenografts at day 7. (C) Weights.",
     {"A": "Tumour growth. Xenografts at day 7.", "B": "Tumour growth. Xenografts at day 7.",
      "C": "Tumour growth. Weights."}),
    ("Ki-67 staining. (A1/A2) Control. (B1/B2) Treated.",
     {"A1": "Ki-67 staining. Control.", "A2": "Ki-67 staining. Control.",
      "B1": "Ki-67 staining. Treated.", "B2": "Ki-67 staining. Treated."}),
    ("Mouse lungs. a, wild type; b, knockout.", {"a": "Mouse lungs. wild type", "b": "Mouse lungs. knockout."}),
    ("Western blots. 1: untreated; 2: treated.", {"1": "Western blots. untreated", "2": "Western blots. treated."}),
    ("Top: H&E stain. Bottom: Ki-67 stain.", {"top": "H&E stain.", "bottom": "Ki-67 stain."}),
    ("Axial CT (left) and coronal MRI (right).", {"left": "Axial CT", "right": "coronal MRI"}),
    ("H&E of liver. A: portal tract. B: central vein (same field as A).",
     {"A": "H&E of liver. portal tract.", "B": "H&E of liver. central vein (same field as A)."}),
    ("Chest radiograph with consolidation in the right lower lobe (arrow).",
     {"": "Chest radiograph with consolidation in the right lower lobe (arrow)."}),
    ("", {"": ""}),
])
def test_marker_styles(caption, expected):
    assert {p["label"]: p["text"] for p in split_caption(caption)} == expected


def test_token_f1():
    assert token_f1("Nuclei, stained.", "stained nuclei") == 1.0
    assert token_f1("a b", "a c") == 0.5
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_cli_records_unreadable_lines(tmp_path):
    lines = [json.dumps({"id": "f1", "caption": "(A) Control. (B) Treated."}).encode(), b"{not json",
             json.dumps({"id": "f2", "caption": None}).encode(), b"\xff\xfe bad utf-8",
             json.dumps({"id": "f3", "caption": "CT of the abdomen."}).encode()]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run_cli("-m", "annotate", "captions", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["f1", "f3"]
    assert [p["label"] for p in out[0]["panels"]] == ["A", "B"] and len(out[1]["panels"]) == 1
    failures = [json.loads(line) for line in (tmp_path / "out.jsonl.failures.jsonl").read_text().splitlines()]
    assert [f["line"] for f in failures] == [2, 3, 4]
    assert "not a string" in failures[1]["reason"]


LETTERS, UPPER, TO_I = ["a", "b", "c"], ["A", "B", "C", "D"], list("abcdefghi")
ROMAN, ROMAN_UPPER, DIGITS = ["i", "ii", "iii", "iv"], ["I", "II", "III"], ["1", "2", "3"]
BOTH_CASES, SUB_PANELS, POSITIONS = ["A", "B", "a", "b"], ["B1", "B2", "C1"], ["left", "right"]


@pytest.mark.parametrize("said,caption_labels,expected", [
    ("A", LETTERS, "a"), ("(A)", LETTERS, "a"), ("a.", LETTERS, "a"), (" a ", LETTERS, "a"),
    ("Panel A", LETTERS, "a"), ("panel (b):", LETTERS, "b"), ("[c]", LETTERS, "c"), ("B)", LETTERS, "b"),
    ("\uff22", LETTERS, "b"),                        # a full-width B
    ("d", UPPER, "D"), ("(D).", UPPER, "D"),
    ("II", ROMAN, "ii"), ("(iii)", ROMAN, "iii"), ("IV.", ROMAN, "iv"), ("2", ROMAN, "ii"),
    ("ii", ROMAN_UPPER, "II"), ("3", ROMAN_UPPER, "III"),
    ("i", TO_I, "i"), ("I", TO_I, "i"),                # among letters a-i, "i" is the letter
    ("ii", TO_I, None), ("9", TO_I, None),
    ("1", DIGITS, "1"), ("01", DIGITS, "1"), ("(2)", DIGITS, "2"),
    ("A", BOTH_CASES, "A"), ("a", BOTH_CASES, "a"), ("(b)", BOTH_CASES, "b"),  # the caption tells case apart
    ("b1", SUB_PANELS, "B1"), ("B-2", SUB_PANELS, "B2"), ("c.1", SUB_PANELS, "C1"),
    ("Left panel", POSITIONS, "left"), ("RIGHT", POSITIONS, "right"),
    ("E", LETTERS, None), ("v", ROMAN, None), ("arrow", LETTERS, None), ("", LETTERS, None), ("()", LETTERS, None),
])
def test_label_spellings_meet_the_captions_label(said, caption_labels, expected):
    assert caption_label(said, caption_labels) == expected


def test_label_keys_without_a_caption_ignore_case_brackets_and_punctuation():
    assert [label_key(said) for said in ("(A)", "a.", "Panel A", "A1", "(03)", "ii", "")] == [
        "a", "a", "a", "a1", "3", "ii", ""]


def test_hand_splits_read_as_lvlm_answers_are_accepted_and_others_captions_are_not():
    """Each hand split of a real caption, given as an LVLM's answer, is usable with the hand labels (among
    them i-vi for a caption the rules cannot split, and "A)" glued to the word before it); the hand split
    of the next caption, given for this one, never is."""
    entries = list(json.loads((DATA / "captions" / "prostate_caption_splits.json").read_text()).values())
    accepted = rejected = 0
    for n, entry in enumerate(entries):
        for answered, target in ((entry, "own"), (entries[(n + 1) % len(entries)], "other")):
            texts = {s["label"]["text"]: s["caption"] for s in answered["gt_subfigures"]}
            own, _, problems = split_from_answer(entry["caption"], texts)
            if target == "own":
                accepted += set(own) == set(texts) and problems == []
            else:
                rejected += own == {} and any("not drawn from the caption" in p for p in problems)
    assert accepted == rejected == len(entries) == 196


@pytest.mark.parametrize("texts,own,context,problems", [
    # The caption's spellings; a label the rules read inside a range is named.
    ({"A": "PAS stain.", "(b)": "PAS stain.", "C": "PAS stain.", "D": "Electron microscopy."},
     {"a": "PAS stain.", "b": "PAS stain.", "c": "PAS stain.", "d": "Electron microscopy."}, "Renal biopsy.", []),
    # One entry for two labels.
    ({"a and b": "PAS stain.", "c": "PAS stain.", "d": "Electron microscopy."},
     {"a": "PAS stain.", "b": "PAS stain.", "c": "PAS stain.", "d": "Electron microscopy."}, "Renal biopsy.", []),
    ({"a": "PAS stain.", "e": "Electron microscopy."}, {}, "", ["label 'e' is not one the caption names"]),
    ({"a": "PAS stain.", "d": "Immunofluorescence for IgA deposits."}, {}, "",
     ["text for 'd' is not drawn from the caption: 'Immunofluorescence for IgA deposits.'"]),
])
def test_an_lvlm_split_is_checked_against_its_caption(texts, own, context, problems):
    caption = "Renal biopsy. (a-c) PAS stain. (d) Electron microscopy."
    assert split_from_answer(caption, texts) == (own, context, problems)


def test_the_lvlm_shared_text_is_the_context_where_the_rules_find_no_labels():
    caption = "Prostate glands at 42 wks. (i) Widespread PIN lesions, (ii) with microinvasion."
    assert split_caption(caption)[0]["label"] == ""  # the rules read no roman labels
    texts = {"": "Prostate glands at 42 wks.", "i": "Widespread PIN lesions", "ii": "with microinvasion."}
    assert split_from_answer(caption, texts) == (
        {"i": "Widespread PIN lesions", "ii": "with microinvasion."}, "Prostate glands at 42 wks.", [])
