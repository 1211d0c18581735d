"""The Qwen2.5-VL backend: the request plan of Panel2Patch and the reading of its answers; an engine
(engines.py: transformers or vLLM) runs the requests.

The plan, per batch of figures, in three rounds of requests through the engine:
1. FIGURE, once per figure: its panels with their labels and the markers drawn on it, in one answer.
   Asked again at a smaller scale (config `panel_scales`) only where that scale gives the model an
   image of another size: a figure above `max_pixels` is resized to the same input at every scale, and
   asking twice would return the same answer. Panels of all scales are pooled by non-maximum
   suppression among boxes whose labels identify the same panel ("A", "(a)", "Panel A"); markers come
   from the full-scale answer. In the same round, SPLIT_CAPTION once per caption (text only): the
   caption's text per panel label, with the paragraphs that cite the figure as context where it has any
   (the first prompts.CONTEXT_CHARS of them, `citing_context`), checked against the caption alone
   (`captions.split_from_answer`); where it is unusable (unparsable, a label the caption does not name,
   a text not drawn from the caption) the rule-based split stands in for that caption, with a warning.
   The split's labels are the ones the panel labels read off the figure are matched to, and its texts
   become the panels' texts.
2. PANEL, once per panel crop: a short description of it (`text_lvlm`) and boxes for its own caption
   clauses (path B), in one answer; for a labelled panel that the citing paragraphs name ("Figure 3B"),
   with those sentences (`panel_references`, `panel_mentions`).
3. REGION, once per region crop: the regions that fusion (regions.fuse_regions) makes of the panel's
   markers and phrase boxes, each described in a few words (the region's `text_lvlm`). For a phrase box
   in a panel without markers the same answer says whether the crop shows the phrase: the verification
   that stands in for the marker gate there (config `caption_boxes_without_markers`).
So a figure of P panels and R regions costs 2 + P + R requests (3 + P + R where a second scale differs)
and a batch three rounds (plus one retry round for answers cut at their budget), each one generate call
through the engine worker, which the other batches in flight keep busy meanwhile; on the demo
figures with ground-truth answers (tests/bench/annotate_requests.py) 9.33 requests per figure, from 5.17
without the split and the regions. A region is asked about in a crop of its own rather than in one
request per panel listing its regions: on the demo figures the two cost the same (76 regions in 76
panels), and where a panel holds several regions each extra request is small: a region crop there is a
median 10.5 visual tokens (one per 28x28 pixels), the panel crop a listing request would show again 108
(up to 1280, `max_pixels`). The crop also shows the model the region at its own resolution, and shows
a box to verify without the rest of the panel, whose context suggested the phrase in the first place.

Answers are untrusted text: `lvlm_output` keeps what is usable and every problem becomes a warning
in the record's annotation, never an exception. An answer cut at the token budget is asked again
once with a larger one; cut even then, it keeps what it holds and a warning says it was cut.
Prompts are versioned in `prompts.py`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from PIL import Image

from annotate import prompts
from annotate.captions import (caption_label, clean_label, groundable_clauses, label_key, panel_label,
                               referenced_panels, sentence_starts, split_caption, split_from_answer, with_context)
from annotate.config import AnnotateConfig
from annotate.engine_worker import EngineWorker
from annotate.engines import Answer, Engine, Request
from annotate.faults import check_stop
from annotate.lvlm_output import (Parsed, marker_kind, parse_boxes, parse_caption_split, parse_panel_answer,
                                  parse_region_answer, resized_size)
from annotate.pipeline import Proposal
from annotate.regions import fuse_regions, non_max_suppression

# The smallest panel, as shares of the figure's shorter side and of its area: a box under either is a
# marker or a label the model mislabelled, not a panel (a 5 x 6 grid's panels are ~1/6 of a side).
_MIN_PANEL_SIDE = 0.05
_MIN_PANEL_AREA = 0.005
# An answer cut at its budget is asked again once with this many times the budget (capped by
# `AnnotateConfig.max_retry_tokens`); only cut answers pay for it.
_RETRY_FACTOR = 4
# A description keeps this many characters (~75 tokens of English).
_DESCRIPTION_CHARS = 300
# Qwen2.5-VL's smallest input side: a panel crop thinner than this is not asked about, and a region
# crop thinner than this is grown to it about its centre.
_MIN_CROP_SIDE = 28


def read_figure_items(items: list[dict], size: tuple[int, int], caption_labels: list[str]
                      ) -> tuple[list[dict], list[dict], list[str]]:
    """(panels {"box", "label", "key"}, markers {"box", "kind"}, what was dropped) from the boxes of a
    FIGURE answer (lvlm_output items) on an image of `size` (width, height). A label naming a marker
    kind by a word or glyph is a marker (so is any box of a "markers" list); a label-shaped one
    (captions.panel_label) names a panel, spelled as the caption spells it; anything else ("scale
    bar"), and a panel box under the minimum size, is dropped and said."""
    width, height = size
    panels, markers, dropped = [], [], []
    for item in items:
        kind = marker_kind(item["label"]) or ("none" if "marker" in item.get("group", "").casefold() else None)
        if kind is not None:
            markers.append({"box": item["box"], "kind": kind})
            continue
        label = panel_label(item["label"])
        x0, y0, x1, y1 = item["box"]
        if label is None:
            dropped.append(f"{item['label']!r} names neither a panel nor a marker kind; dropped")
        elif min(x1 - x0, y1 - y0) < _MIN_PANEL_SIDE * min(width, height) or \
                (x1 - x0) * (y1 - y0) < _MIN_PANEL_AREA * width * height:
            dropped.append(f"panel {item['label']!r} at {[round(v) for v in item['box']]} is too small for a panel; dropped")
        else:
            # The caption's spelling of the label the model read ("a" where it read "(A)").
            panels.append({"box": item["box"], "label": caption_label(item["label"], caption_labels) or label,
                           "key": label_key(item["label"], caption_labels)})
    return panels, markers, dropped


@dataclasses.dataclass
class CaptionSplit:
    """A caption's decomposition: what the record's panels read, and what is grounded in their crops."""
    panels: list[dict]    # [{"label", "text"}]: each panel's text with the caption's shared context
    own: dict[str, str]   # label -> the panel's own text
    warnings: list[str]


def _rule_split(caption: str) -> CaptionSplit:
    own = {p["label"]: p["text"] for p in split_caption(caption, shared_context=False)}
    return CaptionSplit(split_caption(caption), own, [])


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


def _region_crop(image: Image.Image, box) -> Image.Image:
    x0, y0, x1, y1 = box
    grow_x, grow_y = max(0.0, _MIN_CROP_SIDE - (x1 - x0)) / 2, max(0.0, _MIN_CROP_SIDE - (y1 - y0)) / 2
    return image.crop((int(max(0.0, x0 - grow_x)), int(max(0.0, y0 - grow_y)),
                       int(min(image.width, x1 + grow_x)), int(min(image.height, y1 + grow_y))))


def _quoted(text: str) -> str:
    return text.replace('"', "'")


def _cut_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters after its last sentence that fits, else its last word that
    fits ("" where not even its first word does)."""
    if ends := [start for start in sentence_starts(text) if 0 < start <= limit]:
        return text[:ends[-1]].rstrip()
    space = text.rfind(" ", 0, limit + 1)
    return text[:space].rstrip() if space > 0 else ""


def _flat(paragraph: str) -> str:
    """A paragraph as a request shows it: one line, its double quotes made single (it is quoted)."""
    return _quoted(" ".join(paragraph.split()))


def citing_context(paragraphs: Sequence[str]) -> str:
    """The citing paragraphs a caption split request shows (prompts.SPLIT_CAPTION_WITH_CONTEXT), "" for
    none: in order, each quoted on a line of its own, within prompts.CONTEXT_CHARS. The paragraph that
    would cross the budget is cut at a sentence (else a word) and ends in " …", and the ones after it are
    left out: the article's first paragraph to cite a figure is usually the one that introduces it."""
    shown, left = [], prompts.CONTEXT_CHARS
    for paragraph in paragraphs:
        text = _flat(paragraph)
        if len(text) > left:
            if kept := _cut_text(text, left - 2):  # room for the " …"
                shown.append(kept + " …")
            break
        shown.append(text)
        left -= len(text)
    return "\n".join(f'"{text}"' for text in shown)


def panel_references(paragraphs: Sequence[str]) -> list[tuple[str, set[str]]]:
    """Each sentence of the citing paragraphs that names panels, with the panel letters it names
    ("Figure 3B", "Fig. 3A–C": captions.referenced_panels): read once per figure, for all its panels."""
    found = []
    for paragraph in paragraphs:
        text = _flat(paragraph)
        bounds = [*sentence_starts(text), len(text)]
        for start, end in zip([0, *bounds], bounds):
            if start < end and (named := referenced_panels(text[start:end])):
                found.append((text[start:end].strip(), named))
    return found


def panel_mentions(references: list[tuple[str, set[str]]], label: str) -> str:
    """The sentences of `panel_references` that name panel `label`, in order, cut to
    prompts.PANEL_CONTEXT_CHARS; "" for an unlabelled panel or none."""
    key = clean_label(label).casefold()
    mentions = " ".join(sentence for sentence, named in references if key and key in named)
    if len(mentions) <= prompts.PANEL_CONTEXT_CHARS:
        return mentions
    return kept + " …" if (kept := _cut_text(mentions, prompts.PANEL_CONTEXT_CHARS - 2)) else ""


def _panel_question(phrases: list[str], mentions: str) -> str:
    question = (prompts.PANEL_WITH_PHRASES.format(phrases=", ".join(f'"{p}"' for p in phrases)) if phrases
                else prompts.PANEL)
    return question + (prompts.PANEL_MENTIONS.format(mentions=mentions) if mentions else "")


def _description(text: str) -> str:
    return " ".join(text.split())[:_DESCRIPTION_CHARS]


def _phrase_key(text: str) -> str:
    return " ".join(text.casefold().split())


class QwenBackend:
    def __init__(self, engine: Engine, cfg: AnnotateConfig = AnnotateConfig()):
        self.engine, self.cfg = engine, cfg
        self.name, self.model_id = engine.name, engine.model_id
        # Every batch in flight (run.py) asks through the one worker: see engine_worker.py.
        self.worker = EngineWorker(engine)

    @property
    def counts(self):
        return self.engine.counts

    @property
    def busy_seconds(self) -> float:
        return self.worker.busy_seconds

    def _ask(self, requests: list[Request]) -> list[Answer]:
        """The engine's answers; those cut at their budget are asked again, by themselves, with a larger one:
        a box list cut short loses boxes."""
        if not requests:
            return []
        answers = self._generate(requests)
        retry_budget = min(_RETRY_FACTOR * self.cfg.max_new_tokens, self.cfg.max_retry_tokens)
        again = [n for n, answer in enumerate(answers) if answer.cut_at and answer.cut_at < retry_budget]
        if again:
            retried = self._generate([dataclasses.replace(requests[n], max_new_tokens=retry_budget)
                                            for n in again])
            for n, answer in zip(again, retried, strict=True):
                answers[n] = answer
        return answers

    def _generate(self, requests: list[Request]) -> list[Answer]:
        """The engine's answers, through the worker (which halves a call out of memory, so a round too
        big for the card shrinks without the rounds before it being asked again). Stops here, between
        calls, once a stop is requested."""
        check_stop()
        return self.worker.generate(requests)

    def _seen(self, image: Image.Image) -> tuple[int, int]:
        return resized_size(image.height, image.width, self.cfg.min_pixels, self.cfg.max_pixels)

    def _request(self, question: str, image: Image.Image) -> Request:
        """A request about `image` resized to the frame the model sees it in, here in the batch's host
        thread: the engine's processor, on the engine's thread, then has nothing to resize."""
        height, width = self._seen(image)
        shown = image if image.size == (width, height) else image.resize((width, height), Image.BICUBIC)
        return Request(question, shown, self.cfg.max_new_tokens)

    def _split_request(self, caption: str, context: Sequence[str] = ()) -> Request:
        """The caption split request, which both engines run, showing `context`, the paragraphs citing the
        figure, where it has any."""
        if paragraphs := citing_context(context):
            question = prompts.SPLIT_CAPTION_WITH_CONTEXT.format(paragraphs=paragraphs, caption=_quoted(caption))
        else:
            question = prompts.SPLIT_CAPTION.format(caption=_quoted(caption))
        return Request(question, None, self.cfg.max_new_tokens)

    def propose(self, images: list[Image.Image], captions: list[str],
                contexts: list[list[str]] | None = None) -> list[Proposal]:
        """One proposal per image; `contexts`, where given, holds each figure's citing paragraphs, which its
        caption split request shows."""
        if not images:
            return []
        if contexts is None:
            contexts = [[] for _ in captions]
        # Round 1: each figure at each scale that shows the model an image of a size not asked yet, and
        # each caption's split.
        asks = []  # (figure index, scale, image shown)
        for n, image in enumerate(images):
            sizes = set()
            for scale in self.cfg.panel_scales:
                shown = _scaled(image, scale)
                if (size := self._seen(shown)) not in sizes:
                    sizes.add(size)
                    asks.append((n, scale, shown))
        answers = self._ask([self._request(prompts.FIGURE, shown) for _, _, shown in asks]
                            + [self._split_request(caption, context)
                               for caption, context in zip(captions, contexts, strict=True)])
        splits = [_read_split(caption, answer) for caption, answer in zip(captions, answers[len(asks):], strict=True)]
        by_figure: list[list[tuple[float, Parsed]]] = [[] for _ in images]
        for (n, scale, _), answer in zip(asks, answers[:len(asks)], strict=True):
            parsed = parse_boxes(answer.text, (images[n].height, images[n].width), answer.seen)
            by_figure[n].append((scale, Parsed(parsed.items, _cut(answer) + parsed.problems)))
        proposals = [self._figure_proposal(image, split, parsed)
                     for image, split, parsed in zip(images, splits, by_figure, strict=True)]
        self._describe_and_ground(images, splits, proposals, contexts)
        self._describe_regions(images, proposals)
        return proposals

    def _figure_proposal(self, image: Image.Image, split: CaptionSplit,
                         by_scale: list[tuple[float, Parsed]]) -> Proposal:
        caption_labels = [label for label in split.own if label]
        pooled, markers = [], []
        problems = [f"caption split: {warning}" for warning in split.warnings]
        for rank, (scale, parsed) in enumerate(by_scale):
            found, found_markers, read = read_figure_items(parsed.items, (image.width, image.height), caption_labels)
            problems += [f"figure@{scale}: {problem}" for problem in parsed.problems + read]
            pooled += [panel | {"score": 1.0 / (1 + rank)} for panel in found]
            if rank == 0:
                markers += [marker | {"score": 1.0} for marker in found_markers]
        panels = [{k: p[k] for k in ("box", "label", "score")}
                  for p in non_max_suppression(pooled, self.cfg.panel_nms_iou, group_by="key")]
        if not panels:  # described and grounded in round 2 like any panel
            panels = [{"box": [0.0, 0.0, float(image.width), float(image.height)], "label": "", "score": 0.0}]
            problems.append("no panels in the answer; the whole figure is one panel")
        proposal = Proposal(panels, warnings=problems, caption_split=split.panels)
        for marker in markers:
            owner = next((k for k, p in enumerate(panels) if _inside(marker["box"], p["box"])), None)
            if owner is not None:
                proposal.markers.setdefault(owner, []).append(marker)
        return proposal

    def _describe_and_ground(self, images: list[Image.Image], splits: list[CaptionSplit],
                             proposals: list[Proposal], contexts: list[list[str]]) -> None:
        """Round 2: each panel crop's description and the boxes of its own caption clauses, mapped back to
        the figure; a panel the citing paragraphs name is asked with what they say of it."""
        asks = []  # (figure index, panel index, crop, phrases, mentions)
        for n, (image, split, proposal, context) in enumerate(zip(images, splits, proposals, contexts, strict=True)):
            references = panel_references(context)
            labels = list(split.own)
            own = {label_key(label, labels): text for label, text in split.own.items()}
            for k, panel in enumerate(proposal.panels):
                crop = image.crop(tuple(int(v) for v in panel["box"]))
                if max(crop.size) > self.cfg.max_aspect_ratio * min(crop.size):
                    # Qwen2.5-VL's processor refuses it (smart_resize raises above 200:1), and the raise
                    # would fail the whole batch: the panel stays, undescribed.
                    proposal.warnings.append(f"panel {k} not described: its {crop.width}x{crop.height} crop exceeds "
                                             f"max_aspect_ratio={self.cfg.max_aspect_ratio:g}")
                elif min(crop.size) >= _MIN_CROP_SIDE:
                    phrases = [_quoted(p) for p in groundable_clauses(own.get(label_key(panel["label"], labels), ""))]
                    asks.append((n, k, crop, phrases, panel_mentions(references, panel["label"])))
        answers = self._ask([self._request(_panel_question(phrases, mentions), crop)
                             for _, _, crop, phrases, mentions in asks])
        for (n, k, crop, phrases, _), answer in zip(asks, answers, strict=True):
            proposal = proposals[n]
            description, parsed = parse_panel_answer(answer.text, (crop.height, crop.width), answer.seen)
            proposal.panel_descriptions[k] = _description(description)
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

    def _describe_regions(self, images: list[Image.Image], proposals: list[Proposal]) -> None:
        """Round 3: each region's crop described, and each phrase box of a panel without markers verified
        where the config says so. The description goes on the phrase or marker the region comes from, and
        the verdict on the phrase, so that the record's fusion (pipeline.build_record) makes the same
        regions with their texts, less the boxes not verified."""
        verify = self.cfg.caption_boxes_without_markers == "verify"
        # Fused as if every caption box were kept: those to verify are among the regions asked about.
        candidates_cfg = dataclasses.replace(self.cfg, caption_boxes_without_markers="keep") if verify else self.cfg
        asks = []  # (figure index, panel index, region, the phrase or marker it comes from, verify it)
        for n, proposal in enumerate(proposals):
            for k, panel in enumerate(proposal.panels):
                markers, phrases = proposal.markers.get(k, []), proposal.phrases.get(k, [])
                for region in fuse_regions(panel["box"], markers, phrases, candidates_cfg):
                    if region["source"] == "marker":
                        origin = next(m for m in markers if m["box"] == region["marker_box"])
                    else:
                        origin = next(p for p in phrases if p["text"] == region["text_sub"])
                    asks.append((n, k, region, origin, verify and region["source"] == "caption"))
        answers = self._ask([self._request(prompts.REGION_WITH_PHRASE.format(phrase=_quoted(region["text_sub"]))
                                           if to_verify else prompts.REGION, _region_crop(images[n], region["box"]))
                             for n, _, region, _, to_verify in asks])
        for (n, k, region, origin, to_verify), answer in zip(asks, answers, strict=True):
            description, shows, problems = parse_region_answer(answer.text)
            origin["description"] = _description(description)
            if to_verify:
                origin["verified"] = shows is True
                if shows is None:
                    problems.append("no verdict on whether it shows its phrase; its box is dropped")
            name = region["text_sub"][:30] if region["source"] != "marker" else region["marker_kind"]
            label = proposals[n].panels[k]["label"] or str(k)
            proposals[n].warnings += [f"panel {label} region {name!r}: {problem}"
                                      for problem in _cut(answer) + problems]

    def split_captions(self, captions: list[str]) -> list[tuple[list[dict], list[str]]]:
        """LVLM-assisted caption decomposition (`_read_split`): (panels, warnings) per caption."""
        answers = self._ask([self._split_request(caption) for caption in captions])
        return [(split.panels, split.warnings)
                for split in map(_read_split, captions, answers)]


def _read_split(caption: str, answer: Answer) -> CaptionSplit:
    """The LVLM's split of `caption` where usable, with the rules' shared context in front of each text
    (the LVLM's where the rules find no labels); else the rule-based split, and warnings that say why.
    An answer cut even at the retry budget keeps the panels it holds. "[]" (one image) where the rules
    find no labels either is the rules' one panel, without a warning."""
    texts, problems = parse_caption_split(answer.text)
    own, context, unusable = split_from_answer(caption, texts)
    problems = _cut(answer) + problems + unusable
    if own:
        return CaptionSplit(with_context(context, own), own, problems)
    rules = _rule_split(caption)
    if len(rules.panels) > 1 and not problems:
        problems = [f"the answer lists no panels where the rules find {len(rules.panels)}"]
    if problems:
        rules.warnings = [*problems, "used the rule-based split"]
    return rules
