"""Parameter counts equal the published ones, computed without allocating the model."""

import json
import subprocess

import pytest

from heft.configs import gpt2_124m, llama2_7b, llama2_70b, llama3_8b, tiny
from heft.train import size

PUBLISHED = [
    (gpt2_124m, 124_439_808),
    (llama2_7b, 6_738_415_616),
    (llama2_70b, 68_976_648_192),
    (llama3_8b, 8_030_261_248),
]


@pytest.mark.parametrize("preset,count", PUBLISHED, ids=lambda p: getattr(p, "__name__", str(p)))
def test_parameter_count_equals_published(preset, count):
    assert size.report(preset.get_config())["total_params"] == count


def test_tiny_count_equals_closed_form():
    m = tiny.get_config().model
    dh = m.width // m.heads
    attention = m.width * dh * (2 * m.heads + 2 * m.kv_heads)
    mlp = 3 * m.width * m.mlp_width
    expected = 2 * m.vocab * m.width + m.depth * (attention + mlp + 2 * m.width) + m.width
    assert size.report(tiny.get_config())["total_params"] == expected


def test_flops_per_token_is_six_n_plus_attention():
    c = llama2_7b.get_config()
    r = size.report(c, batch=1, seq_len=4096)
    n = r["total_params"] - 32000 * 4096  # the input embedding is a lookup, not a matmul
    assert r["flops_per_token"] == 6 * n + 12 * 32 * 4096 * 4096


def test_size_cli_prints_json_with_total_params():
    out = subprocess.run(
        ["heft", "size", "--config.model.depth=2", "--json"], capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out)
    c = tiny.get_config()
    c.model.depth = 2
    assert r["total_params"] == size.report(c)["total_params"]
    assert r["bytes"]["bf16"] == 2 * r["total_params"]


def _optax_state_bytes(c) -> tuple[int, int]:
    """(parameters, bytes of the optimizer's state arrays) as optax itself allocates them (shapes
    only), the scalar step counts aside."""
    import jax

    from heft.model.build import init_params
    from heft.train import optimizer

    params = jax.eval_shape(lambda: init_params(c.model, 0))
    state = jax.eval_shape(optimizer.make(c.train).init, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    return n, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim > 0)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_optimizer_memory_is_what_optax_allocates_for_the_parameter_dtype(param_dtype):
    from heft.train import optimizer

    c = tiny.get_config()
    c.model.param_dtype = param_dtype
    n, nbytes = _optax_state_bytes(c)
    assert nbytes == n * optimizer.state_bytes_per_param(param_dtype)
    assert size.report(c)["training_bytes"]["optimizer"] == nbytes


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_size_and_plan_count_the_same_optimizer_bytes(param_dtype):
    """heft plan reads the optimizer state's shards off the real train state: over 8 devices of an
    fsdp mesh they add up to what heft size counts (plus the replicated scalar counts)."""
    from heft.launch import plan
    from heft.train import sharding

    c = tiny.get_config()
    c.model.param_dtype = param_dtype
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    _, per_device = plan.state_bytes(c, sharding.make_mesh(c))
    assert 8 * per_device == pytest.approx(size.report(c)["training_bytes"]["optimizer"], rel=1e-4)
