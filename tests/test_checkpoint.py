"""Checkpoints: custody (manifest, verify), restoring onto other meshes, skipping unfinished saves."""

import json
import os
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
from etils import epath

from heft.configs import tiny
from heft.train import checkpoint, custody, manifest, sharding
from heft.train import state as train_state


def _config(data=8, fsdp=1, tensor=1):
    c = tiny.get_config()
    c.model.update(vocab=256, width=64, depth=2, heads=4, kv_heads=4, mlp_width=128)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    c.checkpoint.async_save = True
    return c


def _saved(tmp_path, steps=(1,)):
    c = _config()
    mesh = sharding.make_mesh(c)
    state = train_state.init(c, mesh)
    # Adam's moments as after training (zeros would compress to nothing and flatter the sizes).
    key = iter(jax.random.split(jax.random.key(0), 1000))
    state["opt_state"] = jax.tree.map(
        lambda x: jax.random.normal(next(key), x.shape, x.dtype) if x.ndim else x, state["opt_state"])
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    for s in steps:
        ckpt.save(s, state, {"consumed": s * 8})
    ckpt.close()
    return c, jax.device_get(state), ckpt.directory


def test_saved_checkpoint_verifies_and_restores_onto_smaller_meshes(tmp_path):
    c, state, directory = _saved(tmp_path)
    m = manifest.verify(os.path.join(directory, "1"))
    assert m["step"] == 1 and m["config"]["model"]["width"] == 64 and m["files"]
    for shape, devices in [((1, 1, 1), jax.devices()[:1]), ((1, 2, 2), jax.devices()[:4]),
                           ((2, 1, 1), jax.devices()[:2])]:
        target = _config(*shape)
        mesh = sharding.make_mesh(target, devices)
        got, data = checkpoint.Checkpointer(str(tmp_path), target).restore_latest(
            train_state.abstract(target, mesh))
        assert data == {"consumed": 8}
        jax.tree.map(np.testing.assert_array_equal, state, jax.device_get(got))
        q = got["params"]["blocks"]["attention"]["q"]
        assert len(q.sharding.device_set) == len(devices)


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damaged_checkpoint_fails_verify_and_refuses_to_restore(tmp_path, damage):
    c, _, directory = _saved(tmp_path)
    step_dir = os.path.join(directory, "1")
    files = sorted(f for f in manifest.read(step_dir)["files"] if "state" in f and os.path.getsize(os.path.join(step_dir, f)) > 100)
    victim = os.path.join(step_dir, files[-1])
    if damage == "delete":
        os.remove(victim)
    else:
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(victim, "wb").write(bytes(data))
    r = subprocess.run(["heft", "verify", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and files[-1] in r.stdout, r.stdout + r.stderr
    mesh = sharding.make_mesh(c)
    with pytest.raises(manifest.CheckpointError, match=os.path.basename(victim)):
        checkpoint.Checkpointer(str(tmp_path), c).restore_latest(train_state.abstract(c, mesh))


def test_committed_but_unsealed_step_is_sealed_on_restart_and_later_saves_go_on(tmp_path):
    c, state, directory = _saved(tmp_path, steps=(1, 2))
    os.remove(os.path.join(directory, "2", manifest.SEAL))  # as if killed after orbax's commit, before sealing
    os.makedirs(os.path.join(directory, "2", manifest.SCRATCH))  # with a host's report of that cut-short seal
    with open(os.path.join(directory, "2", manifest.SCRATCH, "process_1.json"), "w") as f:
        json.dump({"error": "No space left on device"}, f)
    notes = []
    ckpt = checkpoint.Checkpointer(str(tmp_path), c, note=notes.append)
    assert any("sealed step 2" in n for n in notes), notes
    assert manifest.verify(os.path.join(directory, "2"))["step"] == 2
    resume = ckpt.latest()
    assert resume.step == 2
    got, data = ckpt.restore(resume, train_state.abstract(c, sharding.make_mesh(c)))
    assert data == {"consumed": 16}
    ckpt.save(3, state, {"consumed": 24})  # orbax would skip a step at or below an unsealed one
    ckpt.close()
    assert manifest.verify(os.path.join(directory, "3"))["step"] == 3


def test_uncommitted_step_is_removed_on_restart(tmp_path):
    c, _, directory = _saved(tmp_path, steps=(1, 2))
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp"))
    shutil.move(os.path.join(directory, "2"), os.path.join(directory, "2.orbax-checkpoint-tmp-7"))
    notes = []
    ckpt = checkpoint.Checkpointer(str(tmp_path), c, note=notes.append)
    assert ckpt.latest().step == 1 and sorted(os.listdir(directory)) == ["1"]
    ckpt.close()


def test_retention_keeps_the_newest_sealed_steps_and_every_kth(tmp_path):
    c = _config()
    c.checkpoint.keep, c.checkpoint.keep_every = 2, 3
    mesh = sharding.make_mesh(c)
    state = train_state.init(c, mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path), c)
    for s in range(1, 8):
        ckpt.save(s, state, {"consumed": s})
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(ckpt.directory)) == [3, 6, 7]


def test_edited_manifest_is_caught_by_its_seal(tmp_path):
    c, _, directory = _saved(tmp_path)
    path = os.path.join(directory, "1", manifest.NAME)
    m = json.load(open(path))
    m["config"]["train"]["lr"] = 1.0  # a deliberate edit, with the file hashes left valid
    json.dump(m, open(path, "w"))
    r = subprocess.run(["heft", "verify", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "does not match its seal" in r.stdout, r.stdout + r.stderr
    with pytest.raises(manifest.CheckpointError, match="does not match its seal"):
        checkpoint.Checkpointer(str(tmp_path), c).latest()


@pytest.mark.parametrize("content", ["{}", "[1, 2, 3]", '{"files": {"a": 3}}', "not json"])
def test_manifest_of_the_wrong_shape_is_one_error(tmp_path, content):
    c, _, directory = _saved(tmp_path)
    step = os.path.join(directory, "1")
    open(os.path.join(step, manifest.NAME), "w").write(content)
    m = json.loads(content) if content.startswith(("{", "[")) else None
    open(os.path.join(step, manifest.SEAL), "w").write(json.dumps({"manifest_sha256": manifest.digest(m) if isinstance(m, dict) else ""}))
    with pytest.raises(manifest.CheckpointError, match="not a heft manifest|not valid JSON"):
        manifest.read(step)


def test_signed_seals_verify_with_their_key_and_not_with_another(tmp_path):
    private = str(tmp_path / "key.pem")
    public = manifest.new_key(private)
    other = manifest.new_key(str(tmp_path / "other.pem"))
    c = _config()
    c.checkpoint.signing_key = private
    mesh = sharding.make_mesh(c)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), c)
    ckpt.save(1, train_state.init(c, mesh), {"consumed": 8})
    ckpt.close()
    step = os.path.join(ckpt.directory, "1")
    assert manifest.verify(step, public)["step"] == 1
    with pytest.raises(manifest.CheckpointError, match="signature does not verify"):
        manifest.verify(step, other)
    c.checkpoint.verify_key = other
    with pytest.raises(manifest.CheckpointError, match="signature does not verify"):
        checkpoint.Checkpointer(str(tmp_path / "run"), c).latest()
    r = subprocess.run(["heft", "verify", str(tmp_path / "run"), f"--key={public}"], capture_output=True, text=True)
    assert r.returncode == 0 and "seal signed and ok" in r.stdout, r.stdout + r.stderr


def test_resume_refuses_a_different_model_naming_the_fields(tmp_path):
    c, _, _ = _saved(tmp_path)
    changed = _config()
    changed.model.width, changed.model.remat = 128, "full"  # remat only changes how it runs: allowed
    changed.model.activation = "gelu"
    ckpt = checkpoint.Checkpointer(str(tmp_path), changed)
    with pytest.raises(manifest.CheckpointError, match=r"model.activation='swiglu' in the checkpoint but 'gelu' now, "
                                                       r"model.width=64 in the checkpoint but 128 now; resume with") as e:
        ckpt.check_config(ckpt.latest())
    assert "remat" not in str(e.value)
    changed.model.width, changed.model.activation = 64, "swiglu"
    changed.train.lr, changed.model.rope_theta = 1e-3, 5e5
    notes = ckpt.check_config(ckpt.latest())
    assert any(n.startswith("train.lr:") for n in notes) and any(n.startswith("model.rope_theta:") for n in notes)


def test_resume_refuses_a_changed_corpus_unless_allowed(tmp_path):
    c, state, _ = _saved(tmp_path)

    class Prepared:  # what data.prepare returns, as far as custody reads it
        def __init__(self, corpus_hash, tokenizer_hash):
            self.metadata = {"corpus": "x", "sources": [{"sha256": corpus_hash}], "tokenizer": {"sha256": tokenizer_hash}}
            self.tokenizer_path = None

    ckpt = checkpoint.Checkpointer(str(tmp_path), c, prepared=Prepared("aaa", "t1"))
    ckpt.save(2, state, {"consumed": 16})
    ckpt.close()
    resume = checkpoint.Checkpointer(str(tmp_path), c).latest()
    assert checkpoint.Checkpointer(str(tmp_path), c).check_data(resume, Prepared("aaa", "t1")) is None
    with pytest.raises(manifest.CheckpointError, match="corpus differs: .* holds other text than step 2.*allow_data_change=true"):
        checkpoint.Checkpointer(str(tmp_path), c).check_data(resume, Prepared("bbb", "t2"))
    c.checkpoint.allow_data_change = True
    with pytest.raises(manifest.CheckpointError, match="holds no tokenizer.model"):  # saved without one
        checkpoint.Checkpointer(str(tmp_path), c).check_data(resume, Prepared("bbb", "t2"))


def test_params_only_checkpoint_is_smaller_and_loads_onto_another_mesh(tmp_path):
    c, state, directory = _saved(tmp_path)
    checkpoint.save_params(str(tmp_path / "serve"), c, state["params"])
    size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    assert size(tmp_path / "serve") < 0.5 * size(os.path.join(directory, "1"))
    mesh = sharding.make_mesh(_config(1, 2, 2), jax.devices()[:4])
    for source in (str(tmp_path / "serve"), str(tmp_path)):  # params-only, and a training workdir
        config, params, tokenizer = checkpoint.load_params(source, mesh=mesh)
        assert config.model.width == 64 and tokenizer is None
        jax.tree.map(np.testing.assert_array_equal, state["params"], jax.device_get(params))
    # A config given to read it with (another mesh or batch) may not change what the parameters mean:
    # swapping the norm keeps every shape, so only this check stands between it and a wrong model.
    other = _config(1, 2, 2)
    other.model.norm = "layernorm" if c.model.norm != "layernorm" else "rmsnorm"
    with pytest.raises(manifest.CheckpointError, match=r"holds another model than the config given to read it: "
                                                       r"model.norm=.* in the checkpoint but .* now; read it with"):
        checkpoint.load(str(tmp_path / "serve"), mesh=mesh, config=other)


def test_missing_checkpoint_or_a_file_is_one_clear_error(tmp_path):
    with pytest.raises(manifest.CheckpointError, match="does not exist"):
        checkpoint.load_params(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(manifest.CheckpointError, match="is a file, not a checkpoint"):
        checkpoint.load_params(str(tmp_path / "file.txt"))


KILLED_MID_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import _config
from heft.train import checkpoint, sharding
from heft.train import state as train_state
c = _config()
mesh = sharding.make_mesh(c)
state = train_state.init(c, mesh)
ckpt = checkpoint.Checkpointer({workdir!r}, c)
ckpt.save(1, state, {{"consumed": 8}})
ckpt.wait()
state["step"] = state["step"] + 1
ckpt.save(2, state, {{"consumed": 16}})  # async: returns while the save is still being written
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_killed_during_async_save_resumes_from_a_complete_step(tmp_path):
    code = KILLED_MID_SAVE.format(tests=os.path.dirname(__file__), workdir=str(tmp_path))
    r = subprocess.run(["python", "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    c = _config()
    state, data = checkpoint.Checkpointer(str(tmp_path), c).restore_latest(
        train_state.abstract(c, sharding.make_mesh(c)))
    # Step 2 was cut short (removed) or had committed (sealed now): either way a complete step.
    assert (int(state["step"]), data) in [(0, {"consumed": 8}), (1, {"consumed": 16})]
    assert subprocess.run(["heft", "verify", str(tmp_path)], capture_output=True).returncode == 0


def _renamed_while_listed(tmp_path):
    """A step folder holding a temporary name that another process renames into place (as process 0
    writes the tokenizer) between process 1's listing and its hashing."""
    step = tmp_path / "7"
    step.mkdir()
    (step / "state.bin").write_bytes(b"weights")
    tmp = next(f".tokenizer.model.tmp-{i:08x}" for i in range(1000)
               if custody.owner(f".tokenizer.model.tmp-{i:08x}", 2) == 1)
    (step / tmp).write_bytes(b"tokenizer")
    return step, tmp


def test_a_file_renamed_away_while_another_host_hashes_its_share_is_left_to_process_0(tmp_path, monkeypatch):
    step, tmp = _renamed_while_listed(tmp_path)
    real = manifest.sha256_file

    def racing(p, limit=None):
        if p.name == tmp:  # process 0's rename lands just before process 1 opens the file
            os.replace(step / tmp, step / "tokenizer.model")
        return real(p, limit)

    monkeypatch.setattr(manifest, "sha256_file", racing)
    share = custody.hash_share(epath.Path(step), 1, 2)
    assert tmp not in share and all(custody.owner(rel, 2) == 1 for rel in share)
    # ...and a file gone between os.walk and its lstat is not an error either
    monkeypatch.setattr(os, "walk", lambda *a, **k: iter([(str(step), [], ["state.bin", "gone"])]))
    assert manifest.entries(epath.Path(step)) == (["state.bin"], [])


def test_a_host_that_cannot_hash_its_share_stops_process_0s_seal_at_once(tmp_path, monkeypatch):
    step, _ = _renamed_while_listed(tmp_path)
    directory = epath.Path(step)

    def denied(p, limit=None):
        raise PermissionError(13, "Permission denied", str(p))

    with monkeypatch.context() as m:
        m.setattr(manifest, "sha256_file", denied)
        with pytest.raises(PermissionError):
            custody.seal(directory, {"step": 7}, 1, 2)
    start = time.monotonic()
    with pytest.raises(manifest.CheckpointError, match=r"process 1 could not hash its share .*Permission denied"):
        custody.seal(directory, {"step": 7}, 0, 2, timeout=60)
    assert time.monotonic() - start < 5 and not manifest.is_sealed(directory)
