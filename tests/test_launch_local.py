"""`heft launch local`: two real processes on this machine train as one process does, and a Ctrl-C to
the launcher stops both at one step, saved."""

import json
import os
import signal
import subprocess
import time

import numpy as np
from test_train_loop import _heft, _metrics, _overrides


def _launch(workdir, args, steps):
    return subprocess.Popen(["heft", "launch", "local", "--processes=2", f"--workdir={workdir}",
                             *args, f"--config.train.steps={steps}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_local_processes_stop_together_on_ctrl_c_and_resume_to_the_losses_of_one_process(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # A constant rate after warmup: how many steps a run is given leaves every step's update alone.
    args = [a for a in _overrides(tmp_path, **{"train.eval_every": 1000, "train.checkpoint_every": 1000,
                                               "train.schedule": "constant"})
            if not a.startswith("--config.train.steps=")]  # each run gives its own
    launcher = _launch(two, args, steps=100000)  # 8 fake devices here (conftest): 4 per process
    metrics = os.path.join(two, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and '"loss"' in open(metrics).read()):
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does: the children have their own groups
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = int(out.split("[0] heft train: stopped at step ")[-1].split()[0])
    children = [line for line in out.splitlines() if not line.startswith("heft launch: ")]  # the launcher's notes
    assert all(line.startswith(("[0] ", "[1] ")) for line in children), children[:5]
    assert any(line.startswith("[1] ") for line in children)
    steps = sorted(int(d) for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit())
    assert steps == [stopped]  # both processes saved the same step together

    total = stopped + 3
    resumed = _launch(two, args, steps=total)
    # One process with 8 devices trains meanwhile (the corpus is prepared: both only read the cache).
    r = _heft(["train", f"--workdir={one}", *args, f"--config.train.steps={total}"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"[0] resumed from step {stopped}" in out and "[0] done:" in out
    assert r.returncode == 0, r.stderr[-3000:]
    a, _ = _metrics(one)
    b, _ = _metrics(two)
    np.testing.assert_allclose([b[s]["loss"] for s in range(1, total + 1)],
                               [a[s]["loss"] for s in range(1, total + 1)], rtol=1e-5)
    summary = json.loads(out.strip().splitlines()[-1].split("] ", 1)[1])
    assert summary["steps"] == total and summary["goodput"]["sessions"] == 2
