"""LVLM engines: the one place a Qwen2.5-VL generates. `qwen.QwenBackend` plans the requests (what to
ask about which image, with what token budget) and reads the answers; an engine only runs them.

- `TransformersEngine`: `Qwen2_5_VLForConditionalGeneration.generate`, batched (left padding), on one
  device or sharded over a node's GPUs with `device_map` / `max_memory` (the 72B model in bf16 needs
  ~150 GB: two H100s at least, eight comfortably).
- `VllmEngine`: vLLM's offline `LLM.generate` (continuous batching, paged attention, prefix caching,
  tensor parallelism over a node's GPUs): the throughput path for large annotation runs.

Both resize images under the configured pixel bounds, whatever bounds the checkpoint saved, and say
for each answer the (height, width) of the image the model saw: Qwen2.5-VL's box coordinates are
pixels of that image. Each engine counts its requests and its blocking generate calls (`counts`), so a
run's summary shows what the request plan cost.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Protocol

from PIL import Image

from annotate.config import AnnotateConfig
from annotate.faults import EngineFault, check_stop
from annotate.lvlm_output import resized_size

# Pixels per side of one visual token of Qwen2.5-VL: 14-pixel patches, merged 2 x 2.
_TOKEN_PIXELS = 28


@dataclasses.dataclass(frozen=True)
class Request:
    question: str
    image: Image.Image | None  # None: a text-only question
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    cut_at: int | None                # the token budget it was cut at; None when it ended on its own
    seen: tuple[int, int] | None      # (height, width) the image was resized to: the frame of its boxes


class Engine(Protocol):
    name: str
    model_id: str
    counts: collections.Counter  # "requests", "generate_calls"

    def generate(self, requests: list[Request]) -> list[Answer]:
        """Greedy answers, in request order. Raises faults.StopRequested between its blocking calls
        once a stop is requested, faults.EngineFault when the engine failed the requests."""


def parse_max_memory(spec: str | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}, transformers'
    max_memory map (GPU indices as ints)."""
    if not spec:
        return None
    memory = {}
    for item in spec.split(","):
        device, sep, amount = item.partition("=")
        if not (sep and device.strip() and amount.strip()):
            raise ValueError(f"--max-memory item {item!r} is not DEVICE=AMOUNT (e.g. 0=70GiB,cpu=200GiB)")
        device = device.strip()
        memory[int(device) if device.isdigit() else device] = amount.strip()
    return memory


class TransformersEngine:
    name = "qwen"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), device: str | None = None,
                 device_map: str | None = None, max_memory: dict | None = None, attn_implementation: str | None = None,
                 batch_size: int = 16):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        from transformers.image_utils import SizeDict
        self.torch = torch
        if device_map is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = torch.cuda.is_available() if device_map is not None else device.startswith("cuda")
        dtype = torch.bfloat16 if on_gpu else torch.float32
        # device_map ("auto", "balanced", …) places the layers over every visible GPU (then CPU RAM) within
        # max_memory; generate moves activations between them, one GPU busy at a time.
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_path, dtype=dtype, device_map=device_map, max_memory=max_memory,
            attn_implementation=attn_implementation).eval()
        if device_map is None:
            self.model.to(device)
        self.processor = AutoProcessor.from_pretrained(model_path)
        # Official checkpoints save min/max_pixels (max 12845056: up to ~16k visual tokens an image), and
        # saved keys beat a `size=` given to from_pretrained; `size` is all the image processor's resize
        # reads, so set it on the loaded one.
        self.processor.image_processor.size = SizeDict(shortest_edge=cfg.min_pixels, longest_edge=cfg.max_pixels)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues each prompt's end
        self.cfg, self.batch_size, self.model_id = cfg, batch_size, str(model_path)
        self.counts = collections.Counter()

    def chat(self, question: str, with_image: bool) -> str:
        # The question before the image (prompts.VERSION): the requests asking one question share their
        # prompt up to the image, which vLLM's prefix cache computes once; on the demo's figures that is
        # 16% of all input tokens (tests/bench/annotate_busy.py), where the image first left only the
        # template's head to share.
        content = [{"type": "text", "text": question}, *([{"type": "image"}] if with_image else [])]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, requests: list[Request]) -> list[Answer]:
        # One generate call runs one budget, images and text-only rows together, batch_size rows at a
        # time. Within it, requests of similar size share a batch, so rows pad to their neighbours'
        # length rather than the longest's.
        def size(n):
            image = requests[n].image
            return requests[n].max_new_tokens, image.width * image.height if image else 0, len(requests[n].question)
        order = sorted(range(len(requests)), key=size)
        answers: list[Answer | None] = [None] * len(requests)
        for _, group in itertools.groupby(order, key=lambda n: requests[n].max_new_tokens):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                check_stop()
                chunk = group[start:start + self.batch_size]
                budget = requests[chunk[0]].max_new_tokens
                for n, answer in zip(chunk, self._generate_batch([requests[n] for n in chunk], budget), strict=True):
                    answers[n] = answer
        return answers

    def _generate_batch(self, requests: list[Request], max_new_tokens: int) -> list[Answer]:
        torch = self.torch
        images = [r.image for r in requests if r.image is not None] or None
        batch = self.processor(text=[self.chat(r.question, r.image is not None) for r in requests], images=images,
                               padding=True, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        self.counts.update(requests=len(requests), generate_calls=1)
        generated = out[:, batch["input_ids"].shape[1]:]  # prompts are left-padded: every answer starts here
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        # Generate pads a row once it has ended (at an end-of-sequence token) while the others run on, so a
        # row that reached the budget with no end-of-sequence or pad token in it was cut there.
        config = self.model.generation_config
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        ends = torch.tensor([t for t in (*eos, config.pad_token_id) if t is not None], device=generated.device)
        ended = torch.isin(generated, ends).any(dim=1).tolist()
        cut = generated.shape[1] >= max_new_tokens
        # The image grid counts patch_size-pixel patches of each resized image, rows then columns, in the
        # order of the rows with an image.
        patch = self.processor.image_processor.patch_size
        frames = iter([(h * patch, w * patch) for _, h, w in batch["image_grid_thw"].tolist()] if images else [])
        seen = [next(frames) if r.image is not None else None for r in requests]
        return [Answer(text, max_new_tokens if cut and not row_ended else None, frame)
                for text, row_ended, frame in zip(texts, ended, seen, strict=True)]


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: str, cfg: AnnotateConfig = AnnotateConfig(), tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 max_num_seqs: int | None = None):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("--backend vllm needs the vllm package on a CUDA machine (pip install -e '.[vllm]' "
                              "in its own virtualenv); or use --backend qwen, which runs the same prompts with "
                              "transformers") from err
        from transformers import AutoProcessor
        self.processor = AutoProcessor.from_pretrained(model_path)  # only its chat template is used
        optional = {k: v for k, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)) if v}
        # vLLM resizes inside its own processor, under these bounds rather than the checkpoint's saved ones.
        # Prefix caching: every request of the plan starts with the same chat header and instructions.
        # The model's generation config (repetition penalty, stop tokens) applies as it does with
        # transformers, made greedy like transformers' do_sample=False.
        self.llm = LLM(model=str(model_path), dtype="bfloat16", tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                       limit_mm_per_prompt={"image": 1}, generation_config="auto",
                       override_generation_config={"temperature": 0.0},
                       mm_processor_kwargs={"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}, **optional)
        self.defaults = self.llm.get_default_sampling_params()
        self.image_token_id = self.processor.image_token_id
        self.cfg, self.model_id = cfg, str(model_path)
        self.counts = collections.Counter()

    chat = TransformersEngine.chat

    def generate(self, requests: list[Request]) -> list[Answer]:
        prompts, params = [], []
        for request in requests:
            prompt = {"prompt": self.chat(request.question, request.image is not None)}
            if request.image is not None:
                prompt["multi_modal_data"] = {"image": request.image}
            prompts.append(prompt)
            params.append(self.defaults.clone())
            params[-1].max_tokens = request.max_new_tokens
        results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = [result.outputs[0] for result in results]
        self.counts.update(requests=len(requests), generate_calls=1)
        if aborted := sum(out.finish_reason == "abort" for out in outputs):
            # The engine dropped them (its SIGTERM handler, a dying engine core): their text is no answer.
            raise EngineFault(f"vLLM aborted {aborted} of {len(outputs)} requests")
        return [Answer(out.text, request.max_new_tokens if out.finish_reason == "length" else None,
                       self._frame(request, result) if request.image is not None else None)
                for request, out, result in zip(requests, outputs, results, strict=True)]

    def _frame(self, request: Request, result) -> tuple[int, int]:
        """The (height, width) vLLM showed the model: smart_resize under the bounds its processor was
        given, checked against the image tokens in the prompt it ran (one per 28 x 28 pixels). vLLM's
        outputs carry no image grid, and a processor that ignored mm_processor_kwargs would put every
        box in another frame, silently: that stops the run."""
        height, width = resized_size(request.image.height, request.image.width, self.cfg.min_pixels,
                                     self.cfg.max_pixels)
        shown = list(result.prompt_token_ids or ()).count(self.image_token_id)
        if shown != (height // _TOKEN_PIXELS) * (width // _TOKEN_PIXELS):
            raise EngineFault(
                f"vLLM showed the model {shown} image tokens for a {request.image.width}x{request.image.height} "
                f"image, where the {width}x{height} frame its boxes are read in has "
                f"{(height // _TOKEN_PIXELS) * (width // _TOKEN_PIXELS)}: its processor resizes under other bounds "
                f"than min_pixels={self.cfg.min_pixels}, max_pixels={self.cfg.max_pixels} (mm_processor_kwargs); "
                f"check the vllm and transformers versions (annotate/requirements-vllm.txt)")
        return height, width
