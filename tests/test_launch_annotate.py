"""launch/slurm_annotate.sbatch run by hand as a 3-task array on the real MedICaT figures (in a
manifest, and in WebDataset tars one of which is cut off), then `annotate merge`: every input id
accounted for once, each task reading only its own tars, and a lost shard named."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from annotate.run import ShardFiles
from annotate.synth import synthesize
from conftest import DATA, REPO, run_cli
from zoomin_jax import records

SCRIPT = REPO / "launch" / "slurm_annotate.sbatch"
MISSING_IMAGE_ID = "no-such-figure"


def script_env(env: dict) -> dict:
    """The environment SLURM would start the script in, outside SLURM: only the variables given here, not
    the caller's SLURM_/ANNOTATE_/ZOOMIN_ ones (a test run inside a SLURM job must not inherit its array)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ANNOTATE_", "ZOOMIN_"))}
    return base | {"PYTHON": sys.executable} | env


def run_script(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env=script_env(env), capture_output=True, text=True, cwd=REPO)


def medicat_figures() -> list[dict]:
    """The 10 real figures as manifest lines (images referenced where they lie)."""
    medicat = DATA / "figures" / "medicat"
    lines = []
    for line in (medicat / "sample.jsonl").read_text().splitlines():
        sample = json.loads(line)
        image = medicat / f"{sample['pdf_hash']}_{sample['fig_uri']}"
        lines.append({"id": image.stem, "image": str(image), "caption": sample["s2_caption"],
                      "context": sample["s2orc_references"] or []})
    return lines


def run_array(inputs: str, out) -> None:
    """Array tasks 0, 1 and 2 of 3 with the heuristic backend."""
    for task in range(3):
        result = run_script({"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
                             "SLURM_ARRAY_TASK_MIN": "0", "ANNOTATE_INPUT": inputs,
                             "ANNOTATE_OUT": str(out), "ANNOTATE_BACKEND": "heuristic"})
        assert result.returncode == 0, f"array task {task}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """The 10 real figures and one whose image does not exist, in one manifest, annotated by a 3-task array."""
    tmp = tmp_path_factory.mktemp("fanout")
    lines = medicat_figures()
    lines.append({"id": MISSING_IMAGE_ID, "image": str(tmp / "absent.png"), "caption": "(A) CT. (B) MRI."})
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp / "out"
    run_array(str(manifest), out)
    return out, manifest, [line["id"] for line in lines]


def shard_ids(out):
    recorded = [r["figure_id"] for r in records.iter_records(sorted(out.glob("records-*.array_record")))]
    failed = [json.loads(line) for path in sorted(out.glob("failures-*.jsonl"))
              for line in path.read_text().splitlines()]
    return recorded, failed


def test_array_tasks_then_merge_account_for_every_id_once(annotated):
    out, manifest, ids = annotated
    assert sorted(p.name for p in out.glob("summary-*")) == [f"summary-0000{i}-of-00003.json" for i in range(3)]
    result = run_cli("-m", "annotate", "merge", "--out", str(out), "--input", str(manifest))
    assert "error:" not in result.stderr
    recorded, failed = shard_ids(out)
    assert sorted(recorded + [f["id"] for f in failed]) == sorted(ids)
    assert [f["id"] for f in failed] == [MISSING_IMAGE_ID] and "No such file" in failed[0]["reason"]
    report = json.loads((out / "merged-summary.json").read_text())
    assert report["complete"] and report["problems"] == [] and report["num_shards"] == 3
    assert (report["figures"], report["failures"]) == (len(recorded), 1) == (len(ids) - 1, 1)
    summaries = [json.loads((out / f"summary-0000{i}-of-00003.json").read_text()) for i in range(3)]
    assert report["panels"] == sum(s["panels"] for s in summaries) >= report["figures"]
    assert report["regions"] == sum(s["regions"] for s in summaries)
    assert sum(report["failures_by_reason"].values()) == 1 and len(report["shards"]) == 3
    assert report["ids_in_no_shard"] == report["ids_not_in_inputs"] == report["duplicate_ids"] == []


def test_merge_names_the_lost_shard(annotated, tmp_path):
    out, manifest, ids = annotated
    copy = shutil.copytree(out, tmp_path / "out")
    lost = [r["figure_id"] for r in records.iter_records(ShardFiles(copy, 1, 3).records_files())]
    for path in copy.glob("*-00001-of-00003*"):
        path.unlink()
    result = run_cli("-m", "annotate", "merge", "--out", str(copy), "--input", str(manifest), check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: missing shards: 00001-of-00003 (rerun array task 1);")
    assert "00000-of-00003" not in errors[0] and "00002-of-00003" not in errors[0]
    report = json.loads((copy / "merged-summary.json").read_text())
    assert not report["complete"] and report["missing_shards"] == ["00001-of-00003"]
    assert report["ids_in_no_shard"] == [] and report["ids_in_shards_not_merged"] == len(lost) > 0


@pytest.mark.parametrize("array, message", [
    ({}, "SLURM_ARRAY_TASK_ID is not set"),
    ({"SLURM_ARRAY_TASK_ID": "0"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "9"}, "not one per index"),  # --array=1,5,9
])
def test_script_refuses_to_run_without_a_usable_array(tmp_path, array, message):
    result = run_script(array | {"ANNOTATE_INPUT": str(tmp_path / "manifest.jsonl"),
                                 "ANNOTATE_OUT": str(tmp_path / "out"), "ANNOTATE_BACKEND": "heuristic"})
    assert result.returncode != 0 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


def write_tar(path, figures: list[dict]) -> None:
    """A WebDataset shard as BIOMEDICA's: KEY.png and KEY.json with the caption, per figure."""
    with tarfile.open(path, "w") as tar:
        for figure in figures:
            for name, data in ((f"{figure['id']}.png", Path(figure["image"]).read_bytes()),
                               (f"{figure['id']}.json", json.dumps({"caption": figure["caption"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_array_over_tars_each_task_reads_its_own_and_merge_accounts_for_every_id(tmp_path):
    figures = medicat_figures()
    tars = tmp_path / "tars"
    tars.mkdir()
    paths = [tars / f"shard-{n:05d}.tar" for n in range(5)]
    for n, path in enumerate(paths):
        write_tar(path, figures[2 * n:2 * n + 2])
    cut = paths[3]  # shard 0's (files are dealt round robin in sorted order), cut inside its second image
    with tarfile.open(cut) as tar:
        second = tar.getmember(f"{figures[7]['id']}.png")
    cut.write_bytes(cut.read_bytes()[:second.offset_data + second.size // 2])
    out = tmp_path / "out"
    run_array(f"{tars}/*.tar", out)

    owned = [[str(paths[0]), str(paths[3])], [str(paths[1]), str(paths[4])], [str(paths[2])]]
    for task in range(3):
        summary = json.loads((out / f"summary-0000{task}-of-00003.json").read_text())
        assert summary["shard_by"] == "file" and summary["inputs_read"] == owned[task]
        sources = {r["source"].rsplit(":", 1)[0]
                   for r in records.iter_records(ShardFiles(out, task, 3).records_files())}
        assert sources == set(owned[task]), "a task's records came from another task's tars"
        failed = [json.loads(line) for line in (out / f"failures-0000{task}-of-00003.jsonl").read_text().splitlines()]
        assert [(f["id"], f["stage"]) for f in failed] == ([(str(cut), "file")] if task == 0 else [])
        assert all(f["reason"].startswith(f"tar unreadable from sample {figures[7]['id']!r} on:") for f in failed)

    result = run_cli("-m", "annotate", "merge", "--out", str(out), "--input", str(tars))
    assert "error:" not in result.stderr
    recorded, failed = shard_ids(out)
    readable = [f["id"] for n, f in enumerate(figures) if n != 7]  # what the cut tar lost, no one can name
    assert sorted(recorded) == sorted(readable) and [f["id"] for f in failed] == [str(cut)]
    report = json.loads((out / "merged-summary.json").read_text())
    assert report["complete"] and (report["figures"], report["failures"], report["failed_files"]) == (9, 1, [str(cut)])
    assert report["ids_in_no_shard"] == report["ids_not_in_inputs"] == report["duplicates_resolved"] == []


def test_a_task_signalled_before_its_time_limit_requeues_itself_and_the_rerun_finishes(tmp_path):
    """SLURM's --signal=B:TERM@N reaches the batch shell alone: the script passes it to annotate, which
    stops mid-shard with status 143, and requeues the array task through scontrol (a stand-in on PATH
    that writes down its arguments); the requeued run (SLURM_RESTART_COUNT=1) finishes the shard."""
    data = synthesize(tmp_path / "synth", num=48, seed=7)
    expected = [json.loads(line)["id"] for line in (data / "manifest.jsonl").read_text().splitlines()]
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    calls = tmp_path / "scontrol-calls"
    (stand_ins / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    (stand_ins / "scontrol").chmod(0o755)
    out = tmp_path / "out"
    env = script_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_JOB_ID": "4242",
                      "SLURM_JOB_ID": "4243", "ANNOTATE_INPUT": str(data / "manifest.jsonl"), "ANNOTATE_OUT": str(out),
                      "ANNOTATE_BACKEND": "heuristic", "ANNOTATE_BATCH_SIZE": "2",
                      "ANNOTATE_EXTRA_ARGS": "--part-size 6 --decode-workers 0",
                      "PATH": f"{stand_ins}:{os.environ['PATH']}"})
    task = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("parts-*/*.index.msgpack"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    task.send_signal(signal.SIGTERM)  # the shell only, as B: does
    _, stderr = task.communicate(timeout=60)
    assert task.returncode == 143, stderr
    assert calls.read_text() == "requeue 4242_0\n"
    assert "requeueing 4242_0 (restart 1)" in stderr and not (out / "summary-00000-of-00001.json").exists()

    rerun = run_script({**{k: v for k, v in env.items() if k.startswith(("SLURM_", "ANNOTATE_"))},
                        "SLURM_RESTART_COUNT": "1", "PATH": env["PATH"]})
    assert rerun.returncode == 0, rerun.stderr
    assert calls.read_text() == "requeue 4242_0\n"  # finished: not requeued again
    recorded, failed = shard_ids(out)
    assert sorted(recorded) == sorted(expected) and failed == []
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert 0 < summary["figures_this_run"] < len(expected)
