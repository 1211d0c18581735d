"""Shared fixtures: the real data in ../shared/data and a runner for the CLIs."""
from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ZOOMIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests read real data from ../shared/data "
                    f"(or ZOOMIN_SHARED_DATA).")
    return path


def roco_captions() -> list[str]:
    with open(_require(DATA / "captions" / "roco_test_captions.tsv"), newline="") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


def prostate_captions() -> list[str]:
    splits = json.loads(_require(DATA / "captions" / "prostate_caption_splits.json").read_text())
    texts = []
    for entry in splits.values():
        if entry.get("caption"):
            texts.append(entry["caption"])
        texts += [sub["caption"] for sub in entry["gt_subfigures"]]
    return texts


def real_images() -> list[Image.Image]:
    """10 real PMC figures (RGB, various sizes) and 4 MedMNIST images (28x28 grayscale)."""
    paths = sorted(glob.glob(str(_require(DATA / "figures" / "medicat") / "*.png")))
    images = [Image.open(p) for p in paths]
    for name in ("pneumoniamnist", "breastmnist"):
        arrays = np.load(_require(DATA / "medmnist" / f"{name}.npz"))
        images += [Image.fromarray(arrays["test_images"][i]) for i in range(2)]
    return images


def built_once(tmp_path_factory, name: str, build) -> Path:
    """DIR made by build(DIR) once per test session: the first xdist worker to ask builds it, the
    others wait for it and read it (xdist's session fixtures are per worker)."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    directory = root / name
    with FileLock(f"{directory}.lock"):
        if not (directory / ".built").exists():
            build(directory)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def zou_composites(tmp_path_factory) -> Path:
    """600 synthetic compound figures on real layouts (zou_train.csv) with PneumoniaMNIST and other
    real pictures in the panels: DIR/images, DIR/gt.jsonl (built once per test session)."""
    from annotate.synth import synthesize
    return built_once(tmp_path_factory, "zou", lambda directory: synthesize(
        directory, num=600, seed=0, layouts_csv=str(_require(DATA / "layouts" / "zou_train.csv")),
        medmnist_npz=str(_require(DATA / "medmnist" / "pneumoniamnist.npz"))))


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# A process is declared dead after this long without a heartbeat (JAX's default: 100 s). The tests'
# processes share 2 cores with the rest of the suite (pytest-xdist): a busy machine must slow them,
# not fail them. The test of a dead process sets its own (tests/test_launch_local.py).
HEARTBEAT_TIMEOUT_S = "300"


def two_processes(script: str, *args: str, out: Path) -> list[dict]:
    """tests/SCRIPT run as processes 0 and 1 of one jax.distributed job on localhost, started as
    launch/gpu_local.py starts them (the ZOOMIN_* variables sharding.initialize_distributed reads);
    its argv: *args, out; each process's out/process{i}.json."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "ZOOMIN_"))} | {
        "ZOOMIN_COORDINATOR": f"127.0.0.1:{port}", "ZOOMIN_NUM_PROCESSES": "2", "JAX_PLATFORMS": "cpu",
        "ZOOMIN_HEARTBEAT_TIMEOUT_S": HEARTBEAT_TIMEOUT_S}
    procs = [subprocess.Popen([sys.executable, f"tests/{script}", *args, str(out)], cwd=REPO,
                              env=env | {"ZOOMIN_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [proc.communicate(timeout=600)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    return [json.loads((out / f"process{i}.json").read_text()) for i in range(2)]


def logged(workdir) -> list[dict]:
    """The entries of a training run's metrics.jsonl (local or gs://), none before it exists."""
    try:
        return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def kill_when_logged(process: subprocess.Popen, workdir, count: int) -> list[dict]:
    """SIGKILLs a training process once its run logged `count` entries; returns what it logged."""
    while len(logged(workdir)) < count:
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return logged(workdir)


SLOW_S = 30  # tests/README.md: a test over this on the 2-core machines is marked slow and listed there


def pytest_collection_modifyitems(items):
    """The files holding slow tests first (each in its own order): with one file per xdist worker, the
    long ones then start at once instead of leaving one worker alone with them at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_terminal_summary(terminalreporter):
    """Names every test over SLOW_S seconds (its setup included: a module fixture counts for the first
    test that uses it) that is not marked slow. A warning, not a failure: tests do not assert times."""
    seconds, slow = {}, set()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call"):
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
                if "slow" in report.keywords:
                    slow.add(report.nodeid)
    unmarked = sorted((s, nodeid) for nodeid, s in seconds.items() if s > SLOW_S and nodeid not in slow)
    if unmarked:
        terminalreporter.section(f"over {SLOW_S} s and not marked slow (make them cheaper, or mark and list "
                                 "them in tests/README.md)")
        for s, nodeid in reversed(unmarked):
            terminalreporter.write_line(f"{s:7.1f} s  {nodeid}")
