"""LVLM prompts, versioned together: a change here changes `pipeline.PROMPT_VERSION`'s meaning, so
bump it with any edit.

The request plan (qwen.py) asks four questions: FIGURE once per figure (panels with their labels and the
markers drawn on them, one JSON list in Qwen2.5-VL's grounding format) and SPLIT_CAPTION once per caption
(text only: the caption's text per panel label); PANEL once per panel crop (its description and the boxes
of its caption clauses, one JSON object); REGION once per region crop (its description and, for a
caption box that no marker backs, whether it shows its phrase).
"""
VERSION = "panel2patch-5"

FIGURE = ("This is a figure from a biomedical article. Locate every panel and read its panel label (the letter "
          "or number printed in it; \"\" if it has none), and locate every visual marker drawn on the figure: "
          "arrows, arrowheads, asterisks, circles, single letters and insets. Answer only with one JSON list such "
          'as [{"bbox_2d": [x1, y1, x2, y2], "label": "A"}, {"bbox_2d": [x1, y1, x2, y2], "label": "arrow"}]: a '
          "panel labelled with its panel label, a marker with its kind.")
PANEL = ("This is one panel of a figure from a biomedical article. Describe what it shows in one short sentence."
         ' Answer only with a JSON object such as {"description": "..."}.')
PANEL_WITH_PHRASES = (
    "This is one panel of a figure from a biomedical article. Describe what it shows in one short sentence, "
    "and locate each of these phrases in it: {phrases}. Answer only with a JSON object such as "
    '{{"description": "...", "boxes": [{{"bbox_2d": [x1, y1, x2, y2], "label": "<the phrase>"}}]}}, '
    "leaving out a phrase that is not visible.")
SPLIT_CAPTION = ("This is the caption of a compound figure from a biomedical article:\n\"{caption}\"\n"
                 "Split it into the text that describes each panel. Use the panel labels the caption uses "
                 "(A, B, ... or a, b, ... or i, ii, ...), one entry per label, and put the text that describes "
                 'all panels (a title, stains, abbreviations) under the label "". Answer only with a JSON list '
                 'such as [{{"label": "", "text": "..."}}, {{"label": "A", "text": "..."}}]; answer [] if the '
                 "caption describes a single image.")
REGION = ("This is a small region of a figure from a biomedical article. Describe what it shows in a few words."
          ' Answer only with a JSON object such as {"description": "..."}.')
REGION_WITH_PHRASE = (
    "This is a small region of a figure from a biomedical article. Describe what it shows in a few words, "
    'and say whether it shows "{phrase}". Answer only with a JSON object such as '
    '{{"description": "...", "shows": true}}.')
