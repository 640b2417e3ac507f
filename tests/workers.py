"""The hosts of a pod, simulated: several local processes joined by JAX's multi-host runtime on
127.0.0.1 (the CPU's collectives are gloo's).

A worker script reads `port, process_id, *args` from its argv and joins with
`jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=N, process_id=int(process_id))`.
"""

import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEVICES = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None) -> str:
    """This process's XLA_FLAGS (the tests' LLVM level, say) with `devices` fake CPU devices, or with
    no device count (None: a worker sets its own). A subprocess given them compiles as the tests' own
    processes do, and shares their entries in the compilation cache."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
    return " ".join(([f"{_DEVICES}={devices}"] if devices else []) + kept)


def run(tmp_path, source: str, args=(), env=lambda i: {}, count: int = 2, timeout: int = 240) -> list[str]:
    """Runs the worker `source` as `count` processes; returns their standard outputs, once all exit 0.

    `env(i)`: process i's changes to this environment (None removes a variable). XLA_FLAGS is passed
    on without a device count: each worker puts its own in front before importing jax. The tests' folder is on
    PYTHONPATH, so a worker may import a test module's helpers.
    """
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(source)
    procs = []
    for i in range(count):
        e = dict(os.environ, XLA_FLAGS=xla_flags(None))
        e["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, e.get("PYTHONPATH")) if p)
        for k, v in env(i).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        procs.append(subprocess.Popen([sys.executable, str(script), str(port), str(i), *map(str, args)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    failed = [f"process {i} exited {p.returncode}:\n{outs[i][1][-3000:]}" for i, p in enumerate(procs) if p.returncode]
    assert not failed, "\n".join(failed)
    return [out for out, _ in outs]
