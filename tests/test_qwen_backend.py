"""The real qwen backend, end to end on CPU, with a tiny random Qwen2.5-VL loaded by path."""
import json
import shutil

import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from annotate import prompts
from annotate.__main__ import main
from annotate.backends import PrefilteredBackend
from annotate.captions import split_caption
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


# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json: saved pixel bounds, no `size`.
OFFICIAL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


@pytest.fixture(scope="module")
def official_layout_model(tiny_model, tmp_path_factory):
    """The tiny model with its image processor saved the way official checkpoints ship it."""
    path = tmp_path_factory.mktemp("official-layout") / "model"
    shutil.copytree(tiny_model, path)
    processor = json.loads((path / "processor_config.json").read_text())
    del processor["image_processor"]  # it would take precedence over preprocessor_config.json
    (path / "processor_config.json").write_text(json.dumps(processor))
    (path / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_PREPROCESSOR))
    return path


@pytest.mark.parametrize("model", ["tiny_model", "official_layout_model"])
def test_processor_sees_the_smart_resize_size(model, request):
    backend = QwenBackend(str(request.getfixturevalue(model)), CFG, max_new_tokens=4)
    for size in ((634, 468), (1500, 300), (28, 28), (2000, 1500)):
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


class Scripted:
    """Stands in for the network's `generate` only, answering as a good Qwen2.5-VL would: in pixels of
    the resized input it saw, read off its image grid. Everything around it — processor, prompts,
    parsing, mapping, pooling, fusion — is real."""

    def __init__(self, backend):
        self.tokenizer, self.calls = backend.processor.tokenizer, []
        self.patch = backend.model.config.vision_config.patch_size

    def __call__(self, input_ids, image_grid_thw, **_):
        answers = []
        prompts_and_grids = zip(self.tokenizer.batch_decode(input_ids), image_grid_thw.tolist(), strict=True)
        for prompt, (_, rows, columns) in prompts_and_grids:
            question = next((q for q in (prompts.PANELS, prompts.MARKERS, prompts.DESCRIBE) if q in prompt), prompt)
            self.calls.append(question)
            h, w = rows * self.patch, columns * self.patch
            if question == prompts.PANELS:
                answers.append(f'```json\n[{{"bbox_2d": [0, 0, {w // 2}, {h}], "label": "A"}}, '
                               f'{{"bbox_2d": [{w // 2}, 0, {w}, {h}], "label": "B"}}]\n```')
            elif question == prompts.MARKERS:
                answers.append(f'[{{"bbox_2d": [{w // 8}, {h // 4}, {w // 8 + 6}, {h // 4 + 6}], "label": "arrow"}}]')
            elif question == prompts.DESCRIBE:
                answers.append("A stained tissue section.")
            else:  # grounding in a panel crop
                answers.append(f'[{{"bbox_2d": [{w // 5}, {h // 5}, {w // 2}, {h // 2}], "label": "x"}}]')
        answer_ids = self.tokenizer(answers, add_special_tokens=False, padding=True, padding_side="right",
                                    return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, answer_ids], dim=1)


def test_scripted_answers_become_panels_markers_and_fused_regions(tmp_path, tiny_model):
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=4)
    backend.model.generate = Scripted(backend)
    image = Image.new("RGB", (400, 200), "white")
    caption = "Kidney. (A) PAS stain; arrows mark crescents. (B) Electron micrograph."
    (proposal,) = backend.propose([image], [caption])
    assert [(p["label"], [round(v) for v in p["box"]]) for p in proposal.panels] == [
        ("A", [0, 0, 200, 200]), ("B", [200, 0, 400, 200])]
    assert proposal.panel_descriptions == {0: "A stained tissue section.", 1: "A stained tissue section."}
    assert [m["kind"] for m in proposal.markers[0]] == ["arrow"] and 1 not in proposal.markers
    assert [p["text"] for p in proposal.phrases[0]] == ["arrows mark crescents", "PAS stain"]
    assert [p["text"] for p in proposal.phrases[1]] == ["Electron micrograph"]
    phrase_box = proposal.phrases[1][0]["box"]
    assert 200 <= phrase_box[0] < phrase_box[2] <= 400  # crop coordinates mapped back into panel B


@pytest.mark.parametrize("bounds", [None, (28 * 28 * 4, 28 * 28 * 400)])
def test_boxes_map_back_from_the_resolution_the_model_saw(official_layout_model, bounds):
    """A large figure from a checkpoint whose saved bounds differ from the config's: answers come in
    pixels of whatever the processor fed the model (with the config's bounds, or others set on it
    later) and map back to the figure's pixels."""
    backend = QwenBackend(str(official_layout_model), CFG, max_new_tokens=4)
    if bounds:
        backend.processor.image_processor.size = SizeDict(shortest_edge=bounds[0], longest_edge=bounds[1])
    backend.model.generate = Scripted(backend)
    figure = Image.new("RGB", (2000, 1500), "white")
    (proposal,) = backend.propose([figure], ["(A) PAS stain. (B) Electron micrograph."])
    assert [(p["label"], [round(v) for v in p["box"]]) for p in proposal.panels] == [
        ("A", [0, 0, 1000, 1500]), ("B", [1000, 0, 2000, 1500])]
    assert proposal.markers[0][0]["box"][:2] == pytest.approx([250, 375], abs=5)
    # The phrase is asked about panel B's 1000x1500 crop, at a fifth to a half of its sides.
    assert proposal.phrases[1][0]["box"] == pytest.approx([1200, 300, 1500, 750], abs=10)


def test_prefilter_sends_single_panel_figures_past_the_lvlm(tiny_model):
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=4)
    backend.model.generate = scripted = Scripted(backend)
    single = Image.new("RGB", (300, 200), "white")
    single.paste(Image.new("RGB", (280, 180), (90, 60, 120)), (10, 10))
    double = Image.new("RGB", (420, 200), "white")
    double.paste(Image.new("RGB", (190, 180), (90, 60, 120)), (10, 10))
    double.paste(Image.new("RGB", (190, 180), (30, 120, 60)), (220, 10))
    proposals = PrefilteredBackend(backend).propose([single, double], ["A cell.", "(A) x. (B) y."])
    assert proposals[0].warnings == ["prefilter: one panel found, LVLM skipped"]
    assert len(proposals[1].panels) == 2 and scripted.calls.count(prompts.PANELS) == len(CFG.panel_scales)


def test_captions_cli_with_the_tiny_model_falls_back_to_rules(tmp_path, tiny_model):
    source = tmp_path / "captions.jsonl"
    captions = {"f1": "Kidney biopsy. (A) PAS stain. (B) Electron micrograph.", "f2": "Chest radiograph."}
    source.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in captions.items()))
    assert main(["captions", "--input", str(source), "--out", str(tmp_path / "out.jsonl"), "--backend", "qwen",
                 "--model", str(tiny_model), "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["f1", "f2"]
    for line in lines:  # a random model's answers are unusable: each caption says so and uses the rules
        assert line["panels"] == split_caption(captions[line["id"]])
        assert line["warnings"][-1] == "used the rule-based split"


def test_lvlm_caption_split_keeps_the_shared_context(tiny_model):
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=4)
    backend._generate = lambda images, questions: ([
        '```json\n[{"label": "A", "text": "PAS stain"}, {"label": "B", "text": "electron micrograph"}]\n```'], [])
    ((panels, warnings),) = backend.split_captions(["Kidney biopsy. A PAS stain, B electron micrograph."])
    assert panels == [{"label": "A", "text": "Kidney biopsy. PAS stain"},
                      {"label": "B", "text": "Kidney biopsy. electron micrograph"}] and warnings == []


def test_vllm_backend_is_imported_only_when_chosen(tmp_path, tiny_model, capsys):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; this checks the message where it is not")
    source = tmp_path / "m.jsonl"
    source.write_text(json.dumps({"id": "x", "image": "x.png", "caption": "c"}) + "\n")
    assert main(["run", "--input", str(source), "--out", str(tmp_path / "out"), "--backend", "vllm",
                 "--model", str(tiny_model)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --backend vllm needs the vllm package")
    assert not (tmp_path / "out").exists()
