"""Shard indexes: level indexes and annotate merge read no record where a shard has one, the same
level index without it (real MedICaT figures annotated by the heuristic backend, and synthesized
records with box sides right on the threshold), and stale or unknown indexes refused by name."""
import glob
import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

from annotate.backends import HeuristicBackend
from annotate.merge import merge
from annotate.run import run_shard
from conftest import DATA, run_cli
from test_launch_annotate import medicat_figures
from zoomin_jax import records
from zoomin_jax.data import samples, shard_index
from zoomin_jax.data.pipeline import build_indexes
from zoomin_jax.data.source import RecordSource

LEVELS = ("figure", "panel", "region")
CONFIGS = [samples.SampleConfig(), samples.SampleConfig(min_box_side=60.0, drop_panel_kinds=("chart",)),
           samples.SampleConfig(min_box_side=20.0, drop_panel_kinds=("photo", "other"))]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """The 10 real MedICaT figures annotated by the heuristic backend in 2 shards."""
    tmp = tmp_path_factory.mktemp("medicat")
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in medicat_figures()))
    for index in range(2):
        run_shard([str(manifest)], tmp / "out", HeuristicBackend(), num_shards=2, shard_index=index)
    return tmp / "out"


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """Records of every panel kind, box sides on both sides of and right on 20 px, regions of
    dropped and kept panels, and figures without panels, on one real image."""
    path = sorted(glob.glob(str(DATA / "figures" / "medicat" / "*.png")))[0]
    image_bytes = open(path, "rb").read()
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("synth") / "records-00000-of-00001.array_record"
    with records.RecordWriter(out) as writer:
        for n in range(60):
            panels = [records.new_panel(panel_id=10 + p, box=[0, 0, float(rng.choice([19.5, 20, 20.0000001, 300])),
                                                              float(rng.integers(15, 400))],
                                        kind=records.PANEL_KINDS[int(rng.integers(3))])
                      for p in range(int(rng.integers(0, 5)))]
            regions = [records.new_region(panel_id=panels[int(rng.integers(len(panels)))]["panel_id"], source="marker",
                                          box=[5, 5, 5 + float(rng.choice([8, 19.99, 20, 25.5])), 40])
                       for _ in range(int(rng.integers(0, 6)) if panels else 0)]
            writer.write(records.new_figure(figure_id=f"synth-{n}", image_bytes=image_bytes, width=400, height=400,
                                            panels=panels, regions=regions, annotation={"warnings": [f"w{n % 3}"]}))
    return out


def without_index(pattern, tmp_path):
    """A copy of the shards matching `pattern` with no index next to them, and its pattern."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in glob.glob(str(pattern)):
        shutil.copy(path, bare)
    return bare / Path(pattern).name


def expected_rows(pattern, level, cfg):
    """The items the examples use, from the decoded records: every figure, the panels
    samples.keeps_panel keeps, the regions samples.kept_regions gives those panels; each with the
    children its example can hold (kept panels, kept regions, none)."""
    rows = []
    for n, record in enumerate(records.iter_records(sorted(glob.glob(pattern)))):
        kept = {panel["panel_id"] for panel in samples.kept_panels(record, cfg)}
        rows += {"figure": [(n, -1, len(kept))],
                 "panel": [(n, k, len(samples.kept_regions(record, panel["panel_id"], cfg)))
                           for k, panel in enumerate(record["panels"]) if samples.keeps_panel(panel, cfg)],
                 "region": [(n, k, 0) for k, region in enumerate(record["regions"]) if region["panel_id"] in kept
                            and region in samples.kept_regions(record, region["panel_id"], cfg)]}[level]
    return rows


@pytest.fixture
def decodes(monkeypatch):
    """How many records were decoded."""
    calls = []
    decode = records.decode
    monkeypatch.setattr(records, "decode", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs))
    return calls


def level_rows(pattern, cfg):
    """{level: ([[record, item]], [items holding c children])} from the shard index."""
    return {level: (index.rows.tolist(), index.child_histogram.tolist())
            for level, index in build_indexes(RecordSource(pattern), LEVELS, cfg).items()}


@pytest.mark.parametrize("data", ["annotated", "synthesized"])
def test_level_indexes_read_no_record_and_match_decoding(request, data, tmp_path, decodes, capfd):
    found = request.getfixturevalue(data)
    pattern = str(found / "records-*.array_record") if data == "annotated" else str(found)
    bare = without_index(pattern, tmp_path)
    items_per_config = []
    for cfg in CONFIGS:
        decodes.clear()
        indexed = level_rows(pattern, cfg)
        items_per_config.append({level: len(rows) for level, (rows, _) in indexed.items()})
        assert not decodes and "warning" not in capfd.readouterr().err
        for level in LEVELS:
            expected = expected_rows(pattern, level, cfg)
            children = np.bincount([children for _, _, children in expected], minlength=1).tolist()
            assert indexed[level] == ([[n, k] for n, k, _ in expected], children), (level, cfg)
        assert level_rows(str(bare), cfg) == indexed and decodes
        assert capfd.readouterr().err.count("has no shard index") == len(glob.glob(pattern))
    # Not vacuous: the default config indexes panels and regions, and the configs differ in what they keep
    # (the heuristic backend calls every MedICaT panel a photo, so the last config drops them all there).
    assert items_per_config[0]["panel"] and items_per_config[0]["region"]
    assert len({tuple(items.values()) for items in items_per_config}) > 1


def test_a_shard_without_index_warns_once_and_the_build_command_writes_it(synthesized, tmp_path, decodes, capfd):
    bare = without_index(synthesized, tmp_path)
    cfg = CONFIGS[1]
    assert level_rows(str(bare), cfg) == level_rows(str(synthesized), cfg)
    warnings = capfd.readouterr().err.strip().splitlines()
    assert warnings == [f"warning: {bare} has no shard index {records.index_path(bare)} (written before indexes, or "
                        f"by a tool other than RecordWriter): write it once with `python -m zoomin_jax.data.shard_index "
                        f"build {bare}`; until then its 60 records are decoded at every start to index them"]
    run_cli("-m", "zoomin_jax.data.shard_index", "build", str(bare.parent / "records-*.array_record"))
    decodes.clear()
    assert level_rows(str(bare), cfg) == level_rows(str(synthesized), cfg) and not decodes
    assert open(records.index_path(bare), "rb").read() == open(records.index_path(synthesized), "rb").read()


def test_a_stale_or_unknown_index_is_named_and_the_shard_decoded(synthesized, tmp_path, decodes, capfd):
    bare = without_index(synthesized, tmp_path)
    expected = level_rows(str(synthesized), CONFIGS[0])
    # The index of other records with the same count: the size gives it away.
    other = records.load_index(synthesized)
    other["panel_kinds"] = [[0] * len(kinds) for kinds in other["panel_kinds"]]
    stale = records.encode_index(other, bare.stat().st_size + 1)
    newer = msgpack.packb(msgpack.unpackb(open(records.index_path(synthesized), "rb").read()) | {"index_version": 99})
    for data, problem in ((stale, f"describes 60 records in {bare.stat().st_size + 1} bytes but {bare} holds 60 in "
                                  f"{bare.stat().st_size}, so the index is stale"),
                          (newer, "has index_version 99 of schema_version 1, and this zoomin_jax reads index 1 of "
                                  "schema 1"),
                          (b"\x00 not an index", "is not a shard index")):
        open(records.index_path(bare), "wb").write(data)
        decodes.clear()
        assert level_rows(str(bare), CONFIGS[0]) == expected and len(decodes) == 60
        err = capfd.readouterr().err
        assert err.count("warning: ") == 1 and f"{records.index_path(bare)} {problem}" in err
        assert f"rebuild it with `python -m zoomin_jax.data.shard_index build {bare}`" in err


def test_merge_counts_from_the_indexes_and_decodes_a_shard_without_one(annotated, tmp_path, decodes, capfd):
    report = merge(annotated)
    assert not decodes and report["complete"] and report["decoded_shards"] == []
    assert report["figures"] == 10 and report["panels"] > 10
    copy = tmp_path / "out"
    shutil.copytree(annotated, copy)
    (copy / "records-00001-of-00002.00000.index.msgpack").unlink()
    again = merge(copy)
    assert decodes and again["decoded_shards"] == [next(line for line in capfd.readouterr().err.splitlines())
                                                   .removeprefix("merge: ").removesuffix("; decoding its records instead")]
    ignored = ("out", "decoded_shards", "shards")
    assert {k: v for k, v in again.items() if k not in ignored} == {k: v for k, v in report.items() if k not in ignored}


def test_record_source_counts_from_footers_and_grain_opens_no_shard(annotated):
    source = RecordSource(str(annotated / "records-*.array_record"))
    counts = [records.count_records(path) for path in source.paths]
    assert len(source) == sum(counts) == 10 and [len(source.shard_records(n)) for n in range(2)] == counts
    last = list(records.iter_records(source.paths[1]))[-1]
    assert source[9] == last and source.where(9) == f"{source.paths[1]} record {counts[1] - 1}"


def test_shard_items_skip_records_that_fail_to_decode(synthesized, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = tmp_path / "records-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    good = list(records.iter_records(synthesized))[:3]
    for data in (records.encode(good[0]), b"\x93 not msgpack", records.encode(good[2])):
        writer.write(data)
    writer.close()
    items, failed = shard_index.shard_items(RecordSource(str(path)), 0)
    assert failed == 1 and items.positions.tolist() == [0, 2]
    assert shard_index.level_rows(items, "figure", CONFIGS[0])[0].tolist() == [[0, -1], [2, -1]]


def test_index_workers_give_the_indexes_one_process_gives(synthesized, tmp_path):
    """Shard indexes read by 2 spawned processes (as a start over many shards does), one shard without
    an index among them (decoded there): the same rows, histograms and skip counts, for 3 processes."""
    from array_record.python.array_record_module import ArrayRecordWriter
    extra = tmp_path / "records-zz-extra.array_record"
    writer = ArrayRecordWriter(str(extra), "group_size:1")
    for data in (records.encode(next(records.iter_records(synthesized))), b"\x93 not msgpack"):
        writer.write(data)
    writer.close()
    source = RecordSource([str(synthesized), str(extra)])
    for process in range(3):
        built = [build_indexes(source, LEVELS, CONFIGS[0], process_index=process, process_count=3, index_workers=workers)
                 for workers in (0, 2)]
        for level in LEVELS:
            here, pooled = built[0][level], built[1][level]
            np.testing.assert_array_equal(here.rows, pooled.rows)
            np.testing.assert_array_equal(here.child_histogram, pooled.child_histogram)
            assert (here.total, here.skipped_records, list(here.starts)) == (
                pooled.total, pooled.skipped_records, list(pooled.starts))
            assert here.skipped_records == 1 and len(here.rows) > 0
