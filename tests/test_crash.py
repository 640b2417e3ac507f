"""SIGKILL at random moments of save, seal and retention never costs more than one checkpoint interval."""

import subprocess

import crash
import pytest


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_from_a_complete_step_at_most_one_interval_old(tmp_path):
    workdir = str(tmp_path / "run")
    records = crash.run(workdir, trials=20, seed=1)  # asserts the promise after every kill
    assert len(records) == 20 and all("resumed" in r for r in records)
    # The kills landed in different phases: some restarts had an unfinished save to remove or an
    # unsealed one to seal (otherwise the matrix would test nothing).
    assert any(r["recovery"] for r in records), crash.table(records)
    r = subprocess.run(["heft", "verify", workdir], capture_output=True, text=True)
    assert r.returncode == 0 and "FAILED" not in r.stdout and "incomplete" not in r.stdout, r.stdout + r.stderr
