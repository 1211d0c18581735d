"""Figures to annotate, from a JSONL manifest, WebDataset tar shards (BIOMEDICA) or PMC JATS XML.

Every source yields `Figure`s and, for whatever cannot be read, `InputFailure`s with a reason:
nothing is dropped silently. Images are not decoded here, only located or read as bytes. A failure
of a whole input file (missing, unreadable, cut off) has stage FILE_STAGE and the file's path as its
id: it stands for the figures the file would have held, which no one can name.

Text is cleaned as each `Figure` and `InputFailure` is made (text.py): ids and sources escaped, the
rest replaced, each change noted in the Figure's `notes`, which its record's warnings carry. Bytes
that are not UTF-8 are decoded with surrogateescape, so they become such a change, not a lost figure.

`expand_inputs` turns what a user gives (files, directories, @lists of paths) into the files to read.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Sequence

from annotate.text import clean_strings, clean_text, note

FILE_STAGE = "file"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp", ".webp")
_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
_NAMES = ("figure_id", "source")  # escaped rather than replaced: ids must stay distinct
# What a JSON document that cannot be read raises: a syntax error, or one nested too deep.
_JSON_ERRORS = (ValueError, RecursionError)


def _clean_fields(item, fields: Sequence[str]) -> list[str]:
    """Cleans the item's string `fields` in place; a note for each that changed."""
    notes = []
    for name in fields:
        escape = name in _NAMES
        text, problems = clean_text(getattr(item, name), escape)
        if problems:
            setattr(item, name, text)
            notes.append(note(name, problems, escape))
    return notes


@dataclasses.dataclass
class Figure:
    figure_id: str
    source: str
    caption: str
    context: list[str] = dataclasses.field(default_factory=list)
    license: str = ""
    image_bytes: bytes | None = None
    image_path: Path | None = None
    panel_type: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)  # what cleaning its text changed

    def __post_init__(self):
        self.notes += _clean_fields(self, ("figure_id", "source", "caption", "license", "panel_type"))
        context, notes = clean_strings(self.context, "context")
        self.context = [text for text in context if text.strip()]  # a mention of control characters only
        self.notes += notes

    def read_image_bytes(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_path is None:
            raise FileNotFoundError(f"no image file found for {self.figure_id}")
        return self.image_path.read_bytes()


@dataclasses.dataclass
class InputFailure:
    figure_id: str
    source: str
    stage: str
    reason: str

    def __post_init__(self):
        _clean_fields(self, ("figure_id", "source", "reason"))  # an escaped id says what it was


@dataclasses.dataclass(frozen=True)
class TarFields:
    """Where a WebDataset sample's JSON keeps each field; the first key present wins."""
    caption: Sequence[str] = ("caption", "image_caption")
    context: Sequence[str] = ("context", "image_context", "inline_references")
    license: Sequence[str] = ("license", "image_license")
    panel_type: Sequence[str] = ("panel_type", "image_panel_type", "image_primary_label")


def _first(meta: dict, keys: Sequence[str], default):
    return next((meta[k] for k in keys if meta.get(k) is not None), default)


def _as_text_list(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def read_manifest(path: Path) -> Iterator[Figure | InputFailure]:
    """JSONL lines {"id", "image" (relative to the manifest), "caption", "context"?, "license"?}."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                # strict=False: control characters inside strings are cleaned, not a lost line.
                item = json.loads(raw.decode("utf-8", "surrogateescape"), strict=False)
                if not isinstance(item, dict) or not isinstance(item.get("id"), (str, int)):
                    raise ValueError("not a JSON object with an 'id'")
                if not isinstance(item.get("image"), str):
                    raise ValueError("no 'image' path")
                if "\x00" in item["image"]:
                    raise ValueError("its 'image' path holds a NUL character, which no file name can")
            except _JSON_ERRORS as err:
                yield InputFailure(where, str(path), "read", f"manifest line unreadable: {err}")
                continue
            caption = item.get("caption")
            yield Figure(str(item["id"]), where, caption if isinstance(caption, str) else "",
                         _as_text_list(item.get("context")), str(item.get("license") or ""),
                         image_path=(path.parent / item["image"]))


def _unsafe(name: str) -> bool:
    normal = posixpath.normpath(name)
    return name.startswith("/") or normal == ".." or normal.startswith("../")


def read_tar(path: Path, fields: TarFields = TarFields()) -> Iterator[Figure | InputFailure]:
    """WebDataset samples: members sharing a key (name up to the first dot) form one figure."""
    sample_key, members = None, {}

    def finish():
        meta_bytes = members.get("json")
        image_ext = next((ext for ext in members if "." + ext in _IMAGE_EXTENSIONS), None)
        where = f"{path}:{sample_key}"
        if image_ext is None:
            return InputFailure(sample_key, where, "read", f"sample has no image member ({sorted(members)})")
        try:
            meta = {} if meta_bytes is None else json.loads(meta_bytes.decode("utf-8", "surrogateescape"), strict=False)
            if not isinstance(meta, dict):
                raise ValueError("its JSON is not an object")
        except _JSON_ERRORS as err:
            return InputFailure(sample_key, where, "read", f"sample JSON unreadable: {err}")
        caption = _first(meta, fields.caption, "")
        return Figure(sample_key, where, caption if isinstance(caption, str) else "",
                      _as_text_list(_first(meta, fields.context, [])), str(_first(meta, fields.license, "")),
                      image_bytes=members[image_ext], panel_type=str(_first(meta, fields.panel_type, "")))

    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if _unsafe(member.name):
                    yield InputFailure(member.name, str(path), "read",
                                       f"tar member path {member.name!r} escapes the archive; refused")
                    continue
                directory, base = posixpath.split(member.name)
                key, _, ext = base.partition(".")
                key = posixpath.join(directory, key)
                if key != sample_key and sample_key is not None:
                    yield finish()
                    members = {}
                sample_key = key
                members[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        # The sample being read is lost with the rest, even if its members were complete.
        where = f" from sample {sample_key!r} on" if sample_key is not None else ""
        yield InputFailure(str(path), str(path), FILE_STAGE, f"tar unreadable{where}: {err}")
        return
    if sample_key is not None:
        yield finish()


def _text(element) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def _parse_jats(data: bytes) -> tuple[ET.Element, list[str]]:
    """The article's root element, and the notes every figure of it carries. Scraped articles hold
    bytes that are not UTF-8 and control characters, which no XML parser accepts: such an article is
    read again with them replaced (text.py), so its figures are kept and say what changed."""
    try:
        return ET.fromstring(data), []
    except ET.ParseError as err:
        text, problems = clean_text(data.decode("utf-8", "surrogateescape"))
        if not problems:
            raise
        try:
            return ET.fromstring(text), [note("article", problems)]
        except ET.ParseError:
            raise err from None


def read_jats(path: Path) -> Iterator[Figure | InputFailure]:
    """Figures of one PMC article: caption (title + paragraphs), the paragraphs citing each figure,
    and the graphic file next to the article (any usual image extension)."""
    try:
        root, notes = _parse_jats(path.read_bytes())
    except (ET.ParseError, OSError) as err:
        yield InputFailure(str(path), str(path), FILE_STAGE, f"JATS XML unreadable: {err}")
        return
    article_id = _text(root.find(".//article-id[@pub-id-type='pmc']")) or path.stem
    license_ = _text(root.find(".//license"))[:200]
    citing: dict[str, list[str]] = {}
    for paragraph in root.iter("p"):
        for xref in paragraph.iter("xref"):
            if xref.get("ref-type") == "fig":
                for rid in (xref.get("rid") or "").split():
                    if (text := _text(paragraph)) not in citing.setdefault(rid, []):
                        citing[rid].append(text)
    for number, fig in enumerate(root.iter("fig")):
        fig_id = fig.get("id") or f"fig{number}"
        caption = _text(fig.find("caption"))
        graphic = fig.find(".//graphic")
        href = graphic.get(_XLINK_HREF) if graphic is not None else None
        image_path = None
        if href:
            candidates = [path.parent / href] + [path.parent / (href + ext) for ext in _IMAGE_EXTENSIONS]
            image_path = next((c for c in candidates if c.is_file()), None)
        yield Figure(f"{article_id}/{fig_id}", f"{path}#{fig_id}", caption, citing.get(fig_id, []), license_,
                     image_path=image_path, notes=list(notes))


def _reader(path: Path, fields: TarFields = TarFields()):
    """The reader for the path's suffix, or None."""
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".jsonl", ".json")):
        return read_manifest
    if suffixes.endswith((".tar", ".tar.gz", ".tgz")):
        return lambda tar: read_tar(tar, fields)
    if suffixes.endswith((".nxml", ".xml")):
        return read_jats
    return None


def iter_inputs(paths: Sequence[str | Path], fields: TarFields = TarFields()) -> Iterator[Figure | InputFailure]:
    """Figures from every input file, in order; the reader is chosen by suffix."""
    for path in map(Path, paths):
        reader = _reader(path, fields)
        if not path.exists():
            yield InputFailure(str(path), str(path), FILE_STAGE, "input file does not exist")
        elif reader is None:
            yield InputFailure(str(path), str(path), FILE_STAGE,
                               "unknown input type; use .jsonl manifests, .tar shards or .nxml/.xml articles")
        else:
            yield from reader(path)


def expand_inputs(paths: Sequence[str | Path]) -> list[str]:
    """The input files, each once, in the order given: `@FILE` stands for the paths FILE lists one
    per line (100k articles do not fit on a command line), taken as written, like arguments typed
    there (argparse's and gcc's @file do the same); a directory for the files under it that a
    reader recognises, sorted. Any other path is kept as given, so a missing one becomes a failure.
    ValueError for a list or directory that names nothing: shards would finish empty."""
    files: list[str] = []
    for given in map(str, paths):
        entries = [given]
        if given.startswith("@"):
            listing = Path(given[1:])
            if not listing.is_file():
                raise ValueError(f"input list {listing} does not exist; give @FILE with one input path per line")
            entries = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            if not entries:
                raise ValueError(f"input list {listing} names no paths; write one input path per line")
        for entry in map(Path, entries):
            # Only a path no reader takes is looked at: 100k listed articles cost each task no stat.
            if _reader(entry) is None and entry.is_dir():
                found = sorted(str(p) for p in entry.rglob("*") if p.is_file() and _reader(p) is not None)
                if not found:
                    raise ValueError(f"input directory {entry} holds no .jsonl, .tar or .nxml/.xml files; "
                                     f"give the folder the inputs are in")
                files += found
            else:
                files.append(str(entry))
    return list(dict.fromkeys(files))
