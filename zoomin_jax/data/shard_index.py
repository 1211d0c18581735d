"""Level indexes from the shard indexes: a start that reads no image bytes (docs/design.md §7).

    python -m zoomin_jax.data.shard_index build SHARD_OR_GLOB...

writes the index of shards made before indexes existed (or by another writer), next to each
(records.py describes the file); annotate run and records.RecordWriter write it with every shard.

Each host reads every shard's index file (a few hundred bytes per figure) and its records file's
footer for the count to check it against, never a record. A shard without a usable index (none,
another version, or stale: its records file no longer has the count and size the index was
written for) is indexed by decoding its records, as before indexes, with one warning naming the
file and the command that writes its index: the records are the truth and the index only a faster
way to read what they say, so a bad index costs time, never a run, and never a wrong level index.
The rows come out in the order the per-record loop over decoded records gave (record, then item),
so a level index is the same with and without the index files.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import numpy as np
from etils import epath

from zoomin_jax import records
from zoomin_jax.data.samples import SampleConfig
from zoomin_jax.data.source import RecordSource, expand
from zoomin_jax.errors import UserError


@dataclasses.dataclass
class ShardItems:
    """One shard's index as flat arrays: the records it describes (their positions in the source)
    and their panels and regions, in record order."""
    positions: np.ndarray       # [records]
    panels: np.ndarray          # [records] panels per record
    panel_kinds: np.ndarray     # [panels] position in records.PANEL_KINDS
    panel_sides: np.ndarray     # [panels] shorter box side
    regions: np.ndarray         # [records] regions per record
    region_panels: np.ndarray   # [regions] the region's panel, as a position among its record's panels
    region_sides: np.ndarray    # [regions]

    @classmethod
    def from_index(cls, index: dict, positions: np.ndarray) -> ShardItems:
        def flat(column: str, dtype) -> np.ndarray:
            return np.fromiter(itertools.chain.from_iterable(index[column]), dtype)

        def counts(column: str) -> np.ndarray:
            return np.fromiter(map(len, index[column]), np.int64, len(positions))

        return cls(np.asarray(positions, np.int64), counts("panel_kinds"), flat("panel_kinds", np.int64),
                   flat("panel_sides", np.float64), counts("region_panels"), flat("region_panels", np.int64),
                   flat("region_sides", np.float64))


def shard_items(source: RecordSource, shard: int) -> tuple[ShardItems, int]:
    """A shard's items and how many of its records failed to decode: from its index file, or, when
    that is missing or unusable, from its records (see the module docstring)."""
    path, positions = source.paths[shard], source.shard_records(shard)
    index_file = epath.Path(records.index_path(path))
    try:
        data = index_file.read_bytes() if index_file.exists() else None
        index = records.read_index(data, path, len(positions), epath.Path(path).stat().length)
        return ShardItems.from_index(index, np.arange(positions.start, positions.stop)), 0
    except records.RecordError as err:
        print(f"warning: {err}; until then its {len(positions)} records are decoded at every start to index them",
              file=sys.stderr, flush=True)
    decoded = [(n, record) for n in positions if (record := source[n]) is not None]
    index = records.index_of(record for _, record in decoded)
    return ShardItems.from_index(index, np.array([n for n, _ in decoded], np.int64)), len(positions) - len(decoded)


def shard_levels(path: str, first_record: int, strict: bool, levels, cfg: SampleConfig) -> tuple[dict, int]:
    """One shard's part of each level, as build_indexes takes them: {level: (int32 rows (record, item),
    with records numbered from `first_record`; a histogram of the children each row's example can
    hold)} and how many of its records failed to decode. Module level: a pool's spawned processes run
    it, and what they send back is numbers only."""
    items, failed = shard_items(RecordSource(path, strict=strict), 0)
    items.positions += first_record
    parts = {}
    for level in levels:
        rows, child_counts = level_rows(items, level, cfg)
        parts[level] = rows.astype(np.int32), np.bincount(child_counts, minlength=1)
    return parts, failed


def _rows(records_of: np.ndarray, items: np.ndarray, kept: np.ndarray) -> np.ndarray:
    return np.stack([records_of[kept], items[kept]], axis=1)


def level_rows(items: ShardItems, level: str, cfg: SampleConfig) -> tuple[np.ndarray, np.ndarray]:
    """[n, 2] (record, item) rows of one level: every figure (item -1: figures without panels still
    feed the figure level), the panels samples.keeps_panel keeps, and the regions of kept panels
    with sides of at least cfg.min_box_side (those samples.kept_regions gives a panel example); and
    [n] the children each row's example can hold at most (kept panels of a figure, kept regions of a
    panel; 0 for a region), which data.packing sizes the child slots from."""
    panel_record = np.repeat(np.arange(len(items.panels)), items.panels)
    first_panel = np.cumsum(items.panels) - items.panels
    dropped = [records.PANEL_KINDS.index(kind) for kind in cfg.drop_panel_kinds if kind in records.PANEL_KINDS]
    panel_kept = ~np.isin(items.panel_kinds, dropped) & (items.panel_sides >= cfg.min_box_side)
    region_record = np.repeat(np.arange(len(items.regions)), items.regions)
    first_region = np.cumsum(items.regions) - items.regions
    region_panel = first_panel[region_record] + items.region_panels
    region_kept = panel_kept[region_panel] & (items.region_sides >= cfg.min_box_side)
    if level == "figure":
        every = np.ones(len(items.positions), bool)
        kept_panels = np.bincount(panel_record[panel_kept], minlength=len(items.panels))
        return _rows(items.positions, np.full(len(items.positions), -1), every), kept_panels
    if level == "panel":
        kept_regions = np.bincount(region_panel[region_kept], minlength=len(panel_record))
        return (_rows(items.positions[panel_record], np.arange(len(panel_record)) - first_panel[panel_record],
                      panel_kept), kept_regions[panel_kept])
    return (_rows(items.positions[region_record], np.arange(len(region_record)) - first_region[region_record],
                  region_kept), np.zeros(int(region_kept.sum()), np.int64))


def build(patterns) -> None:
    """Writes the index of every shard matching `patterns`, decoding its records once."""
    for path in expand(patterns):
        index = records.index_of(records.iter_records(path))
        epath.Path(records.index_path(path)).write_bytes(records.encode_index(index, epath.Path(path).stat().length))
        print(f"{records.index_path(path)}: {len(index['ids'])} records", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="write the index of existing shards").add_argument("shards", nargs="+")
    args = parser.parse_args(argv)
    try:
        build(args.shards)
    except (UserError, records.RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
