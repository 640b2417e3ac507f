"""A disk that fills up mid-run: one line, a non-zero exit, and the newest complete checkpoint intact.

The workdir is a 2.5 MB tmpfs mounted in a private mount namespace (`unshare --user --mount`, no
root needed), where one checkpoint of the test model (~1.2 MB) fits and a second does not.
"""

import os
import shutil
import subprocess

import pytest

from test_train_loop import _overrides

SCRIPT = """
set -u
mount -t tmpfs -o size=2500k tmpfs {mnt}
heft train --workdir={mnt}/run {args} > {out}/train.out 2> {out}/train.err
echo $? > {out}/train.rc
heft verify {mnt}/run > {out}/verify.out 2>&1
echo $? > {out}/verify.rc
cp -r {mnt}/run {out}/run
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare --user --mount (a private tmpfs)")
def test_full_disk_stops_in_one_line_and_keeps_the_newest_complete_checkpoint(tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = " ".join(_overrides(tmp_path, steps=30, **{"train.checkpoint_every": 5, "train.eval_every": 1000}))
    script = SCRIPT.format(mnt=mnt, out=out, args=args)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], timeout=600, check=True)
    rc, err = int((out / "train.rc").read_text()), (out / "train.err").read_text()
    assert rc != 0
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0] == ("heft train: no space left on tmpfs (mounted at " f"{mnt}) while saving step 10; the newest "
                        "complete checkpoint is step 5"), lines[0]
    assert int((out / "verify.rc").read_text()) == 0, (out / "verify.out").read_text()
    assert "ok" in (out / "verify.out").read_text() and "step 5" in (out / "verify.out").read_text()
    assert sorted(os.listdir(out / "run" / "checkpoints")) == ["5"]
