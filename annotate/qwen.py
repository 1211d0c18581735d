"""The `qwen` backend: Qwen2.5-VL (transformers) proposes panels with labels (pooled over scales),
markers (path A), boxes for each panel's caption clauses (path B) and short panel descriptions, in
batched generation (bf16 on CUDA, float32 on CPU).

Answers are untrusted text: `lvlm_output.parse_boxes` keeps what is usable and every problem becomes
a warning in the record's annotation, never an exception. Prompts are versioned in `prompts.py`.
"""
from __future__ import annotations

import torch
from PIL import Image

from annotate import prompts
from annotate.captions import groundable_clauses, shared_context, split_caption, with_context
from annotate.config import AnnotateConfig
from annotate.lvlm_output import Parsed, parse_boxes, parse_caption_split, resized_size
from annotate.pipeline import Proposal
from annotate.regions import non_max_suppression

_MARKER_KINDS = {"arrow", "arrowhead", "asterisk", "circle", "letter", "inset"}


def _inside(box, panel) -> bool:
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return panel[0] <= x <= panel[2] and panel[1] <= y <= panel[3]


class QwenBackend:
    name = "qwen"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), max_new_tokens: int = 256,
                 device: str | None = None):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        from transformers.image_utils import SizeDict
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        # Official checkpoints save min/max_pixels (max 12845056: up to ~16k visual tokens an image), and
        # saved keys beat a `size=` given to from_pretrained; `size` is all the image processor's resize
        # reads, so set it on the loaded one.
        self.processor.image_processor.size = SizeDict(shortest_edge=cfg.min_pixels, longest_edge=cfg.max_pixels)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues each prompt's end
        self.cfg, self.max_new_tokens, self.model_id = cfg, max_new_tokens, str(model_path)

    def _chat(self, questions: list[str], with_image: bool = True) -> list[str]:
        """Each question (after one image) in the model's own chat template."""
        image = [{"type": "image"}] if with_image else []
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [*image, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True) for q in questions]

    def _generate(self, images: list[Image.Image] | None,
                  questions: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """Greedy answers, and the (height, width) each image was resized to before the model saw it:
        the frame of its box coordinates. `images` None asks text-only questions (no sizes)."""
        batch = self.processor(text=self._chat(questions, with_image=images is not None), images=images,
                               padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        # The image grid counts patch_size-pixel patches of the resized image, rows then columns.
        patch = self.processor.image_processor.patch_size
        seen = [(h * patch, w * patch) for _, h, w in batch["image_grid_thw"].tolist()] if images else []
        return answers, seen

    def _ask(self, images: list[Image.Image], question: str, scale: float) -> list[Parsed]:
        """The question about each image shown at `scale`; boxes come back in original pixels."""
        shown = [image if scale == 1.0 else image.resize((max(28, round(image.width * scale)),
                                                         max(28, round(image.height * scale))), Image.BICUBIC)
                 for image in images]
        answers, seen = self._generate(shown, [question] * len(images))
        return [parse_boxes(answer, (image.height, image.width), frame)
                for image, answer, frame in zip(images, answers, seen, strict=True)]

    def propose(self, images: list[Image.Image], captions: list[str]) -> list[Proposal]:
        if not images:
            return []
        proposals = []
        panels_by_scale = [self._ask(images, prompts.PANELS, scale) for scale in self.cfg.panel_scales]
        markers_by_image = self._ask(images, prompts.MARKERS, 1.0)
        for n in range(len(images)):
            # Pool the scales: a box every scale agrees on survives once, per identifier.
            pooled = [{"box": p["box"], "label": p["label"][:3], "score": 1.0 / (1 + rank)}
                      for rank, per_image in enumerate(panels_by_scale) for p in per_image[n].items]
            panels = non_max_suppression(pooled, self.cfg.panel_nms_iou, group_by="label")
            markers = markers_by_image[n]
            problems = [f"panels@{scale}: {w}" for scale, per_image in zip(self.cfg.panel_scales, panels_by_scale)
                        for w in per_image[n].problems]
            proposal = Proposal(panels, warnings=problems + [f"markers: {w}" for w in markers.problems])
            for marker in markers.items:
                kind = marker["label"].lower() if marker["label"].lower() in _MARKER_KINDS else "arrow"
                owner = next((k for k, p in enumerate(proposal.panels) if _inside(marker["box"], p["box"])), None)
                if owner is not None:
                    proposal.markers.setdefault(owner, []).append({"box": marker["box"], "kind": kind, "score": 1.0})
            proposals.append(proposal)
        crops = [(n, k, image.crop(tuple(int(v) for v in panel["box"])))
                 for n, (image, proposal) in enumerate(zip(images, proposals))
                 for k, panel in enumerate(proposal.panels)]
        crops = [(n, k, crop) for n, k, crop in crops if min(crop.size) >= 28]
        if crops:
            descriptions, _ = self._generate([c for _, _, c in crops], [prompts.DESCRIBE] * len(crops))
            for (n, k, _), text in zip(crops, descriptions, strict=True):
                proposals[n].panel_descriptions[k] = " ".join(text.split())[:300]
        self._ground_phrases(crops, captions, proposals)
        return proposals

    def split_captions(self, captions: list[str]) -> list[tuple[list[dict], list[str]]]:
        """LVLM-assisted caption decomposition: the model assigns clauses to panel labels and the
        rules' shared context goes in front of each; an unusable answer falls back to the rules.
        Returns (panels, warnings) per caption."""
        if not captions:
            return []
        answers, _ = self._generate(None, [prompts.SPLIT_CAPTION.format(caption=c.replace('"', "'")) for c in captions])
        results = []
        for caption, answer in zip(captions, answers, strict=True):
            texts, problems = parse_caption_split(answer)
            if texts:
                results.append((with_context(shared_context(caption), texts), problems))
            else:
                results.append((split_caption(caption), [*problems, "used the rule-based split"]))
        return results

    def _ground_phrases(self, crops, captions: list[str], proposals: list[Proposal]) -> None:
        """Path B: each panel's own caption clauses boxed in its crop, mapped back to the figure."""
        asks = []
        for n, k, crop in crops:
            label = proposals[n].panels[k]["label"]
            own = {p["label"]: p["text"] for p in split_caption(captions[n], shared_context=False)}
            for phrase in groundable_clauses(own.get(label, "")):
                asks.append((n, k, crop, phrase))
        if not asks:
            return
        answers, seen = self._generate([crop for _, _, crop, _ in asks],
                                       [prompts.GROUND.format(phrase=phrase.replace('"', "'")) for *_, phrase in asks])
        for (n, k, crop, phrase), answer, frame in zip(asks, answers, seen, strict=True):
            parsed = parse_boxes(answer, (crop.height, crop.width), frame)
            x0, y0 = proposals[n].panels[k]["box"][:2]
            for item in parsed.items[:1]:
                box = [item["box"][0] + x0, item["box"][1] + y0, item["box"][2] + x0, item["box"][3] + y0]
                proposals[n].phrases.setdefault(k, []).append({"box": box, "text": phrase, "score": 1.0})
            proposals[n].warnings += [f"phrase {phrase[:30]!r}: {w}" for w in parsed.problems]


class VllmBackend(QwenBackend):
    """The same prompts and parsing as `QwenBackend`, generated by a vLLM engine (continuous
    batching, paged attention): the throughput path for large annotation runs on GPU nodes."""
    name = "vllm"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), max_new_tokens: int = 256,
                 tensor_parallel_size: int = 1):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("--backend vllm needs the vllm package on a CUDA machine (pip install vllm); "
                              "or use --backend qwen, which runs the same prompts with transformers") from err
        from transformers import AutoProcessor
        self.processor = AutoProcessor.from_pretrained(model_path)  # only its chat template is used
        # vLLM resizes inside its own processor, under these bounds rather than the checkpoint's saved
        # ones; `_generate` maps answers back from them.
        self.llm = LLM(model=str(model_path), dtype="bfloat16", tensor_parallel_size=tensor_parallel_size,
                       limit_mm_per_prompt={"image": 1},
                       mm_processor_kwargs={"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels})
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.cfg, self.max_new_tokens, self.model_id = cfg, max_new_tokens, str(model_path)

    def _generate(self, images: list[Image.Image] | None,
                  questions: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        chats = self._chat(questions, with_image=images is not None)
        requests = ([{"prompt": chat} for chat in chats] if images is None else
                    [{"prompt": chat, "multi_modal_data": {"image": image}}
                     for chat, image in zip(chats, images, strict=True)])
        answers = [out.outputs[0].text for out in self.llm.generate(requests, self.sampling, use_tqdm=False)]
        # vLLM's outputs carry no image grid (only the placeholder token count, rows times columns), so
        # the sizes are smart_resize under the bounds its processor was given above.
        seen = [resized_size(image.height, image.width, self.cfg.min_pixels, self.cfg.max_pixels)
                for image in images or []]
        return answers, seen
