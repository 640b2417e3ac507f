"""A run whose workdir is a gs:// bucket (a local GCS API server): train, stop, resume, eval, verify;
and a save killed mid-write on GCS, which has no atomic rename, is never taken for a complete one."""

import json
import subprocess

import crash
import pytest
from test_train_loop import _heft, _overrides


def _gs_text(url: str) -> str:
    from etils import epath

    return epath.Path(url).read_text()


@pytest.mark.slow
def test_train_stop_resume_eval_and_verify_on_a_gcs_workdir(tmp_path, gcs):
    workdir = f"{gcs}/run"
    args = _overrides(tmp_path, steps=20, **{"train.checkpoint_every": 10, "train.eval_every": 10})
    r = _heft(["train", f"--workdir={workdir}", *args, "--stop_after=10"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped at step 10" in r.stdout
    r = _heft(["train", f"--workdir={workdir}", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 10" in r.stdout and "done:" in r.stdout
    rows = [json.loads(line) for line in _gs_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 21))
    assert any(row.get("resumed") for row in rows)
    from etils import epath

    events = [p.name for p in epath.Path(f"{workdir}/tensorboard").iterdir()]
    assert any(name.startswith("events.out.tfevents") for name in events), events

    r = _heft(["verify", workdir])
    assert r.returncode == 0 and [line[:3] for line in r.stdout.splitlines()] == ["ok "] * 2, r.stdout + r.stderr  # steps 10 and 20
    r = _heft(["eval", f"--checkpoint={workdir}", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["eval_loss"] > 0
    r = _heft(["train", f"--workdir={workdir}", *args])
    assert r.returncode == 0 and "already done" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.slow
def test_a_save_killed_mid_write_on_gcs_is_never_taken_for_complete(gcs):
    workdir = f"{gcs}/crash"
    records = crash.run(workdir, trials=3, seed=3)  # asserts a complete, recent step after every kill
    assert len(records) == 3
    r = subprocess.run(["heft", "verify", workdir], capture_output=True, text=True)
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout + r.stderr
