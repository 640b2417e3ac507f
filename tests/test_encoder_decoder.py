"""The encoder-decoder (T5 v1.1 family): relative position buckets as transformers computes them, a
bidirectional encoder, a causal decoder, cross-attention that never sees padding, packed examples
kept apart, cached generation, sharding, its size, and the config errors it adds."""

import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from heft.configs import t5_tiny, t5_v1_1_base
from heft.model import relative
from heft.model.build import bind, init_params
from heft.model.checks import ConfigError, check_model


def _config(**model):
    c = t5_tiny.get_config()
    c.model.update(vocab=256, width=32, depth=2, encoder_depth=1, heads=4, kv_heads=4, mlp_width=64,
                   relative_buckets=8, relative_max_distance=20)
    c.model.update(**{"remat": "none", **model})
    return c


@pytest.fixture(scope="module")
def model():
    c = _config()
    return bind(c.model, jax.jit(lambda: init_params(c.model, 0))())


# Jitted calls (eager ones dispatch op by op: many times slower); most tests share these shapes.
forward = nnx.jit(lambda model, inputs, tokens, input_segments=None, segments=None:
                  model(inputs, tokens, input_segments, segments))
encode = nnx.jit(lambda model, inputs: model.encode(inputs))


def _tokens(batch, length, seed=0, vocab=256):
    return jax.random.randint(jax.random.key(seed), (batch, length), 4, vocab)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_buckets_equal_transformers(bidirectional, buckets, max_distance):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    distances = np.arange(-600, 601)
    want = t5.T5Attention._relative_position_bucket(torch.tensor(distances), bidirectional, buckets, max_distance)
    got = relative.bucket(jnp.asarray(distances), bidirectional, buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_changing_a_later_input_token_changes_earlier_encoder_outputs(model):
    tokens = _tokens(2, 16)
    changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % 256)
    a, b = encode(model, tokens), encode(model, changed)
    assert np.abs(np.asarray(a[:, :12] - b[:, :12])).min(axis=-1).max() > 0  # every earlier position moved
    assert not np.allclose(a[:, 0], b[:, 0])


def test_changing_decoder_token_t_never_changes_earlier_logits(model):
    inputs, tokens = _tokens(2, 16), _tokens(2, 11, seed=1)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
    a, b = forward(model, inputs, tokens), forward(model, inputs, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(a[:, 7], b[:, 7])


def test_cross_attention_masks_the_padding_of_the_encoder_input(model):
    """A 10-token input padded to 16 with any tokens gives the logits of the unpadded input."""
    inputs, tokens = _tokens(1, 16), _tokens(1, 11, seed=1)
    segments, ones = jnp.asarray([[1] * 10 + [0] * 6]), jnp.ones((1, 11), jnp.int32)
    padded = forward(model, inputs, tokens, segments, ones)
    other_padding = forward(model, inputs.at[:, 10:].set(7), tokens, segments, ones)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(other_padding))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(model(inputs[:, :10], tokens)), atol=1e-5)
    unmasked = forward(model, inputs, tokens, jnp.ones_like(segments), ones)  # the test can tell
    assert np.abs(np.asarray(unmasked - padded)).max() > 1e-3


def test_packed_examples_give_the_logits_they_give_alone(model):
    """Two examples in one row (segments 1 and 2 on both sides) see only themselves: each gives the
    logits it gives alone in the row (the rest padding, which test_cross_attention... shows is unseen)."""
    inputs, tokens = _tokens(1, 16), _tokens(1, 11, seed=1)
    input_segments, segments = jnp.asarray([[1] * 9 + [2] * 7]), jnp.asarray([[1] * 5 + [2] * 6])
    packed = forward(model, inputs, tokens, input_segments, segments)
    for k in (1, 2):
        alone = forward(model, inputs, tokens, jnp.where(input_segments == k, 1, 0), jnp.where(segments == k, 1, 0))
        mine = np.asarray(segments[0] == k)
        np.testing.assert_allclose(np.asarray(packed)[:, mine], np.asarray(alone)[:, mine], atol=1e-5)
    first = np.asarray(forward(model, inputs[:, :9], tokens[:, :5]))  # and example 1 cut out alone
    np.testing.assert_allclose(np.asarray(packed)[:, :5], first, atol=1e-5)


def test_unrolled_rematerialized_stacks_give_the_scanned_loss_and_gradients():
    inputs, tokens = _tokens(2, 12), _tokens(2, 8, seed=1)

    def loss_and_grads(**fields):
        c = _config(**fields)
        params = jax.jit(lambda: init_params(c.model, 0))()
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(bind(c.model, p)(inputs, tokens), tokens).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads()  # scanned, nothing recomputed
    got_loss, got_grads = loss_and_grads(scan_layers=False, remat="save_matmuls")
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, ref_grads)


def test_greedy_with_cache_equals_argmax_of_full_decoder_passes(model):
    from heft.eval import seq2seq

    prompts = [[5, 6, 7, 8, 9, 1], [11, 12, 1], list(range(100, 114)) + [1]]  # padded to 16
    cached = seq2seq.generate(model, prompts, 10)
    assert cached == seq2seq.full_forward_generate(model, prompts, 10)
    sampled = seq2seq.generate(model, prompts, 10, temperature=1.0, seed=3)
    assert sampled == seq2seq.generate(model, prompts, 10, temperature=1.0, seed=3) != cached


def test_sharded_on_8_devices_gives_the_single_device_logits_and_loss():
    from heft.train import compiled, sharding

    c = _config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.train.update(batch_size=8, seq_len=16, target_len=8)
    rng = np.random.default_rng(0)
    batch = {"encoder_inputs": rng.integers(4, 256, (8, 16)), "encoder_segment_ids": np.ones((8, 16)),
             "inputs": rng.integers(4, 256, (8, 8)), "targets": rng.integers(4, 256, (8, 8)),
             "segment_ids": np.ones((8, 8)), "weights": np.ones((8, 8))}
    batch = {k: v.astype(np.float32 if k == "weights" else np.int32) for k, v in batch.items()}
    params = jax.jit(lambda: init_params(c.model, 0))()
    reference = jax.jit(lambda p, b: bind(c.model, p)(b["encoder_inputs"], b["inputs"]))(params, batch)
    reference_loss = optax.softmax_cross_entropy_with_integer_labels(reference, batch["targets"]).mean()

    mesh = sharding.make_mesh(c)
    placed = jax.device_put(params, sharding.param_dict_shardings(c.model, mesh, c))
    split = [x for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated]
    assert len(split) > 10
    with sharding.activated(mesh, c):
        on_mesh = jax.device_put(batch, sharding.batch_sharding(c, mesh))
        logits = jax.jit(lambda p, b: bind(c.model, p)(b["encoder_inputs"], b["inputs"]))(placed, on_mesh)
        loss_sum, weight_sum = compiled.eval_step(c, mesh)(placed, on_mesh)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=1e-5)
    np.testing.assert_allclose(float(loss_sum / weight_sum), float(reference_loss), rtol=1e-5)


def test_t5_v1_1_base_has_its_published_parameter_count():
    from heft.train import size

    r = size.report(t5_v1_1_base.get_config())
    assert r["total_params"] == 247_577_856
    assert r["components"]["encoder relative_bias"] == r["components"]["decoder relative_bias"] == 32 * 12
    assert r["target_len"] == 114  # span corruption of 512 inputs, as T5's compute_input_and_target_lengths


@pytest.mark.parametrize("fields,says", [
    ({"tied_embeddings": True}, "model.tied_embeddings=True is not supported with model.family=encoder_decoder"),
    ({"positions": "rope"}, "set model.positions=relative"),
    ({"relative_max_distance": 4}, "model.relative_max_distance=4 must exceed model.relative_buckets // 2 = 4"),
    ({"adapter_width": 8}, "an encoder_decoder fine-tunes with finetune.method=full or lora"),
    ({"family": "decoder"}, "model.positions='relative' is T5's bucketed bias"),
])
def test_a_bad_encoder_decoder_config_names_the_field_and_the_fix(fields, says):
    c = _config(**fields)
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_model(c.model)


def test_an_input_longer_than_max_len_is_refused_before_compiling(model):
    from heft.eval import seq2seq

    with pytest.raises(ConfigError, match=r"prompt 0 is 300 tokens with its EOS but model.max_len=256"):
        seq2seq.generate(model, [[5] * 299 + [1]], 4)


def test_the_command_line_says_a_tied_encoder_decoder_in_one_line():
    r = subprocess.run(["heft", "size", "--config=configs/t5_tiny.py", "--config.model.tied_embeddings=true"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "set model.tied_embeddings=false" in r.stderr
