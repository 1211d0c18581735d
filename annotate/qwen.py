"""The Qwen2.5-VL backend: the request plan of Panel2Patch and the reading of its answers; an engine
(engines.py: transformers or vLLM) runs the requests.

The plan, per batch of figures, in two rounds of requests through the engine:
1. FIGURE, once per figure: its panels with their labels and the markers drawn on it, in one answer.
   Asked again at a smaller scale (config `panel_scales`) only where that scale gives the model an
   image of another size: a figure above `max_pixels` is resized to the same input at every scale, and
   asking twice would return the same answer. Panels of all scales are pooled by non-maximum
   suppression among boxes whose labels identify the same panel ("A", "(a)", "Panel A"); markers come
   from the full-scale answer.
2. PANEL, once per panel crop: a short description of it (`text_lvlm`) and boxes for its own caption
   clauses (path B), in one answer.
So a figure of P panels costs 1 + P requests (2 + P where a second scale differs), and a batch two
blocking rounds (plus one retry round for answers cut at their budget).

Answers are untrusted text: `lvlm_output` keeps what is usable and every problem becomes a warning
in the record's annotation, never an exception. An answer cut at the token budget is asked again
once with a larger one; cut even then, it keeps its complete boxes and a warning says it was cut.
Prompts are versioned in `prompts.py`.
"""
from __future__ import annotations

import dataclasses

from PIL import Image

from annotate import prompts
from annotate.captions import clean_label, groundable_clauses, label_key, shared_context, split_caption, with_context
from annotate.config import AnnotateConfig
from annotate.engines import Answer, Engine, Request
from annotate.lvlm_output import Parsed, parse_boxes, parse_caption_split, parse_panel_answer, resized_size
from annotate.pipeline import Proposal
from annotate.regions import non_max_suppression

# What a marker's label may say, and the kind it is recorded as; any other label names a panel.
_MARKER_KINDS = {"arrow": "arrow", "arrows": "arrow", "arrowhead": "arrowhead", "arrowheads": "arrowhead",
                 "asterisk": "asterisk", "asterisks": "asterisk", "star": "asterisk", "circle": "circle",
                 "circles": "circle", "letter": "letter", "inset": "inset", "insets": "inset"}
# An answer cut at its budget is asked again once with this many times the budget (capped by
# `AnnotateConfig.max_retry_tokens`); only cut answers pay for it.
_RETRY_FACTOR = 4
# A description keeps this many characters (~75 tokens of English).
_DESCRIPTION_CHARS = 300
# Qwen2.5-VL's smallest input side: a crop thinner than this is not asked about.
_MIN_CROP_SIDE = 28


def _inside(box, panel) -> bool:
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return panel[0] <= x <= panel[2] and panel[1] <= y <= panel[3]


def _cut(answer: Answer) -> list[str]:
    """The warning for an answer still cut at its token budget: what it lists may be incomplete."""
    return [f"answer cut at {answer.cut_at} tokens"] if answer.cut_at else []


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1.0:
        return image
    return image.resize((max(_MIN_CROP_SIDE, round(image.width * scale)),
                         max(_MIN_CROP_SIDE, round(image.height * scale))), Image.BICUBIC)


def _panel_question(phrases: list[str]) -> str:
    if not phrases:
        return prompts.PANEL
    return prompts.PANEL_WITH_PHRASES.format(phrases=", ".join(f'"{p}"' for p in phrases))


def _phrase_key(text: str) -> str:
    return " ".join(text.casefold().split())


class QwenBackend:
    def __init__(self, engine: Engine, cfg: AnnotateConfig = AnnotateConfig()):
        self.engine, self.cfg = engine, cfg
        self.name, self.model_id = engine.name, engine.model_id

    @property
    def counts(self):
        return self.engine.counts

    def _ask(self, requests: list[Request]) -> list[Answer]:
        """The engine's answers; those cut at their budget are asked again, by themselves, with a larger one:
        a box list cut short loses boxes."""
        answers = self.engine.generate(requests)
        retry_budget = min(_RETRY_FACTOR * self.cfg.max_new_tokens, self.cfg.max_retry_tokens)
        again = [n for n, answer in enumerate(answers) if answer.cut_at and answer.cut_at < retry_budget]
        if again:
            retried = self.engine.generate([dataclasses.replace(requests[n], max_new_tokens=retry_budget)
                                            for n in again])
            for n, answer in zip(again, retried, strict=True):
                answers[n] = answer
        return answers

    def _seen(self, image: Image.Image) -> tuple[int, int]:
        return resized_size(image.height, image.width, self.cfg.min_pixels, self.cfg.max_pixels)

    def propose(self, images: list[Image.Image], captions: list[str]) -> list[Proposal]:
        if not images:
            return []
        # Round 1: each figure at each scale that shows the model an image of a size not asked yet.
        asks = []  # (figure index, scale, image shown)
        for n, image in enumerate(images):
            sizes = set()
            for scale in self.cfg.panel_scales:
                shown = _scaled(image, scale)
                if (size := self._seen(shown)) not in sizes:
                    sizes.add(size)
                    asks.append((n, scale, shown))
        answers = self._ask([Request(prompts.FIGURE, shown, self.cfg.max_new_tokens) for _, _, shown in asks])
        by_figure: list[list[tuple[float, Parsed]]] = [[] for _ in images]
        for (n, scale, _), answer in zip(asks, answers, strict=True):
            parsed = parse_boxes(answer.text, (images[n].height, images[n].width), answer.seen)
            by_figure[n].append((scale, Parsed(parsed.items, _cut(answer) + parsed.problems)))
        proposals = [self._figure_proposal(image, caption, parsed)
                     for image, caption, parsed in zip(images, captions, by_figure, strict=True)]
        self._describe_and_ground(images, captions, proposals)
        return proposals

    def _figure_proposal(self, image: Image.Image, caption: str, by_scale: list[tuple[float, Parsed]]) -> Proposal:
        caption_labels = {label_key(p["label"]): p["label"] for p in split_caption(caption) if p["label"]}
        pooled, markers, problems = [], [], []
        for rank, (scale, parsed) in enumerate(by_scale):
            problems += [f"figure@{scale}: {problem}" for problem in parsed.problems]
            for item in parsed.items:
                kind, key = _MARKER_KINDS.get(item["label"].strip().casefold()), label_key(item["label"])
                if kind is None:
                    # The caption's spelling of the label the model read ("a" where it read "(A)").
                    pooled.append({"box": item["box"], "label": caption_labels.get(key, clean_label(item["label"])[:3]),
                                   "key": key, "score": 1.0 / (1 + rank)})
                elif rank == 0:
                    markers.append({"box": item["box"], "kind": kind, "score": 1.0})
        panels = [{k: p[k] for k in ("box", "label", "score")}
                  for p in non_max_suppression(pooled, self.cfg.panel_nms_iou, group_by="key")]
        if not panels:  # described and grounded in round 2 like any panel
            panels = [{"box": [0.0, 0.0, float(image.width), float(image.height)], "label": "", "score": 0.0}]
            problems.append("no panels in the answer; the whole figure is one panel")
        proposal = Proposal(panels, warnings=problems)
        for marker in markers:
            owner = next((k for k, p in enumerate(panels) if _inside(marker["box"], p["box"])), None)
            if owner is not None:
                proposal.markers.setdefault(owner, []).append(marker)
        return proposal

    def _describe_and_ground(self, images: list[Image.Image], captions: list[str], proposals: list[Proposal]) -> None:
        """Round 2: each panel crop's description and the boxes of its own caption clauses, mapped back to
        the figure."""
        asks = []  # (figure index, panel index, crop, phrases)
        for n, (image, caption, proposal) in enumerate(zip(images, captions, proposals, strict=True)):
            own = {label_key(p["label"]): p["text"] for p in split_caption(caption, shared_context=False)}
            for k, panel in enumerate(proposal.panels):
                crop = image.crop(tuple(int(v) for v in panel["box"]))
                if min(crop.size) >= _MIN_CROP_SIDE:
                    phrases = [p.replace('"', "'") for p in groundable_clauses(own.get(label_key(panel["label"]), ""))]
                    asks.append((n, k, crop, phrases))
        answers = self._ask([Request(_panel_question(phrases), crop, self.cfg.max_new_tokens) for _, _, crop, phrases in asks])
        for (n, k, crop, phrases), answer in zip(asks, answers, strict=True):
            proposal = proposals[n]
            description, parsed = parse_panel_answer(answer.text, (crop.height, crop.width), answer.seen)
            proposal.panel_descriptions[k] = " ".join(description.split())[:_DESCRIPTION_CHARS]
            x0, y0 = proposal.panels[k]["box"][:2]
            wanted = {_phrase_key(p): p for p in phrases}
            problems = _cut(answer) + parsed.problems
            for item in parsed.items:
                phrase = wanted.pop(_phrase_key(item["label"]), None)
                if phrase is None:
                    problems.append(f"box for a phrase not asked about or given twice: {item['label'][:30]!r}")
                    continue
                box = [item["box"][0] + x0, item["box"][1] + y0, item["box"][2] + x0, item["box"][3] + y0]
                proposal.phrases.setdefault(k, []).append({"box": box, "text": phrase, "score": 1.0})
            label = proposal.panels[k]["label"] or str(k)
            proposal.warnings += [f"panel {label}: {problem}" for problem in problems]

    def split_captions(self, captions: list[str]) -> list[tuple[list[dict], list[str]]]:
        """LVLM-assisted caption decomposition: the model assigns clauses to panel labels and the
        rules' shared context goes in front of each; an unusable answer falls back to the rules.
        Returns (panels, warnings) per caption."""
        if not captions:
            return []
        answers = self._ask([Request(prompts.SPLIT_CAPTION.format(caption=c.replace('"', "'")), None,
                                     self.cfg.max_new_tokens) for c in captions])
        results = []
        for caption, answer in zip(captions, answers, strict=True):
            texts, problems = parse_caption_split(answer.text)
            problems = _cut(answer) + problems
            if texts:
                results.append((with_context(shared_context(caption), texts), problems))
            else:
                results.append((split_caption(caption), [*problems, "used the rule-based split"]))
        return results
