"""Each bad config raises one clear ConfigError before anything compiles."""

import subprocess

import pytest
from flax import nnx

from heft.configs import tiny
from heft.model.checks import ConfigError
from heft.model.decoder import Decoder
from heft.train import sharding


def _model_error(**fields):
    c = tiny.get_config()
    c.model.update(fields)
    with pytest.raises(ConfigError) as e:
        Decoder(c.model, nnx.Rngs(0))
    return str(e.value)


def test_width_not_divisible_by_heads():
    assert "model.width=130 is not divisible by model.heads=4" in _model_error(width=130)


def test_width_not_divisible_by_heads_is_fine_with_head_dim():
    c = tiny.get_config()
    c.model.update(width=130, head_dim=32)
    Decoder(c.model, nnx.Rngs(0))


def test_heads_not_divisible_by_kv_heads():
    assert "model.heads=4 is not divisible by model.kv_heads=3" in _model_error(kv_heads=3)


def test_unknown_activation_and_norm():
    assert "model.activation='tanh' is unknown" in _model_error(activation="tanh")
    assert "model.norm='batchnorm' is unknown" in _model_error(norm="batchnorm")


def test_mesh_size_different_from_device_count():
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
    with pytest.raises(ConfigError, match="= 4 but there are 8 devices"):
        sharding.make_mesh(c)


def test_dimension_not_divisible_by_its_mesh_axis():
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 8  # tiny has 4 heads and 2 kv heads
    mesh = sharding.make_mesh(c)
    with pytest.raises(ConfigError, match=r"parameter blocks\.attention\.k has kv_heads=2, not divisible by mesh axes tensor of size 8"):
        sharding.create_model(c, mesh)


def test_cli_names_a_misspelt_field_in_one_line():
    r = subprocess.run(["heft", "size", "--config.model.widht=3"], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == (
        'heft size: the config has no field widht; Did you mean "width" instead of "widht"? '
        "see docs/config.md"
    )


def test_cli_states_a_model_error_in_one_line():
    r = subprocess.run(["heft", "size", "--config.model.kv_heads=3"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("heft size: model.heads=4 is not divisible by model.kv_heads=3")
