"""The real qwen backend, end to end on CPU, with a tiny random Qwen2.5-VL loaded by path."""
import json

import pytest
from PIL import Image

from annotate.config import AnnotateConfig
from annotate.lvlm_output import resized_size
from annotate.qwen import QwenBackend
from annotate.run import run_shard
from annotate.synth import synthesize
from conftest import roco_captions
from tiny_qwen import build_tiny_qwen
from zoomin_jax import records

CFG = AnnotateConfig(max_pixels=28 * 28 * 64)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    corpus = roco_captions()[:2000] + [json.dumps([{"bbox_2d": [n, n + 1, n + 50, n + 60], "label": "ABCD"[n % 4]}])
                                       for n in range(300)]
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), corpus)


def test_processor_sees_the_smart_resize_size(tiny_model):
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=4)
    for size in ((634, 468), (1500, 300), (28, 28)):
        image = Image.new("RGB", size, "white")
        grid = backend.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert (int(grid[1]) * 14, int(grid[2]) * 14) == resized_size(size[1], size[0], CFG.min_pixels, CFG.max_pixels)


def test_garbage_answers_become_warnings_not_crashes(tmp_path, tiny_model):
    data = synthesize(tmp_path / "synth", num=6, seed=7)
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=24)
    summary = run_shard([str(data / "manifest.jsonl")], tmp_path / "out", backend, batch_size=3)
    got = list(records.iter_records(tmp_path / "out" / "records-00000-of-00001.array_record"))
    failures = (tmp_path / "out" / "failures-00000-of-00001.jsonl").read_text().splitlines()
    assert len(got) + len(failures) == 6 and summary["backend"] == "qwen"
    for record in got:
        annotation = record["annotation"]
        assert annotation["backend"] == "qwen" and annotation["model"] == str(tiny_model)
        # A random model answers noise: no boxes parse, each problem is kept as a warning, and the
        # figure stays one panel carrying the whole caption.
        assert any(w.startswith("panels@1.0: ") for w in annotation["warnings"])
        assert any(w.startswith("panels@0.75: ") for w in annotation["warnings"])
        assert len(record["panels"]) >= 1
