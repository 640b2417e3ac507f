"""A mixture of experts on 8 fake devices: the expert axis splits the experts as the rules say, and the
logits and a training step equal one device's."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from heft.configs import tiny_moe
from heft.model.build import bind, init_params
from heft.train import compiled, sharding
from heft.train import state as train_state

# (data, fsdp, expert, tensor)
MESHES = {"expert4_x_data2": (2, 1, 4, 1), "expert4_x_fsdp2": (1, 2, 4, 1), "expert2_x_tensor2_x_data2": (2, 1, 2, 2)}
B, T = 8, 32


def _config(data=1, fsdp=1, expert=1, tensor=1, capacity_factor=0.0, depth=2):
    c = tiny_moe.get_config()
    c.model.update(depth=depth, remat="none", scan_layers=False)  # small and unrolled: compiles fast
    c.model.moe.capacity_factor = capacity_factor
    c.mesh.update(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    c.train.update(batch_size=B, seq_len=T)
    return c


def _batch(c):
    seq = np.random.default_rng(0).integers(0, c.model.vocab, (B, T + 1))
    return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}


def _logits(c, devices, params, batch):
    mesh = sharding.make_mesh(c, devices)
    params = jax.device_put(params, sharding.param_dict_shardings(c.model, mesh, c))
    with sharding.activated(mesh, c):
        inputs = jax.device_put(batch["inputs"], sharding.batch_sharding(c, mesh))
        return np.asarray(jax.jit(lambda p, x: bind(c.model, p)(x))(params, inputs))


@pytest.mark.parametrize("capacity_factor", [0.0, 1.25], ids=["dropless", "capacity"])
def test_logits_on_expert_meshes_equal_one_device(capacity_factor):
    batch = _batch(_config())
    params = init_params(_config().model, 0)
    one = _logits(_config(capacity_factor=capacity_factor), jax.devices()[:1], params, batch)
    meshes = MESHES if capacity_factor == 0.0 else {"expert4_x_fsdp2": MESHES["expert4_x_fsdp2"]}
    for name, shape in meshes.items():
        got = _logits(_config(*shape, capacity_factor=capacity_factor), jax.devices(), params, batch)
        np.testing.assert_allclose(got, one, atol=1e-5, err_msg=name)


@pytest.mark.slow  # ~35-60 s here: the step compiled for 1 device and for 8
def test_one_training_step_on_expert_x_fsdp_equals_one_device():
    """The backward pass through the expert dispatch (all-gather, reduce-scatter) gives one device's
    loss, router losses and updated parameters."""
    results, initial = [], None
    for c, devices in ((_config(depth=1), jax.devices()[:1]), (_config(*MESHES["expert4_x_fsdp2"], depth=1), jax.devices())):
        mesh = sharding.make_mesh(c, devices)
        if initial is None:
            state = train_state.init(c, mesh)
            initial = jax.device_get(state)  # the step donates the state
        else:
            state = jax.device_put(initial, train_state.shardings(c, mesh))
        with sharding.activated(mesh, c):
            state, metrics = compiled.train_step(c, mesh)(state, jax.device_put(_batch(c), sharding.batch_sharding(c, mesh)))
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (metrics1, params1), (metrics, params) = results
    for key in ("loss", "balance_loss", "z_loss", "grad_norm"):
        assert float(metrics[key]) == pytest.approx(float(metrics1[key]), rel=1e-5), key
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, params1)


def test_the_expert_axis_splits_the_experts_and_the_batch():
    c = _config(1, 2, 4, 1)
    mesh = sharding.make_mesh(c)
    assert mesh.shape == {"slices": 1, "data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    params = sharding.param_dict_shardings(c.model, mesh, c)
    assert params["blocks"]["moe"]["up"].spec == P(None, "expert", "fsdp", "tensor")  # [layers, experts, embed, mlp]
    assert params["blocks"]["moe"]["down"].spec == P(None, "expert", "tensor", "fsdp")
    assert params["blocks"]["moe"]["router"].spec == P(None, "fsdp", None)  # every device sees every expert's logit
    assert params["blocks"]["attention"]["q"].spec[1] == "fsdp"  # dense parts: as before, whole over experts
    assert sharding.batch_sharding(c, mesh).spec[0] == ("slices", "data", "fsdp", "expert")
