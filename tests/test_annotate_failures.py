"""A backend that raises (out of memory on big batches, a bug on one figure) costs that figure only,
and figures Qwen's smart_resize would refuse fail at decode, before any backend sees them."""
import json
import sys
import types

import pytest
from PIL import Image

import annotate.decode
from annotate.config import AnnotateConfig
from annotate.inputs import Figure
from annotate.pipeline import Proposal, annotate_batch
from annotate.run import run_shard
from conftest import DATA
from zoomin_jax import records

MEDICAT = DATA / "figures" / "medicat"


class ScriptedBackend:
    """Out of memory on any batch over `max_batch` images; a ValueError whenever `poison` is in the batch."""
    name, model_id = "scripted", "scripted-failures"

    def __init__(self, max_batch: int = 2, poison: str | None = None):
        self.max_batch, self.poison = max_batch, poison
        self.batch_sizes: list[int] = []
        self.sizes_seen: set[tuple[int, int]] = set()

    def propose(self, images: list[Image.Image], captions: list[str], contexts=None) -> list[Proposal]:
        self.batch_sizes.append(len(images))
        self.sizes_seen.update(image.size for image in images)
        if len(images) > self.max_batch:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB for a batch of {len(images)}")
        if self.poison in captions:
            raise ValueError("cannot handle\nthis figure")
        return [Proposal([{"box": [0.0, 0.0, float(image.width), float(image.height)], "label": "", "score": 1.0}])
                for image in images]


def medicat_manifest(tmp_path, extra: list[dict] = ()) -> tuple[str, list[dict]]:
    """The real MedICaT figures (read in place, not copied) as a JSONL manifest, then `extra` lines."""
    lines = []
    for n, raw in enumerate((MEDICAT / "sample.jsonl").read_text().splitlines()):
        sample = json.loads(raw)
        image = MEDICAT / f"{sample['pdf_hash']}_{sample['fig_uri']}"
        lines.append({"id": f"medicat-{n}", "image": str(image), "caption": sample["s2_caption"]})
    lines += extra
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(manifest), lines


def read_shard(out):
    got = [r["figure_id"] for r in records.iter_records(sorted((out).glob("records-*.array_record")))]
    failures = [json.loads(line) for line in (out / "failures-00000-of-00001.jsonl").read_text().splitlines()]
    return got, failures


def test_a_raising_backend_is_bisected_down_to_the_figure_that_fails_alone(tmp_path, monkeypatch):
    emptied = []
    fake_torch = types.SimpleNamespace(OutOfMemoryError=type("OutOfMemoryError", (RuntimeError,), {}),
                                       cuda=types.SimpleNamespace(is_available=lambda: True,
                                                                  empty_cache=lambda: emptied.append(True)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    decodes = []
    real_decode = annotate.decode.decode
    monkeypatch.setattr(annotate.decode, "decode", lambda data, cfg: decodes.append(1) or real_decode(data, cfg))
    manifest, lines = medicat_manifest(tmp_path)
    assert len(lines) == 10
    backend = ScriptedBackend(max_batch=2, poison=lines[2]["caption"])

    summary = run_shard([manifest], tmp_path / "out", backend, batch_size=8)

    got, failures = read_shard(tmp_path / "out")
    ids = got + [f["id"] for f in failures]
    assert len(ids) == len(set(ids)) and set(ids) == {line["id"] for line in lines}
    assert [(f["id"], f["stage"]) for f in failures] == [("medicat-2", "propose")]
    assert failures[0]["reason"] == "backend raised ValueError: cannot handle this figure"
    assert summary["figures"] == 9 and summary["failures_by_reason"] == {"propose: backend raised ValueError": 1}
    # 8 and 4 run out of memory; [0,1] passes, [2,3] hits the poison and splits into [2] (fails) and [3];
    # [4..7] runs out of memory and passes as [4,5] and [6,7]; the last batch is [8,9].
    assert backend.batch_sizes == [8, 4, 2, 2, 1, 1, 4, 2, 2, 2]
    assert len(emptied) == 3, "each out-of-memory batch frees the CUDA cache before its halves run"
    assert len(decodes) == 10, "the halves reuse the decoded images"


def test_extreme_aspect_ratio_fails_at_decode_and_never_reaches_the_backend(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (1, 400), "white").save(images / "thin.png")   # 400:1, beyond smart_resize
    Image.new("RGB", (2, 400), "white").save(images / "edge.png")   # 200:1, the largest it accepts
    manifest, _ = medicat_manifest(tmp_path, [
        {"id": "thin", "image": "img/thin.png", "caption": "A strip."},
        {"id": "edge", "image": "img/edge.png", "caption": "A strip."}])
    backend = ScriptedBackend(max_batch=16)

    run_shard([manifest], tmp_path / "out", backend, batch_size=16)

    got, failures = read_shard(tmp_path / "out")
    assert "edge" in got and len(got) == 11
    assert [(f["id"], f["stage"]) for f in failures] == [("thin", "decode")]
    assert failures[0]["reason"] == "extreme aspect ratio (1x400, 400:1) exceeds max_aspect_ratio=200"
    assert (1, 400) not in backend.sizes_seen and (2, 400) in backend.sizes_seen


def test_max_aspect_ratio_is_the_limit_of_qwens_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    limit = AnnotateConfig().max_aspect_ratio
    smart_resize(height=int(28 * limit), width=28)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(height=int(28 * limit) + 1, width=28)


def test_ctrl_c_in_the_backend_still_stops_the_run(tmp_path):
    class Interrupted(ScriptedBackend):
        def propose(self, images, captions, contexts=None):
            raise KeyboardInterrupt

    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    with pytest.raises(KeyboardInterrupt):
        annotate_batch([Figure("a", "src", "", image_path=tmp_path / "a.png")] * 2, Interrupted(), AnnotateConfig())


class OddAnswers(ScriptedBackend):
    """A whole-figure panel for each image, whose answer depends on the caption's first word: "surrogate"
    a label, description and warning no encoder takes, "score" a score that is not a number (building the
    record raises), "set" a warning msgpack cannot encode (writing it raises)."""

    def propose(self, images, captions, contexts=None):
        proposals = super().propose(images, captions)
        for proposal, caption in zip(proposals, captions, strict=True):
            kind = caption.split(" ")[0]
            if kind == "surrogate":
                proposal.panels[0]["label"] = "\udcff"
                proposal.panel_descriptions[0] = "a lesion\x00 \ud83d"
                proposal.warnings.append("model said \ud800")
            elif kind == "score":
                proposal.panels[0]["score"] = "high"
            elif kind == "set":
                proposal.warnings.append({"unencodable"})
        return proposals


def test_answers_no_encoder_takes_are_cleaned_and_a_record_that_cannot_be_built_or_written_fails_alone(tmp_path):
    image = sorted(MEDICAT.glob("*.png"))[0]
    odd = [{"id": kind, "image": str(image), "caption": f"{kind} answer."} for kind in ("surrogate", "score", "set")]
    manifest, lines = medicat_manifest(tmp_path, odd)

    summary = run_shard([manifest], tmp_path / "out", OddAnswers(max_batch=16), batch_size=4)

    got = {r["figure_id"]: r for r in records.iter_records(sorted((tmp_path / "out").glob("records-*.array_record")))}
    _, failures = read_shard(tmp_path / "out")
    ids = list(got) + [f["id"] for f in failures]
    assert len(ids) == len(set(ids)) == len(lines) == 13 and set(ids) == {line["id"] for line in lines}
    panel = got["surrogate"]["panels"][0]
    assert panel["label"] == "\ufffd" and panel["text_lvlm"] == "a lesion  \ufffd"
    assert got["surrogate"]["annotation"]["warnings"] == [
        "model said \ufffd", "panels[0].label: text normalised: invalid UTF-8 or lone surrogates replaced",
        "panels[0].text_lvlm: text normalised: invalid UTF-8 or lone surrogates and control characters replaced",
        "annotation.warnings[0]: text normalised: invalid UTF-8 or lone surrogates replaced"]
    assert {f["id"]: (f["stage"], f["reason"]) for f in failures} == {
        "score": ("record", "building it raised ValueError: could not convert string to float: 'high'"),
        "set": ("write", "encoding raised TypeError: can not serialize 'set' object")}
    assert summary["figures"] == 11 and summary["warnings_by_reason"]["panels*.label: text normalised"] == 1
