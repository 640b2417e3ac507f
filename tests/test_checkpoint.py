"""Checkpoints: custody (manifest, verify), restoring onto other meshes, skipping unfinished saves."""

import os
import subprocess

import jax
import numpy as np
import pytest

from heft.configs import tiny
from heft.train import checkpoint, compiled, manifest, sharding


def _config(data=8, fsdp=1, tensor=1):
    c = tiny.get_config()
    c.model.update(vocab=256, width=64, depth=2, heads=4, kv_heads=4, mlp_width=128)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    c.checkpoint.async_save = True
    return c


def _saved(tmp_path, steps=(1,)):
    c = _config()
    mesh = sharding.make_mesh(c)
    state = compiled.init_state(c, mesh)
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
            compiled.abstract_state(target, mesh))
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
        checkpoint.Checkpointer(str(tmp_path), c).restore_latest(compiled.abstract_state(c, mesh))


def test_checkpoint_without_manifest_is_skipped_for_the_previous_one(tmp_path):
    c, _, directory = _saved(tmp_path, steps=(1, 2))
    os.remove(os.path.join(directory, "2", manifest.NAME))  # as if killed before sealing
    mesh = sharding.make_mesh(c)
    state, data = checkpoint.Checkpointer(str(tmp_path), c).restore_latest(compiled.abstract_state(c, mesh))
    assert int(state["step"]) == 0 and data == {"consumed": 8}  # step 1's payload


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


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(manifest.CheckpointError, match="does not exist"):
        checkpoint.load_params(str(tmp_path / "nope"))


KILLED_MID_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import _config
from heft.train import checkpoint, compiled, sharding
c = _config()
mesh = sharding.make_mesh(c)
state = compiled.init_state(c, mesh)
ckpt = checkpoint.Checkpointer({workdir!r}, c)
ckpt.save(1, state, {{"consumed": 8}})
ckpt.manager.wait_until_finished()
ckpt.tick()
state["step"] = state["step"] + 1
ckpt.save(2, state, {{"consumed": 16}})  # async: returns while the save is still being written
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_killed_during_async_save_resumes_from_the_previous_step(tmp_path):
    code = KILLED_MID_SAVE.format(tests=os.path.dirname(__file__), workdir=str(tmp_path))
    r = subprocess.run(["python", "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    c = _config()
    state, data = checkpoint.Checkpointer(str(tmp_path), c).restore_latest(
        compiled.abstract_state(c, sharding.make_mesh(c)))
    assert int(state["step"]) == 0 and data == {"consumed": 8}
