"""`annotate run` at scale: sharding by file or by figure, a whole-file failure in the shards that
lost its figures, merge keeping one of an id two shards hold, the shard index from the environment,
one process per shard, warnings counted by reason, and a stop when most figures fail."""
import json
import threading

import pytest

from annotate.merge import merge
from annotate.pipeline import Proposal
from annotate.run import FAILURE_RATE_EXIT_STATUS, ShardFiles, run_shard, shard_from_env
from conftest import run_cli
from test_annotate_failures import ScriptedBackend, medicat_manifest
from zoomin_jax import records


def whole_figure(images) -> list[Proposal]:
    return [Proposal([{"box": [0.0, 0.0, float(image.width), float(image.height)], "label": "", "score": 1.0}])
            for image in images]


class Warns:
    """Every figure one panel, with the warnings an LVLM backend gives, numbers and phrases differing."""
    name, model_id = "scripted", "scripted-warnings"

    def propose(self, images, captions, contexts=None):
        proposals = whole_figure(images)
        for n, proposal in enumerate(proposals):
            proposal.warnings = [f"panels@1.0: box [{n}, 0, {9 + n}, 5] clipped to the image",
                                 f"phrase 'arrow {n}': answer cut at {100 + n} tokens"]
        return proposals


def shard_lines(out, index, count):
    files = ShardFiles(out, index, count)
    recorded = list(records.iter_records(files.records_files()))
    return recorded, [json.loads(line) for line in files.failures.read_text().splitlines()]


def test_by_file_each_shard_reads_its_own_files_and_merge_keeps_one_of_a_repeated_id(tmp_path):
    _, lines = medicat_manifest(tmp_path)
    folder = tmp_path / "manifests"
    folder.mkdir()
    # medicat-0 is in m0 (shard 1) and m1 (shard 2); gone.tar sorts first, so it is shard 0's.
    for n, group in enumerate([lines[0:3], lines[3:6] + lines[0:1], lines[6:8], lines[8:10]]):
        (folder / f"m{n}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in group))
    gone = str(tmp_path / "gone.tar")
    inputs = [str(folder), gone]
    out = tmp_path / "out"
    summaries = [run_shard(inputs, out, Warns(), num_shards=3, shard_index=i) for i in range(3)]

    owned = [[gone, str(folder / "m2.jsonl")], [str(folder / "m0.jsonl"), str(folder / "m3.jsonl")],
             [str(folder / "m1.jsonl")]]
    assert [s["shard_by"] for s in summaries] == ["file"] * 3
    assert [sorted(s["inputs_read"]) for s in summaries] == owned
    for index in range(3):
        recorded, failures = shard_lines(out, index, 3)
        # What a shard holds came from its own files only.
        assert {r["source"].rsplit(":", 1)[0] for r in recorded} == set(owned[index]) - {gone}
        assert [(f["id"], f["stage"]) for f in failures] == ([(gone, "file")] if index == 0 else [])
    assert sum(s["warnings_by_reason"]["phrase *: answer cut at N tokens"] for s in summaries) == 11

    report = merge(out, inputs)
    assert report["complete"], report["problems"]
    assert report["duplicates_resolved"] == [{"id": "medicat-0", "kept": "00001-of-00003",
                                              "also_in": ["00002-of-00003"]}]
    assert (report["figures"], report["failures"], report["failed_files"]) == (10, 1, [gone])
    assert report["failures_by_reason"] == {"file: input file does not exist": 1}
    assert report["warnings_by_reason"] == {"panels@N: box * clipped to the image": 10,
                                            "phrase *: answer cut at N tokens": 10}


def test_by_figure_every_shard_records_the_lost_file_and_merge_counts_it_once(tmp_path):
    manifest, lines = medicat_manifest(tmp_path)
    gone = str(tmp_path / "gone.tar")
    out = tmp_path / "out"
    for index in range(3):  # two inputs for three shards: by figure
        summary = run_shard([manifest, gone], out, ScriptedBackend(max_batch=8), num_shards=3, shard_index=index)
        assert summary["shard_by"] == "figure" and summary["inputs_read"] == [manifest, gone]
        assert summary["failures_by_reason"] == {"file: input file does not exist": 1}
    recorded = [r["figure_id"] for index in range(3) for r in shard_lines(out, index, 3)[0]]
    assert sorted(recorded) == sorted(line["id"] for line in lines)
    (tmp_path / "inputs.txt").write_text(f"{manifest}\n{gone}\n")
    report = merge(out, [f"@{tmp_path / 'inputs.txt'}"])
    assert report["complete"], report["problems"]
    assert (report["figures"], report["failures"], report["failed_files"]) == (10, 1, [gone])


def test_the_shard_index_comes_from_the_array_or_rank_or_the_run_refuses(tmp_path, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "17")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")  # sbatch --array=5,17: the index is the shard
    assert shard_from_env(128, None) == (128, 17)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("RANK", "3")
    assert shard_from_env(4, None) == (4, 3) and shard_from_env(4, 1) == (4, 1)
    with pytest.raises(ValueError, match="needs --num-shards"):
        shard_from_env(None, 1)
    monkeypatch.delenv("RANK")
    manifest, _ = medicat_manifest(tmp_path)
    result = run_cli("-m", "annotate", "run", "--input", manifest, "--out", str(tmp_path / "out"),
                     "--backend", "heuristic", "--num-shards", "3", check=False)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error: --num-shards 3 without --shard-index, and neither SLURM_ARRAY_TASK_ID nor RANK is set: "
        "give --shard-index I (0..2)"]
    assert not (tmp_path / "out").exists()


class Held(ScriptedBackend):
    """Holds its first batch until released, so the shard stays running."""

    def __init__(self):
        super().__init__(max_batch=8)
        self.proposing, self.release = threading.Event(), threading.Event()

    def propose(self, images, captions, contexts=None):
        self.proposing.set()
        assert self.release.wait(60)
        return super().propose(images, captions, contexts)


def test_a_second_process_on_a_running_shard_exits_1_naming_it(tmp_path):
    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    backend, results = Held(), []
    first = threading.Thread(target=lambda: results.append(run_shard([manifest], out, backend)))
    first.start()
    try:
        assert backend.proposing.wait(60)
        second = run_cli("-m", "annotate", "run", "--input", manifest, "--out", str(out), "--backend", "heuristic",
                         check=False)
    finally:
        backend.release.set()
        first.join(60)
    assert second.returncode == 1 and second.stderr.splitlines()[-1] == (
        f"annotate: shard 00000-of-00001 is being run by another process, which holds {out / 'lock-00000-of-00001'}; "
        f"let it finish or stop it, then rerun")
    recorded, failures = shard_lines(out, 0, 1)
    assert sorted(r["figure_id"] for r in recorded) == sorted(line["id"] for line in lines) and failures == []
    assert results[0]["figures"] == 10 and run_shard([manifest], out, ScriptedBackend()) == results[0]


class FailsMost(ScriptedBackend):
    """A broken model: only the first two figures' captions get an answer."""

    def __init__(self, good_captions):
        super().__init__(max_batch=8)
        self.good = set(good_captions)

    def propose(self, images, captions, contexts=None):
        if not self.good.issuperset(captions):
            raise ValueError("the processor refused the prompt")
        return super().propose(images, captions, contexts)


def test_most_figures_failing_stops_the_shard_and_a_rerun_retries_them(tmp_path, capsys):
    manifest, lines = medicat_manifest(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_shard([manifest], out, FailsMost([line["caption"] for line in lines[:2]]), batch_size=2,
                  failure_window=6)
    assert stopped.value.code == FAILURE_RATE_EXIT_STATUS == 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        "annotate: shard 00000-of-00001 stopped: 4 of the last 6 figures failed (more than --max-failure-rate 0.5); "
        "top reasons this run: propose: backend raised ValueError (4). Its records are kept and this run's failures "
        "are not: fix the cause and rerun to retry them")
    files = ShardFiles(out, 0, 1)
    assert not files.summary.exists() and not files.records_files() and files.failures.read_text() == ""
    assert [records.load_index(part)["ids"] for part in files.parts()] == [
        ["medicat-0", "medicat-1"]]

    summary = run_shard([manifest], out, ScriptedBackend(max_batch=8), batch_size=2, failure_window=6)
    assert (summary["figures"], summary["failures"], summary["figures_this_run"]) == (10, 0, 8)
