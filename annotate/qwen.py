"""The `qwen` backend: Qwen2.5-VL (transformers) proposes panels with labels (pooled over scales),
markers (path A), boxes for each panel's caption clauses (path B) and short panel descriptions, in
batched generation (bf16 on CUDA, float32 on CPU).

Answers are untrusted text: `lvlm_output.parse_boxes` keeps what is usable and every problem becomes
a warning in the record's annotation, never an exception. An answer cut at the token budget is asked
again once with a larger one; cut even then, it keeps its complete boxes and a warning says it was cut.
Prompts are versioned in `prompts.py`.
"""
from __future__ import annotations

import functools

import torch
from PIL import Image

from annotate import prompts
from annotate.captions import groundable_clauses, shared_context, split_caption, with_context
from annotate.config import AnnotateConfig
from annotate.lvlm_output import Parsed, parse_boxes, parse_caption_split, resized_size
from annotate.pipeline import Proposal
from annotate.regions import non_max_suppression

_MARKER_KINDS = {"arrow", "arrowhead", "asterisk", "circle", "letter", "inset"}
# A box costs ~35 tokens ('{"bbox_2d": [412, 30, 806, 388], "label": "B"},': Qwen's tokenizer splits digits
# one by one), so 256 tokens held ~7 boxes; 1024 holds ~29, more panels than compound figures have.
MAX_NEW_TOKENS = 1024
# An answer cut at its budget is asked again once with this many times the budget (capped by
# `AnnotateConfig.max_retry_tokens`); only cut answers pay for it.
_RETRY_FACTOR = 4
# A description keeps this many characters. English takes ~4 characters a token, so twice the tokens they
# need covers them, and a longer or second try could only add text that is thrown away.
_DESCRIPTION_CHARS = 300
_DESCRIPTION_TOKENS = _DESCRIPTION_CHARS // 2


def _inside(box, panel) -> bool:
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return panel[0] <= x <= panel[2] and panel[1] <= y <= panel[3]


def _truncation(cut_at: int | None) -> list[str]:
    """The warning for an answer still cut at its token budget: what it lists may be incomplete."""
    return [f"answer cut at {cut_at} tokens"] if cut_at else []


def _parsed(answer: str, cut_at: int | None, original_size: tuple[int, int], seen_size: tuple[int, int]) -> Parsed:
    """`parse_boxes` plus the cut: a list cut between two boxes parses as a whole one."""
    parsed = parse_boxes(answer, original_size, seen_size)
    return Parsed(parsed.items, _truncation(cut_at) + parsed.problems)


class QwenBackend:
    name = "qwen"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), max_new_tokens: int = MAX_NEW_TOKENS,
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
                  questions: list[str]) -> tuple[list[str], list[int | None], list[tuple[int, int]]]:
        """Greedy answers; for each, the token budget it was still cut at (None when it ended on its own);
        and the (height, width) each image was resized to before the model saw it: the frame of its box
        coordinates. `images` None asks text-only questions (no sizes). The answers cut at the first
        budget are asked again, by themselves, with a larger one: a box list cut short loses boxes."""
        answers, truncated, seen = self._generate_once(images, questions, self.max_new_tokens)
        budgets = [self.max_new_tokens] * len(questions)
        retry_budget = min(_RETRY_FACTOR * self.max_new_tokens, self.cfg.max_retry_tokens)
        again = [n for n, cut in enumerate(truncated) if cut]
        if again and retry_budget > self.max_new_tokens:
            retried, still_cut, _ = self._generate_once(None if images is None else [images[n] for n in again],
                                                        [questions[n] for n in again], retry_budget)
            for n, answer, cut in zip(again, retried, still_cut, strict=True):
                answers[n], truncated[n], budgets[n] = answer, cut, retry_budget
        return answers, [budget if cut else None for budget, cut in zip(budgets, truncated)], seen

    def _generate_once(self, images: list[Image.Image] | None, questions: list[str],
                       max_new_tokens: int) -> tuple[list[str], list[bool], list[tuple[int, int]]]:
        """Greedy answers within `max_new_tokens`, whether each was cut at it, and the resized sizes."""
        batch = self.processor(text=self._chat(questions, with_image=images is not None), images=images,
                               padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        generated = out[:, batch["input_ids"].shape[1]:]  # prompts are left-padded: every answer starts here
        answers = self.processor.batch_decode(generated, skip_special_tokens=True)
        # Generate pads a row once it has ended (at an end-of-sequence token) while the others run on, so a
        # row that reached the budget with no end-of-sequence or pad token in it was cut there.
        config = self.model.generation_config
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        ends = torch.tensor([t for t in (*eos, config.pad_token_id) if t is not None], device=generated.device)
        ended = torch.isin(generated, ends).any(dim=1)
        truncated = [generated.shape[1] >= max_new_tokens and not row_ended for row_ended in ended.tolist()]
        # The image grid counts patch_size-pixel patches of the resized image, rows then columns.
        patch = self.processor.image_processor.patch_size
        seen = [(h * patch, w * patch) for _, h, w in batch["image_grid_thw"].tolist()] if images else []
        return answers, truncated, seen

    def _ask(self, images: list[Image.Image], question: str, scale: float) -> list[Parsed]:
        """The question about each image shown at `scale`; boxes come back in original pixels."""
        shown = [image if scale == 1.0 else image.resize((max(28, round(image.width * scale)),
                                                         max(28, round(image.height * scale))), Image.BICUBIC)
                 for image in images]
        answers, cut, seen = self._generate(shown, [question] * len(images))
        return [_parsed(answer, cut_at, (image.height, image.width), frame)
                for image, answer, cut_at, frame in zip(images, answers, cut, seen, strict=True)]

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
            descriptions, _, _ = self._generate_once([c for _, _, c in crops], [prompts.DESCRIBE] * len(crops),
                                                     _DESCRIPTION_TOKENS)
            for (n, k, _), text in zip(crops, descriptions, strict=True):
                proposals[n].panel_descriptions[k] = " ".join(text.split())[:_DESCRIPTION_CHARS]
        self._ground_phrases(crops, captions, proposals)
        return proposals

    def split_captions(self, captions: list[str]) -> list[tuple[list[dict], list[str]]]:
        """LVLM-assisted caption decomposition: the model assigns clauses to panel labels and the
        rules' shared context goes in front of each; an unusable answer falls back to the rules.
        Returns (panels, warnings) per caption."""
        if not captions:
            return []
        answers, cut, _ = self._generate(None, [prompts.SPLIT_CAPTION.format(caption=c.replace('"', "'"))
                                                for c in captions])
        results = []
        for caption, answer, cut_at in zip(captions, answers, cut, strict=True):
            texts, problems = parse_caption_split(answer)
            problems = _truncation(cut_at) + problems
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
        answers, cut, seen = self._generate([crop for _, _, crop, _ in asks],
                                            [prompts.GROUND.format(phrase=phrase.replace('"', "'"))
                                             for *_, phrase in asks])
        for (n, k, crop, phrase), answer, cut_at, frame in zip(asks, answers, cut, seen, strict=True):
            parsed = _parsed(answer, cut_at, (crop.height, crop.width), frame)
            x0, y0 = proposals[n].panels[k]["box"][:2]
            for item in parsed.items[:1]:
                box = [item["box"][0] + x0, item["box"][1] + y0, item["box"][2] + x0, item["box"][3] + y0]
                proposals[n].phrases.setdefault(k, []).append({"box": box, "text": phrase, "score": 1.0})
            proposals[n].warnings += [f"phrase {phrase[:30]!r}: {w}" for w in parsed.problems]


class VllmBackend(QwenBackend):
    """The same prompts and parsing as `QwenBackend`, generated by a vLLM engine (continuous
    batching, paged attention): the throughput path for large annotation runs on GPU nodes."""
    name = "vllm"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), max_new_tokens: int = MAX_NEW_TOKENS,
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
        self.sampling = functools.partial(SamplingParams, temperature=0.0)
        self.cfg, self.max_new_tokens, self.model_id = cfg, max_new_tokens, str(model_path)

    def _generate_once(self, images: list[Image.Image] | None, questions: list[str],
                       max_new_tokens: int) -> tuple[list[str], list[bool], list[tuple[int, int]]]:
        chats = self._chat(questions, with_image=images is not None)
        requests = ([{"prompt": chat} for chat in chats] if images is None else
                    [{"prompt": chat, "multi_modal_data": {"image": image}}
                     for chat, image in zip(chats, images, strict=True)])
        outputs = [out.outputs[0] for out in self.llm.generate(requests, self.sampling(max_tokens=max_new_tokens),
                                                               use_tqdm=False)]
        # vLLM's outputs carry no image grid (only the placeholder token count, rows times columns), so
        # the sizes are smart_resize under the bounds its processor was given above.
        seen = [resized_size(image.height, image.width, self.cfg.min_pixels, self.cfg.max_pixels)
                for image in images or []]
        return [out.text for out in outputs], [out.finish_reason == "length" for out in outputs], seen
