"""LVLM prompts, versioned together: a change here changes `pipeline.PROMPT_VERSION`'s meaning, so
bump it with any edit.

The request plan (qwen.py) asks four questions: FIGURE once per figure (panels with their labels and the
markers drawn on them, one JSON list in Qwen2.5-VL's grounding format) and SPLIT_CAPTION once per caption
(text only: the caption's text per panel label, after few-shot examples of the ways captions name
panels, the fixed part first so that an engine's prefix cache keeps it; SPLIT_CAPTION_WITH_CONTEXT where
the article's paragraphs cite the figure, up to CONTEXT_CHARS of them, panel2patch-8); PANEL once
per panel crop (its description and the boxes of its caption clauses, one JSON object); REGION once per
region crop (its description and, for a caption box that no marker backs, whether it shows its phrase).
The question comes before the image (engines.TransformersEngine.chat), so requests asking one question
share a prefix (panel2patch-7; the image came first before). A PANEL question for a panel that the
citing paragraphs name is followed by those sentences (PANEL_MENTIONS, panel2patch-8).
"""
import json

VERSION = "panel2patch-8"

FIGURE = ("This is a figure from a biomedical article. Locate every panel and read its panel label (the letter "
          "or number printed in it; \"\" if it has none), and locate every visual marker drawn on the figure: "
          "arrows, arrowheads, asterisks, circles, single letters and insets. Answer only with one JSON list such "
          'as [{"bbox_2d": [x1, y1, x2, y2], "label": "A"}, {"bbox_2d": [x1, y1, x2, y2], "label": "arrow"}]: a '
          "panel labelled with its panel label, a marker with its kind.")
PANEL = ("This is one panel of a figure from a biomedical article. Describe what it shows in one short sentence."
         ' Answer only with a JSON object such as {"description": "..."}.')
# After either panel question, for a labelled panel that the citing paragraphs name ("Figure 3B shows …"):
# those sentences, up to PANEL_CONTEXT_CHARS (qwen.panel_mentions). After the fixed question, so that the
# prefix cache still shares it; the answer is still a description of the crop, not of the text.
PANEL_MENTIONS = (' The article says of this panel: "{mentions}" Use it to name what you see, but describe only '
                  "what the panel shows.")
# ~100 tokens: one or two sentences, what the paragraphs typically say of one panel (the 33 citing
# paragraphs in shared/data/jats name a panel in 18, one or two sentences a panel), at little cost to a
# request that shows a median 108 visual tokens.
PANEL_CONTEXT_CHARS = 400
PANEL_WITH_PHRASES = (
    "This is one panel of a figure from a biomedical article. Describe what it shows in one short sentence, "
    "and locate each of these phrases in it: {phrases}. Answer only with a JSON object such as "
    '{{"description": "...", "boxes": [{{"bbox_2d": [x1, y1, x2, y2], "label": "<the phrase>"}}]}}, '
    "leaving out a phrase that is not visible.")
# Few-shot examples for SPLIT_CAPTION, one per way captions name panels, written for the prompt (none is a
# caption of the dev set in tests/data, which must stay a fair measure): (caption, answer).
SPLIT_CAPTION_EXAMPLES = [
    ("Renal biopsy. (a.) PAS stain. (b.) Silver stain. Scale bar, 50 µm.",
     [{"label": "", "text": "Renal biopsy. Scale bar, 50 µm."}, {"label": "a", "text": "PAS stain."},
      {"label": "b", "text": "Silver stain."}]),
    ("Skull of the holotype. A dorsal view B ventral view",
     [{"label": "", "text": "Skull of the holotype."}, {"label": "A", "text": "dorsal view"},
      {"label": "B", "text": "ventral view"}]),
    ("Kidney sections. A. Control (A1, cortex; A2, medulla); B. Cisplatin; and C. Cisplatin with the inhibitor.",
     [{"label": "", "text": "Kidney sections."}, {"label": "A", "text": "Control (A1, cortex; A2, medulla)"},
      {"label": "B", "text": "Cisplatin"}, {"label": "C", "text": "Cisplatin with the inhibitor."}]),
    ("Knee radiographs. 1. Before surgery. 2. After surgery.",
     [{"label": "", "text": "Knee radiographs."}, {"label": "1", "text": "Before surgery."},
      {"label": "2", "text": "After surgery."}]),
    ("(a) Coronal CT of the chest. b Axial CT at the carina shows the same node (arrow).",
     [{"label": "a", "text": "Coronal CT of the chest."},
      {"label": "b", "text": "Axial CT at the carina shows the same node (arrow)."}]),
    ("1–2 Aedes aegypti: 1 male, 2 female. 3–4 Aedes albopictus: 3 male, 4 female.",
     [{"label": "1", "text": "Aedes aegypti: male"}, {"label": "2", "text": "Aedes aegypti: female."},
      {"label": "3", "text": "Aedes albopictus: male"}, {"label": "4", "text": "Aedes albopictus: female."}]),
    ("Chest X-ray (left) and CT of the thorax (right) show bilateral infiltrates.",
     [{"label": "left", "text": "Chest X-ray show bilateral infiltrates."},
      {"label": "right", "text": "CT of the thorax show bilateral infiltrates."}]),
    ("Axial CT at the level of the aortic arch: (A) superior vena cava, (B) trachea, 1: oesophagus.", []),
    ("Type A dissection on CT with vitamin C levels in phase 2 (see Fig. 3B).", []),
]
_SPLIT_FIXED = (
    "Split the caption of a figure from a biomedical article into the text of each panel it labels. Use the "
    "caption's own labels (A, B, … or a, b, … or 1, 2, … or i, ii, … or left, right, top, bottom), one entry per "
    "panel: a group such as \"A–C\" or \"A and B\" gives each of its panels the group's text, and parts of a "
    "panel (A1, A2 inside panel A) stay in its text. Copy the caption's words; do not rewrite them. Put the text "
    "that all panels share under the label \"\": the title before the first label, and trailing stains, scale "
    "bars, abbreviations and notes about all panels. A label after its clause labels that clause, and what its "
    "sentence says of all its panels goes into each. Letters and numbers that name structures, measurements, "
    "types or other figures inside one image are not panels: answer [] for a caption of one image. Answer only "
    "with one JSON list.\n"
    + "".join(f'Caption: "{caption}"\nAnswer: {json.dumps(answer, ensure_ascii=False)}\n'
              for caption, answer in SPLIT_CAPTION_EXAMPLES).replace("{", "{{").replace("}", "}}"))
SPLIT_CAPTION = _SPLIT_FIXED + 'Caption: "{caption}"\nAnswer:'
# For a figure that the article's paragraphs cite: those paragraphs (`paragraphs`, one quoted per line)
# after the fixed part, which the prefix cache keeps for every split, and before the caption, so that the
# question still ends as each example does. The caption stays the text to split: an answer's texts are
# checked against it alone (captions.split_from_answer).
SPLIT_CAPTION_WITH_CONTEXT = (
    _SPLIT_FIXED + "Context, not to split: paragraphs of the article that cite this figure, which may mention "
    'its panels. Split only the caption below.\n{paragraphs}\nCaption: "{caption}"\nAnswer:')
# The characters of citing paragraphs a split request shows (the label and quotes around them add ~130):
# ~300 tokens of English at Qwen2.5's ~4 characters a token. That holds one typical citing paragraph
# whole (28 of the 33 paragraphs citing the 17 figures in shared/data/jats fit; median 918 characters,
# longest 6,055) and keeps the split the smaller request of its round: its fixed part (~2,800
# characters, ~710 tokens) is the prefix the cache shares, and what each split computes afresh, context
# and caption, stays near 500 tokens where a figure request shows up to 1,280 visual tokens
# (AnnotateConfig.max_pixels), far inside any context length cap (--max-model-len 16384 in README.md).
# A change here changes the questions, so VERSION goes up with it.
CONTEXT_CHARS = 1200
REGION = ("This is a small region of a figure from a biomedical article. Describe what it shows in a few words."
          ' Answer only with a JSON object such as {"description": "..."}.')
REGION_WITH_PHRASE = (
    "This is a small region of a figure from a biomedical article. Describe what it shows in a few words, "
    'and say whether it shows "{phrase}". Answer only with a JSON object such as '
    '{{"description": "...", "shows": true}}.')
