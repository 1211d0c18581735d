"""launch/gpu_local.py runs real multi-process training on CPU (2 processes x 4 devices, jax.distributed
over gloo): the same losses as 1 process x 8 devices, a pod-wide stop on one process's SIGTERM and the
resume from it, and no hang when a process is killed."""
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from annotate.synth import synthesize, write_truth_records
from conftest import HEARTBEAT_TIMEOUT_S, REPO, logged
from zoomin_jax.recipes import ALL_TERMS

LAUNCHER = REPO / "launch" / "gpu_local.py"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return str(write_truth_records(synthesize(tmp_path_factory.mktemp("synth"), num=48, seed=0)))


def launch_command(tmp_path, workdir, records, processes, devices, *overrides,
                   launcher_args=("--heartbeat-timeout", HEARTBEAT_TIMEOUT_S)):
    return [sys.executable, str(LAUNCHER), "--processes", str(processes), "--cpu-devices", str(devices),
            "--log-dir", str(tmp_path / f"logs-{workdir.name}"), *launcher_args, "--",
            "python", "-m", "zoomin_jax.train", f"--config=configs/demo_cpu.py:records={records}",
            f"--workdir={workdir}", "--config.log_every=1", "--config.data.workers=0",
            "--config.checkpoint_every=3", *overrides]


def run(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, records):
    """{step: logged entry} of 1 process x 8 devices trained straight to step 9."""
    tmp_path = tmp_path_factory.mktemp("one")
    # Two data shards, as the 2-process runs have by default: the same global batches.
    run(launch_command(tmp_path, tmp_path / "one", records, 1, 8, "--config.total_steps=9", "--config.data.data_shards=2"))
    return {entry["step"]: entry for entry in logged(tmp_path / "one")}


def signal_once_logged(command, workdir, how: str) -> tuple[int, str, float]:
    """Starts the launcher, sends process 1 `kill -<how>` once the run logged its first step; the
    launcher's exit status, its output, and the seconds from the signal to its exit."""
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not logged(workdir):
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        pids = dict(re.findall(r"started process (\d) \(pid (\d+)\)", "".join(lines)))
        sent = time.monotonic()
        subprocess.run(["kill", f"-{how}", pids["1"]], check=True)
        returncode = launcher.wait(timeout=300)
        took = time.monotonic() - sent
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGKILL)
    reader.join(timeout=10)
    return returncode, "".join(lines), took


@pytest.mark.slow
def test_killing_one_process_stops_the_other(tmp_path, records):
    """SIGKILL to process 1 mid-training: process 0 stops with an error on its own (JAX's
    coordination service misses process 1's heartbeats), well inside 120 s, and the launcher
    names what happened and exits 1."""
    workdir = tmp_path / "run"
    returncode, output, stopped_after = signal_once_logged(
        launch_command(tmp_path, workdir, records, 2, 4, "--config.total_steps=1000",
                       launcher_args=("--heartbeat-timeout", "20")), workdir, "9")
    assert returncode == 1, output[-4000:]
    assert "launch: error: process 1 was killed by SIGKILL" in output, output[-4000:]
    survivor = re.search(r"launch: process 0 (was killed by \w+|exited with status \d+), (\d+) s after process 1",
                         output)
    assert survivor and survivor.group(1) != "exited with status 0", output[-4000:]
    assert int(survivor.group(2)) <= 120 and stopped_after <= 120
    assert "still runs" not in output  # process 0 stopped by itself; the launcher did not have to kill it
    process_0_log = (tmp_path / "logs-run" / "process_0.log").read_text()
    assert "another task died" in process_0_log or "Gloo" in process_0_log, process_0_log[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_saved_step_and_they_resume_like_one(tmp_path, records,
                                                                                   one_process):
    """One scenario for what took a launch per property (each launch compiles every step again), on
    2 processes x 4 devices: SIGTERM to process 1 alone (a spot VM's notice reaches one host) makes both
    processes agree on one step through JAX's preemption service, both save it (each its own data
    iterator state) and exit 0; the rerun resumes from it; and every step of the two launches has the
    losses of 1 process x 8 devices trained straight through."""
    stopped = tmp_path / "stopped"
    # No periodic checkpoint before step 9: the one at the stop comes from the stop.
    command = launch_command(tmp_path, stopped, records, 2, 4, "--config.total_steps=9",
                             "--config.checkpoint_every=100")
    returncode, output, _ = signal_once_logged(command, stopped, "TERM")
    assert returncode == 0, output[-4000:]
    assert "[0] step 1 [figure]" in output and "[1] " in output  # both processes' output, prefixed
    said = re.findall(r"\[(\d)\] preempted: stopped at step (\d+)", output)
    assert len(said) == 2 and {process for process, _ in said} == {"0", "1"}, output[-4000:]
    step = int(said[0][1])
    assert said[1][1] == said[0][1] and 1 <= step < 9
    saved = sorted(int(path.name) for path in (stopped / "checkpoints").iterdir() if path.name.isdigit())
    assert saved[-1] == step  # (orbax also saves the first step of a run)

    resumed = run(command)
    assert f"resumed from step {step}" in resumed.stdout
    entries = logged(stopped)  # process 0 writes the metrics; the rerun appends to the stopped run's
    assert [entry["step"] for entry in entries] == list(range(1, 10))
    for entry in entries:
        terms = [key for key in entry if key in ALL_TERMS] + ["loss", "grad_norm"]
        assert len(terms) >= 3, entry
        for key in terms:
            assert entry[key] == pytest.approx(one_process[entry["step"]][key], rel=1e-5), (entry["step"], key)
    for level in ("figure", "panel", "region"):
        data_state = stopped / "checkpoints" / "9" / f"data_{level}"
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= {path.name for path in data_state.iterdir()}


def test_dry_run_prints_each_process_environment():
    result = subprocess.run([sys.executable, str(LAUNCHER), "--processes", "2", "--cpu-devices", "4", "--port",
                             "12345", "--dry-run", "--", "python", "-m", "zoomin_jax.train", "--config=c.py:a=1,b='x y'",
                             "--workdir=w"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    common = ("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
              "ZOOMIN_COORDINATOR=127.0.0.1:12345 ZOOMIN_NUM_PROCESSES=2")
    assert lines == [f"env {common} ZOOMIN_PROCESS_ID={i} ZOOMIN_HEARTBEAT_TIMEOUT_S=60 {sys.executable} -m "
                     f"zoomin_jax.train '--config=c.py:a=1,b='\"'\"'x y'\"'\"'' --workdir=w" for i in range(2)]


def test_gpu_processes_get_one_gpu_each_and_a_clear_error_without_gpus():
    base = [sys.executable, str(LAUNCHER), "--port", "2222", "--dry-run"]
    result = subprocess.run([*base, "--gpus", "0,3", "--", "python", "-m", "zoomin_jax.train"], capture_output=True,
                            text=True, check=True)
    lines = result.stdout.splitlines()
    assert [re.search(r"CUDA_VISIBLE_DEVICES=(\d)", line).group(1) for line in lines] == ["0", "3"]
    assert all("ZOOMIN_NUM_PROCESSES=2" in line for line in lines)
    one = subprocess.run([*base, "--one-process", "--gpus", "0,3", "--", "python", "x.py"], capture_output=True,
                         text=True, check=True).stdout
    assert one.startswith("env CUDA_VISIBLE_DEVICES=0,3 ") and "ZOOMIN_" not in one
    env = {"PATH": "/nonexistent"}  # no nvidia-smi
    missing = subprocess.run([*base, "--", "python", "x.py"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: no GPU found")
