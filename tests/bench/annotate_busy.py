"""How busy `annotate run --backend qwen|vllm` keeps its engine, with a GPU-like scripted engine (issue 26).

    python tests/bench/annotate_busy.py [--figures 200] [--gpu 7b-h100|72b-4xh100] [--batches-in-flight 2]
                                        [--batch-size 8] [--decode-workers 1]

Over the demo's kind of synthetic figures (annotate synth on real layouts and MedMNIST pictures, seed 100),
`annotate run` as it runs on a GPU node, all real but the network: the engine answers as a good Qwen2.5-VL
would (each figure's true panels, labels and markers; tests/tiny_qwen.GoodAnswers) and, per generate call,
does on the host what an engine's processor does there (resize each image not already at its frame) and
then sleeps as long as the GPU would compute:

    prefill: input tokens x prefill seconds per token; decode: the call's longest answer in tokens x
    seconds per decode step (its sequences decode together, up to --max-num-seqs at a time).

Token counts: 4 characters a token for text, one token per 28 x 28 pixels of an image at its frame, 20
tokens of chat template per request. Step and prefill times from Qwen's published vLLM figures (Qwen2.5
speed benchmark, vLLM 0.6.3, batch size 1, A100 80GB): 7B 84.28 tokens/s generating 2048 tokens after 1
input token, 80.70 after 6144 (the 1.08 s difference is what the 6144 input tokens cost: prefill and the
longer attention); 72B 31.37 tokens/s on 4 A100s (tensor parallel). Divided by 1.68, an H100 SXM's
memory bandwidth over an A100's (decoding is bandwidth-bound): 7b-h100 decodes a step in 7.06 ms and
takes 0.105 ms per input token; 72b-4xh100 (half an 8-GPU node) 18.97 ms and 0.28 ms (the 7B prefill
cost scaled by the step ratio). A step's time is taken as flat in the number of sequences: the GPU time
is a lower bound, so the figures/hour it implies are an upper bound and the busy share a lower one.

Reports the engine's busy share (GPU seconds slept / wall seconds) and figures/hour at that share, and
the input tokens with, among them, the fixed instructions of the requests about an image: what vLLM's
prefix cache could share between requests if the image came after the instructions (the chat puts it
first, so the cache shares only the template's head).
Point PYTHONPATH at another checkout to measure its `annotate` (the scripted engine only needs
annotate.engines.Answer and the run_shard/QwenBackend calls below, which both sides have).
A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image  # noqa: E402

import annotate  # noqa: E402
from annotate import prompts  # noqa: E402
from annotate.config import AnnotateConfig  # noqa: E402
from annotate.engines import Answer  # noqa: E402
from annotate.lvlm_output import resized_size  # noqa: E402
from annotate.qwen import QwenBackend  # noqa: E402
from annotate.run import run_shard  # noqa: E402
from annotate_requests import demo_figures, truth_answers  # noqa: E402
from tiny_qwen import GoodAnswers  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Gpu:
    step_seconds: float           # one decode step of every sequence in flight
    prefill_seconds: float        # per input token
    engines_per_node: int         # engines of this size an 8-GPU node holds
    gpus_per_engine: int


A100_TO_H100 = 1.68  # HBM bandwidth: H100 SXM 3.35 TB/s over A100 80GB's 2.0
GPUS = {
    "7b-h100": Gpu(1 / 84.28 / A100_TO_H100, (2048 / 80.70 - 2048 / 84.28) / 6144 / A100_TO_H100, 8, 1),
    "72b-4xh100": Gpu(1 / 31.37 / A100_TO_H100,
                      (2048 / 80.70 - 2048 / 84.28) / 6144 / A100_TO_H100 * (84.28 / 31.37), 2, 4),
}
TEMPLATE_TOKENS = 20


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


# The fixed part of each question about an image: what an engine's prefix cache could share between
# requests if the image came after it (the chat template puts the image first).
FIXED_INSTRUCTIONS = [prompts.FIGURE, prompts.PANEL, prompts.PANEL_WITH_PHRASES.split("{phrases}")[0], prompts.REGION,
                      prompts.REGION_WITH_PHRASE.split('"{phrase}"')[0]]


def fixed_instruction_tokens(question: str) -> int:
    return max((text_tokens(fixed) for fixed in FIXED_INSTRUCTIONS if question.startswith(fixed)), default=0)


class GpuLikeEngine:
    """The Engine protocol: GoodAnswers for `gt`'s figures, after the host work of an engine's processor
    and a sleep as long as the GPU's (module docstring)."""
    name, model_id = "gpu-like", "scripted"

    def __init__(self, gt: list[dict], cfg: AnnotateConfig, gpu: Gpu, max_num_seqs: int):
        self.answers, self.cfg, self.gpu, self.max_num_seqs = GoodAnswers(truth_answers(gt, cfg)), cfg, gpu, max_num_seqs
        self.counts, self.gpu_seconds, self.lock = {"requests": 0, "generate_calls": 0}, 0.0, threading.Lock()
        self.input_tokens = self.instruction_tokens = 0

    def generate(self, requests):
        answers, inputs, outputs, instructions = [], 0, [], 0
        for request in requests:
            frame = None
            if request.image is not None:
                frame = resized_size(request.image.height, request.image.width, self.cfg.min_pixels, self.cfg.max_pixels)
                if request.image.size != frame[::-1]:  # the processor's resize, on the host
                    request.image.resize(frame[::-1], Image.BICUBIC)
                inputs += frame[0] * frame[1] // (28 * 28)
            _, text = self.answers(request.question, *(frame or (None, None)))
            answers.append(Answer(text, None, frame))
            inputs += text_tokens(request.question) + TEMPLATE_TOKENS
            outputs.append(text_tokens(text) + 1)
            if request.image is not None:
                instructions += fixed_instruction_tokens(request.question)
        waves = [outputs[n:n + self.max_num_seqs] for n in range(0, len(outputs), self.max_num_seqs)]
        seconds = inputs * self.gpu.prefill_seconds + sum(max(wave) for wave in waves) * self.gpu.step_seconds
        time.sleep(seconds)
        with self.lock:
            self.gpu_seconds += seconds
            self.input_tokens += inputs
            self.instruction_tokens += instructions
            self.counts["requests"] += len(requests)
            self.counts["generate_calls"] += 1
        return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", type=int, default=200)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="7b-h100")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches-in-flight", type=int, default=3,
                        help="passed to run_shard where it takes it (this checkout's annotate does)")
    parser.add_argument("--decode-workers", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    try:
        data, gt = demo_figures(tmp / "synth", args.figures)
        cfg, gpu = AnnotateConfig(), GPUS[args.gpu]
        engine = GpuLikeEngine(gt, cfg, gpu, args.max_num_seqs)
        options = {"batch_size": args.batch_size, "decode_workers": args.decode_workers}
        if "batches_in_flight" in inspect.signature(run_shard).parameters:
            options["batches_in_flight"] = args.batches_in_flight
        start = time.perf_counter()
        summary = run_shard([str(data / "manifest.jsonl")], tmp / "out", QwenBackend(engine, cfg), cfg=cfg, **options)
        wall = time.perf_counter() - start
        share = engine.gpu_seconds / wall
        per_engine_hour = summary["figures"] / wall * 3600
        print(json.dumps({
            "annotate": str(Path(annotate.__file__).parent), "gpu": args.gpu, **options,
            "figures": summary["figures"], "panels": summary["panels"], "regions": summary["regions"],
            "requests": engine.counts["requests"], "generate_calls": engine.counts["generate_calls"],
            "wall_s": round(wall, 1), "gpu_s": round(engine.gpu_seconds, 1), "busy_share": round(share, 3),
            "input_tokens": engine.input_tokens, "image_request_instruction_tokens": engine.instruction_tokens,
            "figures_per_engine_hour": round(per_engine_hour),
            "figures_per_gpu_hour": round(per_engine_hour / gpu.gpus_per_engine),
            "figures_per_node_hour": round(per_engine_hour * gpu.engines_per_node)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
