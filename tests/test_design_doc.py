"""The design notes live in the repository: every "docs/design.md §N" citation in the code, configs,
launchers and READMEs names a section docs/design.md has, and nothing points at a design document
outside it (the ../shared/DESIGN file a clone does not have). Plain text only: no jax import."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = "docs/design.md"  # the one design document a file may name
DOC = REPO / CITED
SUFFIXES = (".py", ".md", ".sbatch", ".sh")
SKIPPED_DIRS = {".venv", ".git", "__pycache__", "node_modules"}
# "docs/design.md §5", "docs/design.md §3, §10", "docs/design.md §5–§7"
CITATION = re.compile(r"docs/design\.md((?:\s*(?:,|–|-|and)?\s*§\d+)+)")
SECTION = re.compile(r"§(\d+)")
HEADING = re.compile(r"^#{1,6}\s+§(\d+)\b", re.MULTILINE)
# Any mention of a design file, in any case: only the lower-case docs/design.md is allowed.
ANY_DESIGN_FILE = re.compile(r"design\.md", re.IGNORECASE)


def source_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        found += [Path(root) / name for name in sorted(files) if name.endswith(SUFFIXES)]
    return found


def sections() -> list[int]:
    return [int(n) for n in HEADING.findall(DOC.read_text(encoding="utf-8"))]


def citations() -> list[tuple[str, int, int]]:
    """(file:line, cited section) of every docs/design.md §N in the repository (the document's own
    cross-references included)."""
    out = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            out += [(f"{path.relative_to(REPO)}:{line}", int(n)) for n in SECTION.findall(match.group(1))]
    return out


def test_sections_are_numbered_in_order():
    numbers = sections()
    assert numbers, f"{DOC} has no '## §N' headings"
    assert numbers == list(range(1, len(numbers) + 1)), f"section headings out of order: {numbers}"


def test_every_citation_names_a_section_of_the_design_doc():
    found = citations()
    assert len(found) >= 10, f"only {len(found)} docs/design.md citations found: the scan is broken"
    known = set(sections())
    missing = [f"{where} cites §{n}" for where, n in found if n not in known]
    assert not missing, f"{DOC.relative_to(REPO)} has no such section: " + "; ".join(missing)


def test_the_design_doc_refers_only_to_its_own_sections():
    known = set(sections())
    text = DOC.read_text(encoding="utf-8")
    unknown = sorted({int(n) for n in SECTION.findall(text)} - known)
    assert not unknown, f"{DOC.relative_to(REPO)} refers to sections it does not have: {unknown}"


def test_no_file_points_at_a_design_document_outside_the_repository():
    wrong = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in ANY_DESIGN_FILE.finditer(text):
            if text[max(0, match.start() - len("docs/")):match.end()] != CITED:
                line = text.count("\n", 0, match.start()) + 1
                wrong.append(f"{path.relative_to(REPO)}:{line}: {text.splitlines()[line - 1].strip()[:100]}")
    assert not wrong, "cite docs/design.md instead:\n" + "\n".join(wrong)
