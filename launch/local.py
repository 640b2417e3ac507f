"""`heft launch local --processes=N`: N `heft train` processes on this machine, as N hosts would run.

Each process gets an equal share of fake CPU devices (XLA_FLAGS) and joins the others through a
coordinator on 127.0.0.1 at a free port (launch/distributed.py), with gloo collectives: the same
multi-host code paths as a pod, on one machine. Their output comes back line by line, prefixed by
process. The children run in their own process groups, so a Ctrl-C in the terminal reaches this
launcher alone, which passes it to each child once: every process then stops at the same step and
checkpoints (train/preemption.py). A second Ctrl-C kills them.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from heft.launch.job import Job, Step
from heft.model.checks import ConfigError

DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def default_devices(processes: int) -> int:
    """The fake devices this process was given (XLA_FLAGS), else one per process."""
    m = DEVICE_COUNT.search(os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _heft() -> list[str]:
    """How to run `heft`: the installed command, else this Python with heft's entry point."""
    return ["heft"] if shutil.which("heft") else [sys.executable, "-c", "from heft.launch.cli import main; main()"]


def environment(devices_each: int) -> dict:
    """What each process adds to its environment: its share of fake CPU devices (other XLA flags kept)."""
    flags = DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).split()
    return {"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_each}"]),
            "JAX_PLATFORMS": "cpu"}


def steps(job: Job, processes: int, devices: int, port: int | None = None) -> list[Step]:
    """One step per process (they run together, not in turn)."""
    if processes < 1:
        raise ConfigError(f"--processes={processes} must be at least 1")
    if devices % processes:
        raise ConfigError(f"--devices={devices} fake CPU devices do not split evenly over --processes={processes}; "
                          f"pass a multiple of {processes}")
    port = port or free_port()
    env = environment(devices // processes)
    prefix = [f"{k}={v}" for k, v in env.items()]
    out = []
    for i in range(processes):
        argv = [*_heft(), *job.train_argv()[1:], f"--coordinator=127.0.0.1:{port}",
                f"--num_processes={processes}", f"--process_id={i}"]
        out.append(Step(f"process {i} of {processes}, {devices // processes} fake CPU devices",
                        ["env", *prefix, *argv]))
    return out


def dry_run_text(step_list: list[Step]) -> str:
    """The processes as a shell script: each in the background, then wait for all (a local step reads no
    input, so its shell text ends with its command)."""
    lines = ["#!/bin/bash", "set -euo pipefail"]
    for s in step_list:
        lines.append(s.shell() + " &")
    return "\n".join(lines + ["wait"]) + "\n"


def run(step_list: list[Step], out=sys.stdout, grace_s: float = 120.0) -> int:
    """Runs the processes together, prefixing their output; returns the first non-zero exit code
    (0 if all succeed). One that fails stops the others (SIGTERM, then SIGKILL after `grace_s`)."""
    procs = [subprocess.Popen(s.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for s in step_list]
    lock = threading.Lock()

    def relay(i, proc):
        for line in proc.stdout:
            with lock:
                out.write(f"[{i}] {line}")
                out.flush()

    threads = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    signals = {"count": 0}

    def forward(signum, frame):
        signals["count"] += 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum if signals["count"] == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, failed_at = 0, None
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed and failed_at is None:
                failed_at, code = time.monotonic(), failed[0].returncode
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)  # a peer is gone: stop (and save, if they still can)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
        for t in threads:
            t.join()
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
