"""On 8 fake CPU devices: parameters are sharded as the rules say, and logits do not change."""

import jax
import numpy as np
import pytest
from flax import nnx

from heft.configs import tiny
from heft.model.decoder import Decoder
from heft.train import sharding
from heft.train import state as train_state

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def _config(data, fsdp, tensor):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


def _axes(entry, mesh):
    """One spec entry as a tuple of mesh axes that really split (size > 1)."""
    entry = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return tuple(a for a in entry if mesh.shape[a] > 1)


def _expected(names, c, mesh):
    """The rules table read by hand: each logical name's mesh axes, each mesh axis used once."""
    table, used, out = dict(c.mesh.rules), set(), []
    for name in names:
        axes = tuple(a for a in _axes(table.get(name), mesh) if a not in used)
        used.update(axes)
        out.append(axes)
    return out


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_parameters_sharded_by_rules_and_logits_equal_single_device(shape):
    c = _config(*shape)
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, c.model.vocab)
    reference = Decoder(c.model, nnx.Rngs(c.train.seed))(tokens)

    mesh = sharding.make_mesh(c)
    model = sharding.create_model(c, mesh)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata()["out_sharding"]
        spec = tuple(var[...].sharding.spec) + (None,) * len(names)
        got = [_axes(entry, mesh) for entry in spec[: len(names)]]
        assert got == _expected(names, c, mesh), (path, names, spec)
    split = any(not var[...].sharding.is_fully_replicated for _, var in nnx.to_flat_state(nnx.state(model)))
    assert split == (shape != (8, 1, 1))  # pure data parallelism replicates; the others split

    forward = nnx.jit(lambda model, tokens: model(tokens))
    with sharding.activated(mesh, c):
        logits = forward(model, jax.device_put(tokens, sharding.batch_sharding(c, mesh)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=1e-5)


def test_minus_one_fills_the_remaining_devices():
    c = _config(-1, 2, 1)
    assert sharding.make_mesh(c).shape == {"slices": 1, "data": 4, "fsdp": 2, "expert": 1, "tensor": 1}
    c.mesh.slices = 2
    assert sharding.make_mesh(c).shape == {"slices": 2, "data": 2, "fsdp": 2, "expert": 1, "tensor": 1}


def test_two_slices_of_four_devices_give_the_single_slice_logits_and_training_step():
    """8 devices as 2 slices x (fsdp 2 x tensor 2): the batch splits across slices, every parameter is
    whole within a slice (replicated across slices), and the forward pass and one update equal the
    same run on one slice of 8 (data 2 x fsdp 2 x tensor 2)."""
    from heft.model.build import bind
    from heft.train import compiled

    one, two = _config(2, 2, 2), _config(1, 2, 2)
    two.mesh.slices = 2
    B, T = 8, 16
    for c in (one, two):  # small and unrolled without remat, to compile fast
        c.model.update(vocab=256, width=64, depth=2, heads=4, kv_heads=2, mlp_width=128, remat="none",
                       scan_layers=False)
        c.train.update(batch_size=B, seq_len=T)
    mesh1, mesh2 = sharding.make_mesh(one), sharding.make_mesh(two)
    assert mesh2.shape == {"slices": 2, "data": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    # Each slice is a block of 4 devices (no slice_index on CPU devices: consecutive blocks).
    assert [sorted(d.id for d in mesh2.devices[i].flat) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sharding.batch_sharding(two, mesh2).spec[0] == ("slices", "data", "fsdp", "expert")
    for sh in jax.tree.leaves(train_state.shardings(two, mesh2)):
        assert "slices" not in jax.tree.leaves(tuple(sh.spec))  # parameters and Adam: within a slice

    seq = np.random.default_rng(0).integers(0, one.model.vocab, (B, T + 1))
    batch = {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}
    results, initial = [], train_state.init(one, mesh1)
    for c, mesh in ((two, mesh2), (one, mesh1)):  # the same initial state, laid out for each mesh
        state = jax.device_put(initial, train_state.shardings(c, mesh), may_alias=False) if c is two else initial
        placed = jax.device_put(batch, sharding.batch_sharding(c, mesh))
        with sharding.activated(mesh, c):
            logits = jax.jit(lambda p, x, c=c: bind(c.model, p)(x))(state["params"], placed["inputs"])
            state, metrics = compiled.train_step(c, mesh)(state, placed)
        results.append((np.asarray(logits), float(metrics["loss"]), jax.device_get(state["params"])))
    (logits2, loss2, params2), (logits1, loss1, params1) = results
    np.testing.assert_allclose(logits2, logits1, atol=1e-5)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params2, params1)


def test_a_model_trained_on_two_slices_is_served_on_one():
    from heft.train import checkpoint

    c = _config(-1, 1, 1)
    c.mesh.slices = 2
    assert checkpoint.serving_mesh(c).shape == {"slices": 1, "data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


def test_slices_that_do_not_divide_the_devices_are_a_clear_error():
    c = _config(-1, 1, 1)
    c.mesh.slices = 3
    with pytest.raises(sharding.ConfigError, match="mesh.slices=3 does not divide the 8 devices"):
        sharding.make_mesh(c)
