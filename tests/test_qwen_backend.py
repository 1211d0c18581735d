"""The real qwen backend, end to end on CPU, with a tiny random Qwen2.5-VL loaded by path."""
import collections
import copy
import dataclasses
import json
import shutil
import sys
import types

import pytest
from PIL import Image
from transformers.image_utils import SizeDict

from annotate import backends, prompts
from annotate.__main__ import add_lvlm_flags, lvlm_settings, main
from annotate.backends import LvlmOptions, PrefilteredBackend, make_backend
from annotate.captions import clean_label, split_caption, with_context
from annotate.config import AnnotateConfig
from annotate.engines import Answer, Request, TransformersEngine
from annotate.inputs import Figure, read_jats
from annotate.lvlm_output import resized_size
from annotate.pipeline import build_record
from annotate.qwen import QwenBackend, citing_context, panel_mentions, panel_references
from annotate.run import run_shard
from annotate.synth import synthesize
from conftest import DATA, roco_captions
from tiny_qwen import Scripted, build_tiny_qwen, side_by_side
from zoomin_jax import records

CFG = AnnotateConfig(max_pixels=28 * 28 * 64)


def qwen_backend(model, cfg=CFG, **engine_options):
    return QwenBackend(TransformersEngine(str(model), cfg, **engine_options), cfg)


def scripted_backend(model, cfg=CFG, figure=side_by_side(2), **answers):
    backend = qwen_backend(model, cfg)
    backend.engine.model.generate = scripted = Scripted(backend.engine, figure, **answers)
    return backend, scripted


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
    engine = TransformersEngine(str(request.getfixturevalue(model)), CFG)
    for size in ((634, 468), (1500, 300), (28, 28), (2000, 1500)):
        image = Image.new("RGB", size, "white")
        grid = engine.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert (int(grid[1]) * 14, int(grid[2]) * 14) == resized_size(size[1], size[0], CFG.min_pixels, CFG.max_pixels)


def test_garbage_answers_become_warnings_not_crashes(tmp_path, tiny_model):
    data = synthesize(tmp_path / "synth", num=6, seed=7)
    backend = qwen_backend(tiny_model, dataclasses.replace(CFG, max_new_tokens=24, max_retry_tokens=32))
    summary = run_shard([str(data / "manifest.jsonl")], tmp_path / "out", backend, batch_size=3)
    got = list(records.iter_records(sorted((tmp_path / "out").glob("records-*.array_record"))))
    failures = (tmp_path / "out" / "failures-00000-of-00001.jsonl").read_text().splitlines()
    assert len(got) + len(failures) == 6 and summary["backend"] == "qwen"
    # The summary counts what the run asked: at least a figure and a panel request per figure.
    assert summary["lvlm_requests"] == backend.counts["requests"] >= 2 * len(got)
    assert summary["lvlm_generate_calls"] == backend.counts["generate_calls"]
    for record in got:
        annotation = record["annotation"]
        assert annotation["backend"] == "qwen" and annotation["model"] == str(tiny_model)
        # A random model answers noise: no boxes parse, each problem is kept as a warning, and the
        # figure stays one panel carrying the whole caption (its noise is the panel's description).
        assert any(w.startswith("figure@1.0: ") for w in annotation["warnings"])
        assert "no panels in the answer; the whole figure is one panel" in annotation["warnings"]
        # Its caption split is noise too: the rules split that caption, and the record says so.
        assert "caption split: used the rule-based split" in annotation["warnings"]
        assert len(record["panels"]) == 1 and record["panels"][0]["text"] == " ".join(record["caption"].split())
    # It seldom ends an answer either: asked again at the retry budget, one is still cut there, and says so.
    assert any("figure@1.0: answer cut at 32 tokens" in record["annotation"]["warnings"] for record in got)


def test_the_request_plan_one_figure_one_split_one_per_panel_and_one_per_region(tiny_model):
    """400x200 is above max_pixels at both scales, so the model would see one size twice: asked once; its
    caption split asked once (text only, in the same generate call). Then one request per panel crop, for
    its description and its clauses' boxes, and one per region crop for its description: 6 requests, 3
    calls (one a round)."""
    backend, scripted = scripted_backend(tiny_model)
    image = Image.new("RGB", (400, 200), "white")
    caption = "Kidney. (A) PAS stain; arrows mark crescents. (B) Electron micrograph."
    (proposal,) = backend.propose([image], [caption])
    assert [(p["label"], [round(v) for v in p["box"]]) for p in proposal.panels] == [
        ("A", [0, 0, 200, 200]), ("B", [200, 0, 400, 200])]
    assert proposal.caption_split == [{"label": "A", "text": "Kidney. PAS stain; arrows mark crescents."},
                                      {"label": "B", "text": "Kidney. Electron micrograph."}]
    assert proposal.panel_descriptions == {0: "A stained tissue section.", 1: "A stained tissue section."}
    assert [m["kind"] for m in proposal.markers[0]] == ["arrow"] and 1 not in proposal.markers
    assert [p["text"] for p in proposal.phrases[0]] == ["arrows mark crescents", "PAS stain"]
    assert [p["text"] for p in proposal.phrases[1]] == ["Electron micrograph"]
    phrase_box = proposal.phrases[1][0]["box"]
    assert 200 <= phrase_box[0] < phrase_box[2] <= 400  # crop coordinates mapped back into panel B
    # Both of A's phrases are near its arrow and got the same box: one fused region. B has no markers:
    # its phrase box is a region once the region's own crop is said to show it.
    assert scripted.calls == [(["split", "figure"], CFG.max_new_tokens), (["panel", "panel"], CFG.max_new_tokens),
                              (["region", "region"], CFG.max_new_tokens)]
    assert backend.counts == {"requests": 6, "generate_calls": 3} and proposal.warnings == []
    assert scripted.answer.contexts == [None]  # no citing paragraphs given: none shown
    record = build_record(Figure("f", "src", caption), b"png", image, proposal, backend, CFG, 0.0)
    assert [(r["panel_id"], r["source"], r["text_sub"], r["text_lvlm"]) for r in record["regions"]] == [
        (0, "fused", "arrows mark crescents", "A dark nucleus."),
        (1, "caption", "Electron micrograph", "A dark nucleus.")]


def test_a_second_scale_is_asked_only_where_the_model_would_see_another_size(tiny_model):
    """200x100 is under max_pixels: at 0.75 the model sees 140x84 instead of 196x112, so both are asked;
    the two answers spell the labels differently ("A" and "(a)") and still pool into one panel each,
    spelt as the caption spells them."""
    def figure(height, width):
        spell = (lambda c: c) if width > 150 else (lambda c: f"({c.lower()})")
        return [{"bbox_2d": [0, 0, width // 2, height], "label": spell("A")},
                {"bbox_2d": [width // 2, 0, width, height], "label": spell("B")}]
    backend, scripted = scripted_backend(tiny_model, figure=figure)
    small, large = Image.new("RGB", (200, 100), "white"), Image.new("RGB", (400, 200), "white")
    proposals = backend.propose([small, large], ["Two stains: (a) PAS. (b) HE.", "(A) PAS. (B) HE."])
    assert scripted.calls[0] == (["split"] * 2 + ["figure"] * 3, CFG.max_new_tokens)  # small twice, large once
    assert [p["label"] for p in proposals[0].panels] == ["a", "b"]
    assert [p["label"] for p in proposals[1].panels] == ["A", "B"]
    assert backend.counts["requests"] == 3 + 2 + 4  # figures, splits, panels (no phrase of two words: no regions)


def test_real_generate_tells_a_cut_answer_from_one_that_ended(tiny_model):
    """The random model ends neither answer within 12 tokens. Made to end one (a token it says becomes an
    end-of-sequence token), generate pads that row while the other runs on to the budget: only the other
    is cut, and it alone is asked again."""
    backend = qwen_backend(tiny_model, dataclasses.replace(CFG, max_new_tokens=12, max_retry_tokens=16))
    engine = backend.engine
    images = [Image.new("RGB", (200, 100), "white"), Image.new("RGB", (120, 300), (30, 90, 200))]
    questions = [prompts.FIGURE, prompts.PANEL]
    requests = [Request(q, image, 12) for q, image in zip(questions, images)]
    assert [a.cut_at for a in engine.generate(requests)] == [12, 12]
    batch = engine.processor(text=[engine.chat(q, True) for q in questions], images=images, padding=True,
                             return_tensors="pt")
    out = engine.model.generate(**batch, max_new_tokens=12, do_sample=False)
    first, other = out[:, batch["input_ids"].shape[1]:].tolist()
    config = engine.model.generation_config
    config.eos_token_id = [config.eos_token_id, next(t for t in first[2:] if t not in other)]
    generate, calls = engine.model.generate, []
    engine.model.generate = lambda **kw: calls.append((len(kw["input_ids"]), kw["max_new_tokens"])) or generate(**kw)
    assert [a.cut_at for a in backend._ask(requests)] == [None, 16] and calls == [(2, 12), (1, 16)]


def test_an_answer_cut_at_the_budget_is_asked_again_alone_with_a_larger_one(tiny_model):
    """Ten panels take ~370 tokens: cut at 128, the wide figure's answer is asked again at 4 x 128,
    without the other figure, and all ten panels come back."""
    backend, scripted = scripted_backend(tiny_model, dataclasses.replace(CFG, max_new_tokens=128),
                                         figure=lambda h, w: side_by_side(10 if w > 3 * h else 2)(h, w))
    wide, pair = Image.new("RGB", (1000, 200), "white"), Image.new("RGB", (400, 200), "white")
    proposals = backend.propose([wide, pair], ["Ten stains.", "Two stains."])
    assert [p["label"] for p in proposals[0].panels] == list("ABCDEFGHIJ")
    for k, panel in enumerate(proposals[0].panels):
        assert panel["box"] == pytest.approx([100 * k, 0, 100 * k + 100, 200], abs=3)
    assert [p["label"] for p in proposals[1].panels] == ["A", "B"]
    assert [call for call in scripted.calls if "figure" in call[0]] == [(["split"] * 2 + ["figure"] * 2, 128),
                                                                          (["figure"], 512)]
    assert all(budget == 128 for kinds, budget in scripted.calls if "panel" in kinds)
    assert proposals[0].warnings == proposals[1].warnings == []


def test_an_answer_cut_even_at_the_retry_budget_keeps_its_boxes_and_says_so(tiny_model):
    """The retry budget is capped by the config: at 256 tokens ten panels are cut again, after ~7."""
    backend, scripted = scripted_backend(tiny_model, dataclasses.replace(CFG, max_new_tokens=128, max_retry_tokens=256),
                                         figure=side_by_side(10))
    (proposal,) = backend.propose([Image.new("RGB", (1000, 200), "white")], ["Ten stains."])
    labels = [p["label"] for p in proposal.panels]
    assert 5 <= len(labels) < 10 and labels == list("ABCDEFGHIJ")[:len(labels)]
    assert [budget for kinds, budget in scripted.calls if "figure" in kinds] == [128, 256]
    assert proposal.warnings[:2] == ["figure@1.0: answer cut at 256 tokens",
                                     "figure@1.0: truncated or malformed JSON; kept the complete objects"]


@pytest.mark.parametrize("bounds", [None, (28 * 28 * 4, 28 * 28 * 400)])
def test_boxes_map_back_from_the_resolution_the_model_saw(official_layout_model, bounds):
    """A large figure from a checkpoint whose saved bounds differ from the config's: answers come in
    pixels of whatever the processor fed the model (with the config's bounds, or others set on it
    later) and map back to the figure's pixels."""
    backend, _ = scripted_backend(official_layout_model)
    if bounds:
        backend.engine.processor.image_processor.size = SizeDict(shortest_edge=bounds[0], longest_edge=bounds[1])
    figure = Image.new("RGB", (2000, 1500), "white")
    (proposal,) = backend.propose([figure], ["(A) PAS stain. (B) Electron micrograph."])
    assert [(p["label"], [round(v) for v in p["box"]]) for p in proposal.panels] == [
        ("A", [0, 0, 1000, 1500]), ("B", [1000, 0, 2000, 1500])]
    assert proposal.markers[0][0]["box"][:2] == pytest.approx([250, 375], abs=5)
    # The phrase is asked about panel B's 1000x1500 crop, at a fifth to a half of its sides.
    assert proposal.phrases[1][0]["box"] == pytest.approx([1200, 300, 1500, 750], abs=10)


def test_prefilter_sends_single_panel_figures_past_the_lvlm_and_reads_nothing_else(tiny_model, monkeypatch):
    backend, scripted = scripted_backend(tiny_model)
    read = collections.Counter()
    for name in ("read_labels", "find_markers"):
        real = getattr(backends, name)
        monkeypatch.setattr(backends, name, lambda *a, _real=real, _name=name, **k: read.update([_name]) or _real(*a, **k))
    single = Image.new("RGB", (300, 200), "white")
    single.paste(Image.new("RGB", (280, 180), (90, 60, 120)), (10, 10))
    double = Image.new("RGB", (420, 200), "white")
    double.paste(Image.new("RGB", (190, 180), (90, 60, 120)), (10, 10))
    double.paste(Image.new("RGB", (190, 180), (30, 120, 60)), (220, 10))
    proposals = PrefilteredBackend(backend).propose([single, double], ["A cell.", "(A) x. (B) y."],
                                                    [["Fig. 1 shows a cell."], ["Fig. 2A shows x."]])
    assert proposals[0].warnings == ["prefilter: one panel found, LVLM skipped"]
    assert len(proposals[1].panels) == 2
    assert scripted.answer.contexts == [citing_context(["Fig. 2A shows x."])]  # the figure the LVLM sees
    assert [kinds for kinds, _ in scripted.calls if "figure" in kinds] == [["split", "figure"]]
    # Labels and markers only for the figure the LVLM does not see (one find_markers call per panel).
    assert read == {"read_labels": 1, "find_markers": 1}


def test_captions_cli_with_the_tiny_model_falls_back_to_rules(tmp_path, tiny_model):
    # A random model seldom ends an answer: at the default budgets (1024 tokens, then 4096) this takes minutes.
    source = tmp_path / "captions.jsonl"
    captions = {"f1": "Kidney biopsy. (A) PAS stain. (B) Electron micrograph.", "f2": "Chest radiograph."}
    source.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in captions.items()))
    assert main(["captions", "--input", str(source), "--out", str(tmp_path / "out.jsonl"), "--backend", "qwen",
                 "--model", str(tiny_model), "--batch-size", "2", "--max-new-tokens", "24",
                 "--max-retry-tokens", "24"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["f1", "f2"]
    for line in lines:  # a random model's answers are unusable: each caption says so and uses the rules
        assert line["panels"] == split_caption(captions[line["id"]])
        assert line["warnings"] == ["answer cut at 24 tokens", line["warnings"][1], "used the rule-based split"]


def test_lvlm_caption_split_keeps_the_shared_context(tiny_model):
    backend = qwen_backend(tiny_model)
    backend._ask = lambda requests: [
        Answer('```json\n[{"label": "A", "text": "PAS stain"}, {"label": "B", "text": "electron micrograph"}]\n```',
               None, None),
        Answer('[{"label": "A", "text": "PAS stain"}, {"label": "B", "te', 4096, None)]
    (panels, warnings), (cut_panels, cut_warnings) = backend.split_captions(
        ["Kidney biopsy. A PAS stain, B electron micrograph."] * 2)
    assert panels == [{"label": "A", "text": "Kidney biopsy. PAS stain"},
                      {"label": "B", "text": "Kidney biopsy. electron micrograph"}] and warnings == []
    # An answer cut even at the retry budget keeps what it holds, and says it was cut.
    assert cut_panels == panels[:1]
    assert cut_warnings == ["answer cut at 4096 tokens", "truncated or malformed JSON; kept the complete objects"]


def test_the_caption_split_request_shows_the_citing_paragraphs_between_its_fixed_part_and_the_caption(tiny_model):
    backend = qwen_backend(tiny_model)
    caption = "Kidney. (A) PAS stain. (B) Electron micrograph."
    fixed = prompts.SPLIT_CAPTION.format(caption="\0").split('Caption: "\0"')[0]
    asked = f'Caption: "{caption}"\nAnswer:'
    # Without paragraphs the question is panel2patch-7's: the fixed part, then the caption.
    assert backend._split_request(caption).question == backend._split_request(caption, []).question == fixed + asked
    paragraphs = ['As Fig. 1A shows, the "crescent" is\ncellular.', "Fig. 1B shows   fibrosis."]
    question = backend._split_request(caption, paragraphs).question
    # Quotes and line breaks delimit the paragraphs and the caption, so a paragraph's own do not reach the
    # question; the fixed part stays the prefix every split shares, and the caption the last thing asked.
    assert question == prompts.SPLIT_CAPTION_WITH_CONTEXT.format(
        paragraphs="\"As Fig. 1A shows, the 'crescent' is cellular.\"\n\"Fig. 1B shows fibrosis.\"", caption=caption)
    assert question.startswith(fixed) and question.endswith(asked) and "cite this figure" in question
    assert "cite this figure" not in fixed + asked


def shown_paragraphs(shown: str) -> list[str]:
    lines = shown.split("\n")
    assert all(line.startswith('"') and line.endswith('"') for line in lines)
    return [line[1:-1] for line in lines]


def jats_figure(source: str) -> Figure:
    article, fig = source.split("#")
    return next(f for f in read_jats(DATA / "jats" / article) if f.source.endswith(f"#{fig}"))


def test_citing_paragraphs_are_taken_in_order_and_cut_at_a_sentence_within_the_budget():
    # Real citing paragraphs of 945, 727, 918 and 1142 characters: the first whole, the second cut after
    # its last sentence within what is left of the budget, the others left out.
    figure = jats_figure("1471-2180-11-174.nxml#F3")
    first, second = shown_paragraphs(citing_context(figure.context))
    assert first == figure.context[0] and second.endswith(". …")
    assert figure.context[1].startswith(second[:-2]) and figure.context[1][len(second) - 2] == " "
    assert len(first) + len(second) <= prompts.CONTEXT_CHARS < len(first) + len(figure.context[1])
    # One paragraph of 6,055 characters: its first four sentences, 879 characters. The fifth runs on into
    # the text of a table the paragraph holds ("respectively).Table 3.Association …"), past the budget.
    figure = jats_figure("mds526.nxml#MDS526F1")
    (cut,) = shown_paragraphs(citing_context(figure.context))
    assert figure.context[0].startswith(cut[:-2])
    assert cut.endswith("(P = 0.01 for endometrial and P < 0.001 for others). …")
    assert len(cut) == 881 and figure.context[0][879:].startswith(" Conversely, older patients")


def test_a_paragraph_without_a_sentence_end_in_the_budget_is_cut_at_a_word():
    (cut,) = shown_paragraphs(citing_context(["lesions " * 400]))
    assert cut == "lesions " * (len(cut) // 8) + "…"
    assert prompts.CONTEXT_CHARS - 10 < len(cut) <= prompts.CONTEXT_CHARS
    # Not even a word fits: nothing to show, the question asked without context.
    assert citing_context(["x" * 2000]) == citing_context([]) == ""


def panels_reading(*labels: str):
    """A figure answer: one panel per label, side by side, as the model read them; an arrow in the first, by
    the box Scripted grounds its phrases at."""
    def answer(height: int, width: int) -> list[dict]:
        side = width // len(labels)
        arrow = [side * 3 // 10, height * 3 // 10, side * 3 // 10 + 6, height * 3 // 10 + 6]
        return [{"bbox_2d": [side * i, 0, side * (i + 1), height], "label": label}
                for i, label in enumerate(labels)] + [{"bbox_2d": arrow, "label": "arrow"}]
    return answer


def hand_split(name: str) -> tuple[str, list[dict]]:
    """A real caption and its hand split, as an LVLM that splits perfectly would answer."""
    entry = json.loads((DATA / "captions" / "prostate_caption_splits.json").read_text())[name]
    return entry["caption"], [{"label": s["label"]["text"], "text": s["caption"]} for s in entry["gt_subfigures"]]


@pytest.mark.parametrize("name,read", [
    ("pone.0003940.g004.jpg", ["I", "II", "III", "IV", "V", "VI"]),  # roman: the rules read no panels in it
    ("JCIS-4-54-g005.jpg", ["(A)", "B.", "c", "Panel D"]),             # lowercase labels, read every other way
])
def test_annotate_run_writes_the_lvlm_split_and_region_descriptions(tmp_path, tiny_model, name, read):
    """`annotate run --backend qwen` (run_shard with the real backend and engine; only the network's generate
    scripted): each panel, whatever way its label was read, gets its text from the LVLM's split of a real
    caption and its phrases grounded; each region a description."""
    caption, answer = hand_split(name)
    assert [p["label"] for p in answer] == [clean_label(label).lower() for label in read]
    Image.new("RGB", (200 * len(read), 200), "white").save(tmp_path / "figure.png")
    context = [f"Figure 4 shows the {len(read)} panels.", "As in Figure 4, the rest did not change."]
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"id": "f", "image": "figure.png", "caption": caption, "context": context}) + "\n")
    cfg = dataclasses.replace(CFG, panel_scales=(1.0,))
    backend, scripted = scripted_backend(tiny_model, cfg, figure=panels_reading(*read), split=lambda _: answer)
    run_shard([str(tmp_path / "manifest.jsonl")], tmp_path / "out", backend, cfg=cfg)
    (record,) = records.iter_records(sorted((tmp_path / "out").glob("records-*.array_record")))
    assert [{"label": p["label"], "text": p["text"]} for p in record["panels"]] == with_context(
        "", {a["label"]: a["text"] for a in answer})  # the hand texts, trailing ";" and spaces trimmed
    assert all(p["text_lvlm"] == "A stained tissue section." for p in record["panels"])
    assert record["regions"] and all(r["text_lvlm"] == "A dark nucleus." for r in record["regions"])
    assert {r["panel_id"] for r in record["regions"] if r["source"] != "marker"} == set(range(len(read)))
    annotation = record["annotation"]
    assert annotation["prompt_version"] == prompts.VERSION == "panel2patch-8" and annotation["warnings"] == []
    kinds = collections.Counter(kind for call, _ in scripted.calls for kind in call)
    assert kinds == {"figure": 1, "split": 1, "panel": len(read), "region": len(record["regions"])}
    # The record's citing paragraphs reached the model in its caption split request, as the tokens it read.
    assert record["context"] == context and scripted.answer.contexts == [citing_context(context)]
    assert citing_context(context) == "\n".join(f'"{paragraph}"' for paragraph in context)


def test_an_unusable_caption_split_falls_back_to_the_rules_for_that_caption_alone(tiny_model):
    captions = ["Kidney. (A) PAS stain. (B) Electron micrograph.", "Liver. (A) H&E stain, (B) Masson trichrome."]
    answers = {captions[0]: [{"label": "A", "text": "PAS stain."}, {"label": "C", "text": "Electron micrograph."}],
               captions[1]: [{"label": "", "text": "Liver."}, {"label": "A", "text": "H&E stain"},
                             {"label": "B", "text": "Masson trichrome"}]}
    backend, _ = scripted_backend(tiny_model, split=answers.get)
    wrong, right = backend.propose([Image.new("RGB", (400, 200), "white")] * 2, captions)
    assert wrong.caption_split == split_caption(captions[0])
    assert wrong.warnings == ["caption split: label 'C' is not one the caption names",
                              "caption split: used the rule-based split"]
    assert right.caption_split == [{"label": "A", "text": "Liver. H&E stain"},
                                   {"label": "B", "text": "Liver. Masson trichrome"}] and right.warnings == []


NO_MARKERS = "Renal biopsy. (A) Glomerulus with a cellular crescent. (B) Tubular atrophy with interstitial fibrosis."


@pytest.mark.parametrize("policy,verdict,regions,warnings", [
    # The default: a phrase box of a panel without markers is a region once its own crop is said to show it.
    ("verify", lambda phrase: phrase.startswith("Glomerulus"), ["A"], []),
    ("verify", lambda phrase: "maybe", [], [
        f"panel {label} region {phrase[:30]!r}: no verdict on whether it shows its phrase; its box is dropped"
        for label, phrase in (("A", "Glomerulus with a cellular crescent"),
                              ("B", "Tubular atrophy with interstitial fibrosis"))]),
    ("keep", None, ["A", "B"], []),  # described, never asked to verify
    ("drop", None, [], []),          # not asked about at all
])
def test_phrase_boxes_of_panels_without_markers_are_verified_by_default(tiny_model, policy, verdict, regions, warnings):
    asked = []
    cfg = dataclasses.replace(CFG, caption_boxes_without_markers=policy)
    backend, scripted = scripted_backend(tiny_model, cfg, figure=lambda h, w: panels_reading("A", "B")(h, w)[:2],
                                         shows=lambda phrase: asked.append(phrase) or verdict(phrase))  # no arrow
    image = Image.new("RGB", (400, 200), "white")
    (proposal,) = backend.propose([image], [NO_MARKERS])
    record = build_record(Figure("f", "src", NO_MARKERS), b"png", image, proposal, backend, cfg, 0.0)
    labels = [record["panels"][r["panel_id"]]["label"] for r in record["regions"]]
    assert labels == regions and all(r["source"] == "caption" for r in record["regions"])
    assert all(r["text_lvlm"] == "A dark nucleus." for r in record["regions"])
    assert proposal.warnings == warnings
    region_requests = sum(kinds.count("region") for kinds, _ in scripted.calls)
    assert region_requests == (0 if policy == "drop" else 2)
    assert len(asked) == (2 if policy == "verify" else 0)


def run_flags(*flags: str):
    parser = __import__("argparse").ArgumentParser()
    add_lvlm_flags(parser)
    return lvlm_settings(parser.parse_args(list(flags)))


def test_node_flags_reach_the_transformers_model(tiny_model, monkeypatch):
    """What the 72B model on an 8-GPU node needs, on CPU: accelerate's placement with a memory cap
    (everything fits the CPU here), the attention kernel, requests per generate call, token budgets."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    loaded, load = {}, Qwen2_5_VLForConditionalGeneration.from_pretrained
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained",
                        lambda *a, **k: loaded.update(copy.deepcopy(k)) or load(*a, **k))
    cfg, options = run_flags("--device-map", "auto", "--max-memory", "cpu=4GiB", "--attn-implementation", "eager",
                             "--lvlm-batch-size", "3", "--max-new-tokens", "400", "--max-retry-tokens", "800")
    assert (cfg.max_new_tokens, cfg.max_retry_tokens) == (400, 800)
    backend = make_backend("qwen", str(tiny_model), dataclasses.replace(cfg, max_pixels=CFG.max_pixels, panel_scales=(1.0,)),
                           options=options)
    assert {k: loaded[k] for k in ("device_map", "max_memory", "attn_implementation")} == {
        "device_map": "auto", "max_memory": {"cpu": "4GiB"}, "attn_implementation": "eager"}
    model = backend.engine.model
    assert model.config._attn_implementation == "eager" and model.device.type == "cpu"
    model.generate = scripted = Scripted(backend.engine, side_by_side(4))
    backend.propose([Image.new("RGB", (400, 100), "white")], ["(A) a. (B) b. (C) c. (D) d."])
    assert scripted.calls == [(["split", "figure"], 400), (["panel"] * 3, 400), (["panel"], 400),
                              (["region"], 400)]  # A's arrow


def test_node_flags_reach_the_vllm_engine(tiny_model, monkeypatch):
    """vLLM needs CUDA, so a stand-in `vllm.LLM` records what the engine gives it and answers like
    vLLM's outputs (text, finish_reason); the engine's mapping of those answers is real."""
    made = {}

    class Params:
        max_tokens = None

        def clone(self):
            return Params()

    class LLM:
        def __init__(self, **kwargs):
            made.update(kwargs)

        def get_default_sampling_params(self):
            return Params()

        def generate(self, prompts, params, use_tqdm):
            made["budgets"] = [p.max_tokens for p in params]
            return [types.SimpleNamespace(prompt_token_ids=vllm_prompt_tokens(prompt, made),
                                          outputs=[types.SimpleNamespace(text="[]", finish_reason=reason)])
                    for prompt, reason in zip(prompts, ("stop", "length"))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    cfg, options = run_flags("--tensor-parallel-size", "8", "--gpu-memory-utilization", "0.8",
                             "--max-model-len", "16384", "--max-num-seqs", "512")
    backend = make_backend("vllm", str(tiny_model), CFG, options=options)
    made["image_token_id"] = backend.engine.image_token_id
    assert {k: made[k] for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
                                 "enable_prefix_caching", "mm_processor_kwargs")} == {
        "tensor_parallel_size": 8, "gpu_memory_utilization": 0.8, "max_model_len": 16384, "max_num_seqs": 512,
        "enable_prefix_caching": True, "mm_processor_kwargs": {"min_pixels": CFG.min_pixels, "max_pixels": CFG.max_pixels}}
    answers = backend.engine.generate([Request(prompts.FIGURE, Image.new("RGB", (2000, 1500)), 7),
                                       Request(prompts.PANEL, Image.new("RGB", (60, 60)), 9)])
    assert made["budgets"] == [7, 9] and [a.cut_at for a in answers] == [None, 9]
    assert answers[0].seen == resized_size(1500, 2000, CFG.min_pixels, CFG.max_pixels)
    assert options == LvlmOptions(tensor_parallel_size=8, gpu_memory_utilization=0.8, max_model_len=16384,
                                  max_num_seqs=512)


def test_the_vllm_engine_asks_the_caption_split_with_its_citing_paragraphs(tiny_model, monkeypatch):
    """The vLLM backend plans the same requests as the transformers one: the split prompt vLLM gets (its
    chat template applied) holds the figure's citing paragraphs."""
    made, asked = {}, []

    class LLM:
        def __init__(self, **kwargs):
            made.update(kwargs)

        def get_default_sampling_params(self):
            return types.SimpleNamespace(clone=types.SimpleNamespace)

        def generate(self, prompts, params, use_tqdm):
            asked.extend(prompts)
            return [types.SimpleNamespace(
                prompt_token_ids=vllm_prompt_tokens(prompt, made) if "multi_modal_data" in prompt else [],
                outputs=[types.SimpleNamespace(text="[]", finish_reason="stop")]) for prompt in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    backend = make_backend("vllm", str(tiny_model), dataclasses.replace(CFG, panel_scales=(1.0,)))
    made["image_token_id"] = backend.engine.image_token_id
    caption, context = "Kidney. (A) PAS stain. (B) Electron micrograph.", ["Figure 1A shows a crescent."]
    backend.propose([Image.new("RGB", (400, 200), "white")], [caption], [context])
    (split,) = [prompt["prompt"] for prompt in asked if "multi_modal_data" not in prompt]
    question = prompts.SPLIT_CAPTION_WITH_CONTEXT.format(paragraphs=citing_context(context), caption=caption)
    assert split == backend.engine.chat(question, False) and '"Figure 1A shows a crescent."' in split


def vllm_prompt_tokens(prompt: dict, made: dict) -> list[int]:
    """A prompt's token ids as vLLM's processor makes them, reduced to its image tokens: one per 28 x 28
    pixels of the image resized under the bounds the engine gave it."""
    image, bounds = prompt["multi_modal_data"]["image"], made["mm_processor_kwargs"]
    height, width = resized_size(image.height, image.width, bounds["min_pixels"], bounds["max_pixels"])
    return [made["image_token_id"]] * ((height // 28) * (width // 28))


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


def test_a_panel_crop_too_thin_for_the_processor_is_not_asked_about(tiny_model):
    """An 8000x300 figure (26:1, which the processor takes) whose top tenth the model reads as panel A:
    its ~8000x30 crop is over smart_resize's 200:1, which would raise and fail the whole batch. It is
    kept undescribed, with a warning; panel B is asked about as usual."""
    def strip_and_rest(height, width):
        return [{"bbox_2d": [0, 0, width, round(height * 0.1)], "label": "A"},
                {"bbox_2d": [0, round(height * 0.2), width, height], "label": "B"}]

    backend, scripted = scripted_backend(tiny_model, figure=strip_and_rest)
    (proposal,) = backend.propose([Image.new("RGB", (8000, 300), "white")], ["(A) A strip. (B) The rest."])
    assert [p["label"] for p in proposal.panels] == ["A", "B"]
    assert [kinds for kinds, _ in scripted.calls if "panel" in kinds] == [["panel"]]
    assert any(w.startswith("panel 0 not described: its 8000x") and "max_aspect_ratio=200" in w
               for w in proposal.warnings), proposal.warnings
    assert 0 not in proposal.panel_descriptions and 1 in proposal.panel_descriptions


def test_a_panel_is_asked_with_what_the_citing_paragraphs_say_of_it(tiny_model):
    # Real paragraphs citing a figure of four panels (pone.0046493, Figure 3): "Figure 3A–C" names A, B and
    # C, "Figure 3D" (twice, in two paragraphs) names D.
    figure = jats_figure("pone.0046493.nxml#pone-0046493-g003")
    abc = "At xI = 20, mass increments of +286, +317 and +273 Da were observed within global masses of LipH, " \
          "LipN and LipY, respectively (Figure 3A–C)."
    references = panel_references(figure.context)
    assert panel_mentions(references, "B") == panel_mentions(references, "(b)") == abc
    assert panel_mentions(references, "C").startswith(abc + " ")
    assert panel_mentions(references, "D").count("Figure 3D") == 2
    assert panel_mentions(references, "E") == panel_mentions(references, "") == ""
    assert len(panel_mentions(panel_references(["Fig. 2B shows cells. " * 60]), "B")) <= prompts.PANEL_CONTEXT_CHARS
    # Through the transformers engine: the panel request of B (side by side with A) carries its sentence,
    # after the fixed question; A's has none.
    backend, scripted = scripted_backend(tiny_model)
    image = Image.new("RGB", (420, 200), "white")
    backend.propose([image], ["(A) Liver. (B) Kidney."], [["Liver and kidney in Fig. 2. Fig. 2B shows the kidney cortex."]])
    assert scripted.answer.mentions == [None, "Fig. 2B shows the kidney cortex."]
