"""The hand-made caption dev set (tests/data/caption_devset.jsonl) and the scorer that measures a
caption splitter on it (`annotate eval-captions`)."""
import collections
import json

import pytest

from annotate.__main__ import main as annotate_cli
from annotate.evaluate import devset_split, evaluate_captions, is_multi_panel, load_caption_devset
from annotate.metrics import tokens
from conftest import REPO
from zoomin_jax.errors import UserError

DEVSET = REPO / "tests" / "data" / "caption_devset.jsonl"


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return load_caption_devset(DEVSET)


def test_devset_counts_ids_and_slices(entries):
    multi = [e for e in entries if is_multi_panel(e)]
    single = [e for e in entries if not is_multi_panel(e)]
    assert len(multi) >= 150 and len(single) >= 300
    assert len({e["id"] for e in entries}) == len(entries)
    assert all(e["split"] == devset_split(e["id"]) for e in entries)
    for kind in (multi, single):
        assert 0.25 <= sum(e["split"] == "heldout" for e in kind) / len(kind) <= 0.42


def test_devset_panels_follow_the_format(entries):
    for entry in entries:
        labels = [p["label"] for p in entry["panels"]]
        assert all(p["text"].strip() for p in entry["panels"]), entry["id"]
        if is_multi_panel(entry):
            assert len(labels) >= 2 and all(labels) and len(set(labels)) == len(labels), entry["id"]
        else:
            assert entry["panels"] == [{"label": "", "text": " ".join(entry["caption"].split())}], entry["id"]


def test_sub_captions_are_words_of_their_caption(entries):
    """Cut and joined from the caption, not retyped: a typo or a pasted wrong caption shows here."""
    for entry in filter(is_multi_panel, entries):
        caption_words = set(tokens(entry["caption"]))
        for panel in entry["panels"]:
            words = tokens(panel["text"])
            assert sum(w in caption_words for w in words) / len(words) >= 0.95, (entry["id"], panel["label"])


def test_devset_covers_the_styles_and_lookalikes(entries):
    styles = collections.Counter(e["style"] for e in entries)
    for style in ("paren", "paren-postfix", "paren-range", "closing", "period", "colon", "comma", "bare",
                  "positional", "mixed", "panel-word", "sublabel", "range-then-single"):
        assert styles[style] >= 1, style
    assert styles["lookalike"] >= 150
    lookalike_text = " ".join(e["caption"] for e in entries if e["style"] == "lookalike").lower()
    for word in ("type iii", "fig. 2", "figure 2:", "case 2", "hepatitis c", "grade ii", "group b:", "(right"):
        assert word in lookalike_text, word


def _fake_splitter(answers: dict[str, list[dict]]):
    return lambda captions: [answers[c] for c in captions]


def test_scores_on_a_hand_made_example():
    entries = [
        {"id": "m1", "split": "tune", "style": "paren", "caption": "Lead. (A) red cells. (B) blue cells.",
         "panels": [{"label": "A", "text": "Lead. red cells."}, {"label": "B", "text": "Lead. blue cells."}]},
        {"id": "m2", "split": "heldout", "style": "bare", "caption": "x a one b two",
         "panels": [{"label": "a", "text": "one"}, {"label": "b", "text": "two"}]},
        {"id": "s1", "split": "tune", "style": "plain", "caption": "Type A lesion.",
         "panels": [{"label": "", "text": "Type A lesion."}]},
        {"id": "s2", "split": "heldout", "style": "lookalike", "caption": "Fig. 3 shows (A) the aorta.",
         "panels": [{"label": "", "text": "Fig. 3 shows (A) the aorta."}]},
    ]
    answers = {
        # "(A)" is label A; B's text misses "Lead": P 1, R 2/3, F1 0.8.
        entries[0]["caption"]: [{"label": "(A)", "text": "Lead. red cells."}, {"label": "B", "text": "blue cells."}],
        # b is missing: a scores 1, b 0; the label set is not exact.
        entries[1]["caption"]: [{"label": "a", "text": "one two"}],
        entries[2]["caption"]: [{"label": "", "text": "Type A lesion."}],
        # split in two: not kept whole; the unlabelled part has 3 of the 6 words: P 1, R 1/2, F1 2/3.
        entries[3]["caption"]: [{"label": "", "text": "Fig. 3 shows"}, {"label": "A", "text": "the aorta."}],
    }
    report = evaluate_captions(entries, _fake_splitter(answers))
    tune, heldout, everything = (report["slices"][name] for name in ("tune", "heldout", "all"))
    assert tune["multi"] == {"captions": 1, "label_set_exact_match": 1.0, "mean_token_f1": pytest.approx(0.9),
                             "panels": 2}
    # a: F1("one two", "one") = 2/3; b missing = 0.
    assert heldout["multi"] == {"captions": 1, "label_set_exact_match": 0.0, "mean_token_f1": pytest.approx(1 / 3),
                                "panels": 2}
    assert everything["multi"]["mean_token_f1"] == pytest.approx((1 + 0.8 + 2 / 3 + 0) / 4)
    assert tune["single"] == {"captions": 1, "mean_token_f1": 1.0, "kept_whole_rate": 1.0}
    assert heldout["single"]["kept_whole_rate"] == 0.0
    assert heldout["single"]["mean_token_f1"] == pytest.approx(2 / 3)
    assert report["styles"]["single/lookalike"]["kept_whole_rate"] == 0.0
    assert [c["predicted"] for c in report["per_caption"]][3] == ["", "A"]


def test_cli_reports_each_slice_and_kind(tmp_path, entries, capsys):
    out = tmp_path / "report.json"
    assert annotate_cli(["eval-captions", "--devset", str(DEVSET), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["backend"] == "rules" and report["entries"] == len(entries)
    for name in ("tune", "heldout"):
        for kind in ("multi", "single"):
            scores = report["slices"][name][kind]
            assert scores["captions"] == sum(e["split"] == name and is_multi_panel(e) == (kind == "multi")
                                             for e in entries)
            assert all(0.0 <= value <= 1.0 for key, value in scores.items() if key not in ("captions", "panels"))
            assert f"{name:<8} {kind:<7} {scores['captions']:>8}" in printed
    assert len(report["per_caption"]) == len(entries)


def test_a_broken_devset_line_is_named(tmp_path, capsys):
    good = DEVSET.read_text().splitlines()[0]
    broken = json.loads(good)
    del broken["panels"]
    path = tmp_path / "devset.jsonl"
    path.write_text(f"{good}\n{json.dumps(broken)}\n")
    with pytest.raises(UserError, match=r"devset.jsonl:2 lacks panels"):
        load_caption_devset(path)
    assert annotate_cli(["eval-captions", "--devset", str(path), "--out", str(tmp_path / "r.json")]) == 1
    assert "devset.jsonl:2 lacks panels" in capsys.readouterr().err
