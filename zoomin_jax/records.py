"""Figure records: the one contract between annotate/ and zoomin_jax.data (docs/design.md §2).

One ArrayRecord record = one figure with its panels and regions, msgpack-encoded (never pickle),
versioned by `schema_version`. Pure Python: annotate imports this module without jax or torch.
Boxes are [x0, y0, x1, y1] in original image pixels with x0 < x1, y0 < y1, inside the image.

Next to every shard RecordWriter writes its shard index (records-….index.msgpack): per record the
figure id, each panel's kind and shorter box side, each region's panel (its position among the
record's panels) and shorter box side, and the annotation warnings. That is all the training
level indexes, their filters (drop_panel_kinds, min_box_side) and annotate merge read, so a start
reads a few hundred bytes per figure instead of the figure (docs/design.md §7). msgpack, as the records:
floats stay exact float64 (a level index from the index file is the one from the records, also at a
box side right on min_box_side), it is about half the size of JSON and parses faster, and it needs
nothing beyond this module; columns of per-record lists, so a writer copying records keeps their
entries without decoding either. The file names the index and record schema versions and the
records file's count and size when it was written: an index of another version, or of another
records file (rewritten, copied over, re-annotated with the same count), is refused with a
sentence saying how to rebuild it, and readers then decode that shard instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

SCHEMA_VERSION = 1
INDEX_VERSION = 1
# Shard index columns: one list per record, in record order (see the module docstring).
INDEX_COLUMNS = ("ids", "panel_kinds", "panel_sides", "region_panels", "region_sides", "warnings")
INDEX_COMMAND = "python -m zoomin_jax.data.shard_index build"
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


def box_side(box) -> float:
    """A box's shorter side: what training's min_box_side compares."""
    return min(box[2] - box[0], box[3] - box[1])


def index_path(records_path: str | os.PathLike) -> str:
    """The shard index next to a records file: records-….array_record -> records-….index.msgpack."""
    return os.fspath(records_path).removesuffix(".array_record") + ".index.msgpack"


def new_index() -> dict[str, list]:
    return {column: [] for column in INDEX_COLUMNS}


def index_entry(record: dict) -> dict:
    """A record's row of the shard index: {column: value}."""
    position = {panel["panel_id"]: n for n, panel in enumerate(record["panels"])}
    return {"ids": record["figure_id"],
            "panel_kinds": [PANEL_KINDS.index(panel["kind"]) for panel in record["panels"]],
            "panel_sides": [box_side(panel["box"]) for panel in record["panels"]],
            "region_panels": [position[region["panel_id"]] for region in record["regions"]],
            "region_sides": [box_side(region["box"]) for region in record["regions"]],
            "warnings": list(record["annotation"].get("warnings", []))}


def entry_at(index: dict, n: int) -> dict:
    return {column: values[n] for column, values in index.items()}


def add_entry(index: dict, entry: dict) -> None:
    for column, values in index.items():
        values.append(entry[column])


def add_index(index: dict, other: dict) -> None:
    """Every entry of `other`, in order (a shard's index after another's)."""
    for column, values in index.items():
        values.extend(other[column])


def index_of(figures: Iterable[dict]) -> dict[str, list]:
    """The shard index of decoded records (a shard from before indexes)."""
    index = new_index()
    for record in figures:
        add_entry(index, index_entry(record))
    return index


def encode_index(index: dict, records_bytes: int) -> bytes:
    """The index file of a records file of `records_bytes` bytes holding the index's records."""
    return msgpack.packb({"index_version": INDEX_VERSION, "schema_version": SCHEMA_VERSION,
                          "records": len(index["ids"]), "records_bytes": records_bytes, **index}, use_bin_type=True)


def read_index(data: bytes | None, records_path: str | os.PathLike, num_records: int, records_bytes: int) -> dict:
    """The columns of the index file `data` (None: there is none) of a records file holding
    num_records records in records_bytes bytes; RecordError, one sentence naming the file and the
    command that rebuilds it, for a missing, unreadable, other-version or stale index."""
    where, rebuild = index_path(records_path), f"{INDEX_COMMAND} {os.fspath(records_path)}"
    if data is None:
        raise RecordError(f"{records_path} has no shard index {where} (written before indexes, or by a tool other "
                          f"than RecordWriter): write it once with `{rebuild}`")
    try:
        index = msgpack.unpackb(data, raw=False)
        found = (index["index_version"], index["schema_version"], index["records"], index["records_bytes"])
        columns = {column: index[column] for column in INDEX_COLUMNS}
    except (msgpack.UnpackException, ValueError, TypeError, KeyError) as err:
        raise RecordError(f"{where} is not a shard index ({err!r}): rebuild it with `{rebuild}`") from None
    if found[:2] != (INDEX_VERSION, SCHEMA_VERSION):
        raise RecordError(f"{where} has index_version {found[0]!r} of schema_version {found[1]!r}, and this zoomin_jax "
                          f"reads index {INDEX_VERSION} of schema {SCHEMA_VERSION}: rebuild it with `{rebuild}`")
    if found[2:] != (num_records, records_bytes) or any(len(v) != num_records for v in columns.values()):
        raise RecordError(f"{where} describes {found[2]} records in {found[3]} bytes but {records_path} holds "
                          f"{num_records} in {records_bytes}, so the index is stale: rebuild it with `{rebuild}`")
    return columns


def count_records(path: str | os.PathLike) -> int:
    """Records in an ArrayRecord file, from its footer (no record is read)."""
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(os.fspath(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def load_index(records_path: str | os.PathLike) -> dict:
    """The columns of a local records file's index (read_index says when it raises)."""
    where = Path(index_path(records_path))
    return read_index(where.read_bytes() if where.exists() else None, records_path, count_records(records_path),
                      os.path.getsize(records_path))


def write_index(records_path: str | os.PathLike, index: dict) -> None:
    """The index file of a local, closed records file, replaced atomically."""
    where = Path(index_path(records_path))
    tmp = where.with_name(where.name + ".partial")
    tmp.write_bytes(encode_index(index, os.path.getsize(records_path)))
    os.replace(tmp, where)


class RecordWriter:
    """Writes one ArrayRecord shard and, when closed cleanly, its index: the records file appears
    under its final name only then, and the index after it (a crash between the two leaves a
    shard that readers decode and `load_index` calls stale or missing, never a wrong index)."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
        self.index = new_index()
        self.count = 0

    def write(self, record: dict) -> None:
        self.write_encoded(encode(record), index_entry(record))

    def write_encoded(self, data: bytes, entry: dict) -> None:
        """A record as `encode` made it with its `index_entry`, e.g. both copied from another shard and
        its index, decoding neither."""
        self._writer.write(data)
        add_entry(self.index, entry)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)
        write_index(self.path, self.index)

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
