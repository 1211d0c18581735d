"""Local multi-process launcher: one JAX process per GPU on this host, or N CPU processes for tests.

  python launch/gpu_local.py -- python -m zoomin_jax.train --config=configs/X.py:ARGS --workdir=DIR
  python launch/gpu_local.py --gpus 0,1 -- python -m zoomin_jax.train ...      # these GPUs only
  python launch/gpu_local.py --one-process -- python -m zoomin_jax.train ...   # one process, every GPU
  python launch/gpu_local.py --processes 2 --cpu-devices 4 -- python -m zoomin_jax.train ...   # CPU

Each process runs the same command with CUDA_VISIBLE_DEVICES set to its own GPU (or, with
--cpu-devices K, K virtual CPU devices) and ZOOMIN_COORDINATOR / ZOOMIN_NUM_PROCESSES /
ZOOMIN_PROCESS_ID, which `zoomin_jax.sharding.initialize_distributed` hands to
jax.distributed.initialize: process 0 hosts the coordinator on 127.0.0.1. This is the same training
entry point the TPU and SLURM launchers run; the launcher only starts, prefixes and watches.

Output: every line of process i is printed as "[i] line" and kept in LOG_DIR/process_i.log.
Failure: when a process dies, JAX's coordination service stops the others within the heartbeat
timeout (--heartbeat-timeout); the launcher names who died first and how, kills any process still
running after that timeout plus a grace period, and exits 1. SIGTERM or Ctrl-C to the launcher is
passed to every process (the trainer then saves a checkpoint and exits 0).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE_S = 30  # after the heartbeat timeout, for the survivors' own error exit to finish


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """This host's GPUs as CUDA_VISIBLE_DEVICES names: the variable's own list, else nvidia-smi's."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return listing.split()


def process_envs(args) -> list[dict[str, str]]:
    """The environment each process adds to the launcher's."""
    if args.cpu_devices:
        count = args.processes or 1
        devices = [{"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.cpu_devices}"}
                   ] * count
    elif args.one_process:
        devices = [{"CUDA_VISIBLE_DEVICES": ",".join(args.gpus)}] if args.gpus else [{}]
    else:
        gpus = args.gpus or visible_gpus()
        if not gpus:
            raise SystemExit("error: no GPU found (nvidia-smi lists none and CUDA_VISIBLE_DEVICES is unset); "
                             "pass --gpus, or --cpu-devices K for CPU processes")
        if args.processes and args.processes != len(gpus):
            raise SystemExit(f"error: --processes {args.processes} does not match the {len(gpus)} GPUs "
                             f"({','.join(gpus)}); one process drives one GPU")
        devices = [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus]
    if len(devices) == 1:
        return devices
    port = args.port or free_port()
    return [device | {"ZOOMIN_COORDINATOR": f"127.0.0.1:{port}", "ZOOMIN_NUM_PROCESSES": str(len(devices)),
                      "ZOOMIN_PROCESS_ID": str(index), "ZOOMIN_HEARTBEAT_TIMEOUT_S": str(args.heartbeat_timeout)}
            for index, device in enumerate(devices)]


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


class Process:
    """One launched process: its output copied line by line to the console (prefixed) and its log."""

    def __init__(self, index: int, command: list[str], env: dict[str, str], log_dir: Path):
        self.index = index
        self.log = open(log_dir / f"process_{index}.log", "w")
        self.popen = subprocess.Popen(command, env=os.environ | env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.copier = threading.Thread(target=self._copy, daemon=True)
        self.copier.start()

    def _copy(self) -> None:
        for line in self.popen.stdout:
            self.log.write(line)
            self.log.flush()
            sys.stdout.write(f"[{self.index}] {line}")
            sys.stdout.flush()

    def finish(self) -> int:
        self.copier.join()
        self.log.close()
        return self.popen.returncode


def launch(command: list[str], envs: list[dict[str, str]], log_dir: Path, heartbeat_timeout: int) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, env in enumerate(envs):
        processes.append(Process(index, command, env, log_dir))
        print(f"launch: started process {index} (pid {processes[-1].popen.pid}) with "
              f"{' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)

    def forward(signum, frame):
        for process in processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    first_failure, failed_at, running = None, None, set(range(len(processes)))
    while running:
        time.sleep(0.2)
        for process in [processes[i] for i in sorted(running)]:
            returncode = process.popen.poll()
            if returncode is None:
                continue
            running.discard(process.index)
            if returncode == 0:
                print(f"launch: process {process.index} finished", flush=True)
            elif first_failure is None:
                first_failure, failed_at = process.index, time.monotonic()
                print(f"launch: error: process {process.index} {exit_reason(returncode)}; the other processes "
                      f"stop when JAX notices it is gone (heartbeat timeout {heartbeat_timeout} s)", flush=True)
            else:
                print(f"launch: process {process.index} {exit_reason(returncode)}, "
                      f"{time.monotonic() - failed_at:.0f} s after process {first_failure} failed", flush=True)
        if first_failure is not None and running and time.monotonic() - failed_at > heartbeat_timeout + GRACE_S:
            for index in sorted(running):
                print(f"launch: error: process {index} still runs {heartbeat_timeout + GRACE_S} s after process "
                      f"{first_failure} failed; killing it", flush=True)
                processes[index].popen.kill()
            heartbeat_timeout = float("inf")  # kill once; the loop then collects their exits
    codes = [process.finish() for process in processes]
    if first_failure is not None:
        print(f"launch: error: process {first_failure} failed first ({exit_reason(codes[first_failure])}); see "
              f"{log_dir}/process_{first_failure}.log. Rerun the same command to resume from the last checkpoint.",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/gpu_local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=lambda text: text.split(","), help="GPU ids, e.g. 0,1,2,3 (default: all)")
    parser.add_argument("--one-process", action="store_true", help="one process driving every GPU")
    parser.add_argument("--processes", type=int, help="process count (with --cpu-devices; default: one per GPU)")
    parser.add_argument("--cpu-devices", type=int, help="CPU processes with this many virtual devices each")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--heartbeat-timeout", type=int, default=60,
                        help="seconds after which JAX stops the others when a process died (default 60)")
    parser.add_argument("--log-dir", default="logs/local", help="where process_i.log go (default logs/local)")
    parser.add_argument("--dry-run", action="store_true", help="print each process's environment and command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m zoomin_jax.train --config=... --workdir=...")
    if command[0] in ("python", "python3"):
        command = [sys.executable, *command[1:]]  # the launcher's own interpreter (its venv)
    envs = process_envs(args)
    if args.dry_run:
        for env in envs:
            print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *command]))
        return 0
    return launch(command, envs, Path(args.log_dir), args.heartbeat_timeout)


if __name__ == "__main__":
    sys.exit(main())
