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


@pytest.fixture(scope="session")
def zou_composites(tmp_path_factory) -> Path:
    """600 synthetic compound figures on real layouts (zou_train.csv) with PneumoniaMNIST and other
    real pictures in the panels: DIR/images, DIR/gt.jsonl (built once per test session)."""
    from annotate.synth import synthesize
    return synthesize(tmp_path_factory.mktemp("zou"), num=600, seed=0,
                      layouts_csv=str(_require(DATA / "layouts" / "zou_train.csv")),
                      medmnist_npz=str(_require(DATA / "medmnist" / "pneumoniamnist.npz")))


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def two_processes(script: str, *args: str, out: Path) -> list[dict]:
    """tests/SCRIPT run as processes 0 and 1 of one jax.distributed job on localhost (its argv: *args,
    port, process id, out); each process's out/process{i}.json."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, f"tests/{script}", *args, port, str(i), str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output[-3000:]
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
