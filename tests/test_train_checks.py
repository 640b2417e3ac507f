"""Config checks (heft.train.checks): every preset passes them, every count and size field has a
range, and the schedule's warmup stays below its steps."""

import importlib
import math
import os

import ml_collections
import pytest

from heft.configs import base, tiny
from heft.launch.flags import CONFIG_DIR
from heft.model.checks import ConfigError
from heft.train import checks, sharding

PRESETS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")
SECTIONS = ("model", "train", "checkpoint", "mesh")  # data's fields are the data stage's to check


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_passes_the_checks_on_eight_devices(name):
    config = importlib.import_module(f"heft.configs.{name}").get_config()
    checks.check(config, sharding.make_mesh(config))
    assert config.train.warmup_steps < config.train.steps


def test_warmup_not_below_steps_is_refused_naming_both_fields_and_a_fix():
    c = tiny.get_config()
    c.train.update(steps=1000, warmup_steps=2000)
    with pytest.raises(ConfigError, match=r"train.warmup_steps=2000 is not below train.steps=1000.*lower "
                                          r"warmup_steps \(e.g. to 100\) or raise steps"):
        checks.check_config(c)


def _flat(c, prefix="") -> dict:
    """{"section.field": value}, nested sections (model.moe) included."""
    out = {}
    for f, v in c.items():
        out.update(_flat(v, f"{prefix}{f}.") if isinstance(v, ml_collections.ConfigDict) else {f"{prefix}{f}": v})
    return out


def _fields(kind) -> list[str]:
    """"section.field" of every base-config field whose value is of `kind` (bools are not ints)."""
    found = [name for name, v in _flat(base.get_config()).items() if name.split(".")[0] in SECTIONS
             and isinstance(v, kind) and not isinstance(v, bool)]
    # None by default: optional sizes.
    return found + (["model.head_dim", "model.moe.expert_width"] if kind is int else [])


@pytest.mark.parametrize("name", _fields(int))
def test_every_integer_field_refuses_a_negative_value_by_name(name):
    c = base.get_config()
    c.update_from_flattened_dict({name: -7})
    with pytest.raises(ConfigError, match=rf"^{name}=-7 must be"):
        checks.check_config(c)


@pytest.mark.parametrize("name", _fields(float))
def test_every_float_field_refuses_nan_by_name(name):
    c = base.get_config()
    c.update_from_flattened_dict({name: math.nan})
    with pytest.raises(ConfigError, match=rf"^{name}=nan must be"):
        checks.check_config(c)


@pytest.mark.parametrize("fields,message", [
    ({"train.batch_size": 0}, r"train.batch_size=0 must be an integer >= 1"),
    ({"train.checkpoint_every": 0}, r"train.checkpoint_every=0 must be an integer >= 1"),
    ({"train.seq_len": -4}, r"train.seq_len=-4 must be an integer >= 1"),
    ({"train.b2": 1.0}, r"train.b2=1.0 must be in \[0, 1\)"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"mesh.data and mesh.fsdp are both -1"),
    ({"train.on_nonfinite": "ignore"}, r"train.on_nonfinite='ignore' is unknown; choose one of stop, skip"),
    ({"train.schedule": "step"}, r"train.schedule='step' is unknown"),
    ({"model.positions": "learned", "train.seq_len": 512}, r"train.seq_len=512 exceeds model.max_len=256"),
    ({"train.micro_batches": 3}, r"train.batch_size=16 is not divisible by train.micro_batches=3"),
])
def test_config_mistakes_are_named_before_any_device_is_asked(fields, message):
    c = tiny.get_config()
    c.update_from_flattened_dict(fields)
    with pytest.raises(ConfigError, match=message):
        checks.check_config(c)


@pytest.mark.parametrize("fields,message", [
    ({"train.micro_batches": 4, "train.batch_size": 16}, r"micro-batches of 4 sequences, which do not split over "
                                                         r"the 8 devices"),
    ({"train.batch_size": 12}, r"train.batch_size=12 is not divisible by the 8 devices that split the batch"),
    ({"mesh.data": 1, "mesh.tensor": 8}, r"parameter blocks\.attention\.k has kv_heads=2, not divisible"),
])
def test_mesh_mistakes_are_named_before_compiling(fields, message):
    c = tiny.get_config()
    c.update_from_flattened_dict(fields)
    with pytest.raises(ConfigError, match=message):
        checks.check(c, sharding.make_mesh(c))


@pytest.mark.parametrize("field", ["signing_key", "verify_key"])
def test_a_missing_signing_or_verify_key_is_named_at_config_time(field, tmp_path):
    c = tiny.get_config()
    c.checkpoint[field] = str(tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match=rf"checkpoint.{field}=.*absent.pem' does not exist; make a key pair"):
        checks.check_config(c)
