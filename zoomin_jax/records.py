"""Figure records: the one contract between annotate/ and zoomin_jax.data (DESIGN.md §3).

One ArrayRecord record = one figure with its panels and regions, msgpack-encoded (never pickle),
versioned by `schema_version`. Pure Python: annotate imports this module without jax or torch.
Boxes are [x0, y0, x1, y1] in original image pixels with x0 < x1, y0 < y1, inside the image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

SCHEMA_VERSION = 1
PANEL_KINDS = ("photo", "chart", "other")
MARKER_KINDS = ("arrow", "arrowhead", "asterisk", "circle", "letter", "inset", "none")
REGION_SOURCES = ("marker", "caption", "fused")
_READ_CHUNK = 64  # records per read: bounded memory with images inside, few calls into C++

_NUMBER = (int, float)
# field -> (accepted types, default used by `new_*` when the caller leaves it out)
FIGURE_FIELDS: dict[str, tuple[tuple, Any]] = {
    "figure_id": ((str,), None), "source": ((str,), ""), "license": ((str,), ""),
    "image_bytes": ((bytes,), None), "width": ((int,), None), "height": ((int,), None),
    "caption": ((str,), ""), "context": ((list,), ()), "panels": ((list,), ()),
    "regions": ((list,), ()), "annotation": ((dict,), None),
}
PANEL_FIELDS: dict[str, tuple[tuple, Any]] = {
    "panel_id": ((int,), None), "label": ((str,), ""), "box": ((list,), None), "text": ((str,), ""),
    "text_lvlm": ((str,), ""), "kind": ((str,), "other"), "score": (_NUMBER, 1.0),
}
REGION_FIELDS: dict[str, tuple[tuple, Any]] = {
    "panel_id": ((int,), None), "box": ((list,), None), "text_sub": ((str,), ""),
    "text_lvlm": ((str,), ""), "marker_box": ((list, type(None)), None), "marker_kind": ((str,), "none"),
    "source": ((str,), None), "score": (_NUMBER, 1.0),
}


class RecordError(ValueError):
    """A record that breaks the schema; the message names the figure and the field."""


def _fill(fields: dict, values: dict, what: str) -> dict:
    unknown = set(values) - set(fields)
    if unknown:
        raise RecordError(f"{what}: unknown fields {sorted(unknown)}")
    out = {}
    for name, (_, default) in fields.items():
        if name in values:
            out[name] = values[name]
        elif default is None and name not in ("marker_box", "annotation"):
            raise RecordError(f"{what}: field {name!r} is required")
        else:
            out[name] = list(default) if isinstance(default, tuple) else default
    return out


def new_panel(**values) -> dict:
    return _fill(PANEL_FIELDS, values, "panel")


def new_region(**values) -> dict:
    return _fill(REGION_FIELDS, values, "region")


def new_figure(**values) -> dict:
    record = _fill(FIGURE_FIELDS, values, f"figure {values.get('figure_id')!r}")
    record["annotation"] = record["annotation"] or {}
    return validate(record)


def clip_box(box, width: float, height: float, left: float = 0.0, top: float = 0.0) -> list[float] | None:
    """The box (corners in any order) clipped to [left, top, width, height] — the image by default —
    or None when nothing with positive area is left."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, left), width), min(max(x1, left), width)))
    y0, y1 = sorted((min(max(y0, top), height), min(max(y1, top), height)))
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def _check_fields(fields: dict, item: dict, where: str) -> None:
    if not isinstance(item, dict):
        raise RecordError(f"{where} is a {type(item).__name__}, not a mapping")
    if set(item) != set(fields):
        raise RecordError(f"{where} has fields {sorted(item)}, expected {sorted(fields)}")
    for name, (types, _) in fields.items():
        if not isinstance(item[name], types) or isinstance(item[name], bool):
            raise RecordError(f"{where}.{name} is {type(item[name]).__name__}, expected "
                              f"{'/'.join(t.__name__ for t in types)}")


def _check_box(box, width: int, height: int, where: str) -> None:
    if len(box) != 4 or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in box):
        raise RecordError(f"{where} is {box!r}, not four numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise RecordError(f"{where} {list(box)} is empty or outside the {width}x{height} image")


def validate(record: dict) -> dict:
    """Return `record` unchanged if it follows the schema, else raise RecordError saying where."""
    where = f"figure {record.get('figure_id')!r}" if isinstance(record, dict) else "record"
    _check_fields(FIGURE_FIELDS, record, where)
    width, height = record["width"], record["height"]
    if width <= 0 or height <= 0:
        raise RecordError(f"{where} has size {width}x{height}")
    if not all(isinstance(c, str) for c in record["context"]):
        raise RecordError(f"{where}.context must be a list of strings")
    panel_ids = set()
    for n, panel in enumerate(record["panels"]):
        at = f"{where}.panels[{n}]"
        _check_fields(PANEL_FIELDS, panel, at)
        _check_box(panel["box"], width, height, f"{at}.box")
        if panel["kind"] not in PANEL_KINDS:
            raise RecordError(f"{at}.kind is {panel['kind']!r}, expected one of {PANEL_KINDS}")
        if panel["panel_id"] in panel_ids:
            raise RecordError(f"{at}.panel_id {panel['panel_id']} is used twice")
        panel_ids.add(panel["panel_id"])
    for n, region in enumerate(record["regions"]):
        at = f"{where}.regions[{n}]"
        _check_fields(REGION_FIELDS, region, at)
        _check_box(region["box"], width, height, f"{at}.box")
        if region["marker_box"] is not None:
            _check_box(region["marker_box"], width, height, f"{at}.marker_box")
        if region["panel_id"] not in panel_ids:
            raise RecordError(f"{at}.panel_id {region['panel_id']} names no panel")
        if region["marker_kind"] not in MARKER_KINDS:
            raise RecordError(f"{at}.marker_kind is {region['marker_kind']!r}, expected one of {MARKER_KINDS}")
        if region["source"] not in REGION_SOURCES:
            raise RecordError(f"{at}.source is {region['source']!r}, expected one of {REGION_SOURCES}")
    return record


def encode(record: dict) -> bytes:
    return msgpack.packb({"schema_version": SCHEMA_VERSION, **validate(record)}, use_bin_type=True)


def decode(data: bytes, where: str = "record") -> dict:
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as err:
        raise RecordError(f"{where} is not a msgpack figure record ({err})") from None
    version = record.pop("schema_version", None) if isinstance(record, dict) else None
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where} has schema_version {version!r}; this zoomin_jax reads version "
                          f"{SCHEMA_VERSION}: re-annotate or upgrade zoomin_jax")
    return record


class RecordWriter:
    """Writes one ArrayRecord shard; the file appears under its final name only when closed cleanly."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
        self.count = 0

    def write(self, record: dict) -> None:
        self.write_encoded(encode(record))

    def write_encoded(self, data: bytes) -> None:
        """A record as `encode` made it, e.g. copied from another shard without decoding it."""
        self._writer.write(data)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def iter_records(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Plain dicts from one or more ArrayRecord shards, in file order."""
    from array_record.python.array_record_module import ArrayRecordReader
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        reader = ArrayRecordReader(str(path))
        try:
            total = reader.num_records()
            for start in range(0, total, _READ_CHUNK):
                for offset, data in enumerate(reader.read(start, min(start + _READ_CHUNK, total))):
                    yield decode(data, where=f"{path} record {start + offset}")
        finally:
            reader.close()
