"""The crash matrix: SIGKILL a saving process at random moments, restart, check what survived.

A driver process resumes from the workdir's newest sealed checkpoint (running heft's own restart
recovery first), then saves a ~16 MB train state at every step (`checkpoint_every=1`, async), so
a kill lands in orbax's write, in the commit, in custody's hashing and sealing, or in retention.
After each kill the trial records the newest step orbax had committed; the next driver must resume
from a sealed step no more than one interval older, and every sealed step must verify.

    python tests/crash.py [--trials 20] [--seed 0]   # prints the table for bench/RESULTS.md
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import workers

DRIVER = r'''
import json, os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 " + os.environ.get("XLA_FLAGS", "")
import jax, jax.numpy as jnp
from heft.configs import tiny
from heft.train import checkpoint

workdir = sys.argv[1]
c = tiny.get_config()
c.checkpoint.keep, c.checkpoint.keep_every = 2, 0
shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
          "params": {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)},
          "opt_state": {"mu": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
                        "nu": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}}
ckpt = checkpoint.Checkpointer(workdir, c, note=lambda text: print(text, flush=True))
resume = ckpt.latest()
if resume is None:
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
else:
    state, data = ckpt.restore(resume, shapes)
    assert data == {"consumed": int(state["step"])}, (data, int(state["step"]))
    assert float(state["params"]["w"][0, 0]) == int(state["step"])  # the payload is the step's own
print("resumed", int(state["step"]), flush=True)
advance = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s))
while True:
    state = advance(state)
    step = int(state["step"])
    ckpt.save(step, state, {"consumed": step})
    print("saved", step, flush=True)
'''


def _steps(directory: str) -> list:
    from heft.data import paths

    directory = paths.path(directory)
    if not directory.exists():
        return []
    return sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def committed_steps(directory: str) -> list[int]:
    from heft.train import checkpoint

    return [int(p.name) for p in _steps(directory) if checkpoint.committed(p)]


def verify_all(directory: str) -> tuple[list[int], list[str]]:
    """(sealed steps, problems): every sealed step checked against its manifest."""
    from heft.train import manifest

    sealed, problems = [], []
    for path in _steps(directory):
        d = path.name
        if manifest.is_sealed(path):
            try:
                manifest.verify(path)
                sealed.append(int(d))
            except manifest.CheckpointError as e:
                problems.append(str(e))
    return sealed, problems


def _start(workdir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, workdir], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, XLA_FLAGS=workers.xla_flags(None)))


def _read_until(proc, prefix: str, timeout: float) -> tuple[str, list[str]]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("driver exited:\n" + "".join(lines[-30:]))
        lines.append(line)
        if line.startswith(prefix):
            return line, lines
    raise TimeoutError(f"no {prefix!r} line in {timeout} s:\n" + "".join(lines[-30:]))


def run(workdir: str, trials: int = 20, seed: int = 0, interval: int = 1) -> list[dict]:
    """The matrix; returns one record per trial (raises AssertionError on the first broken promise)."""
    rng = random.Random(seed)
    directory = f"{workdir}/checkpoints"
    records, last_committed = [], None
    for trial in range(trials + 1):
        proc = _start(workdir)
        line, lines = _read_until(proc, "resumed", 120)
        resumed = int(line.split()[1])
        notes = [line.strip() for line in lines if line.startswith("heft:")]
        if last_committed is not None:
            records[-1].update(resumed=resumed, recovery=notes)
            assert resumed >= last_committed - interval, records[-1]
        if trial == trials:
            proc.kill()
            proc.wait()
            time.sleep(1)  # requests the driver sent before it died may still land on a remote store
            break
        _read_until(proc, "saved", 120)  # at least one save under way
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = committed_steps(directory)
        sealed, problems = verify_all(directory)
        assert not problems, problems
        last_committed = committed[-1] if committed else None
        records.append({"trial": trial, "killed_after_s": round(delay, 3), "newest_committed": last_committed,
                        "newest_sealed": sealed[-1] if sealed else None, "sealed": sealed})
        if last_committed is None:
            last_committed = 0
    return records


def table(records: list[dict]) -> str:
    rows = ["| trial | killed after (s) | newest committed | newest sealed at the kill | resumed from | restart did |",
            "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        did = "; ".join(re.sub(r" (in|from) \S*checkpoints", "", n).removeprefix("heft: ").split(":")[0]
                        for n in r.get("recovery", [])) or "nothing"
        rows.append(f"| {r['trial']} | {r['killed_after_s']} | {r['newest_committed']} | {r['newest_sealed']} | "
                    f"{r.get('resumed')} | {did} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/heft-crash-matrix")
    a = parser.parse_args()
    import shutil

    shutil.rmtree(a.workdir, ignore_errors=True)
    start = time.time()
    records = run(a.workdir, a.trials, a.seed)
    print(table(records))
    print(f"\n{len(records)} trials in {time.time() - start:.0f} s; every restart resumed from a sealed step "
          "no more than one interval older than the newest committed one, and every sealed step verified")
    print(json.dumps(records))


if __name__ == "__main__":
    main()
