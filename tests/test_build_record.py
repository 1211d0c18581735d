"""build_record: each panel's text is found by its label, however the backend spelt it."""
from PIL import Image

from annotate.backends import HeuristicBackend
from annotate.config import AnnotateConfig
from annotate.inputs import Figure
from annotate.pipeline import Proposal, build_record


def panel_texts(caption: str, labels: list[str], caption_split=None) -> list[str]:
    image = Image.new("RGB", (100 * len(labels), 100), "white")
    proposal = Proposal([{"box": [100 * k, 0, 100 * k + 100, 100], "label": label, "score": 1.0}
                         for k, label in enumerate(labels)], caption_split=caption_split)
    record = build_record(Figure("f", "src", caption), b"png", image, proposal, HeuristicBackend(), AnnotateConfig(),
                          0.0)
    return [panel["text"] for panel in record["panels"]]


def test_the_rules_split_meets_labels_spelt_otherwise():
    caption = "Kidney. (a) PAS stain. (b) Trichrome. (c) Electron micrograph."
    assert panel_texts(caption, ["(A)", "B.", "Panel C", "D", ""]) == [
        "Kidney. PAS stain.", "Kidney. Trichrome.", "Kidney. Electron micrograph.", caption, caption]


def test_a_backends_caption_split_is_used_and_meets_roman_labels_read_as_capitals_or_digits():
    caption = "Prostate at 42 wks. (i) PIN lesions, (ii) microinvasion."
    split = [{"label": "i", "text": "Prostate at 42 wks. PIN lesions"},
             {"label": "ii", "text": "Prostate at 42 wks. microinvasion."}]
    assert panel_texts(caption, ["I", "2"], split) == [split[0]["text"], split[1]["text"]]
    assert panel_texts(caption, ["I", "2"]) == [caption, caption]  # the rules read no roman labels
