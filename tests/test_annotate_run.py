"""`annotate run`: bad input recorded with reasons, sharding, kill -9 and SIGTERM / resume exactly
once, parts closed on a timer, resume from the parts' indexes."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotate.backends import HeuristicBackend
from annotate.run import run_shard
from annotate.synth import synthesize
from conftest import REPO
from zoomin_jax import records


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def ids_in(out):
    got = [r["figure_id"] for r in records.iter_records(sorted(out.glob("records-*.array_record")))]
    for path in out.glob("failures-*.jsonl"):
        got += [json.loads(line)["id"] for line in path.read_text().splitlines()]
    return got


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), num=40, seed=3)


@pytest.mark.parametrize("decode_workers", [0, 2])  # decoded here, or in worker processes ahead of the backend
def test_bad_inputs_are_recorded_and_the_shard_finishes(tmp_path, figures, decode_workers):
    d = tmp_path / "img"
    d.mkdir()
    rgb = Image.open(figures / "images" / "synth-3-00000.png").convert("RGB")
    (d / "empty.png").write_bytes(b"")
    jpeg = encoded(rgb, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    (d / "bomb.png").write_bytes(encoded(Image.new("1", (9000, 9000)), "PNG"))  # 81 Mpx in a few kB
    (d / "cmyk.jpg").write_bytes(encoded(rgb.convert("CMYK"), "JPEG"))
    (d / "sixteen.png").write_bytes(encoded(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "PNG"))
    (d / "palette.png").write_bytes(encoded(rgb.convert("P"), "PNG"))
    (d / "alpha.png").write_bytes(encoded(rgb.convert("RGBA"), "PNG"))
    caption = "Kidney biopsy. (A) PAS stain. (B) Electron micrograph."
    lines = [json.dumps({"id": name, "image": f"img/{name}.{ext}", "caption": caption}).encode()
             for name, ext in (("empty", "png"), ("truncated", "jpg"), ("bomb", "png"), ("cmyk", "jpg"),
                               ("sixteen", "png"), ("palette", "png"), ("alpha", "png"), ("missing", "png"))]
    lines.append(b'{"id": "latin1", "image": "img/cmyk.jpg", "caption": "\xe9t\xe9"}')
    lines.append(json.dumps({"id": "nocaption", "image": "img/alpha.png", "caption": ""}).encode())
    lines.append(json.dumps({"id": "cmyk", "image": "img/palette.png", "caption": caption}).encode())  # duplicate
    (tmp_path / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name, data in (("../escape.png", encoded(rgb, "PNG")), ("ok.png", encoded(rgb, "PNG")),
                           ("ok.json", json.dumps({"caption": caption}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "broken.tar").write_bytes(b"\x00" * 100 + b"not a tar at all" * 50)

    out = tmp_path / "out"
    summary = run_shard([str(tmp_path / "manifest.jsonl"), str(tmp_path / "evil.tar"), str(tmp_path / "broken.tar")],
                        out, HeuristicBackend(), decode_workers=decode_workers)
    got = {r["figure_id"]: r for r in records.iter_records(sorted((out).glob("records-*.array_record")))}
    assert sorted(got) == ["alpha", "cmyk", "latin1", "nocaption", "ok", "palette", "sixteen"]
    assert got["cmyk"]["image_bytes"] == (d / "cmyk.jpg").read_bytes()  # original bytes, untouched
    # Latin-1 is not UTF-8: its letters are replaced, and the record says so.
    assert got["latin1"]["caption"] == "\ufffdt\ufffd"
    assert got["latin1"]["annotation"]["warnings"][-1].startswith("caption: text normalised: invalid UTF-8")
    assert got["nocaption"]["caption"] == "" and len(got["ok"]["panels"]) >= 1
    failures = {f["id"]: f for f in map(json.loads, (out / "failures-00000-of-00001.jsonl").read_text().splitlines())}
    reasons = {k: f"{v['stage']}: {v['reason']}" for k, v in failures.items()}
    assert "empty file" in reasons["empty"] and "truncated" in reasons["truncated"]
    assert "decompression bomb" in reasons["bomb"] and "No such file" in reasons["missing"]
    assert "duplicate id" in reasons["cmyk"] and "escapes the archive" in reasons["../escape.png"]
    assert any("tar unreadable" in r for k, r in reasons.items() if k.endswith("broken.tar"))
    assert summary["figures"] == 7 and summary["failures"] == len(failures) == 7


def test_shards_partition_the_inputs(tmp_path, figures):
    manifest = str(figures / "manifest.jsonl")
    for index in range(3):
        run_shard([manifest], tmp_path, HeuristicBackend(), num_shards=3, shard_index=index)
    expected = [json.loads(line)["id"] for line in (figures / "manifest.jsonl").read_text().splitlines()]
    got = ids_in(tmp_path)
    assert sorted(got) == sorted(expected) and len(list(tmp_path.glob("summary-*-of-00003.json"))) == 3
    # The heuristic's arrows become marker regions with the caption clause that names the arrow; a
    # false arrow in a panel whose caption names none gets the panel's whole text.
    regions = [r for record in records.iter_records(sorted(tmp_path.glob("records-*.array_record")))
               for r in record["regions"]]
    assert len(regions) >= 10 and all(r["source"] == "marker" and r["marker_kind"] == "arrow" for r in regions)
    assert all(r["text_sub"] for r in regions) and sum("arrow" in r["text_sub"] for r in regions) >= 0.8 * len(regions)


def shard_run(tmp_path, num: int, seed: int, missing: int):
    """A manifest of `num` synth figures plus `missing` lines whose image does not exist (their ids,
    the output folder, and the `annotate run` command over it in small batches and parts)."""
    data = synthesize(tmp_path / "synth", num=num, seed=seed)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    lines += [json.dumps({"id": f"gone-{n}", "image": f"images/gone-{n}.png", "caption": ""}) for n in range(missing)]
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "annotate", "run", "--input", str(data / "manifest.jsonl"), "--out", str(out),
               "--batch-size", "2", "--part-size", "10"]
    return [json.loads(line)["id"] for line in lines], out, command


def test_kill_9_mid_shard_then_resume_gives_each_id_once(tmp_path):
    expected, out, command = shard_run(tmp_path, num=120, seed=5, missing=15)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("parts-*/*.array_record"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary-00000-of-00001.json").exists(), "the run finished before it was killed"
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    got = ids_in(out)
    assert len(got) == len(set(got)) == len(expected) and set(got) == set(expected)
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert summary["resumed_with_done"] >= 30 and summary["figures"] == 120 and summary["failures"] == 15
    assert not list(out.glob("parts-*")) and not list(out.rglob("*.partial"))


def part_ids(part):
    return records.load_index(part)["ids"]


def test_sigterm_closes_the_part_exits_143_and_a_rerun_reads_only_part_indexes(tmp_path):
    expected, out, command = shard_run(tmp_path, num=80, seed=7, missing=10)
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 120
        while len(list(out.glob("parts-*/*.index.msgpack"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        sent = time.time()
        assert process.wait(timeout=30) == 143, (tmp_path / "stderr").read_text()
    assert time.time() - sent < 15 and "SIGTERM" in (tmp_path / "stderr").read_text()
    assert not (out / "summary-00000-of-00001.json").exists() and not list(out.glob("*.partial"))
    parts = sorted(out.glob("parts-*/*.array_record"))
    assert len(parts) >= 2
    recorded = [i for part in parts for i in part_ids(part)]
    assert recorded == [r["figure_id"] for r in records.iter_records(parts)]
    failed = [json.loads(line)["id"] for line in (out / "failures-00000-of-00001.jsonl").read_text().splitlines()]

    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    got = ids_in(out)
    assert len(got) == len(set(got)) == len(expected) and set(got) == set(expected)
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert summary["resume_records_decoded"] == 0 and summary["resume_parts_from_indexes"] == len(parts)
    assert summary["resumed_with_done"] == len(recorded) + len(failed)
    assert summary["figures_this_run"] == 80 - len(recorded) and summary["figures"] == 80
    assert not list(out.glob("parts-*")) and not list(out.rglob("*.partial"))


class SigtermDuring(HeuristicBackend):
    """Sends its own process SIGTERM while proposing for the batch-th batch."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch

    def propose(self, images, captions, contexts=None):
        self.batch -= 1
        if self.batch == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().propose(images, captions, contexts)


def test_the_timer_closes_parts_and_old_or_repeating_parts_still_resume(tmp_path, figures):
    manifest = [str(figures / "manifest.jsonl")]
    previous = signal.getsignal(signal.SIGTERM)
    for part_seconds, sizes in ((300, [6]), (0, [2, 2, 2])):  # 3 batches of 2, then SIGTERM
        out = tmp_path / f"out-{part_seconds}"
        with pytest.raises(SystemExit) as stopped:
            run_shard(manifest, out, SigtermDuring(3), batch_size=2, part_seconds=part_seconds)
        assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is previous
        assert [len(part_ids(part)) for part in sorted(out.glob("parts-*/*.array_record"))] == sizes

    # Part 1 as a part from before indexes, and part 0 again as part 3: its ids are in two parts.
    Path(records.index_path(out / "parts-00000-of-00001" / "00001.array_record")).unlink()
    for suffix in (".array_record", ".index.msgpack"):
        shutil.copy(out / "parts-00000-of-00001" / f"00000{suffix}", out / "parts-00000-of-00001" / f"00003{suffix}")
    summary = run_shard(manifest, out, HeuristicBackend(), batch_size=2)
    assert summary["resume_records_decoded"] == 2 and summary["resume_parts_from_indexes"] == 3
    got = ids_in(out)
    expected = [json.loads(line)["id"] for line in (figures / "manifest.jsonl").read_text().splitlines()]
    assert len(got) == len(set(got)) and sorted(got) == sorted(expected)
    assert summary["figures"] + summary["failures"] == len(expected) and summary["figures_this_run"] == 40 - 6
    assert not list(out.glob("parts-*")) and not list(out.rglob("*.partial"))


def test_dropped_proposals_keep_markers_with_their_own_panel():
    from annotate.config import AnnotateConfig
    from annotate.inputs import Figure
    from annotate.pipeline import Proposal, build_record

    image = Image.new("RGB", (200, 100), (90, 60, 120))
    proposal = Proposal(
        [{"box": [500, 500, 600, 600], "label": "A", "score": 1.0},   # outside the image: dropped
         {"box": [0, 0, 200, 100], "label": "B", "score": 0.8}],
        markers={1: [{"box": [50, 40, 60, 50], "kind": "arrow", "score": 1.0}]},
        panel_descriptions={1: "a purple field"})
    record = build_record(Figure("f", "src", "(A) x. (B) y."), encoded(image, "PNG"), image, proposal,
                          HeuristicBackend(), AnnotateConfig(), 0.0)
    assert [(p["panel_id"], p["label"], p["text_lvlm"]) for p in record["panels"]] == [(0, "B", "a purple field")]
    assert [(r["panel_id"], r["source"], r["marker_kind"]) for r in record["regions"]] == [(0, "marker", "arrow")]


def array_record_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in out.rglob("*.array_record*"))


@pytest.mark.parametrize("file_records", [4, 10])
def test_packing_the_parts_holds_the_shard_plus_one_file_on_disk(tmp_path, figures, monkeypatch, file_records):
    """Parts of 4 records become files of at most file_records: 4 renames each part (no copy), 10 joins
    two parts a file; the disk never holds more than the shard and the file being written."""
    import annotate.run as run
    out, seen, writers = tmp_path / "out", {"writers": 0, "peak": 0, "shard": 0, "largest": 0}, []
    pack, close = run._pack, records.RecordWriter.close

    def measured_pack(files, *args):
        seen["shard"] = array_record_bytes(out)
        seen["writers"] = -len(writers)
        return pack(files, *args)

    def measured_close(writer):
        close(writer)
        writers.append(writer.path)
        seen["peak"] = max(seen["peak"], array_record_bytes(out))
        seen["largest"] = max(seen["largest"], writer.path.stat().st_size)

    monkeypatch.setattr(run, "_pack", measured_pack)
    monkeypatch.setattr(records.RecordWriter, "close", measured_close)
    summary = run_shard([str(figures / "manifest.jsonl")], out, HeuristicBackend(), batch_size=2, part_size=4,
                        file_records=file_records)
    written_by_pack = len(writers) + seen["writers"]
    files = sorted(out.glob("records-*.array_record"))
    sizes = [len(records.load_index(path)["ids"]) for path in files]
    assert summary["records"] == [path.name for path in files] and sum(sizes) == summary["figures"] == 40
    assert files[0].name == "records-00000-of-00001.00000.array_record" and not (out / "parts-00000-of-00001").exists()
    if file_records == 4:
        assert sizes == [4] * 10 and written_by_pack == 0  # renamed, not copied
    else:
        assert sizes == [8] * 5 and written_by_pack == 5
        assert seen["peak"] <= seen["shard"] + seen["largest"] < 1.3 * seen["shard"]
    assert sorted(ids_in(out)) == sorted(json.loads(line)["id"] for line in
                                         (figures / "manifest.jsonl").read_text().splitlines())


def test_a_crash_while_packing_loses_nothing_and_the_rerun_finishes(tmp_path, figures, monkeypatch):
    import annotate.run as run
    remove = run._remove_part
    removed = []

    def crash_after_the_first_file(part):
        if len(removed) == 1:  # the first file is written, one of its two parts deleted
            raise KeyboardInterrupt
        removed.append(part)
        remove(part)

    monkeypatch.setattr(run, "_remove_part", crash_after_the_first_file)
    out, manifest = tmp_path / "out", [str(figures / "manifest.jsonl")]
    with pytest.raises(KeyboardInterrupt):
        run_shard(manifest, out, HeuristicBackend(), batch_size=2, part_size=4, file_records=8)
    assert [path.name for path in out.glob("records-*.array_record")] == ["records-00000-of-00001.00000.array_record"]
    assert len(list(out.glob("parts-*/*.array_record"))) == 9 and not (out / "summary-00000-of-00001.json").exists()
    monkeypatch.setattr(run, "_remove_part", remove)

    summary = run_shard(manifest, out, HeuristicBackend(), batch_size=2, part_size=4, file_records=8)
    got = ids_in(out)
    assert len(got) == len(set(got)) == 40 and summary["figures"] == 40 and summary["figures_this_run"] == 0
    assert len(summary["records"]) == 5 and not (out / "parts-00000-of-00001").exists()
