"""Rule-based caption decomposition: a compound-figure caption -> one text per panel label.

Panel markers come in a few styles: "(A)", "(a, b)", "(A–C)", "((c), (d))", "A)", "A.", "A:", "A and
C:", "B1/B2", and bare "a ... b ..." lists. A marker that starts a clause labels the text after it
(prefix); one that ends a clause labels the text before it (postfix, "... for LDLR (a);"); one inside
a clause ("same case as (A) with ...") is a reference and labels nothing. Every panel text starts
with the caption's shared context (the text before the first marker). A caption with no panel
markers yields one panel with label "".
"""
from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Iterable

_LABEL = r"(?:[A-Za-z](?:\d{1,2})?|\d{1,2}|left|right|top|bottom|upper|lower|middle|center)"
_JOIN = r"(?:\s*(?:,\s*and\s+|,|&|/)\s*|\s+(?:and|or)\s+)"
_RANGE = r"(?:\s*[-–—]\s*|\s+to\s+)"
_GROUP = rf"{_LABEL}(?:(?:{_RANGE}|{_JOIN}){_LABEL})*"
_LETTER_GROUP = rf"[A-Za-z]\d{{0,2}}(?:(?:{_RANGE}|{_JOIN})[A-Za-z]\d{{0,2}})*"
# "((a), (b))", "(A)", "(A–C)", "(A and B)", "(B1/B2)"
_PAREN_GROUP = rf"\(\s*\(\s*{_GROUP}\s*\)(?:{_JOIN}\(\s*{_GROUP}\s*\))*\s*\)|\(\s*{_GROUP}\s*\)"
_STYLES = {
    "paren": re.compile(_PAREN_GROUP),
    # "A) text", "A. text", "A: text", "A, text", "A and C: text" at the start of a clause; letters only
    # so that "p<0.05)" or "2.5." never look like labels.
    "closing": re.compile(rf"(?:^|(?<=[.;:,)\]]\s)|(?<=[a-z0-9)\]][.;:])|(?<=\band\s)|(?<=\s{{2}}))({_LETTER_GROUP})"
                          rf"(\)|[.:,](?=\s|[A-Z]))"),
    # "1: untreated; 2) treated" at the start of a clause
    "numbered": re.compile(r"(?:^|(?<=[.;:]\s))(\d{1,2})(?=[:)]\s)[:)]"),
    # "Top: H&E. Bottom panel: Ki-67."
    "positional": re.compile(r"(?:^|(?<=[.;]\s))(?i:(left|right|top|bottom|upper|lower|middle|center)"
                             r"(?:\s+(?:panel|row|image|column))?)\s*[:)]"),
    # "a *10 magnification ... b *40 ...": a bare letter after a clause boundary
    "bare": re.compile(r"(?:^|(?<=[.;:,]\s)|(?<=[a-z][.;:]))([A-Za-z])(?=\s+\S)"),
}
_HEMATOXYLIN_EOSIN = re.compile(r"\(?\s*H\s*(?:&|and|-|/)\s*E\s*\)?[.:,)]?", re.IGNORECASE)
_POSITIONAL = {"left", "right", "top", "bottom", "upper", "lower", "middle", "center"}


@dataclasses.dataclass
class Marker:
    start: int
    end: int
    labels: list[str]
    text: str
    role: str = ""  # prefix, postfix or reference


def _expand(group: str) -> list[str]:
    """'A–C' -> [A, B, C]; 'A, D and G' -> [A, D, G]; 'B1/B2' -> [B1, B2]."""
    group = re.sub(r"[()]", " ", group)
    labels: list[str] = []
    for part in re.split(_JOIN, group.strip()):
        bounds = re.split(_RANGE, part.strip())
        if len(bounds) == 2 and len(bounds[0]) == len(bounds[1]) == 1 and bounds[0] < bounds[1] \
                and bounds[0].isalpha() == bounds[1].isalpha():
            first, last = bounds
            labels += [chr(c) for c in range(ord(first), ord(last) + 1)]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit() and int(bounds[0]) < int(bounds[1]):
            labels += [str(n) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            labels += [b for b in bounds if b]
    return labels


def _find(caption: str, style: str) -> list[Marker]:
    found = []
    for match in _STYLES[style].finditer(caption):
        group = match.group(0) if style == "paren" else match.group(1)
        group = group.lower() if style == "positional" else group
        labels = _expand(group)
        if labels and all(re.fullmatch(_LABEL, label) for label in labels):
            found.append(Marker(match.start(), match.end(), labels, match.group(0)))
    return found


def _position(caption: str, marker: Marker, style: str) -> str:
    """'start' of a clause, 'end' of a clause, or 'inside' one."""
    raw_before = caption[:marker.start]
    before, after = raw_before.rstrip(), caption[marker.end:].lstrip()
    # "tumorigenesis(a) H&E": no space before the parenthesis means a lost sentence break.
    starts = not before or before[-1] in ".;:,)]" or style != "paren" or raw_before == before
    ends = not after or after[0] in ".;,:" or re.match(r"(and|or)\b", after) is not None
    if starts and not (ends and after[:1] in ".;"):
        return "start"
    return "end" if ends else "inside"


def _assign_roles(caption: str, markers: list[Marker], style: str) -> None:
    """prefix / postfix / reference. A mid-clause marker repeating a known label is a reference
    ("same case as (A) with"); one with a new label follows the caption's leading style."""
    seen: set[str] = set()
    leading = None
    for marker in markers:
        position = _position(caption, marker, style)
        new = any(label not in seen for label in marker.labels)
        if position == "start":
            marker.role = "prefix"
        elif position == "end" and new:
            marker.role = "postfix"
        elif new:
            marker.role = leading or "prefix"
        else:
            marker.role = "reference"
        if marker.role != "reference":
            leading = leading or marker.role
            seen.update(marker.labels)


def _letters(labels) -> list[str]:
    return [label[0] for label in labels if label.lower() not in _POSITIONAL]


def _plausible(markers: list[Marker]) -> bool:
    """Panel labels start at a/A/1 and cover at least two panels in one case."""
    labels = [label for m in markers if m.role != "reference" for label in m.labels]
    letters = _letters(labels)
    if len(set(labels)) < 2:
        return False
    if all(label.lower() in _POSITIONAL for label in labels):
        return True
    if letters and all(c.isdigit() for c in letters):
        return "1" in labels
    alpha = [c for c in letters if c.isalpha()]
    if not alpha or not (all(c.isupper() for c in alpha) or all(c.islower() for c in alpha)):
        return False
    return alpha[0].lower() == "a" and len(set(alpha)) >= 2


def clean_label(label: str) -> str:
    """A panel label as read, without brackets, punctuation or a "Panel" around it: "(A)" -> "A",
    "Ｂ." -> "B", "left panel" -> "left"."""
    bare = unicodedata.normalize("NFKC", label or "")
    bare = re.sub(r"^\s*panels?\s+|\s+(?:panels?|rows?|columns?|images?)\s*$", "", bare, flags=re.IGNORECASE)
    return re.sub(r"[^0-9A-Za-z]", "", bare)


# Roman numerals up to 39: more panels than any figure has.
_ROMAN = re.compile(r"x{0,3}(?:ix|iv|v?i{0,3})", re.IGNORECASE)
_ROMAN_DIGITS = {"i": 1, "v": 5, "x": 10}


def _roman_value(text: str) -> int | None:
    if not text or not _ROMAN.fullmatch(text):
        return None
    values = [_ROMAN_DIGITS[c] for c in text.lower()]
    return sum(-v if v < after else v for v, after in zip(values, [*values[1:], 0]))


@functools.lru_cache(maxsize=1024)
def _label_style(labels: frozenset[str]) -> tuple[bool, bool]:
    """(case matters, roman numerals) for a caption's set of labels. Case matters only where the set
    itself has two labels that differ by case alone ("A" and "a"). The set is roman when every label
    is a roman numeral and one has two letters or more: "i, ii, iii" is roman, while "c, d" or a lone
    "i" are letters."""
    cleaned = {clean_label(label) for label in labels} - {""}
    case_matters = len({c.casefold() for c in cleaned}) < len(cleaned)
    roman = all(_roman_value(c) for c in cleaned) and any(len(c) > 1 for c in cleaned)
    return case_matters, roman


def label_key(label: str, among: Iterable[str] = ()) -> str:
    """What a panel label identifies, however it is written, in the style of `among` (the caption's
    labels): "(A)", "a.", "Panel A" and "a" are one panel unless the caption has both "A" and "a";
    "01" and "1" are one; and among roman labels "ii", "(II)" and "2" are one, while among letters
    "i" stays the letter i."""
    cleaned = clean_label(label)
    case_matters, roman = _label_style(frozenset(among))
    if cleaned.isdigit():
        return str(int(cleaned))
    if case_matters:
        return cleaned
    if roman and (value := _roman_value(cleaned)):
        return str(value)
    return cleaned.casefold()


def caption_label(label: str, caption_labels: Iterable[str]) -> str | None:
    """The caption's spelling of the panel `label` names ("a" for an LVLM's "(A)", "ii" for "II"),
    or None when it names none of the caption's labels."""
    labels = [c for c in caption_labels if c]
    key = label_key(label, labels)
    return next((c for c in labels if label_key(c, labels) == key), None) if key else None


def _label_order(label: str):
    return (label[0].isdigit(), int(label) if label.isdigit() else 0, label.lower(), label)


def _keep_label_run(markers: list[Marker]) -> list[Marker]:
    """Drop markers outside the run of panel letters a, b, c… (one gap allowed): "(N)" for normal
    glands or "(H & E)" among panels A–F are abbreviations, not panels."""
    markers = [m for m in markers if m.role != "reference" and not _HEMATOXYLIN_EOSIN.fullmatch(m.text)]
    cased = [label[0] for m in markers for label in m.labels
             if label[0].isalpha() and label.lower() not in _POSITIONAL]
    if not cased:
        return markers
    # Panel letters share one case: "(A)…(D)" with "c1 and c2:" inside D's text keeps A–D.
    upper = sum(c.isupper() for c in cased) * 2 >= len(cased)
    markers = [m for m in markers if all(label[0].isupper() == upper for label in m.labels)]
    letters = {label[0].lower() for m in markers for label in m.labels}
    run, c = set(), "a"
    while c in letters or chr(ord(c) + 1) in letters:
        run.add(c)
        c = chr(ord(c) + 1)
    return [m for m in markers if all(label.lower() not in _POSITIONAL and label[0].lower() in run
                                      for label in m.labels)]


def _markers(caption: str) -> list[Marker]:
    for style in ("paren", "closing", "numbered", "positional", "bare"):
        markers = _find(caption, style)
        if style == "paren":
            markers += [m for m in _find(caption, "closing") if not any(
                o.start <= m.start < o.end for o in markers)]
            markers.sort(key=lambda m: m.start)
        _assign_roles(caption, markers, style)
        markers = _keep_label_run(markers)
        if style == "bare":  # a, b, c… in order only: a bare "a" is usually the article
            markers = [m for n, m in enumerate(markers) if ord(m.labels[0].lower()) - ord("a") == n]
        if _plausible(markers):
            return markers
    return []


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip(" ,;")
    return re.sub(r"^(?:and|or)\s+", "", text)


def split_caption(caption: str, shared_context: bool = True) -> list[dict]:
    """[{'label', 'text'}] in label order; one unlabelled panel if no markers. With
    shared_context=False each text is the panel's own clauses only (what to ground in its crop)."""
    caption = caption or ""
    markers = _markers(caption)
    if not markers:
        return [{"label": "", "text": _clean(caption)}]
    # Spans between markers: a prefix marker owns the text after it, a postfix one the text before.
    context_end = _context_end(caption, markers[0])
    texts: dict[str, list[str]] = {}
    for n, marker in enumerate(markers):
        if marker.role == "prefix":
            end = markers[n + 1].start if n + 1 < len(markers) else len(caption)
            if n + 1 < len(markers) and markers[n + 1].role == "postfix":
                end = _clause_start(caption, marker.end, markers[n + 1].start)
            span = caption[marker.end:end]
        else:
            previous_end = markers[n - 1].end if n else context_end
            span = caption[max(previous_end, context_end):marker.start]
        for label in marker.labels:
            texts.setdefault(label, []).append(_clean(span))
    context = _clean(caption[:context_end]) if shared_context else ""
    # Letters and numbers in label order; "top"/"bottom" as the caption reads.
    order = list(texts) if any(label.lower() in _POSITIONAL for label in texts) else sorted(texts, key=_label_order)
    return with_context(context, {label: " ".join(texts[label]) for label in order})


def _context_end(caption: str, first: Marker) -> int:
    """Where the shared context ends: at the first prefix marker, or where the clause a first
    postfix marker closes begins."""
    if first.role == "postfix":
        return max(caption.rfind(p, 0, first.start) for p in (". ", ": ", ".")) + 1
    return first.start


def shared_context(caption: str) -> str:
    """The caption's text that every panel shares (title sentence, abbreviations); "" when the
    caption has no panel markers."""
    markers = _markers(caption or "")
    return _clean(caption[:_context_end(caption, markers[0])]) if markers else ""


def with_context(context: str, texts: dict[str, str]) -> list[dict]:
    """[{'label', 'text'}] with the shared context in front of each panel's own text."""
    return [{"label": label, "text": _clean(f"{context} {text}")} for label, text in texts.items()]


# An LVLM may mend a clause's grammar as it splits it off, but a text mostly of words the caption does
# not use was written, not split off.
_MIN_CAPTION_WORDS = 0.8


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def split_from_answer(caption: str, texts: dict[str, str]) -> tuple[dict[str, str], str, list[str]]:
    """An LVLM's split of `caption` ({label: own text}, "" for the text all panels share) checked
    against the caption: (own texts under the caption's spellings of the labels, the shared context,
    problems). Usable only when every label is one the caption names (a label of the rules' split, or
    the label standing alone in the caption) and every text is drawn from the caption; otherwise the
    own texts are empty and the problems say why."""
    rule_labels = [p["label"] for p in split_caption(caption) if p["label"]]
    caption_words = set(_words(caption))
    own: dict[str, str] = {}
    problems = []
    for label, text in texts.items():
        words = _words(text)
        if words and sum(w in caption_words for w in words) < _MIN_CAPTION_WORDS * len(words):
            problems.append(f"text for {label!r} is not drawn from the caption: {text[:40]!r}")
        if not label:
            continue
        for part in _expand(label):
            spelt = caption_label(part, rule_labels) or _standing_alone(caption, part)
            if spelt is None:
                problems.append(f"label {part!r} is not one the caption names")
            else:
                own[spelt] = f"{own[spelt]} {text}" if spelt in own else text
    if problems:
        return {}, "", problems
    # The rules' shared context where they find labels, else the LVLM's; taken off the front of a text
    # that repeats it, so that it is in front of each panel's text once.
    context = shared_context(caption) or _clean(texts.get("", ""))
    return {label: _after(context, _clean(text)) for label, text in own.items()}, context, []


def _after(lead: str, text: str) -> str:
    return _clean(text[len(lead):]) if lead and text[:len(lead)].casefold() == lead.casefold() else text


def _standing_alone(caption: str, label: str) -> str | None:
    """The caption's spelling of `label` where it is shaped like a panel label and stands alone in the
    caption ("(ii)", "A:"), the label's own case first, or where it closes a lost sentence break
    ("…tissuesA) Evaluation"); else None."""
    cleaned = clean_label(label)
    if not (re.fullmatch(_LABEL, cleaned, re.IGNORECASE) or _roman_value(cleaned)):
        return None
    found = [m.group(0) for m in re.finditer(rf"(?<![0-9A-Za-z]){re.escape(cleaned)}(?![0-9A-Za-z])", caption,
                                             re.IGNORECASE)]
    if cleaned in found or re.search(rf"(?<=[a-z]){re.escape(cleaned)}\)", caption):
        return cleaned
    return next(iter(found), None)


def _clause_start(caption: str, lo: int, hi: int) -> int:
    cut = max(caption.rfind(p, lo, hi) for p in (". ", "; "))
    return cut + 1 if cut >= lo else hi


_MARKER_WORDS = re.compile(r"\b(arrow|arrowhead|asterisk|star|circle|circled|box|boxed|inset|dashed|outline)s?\b",
                           re.IGNORECASE)


def groundable_clauses(text: str, limit: int = 3) -> list[str]:
    """Clauses of a panel's own text worth grounding in its crop, those naming a marker first."""
    clauses = [c.strip(" ,;.") for c in re.split(r"[.;]\s+|\.$", text)]
    clauses = [c for c in clauses if len(c.split()) >= 2]
    return sorted(clauses, key=lambda c: _MARKER_WORDS.search(c) is None)[:limit]
