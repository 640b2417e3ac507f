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


PRIVATE_MOUNTS = ["unshare", "--user", "--map-root-user", "--mount"]  # a namespace where mount needs no root


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run([*PRIVATE_MOUNTS, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


def _in_private_mounts(script: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs a bash script that mounts its own small tmpfs."""
    return subprocess.run([*PRIVATE_MOUNTS, "bash", "-c", script], timeout=600, **kwargs)


@pytest.mark.skipif(not _can_mount(), reason="needs unshare --user --mount (a private tmpfs)")
def test_full_disk_stops_in_one_line_and_keeps_the_newest_complete_checkpoint(tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = " ".join(_overrides(tmp_path, steps=30, **{"train.checkpoint_every": 5, "train.eval_every": 1000}))
    script = SCRIPT.format(mnt=mnt, out=out, args=args)
    _in_private_mounts(script, check=True)
    rc, err = int((out / "train.rc").read_text()), (out / "train.err").read_text()
    assert rc != 0
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, (rc, err[-3000:], (out / "train.out").read_text()[-3000:])
    assert lines[0] == ("heft train: no space left on tmpfs (mounted at " f"{mnt}) while saving step 10; the newest "
                        "complete checkpoint is step 5"), lines[0]
    assert int((out / "verify.rc").read_text()) == 0, (out / "verify.out").read_text()
    assert "ok" in (out / "verify.out").read_text() and "step 5" in (out / "verify.out").read_text()
    assert sorted(os.listdir(out / "run" / "checkpoints")) == ["5"]


def test_orphaned_write_errors_of_a_full_disk_are_not_printed(caplog):
    """orbax's other failed writes are garbage-collected unretrieved; asyncio would log a traceback for each
    (the flake this test pins: the one-line error above came with a page of them)."""
    import asyncio
    import errno
    import gc

    from heft.train import quiet

    quiet.failed_save_echoes()

    async def fail(error):
        raise error

    def orphan(error):
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(error))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()

    with caplog.at_level("ERROR", logger="asyncio"):
        orphan(OSError(errno.ENOSPC, "No space left on device"))
        orphan(ValueError("RESOURCE_EXHAUSTED: Failed to write 91209 bytes: No space left on device"))
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        orphan(ValueError("a real bug"))
    assert [r for r in caplog.records if "never retrieved" in r.getMessage()], "other orphaned errors still print"


def test_a_step_whose_seal_lost_the_race_for_space_is_sealed_once_the_failed_save_is_gone(tmp_path, monkeypatch):
    """Step 1 committed, then its seal failed because the next save filled the disk: once that save's
    files are removed, step 1 is sealed and named as the newest complete checkpoint (it was called
    'none' before, and left for the next start)."""
    import errno

    from test_checkpoint import _config

    from heft.train import checkpoint, custody, manifest, sharding
    from heft.train import state as train_state

    c = _config()
    state = train_state.init(c, sharding.make_mesh(c))
    real, calls = custody.seal, []

    def full_once(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(custody, "seal", full_once)
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    ckpt.save(1, state, {"consumed": 8})
    ckpt.wait()
    ckpt.custodian.queue.put(None)
    ckpt.custodian.thread.join()
    error = ckpt.custodian.error
    assert error is not None and not manifest.is_sealed(ckpt.step_dir(1))
    message = str(ckpt.out_of_space(error))
    assert message.endswith("while saving step 1; the newest complete checkpoint is step 1"), message
    assert manifest.verify(str(ckpt.step_dir(1)))["step"] == 1


def test_a_committed_step_left_unsealed_is_named_as_what_a_restart_resumes_from(tmp_path, monkeypatch):
    """What the one-line report of a lost process names (Checkpointer.newest_complete): a committed step
    whose seal had not happened is what the next start seals and resumes from."""
    from test_checkpoint import _config

    from heft.train import checkpoint, custody, sharding
    from heft.train import state as train_state

    c = _config()
    state = train_state.init(c, sharding.make_mesh(c))
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    assert ckpt.newest_complete() == "none yet"
    ckpt.save(1, state, {"consumed": 8})
    ckpt.close()
    assert checkpoint.Checkpointer(str(tmp_path), c).newest_complete() == "step 1"

    def never(*args, **kwargs):
        raise TimeoutError("the other processes never reported their hashes")

    monkeypatch.setattr(custody, "seal", never)
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    ckpt.save(2, state, {"consumed": 16})
    ckpt.wait()
    assert ckpt.newest_complete() == "step 2 (saved; the next start seals it)"


EXPORT = """
set -u
mount -t tmpfs -o size=200k tmpfs {mnt}
heft export --checkpoint={run} --out={mnt}/params > {out}/export.out 2> {out}/export.err
echo $? > {out}/export.rc
heft convert --to_hf={run} --out={mnt}/hf > {out}/convert.out 2> {out}/convert.err
echo $? > {out}/convert.rc
ls -A {mnt} > {out}/left.txt
"""


@pytest.mark.skipif(not _can_mount(), reason="needs unshare --user --mount (a private tmpfs)")
def test_exports_to_a_full_disk_are_one_line_and_leave_nothing_half_written(tmp_path, tiny_run):
    mnt, out, run = tmp_path / "mnt", tmp_path / "out", tmp_path / "run"
    mnt.mkdir()
    out.mkdir()
    shutil.copytree(tiny_run[0], run)  # a trained run: 0.46 MB of parameters, more than the 200 KB disk holds
    script = EXPORT.format(mnt=mnt, out=out, run=run)
    r = _in_private_mounts(script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    err = (out / "export.err").read_text()
    assert int((out / "export.rc").read_text()) != 0
    assert err.strip() == (f"heft export: no space left on tmpfs (mounted at {mnt}) while writing {mnt}/params; "
                           "removed the partial write; free some space or write elsewhere"), err[-3000:]
    err = (out / "convert.err").read_text()
    assert int((out / "convert.rc").read_text()) != 0
    assert err.strip() == (f"heft convert: no space left on tmpfs (mounted at {mnt}) while writing {mnt}/hf; "
                           "removed the partial write; free some space or write elsewhere"), err[-3000:]
    assert (out / "left.txt").read_text() == ""


PREPARE = """
set -u
mount -t tmpfs -o size={size} tmpfs {mnt}
heft prepare --config=configs/tiny.py --config.data.cache_dir={mnt} > {out}/prepare.out 2> {out}/prepare.err
echo $? > {out}/prepare.rc
find {mnt} -type f -printf '%P\\n' | sort > {out}/left.txt
"""


@pytest.mark.skipif(not _can_mount(), reason="needs unshare --user --mount (a private tmpfs)")
@pytest.mark.parametrize("size", ["60k", "200k"])  # the tokenizer does not fit; it fits but the tokens do not
def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_partial_store(tmp_path, size):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = PREPARE.format(mnt=mnt, out=out, size=size)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _in_private_mounts(script, check=True, cwd=root)
    err = (out / "prepare.err").read_text()
    assert int((out / "prepare.rc").read_text()) == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"heft prepare: no space left on tmpfs (mounted at {mnt}) while preparing the corpus's tokens in {mnt} "
        "(nothing half-written is left); free some space or set data.cache_dir to a larger disk"), err[-3000:]
    left = (out / "left.txt").read_text().split()
    assert all(f.startswith(("corpus/", "tokenizers/")) and "/." not in f for f in left), left  # whole files only
