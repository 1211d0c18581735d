"""Faults are not data (issue 26): a CUDA error, an aborted vLLM output, a dead vLLM engine and SIGTERM in
the middle of a round stop the shard with their exit status and no failure line for the batch in
flight, and the rerun ends with every id of the real MedICaT figures exactly once. The engine is
scripted (it answers the Qwen2.5-VL request plan as the model would: two panels side by side, an arrow
in the first); the backend, the vLLM engine's reading of its outputs, and the shard loop are real."""
import collections
import json
import os
import signal
import types

import pytest
from PIL import Image

from annotate import prompts
from annotate.config import AnnotateConfig
from annotate.decode import FigureError
from annotate.engines import Answer, VllmEngine
from annotate.faults import STOP
from annotate.inputs import Figure
from annotate.lvlm_output import resized_size
from annotate.qwen import QwenBackend
from annotate.run import ENGINE_FAULT_EXIT_STATUS, SIGTERM_EXIT_STATUS, ShardFiles, run_shard
from test_annotate_failures import ScriptedBackend, medicat_manifest, read_shard
from tiny_qwen import side_by_side
from zoomin_jax import records

CFG = AnnotateConfig(max_pixels=28 * 28 * 64)
BATCH = 2


def answer_text(question: str, image) -> str:
    """What Qwen2.5-VL would answer, in the frame it sees the image at."""
    if image is None:  # the caption split: none, so the rules split the caption
        return "[]"
    if question == prompts.FIGURE:
        height, width = resized_size(image.height, image.width, CFG.min_pixels, CFG.max_pixels)
        return "```json\n" + json.dumps(side_by_side(2)(height, width)) + "\n```"
    return "A micrograph." if question.startswith(prompts.PANEL[:40]) else "An arrow on a cell."


class ScriptedEngine:
    """The Engine protocol; `before(engine, requests)` runs at each generate call first (a fault)."""
    name, model_id = "scripted", "scripted-qwen"

    def __init__(self, before=lambda engine, requests: None):
        self.before, self.counts, self.figures_asked = before, collections.Counter(), 0

    def generate(self, requests):
        self.before(self, requests)
        self.figures_asked += sum(r.question == prompts.FIGURE for r in requests)
        self.counts.update(requests=len(requests), generate_calls=1)
        return [Answer(answer_text(r.question, r.image), None,
                       r.image and resized_size(r.image.height, r.image.width, CFG.min_pixels, CFG.max_pixels))
                for r in requests]


IMAGE_PAD = 151655  # Qwen2.5-VL's <|image_pad|>


class StandInLLM:
    """vLLM's offline LLM as VllmEngine uses it (vLLM needs CUDA): outputs with text and finish_reason,
    or `fail(call)`'s exception or finish reason at a call; each prompt's token ids hold its image's
    tokens as vLLM's processor makes them, resizing under `max_pixels`."""

    def __init__(self, fail=lambda call: None, max_pixels: int = CFG.max_pixels):
        self.fail, self.calls, self.max_pixels = fail, 0, max_pixels

    def image_tokens(self, image) -> list[int]:
        if image is None:
            return []
        height, width = resized_size(image.height, image.width, CFG.min_pixels, self.max_pixels)
        return [IMAGE_PAD] * ((height // 28) * (width // 28))

    def get_default_sampling_params(self):
        return types.SimpleNamespace(clone=lambda: types.SimpleNamespace(max_tokens=None))

    def generate(self, prompts_, params, use_tqdm):
        self.calls += 1
        failure = self.fail(self.calls)
        if isinstance(failure, BaseException):
            raise failure
        images = [prompt.get("multi_modal_data", {}).get("image") for prompt in prompts_]
        return [types.SimpleNamespace(prompt_token_ids=[1, *self.image_tokens(image), 2], outputs=[
            types.SimpleNamespace(text=answer_text(prompt["question"], image), finish_reason=failure or "stop")])
            for prompt, image in zip(prompts_, images, strict=True)]


def vllm_engine(llm: StandInLLM) -> VllmEngine:
    """The real VllmEngine around the stand-in, its chat template reduced to the question."""
    engine = VllmEngine.__new__(VllmEngine)
    engine.llm, engine.defaults, engine.cfg, engine.model_id = llm, llm.get_default_sampling_params(), CFG, "vllm"
    engine.counts, engine.image_token_id = collections.Counter(), IMAGE_PAD
    engine.chat = lambda question, with_image: question
    return engine


def with_questions(engine: VllmEngine) -> VllmEngine:
    """The stand-in reads each prompt's question to answer it like the model."""
    real = engine.llm.generate
    engine.llm.generate = lambda prompts_, params, use_tqdm: real(
        [p | {"question": p["prompt"]} for p in prompts_], params, use_tqdm)
    return engine


def every_id_once(out, lines):
    got, failures = read_shard(out)
    ids = got + [f["id"] for f in failures]
    assert sorted(ids) == sorted(line["id"] for line in lines)
    return got, failures


def stopped(manifest, out, engine, status, in_flight=1):
    """The ids in the parts a run stopped with `status` kept, having written no failure line. One batch
    in flight unless asked: the engine's calls are then the same in every run."""
    with pytest.raises(SystemExit) as stop:
        run_shard([manifest], out, QwenBackend(engine, CFG), cfg=CFG, batch_size=BATCH, batches_in_flight=in_flight)
    assert stop.value.code == status
    files = ShardFiles(out, 0, 1)
    assert not files.summary.exists() and files.failures.read_text() == ""  # no failure line, for any figure
    return [figure for part in files.parts() for figure in records.load_index(part)["ids"]]


def cuda_error_after(figures: int):
    def before(engine, requests):
        if engine.figures_asked >= figures and any(r.question == prompts.FIGURE for r in requests):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                               "asynchronously reported at some other API call")
    return before


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_cuda_error_stops_the_shard_and_the_rerun_redoes_its_batch(tmp_path, capsys, in_flight):
    """With two batches in flight the call that fails may hold the requests of both: both are redone."""
    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    kept = stopped(manifest, out, ScriptedEngine(cuda_error_after(4)), ENGINE_FAULT_EXIT_STATUS, in_flight)
    if in_flight == 1:
        assert kept == [line["id"] for line in lines[:4]]  # the two batches before the fault
    else:  # whole batches, in order, none after the fault
        assert kept == [line["id"] for line in lines[:len(kept)]] and len(kept) in (2, 4)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"annotate: engine fault, shard 00000-of-00001 stopped after {len(kept)} figures this run with its parts "
        "closed and no failure line for the batches in flight: RuntimeError: CUDA error: an illegal memory access was "
        "encountered. Fix the node or the engine and rerun to redo them")

    summary = run_shard([manifest], out, QwenBackend(ScriptedEngine(), CFG), cfg=CFG, batch_size=BATCH)
    got, failures = every_id_once(out, lines)
    assert failures == [] and summary["figures_this_run"] == 10 - len(kept) and summary["figures"] == 10


@pytest.mark.parametrize("fault", ["aborted", "dead"])
def test_an_aborted_output_or_a_dead_vllm_engine_stops_the_shard(tmp_path, capsys, fault):
    class EngineDeadError(Exception):  # vllm.v1.engine.exceptions's, by name: vllm is not installed here
        pass

    # Three generate calls a batch (FIGURE + split, PANEL, REGION): the third batch's PANEL round fails.
    def fail(call):
        if call == 8:
            return "abort" if fault == "aborted" else EngineDeadError(
                "EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return None

    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    llm = StandInLLM(fail)
    kept = stopped(manifest, out, with_questions(vllm_engine(llm)), ENGINE_FAULT_EXIT_STATUS)
    assert llm.calls == 8 and kept == [line["id"] for line in lines[:4]]
    said = {"aborted": "in flight: vLLM aborted 4 of 4 requests. Fix",
            "dead": "in flight: EngineDeadError: EngineCore encountered an issue. See stack trace"}[fault]
    assert said in capsys.readouterr().err.splitlines()[-1]

    run_shard([manifest], out, QwenBackend(with_questions(vllm_engine(StandInLLM())), CFG), cfg=CFG, batch_size=BATCH)
    assert every_id_once(out, lines)[1] == []


def test_sigterm_mid_round_stops_before_the_next_generate_call(tmp_path, capsys):
    """The signal arrives during the second batch's PANEL round: that call returns, no further call is
    made, the batch is abandoned and the shard exits 143."""
    calls = []

    def before(engine, requests):
        calls.append(requests[0].question[:20])
        if len(calls) == 5:  # batch 1: figure+split, panel, region; batch 2: figure+split, panel (this one)
            os.kill(os.getpid(), signal.SIGTERM)
            # The main thread runs the handler when it next gets the GIL; a GPU call takes that long and
            # more, this scripted one may not (a machine under load ran the next round first).
            assert STOP.wait(timeout=30)

    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    kept = stopped(manifest, out, ScriptedEngine(before), SIGTERM_EXIT_STATUS)
    assert calls == ([prompts.FIGURE[:20], prompts.PANEL[:20], prompts.REGION[:20]] * 2)[:5]
    assert kept == [line["id"] for line in lines[:2]]
    assert "SIGTERM: shard 00000-of-00001 stopped after 2 figures" in capsys.readouterr().err

    run_shard([manifest], out, QwenBackend(ScriptedEngine(), CFG), cfg=CFG, batch_size=BATCH)
    assert every_id_once(out, lines)[1] == []


def test_a_transient_read_failure_is_tried_again_by_the_next_run(tmp_path, monkeypatch):
    """An I/O error reading a figure is a failure line marked not final; the next run of the unfinished
    shard (stopped here by a CUDA error) reads it again, and its record replaces the line."""
    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    real_read = Figure.read_image_bytes

    def flaky(figure):
        if figure.figure_id == "medicat-1":
            raise OSError(5, "Input/output error")
        return real_read(figure)

    monkeypatch.setattr(Figure, "read_image_bytes", flaky)
    with pytest.raises(SystemExit):
        run_shard([manifest], out, QwenBackend(ScriptedEngine(cuda_error_after(4)), CFG), cfg=CFG, batch_size=BATCH,
                  batches_in_flight=1)
    assert [(f["id"], f["final"]) for f in read_failure_lines(out)] == [("medicat-1", False)]
    monkeypatch.setattr(Figure, "read_image_bytes", real_read)

    run_shard([manifest], out, QwenBackend(ScriptedEngine(), CFG), cfg=CFG, batch_size=BATCH)
    got, failures = every_id_once(out, lines)
    assert failures == [] and "medicat-1" in got


def read_failure_lines(out):
    return [json.loads(line) for line in (out / "failures-00000-of-00001.jsonl").read_text().splitlines()]


def test_failures_after_many_good_figures_stop_the_shard_within_the_window(tmp_path):
    """The rate is over the last --failure-window figures: 4 good then 4 failing stops at a window of 4,
    where the run's total (4 of 8, not over 0.5) would go on through the shard."""
    manifest, lines = medicat_manifest(tmp_path)
    failing = {line["caption"] for line in lines[4:]}

    class FailsFromTheFifth(ScriptedBackend):
        def propose(self, images, captions, contexts=None):
            if failing.intersection(captions):
                raise ValueError("the processor refused the prompt")
            return super().propose(images, captions, contexts)

    with pytest.raises(SystemExit) as stop:
        run_shard([manifest], tmp_path / "out", FailsFromTheFifth(max_batch=8), batch_size=BATCH, failure_window=4)
    assert stop.value.code == 3


def test_an_error_that_names_no_device_still_fails_only_its_figure():
    """The line between a fault and a figure's failure: CUDA, NCCL and vLLM's engine errors are faults,
    out of memory and anything else are the figure's (bisected first)."""
    from annotate.faults import engine_fault
    faults = [RuntimeError("CUDA error: device-side assert triggered"), RuntimeError("NCCL error in: ..."),
              type("AcceleratorError", (RuntimeError,), {})("unspecified launch failure"),
              type("EngineDeadError", (Exception,), {})("EngineCore encountered an issue.")]
    figures = [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ValueError("bad image"),
               FigureError("decode", "corrupt")]
    assert all(engine_fault(err) is not None for err in faults)
    assert all(engine_fault(err) is None for err in figures)


def test_a_vllm_processor_that_ignores_our_pixel_bounds_stops_the_run(tmp_path, capsys):
    """vLLM's frame is read, not assumed: a processor resizing under other bounds than ours (a smaller
    max_pixels here; the images reach it at their frame, so a larger one changes nothing) shows the
    model another number of image tokens than the frame the boxes would be read in, and the first call
    stops the run with one line saying so."""
    manifest, lines = medicat_manifest(tmp_path)
    llm = StandInLLM(max_pixels=28 * 28 * 16)
    assert stopped(manifest, tmp_path / "out", with_questions(vllm_engine(llm)), ENGINE_FAULT_EXIT_STATUS) == []
    width, height = Image.open(lines[0]["image"]).size
    frame_height, frame_width = resized_size(height, width, CFG.min_pixels, CFG.max_pixels)
    assert llm.calls == 1 and capsys.readouterr().err.splitlines()[-1].endswith(
        f"in flight: vLLM showed the model {len(llm.image_tokens(Image.new('RGB', (frame_width, frame_height))))} "
        f"image tokens for a {frame_width}x{frame_height} image, where the {frame_width}x{frame_height} frame its "
        f"boxes are read in has {(frame_height // 28) * (frame_width // 28)}: its processor resizes under other "
        "bounds than min_pixels=3136, max_pixels=50176 (mm_processor_kwargs); check the vllm and transformers "
        "versions (annotate/requirements-vllm.txt). Fix the node or the engine and rerun to redo them")


def test_a_round_out_of_memory_is_asked_again_in_halves_without_the_rounds_before_it(tmp_path):
    """A generate call of more than 3 images runs out of memory: only that call is asked again, in
    halves; no request already answered is asked again (the batch's bisection would redo its first
    rounds), and every figure gets its record."""
    answered = collections.Counter()

    def before(engine, requests):
        if sum(r.image is not None for r in requests) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        answered.update((r.question, r.image and hash(r.image.tobytes())) for r in requests)

    manifest, lines = medicat_manifest(tmp_path)
    summary = run_shard([manifest], tmp_path / "out", QwenBackend(ScriptedEngine(before), CFG), cfg=CFG,
                        batch_size=4, batches_in_flight=3)
    assert every_id_once(tmp_path / "out", lines)[1] == [] and summary["figures"] == 10
    assert max(answered.values()) == 1 and summary["lvlm_requests"] == sum(answered.values())
