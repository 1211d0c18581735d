"""Reading LVLM grounding answers, which are untrusted text, into boxes in original pixels.

Qwen2.5-VL usually answers with a fenced JSON list such as
  [{"bbox_2d": [34, 12, 410, 388], "label": "A"}, ...]
sometimes with prose around it, wrong key names, or cut off mid-list at the token limit. Its
coordinates are absolute pixels of the image it saw, which smart_resize made a multiple of 28 within
min/max pixels (unlike Qwen2-VL's 0-1000 grid): they are mapped back to the original image here.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from zoomin_jax.records import clip_box

_BOX_KEYS = ("bbox_2d", "bbox", "box", "bounding_box", "coordinates")
_LABEL_KEYS = ("label", "text", "identifier", "name", "id")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)


@dataclasses.dataclass
class Parsed:
    items: list[dict]  # {"box": [x0, y0, x1, y1] in original pixels, "label": str}
    problems: list[str]  # one reason per thing that was dropped or repaired


def _json_objects(text: str) -> tuple[list, bool]:
    """(JSON values in `text`, whether they were salvaged): the whole list when the answer is one
    that parses, the object when it is one object, else every complete {...} in it."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    listed = _answer_list(body)
    if listed is not None:
        return listed, False
    start = body.find("{")
    if start >= 0:
        try:
            value, end = json.JSONDecoder().raw_decode(body[start:])
            if "{" not in body[start + end:]:
                return [value], False
        except json.JSONDecodeError:
            pass
    return _complete_objects(body), True


def _complete_objects(body: str) -> list:
    """Every complete {...} in `body`, outermost first, left to right."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while (position := body.find("{", position)) >= 0:
        try:
            value, end = decoder.raw_decode(body, position)
            objects.append(value)
            position = end
        except json.JSONDecodeError:
            position += 1
    return objects


def resized_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the image Qwen2.5-VL actually sees."""
    return smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)


def parse_boxes(text: str, original_size: tuple[int, int], seen_size: tuple[int, int]) -> Parsed:
    """Boxes in original pixels from an answer about an image of `seen_size` (height, width)."""
    objects, salvaged = _json_objects(text or "")
    if not objects:
        return Parsed([], [f"no JSON boxes in answer: {text[:80]!r}" if text else "empty answer"])
    parsed = _boxes(objects, original_size, seen_size)
    return Parsed(parsed.items, (["truncated or malformed JSON; kept the complete objects"] if salvaged else [])
                  + parsed.problems)


# A marker's kind by the words (or glyphs) of its label: "white arrows", "arrow 1", "*" -> arrow,
# arrow, asterisk. A drawn box usually outlines the area an inset enlarges.
_MARKER_WORDS = {"arrow": "arrow", "arrowhead": "arrowhead", "asterisk": "asterisk", "star": "asterisk",
                 "circle": "circle", "inset": "inset", "box": "inset", "rectangle": "inset", "letter": "letter"}
_MARKER_GLYPHS = {"*": "asterisk", "★": "asterisk", "☆": "asterisk", "✱": "asterisk", "→": "arrow", "←": "arrow",
                  "↑": "arrow", "↓": "arrow", "➔": "arrow", "➜": "arrow", "▶": "arrowhead", "►": "arrowhead",
                  "▲": "arrowhead", "◀": "arrowhead", "▼": "arrowhead"}


def marker_kind(label: str) -> str | None:
    """The records.MARKER_KINDS kind a label names by any of its words (singular or plural) or glyphs,
    or None: "red circles" -> circle, "arrowhead 2" -> arrowhead, "→" -> arrow, "A" -> None."""
    for token in re.findall(r"[^\W\d_]+|[^\w\s]", unicodedata.normalize("NFKC", label or "").casefold()):
        if token in _MARKER_GLYPHS:
            return _MARKER_GLYPHS[token]
        for word in (token, token.removesuffix("s"), token.removesuffix("es")):
            if word in _MARKER_WORDS:
                return _MARKER_WORDS[word]
    return None


def _holds_objects(value) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(e, dict) for e in value))


def box_objects(value, group: str = "") -> list[tuple[dict, str]]:
    """Every object holding a box in a parsed answer, with the key of the list it came from ("" at the
    top): a list of boxes, one box object, or an object of lists ({"panels": [...], "markers": [...]})."""
    if isinstance(value, list):
        return [found for element in value for found in box_objects(element, group)]
    if not isinstance(value, dict):
        return [(value, group)]
    if any(k in value for k in _BOX_KEYS):
        return [(value, group)]
    nested = [(key, inner) for key, inner in value.items() if _holds_objects(inner)]
    return [found for key, inner in nested for found in box_objects(inner, key)] or [(value, group)]


def _boxes(objects: list, original_size: tuple[int, int], seen_size: tuple[int, int]) -> Parsed:
    """Items {"box", "label", "group"} of every box object in `objects` (see box_objects); a box given
    again with the same label (a decoding loop) is kept once."""
    height, width = original_size
    seen_h, seen_w = seen_size
    items, problems, seen, repeated = [], [], set(), 0
    for obj, group in box_objects(objects):
        if not isinstance(obj, dict):
            problems.append(f"not an object: {str(obj)[:40]}")
            continue
        box = next((obj[k] for k in _BOX_KEYS if k in obj), None)
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            problems.append(f"no 4-number box in {json.dumps(obj)[:60]}")
            continue
        x0, y0, x1, y1 = box
        scaled = [x0 * width / seen_w, y0 * height / seen_h, x1 * width / seen_w, y1 * height / seen_h]
        clipped = clip_box(scaled, width, height)
        if clipped is None:
            problems.append(f"box {box} lies outside the {seen_w}x{seen_h} input")
            continue
        if clipped != [float(v) for v in scaled]:
            problems.append(f"box {box} clipped to the image")
        label = str(next((obj[k] for k in _LABEL_KEYS if k in obj), "")).strip()
        if (key := (tuple(clipped), label)) in seen:
            repeated += 1
            continue
        seen.add(key)
        items.append({"box": clipped, "label": label, "group": group})
    return Parsed(items, problems + ([f"{repeated} repeated boxes dropped"] if repeated else []))


_DESCRIPTION = re.compile(r'"description"\s*:\s*"((?:[^"\\]|\\.)*)', re.DOTALL)
_VERDICT = re.compile(r'"shows"\s*:\s*"?(true|false|yes|no)\b', re.IGNORECASE)


def _answer_object(text: str) -> tuple[dict | None, str, int]:
    """(the answer's JSON object when one parses whole, the answer's body (inside a code fence if it
    has one), where the body's first "{" is: -1 when it has none)."""
    body = (_FENCE.search(text) or re.match(r"(.*)", text, re.DOTALL)).group(1)
    start = body.find("{")
    if start >= 0:
        try:
            whole, _ = json.JSONDecoder().raw_decode(body[start:])
            if isinstance(whole, dict):
                return whole, body, start
        except json.JSONDecodeError:
            pass
    return None, body, start


def _answer_list(body: str) -> list | None:
    """The answer's JSON list when it opens with one (before any "{") and parses whole."""
    start, brace = body.find("["), body.find("{")
    if start < 0 or 0 <= brace < start:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _description_so_far(body: str) -> str:
    """The description a cut-off (or malformed) answer began."""
    found = _DESCRIPTION.search(body)
    try:
        return json.loads(f'"{found.group(1)}"') if found else ""
    except json.JSONDecodeError:  # cut inside an escape sequence
        return found.group(1).rsplit("\\", 1)[0]


def parse_panel_answer(text: str, original_size: tuple[int, int], seen_size: tuple[int, int]) -> tuple[str, Parsed]:
    """(description, phrase boxes in original pixels) from an answer shaped like
    {"description": "...", "boxes": [{"bbox_2d": [...], "label": "phrase"}]}. Cut off, it keeps the
    description read so far and the complete boxes; with no JSON at all, the answer is the description."""
    text = text or ""
    whole, body, start = _answer_object(text)
    listed = _answer_list(body)
    if listed is not None or (whole is not None and any(k in whole for k in _BOX_KEYS)):
        # Qwen2.5-VL's trained grounding form, a list of boxes (or one box), without the description.
        parsed = _boxes(listed if listed is not None else [whole], original_size, seen_size)
        return "", Parsed(parsed.items, ["boxes without a description"] + parsed.problems)
    if whole is not None:
        description = whole.get("description")
        rest = {key: value for key, value in whole.items() if key != "description" and _holds_objects(value)}
        parsed = _boxes([rest] if rest else [], original_size, seen_size)
        if not isinstance(description, str):
            parsed.problems.insert(0, "no description in answer")
        return (description if isinstance(description, str) else ""), parsed
    if start < 0:
        return text, Parsed([], ["no JSON object in answer; kept it as the description"] if text else ["empty answer"])
    # Cut off (or malformed): whatever description it began, and every complete box object.
    objects = _complete_objects(body[start + 1:])
    parsed = _boxes([o for o in objects if isinstance(o, dict) and any(k in o for k in _BOX_KEYS)],
                    original_size, seen_size)
    return _description_so_far(body), Parsed(parsed.items, ["truncated or malformed JSON; kept the description and "
                                                            "complete boxes"] + parsed.problems)


def _verdict(value) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "yes": True, "false": False, "no": False}.get(str(value).strip().casefold())


def parse_region_answer(text: str) -> tuple[str, bool | None, list[str]]:
    """(description, whether the region shows the phrase asked about, problems) from an answer shaped
    like {"description": "...", "shows": true}; the verdict is None where the answer gives none (and
    where no phrase was asked about). With no JSON at all, the answer is the description."""
    text = text or ""
    whole, body, start = _answer_object(text)
    if whole is not None:
        description, verdict = whole.get("description"), _verdict(whole.get("shows"))
        return ((description, verdict, []) if isinstance(description, str)
                else ("", verdict, ["no description in answer"]))
    found = _VERDICT.search(body)
    verdict = _verdict(found.group(1)) if found else None
    if start < 0:
        return text, verdict, ["no JSON object in answer; kept it as the description"] if text else ["empty answer"]
    return _description_so_far(body), verdict, ["truncated or malformed JSON; kept the description"]


def parse_caption_split(text: str) -> tuple[dict[str, str], list[str]]:
    """{label: own text} from an answer listing [{"label": "A", "text": "..."}] (label "" for the
    text all panels share); problems say what was dropped. Texts given twice for one label are joined.
    An answer listing nothing ("[]": the caption describes one image) gives no texts and no problems."""
    objects, salvaged = _json_objects(text or "")
    problems = ["truncated or malformed JSON; kept the complete objects"] if salvaged and objects else []
    if not objects:
        return {}, ([] if text and not salvaged else
                    [f"no JSON panel texts in answer: {text[:80]!r}"] if text else ["empty answer"])
    texts: dict[str, str] = {}
    for obj in objects:
        label = next((obj[k] for k in _LABEL_KEYS if k in obj and k != "text"), None) if isinstance(obj, dict) else None
        own = next((obj[k] for k in ("text", "caption", "subcaption", "description") if k in obj), None) \
            if isinstance(obj, dict) else None
        if not (isinstance(label, str) and isinstance(own, str) and own.strip()):
            problems.append(f"no label and text in {json.dumps(obj)[:60]}")
            continue
        label = label.strip().strip("()")
        texts[label] = f"{texts[label]} {own.strip()}" if label in texts else own.strip()
    return texts, problems
