"""The engine never waits for one batch (issue 26): with two batches in flight the next batch's figure
round is asked while the first batch is still in its rounds, one engine thread runs every call, and
the records are those of one batch at a time. On the real MedICaT figures, with the scripted engine
of test_annotate_faults (answers as Qwen2.5-VL would give them; here each call also takes a while,
as a GPU's would)."""
import threading
import time

import pytest
from PIL import Image

from annotate import prompts
from annotate.lvlm_output import resized_size
from annotate.qwen import QwenBackend
from annotate.run import run_shard
from test_annotate_faults import CFG, ScriptedEngine
from test_annotate_failures import medicat_manifest
from zoomin_jax import records


class SlowEngine(ScriptedEngine):
    """Writes down each call's requests (question, image size) and the thread it ran on, and takes
    `seconds` per call."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls, self.threads = seconds, [], set()

    def generate(self, requests):
        self.calls.append([(r.question, r.image and r.image.size) for r in requests])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return super().generate(requests)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_next_batch_is_asked_while_one_is_in_its_rounds(tmp_path, in_flight):
    """Batches of 2 figures: the second batch's first FIGURE request goes out before the first batch's
    REGION round with two batches in flight, after it with one; every call runs on the engine thread."""
    manifest, lines = medicat_manifest(tmp_path)
    engine = SlowEngine(seconds=0.3)
    run_shard([manifest], tmp_path / "out", QwenBackend(engine, CFG), cfg=CFG, batch_size=2,
              batches_in_flight=in_flight)
    width, height = Image.open(lines[2]["image"]).size  # the second batch's first figure, as the model sees it
    frame = resized_size(height, width, CFG.min_pixels, CFG.max_pixels)[::-1]
    second_batch = next(n for n, call in enumerate(engine.calls) if (prompts.FIGURE, frame) in call)
    first_region = next(n for n, call in enumerate(engine.calls) if any(q == prompts.REGION for q, _ in call))
    assert (second_batch < first_region) == (in_flight == 2), engine.calls
    assert engine.threads == {"engine"}


def test_records_do_not_depend_on_the_batches_in_flight(tmp_path):
    manifest, lines = medicat_manifest(tmp_path)
    got = {}
    for in_flight in (1, 3):
        out = tmp_path / f"out{in_flight}"
        summary = run_shard([manifest], out, QwenBackend(ScriptedEngine(), CFG), cfg=CFG, batch_size=2,
                            batches_in_flight=in_flight)
        assert summary["figures"] == 10 and 0 < summary["lvlm_engine_busy_share"] <= 1
        got[in_flight] = [{**record, "annotation": {**record["annotation"], "seconds": 0}}
                          for record in records.iter_records(sorted((out).glob("records-*.array_record")))]
    assert got[1] == got[3] and [r["figure_id"] for r in got[1]] == [line["id"] for line in lines]
