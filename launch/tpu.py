"""Drive a Cloud TPU VM pod slice with gcloud: create, set up, train, watch, stop, delete.

Every worker of a slice runs the same command (docs/design.md §11); jax.distributed.initialize() finds
its peers on a pod by itself, so a launch is "the same command on --worker=all". Each subcommand
builds plain gcloud argv lists; --dry-run prints them (one per line, shell-quoted) and runs
nothing. Run from the repository root. A v5e-16 slice (4 workers x 4 chips), start to end:

  N="--name zoomin-v5e --zone us-west4-a --project my-project"
  python launch/tpu.py create $N --accelerator-type v5litepod-16 \\
      --runtime-version v2-alpha-tpuv5-lite --spot --queued
  # a queued request is granted later: wait for ACTIVE in
  #   gcloud compute tpus queued-resources describe zoomin-v5e --zone us-west4-a --project my-project
  python launch/tpu.py setup $N --gcsfuse-bucket my-data      # code (git HEAD), venv, jax[tpu], /mnt/my-data
  python launch/tpu.py train $N --check v5e-16 -- python -m zoomin_jax.train --workdir=gs://my-runs/vitl14 \\
      --config=configs/zoomin_vitl14.py:init=/mnt/my-data/bmc_clip,records='/mnt/my-data/recs/records-*.array_record'
  python launch/tpu.py logs $N                                # tail -f of worker 0 (--worker 3: worker 3)
  python launch/tpu.py logs $N --fetch logs/ --num-workers 4  # every worker's log, copied here
  python launch/tpu.py stop $N                                # SIGTERM: the trainer checkpoints and exits
  python launch/tpu.py delete $N --queued

A v4-32 slice is the same with --accelerator-type v4-32 --runtime-version tpu-ubuntu2204-base
(also 4 workers). Training data is read through the gcsfuse mount; the workdir (checkpoints,
metrics, TensorBoard) is a gs:// path. Rerunning `train` after `stop`, or on a re-created slice
after a Spot preemption (create, setup, train), resumes from the workdir's latest checkpoint.
`setup` ships the committed HEAD: commit first.
gcloud reaches several workers at once only with its key in ssh-agent
(`eval "$(ssh-agent)"; ssh-add ~/.ssh/google_compute_engine`).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Paths on the workers. `~` stays unquoted in the remote scripts so the worker's shell expands it.
REMOTE_TARBALL = "~/zoomin-jax.tar.gz"
CODE_DIR = "~/zoomin-jax"
VENV_DIR = "~/zoomin-venv"
VENV_PYTHON = f"{VENV_DIR}/bin/python"
LOG_DIR = "~/zoomin-logs"
PID_FILE = "~/zoomin-train.pid"  # outside LOG_DIR, so fetching '~/zoomin-logs/*' gets logs only
# Set by the TPU runtime on every worker of a slice: 0 .. workers-1.
WORKER_NUMBER_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
                     "agent-worker-number")

TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED_RESOURCES = ["gcloud", "compute", "tpus", "queued-resources"]


def location_flags(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def ssh_argv(args, remote_script: str, worker: str = "all") -> list[str]:
    """`gcloud ... tpu-vm ssh` running one shell script on the chosen worker(s). gcloud splits the
    --command string on spaces and ssh joins the pieces with spaces again, so the worker's login
    shell (bash) gets the string unchanged: keep it on one line (no newlines or tabs)."""
    return [*TPU_VM, "ssh", args.name, *location_flags(args), f"--worker={worker}", "--command", remote_script]


def scp_argv(args, source: str, destination: str, worker: str = "all") -> list[str]:
    return [*TPU_VM, "scp", source, destination, *location_flags(args), f"--worker={worker}"]


def remote_script(*steps: str) -> str:
    """One line of shell: stop at the first failing step. Each step is a complete command list."""
    return "; ".join(["set -e", *steps])


def jax_version(requirements: Path = REPO_ROOT / "requirements.txt") -> str:
    """The `jax==V` pin, so the workers get the jax[tpu] that matches the code."""
    match = re.search(r"^jax==(\S+)", requirements.read_text(), flags=re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: {requirements} has no `jax==VERSION` pin")
    return match.group(1)


def create_commands(args) -> list[list[str]]:
    if args.queued:
        # A queued resource waits for capacity and then creates node NAME; the tpu-vm commands
        # (ssh, scp) address that node by the same name.
        argv = [*QUEUED_RESOURCES, "create", args.name, f"--node-id={args.name}", *location_flags(args),
                f"--accelerator-type={args.accelerator_type}", f"--runtime-version={args.runtime_version}"]
    else:
        argv = [*TPU_VM, "create", args.name, *location_flags(args),
                f"--accelerator-type={args.accelerator_type}", f"--version={args.runtime_version}"]
    if args.spot:
        argv.append("--spot")  # both commands take --spot (tpu-vm's older --preemptible is not used)
    return [argv]


def apt_install(*packages: str) -> str:
    # Fresh TPU VMs run unattended-upgrades at boot: wait for the dpkg lock instead of failing.
    return ("sudo apt-get -qq -o DPkg::Lock::Timeout=600 update && "
            f"sudo apt-get -qq -o DPkg::Lock::Timeout=600 install -y {' '.join(packages)}")


def gcsfuse_steps(bucket: str, mount_point: str) -> list[str]:
    mount = shlex.quote(mount_point)
    repo_line = ('deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
                 'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main')
    install = (f'echo "{repo_line}" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && '
               'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg '
               '| sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null && ' + apt_install("gcsfuse"))
    return [
        f"command -v gcsfuse > /dev/null || {{ {install}; }}",
        # Mount once: a second gcsfuse on a mounted point fails, and re-running setup must not.
        f"mountpoint -q {mount} || {{ sudo mkdir -p {mount} && sudo chown \"$USER\" {mount} && "
        f"gcsfuse --implicit-dirs -o ro {shlex.quote(bucket)} {mount}; }}",
    ]


def setup_commands(args) -> list[list[str]]:
    tarball = os.path.join(tempfile.gettempdir(), f"zoomin-jax-{args.name}.tar.gz")
    python = shlex.quote(args.python)
    steps = [
        # TPU runtime images are Ubuntu 22.04 (Python 3.10); the pins need Python 3.11.
        f"{python} -c 'import ensurepip' 2> /dev/null || {{ {apt_install(python, python + '-venv')}; }}",
    ]
    if args.gcsfuse_bucket:
        steps += gcsfuse_steps(args.gcsfuse_bucket, args.mount_point or f"/mnt/{args.gcsfuse_bucket}")
    steps += [
        # Unpack next to the old tree, then swap by renames: no stale files survive a re-run and a
        # failed unpack leaves the previous code in place.
        f"rm -rf {CODE_DIR}.new {CODE_DIR}.old && mkdir {CODE_DIR}.new && tar -xzf {REMOTE_TARBALL} -C {CODE_DIR}.new",
        f"if [ -d {CODE_DIR} ]; then mv {CODE_DIR} {CODE_DIR}.old; fi && mv {CODE_DIR}.new {CODE_DIR} && "
        f"rm -rf {CODE_DIR}.old {REMOTE_TARBALL}",
        f"mkdir -p {LOG_DIR}",
        f"[ -x {VENV_PYTHON} ] || {{ {python} -m venv {VENV_DIR} && {VENV_DIR}/bin/pip install -q --upgrade pip; }}",
        # The package with its pins (pyproject.toml reads requirements.txt) plus the TPU jax, in one
        # pip command; editable, so the next setup's code swap needs no reinstall of the package.
        f"{VENV_DIR}/bin/pip install -q {shlex.quote(f'jax[tpu]=={jax_version()}')} -e {CODE_DIR}",
    ]
    return [
        ["git", "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
        scp_argv(args, tarball, f"{args.name}:{REMOTE_TARBALL}"),
        ssh_argv(args, remote_script(*steps)),
    ]


def check_command(train_argv: list[str], target: str) -> list[str]:
    """`python -m zoomin_jax.aot` on this machine for the training command's config and --config.*
    overrides: it exits non-zero, with its table, when a level's step does not fit `target`."""
    config = [arg for n, arg in enumerate(train_argv)
              if arg.startswith("--config") or (n and train_argv[n - 1] == "--config")]
    if not config:
        raise SystemExit("error: --check needs the training command's --config=... to compile it")
    return [sys.executable, "-m", "zoomin_jax.aot", f"--target={target}", *config]


def train_commands(args, train_argv: list[str]) -> list[list[str]]:
    """Start `train_argv` detached on every worker: one log per worker, the pid kept for `stop`;
    with --check, first the compile check here, which stops the launch when a step does not fit."""
    program, *rest = train_argv
    if re.fullmatch(r"python[0-9.]*", program):
        program = VENV_PYTHON  # unquoted: `~` must expand on the worker
    else:
        program = shlex.quote(program)
    # Each argument quoted on its own: commas, quotes, spaces and a gs://...-*.array_record glob
    # reach the trainer exactly as given, never expanded by the worker's shell.
    command = " ".join([program, *map(shlex.quote, rest)])
    environment = ["ZOOMIN_CLUSTER=auto", *args.env]  # auto: jax.distributed.initialize() with no arguments
    log = f'{LOG_DIR}/train-w"$worker".log'
    script = remote_script(
        f'pid=$(cat {PID_FILE} 2> /dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; '
        f'then echo "error: training already runs on this worker (pid $pid): stop it first" >&2; exit 1; fi',
        "export " + " ".join(map(shlex.quote, environment)),
        f"mkdir -p {LOG_DIR}",
        f"cd {CODE_DIR}",
        f"worker=$(curl -s -H 'Metadata-Flavor: Google' {WORKER_NUMBER_URL})",
        'case "$worker" in ""|*[!0-9]*) echo "error: no TPU worker number from the metadata server" >&2; exit 1;; esac',
        # setsid + nohup + all three streams redirected: the run survives the ssh session, and ssh
        # returns at once. Without job control the background child is no group leader, so setsid
        # execs in place and $! is the trainer's own pid.
        f"setsid nohup {command} > {log} 2>&1 < /dev/null & echo $! > {PID_FILE}",
        f'echo "worker $worker: started pid $(cat {PID_FILE}), log {LOG_DIR}/train-w$worker.log"',
    )
    return [*([check_command(train_argv, args.check)] if args.check else []), ssh_argv(args, script)]


def logs_commands(args) -> list[list[str]]:
    if args.fetch is None:
        return [ssh_argv(args, f"tail -n 100 -f {LOG_DIR}/train-w{args.worker}.log", worker=str(args.worker))]
    # gcloud's tpu-vm scp refuses --worker=all when copying to the client ("cannot target multiple
    # workers while copying files to client"), so fetch worker by worker; the log names carry the
    # worker number, so the copies do not overwrite each other in DIR.
    return [["mkdir", "-p", args.fetch]] + [
        scp_argv(args, f"{args.name}:{LOG_DIR}/*", args.fetch, worker=str(worker))
        for worker in range(args.num_workers)]


def stop_commands(args) -> list[list[str]]:
    # SIGTERM to the trainer only (not its process group): it saves a checkpoint and exits, and
    # its data workers must live until then.
    script = remote_script(
        f'pid=$(cat {PID_FILE} 2> /dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; '
        'then kill -TERM "$pid" && echo "sent SIGTERM to training pid $pid"; '
        'else echo "no training running"; fi')
    return [ssh_argv(args, script)]


def delete_commands(args) -> list[list[str]]:
    if args.queued:
        # --force deletes the queued resource's node too.
        return [[*QUEUED_RESOURCES, "delete", args.name, *location_flags(args), "--force", "--quiet"]]
    return [[*TPU_VM, "delete", args.name, *location_flags(args), "--quiet"]]


def env_assignment(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", text, flags=re.DOTALL):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", required=True)
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    summary, example = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=summary, epilog=example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    create = commands.add_parser("create", parents=[common], help="create the slice")
    create.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32")
    create.add_argument("--runtime-version", required=True, help="e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base")
    create.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, may be preempted")
    create.add_argument("--queued", action="store_true", help="request through a queued resource")

    setup = commands.add_parser("setup", parents=[common], help="ship the code, make the venv (every worker)")
    setup.add_argument("--python", default="python3.11", help="interpreter for the venv (installed if missing)")
    setup.add_argument("--gcsfuse-bucket", help="data bucket to mount read-only with gcsfuse")
    setup.add_argument("--mount-point", help="where to mount it (default /mnt/BUCKET)")

    train = commands.add_parser("train", parents=[common], help="start `-- COMMAND ...` on every worker",
                                usage="launch/tpu.py train --name N --zone Z --project P [--env KEY=VALUE ...] "
                                      "[--check TARGET] [--dry-run] -- python -m zoomin_jax.train ...")
    train.add_argument("--env", action="append", default=[], type=env_assignment, metavar="KEY=VALUE",
                       help="environment for the run (repeatable)")
    train.add_argument("--check", metavar="TARGET",
                       help="first compile the run's steps here for TARGET (e.g. v5e-64; zoomin_jax.targets) and "
                            "start nothing if one does not fit (needs the aot extra: pip install -e '.[aot]')")

    logs = commands.add_parser("logs", parents=[common], help="follow one worker's log, or fetch all")
    logs.add_argument("--worker", type=int, default=0, help="worker to follow (default 0)")
    logs.add_argument("--fetch", metavar="DIR", help="copy every worker's logs into DIR instead")
    logs.add_argument("--num-workers", type=int, help="workers in the slice (with --fetch), e.g. 4 for v5litepod-16")

    commands.add_parser("stop", parents=[common], help="SIGTERM the training on every worker")

    delete = commands.add_parser("delete", parents=[common], help="delete the slice")
    delete.add_argument("--queued", action="store_true", help="it was created with --queued")
    for subparser in commands.choices.values():
        subparser.set_defaults(fail=subparser.error)  # usage errors name the subcommand
    return parser


def run(commands: list[list[str]]) -> None:
    for argv in commands:
        line = shlex.join(argv)
        print(line, flush=True)
        try:
            subprocess.run(argv, check=True, cwd=REPO_ROOT)
        except FileNotFoundError:
            raise SystemExit(f"error: {argv[0]} not found on PATH, needed for: {line}")
        except subprocess.CalledProcessError as failure:
            print(f"error: command failed with exit status {failure.returncode}: {line}", file=sys.stderr)
            raise SystemExit(failure.returncode if failure.returncode > 0 else 1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first `--` is the training command, untouched by argparse.
    train_argv: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_argv = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)

    if args.subcommand == "train":
        if not train_argv:
            args.fail("give the training command after `--`, e.g. -- python -m zoomin_jax.train ...")
        commands = train_commands(args, train_argv)
    elif train_argv:
        args.fail("only `train` takes a command after `--`")
    elif args.subcommand == "logs":
        if args.fetch is not None and not args.num_workers:
            args.fail("--fetch needs --num-workers (gcloud copies from one worker at a time)")
        commands = logs_commands(args)
    else:
        commands = {"create": create_commands, "setup": setup_commands, "stop": stop_commands,
                    "delete": delete_commands}[args.subcommand](args)

    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return
    try:
        run(commands)
    except KeyboardInterrupt:  # Ctrl-C ends `logs` (tail -f)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
