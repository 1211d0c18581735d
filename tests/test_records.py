import glob

import msgpack
import pytest
from PIL import Image

from conftest import DATA
from zoomin_jax import records
from zoomin_jax.records import RecordError


def figure(figure_id="PMC1_fig2", **overrides):
    path = sorted(glob.glob(str(DATA / "figures" / "medicat" / "*.png")))[0]
    image = Image.open(path)
    width, height = image.size
    panels = [records.new_panel(panel_id=0, label="A", box=[0, 0, width / 2, height], text="(A) H&E stain.",
                                kind="photo", score=0.9),
              records.new_panel(panel_id=1, label="B", box=[width / 2, 0, width, height], kind="chart")]
    regions = [records.new_region(panel_id=0, box=[10, 10, 60, 50], text_sub="arrow marks a nucleus",
                                  marker_box=[55, 40, 70, 60], marker_kind="arrow", source="fused", score=0.7)]
    values = dict(figure_id=figure_id, source=path, image_bytes=open(path, "rb").read(), width=width,
                  height=height, caption="(A) H&E stain. (B) Counts.", context=["as shown in Fig. 2"],
                  panels=panels, regions=regions, annotation={"backend": "heuristic", "warnings": []})
    return records.new_figure(**(values | overrides))


def test_shard_round_trip_keeps_every_field(tmp_path):
    written = [figure("a"), figure("b", panels=[], regions=[])]
    with records.RecordWriter(tmp_path / "records-00000-of-00001.array_record") as writer:
        for record in written:
            writer.write(record)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "records-00000-of-00001.array_record",
                                          tmp_path / "records-00000-of-00001.index.msgpack"]
    read = list(records.iter_records(tmp_path / "records-00000-of-00001.array_record"))
    assert read == written
    assert read[0]["image_bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_writer_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with records.RecordWriter(tmp_path / "shard.array_record") as writer:
            writer.write(figure())
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_unknown_schema_version_is_rejected():
    data = records.encode(figure())
    record = msgpack.unpackb(data)
    record["schema_version"] = 99
    with pytest.raises(RecordError, match="schema_version 99; this zoomin_jax reads version 1"):
        records.decode(msgpack.packb(record, use_bin_type=True), where="shard.array_record record 3")


@pytest.mark.parametrize("change,message", [
    (lambda r: r["panels"][0].update(box=[0, 0, 99999, 10]), r"panels\[0\].box .* outside the"),
    (lambda r: r["panels"][1].update(box=[50, 10, 40, 20]), r"panels\[1\].box .* empty"),
    (lambda r: r["regions"][0].update(panel_id=7), r"regions\[0\].panel_id 7 names no panel"),
    (lambda r: r["regions"][0].update(marker_kind="star"), r"marker_kind is 'star'"),
    (lambda r: r["panels"][0].update(kind="table"), r"kind is 'table'"),
    (lambda r: r["panels"][1].update(panel_id=0), r"panel_id 0 is used twice"),
    (lambda r: r.update(width=True), r"width is bool"),
    (lambda r: r.pop("caption"), r"has fields"),
])
def test_schema_violations_name_figure_and_field(change, message):
    record = figure()
    change(record)
    with pytest.raises(RecordError, match=message) as err:
        records.encode(record)
    assert "PMC1_fig2" in str(err.value)


def test_clip_box():
    assert records.clip_box([-5, 10, 50, 200], 100, 100) == [0.0, 10.0, 50.0, 100.0]
    assert records.clip_box([60, 10, 20, 30], 100, 100) == [20.0, 10.0, 60.0, 30.0]
    assert records.clip_box([120, 10, 150, 30], 100, 100) is None
