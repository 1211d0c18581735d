"""launch/tpu.py: the exact gcloud commands its --dry-run prints, and the remote scripts it sends,
run here under bash with stub executables (no gcloud, no network, no TPU)."""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO
LAUNCHER = REPO / "launch" / "tpu.py"
SLICE = ["--name", "zoomin-v5e", "--zone", "us-west4-a", "--project", "my-proj"]
LOCATION = "--zone=us-west4-a --project=my-proj"
SSH = "gcloud compute tpus tpu-vm ssh zoomin-v5e " + LOCATION
SCP = "gcloud compute tpus tpu-vm scp"

# A training command whose arguments a shell would mangle: commas, `=`, both quote kinds, spaces,
# `$`, backticks and gs:// globs (which also match files on the "worker", see test below).
TRAIN_ARGV = [
    "python", "-m", "zoomin_jax.train",
    "--config=configs/zoomin_vitl14.py:init=/mnt/my-data/bmc clip,"
    "records=gs://my-bucket/records-*.array_record,variant=zoomin",
    "--config.optim.lr=1e-5",
    "--config.note=it's a \"quoted\" value, with = signs",
    "--records", "gs://my-bucket/records-*.array_record",
    "--workdir=gs://my-runs/vitl14 run",
    "$HOME", "`echo no`", "*",
]


def launch(*args: str, tmp: Path, path: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the launcher. A gcloud on this machine is never reached: `path` (a test's stubs) or a
    stub that fails comes first on PATH."""
    if path is None:
        guard = write_stub(tmp / "guard", "gcloud", 'echo "a test ran gcloud" >&2; exit 97')
        path = f"{guard.parent}:{os.environ['PATH']}"
    env = {**os.environ, "TMPDIR": str(tmp), "PATH": path}  # the setup tarball goes to $TMPDIR
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def dry_run(subcommand: str, *args: str, tmp: Path) -> list[str]:
    result = launch(subcommand, "--dry-run", *args, tmp=tmp)  # before any `--`
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def remote_script(line: str) -> str:
    """The --command value of a printed gcloud ssh line, as the worker's shell receives it (gcloud
    splits it on spaces, ssh joins the pieces with spaces: the same string)."""
    argv = shlex.split(line)
    return " ".join(argv[argv.index("--command") + 1].split(" "))


def write_stub(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stub = directory / name
    stub.write_text("#!/bin/bash\n" + body + "\n")
    stub.chmod(0o755)
    return stub


def run_on_worker(script: str, home: Path, stubs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True, timeout=30,
                          env={"HOME": str(home), "USER": "tester", "PATH": f"{stubs}:/usr/bin:/bin"})


def pinned_jax() -> str:
    return re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)


def test_create(tmp_path):
    assert dry_run("create", *SLICE, "--accelerator-type", "v5litepod-16", "--runtime-version",
                   "v2-alpha-tpuv5-lite", "--spot", tmp=tmp_path) == [
        "gcloud compute tpus tpu-vm create zoomin-v5e " + LOCATION +
        " --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"]
    assert dry_run("create", *SLICE, "--accelerator-type", "v5litepod-16", "--runtime-version",
                   "v2-alpha-tpuv5-lite", "--spot", "--queued", tmp=tmp_path) == [
        "gcloud compute tpus queued-resources create zoomin-v5e --node-id=zoomin-v5e " + LOCATION +
        " --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot"]
    assert dry_run("create", *SLICE, "--accelerator-type", "v4-32", "--runtime-version", "tpu-ubuntu2204-base",
                   tmp=tmp_path) == [
        "gcloud compute tpus tpu-vm create zoomin-v5e " + LOCATION +
        " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]


def test_setup_commands(tmp_path):
    tarball = tmp_path / "zoomin-jax-zoomin-v5e.tar.gz"
    archive, copy, ssh = dry_run("setup", *SLICE, "--gcsfuse-bucket", "my-data", tmp=tmp_path)
    assert archive == f"git archive --format=tar.gz -o {tarball} HEAD"
    assert copy == f"{SCP} {tarball} 'zoomin-v5e:~/zoomin-jax.tar.gz' {LOCATION} --worker=all"
    apt = "sudo apt-get -qq -o DPkg::Lock::Timeout=600"
    script = (
        "set -e; "
        f"python3.11 -c 'import ensurepip' 2> /dev/null || "
        f"{{ {apt} update && {apt} install -y python3.11 python3.11-venv; }}; "
        'command -v gcsfuse > /dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
        'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
        "| sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
        "| sudo tee /usr/share/keyrings/cloud.google.asc "
        f"> /dev/null && {apt} update && {apt} install -y gcsfuse; }}; "
        'mountpoint -q /mnt/my-data || { sudo mkdir -p /mnt/my-data && sudo chown "$USER" /mnt/my-data && '
        "gcsfuse --implicit-dirs -o ro my-data /mnt/my-data; }; "
        "rm -rf ~/zoomin-jax.new ~/zoomin-jax.old && mkdir ~/zoomin-jax.new && "
        "tar -xzf ~/zoomin-jax.tar.gz -C ~/zoomin-jax.new; "
        "if [ -d ~/zoomin-jax ]; then mv ~/zoomin-jax ~/zoomin-jax.old; fi && mv ~/zoomin-jax.new ~/zoomin-jax && "
        "rm -rf ~/zoomin-jax.old ~/zoomin-jax.tar.gz; "
        "mkdir -p ~/zoomin-logs; "
        "[ -x ~/zoomin-venv/bin/python ] || "
        "{ python3.11 -m venv ~/zoomin-venv && ~/zoomin-venv/bin/pip install -q --upgrade pip; }; "
        # jax[tpu] at the version requirements.txt pins, quoted so the brackets are no glob.
        f"~/zoomin-venv/bin/pip install -q 'jax[tpu]=={pinned_jax()}' -e ~/zoomin-jax")
    assert ssh == f"{SSH} --worker=all --command {shlex.quote(script)}"
    other_mount = remote_script(dry_run("setup", *SLICE, "--gcsfuse-bucket", "my-data", "--mount-point", "/data",
                                        tmp=tmp_path)[2])
    assert "gcsfuse --implicit-dirs -o ro my-data /data;" in other_mount
    assert "gcsfuse" not in remote_script(dry_run("setup", *SLICE, tmp=tmp_path)[2])


def make_tarball(path: Path, files: dict[str, str]) -> None:
    """What `git archive --format=tar.gz` makes: the files at the top level of a .tar.gz."""
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_setup_script_is_idempotent(tmp_path):
    """Run the setup script twice on a fake worker: fresh code each time, the venv made once."""
    home, stubs = tmp_path / "home", tmp_path / "stubs"
    home.mkdir()
    # python3.11 found with ensurepip: no apt. `-m venv DIR` makes a venv whose pip logs its args.
    write_stub(stubs, "python3.11", '''echo "$*" >> "$HOME/python-calls"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\\necho "$*" >> "$HOME/pip-calls"\\n' > "$3/bin/pip"
  cp "$3/bin/pip" "$3/bin/python"
  chmod +x "$3/bin/pip" "$3/bin/python"
fi''')
    write_stub(stubs, "sudo", 'echo "sudo $*" >> "$HOME/sudo-calls"; exit 1')
    script = remote_script(dry_run("setup", *SLICE, tmp=tmp_path)[2])

    make_tarball(home / "zoomin-jax.tar.gz", {"requirements.txt": "jax==0\n", "zoomin_jax/a.py": "one\n"})
    first = run_on_worker(script, home, stubs)
    assert first.returncode == 0, first.stderr
    (home / "zoomin-jax" / "stale.py").write_text("left from the last version")
    make_tarball(home / "zoomin-jax.tar.gz", {"requirements.txt": "jax==0\n", "zoomin_jax/a.py": "two\n"})
    second = run_on_worker(script, home, stubs)
    assert second.returncode == 0, second.stderr

    assert (home / "zoomin-jax" / "zoomin_jax" / "a.py").read_text() == "two\n"
    assert not (home / "zoomin-jax" / "stale.py").exists()
    assert sorted(p.name for p in home.iterdir()) == [
        "pip-calls", "python-calls", "zoomin-jax", "zoomin-logs", "zoomin-venv"]  # no tarball, no .new/.old
    assert (home / "python-calls").read_text().splitlines() == [
        "-c import ensurepip", f"-m venv {home}/zoomin-venv", "-c import ensurepip"]
    install = f"install -q jax[tpu]=={pinned_jax()} -e {home}/zoomin-jax"
    assert (home / "pip-calls").read_text().splitlines() == ["install -q --upgrade pip", install, install]


def test_train_command(tmp_path):
    (line,) = dry_run("train", *SLICE, "--env", "TPU_STDERR_LOG_LEVEL=0", "--", "python", "-m", "zoomin_jax.train",
                      "--config=configs/demo_cpu.py", "--workdir=gs://my-runs/demo", tmp=tmp_path)
    script = (
        "set -e; "
        'pid=$(cat ~/zoomin-train.pid 2> /dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; '
        'then echo "error: training already runs on this worker (pid $pid): stop it first" >&2; exit 1; fi; '
        "export ZOOMIN_CLUSTER=auto TPU_STDERR_LOG_LEVEL=0; "
        "mkdir -p ~/zoomin-logs; "
        "cd ~/zoomin-jax; "
        "worker=$(curl -s -H 'Metadata-Flavor: Google' "
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); "
        'case "$worker" in ""|*[!0-9]*) '
        'echo "error: no TPU worker number from the metadata server" >&2; exit 1;; esac; '
        "setsid nohup ~/zoomin-venv/bin/python -m zoomin_jax.train --config=configs/demo_cpu.py "
        '--workdir=gs://my-runs/demo > ~/zoomin-logs/train-w"$worker".log 2>&1 < /dev/null & '
        'echo $! > ~/zoomin-train.pid; '
        'echo "worker $worker: started pid $(cat ~/zoomin-train.pid), log ~/zoomin-logs/train-w$worker.log"')
    assert line == f"{SSH} --worker=all --command {shlex.quote(script)}"


def test_train_check_compiles_here_first_and_refuses_a_run_that_does_not_fit(tmp_path):
    """--check: python -m zoomin_jax.aot for the command's config and overrides runs here before any
    gcloud; a level step over the target's HBM (64k regions a v5e chip) stops the launch."""
    config = ["--config=configs/demo_cpu.py:variant=region_only", "--config.data.batch_size.region=524288"]
    command = ["--", "python", "-m", "zoomin_jax.train", *config, "--workdir=gs://my-runs/demo"]
    check, ssh = dry_run("train", *SLICE, "--check", "v5e-8", *command, tmp=tmp_path)
    assert shlex.split(check) == [sys.executable, "-m", "zoomin_jax.aot", "--target=v5e-8", *config]
    assert ssh.startswith(SSH)
    result = launch("train", *SLICE, "--check", "v5e-8", *command, tmp=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "error: the region step does not fit the v5e-8's 16.00 GiB HBM per device" in result.stderr
    assert "a test ran gcloud" not in result.stderr


def test_train_quoting_on_a_worker(tmp_path):
    """The printed ssh line, its --command run by bash on a fake worker 3: the trainer gets exactly
    the argv given after `--`, detached, logging to train-w3.log, its pid kept for `stop`."""
    (line,) = dry_run("train", *SLICE, "--env", "XLA_FLAGS=--xla_a=1 --xla_b='x y'", "--env", "NOTE=it's",
                      "--", *TRAIN_ARGV, tmp=tmp_path)
    assert shlex.split(line)[:-1] == shlex.split(SSH) + ["--worker=all", "--command"]

    home, stubs = tmp_path / "home", tmp_path / "stubs"
    code = home / "zoomin-jax"
    # Files an unquoted `*` or gs:// glob would expand to, in the directory the trainer starts in.
    (code / "gs:" / "my-bucket").mkdir(parents=True)
    (code / "gs:" / "my-bucket" / "records-00000.array_record").write_text("")
    write_stub(stubs, "curl", "echo 3")  # the metadata server's agent-worker-number
    # Pass-through setsid and nohup that exec like the real ones (execvp: no `~` expansion, which
    # bash's own `exec` would do and so hide an unexpanded venv path).
    write_stub(stubs, "setsid", 'exec /usr/bin/env -- "$@"')
    write_stub(stubs, "nohup", 'exec /usr/bin/env -- "$@"')
    write_stub(home / "zoomin-venv" / "bin", "python", '''echo "$0" > "$HOME/program"
pwd > "$HOME/cwd"
echo $$ > "$HOME/stub-pid"
printf '%s\\n' "$ZOOMIN_CLUSTER" "$XLA_FLAGS" "$NOTE" > "$HOME/env"
echo "training on worker 3"
printf '%s\\n' "$@" > "$HOME/argv.partial" && mv "$HOME/argv.partial" "$HOME/argv"''')

    result = run_on_worker(remote_script(line), home, stubs)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while not (home / "argv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert (home / "argv").read_text().splitlines() == TRAIN_ARGV[1:]
    assert (home / "program").read_text().strip() == f"{home}/zoomin-venv/bin/python"
    assert (home / "cwd").read_text().strip() == str(code)
    assert (home / "env").read_text().splitlines() == ["auto", "--xla_a=1 --xla_b='x y'", "it's"]
    assert (home / "zoomin-logs" / "train-w3.log").read_text() == "training on worker 3\n"
    assert (home / "zoomin-train.pid").read_text() == (home / "stub-pid").read_text()
    assert "worker 3: started pid" in result.stdout


def test_train_refuses_while_a_run_is_alive(tmp_path):
    (line,) = dry_run("train", *SLICE, "--", "python", "-m", "zoomin_jax.train", tmp=tmp_path)
    home, stubs = tmp_path / "home", tmp_path / "stubs"
    home.mkdir()
    write_stub(stubs, "curl", "echo 0")
    running = subprocess.Popen(["sleep", "30"])
    try:
        (home / "zoomin-train.pid").write_text(f"{running.pid}\n")
        result = run_on_worker(remote_script(line), home, stubs)
        assert result.returncode == 1
        assert f"error: training already runs on this worker (pid {running.pid})" in result.stderr
        assert not (home / "zoomin-logs").exists()
    finally:
        running.kill()
        running.wait()


def test_stop(tmp_path):
    (line,) = dry_run("stop", *SLICE, tmp=tmp_path)
    script = ('set -e; pid=$(cat ~/zoomin-train.pid 2> /dev/null || true); if [ -n "$pid" ] && '
              'kill -0 "$pid" 2> /dev/null; then kill -TERM "$pid" && echo "sent SIGTERM to training pid $pid"; '
              'else echo "no training running"; fi')
    assert line == f"{SSH} --worker=all --command {shlex.quote(script)}"

    home, stubs = tmp_path / "home", tmp_path / "stubs"
    home.mkdir()
    stubs.mkdir()
    nothing = run_on_worker(script, home, stubs)  # never trained here: no pid file
    assert (nothing.returncode, nothing.stdout) == (0, "no training running\n")
    trainer = subprocess.Popen(["sleep", "30"])
    (home / "zoomin-train.pid").write_text(f"{trainer.pid}\n")
    stopped = run_on_worker(script, home, stubs)
    assert (stopped.returncode, stopped.stdout) == (0, f"sent SIGTERM to training pid {trainer.pid}\n")
    assert trainer.wait(timeout=10) == -signal.SIGTERM
    again = run_on_worker(script, home, stubs)  # the pid file outlives the run
    assert (again.returncode, again.stdout) == (0, "no training running\n")


def test_remote_scripts_pass_shellcheck(tmp_path):
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (requirements-test.txt has it)")
    lines = [dry_run("setup", *SLICE, "--gcsfuse-bucket", "my-data", tmp=tmp_path)[2],
             dry_run("train", *SLICE, "--env", "A=b", "--", *TRAIN_ARGV[:-3], tmp=tmp_path)[0],  # no '$HOME' (SC2016)
             dry_run("stop", *SLICE, tmp=tmp_path)[0], dry_run("logs", *SLICE, tmp=tmp_path)[0]]
    for line in lines:
        result = subprocess.run([shellcheck, "--shell=bash", "-"], input=remote_script(line), capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stdout


def test_logs(tmp_path):
    assert dry_run("logs", *SLICE, tmp=tmp_path) == [
        f"{SSH} --worker=0 --command 'tail -n 100 -f ~/zoomin-logs/train-w0.log'"]
    assert dry_run("logs", *SLICE, "--worker", "3", tmp=tmp_path) == [
        f"{SSH} --worker=3 --command 'tail -n 100 -f ~/zoomin-logs/train-w3.log'"]
    # gcloud copies from one worker at a time; the log names carry the worker number.
    assert dry_run("logs", *SLICE, "--fetch", "out/logs", "--num-workers", "4", tmp=tmp_path) == [
        "mkdir -p out/logs"] + [
        f"{SCP} 'zoomin-v5e:~/zoomin-logs/*' out/logs {LOCATION} --worker={worker}" for worker in range(4)]


def test_delete(tmp_path):
    assert dry_run("delete", *SLICE, tmp=tmp_path) == [
        f"gcloud compute tpus tpu-vm delete zoomin-v5e {LOCATION} --quiet"]
    assert dry_run("delete", *SLICE, "--queued", tmp=tmp_path) == [
        f"gcloud compute tpus queued-resources delete zoomin-v5e {LOCATION} --force --quiet"]


def test_usage_errors(tmp_path):
    missing = launch("create", "--name", "x", "--zone", "z", "--accelerator-type", "v4-8", "--runtime-version", "r",
                     "--dry-run", tmp=tmp_path)
    assert missing.returncode == 2
    assert "launch/tpu.py create: error: the following arguments are required: --project" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_command = launch("train", *SLICE, "--dry-run", tmp=tmp_path)
    assert no_command.returncode == 2 and "give the training command after `--`" in no_command.stderr
    bad_env = launch("train", *SLICE, "--env", "NO_VALUE", "--dry-run", "--", "python", tmp=tmp_path)
    assert bad_env.returncode == 2 and "'NO_VALUE': expected KEY=VALUE" in bad_env.stderr
    fetch = launch("logs", *SLICE, "--fetch", "logs", "--dry-run", tmp=tmp_path)
    assert fetch.returncode == 2 and "--fetch needs --num-workers" in fetch.stderr


def test_runs_the_printed_argv_and_reports_failures(tmp_path, monkeypatch):
    """Without --dry-run each command runs as printed (argv, no shell); a failure is one error line."""
    stubs = tmp_path / "stubs"
    write_stub(stubs, "gcloud", 'printf "%s\\0" "$@" > "$GCLOUD_ARGV"; exit "${GCLOUD_EXIT:-0}"')
    path = f"{stubs}:{os.environ['PATH']}"
    monkeypatch.setenv("GCLOUD_ARGV", str(tmp_path / "argv"))
    args = ("train", *SLICE, "--", *TRAIN_ARGV)
    (printed,) = dry_run(*args, tmp=tmp_path)
    ran = launch(*args, tmp=tmp_path, path=path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [printed]
    assert (tmp_path / "argv").read_bytes().split(b"\0")[:-1] == [word.encode() for word in shlex.split(printed)[1:]]

    monkeypatch.setenv("GCLOUD_EXIT", "3")
    failed = launch("delete", *SLICE, tmp=tmp_path, path=path)
    assert failed.returncode == 3
    assert failed.stderr.splitlines() == [
        f"error: command failed with exit status 3: gcloud compute tpus tpu-vm delete zoomin-v5e {LOCATION} --quiet"]
