"""LVLM prompts, versioned together: a change here changes `pipeline.PROMPT_VERSION`'s meaning, so
bump it with any edit."""
VERSION = "panel2patch-3"

PANELS = ("This is a compound figure from a biomedical article. Locate every panel and read its panel label "
          "(a letter or number printed in the panel). Answer only with a JSON list such as "
          '[{"bbox_2d": [x1, y1, x2, y2], "label": "A"}].')
MARKERS = ("Locate every visual marker drawn on this figure: arrows, arrowheads, asterisks, circles, single "
           'letters and insets. Answer only with a JSON list such as [{"bbox_2d": [x1, y1, x2, y2], '
           '"label": "arrow"}]; answer [] if there are none.')
DESCRIBE = "Describe what this panel shows in one short sentence."
GROUND = ('Locate "{phrase}" in this image. Answer only with a JSON list such as '
          '[{{"bbox_2d": [x1, y1, x2, y2], "label": "{phrase}"}}]; answer [] if it is not visible.')
SPLIT_CAPTION = ("This is the caption of a compound figure from a biomedical article:\n\"{caption}\"\n"
                 "Split it into the text that describes each panel. Use the panel labels the caption uses "
                 "(A, B, ... or a, b, ...). Answer only with a JSON list such as "
                 '[{{"label": "A", "text": "..."}}]; answer [] if the caption describes a single image.')
