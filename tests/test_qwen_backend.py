"""The real qwen backend, end to end on CPU, with a tiny random Qwen2.5-VL loaded by path."""
import dataclasses
import functools
import json
import shutil

import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from annotate import prompts, qwen
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
    backend = QwenBackend(str(tiny_model), dataclasses.replace(CFG, max_retry_tokens=32), max_new_tokens=24)
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
    # It seldom ends an answer either: asked again at the retry budget, one is still cut there, and says so.
    assert any("panels@1.0: answer cut at 32 tokens" in record["annotation"]["warnings"] for record in got)


class Scripted:
    """Stands in for the network's `generate` only, answering as a good Qwen2.5-VL would: in pixels of
    the resized input it saw, read off its image grid, with `panels(height, width)` panels side by side.
    Like generate, it ends each answer with the end-of-sequence token unless `max_new_tokens` cuts it
    first, and pads the rows that ended. `calls` holds each call's questions and budget. Everything around
    it — processor, prompts, parsing, mapping, pooling, fusion — is real."""

    def __init__(self, backend, panels=lambda height, width: 2):
        self.tokenizer, self.panels, self.calls = backend.processor.tokenizer, panels, []
        self.patch = backend.model.config.vision_config.patch_size

    def __call__(self, input_ids, image_grid_thw, max_new_tokens, **_):
        questions, answers = [], []
        prompts_and_grids = zip(self.tokenizer.batch_decode(input_ids), image_grid_thw.tolist(), strict=True)
        for prompt, (_, rows, columns) in prompts_and_grids:
            question = next((q for q in (prompts.PANELS, prompts.MARKERS, prompts.DESCRIBE) if q in prompt), prompt)
            questions.append(question)
            h, w = rows * self.patch, columns * self.patch
            if question == prompts.PANELS:
                n = self.panels(h, w)
                answers.append("```json\n[" + ", ".join(
                    f'{{"bbox_2d": [{w * i // n}, 0, {w * (i + 1) // n}, {h}], "label": "{chr(ord("A") + i)}"}}'
                    for i in range(n)) + "]\n```")
            elif question == prompts.MARKERS:
                answers.append(f'[{{"bbox_2d": [{w // 8}, {h // 4}, {w // 8 + 6}, {h // 4 + 6}], "label": "arrow"}}]')
            elif question == prompts.DESCRIBE:
                answers.append("A stained tissue section.")
            else:  # grounding in a panel crop
                answers.append(f'[{{"bbox_2d": [{w // 5}, {h // 5}, {w // 2}, {h // 2}], "label": "x"}}]')
        self.calls.append((questions, max_new_tokens))
        ids = [(row + [self.tokenizer.eos_token_id])[:max_new_tokens]
               for row in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        longest = max(map(len, ids))
        answer_ids = torch.tensor([row + [self.tokenizer.pad_token_id] * (longest - len(row)) for row in ids])
        return torch.cat([input_ids, answer_ids], dim=1)


def test_scripted_answers_become_panels_markers_and_fused_regions(tmp_path, tiny_model):
    backend = QwenBackend(str(tiny_model), CFG)
    backend.model.generate = scripted = Scripted(backend)
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
    # Answers that end within the budget are asked once: one call per panel scale, markers, descriptions
    # and phrases, none of them again.
    assert [questions[0] for questions, _ in scripted.calls][:4] == [prompts.PANELS, prompts.PANELS, prompts.MARKERS,
                                                                     prompts.DESCRIBE]
    assert len(scripted.calls) == 5 and proposal.warnings == []


def test_real_generate_tells_a_cut_answer_from_one_that_ended(tiny_model):
    """The random model ends neither answer within 12 tokens. Made to end one (a token it says becomes an
    end-of-sequence token), generate pads that row while the other runs on to the budget: only the other
    is cut, and it alone is asked again."""
    backend = QwenBackend(str(tiny_model), dataclasses.replace(CFG, max_retry_tokens=16), max_new_tokens=12)
    images = [Image.new("RGB", (200, 100), "white"), Image.new("RGB", (120, 300), (30, 90, 200))]
    questions = [prompts.PANELS, prompts.MARKERS]
    assert backend._generate_once(images, questions, 12)[1] == [True, True]
    batch = backend.processor(text=backend._chat(questions), images=images, padding=True, return_tensors="pt")
    out = backend.model.generate(**batch, max_new_tokens=12, do_sample=False)
    first, other = out[:, batch["input_ids"].shape[1]:].tolist()
    config = backend.model.generation_config
    config.eos_token_id = [config.eos_token_id, next(t for t in first[2:] if t not in other)]
    generate, calls = backend.model.generate, []
    backend.model.generate = lambda **kw: calls.append((len(kw["input_ids"]), kw["max_new_tokens"])) or generate(**kw)
    _, cut, _ = backend._generate(images, questions)
    assert cut == [None, 16] and calls == [(2, 12), (1, 16)]


def test_an_answer_cut_at_the_budget_is_asked_again_alone_with_a_larger_one(tiny_model):
    """Ten panels take ~330 tokens: cut at 128, the wide figure's panel answer is asked again at 4 x 128,
    without the other figure, and all ten panels come back."""
    backend = QwenBackend(str(tiny_model), CFG, max_new_tokens=128)
    backend.model.generate = scripted = Scripted(backend, panels=lambda height, width: 10 if width > 3 * height else 2)
    wide, pair = Image.new("RGB", (1000, 200), "white"), Image.new("RGB", (400, 200), "white")
    proposals = backend.propose([wide, pair], ["Ten stains.", "Two stains."])
    assert [p["label"] for p in proposals[0].panels] == list("ABCDEFGHIJ")
    for k, panel in enumerate(proposals[0].panels):
        assert panel["box"] == pytest.approx([100 * k, 0, 100 * k + 100, 200], abs=3)
    assert [p["label"] for p in proposals[1].panels] == ["A", "B"]
    panel_calls = [(questions, budget) for questions, budget in scripted.calls if prompts.PANELS in questions]
    assert panel_calls == [([prompts.PANELS] * 2, 128), ([prompts.PANELS], 512)] * len(CFG.panel_scales)
    assert all(budget == 128 for questions, budget in scripted.calls if prompts.MARKERS in questions)
    assert proposals[0].warnings == proposals[1].warnings == []


def test_an_answer_cut_even_at_the_retry_budget_keeps_its_boxes_and_says_so(tiny_model):
    """The retry budget is capped by the config: at 256 tokens ten panels are cut again, after ~7."""
    backend = QwenBackend(str(tiny_model), dataclasses.replace(CFG, max_retry_tokens=256), max_new_tokens=128)
    backend.model.generate = scripted = Scripted(backend, panels=lambda height, width: 10)
    (proposal,) = backend.propose([Image.new("RGB", (1000, 200), "white")], ["Ten stains."])
    labels = [p["label"] for p in proposal.panels]
    assert 5 <= len(labels) < 10 and labels == list("ABCDEFGHIJ")[:len(labels)]
    assert [budget for questions, budget in scripted.calls if prompts.PANELS in questions] == [128, 256] * 2
    assert proposal.warnings[:2] == ["panels@1.0: answer cut at 256 tokens",
                                     "panels@1.0: truncated or malformed JSON; kept the complete objects"]
    assert "panels@0.75: answer cut at 256 tokens" in proposal.warnings


@pytest.mark.parametrize("bounds", [None, (28 * 28 * 4, 28 * 28 * 400)])
def test_boxes_map_back_from_the_resolution_the_model_saw(official_layout_model, bounds):
    """A large figure from a checkpoint whose saved bounds differ from the config's: answers come in
    pixels of whatever the processor fed the model (with the config's bounds, or others set on it
    later) and map back to the figure's pixels."""
    backend = QwenBackend(str(official_layout_model), CFG)
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
    backend = QwenBackend(str(tiny_model), CFG)
    backend.model.generate = scripted = Scripted(backend)
    single = Image.new("RGB", (300, 200), "white")
    single.paste(Image.new("RGB", (280, 180), (90, 60, 120)), (10, 10))
    double = Image.new("RGB", (420, 200), "white")
    double.paste(Image.new("RGB", (190, 180), (90, 60, 120)), (10, 10))
    double.paste(Image.new("RGB", (190, 180), (30, 120, 60)), (220, 10))
    proposals = PrefilteredBackend(backend).propose([single, double], ["A cell.", "(A) x. (B) y."])
    assert proposals[0].warnings == ["prefilter: one panel found, LVLM skipped"]
    assert len(proposals[1].panels) == 2
    assert [questions for questions, _ in scripted.calls if prompts.PANELS in questions] == [[prompts.PANELS]] * 2


def test_captions_cli_with_the_tiny_model_falls_back_to_rules(tmp_path, tiny_model, monkeypatch):
    # A random model seldom ends an answer: at the default budgets (1024 tokens, then 4096) this takes minutes.
    monkeypatch.setattr(qwen, "QwenBackend", functools.partial(QwenBackend, max_new_tokens=24))
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
        '```json\n[{"label": "A", "text": "PAS stain"}, {"label": "B", "text": "electron micrograph"}]\n```',
        '[{"label": "A", "text": "PAS stain"}, {"label": "B", "te'], [None, 4096], [])
    (panels, warnings), (cut_panels, cut_warnings) = backend.split_captions(
        ["Kidney biopsy. A PAS stain, B electron micrograph."] * 2)
    assert panels == [{"label": "A", "text": "Kidney biopsy. PAS stain"},
                      {"label": "B", "text": "Kidney biopsy. electron micrograph"}] and warnings == []
    # An answer cut even at the retry budget keeps what it holds, and says it was cut.
    assert cut_panels == panels[:1]
    assert cut_warnings == ["answer cut at 4096 tokens", "truncated or malformed JSON; kept the complete objects"]


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
