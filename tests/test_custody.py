"""Custody under attack: what an unsigned seal is worth (integrity, said so), what a signed statement
refuses (edits, forged, swapped and replayed steps), every reader trusting a step through the one
loader, and only regular files inside a checkpoint read, never past their manifest's sizes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
from test_checkpoint import _config

from heft.train import checkpoint, manifest, sharding
from heft.train import state as train_state


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """(root, private key, public key): ROOT/run holds steps 2 and 4 of one signed run, each with a
    tokenizer.model, step 4 saved by a second Checkpointer (a resume). Copy it before damaging it."""
    root = tmp_path_factory.mktemp("signed")
    private = str(root / "key.pem")
    public = manifest.new_key(private)
    (root / "tok.model").write_bytes(b"a sentencepiece model, as far as custody cares")
    prepared = types.SimpleNamespace(metadata={}, tokenizer_path=str(root / "tok.model"))
    c = _config()
    c.checkpoint.signing_key = private
    state = train_state.init(c, sharding.make_mesh(c))
    for step in (2, 4):
        ckpt = checkpoint.Checkpointer(str(root / "run"), c, prepared=prepared, note=lambda _: None)
        ckpt.save(step, state, {"consumed": step})
        ckpt.close()
    return root, private, public


def _copy(signed, tmp_path) -> str:
    """A copy of the signed run's checkpoints/ folder."""
    shutil.copytree(signed[0] / "run", tmp_path / "run")
    return str(tmp_path / "run" / "checkpoints")


def _manifest(step_dir) -> dict:
    return json.load(open(os.path.join(step_dir, manifest.NAME)))


def _reseal(step_dir, edit, keep_signature=True) -> None:
    """What an attacker does with stdlib alone: edit the manifest, then compute its seal again."""
    m = _manifest(step_dir)
    edit(m)
    open(os.path.join(step_dir, manifest.NAME), "w").write(json.dumps(m))
    seal = json.load(open(os.path.join(step_dir, manifest.SEAL)))
    seal["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    seal["statement"] = manifest.statement(m)
    if not keep_signature:
        seal.pop("signature", None), seal.pop("signer", None)
    open(os.path.join(step_dir, manifest.SEAL), "w").write(json.dumps(seal))


def _rope(m):
    m["config"]["model"]["rope_theta"] = 1.0


def test_run_id_is_kept_across_a_resume_and_each_step_names_its_parent(signed):
    steps = os.path.join(signed[0], "run", "checkpoints")
    two, four = _manifest(os.path.join(steps, "2")), _manifest(os.path.join(steps, "4"))
    assert two["run_id"] and two["run_id"] == four["run_id"]
    assert (two["parent_step"], four["parent_step"]) == (None, 2)
    seal = json.load(open(os.path.join(steps, "4", manifest.SEAL)))
    assert seal["statement"]["subject"][0]["digest"]["sha256"] == manifest.digest(four)
    assert seal["statement"]["predicate"] == {"run_id": four["run_id"], "step": 4, "parent_step": 2,
                                              "config_sha256": hashlib.sha256(manifest.canonical(four["config"])).hexdigest()}


def test_edited_manifest_with_its_seal_recomputed_passes_unsigned_but_is_said_to_be_integrity_only(signed, tmp_path):
    from heft.launch.verbs.verify import report

    steps = _copy(signed, tmp_path)
    shutil.rmtree(os.path.join(steps, "2"))
    step = os.path.join(steps, "4")
    _reseal(step, lambda m: None, keep_signature=False)  # an unsigned run, as without checkpoint.signing_key
    _reseal(step, _rope, keep_signature=False)
    assert manifest.verify(step)["config"]["model"]["rope_theta"] == 1.0  # an unkeyed digest cannot tell
    ok, line = report(checkpoint.checkpoints_in(step)[0])
    assert ok and "seal ok (integrity, unsigned)" in line, line
    with pytest.raises(manifest.CheckpointError, match="is not signed but a verify key is given"):
        manifest.verify(step, signed[2])


def _delete_a_file(step):
    victim = sorted(f for f in _manifest(step)["files"] if f.startswith("state/"))[-1]
    os.remove(os.path.join(step, victim))
    return lambda m: m["files"].pop(victim)


def _replace_data_metadata(step):
    data = json.dumps({"consumed": 0}).encode()  # the loader's position: training would repeat its data
    open(os.path.join(step, "data", "metadata"), "wb").write(data)
    return lambda m: m["files"].update({"data/metadata": {"sha256": hashlib.sha256(data).hexdigest(),
                                                          "bytes": len(data)}})


@pytest.mark.parametrize("attack", ["config", "delete", "metadata"])
def test_edits_with_a_recomputed_seal_in_a_signed_run_are_refused(signed, tmp_path, attack):
    steps = _copy(signed, tmp_path)
    step = os.path.join(steps, "4")
    edit = {"config": lambda s: _rope, "delete": _delete_a_file, "metadata": _replace_data_metadata}[attack](step)
    _reseal(step, edit)  # the old signature kept
    for key in (signed[2], None):
        with pytest.raises(manifest.CheckpointError, match="signature does not verify"):
            manifest.verify(step, key)
    _reseal(step, lambda m: None, keep_signature=False)  # or dropped
    with pytest.raises(manifest.CheckpointError, match="is not signed but the other steps of .* are"):
        manifest.verify(step)
    with pytest.raises(manifest.CheckpointError, match="is not signed but a verify key is given"):
        manifest.verify(step, signed[2])


def test_forged_unsigned_step_of_a_signed_run_is_refused_by_the_loader_by_resume_and_by_a_verb(signed, tmp_path):
    steps = _copy(signed, tmp_path)
    shutil.copytree(os.path.join(steps, "4"), os.path.join(steps, "6"))
    _reseal(os.path.join(steps, "6"), lambda m: (_rope(m), m.update(step=6, parent_step=4)), keep_signature=False)
    workdir = os.path.dirname(steps)
    refused = "checkpoints/6/manifest.seal is not signed but the other steps of .* are"
    with pytest.raises(manifest.CheckpointError, match=refused):
        checkpoint.load(workdir)
    with pytest.raises(manifest.CheckpointError, match=refused):
        checkpoint.Checkpointer(workdir, _config(), note=lambda _: None).latest()
    r = subprocess.run(["heft", "generate", f"--checkpoint={workdir}", "--prompt=hi"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "heft generate:" in r.stderr and "is not signed but the other steps" in r.stderr, r.stderr


def test_resuming_a_signed_run_without_its_signing_key_is_refused_before_any_save(signed, tmp_path):
    steps = _copy(signed, tmp_path)
    with pytest.raises(manifest.CheckpointError, match=r"are signed \(step 4\) but checkpoint.signing_key is not set"):
        checkpoint.Checkpointer(os.path.dirname(steps), _config(), note=lambda _: None)
    assert sorted(os.listdir(steps)) == ["2", "4"]


def test_swapped_step_folders_are_refused_by_verify_key_and_by_resume(signed, tmp_path):
    from heft.launch.verbs.verify import report

    steps = _copy(signed, tmp_path)
    os.rename(os.path.join(steps, "4"), os.path.join(steps, "x"))
    os.rename(os.path.join(steps, "2"), os.path.join(steps, "4"))
    os.rename(os.path.join(steps, "x"), os.path.join(steps, "2"))
    moved = r"checkpoints/4 holds step 2, not step 4 .*rolled back"
    with pytest.raises(manifest.CheckpointError, match=moved):
        manifest.verify(os.path.join(steps, "4"), signed[2])
    ok, line = report(checkpoint.checkpoints_in(os.path.join(steps, "4"))[0], signed[2])
    assert not ok and "holds step 2, not step 4" in line
    c = _config()
    c.checkpoint.signing_key, c.checkpoint.verify_key = signed[1], signed[2]
    with pytest.raises(manifest.CheckpointError, match=moved):
        checkpoint.Checkpointer(os.path.dirname(steps), c, note=lambda _: None).latest()


def test_signed_step_of_another_run_replayed_into_the_workdir_is_refused(signed, tmp_path):
    steps = _copy(signed, tmp_path)
    replay = os.path.join(steps, "6")
    shutil.copytree(os.path.join(steps, "4"), replay)
    m = _manifest(replay)
    facts = {k: v for k, v in m.items() if k not in ("format", "files")}
    manifest.write(checkpoint.checkpoints_in(replay)[0], m["files"], {**facts, "run_id": "another-run", "step": 6},
                   signing_key=signed[1])  # a genuine signed step of another run, by the same key
    with pytest.raises(manifest.CheckpointError, match=r"belongs to run another-run, not to run .* \(a replay\)"):
        manifest.verify(replay, signed[2])


def test_seals_from_before_statements_are_refused_with_a_key_if_signed_and_read_as_before_if_not(signed, tmp_path):
    from cryptography.hazmat.primitives import serialization

    old = str(tmp_path / "old")
    shutil.copytree(os.path.join(signed[0], "run", "checkpoints", "4"), old)
    d = manifest.digest(_manifest(old))
    open(os.path.join(old, manifest.SEAL), "w").write(json.dumps({"manifest_sha256": d}))
    assert manifest.verify(old)["step"] == 4
    key = serialization.load_pem_private_key(open(signed[1], "rb").read(), password=None)
    import base64

    signature = base64.b64encode(key.sign(d.encode())).decode()
    open(os.path.join(old, manifest.SEAL), "w").write(json.dumps({"manifest_sha256": d, "signature": signature}))
    assert manifest.verify(old)["step"] == 4
    with pytest.raises(manifest.CheckpointError, match="predates statements"):
        manifest.verify(old, signed[2])


def _unsigned_step(signed, tmp_path) -> str:
    step = str(tmp_path / "step")
    shutil.copytree(os.path.join(signed[0], "run", "checkpoints", "4"), step)
    return step


@pytest.mark.parametrize("name", ["tokenizer.model", manifest.NAME])
def test_a_symlink_to_dev_zero_fails_fast(signed, tmp_path, name):
    step = _unsigned_step(signed, tmp_path)
    os.remove(os.path.join(step, name))
    os.symlink("/dev/zero", os.path.join(step, name))

    def hung(*_):
        raise TimeoutError(f"reading a symlink to /dev/zero as {name} did not stop")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(manifest.CheckpointError, match=f"{name} is a symbolic link"):
            manifest.verify(step)
    finally:
        signal.alarm(0)


def test_a_symlink_to_an_identical_copy_outside_is_refused(signed, tmp_path):
    step = _unsigned_step(signed, tmp_path)
    shutil.copy(os.path.join(step, "tokenizer.model"), tmp_path / "copy")
    os.remove(os.path.join(step, "tokenizer.model"))
    os.symlink(tmp_path / "copy", os.path.join(step, "tokenizer.model"))
    with pytest.raises(manifest.CheckpointError, match="tokenizer.model is a symbolic link"):
        manifest.verify(step)
    os.remove(os.path.join(step, "tokenizer.model"))  # the file put back, and a folder linked in beside it
    shutil.copy(tmp_path / "copy", os.path.join(step, "tokenizer.model"))
    os.mkdir(tmp_path / "dir")
    shutil.copy(tmp_path / "copy", tmp_path / "dir" / "tokenizer.model")
    os.symlink(tmp_path / "dir", os.path.join(step, "linked"))
    with pytest.raises(manifest.CheckpointError, match="linked is a symbolic link"):
        manifest.verify(step)


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(signed, tmp_path):
    step = _unsigned_step(signed, tmp_path)
    data = b"host\n"
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _reseal(step, lambda m: m["files"].update({"../../../etc/hostname": entry}), keep_signature=False)
    with pytest.raises(manifest.CheckpointError, match=r"names '../../../etc/hostname', not a file inside"):
        manifest.verify(step)


@pytest.mark.parametrize("added", [".hidden", "state/.hidden", "custody/process_1.json"])
def test_a_hidden_file_or_leftover_scratch_in_a_sealed_step_is_refused(signed, tmp_path, added):
    step = _unsigned_step(signed, tmp_path)
    os.makedirs(os.path.dirname(os.path.join(step, added)), exist_ok=True)
    open(os.path.join(step, added), "w").write("{}")
    with pytest.raises(manifest.CheckpointError, match="scratch left in a sealed" if "custody" in added
                       else f"{added} is not in the manifest"):
        manifest.verify(step)


def test_a_file_larger_than_its_entry_fails_without_being_read_whole(signed, tmp_path):
    step = _unsigned_step(signed, tmp_path)
    with open(os.path.join(step, "tokenizer.model"), "ab") as f:
        f.write(b"x" * 1000)
    with pytest.raises(manifest.CheckpointError, match="tokenizer.model is larger than the manifest's"):
        manifest.verify(step)
    from etils import epath

    assert manifest.sha256_file(epath.Path("/dev/zero"), limit=10)[1] == 11  # a bounded read stops


VERBS = {
    "eval": dict(corpus=None, format=None, batches=0, batch_size=0, mesh=None, skip_verify=False, tasks=[], limit=None),
    "generate": dict(prompt=["hi"], max_new_tokens=4, temperature=0.8, top_k=0, top_p=0.95, seed=0),
    "export": dict(out="OUT"),
    "convert": dict(from_hf=None, to_hf="CKPT", out="OUT", param_dtype="float32", dtype="param", max_shard_mb=1),
    "merge": dict(out="OUT"),
    "quantize": dict(out="OUT", weights="int8", group_size=0),
    "finetune": dict(base="CKPT", workdir="OUT", coordinator=None, num_processes=None, process_id=None,
                     stop_after=None),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_that_reads_a_checkpoint_trusts_it_through_the_loader_with_the_key(signed, tmp_path, monkeypatch,
                                                                                     verb):
    import importlib

    from absl import flags

    ckpt = os.path.join(signed[0], "run")
    values = {k: (ckpt if v == "CKPT" else str(tmp_path / "out") if v == "OUT" else v) for k, v in VERBS[verb].items()}
    f = types.SimpleNamespace(checkpoint=ckpt, verify_key=signed[2], config=_config(), **values)
    monkeypatch.setattr(flags, "FLAGS", f)
    asked = []

    def recorder(directory, verify=True, verify_key=None):
        asked.append(verify_key)
        raise manifest.CheckpointError("trusted here")

    monkeypatch.setattr(sys.modules["heft.train.checkpoint.load"], "verified", recorder)
    monkeypatch.setattr(checkpoint, "verified", recorder)
    with pytest.raises(manifest.CheckpointError, match="trusted here"):
        importlib.import_module(f"heft.launch.verbs.{verb}").main(["heft"])
    assert asked == [signed[2]]
