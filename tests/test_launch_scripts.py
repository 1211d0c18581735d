"""The launch scripts: shell syntax and shellcheck, the #SBATCH headers SLURM reads, and
slurm_train.sbatch run as SLURM would run it (srun replaced by a stand-in that starts the tasks
here with the variables a real step sets), so jax.distributed finds its peers through SLURM."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from annotate.synth import synthesize, write_truth_records
from conftest import REPO, logged

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sbatch"), *LAUNCH.glob("*.sh")])
SHELLCHECK = shutil.which("shellcheck") or str(os.path.join(os.path.dirname(sys.executable), "shellcheck"))


def test_there_are_scripts_to_check():
    assert {path.name for path in SCRIPTS} >= {"slurm_train.sbatch", "slurm_annotate.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([SHELLCHECK, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def sbatch_options(script) -> dict[str, str]:
    """The #SBATCH options as sbatch reads them: only those before the first command line."""
    options = {}
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            key, _, value = line.removeprefix("#SBATCH").strip().partition("=")
            options[key] = value
    after = [line for line in script.read_text().split("\nset -euo pipefail", 1)[1].splitlines()
             if line.startswith("#SBATCH")]
    assert not after, f"{script.name}: #SBATCH after the first command is ignored by sbatch: {after}"
    return options


def test_sbatch_headers():
    train = sbatch_options(LAUNCH / "slurm_train.sbatch")
    assert train["--ntasks-per-node"] == train["--gpus-per-node"]  # one JAX process per GPU
    assert int(train["--nodes"]) >= 1 and train["--requeue"] == ""
    assert re.fullmatch(r"TERM@\d+", train["--signal"])  # the trainer checkpoints on SIGTERM before the limit
    assert train["--output"].startswith("logs/") and "%j" in train["--output"]
    annotate = sbatch_options(LAUNCH / "slurm_annotate.sbatch")
    assert re.fullmatch(r"0-\d+", annotate["--array"]) and annotate["--gres"] == "gpu:1"
    assert annotate["--output"].startswith("logs/") and "%A_%a" in annotate["--output"]
    for options in (train, annotate):
        assert {"--job-name", "--time", "--cpus-per-task"} <= options.keys()


FAKE_SRUN = """#!/usr/bin/env bash
# srun for tests: the step's tasks as local processes, with the variables a real step gives them;
# its options go to srun-args and each task's process id to task-N.pid (for SIGTERM as SLURM sends it).
echo "$*" >> "$SRUN_LOGS/srun-args"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_STEP_NODELIST=localhost SLURM_PROCID=$task SLURM_LOCALID=$task "$@" > "$SRUN_LOGS/task-$task.log" 2>&1 &
    pids+=($!)
    echo $! > "$SRUN_LOGS/task-$task.pid"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SRUN_LOGS/scontrol"
"""


def fake_slurm(tmp_path):
    """A directory for PATH with the stand-in srun and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_slurm_train_runs_two_tasks_that_find_each_other_through_slurm(tmp_path):
    records = write_truth_records(synthesize(tmp_path / "synth", num=24, seed=2))
    bin_dir = fake_slurm(tmp_path)
    workdir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "ZOOMIN_"))} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "SRUN_LOGS": str(tmp_path),
        "SLURM_JOB_ID": str(random.randrange(10_000, 1_000_000)), "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",  # the compile check's default target: h100x2
        "SLURM_CPUS_PER_TASK": "2",
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "TRAIN_CONFIG": f"configs/demo_cpu.py:records={records},variant=figure_only",
        "TRAIN_WORKDIR": str(workdir),
        "TRAIN_ARGS": "--config.total_steps=2 --config.log_every=1 --config.data.workers=0"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_train.sbatch")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    logs = "".join((tmp_path / f"task-{task}.log").read_text() for task in range(2) if
                   (tmp_path / f"task-{task}.log").exists())
    assert result.returncode == 0, result.stderr + logs[-4000:]
    assert "compile check for h100x2" in result.stdout and "train: 1 node(s)" in result.stdout
    assert (tmp_path / "srun-args").read_text().startswith("--kill-on-bad-exit=1 --cpus-per-task=2 ")
    assert not (tmp_path / "scontrol").exists() and "train: stopped" not in result.stderr  # finished: not requeued
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # Both tasks were one run: each saved its own data-iterator position into the shared checkpoint.
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= {
        path.name for path in (workdir / "checkpoints" / "2" / "data_figure").iterdir()}


@pytest.mark.slow
def test_slurm_train_gives_srun_its_cpus_and_requeues_a_run_stopped_before_its_end(tmp_path):
    """SIGTERM to the task, as SLURM sends it before the time limit: the trainer saves its step and
    exits 0, and the script requeues the job once. srun gets the job's --cpus-per-task, which it no
    longer inherits (Slurm 22.05). A finished run is not requeued: the two-task test above."""
    records = write_truth_records(synthesize(tmp_path / "synth", num=24, seed=2))
    bin_dir = fake_slurm(tmp_path)
    workdir, job = tmp_path / "run", str(random.randrange(10_000, 1_000_000))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "ZOOMIN_", "TRAIN_"))} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "SRUN_LOGS": str(tmp_path),
        "SLURM_JOB_ID": job, "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "3", "CHECK_TARGET": "none",
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "TRAIN_CONFIG": f"configs/demo_cpu.py:records={records},variant=figure_only", "TRAIN_WORKDIR": str(workdir),
        "TRAIN_ARGS": "--config.total_steps=1000 --config.log_every=1 --config.data.workers=0"}
    script = subprocess.Popen(["bash", str(LAUNCH / "slurm_train.sbatch")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not logged(workdir):  # a logged step: the trainer's SIGTERM handler is in place
        assert script.poll() is None, script.communicate()[1] + (tmp_path / "task-0.log").read_text()[-4000:]
        time.sleep(0.05)
    os.kill(int((tmp_path / "task-0.pid").read_text()), signal.SIGTERM)
    stderr = script.communicate(timeout=120)[1]
    assert script.returncode == 0, stderr + (tmp_path / "task-0.log").read_text()[-4000:]
    stopped = max(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())
    assert 1 <= stopped < 1000
    assert stderr.splitlines()[-1] == f"train: stopped at step {stopped} of 1000; requeueing job {job} (restart 1)"
    assert (tmp_path / "scontrol").read_text() == f"requeue {job}\n"
    assert (tmp_path / "srun-args").read_text().startswith("--kill-on-bad-exit=1 --cpus-per-task=3 ")


def test_slurm_train_refuses_a_job_whose_steps_do_not_fit(tmp_path):
    """The compile check runs before srun: 64k regions a v5e chip do not fit, and no task starts
    (there is no srun on PATH to start one)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TRAIN_"))} | {
        "PYTHON": sys.executable, "CHECK_TARGET": "v5e-8", "TRAIN_WORKDIR": str(tmp_path),
        "TRAIN_CONFIG": "configs/demo_cpu.py:variant=region_only", "TRAIN_ARGS": "--config.data.batch_size.region=524288"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_train.sbatch")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "error: the region step does not fit the v5e-8's" in result.stderr
    assert result.stderr.rstrip().endswith("error: the compile check for v5e-8 failed (above): nothing was started; fix "
                                           "the config, or set CHECK_TARGET (none skips the check)")


def test_slurm_train_names_what_is_missing():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TRAIN_", "SLURM_"))}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_train.sbatch")], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: TRAIN_CONFIG is not set")
