"""Goodput across restarts: every session's start-up, compilation, saves and training are timed into
metrics.jsonl, and steps trained again after a restart count as lost."""

import json
import os
import shutil
import time

import pytest
from test_train_loop import _heft, _overrides

from heft.train import goodput


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_run_stopped_then_resumed_before_its_last_save_counts_the_redone_steps_as_lost(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["train", f"--workdir={workdir}",
            *_overrides(tmp_path, steps=10, **{"train.checkpoint_every": 5, "train.eval_every": 100})]
    start = time.time()
    first = _heft([*args, "--stop_after=8"])
    first_wall = time.time() - start
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 8" in first.stdout and "goodput " in first.stdout
    trained = {r["step"]: r["train_s"] for r in _rows(workdir) if "train_s" in r}
    assert sorted(trained) == list(range(1, 9))
    # The save at step 8 is lost, as when a preemption kills a host before the save commits: the next
    # session resumes from step 5 and trains 6, 7 and 8 again.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))

    start = time.time()
    second = _heft(args)
    second_wall = time.time() - start
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 5" in second.stdout + second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])["goodput"]
    rows = _rows(workdir)
    resumed = next(r for r in rows if r.get("resumed"))
    assert resumed["step"] == 5 and resumed["redone_steps"] == 3
    assert resumed["redone_s"] == pytest.approx(trained[6] + trained[7] + trained[8])
    assert result["redone_steps"] == 3 and result["redone_s"] == pytest.approx(resumed["redone_s"])
    assert result["sessions"] == 2 and min(result[k] for k in goodput.KINDS if k != "eval_s") > 0
    # Every session's timed phases fit in the wall time the test measured around its process.
    sessions = [r for r in rows if "startup_s" in r]
    assert [r["step"] for r in sessions] == [0, 5]
    assert sessions[0]["startup_s"] + sessions[0]["compile_s"] + sum(trained.values()) < first_wall
    assert sessions[1]["startup_s"] + sessions[1]["compile_s"] < second_wall
    kept = sum(r["train_s"] for r in rows if "train_s" in r)  # steps 1-5, then 6-10 of the second session
    assert result["train_s"] == pytest.approx(kept)
    assert result["goodput"] == pytest.approx(kept / result["total_s"]) and 0 < result["goodput"] < 1
    assert f"goodput {100 * result['goodput']:.1f}%" in second.stdout and "redone steps" in second.stdout


def test_a_stop_between_metrics_rows_times_the_steps_since_the_last_row(tmp_path):
    """A preemption rarely comes at a logged step: the steps after the last metrics row are trained and
    saved, so their time is training kept, in the stop's row (else goodput would leave them out)."""
    workdir = str(tmp_path / "run")
    r = _heft(["train", f"--workdir={workdir}", "--stop_after=6",
               *_overrides(tmp_path, steps=10, **{"train.log_every": 4, "train.checkpoint_every": 100})])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped at step 6" in r.stdout
    rows = _rows(workdir)
    trained = {row["step"]: row["train_s"] for row in rows if "train_s" in row}
    assert sorted(trained) == [4, 6] and trained[6] > 0, rows
    stop = next(row for row in rows if row["step"] == 6)
    assert stop["checkpoint_s"] > 0 and "loss" not in stop  # a ledger row, not a metrics row
    assert goodput.summarize(rows)["train_s"] == pytest.approx(trained[4] + trained[6])
