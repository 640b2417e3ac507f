"""On 8 fake CPU devices: parameters are sharded as the rules say, and logits do not change."""

import jax
import numpy as np
import pytest
from flax import nnx

from heft.configs import tiny
from heft.model.decoder import Decoder
from heft.train import sharding

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
    assert sharding.make_mesh(c).shape == {"data": 4, "fsdp": 2, "tensor": 1}
