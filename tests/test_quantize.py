"""Weight-only quantization (heft quantize): the quantized model is qwix's own, its integers stay
within a scale of the float weights, checkpoints keep them bit for bit, and what size counts is
what is stored."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import workers

from heft.configs import tiny
from heft.model.build import bind as bind_float
from heft.model.build import init_params
from heft.model.checks import ConfigError
from heft.train import checkpoint, sharding

qwix = pytest.importorskip("qwix")

from heft.eval.generate import full_forward_generate, generate  # noqa: E402
from heft.quantize import checkpoint as qcheckpoint  # noqa: E402
from heft.quantize import model as qmodel  # noqa: E402
from heft.quantize import rules  # noqa: E402

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 255, (2, 24)), jnp.int32)
SCHEMES = [("int8", 0), ("int4", 32)]


def _config(weights="int8", group_size=0, **model):
    c = tiny.get_config()
    c.model.update(depth=2, vocab=255, **model)  # an odd vocab: the readout's int4 rows pack with a pad
    c.quantize.update(weights=weights, group_size=group_size)
    return c


@pytest.fixture(scope="module")
def float_params():
    return init_params(_config().model, 0)


@pytest.mark.parametrize("weights,group_size", SCHEMES)
def test_quantized_forward_after_save_and_restore_equals_qwix_quantizing_the_model_itself(
        tmp_path, float_params, weights, group_size):
    c = _config(weights, group_size)
    reference = qwix.quantize_model(bind_float(c.model, float_params),
                                    qwix.PtqProvider(rules.qwix_rules(c)), TOKENS)(TOKENS)
    mesh = checkpoint.serving_mesh(c)
    qcheckpoint.save(str(tmp_path / "q"), c, qmodel.quantize(c, float_params, mesh))
    loaded = checkpoint.load(str(tmp_path / "q"))
    config, qparams, bind = loaded.config, loaded.params, loaded.bind
    assert loaded.kind == "quantized"
    with sharding.activated(mesh, config):
        logits = jax.jit(lambda p, t: bind(config.model, p)(t))(qparams, TOKENS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5)
    # ... and the float model on the dequantized weights computes the same (weight-only: the
    # matmul of the integers times the scale is the matmul of their product).
    dequantized = jax.tree.map(lambda x: x, float_params)
    for path in ("q", "k", "v", "o"):
        dequantized["blocks"]["attention"][path] = _dequantize(qparams["blocks"]["attention"][path]["array"])
    for path in ("up", "gate", "down"):
        dequantized["blocks"]["mlp"][path] = _dequantize(qparams["blocks"]["mlp"][path]["array"])
    dequantized["readout"] = _dequantize(qparams["readout"]["array"])
    np.testing.assert_allclose(np.asarray(bind_float(c.model, dequantized)(TOKENS)), np.asarray(reference),
                               rtol=1e-4, atol=1e-4)


def _dequantize(a):
    """qvalue * scale with each scale repeated over its group (numpy: independent of qwix)."""
    q, s = np.asarray(a["qvalue"].astype(jnp.float32)), np.asarray(a["scale"])
    for axis, (n, g) in enumerate(zip(q.shape, s.shape)):
        s = np.repeat(s, n // g, axis=axis)
    return jnp.asarray(q * s)


def test_int8_round_trip_of_a_weight_stays_within_half_its_scale(float_params):
    c = _config("int8")
    qparams = qmodel.quantize(c, float_params, checkpoint.serving_mesh(c))
    w = np.asarray(float_params["readout"])  # [embed, vocab]: one scale per output column
    a = qparams["readout"]["array"]
    scale = np.asarray(a["scale"])
    # qwix's symmetric int8 maps each column's largest magnitude to 127.5, the top of the 127 bucket.
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0, keepdims=True) / 127.5, rtol=1e-6)
    error = np.abs(np.asarray(a["qvalue"], np.float32) * scale - w)
    assert (error <= scale / 2 + 1e-7).all()  # (float32 rounding of the product: ~1e-9 here)
    assert np.asarray(a["qvalue"]).dtype == np.int8


def test_int4_values_pack_two_to_a_byte_low_nibble_first():
    values = np.array([[-8, 7, 0, -1, 3]], np.int8)  # odd length: padded with a zero
    packed = np.asarray(qcheckpoint.pack(jnp.asarray(values, jnp.int4)))
    nibbles = np.append(values, 0) & 0xF
    assert packed.dtype == np.uint8 and packed.tolist() == [(nibbles[0::2] | nibbles[1::2] << 4).tolist()]
    back = qcheckpoint.unpack(jnp.asarray(packed), 5)
    assert np.asarray(back.astype(jnp.int8)).tolist() == values.tolist()


@pytest.mark.parametrize("weights,group_size", SCHEMES)
def test_quantized_checkpoint_restores_bit_for_bit_on_another_mesh(tmp_path, float_params, weights, group_size):
    c = _config(weights, group_size)
    qparams = qmodel.quantize(c, float_params, checkpoint.serving_mesh(c))
    qcheckpoint.save(str(tmp_path / "q"), c, qparams)
    other = c.copy_and_resolve_references()
    other.mesh.data, other.mesh.fsdp, other.mesh.tensor = 2, 2, 2
    restored = checkpoint.load(str(tmp_path / "q"), mesh=sharding.make_mesh(other)).params
    for a, b in zip(jax.tree.leaves(qparams), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    # int4 is stored packed: half a byte per value, plus what stays float.
    if weights == "int4":
        directory = checkpoint.resolve(str(tmp_path / "q"))
        stored = checkpoint.read_params(directory, qcheckpoint._stored_abstract(c, checkpoint.serving_mesh(c)))
        assert stored["blocks"]["mlp"]["down"]["array"]["qvalue"].dtype == jnp.uint8


def test_float_tools_refuse_a_quantized_checkpoint_in_one_line(tmp_path, float_params):
    c = _config("int8")
    qcheckpoint.save(str(tmp_path / "q"), c, qmodel.quantize(c, float_params, checkpoint.serving_mesh(c)))
    with pytest.raises(checkpoint.CheckpointError, match="holds int8 weights"):
        checkpoint.load_params(str(tmp_path / "q"))


def test_generate_with_a_cache_equals_full_forward_passes_of_the_quantized_model(float_params):
    c = _config("int4", 32)
    model = qmodel.bind(c, qmodel.quantize(c, float_params, checkpoint.serving_mesh(c)))
    prompts = [[5, 6, 7, 8], [11, 12]]
    assert generate(model, prompts, 8) == full_forward_generate(model, prompts, 8)


def test_size_counts_the_bytes_quantize_stores(float_params):
    from heft.train import size

    c = _config("int4", 32)
    qparams = qmodel.quantize(c, float_params, checkpoint.serving_mesh(c))
    r = size.report(c, quantized={"int4/g32": qmodel.abstract_params(c)})
    by_dtype = {}
    for x in jax.tree.leaves(qparams):  # what is in memory, counted here independently
        n = x.size / 2 if x.dtype == jnp.int4 else x.size * x.dtype.itemsize
        by_dtype[jnp.dtype(x.dtype).name] = by_dtype.get(jnp.dtype(x.dtype).name, 0) + n
    assert r["bytes_by_dtype"]["int4/g32"] == by_dtype
    assert r["bytes"]["int4/g32"] == sum(by_dtype.values())
    # Every matmul weight is int4; the embedding and norms stay float32.
    matmul = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(float_params)
                 if "norm" not in str(p) and "embed" not in str(p))
    assert by_dtype["int4"] == matmul / 2


@pytest.mark.parametrize("group_size,field", [(64, "head_dim=32"), (48, "model.width=128")])
def test_a_group_size_that_does_not_divide_a_width_is_refused_naming_it(group_size, field):
    with pytest.raises(ConfigError, match=f"group_size={group_size} does not divide {field}"):
        rules.check(_config("int4", group_size))


def test_quantize_verb_stops_in_one_line_on_a_bad_group_size(tmp_path, float_params):
    c = _config()
    c.quantize.weights = "none"
    checkpoint.save_params(str(tmp_path / "float"), c, float_params)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=workers.xla_flags(1))
    r = subprocess.run([sys.executable, "-c", "from heft.launch.cli import main; main()", "quantize",
                        f"--checkpoint={tmp_path / 'float'}", f"--out={tmp_path / 'q'}", "--weights=int4",
                        "--group_size=64"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("heft quantize: quantize.group_size=64 does not divide head_dim=32")
    assert not (tmp_path / "q").exists()


def test_qat_trains_against_the_weights_heft_quantize_will_write(float_params):
    from heft.quantize import qat
    from heft.train import step

    c = _config("int4", 32)
    c.quantize.qat = True
    tokens = TOKENS
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
             "weights": jnp.ones(tokens.shape, jnp.float32)}
    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda p: step.loss_sums(c, p, batch, bind=qat.binder(c)), has_aux=True))(float_params)
    ptq = c.copy_and_resolve_references()
    ptq.quantize.qat = False
    quantized = qmodel.quantize(ptq, float_params, checkpoint.serving_mesh(ptq))
    assert float(loss) == pytest.approx(float(step.loss_sums(ptq, quantized, batch, bind=qmodel.binder(ptq))[0]),
                                        rel=1e-6)
    assert float(loss) != pytest.approx(float(step.loss_sums(c, float_params, batch)[0]), rel=1e-6)
    # Straight through: every weight the rounding sees still gets a gradient.
    for name in ("q", "k", "v", "o"):
        assert float(jnp.abs(grads["blocks"]["attention"][name]).max()) > 0
    assert float(jnp.abs(grads["readout"]).max()) > 0


def test_qat_without_an_integer_type_is_refused():
    from heft.quantize import qat

    c = _config("none")
    c.quantize.qat = True
    with pytest.raises(ConfigError, match="quantize.qat=true needs quantize.weights=int8 or int4"):
        qat.binder(c)
