"""Text that every encoder takes: what `clean_text` returns can be written as strict UTF-8, msgpack
and JSON (no lone surrogates), and holds no control characters but tab, newline and carriage return.

Invalid UTF-8 reaches a str as lone surrogates: the readers decode bytes with Python's
surrogateescape (as tarfile and os.fsdecode do with names), so an undecodable byte 0xff becomes
U+DCFF, exactly what a JSON "\\udcff" escape (common in scraped text) reads as. The two are one case.

Text (captions, contexts, labels, LVLM answers) gets U+FFFD for such a character, the Unicode
replacement character, and a space for a control character. Names (figure ids, sources) are escaped
instead, as \\uXXXX: two ids that differ only in their odd characters stay two ids, and the escape
reads as the JSON the manifest had.
"""
from __future__ import annotations

import re

SURROGATES = "invalid UTF-8 or lone surrogates"
CONTROLS = "control characters"
# Each problem: the characters it is, and what replaces each of them in text.
_PROBLEMS = {SURROGATES: (re.compile("[\ud800-\udfff]"), "\ufffd"),
             CONTROLS: (re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"), " ")}


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match[0]):04x}"


def clean_text(text: str, escape: bool = False) -> tuple[str, tuple[str, ...]]:
    """The text with lone surrogates and control characters replaced (each by U+FFFD and a space; with
    `escape`, both as \\uXXXX), and what was found in it (SURROGATES, CONTROLS): empty when unchanged."""
    found = []
    for problem, (pattern, replacement) in _PROBLEMS.items():
        text, count = pattern.subn(_escaped if escape else replacement, text)
        if count:
            found.append(problem)
    return text, tuple(found)


def note(where: str, problems: tuple[str, ...], escape: bool = False) -> str:
    """A record warning for text at `where` that `clean_text` changed; its count key (run.warning_key)
    is "WHERE: text normalised"."""
    done = "escaped as \\uXXXX" if escape else "replaced"
    return f"{where}: text normalised: {' and '.join(problems)} {done}"


def clean_strings(value, where: str = ""):
    """`value` (a record, or any mix of dicts and lists) with each string in it cleaned as text, and a
    `note` per string that changed, naming where it is ("panels[0].label"); bytes are left as they are."""
    if isinstance(value, str):
        text, problems = clean_text(value)
        return text, [note(where, problems)] if problems else []
    if isinstance(value, dict):
        items = [(key, *clean_strings(item, f"{where}.{key}" if where else str(key))) for key, item in value.items()]
        return {key: item for key, item, _ in items}, [n for _, _, notes in items for n in notes]
    if isinstance(value, list):
        items = [clean_strings(item, f"{where}[{n}]") for n, item in enumerate(value)]
        return [item for item, _ in items], [n for _, notes in items for n in notes]
    return value, []
