"""Rule-based caption decomposition: a compound-figure caption -> one text per panel label.

Panel markers come in these styles, and one caption may mix them: "(A)", "(a.)", "(a, b)", "(A–C)",
"((c), (d))", "(Panel a)", "(Figure 4a)", "(PSA; image C)", "A)", "A.", "A:", "A,", "Panel A:",
"A and C:", "B1/B2", bare letters ("A dorsal view B ventral view", "a … b …"), numbers "1. … 2. …",
number ranges followed by single numbers ("1–2 species X: 1 male, 2 female 3–4 …") and positions
("Top:", "(left)", "left –"). A marker that starts a clause labels the text after it (prefix); one that
ends a clause labels the clause before it (postfix, "… for LDLR (a);"); one inside a clause that repeats
a known label ("same case as (A) with") is a reference and labels nothing.

Each panel's text is the caption's shared lead (the text before the first label; none where the first
label closes its clause), its own clauses, and the notes all panels share: sentences after a
postfix-labelled sentence, what such a sentence says of all its panels ("CT (a) and MRI (b) show …"),
and trailing abbreviations, scale bars, magnifications, statistics, credits and sentences about all
panels (a note naming some panels goes to those). Letters, numbers and positions that name structures,
other figures or an order in one image make no panels: "(1) stomach", "1: …", "Type A", "vitamin C",
"phase 2", "Fig. 3", "(vertical diameter (B))", "(left to right)". A caption without panel markers
yields one panel with label "".
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import re
import unicodedata
from collections.abc import Iterable

_POSITIONS = ("left", "right", "top", "bottom", "upper", "lower", "middle", "center", "centre")
_POSITION = "|".join(_POSITIONS)
_LABEL = rf"(?:[A-Za-z](?:\d{{1,2}})?|\d{{1,2}}|(?i:{_POSITION}))"
_JOIN = r"(?:\s*(?:,\s*and\s+|,|&|/)\s*|\s+(?:and|or)\s+)"
_RANGE = r"(?:\s*[-–—]\s*|\s+to\s+)"
_GROUP = rf"{_LABEL}(?:(?:{_RANGE}|{_JOIN}){_LABEL})*"
_LETTER_GROUP = rf"[A-Za-z]\d{{0,2}}(?:(?:{_RANGE}|{_JOIN})[A-Za-z]\d{{0,2}})*"
# "(Panel a)", "(image A and B)", "(Figure 4a)": a word that says the label names a panel.
_PANEL_WORD = r"(?i:(?:panels?|images?)\s+|fig(?:ure)?s?\.?\s*\d{1,2}\s*)"
_CLAUSE_START = r"(?:^|(?<=[.;:,)\]]\s)|(?<=[A-Za-z0-9)\]][.;:])|(?<=\band\s)|(?<=\s{2})|(?<=\())"
# Each style: patterns whose group 1 is the label group.
_STYLES = {
    "paren": [re.compile(rf"\(\s*(\(\s*{_GROUP}\s*\)(?:{_JOIN}\(\s*{_GROUP}\s*\))*)\s*\)"),  # ((a), (b))
              re.compile(rf"\(\s*({_GROUP})\s*\.?(?i:\s+(?:panels?|images?|columns?|rows?))?\s*\)")],
    "panel-word": [re.compile(rf"\(\s*{_PANEL_WORD}({_GROUP})\s*\)"),
                   re.compile(rf"\([^()]*?[;,]\s*(?i:panels?|images?)\s+({_LETTER_GROUP})\s*\)")],
    # labels that end or start a bracketed note: "(anti-CD34, E–H)", "(C, red, ×200)"
    "paren-note": [re.compile(r"\([^()]*?[;,]\s*([A-Za-z]\s*[-–]\s*[A-Za-z])\s*\)"),
                   re.compile(r"\(\s*([A-Za-z])\s*,[^()]*?(?:[×x*]\s*\d+|\d+\s*[×x*])[^()]*\)")],
    # "A) text", "A. text", "A: text", "A, text", "Panel A: text" at the start of a clause, and "A) text"
    # glued to the word before it (a lost sentence break: "…tissuesA) Evaluation"); letters only, so that
    # "p<0.05)" or "2.5." never look like labels.
    "closing": [re.compile(rf"(?:{_CLAUSE_START}|(?<=[a-z])(?=[A-Z]\)\s))(?i:panels?\s+)?({_LETTER_GROUP})"
                           rf"(?:\)|[.:,](?=\s|[A-Z])|\s:(?=\s))")],
    # "… for progesterone receptor f) in …": a closing bracket after a letter that ends a clause
    "closing-end": [re.compile(r"(?<=[A-Za-z0-9]\s)([A-Za-z])\)(?=[\s.;,])")],
    # "Top: H&E.", "(left – before, right – after)"
    "positional": [re.compile(rf"(?:^|(?<=[.;,]\s)|(?<=\())(?i:({_POSITION})(?:\s+(?:panels?|rows?|images?|columns?))?)"
                              r"\s*(?:[:)]|\s[-–—](?=\s))")],
    # "1. Axial CT. 2. Coronal CT." at the start of a sentence
    "numbered": [re.compile(r"(?:^|(?<=[.;]\s))(\d{1,2})\.(?=\s+[A-Z])")],
    # "a *10 magnification … b *40 …": a bare letter (or "A–B") at the start of a clause
    "bare": [re.compile(r"(?:^|(?<=[.;:,]\s)|(?<=[a-z][.;:]))([A-Za-z](?:\s*[-–]\s*[A-Za-z])?)(?=\s+\S)")],
    # "… upper surfaces B Close-up …": a bare letter inside the text, in a caption of bare labels
    "bare-inside": [re.compile(r"(?<=[a-z]\s)([A-Za-z])(?=\s+[A-Za-z]|\s*$)")],
    # "1–2 species X: 1 male, 2 female 3–4 …", in a caption that starts with such a range
    "bare-number": [re.compile(r"(?:^|(?<=\s))(\d{1,2}(?:\s*[-–]\s*\d{1,2})?)(?=\s+[A-Za-z])")],
}
_BARE = ("bare", "bare-inside", "bare-number")
_BRACKETED = ("paren", "panel-word", "paren-note")
# Words that make the letter or number after them a name ("type B", "group C", "Fig. 3", "vitamin C"), and
# words that do so after it ("B cells", "A lines").
_NAMING = re.compile(r"\b(?:types?|subtypes?|groups?|grades?|class(?:es)?|stages?|phases?|zones?|cases?|patients?|"
                     r"vitamins?|hepatitis|influenza|figs?\.?|figures?|tables?|segments?|sectors?|areas?|regions?|"
                     r"levels?|lines?|points?|arrows?|arrowheads?|sites?|series|factors?|proteins?|genotypes?|"
                     r"strains?|leads?|scores?|categor(?:y|ies)|patterns?|models?|complex|chains?|domains?|waves?|"
                     r"stations?|loops?|clusters?|cohorts?|arms?|parts?|lanes?|columns?|rows?|individuals?|"
                     r"subjects?|donors?|spots?|planes?|sides?|walls?|layers?|vessels?|lesions?|nodes?)\s*$",
                     re.IGNORECASE)
_NAMED = re.compile(r"^\s+(?:cells?|lymphocytes?|modes?|virus|viruses|waves?|lines?|scans?|chains?|types?|"
                    r"subunits?|antigens?|receptors?|vitamins?)\b", re.IGNORECASE)
_HEMATOXYLIN_EOSIN = re.compile(r"\(?\s*H\s*(?:&|and|-|/)\s*E\s*\)?[.:,)]?", re.IGNORECASE)
# "Fig. 1. Brain CT": the number after these is no panel
_NUMBER_NAME = re.compile(r"\b(?:figs?|figures?|tables?|nos?|refs?|vol|cases?|patients?|steps?)\.?\s*$", re.IGNORECASE)


@dataclasses.dataclass
class Marker:
    start: int
    end: int
    labels: list[str]
    text: str
    style: str
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


# A figure reference that names panels: "Figure 3B", "Fig. 2(A–C)", "Figs. 3B and 3D", "Figure 2A, B".
# The figure's number is not checked: the paragraphs that cite a figure are the ones searched.
_FIGURE_PANELS = re.compile(rf"\b(?i:fig(?:ure)?s?)\.?\s*\d+\s*\(?\s*([A-Za-z](?:(?:{_RANGE}|{_JOIN})\d*[A-Za-z])*)"
                            r"(?![A-Za-z])")


def referenced_panels(sentence: str) -> set[str]:
    """The panel letters (case-folded) that the sentence's figure references name."""
    return {re.sub(r"\d", "", label).casefold()
            for group in _FIGURE_PANELS.findall(sentence) for label in _expand(group)}


def _find(caption: str, style: str) -> list[Marker]:
    found = []
    for pattern in _STYLES[style]:
        for match in pattern.finditer(caption):
            group = match.group(1)
            labels = [label.lower() if label.lower() in _POSITIONS else label for label in _expand(group)]
            if labels and labels[0] in _POSITIONS and re.search(_RANGE, group):
                continue  # "(left to right)" is an order, not two panels
            if labels and all(re.fullmatch(_LABEL, label) for label in labels):
                found.append(Marker(match.start(), match.end(), labels, match.group(0), style))
    return found


def _candidates(caption: str, styles: Iterable[str]) -> list[Marker]:
    """Markers of the given styles, the earlier style first where two overlap."""
    kept: list[Marker] = []
    for style in styles:
        kept += [m for m in _find(caption, style) if not any(m.start < k.end and k.start < m.end for k in kept)]
    return sorted(kept, key=lambda m: m.start)


def sentence_starts(caption: str) -> list[int]:
    """Where each sentence starts: after ".", "!" or "?" and before a capital or a bracket, not after an
    abbreviation ("Fig.", "e.g.", "S. aureus")."""
    starts = [0]
    for match in re.finditer(r"[.!?](?:\s+|(?=[(\[]))(?=[A-Z(\[\"“])", caption):
        word = re.search(r"(\S+)$", caption[:match.start()])
        if word and re.fullmatch(r"(?i:figs?|e\.g|i\.e|vs|al|approx|no|ca|cf|ref|resp|[A-Z])", word.group(1)):
            continue
        starts.append(match.end())
    return starts


class _Sentences:
    def __init__(self, caption: str):
        self.starts = sentence_starts(caption)
        self.length = len(caption)

    def start(self, pos: int) -> int:
        return self.starts[bisect.bisect_right(self.starts, pos) - 1]

    def end(self, pos: int) -> int:
        n = bisect.bisect_right(self.starts, pos)
        return self.starts[n] if n < len(self.starts) else self.length


def _parenthesised(caption: str) -> list[tuple[int, int]]:
    """The spans of matched brackets."""
    spans, stack = [], []
    for bracket in re.finditer(r"[()[\]]", caption):
        if bracket.group() in "([":
            stack.append(bracket.start())
        elif stack:
            spans.append((stack.pop(), bracket.end()))
    return spans


def _inside_brackets(marker: Marker, spans: list[tuple[int, int]]) -> bool:
    """Whether the marker stands inside brackets other than its own: "(vertical diameter (B))",
    "(H, heart; S, stomach)"."""
    return any(lo < marker.start and marker.end <= hi and (lo, hi) != (marker.start, marker.end)
               for lo, hi in spans)


def _position(caption: str, marker: Marker) -> str:
    """'start' of a clause, 'end' of a clause, or 'inside' one."""
    raw_before = caption[:marker.start]
    before, after = raw_before.rstrip(), caption[marker.end:].lstrip()
    ends = not after or after[0] in ".;,:)" or re.match(r"(and|or)\b", after) is not None
    # "tumorigenesis(a) H&E": no space before the parenthesis means a lost sentence break. After a comma or
    # a bracket a marker starts a clause unless it closes one ("(H&E) (a and c) and Perl's blue (b and d)").
    starts = not before or before[-1] in ".;:(" or marker.style not in _BRACKETED \
        or raw_before == before or (before[-1] in ",)]" and not ends)
    if starts and not (ends and after[:1] in ".;)"):
        return "start"
    return "end" if ends else "inside"


def _assign_roles(caption: str, markers: list[Marker]) -> None:
    """prefix / postfix / reference. A marker inside other brackets names no new panel; a mid-clause
    marker repeating a known label is a reference ("same case as (A) with"), unless it goes on a list of
    postfix markers ("prostate (A–C), testis (D–F) of uninfected (A, D)"); one with a new label follows the
    caption's leading style."""
    if not markers:
        return
    seen: set[str] = set()
    leading = None
    brackets = _parenthesised(caption)
    sentences = _Sentences(caption)
    previous = None
    for marker in markers:
        position = _position(caption, marker)
        new = any(label not in seen for label in marker.labels)
        after_postfix = previous is not None and previous.role == "postfix" \
            and sentences.start(previous.start) == sentences.start(marker.start)
        # Inside other brackets only positions and notes for known panels ("(A and C: ×100)") label text.
        if _inside_brackets(marker, brackets) and marker.labels[0] not in _POSITIONS \
                and (new or not marker.text.endswith(":")):
            marker.role = "reference"
        elif marker.style == "closing-end":  # "(e) and … receptor f) in …", but "with a) coronal and b) …"
            marker.role = "postfix" if after_postfix else "prefix"
        elif position == "start":
            marker.role = "prefix"
        elif position == "end" and new:
            marker.role = "postfix"
        elif new:
            marker.role = leading or "prefix"
        elif position == "end" and after_postfix:
            marker.role = "postfix"
        else:
            marker.role = "reference"
        if marker.role != "reference":
            leading = leading or marker.role
            seen.update(marker.labels)
            previous = marker


def _letter(label: str) -> str:
    return label[0].lower()


def _keep_label_run(markers: list[Marker]) -> list[Marker]:
    """Drop markers outside the run of panel letters a, b, c… (one gap allowed): "(N)" for normal
    glands or "(H & E)" among panels A–F are abbreviations, not panels; and sub-labels "C1" where the
    caption names "C" itself (they stay in C's text)."""
    markers = [m for m in markers if m.role != "reference"]
    cased = [label[0] for m in markers for label in m.labels if label[0].isalpha()]
    if not cased:
        return []
    # Panel letters share one case: "(A)…(D)" with "c1 and c2:" inside D's text keeps A–D.
    upper = sum(c.isupper() for c in cased) * 2 >= len(cased)
    markers = [m for m in markers if all(label[0].isupper() == upper for label in m.labels)]
    whole = {label for m in markers for label in m.labels if len(label) == 1}
    markers = [m for m in markers if not all(label[1:] and label[0] in whole for label in m.labels)]
    letters = {_letter(label) for m in markers for label in m.labels}
    run, c = set(), "a"
    while c in letters or chr(ord(c) + 1) in letters:
        run.add(c)
        c = chr(ord(c) + 1)
    return [m for m in markers if all(_letter(label) in run for label in m.labels)]


def _named(caption: str, marker: Marker) -> bool:
    """'type B', 'vitamin C', 'B cells': a letter that names a thing, not a panel."""
    return bool(_NAMING.search(caption[:marker.start]) or _NAMED.match(caption[marker.end:]))


def _fill_bare(caption: str, markers: list[Marker]) -> list[Marker]:
    """The markers with the bare letters that go on their sequence: a bare letter counts only as the next
    letter after those before it that no other marker gives ("(a) … b Axial CT"), or the first, "a"; one
    inside the text only among bare labels ("A dorsal view B ventral view"). A bare group of known
    letters at a clause start ("A–B taken from …") labels its text for those panels."""
    bare = [m for m in _candidates(caption, ("bare", "bare-inside"))
            if not any(m.start < k.end and k.start < m.end for k in markers) and not _named(caption, m)]
    kept = list(markers)
    for candidate in bare:
        label = candidate.labels[0]
        same_case = [m for m in kept if m.labels[0][0].isupper() == label.isupper()]
        given = {_letter(other) for m in same_case for other in m.labels}
        before = [m for m in same_case if m.start < candidate.start]
        letters = sorted({_letter(other) for m in before for other in m.labels})
        if candidate.style == "bare-inside" and (not before or any(m.style not in _BARE for m in before)):
            continue
        expected = chr(ord(letters[-1]) + 1) if letters else "a"
        if len(candidate.labels) == 1 and label.lower() == expected and expected not in given:
            kept.append(candidate)
        elif len(candidate.labels) > 1 and candidate.style == "bare" and all(
                _letter(c) in letters for c in candidate.labels):
            kept.append(candidate)
        else:
            continue
        candidate.role = "prefix"
        kept.sort(key=lambda m: m.start)
    return kept


_LONE_MARKER_LABELS = 8


def _plausible(markers: list[Marker]) -> bool:
    """Panel labels start at a/A/1 and name two panels or more; a lone marker ("(A, B) Sections show …")
    names a few panels, not "(a-p)" (anteroposterior)."""
    labels = [label for m in markers for label in m.labels]
    if len(set(labels)) < 2 or (len(markers) == 1 and len(labels) > _LONE_MARKER_LABELS):
        return False
    if all(label in _POSITIONS for label in labels):
        return True
    if all(label.isdigit() for label in labels):
        return "1" in labels
    letters = [label[0] for label in labels]
    return all(c.isalpha() for c in letters) and min(c.lower() for c in letters) == "a"


def _letter_markers(caption: str) -> list[Marker]:
    markers = [m for m in _candidates(caption, (*_BRACKETED, "closing", "closing-end"))
               if not _HEMATOXYLIN_EOSIN.fullmatch(m.text) and m.labels[0] not in _POSITIONS
               and not any(label.isdigit() for label in m.labels)]
    _assign_roles(caption, markers)
    markers = _keep_label_run(markers)
    _assign_roles(caption, markers)  # again without the abbreviations ("i.v.", "(N)") the run dropped
    return _keep_label_run(_fill_bare(caption, markers))


def _number_markers(caption: str) -> list[Marker]:
    """Numbers are panels only as "1. … 2. …" at sentence starts, "(Panel 1)", or bare after a caption
    that starts with a range ("1–2 species X: 1 male, 2 female 3–4 …"): elsewhere "(1)", "1)" and "1:"
    name structures in one image."""
    numbered = [m for m in _candidates(caption, ("panel-word", "numbered"))
                if all(label.isdigit() for label in m.labels) and not _NUMBER_NAME.search(caption[:m.start])]
    if not numbered and re.match(r"\s*1\s*[-–]\s*\d", caption):
        numbered = [m for m in _find(caption, "bare-number") if not _NUMBER_NAME.search(caption[:m.start])]
    kept, highest = [], 0
    for marker in numbered:  # in order: the next number, or numbers already named
        numbers = [int(label) for label in marker.labels]
        if numbers[0] == highest + 1 or max(numbers) <= highest:
            kept.append(marker)
            highest = max(highest, *numbers)
    _assign_roles(caption, kept)
    return [m for m in kept if m.role != "reference"]


def _position_markers(caption: str) -> list[Marker]:
    markers = [m for m in _candidates(caption, ("paren", "positional")) if m.labels[0] in _POSITIONS]
    _assign_roles(caption, markers)
    return [m for m in markers if m.role != "reference"]


def _markers(caption: str) -> list[Marker]:
    for find in (_letter_markers, _number_markers, _position_markers):
        markers = find(caption)
        if _plausible(markers):
            return [] if _is_key(caption, markers) else markers
    return []


# Words that say a text is about an image of its own: a modality, view, stain, plot, time or condition.
_PANEL_WORDS = re.compile(
    r"\b(?:CT|CECT|HRCT|CTA|MRI?|MRA|PET|SPECT|OCT|FFA|EUS|ultraso\w*|sonogra\w*|echo\w*|x-?rays?|radiogra\w*|"
    r"angiogra\w*|tomogra\w*|scans?|mammogra\w*|fluorosc\w*|endosco\w*|arthrosco\w*|microscop\w*|"
    r"\w*micrographs?|photographs?|images?|views?|films?|histolog\w*|cytolog\w*|immuno\w*|IHC|H&E|stain\w*|"
    r"magnifi\w*|T[12](?:W|WI)?|FLAIR|DWI|weighted|contrast|axial|coronal|sagittal|transverse|longitudinal|"
    r"plots?|graphs?|curves|histograms?|blots?|charts?|(?:pre|post)-\w+|(?:pre|post)(?:operative\w*|"
    r"treatment|surgery|surgical|contrast|injection|therapy|chemotherapy)|before|after|follow-?up|days?|weeks?|"
    r"months?|years?|hours?|controls?|treated|untreated|treatment|groups?|mice|mouse|rats?|patients?|cases?)\b"
    r"|[×]|\b\d+\s*[x×]\b", re.IGNORECASE)
# A panel's text that starts with a side ("A: Right tibia. B: Left tibia.") shows that side of its own.
_SIDE = re.compile(r"^\W*(?:left|right|bilateral)\b", re.IGNORECASE)
_ONE_IMAGE = re.compile(r"\b(?:image|scan|view|radiograph|x-?ray|photograph|picture|diagram|drawing|illustration|"
                        r"schematic|sonogram|sonography|ultrasound|echocardiogram|angiogram|tomogram|tomography|"
                        r"CT|MRI|MR|slice|map|reconstruction|radiography|cephalogram|fluoroscopy)\b", re.IGNORECASE)
_IMAGES = re.compile(r"\b(?:images|scans|views|radiographs|x-?rays|photographs|pictures|micrographs|photomicrographs|"
                     r"microphotographs|sections|slices|panels|films|angiograms|tomograms|sonograms|examples)\b", re.IGNORECASE)
_SHOWING = re.compile(r"\b(?:show(?:s|ing|n)?|demonstrat\w*|reveal\w*|depict\w*|display\w*|consisting of|"
                      r"composed of|including)\b", re.IGNORECASE)
_MEASURES = re.compile(r"\b(?:measur\w*|metrics?|parameters?|landmarks?|points|distances?|lengths?|widths?|"
                       r"diameters?|angles?|thickness|heights?|volumes?|boundar(?:y|ies)|margins|components?|"
                       r"regions? of interest|ROIs?)\b", re.IGNORECASE)
# Where the head of a caption's first noun phrase ends.
_HEAD_END = re.compile(r"\b(?:of|with|in|at|on|for|from|after|before|during|showing|shows|demonstrating|revealing)\b|"
                       r"[:;,(]", re.IGNORECASE)
# A key names parts of one image in a few words each; longer texts describe panels.
_KEY_WORDS = 10


def _clauses(caption: str, markers: list[Marker]) -> list[str]:
    """Each marker's own clause: after a prefix marker up to the next marker or the end of its sentence,
    before a postfix marker from the previous marker or the start of its sentence."""
    sentences = _Sentences(caption)
    clauses = []
    for n, marker in enumerate(markers):
        if marker.role == "prefix":
            end = min(sentences.end(marker.end), markers[n + 1].start if n + 1 < len(markers) else len(caption))
            clauses.append(_clean(caption[marker.end:end]))
        else:
            start = max(sentences.start(marker.start), markers[n - 1].end if n else 0)
            clauses.append(_clean(caption[start:marker.start]))
    return clauses


def _is_key(caption: str, markers: list[Marker]) -> bool:
    """Whether the labels name structures or measurements in one image rather than panels, though in a
    panel style: "Measurement of the right (A) and left (B) angle", "CT showing a hematoma (A) and oedema
    (B)", "Coronal CT of the abdomen: (a) stomach, (b) bursa". No label's clause names a modality, view,
    stain, time or condition of its own, and the caption says it is measuring, or the labels follow one
    image's "showing", or the text before them speaks of one image only and each clause is a few words.
    Labels that say they are panels ("(Figure 4a)", "(Panel b)") are panels."""
    if any(m.style == "panel-word" for m in markers):
        return False
    clauses = _clauses(caption, markers)
    described = [bool(_PANEL_WORDS.search(clause) or (m.role == "prefix" and _SIDE.match(clause)))
                 for m, clause in zip(markers, clauses)]
    before = caption[:markers[0].start]
    title = before[:_Sentences(caption).end(0)]
    if _MEASURES.search(title) and not any(described):
        return True
    if all(m.role == "postfix" for m in markers):
        sentences = _Sentences(caption)
        showing = _SHOWING.search(clauses[0])
        return len({sentences.start(m.start) for m in markers}) == 1 and showing is not None \
            and not _IMAGES.search(clauses[0][:showing.start()]) and not any(described[1:])
    head = re.split(_HEAD_END, title)[0]  # "Coronal CT image" of "Coronal CT image of the abdomen showing …"
    return all(len(clause.split()) <= _KEY_WORDS for clause in clauses) and not any(described) \
        and _ONE_IMAGE.search(head) is not None and not _IMAGES.search(before)


# Sentences that every panel shares when they end a caption: scale bars, magnifications, abbreviation
# lists, statistics, credits and links, and sentences about all panels.
_NOTE = re.compile("|".join([
    r"\b(?:scale\s*)?bars?\s*(?:[:=,(]|represents?\b|indicates?\b|equals?\b|are\b|is\b|in\b|\d)",
    r"\bmagnification|[×x*]\s*\d{2,}\b|\b\d{2,}\s*[×x*](?!\w)|\bobjective\b",
    r"^\W*abbreviations?\b|^\W*[A-Z][\w\-+/]*[A-Z][\w\-+/]*\s*(?:,|=|:)\s+[a-z]",
    r"\bp\s*[<>≤=]\s*0?\.\d|\*\s*p\b|\bsignifican|\bn\s*=\s*\d|±|\berror bars?\b|\bdata (?:are|were|represent)\b|"
    r"\bstandard (?:deviation|error)",
    r"\bcourtesy\b|\breprinted\b|\badapted\b|\bimage:|\bcopyright\b|©|https?:|www\.|\.com\b|\bcolou?r figure\b|"
    r"\bpermission\b",
    r"\b(?:all|each|both) (?:the )?(?:panels?|images?|figures?|photos?|photographs?|micrographs?|sections?|"
    r"pictures?|data)\b|\bthese (?:images|panels|photographs|micrographs|pictures|results)\b|"
    r"\b(?:images?|photographs?|micrographs?|pictures?|panels?) (?:are|were|is) (?:representative|shown|taken)\b|"
    r"\brepresentative of\b|\bthe (?:\S+ )?(?:micrographs|images|photographs|panels|pictures|figures)\b|"
    r"\b(?:both|all) (?:patients|cases|groups|samples|animals|mice|rats|specimens)\b",
    r"^\W*(?:symbols?|key|legend)\s*:",
]), re.IGNORECASE)
_STAIN = re.compile(r"\bstain|\bH\s*&\s*E\b|\bhaematoxylin|\bhematoxylin|\bmethod\b|\bsolution\b", re.IGNORECASE)
_CONNECTIVE = re.compile(r"^[\s,;]*(?:(?:and|or|but|while|whereas|versus|vs\.?)\s+)?", re.IGNORECASE)


def _is_note(sentence: str) -> bool:
    return bool(_NOTE.search(sentence)) or (len(sentence.split()) <= 6 and bool(_STAIN.search(sentence)))


def _sentences(text: str) -> list[str]:
    starts = sentence_starts(text)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


@dataclasses.dataclass
class _Parts:
    """A caption split: the shared lead, each label's own clauses, and the notes (text, the labels it is
    for or None for all)."""
    lead: str
    own: dict[str, list[str]]
    notes: list[tuple[str, list[str] | None]]


def _clause_start(caption: str, sentences: _Sentences, lo: int, hi: int) -> int:
    """Where the clause that a postfix marker at `hi` closes starts, after a prefix marker's text from `lo`:
    at its sentence, else after the last ";" or ","."""
    start = sentences.start(hi)
    if start > lo:
        return start
    cut = max(caption.rfind(p, lo, hi) for p in ("; ", ", "))
    return cut + 1 if cut >= lo else hi


def _postfix_texts(caption: str, run: list[Marker], start: int, end: int) -> list[str]:
    """Each postfix marker's clause in one sentence, with what the sentence says of them all: the tail after
    the last marker ("CT (a) and MRI (b) show …"), and the words in front of the first clause that a
    shorter parallel clause leaves out ("levels for TSHβ (A) and GPHα (B)": "levels for GPHα")."""
    tail = _clean(caption[run[-1].end:end]) if re.search(r"\w", caption[run[-1].end:end]) else ""
    texts, joints, at = [], [], start
    for marker in run:
        piece = caption[at:marker.start]
        joint = _CONNECTIVE.match(piece).group(0)
        joints.append(joint)
        texts.append(_clean(piece[len(joint):]))
        at = marker.end
    first = texts[0].split()
    for n in range(1, len(texts)):
        words = texts[n].split()
        if ";" not in joints[n] and len(first) > len(words):
            texts[n] = " ".join(first[:len(first) - len(words)] + words)
    return [_clean(f"{text} {tail}") for text in texts]


def _parts(caption: str, markers: list[Marker]) -> _Parts:
    sentences = _Sentences(caption)
    first = markers[0]
    lead_end = first.start if first.role == "prefix" else sentences.start(first.start)
    own: dict[str, list[str]] = {label: [] for m in markers for label in m.labels}
    notes: list[tuple[str, list[str] | None]] = []
    spans: list[tuple[Marker, str]] = []  # each prefix marker's text
    at, n = lead_end, 0
    while n < len(markers):
        marker = markers[n]
        if marker.role == "prefix":
            following = markers[n + 1] if n + 1 < len(markers) else None
            end = len(caption) if following is None else following.start if following.role == "prefix" \
                else _clause_start(caption, sentences, marker.end, following.start)
            notes.append((caption[at:marker.start], None))
            spans.append((marker, caption[marker.end:end]))
            at, n = end, n + 1
            continue
        run = [marker]
        while n + len(run) < len(markers) and markers[n + len(run)].role == "postfix" \
                and sentences.start(markers[n + len(run)].start) == sentences.start(marker.start):
            run.append(markers[n + len(run)])
        following = markers[n + len(run)] if n + len(run) < len(markers) else None
        start = max(at, sentences.start(marker.start))
        end = sentences.end(run[-1].start)
        if following is not None and following.start < end:
            end = following.start
        notes.append((caption[at:start], None))
        for postfix, text in zip(run, _postfix_texts(caption, run, start, end)):
            for label in postfix.labels:
                own[label].append(text)
        at, n = end, n + len(run)
    notes.append((caption[at:], None))
    if spans and spans[-1][1] and at == len(caption):
        last, text = spans.pop()
        own_text, trailing = _trailing_notes(text, [t for _, t in spans], list(own))
        spans.append((last, own_text))
        notes += trailing
    for marker, text in spans:
        for label in marker.labels:
            own[label].append(_clean(text))
    notes = [(_clean(text), labels) for text, labels in notes if _clean(text)]
    return _Parts(_clean(caption[:lead_end]), own, notes)


# Panels of this many words or fewer on average make a list, and the sentences after it are about them all.
_SHORT_PANEL_WORDS = 6


def _trailing_notes(text: str, others: list[str], labels: list[str]) -> tuple[str, list[tuple[str, list[str] | None]]]:
    """The last prefix-labelled panel's own text and the notes that end the caption: after a list of
    one-sentence panels everything past the last panel's first sentence, else the trailing sentences that
    read as notes. A note naming some panels ("Scale bars in (A–D) …") is for those."""
    pieces = _sentences(text)
    if len(others) >= 2 and sum(len(other.split()) for other in others) <= _SHORT_PANEL_WORDS * len(others):
        cut = 1
    else:
        cut = len(pieces)
        while cut > 1 and _is_note(pieces[cut - 1]):
            cut -= 1
    trailing = []
    for piece in pieces[cut:]:
        named = [label for m in _find(piece, "paren") for label in m.labels if label in labels]
        trailing.append((piece, sorted(set(named)) if named and set(named) != set(labels) else None))
    return "".join(pieces[:cut]), trailing


def _label_order(label: str):
    return (label[0].isdigit(), int(label) if label.isdigit() else 0, label.lower(), label)


def _clean(text: str) -> str:
    """Whitespace collapsed, and the commas, semicolons and "and"/"or" that joined it to the next or last
    label cut off: "Cisplatin; and" of "B. Cisplatin; and C. …"."""
    text = re.sub(r"\s+", " ", text).strip(" ,;")
    return re.sub(r"^(?:and|or)\s+|[\s,;]+(?:and|or)$", "", text)


def _split(caption: str) -> _Parts | None:
    markers = _markers(caption)
    return _parts(caption, markers) if markers else None


def split_caption(caption: str, shared_context: bool = True) -> list[dict]:
    """[{'label', 'text'}] in label order; one unlabelled panel if no markers. Each text is the shared
    lead, the panel's own clauses and the notes for it; with shared_context=False the panel's own clauses
    only (what to ground in its crop)."""
    caption = caption or ""
    parts = _split(caption)
    if parts is None:
        return [{"label": "", "text": _clean(caption)}]
    # Letters and numbers in label order; "top"/"bottom" as the caption reads.
    labels = list(parts.own)
    order = labels if any(label in _POSITIONS for label in labels) else sorted(labels, key=_label_order)
    if not shared_context:
        return [{"label": label, "text": _clean(" ".join(parts.own[label]))} for label in order]
    texts = {label: " ".join([*parts.own[label], *(text for text, only in parts.notes if only is None or label in only)])
             for label in order}
    return with_context(parts.lead, texts)


def shared_context(caption: str) -> str:
    """The caption's text that every panel shares in front of its own (the lead: title sentence,
    abbreviations); "" when the caption has no panel markers."""
    parts = _split(caption or "")
    return parts.lead if parts else ""


def with_context(context: str, texts: dict[str, str]) -> list[dict]:
    """[{'label', 'text'}] with the shared context in front of each panel's own text."""
    return [{"label": label, "text": _clean(f"{context} {text}")} for label, text in texts.items()]


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


def panel_label(label: str) -> str | None:
    """The panel label `label` reads as when it is label-shaped (clean_label of a letter, a letter
    and one or two digits, one or two digits, a roman numeral, or position words such as "top left"),
    "" when it is empty, else None: "(B)" -> "B", "panel iii" -> "iii", "top left" -> "topleft",
    "scale bar" -> None."""
    if not (label or "").strip():
        return ""
    words = re.sub(r"^\s*panels?\s+|\s+(?:panels?|rows?|columns?|images?)\s*$", "",
                   unicodedata.normalize("NFKC", label), flags=re.IGNORECASE).split()
    cleaned = clean_label(label)
    positions = bool(words) and all(word.strip("().,:").casefold() in _POSITIONS for word in words)
    shaped = re.fullmatch(r"[A-Za-z](?:\d{1,2})?|\d{1,2}", cleaned) or _roman_value(cleaned)
    return cleaned if cleaned and (shaped or positions) else None


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


_MARKER_WORDS = re.compile(r"\b(arrow|arrowhead|asterisk|star|circle|circled|box|boxed|inset|dashed|outline)s?\b",
                           re.IGNORECASE)


def groundable_clauses(text: str, limit: int = 3) -> list[str]:
    """Clauses of a panel's own text worth grounding in its crop, those naming a marker first."""
    clauses = [c.strip(" ,;.") for c in re.split(r"[.;]\s+|\.$", text)]
    clauses = [c for c in clauses if len(c.split()) >= 2]
    return sorted(clauses, key=lambda c: _MARKER_WORDS.search(c) is None)[:limit]
