"""The decoder's behaviour: causality, initial scale, scan vs unrolled, its variants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from heft.configs import gpt2_124m, tiny
from heft.model.decoder import Decoder


def _tokens(c, batch=2, length=32, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, c.model.vocab)


def test_changing_token_t_never_changes_earlier_logits():
    c = tiny.get_config()
    model = Decoder(c.model, nnx.Rngs(0))
    tokens = _tokens(c)
    t = 17
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % c.model.vocab)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert not np.allclose(a[:, t], b[:, t])


def test_initial_loss_is_near_log_vocab():
    c = tiny.get_config()
    model = Decoder(c.model, nnx.Rngs(0))
    tokens = _tokens(c, batch=8, length=128)
    loss = optax.softmax_cross_entropy_with_integer_labels(model(tokens)[:, :-1], tokens[:, 1:]).mean()
    assert abs(float(loss) - np.log(c.model.vocab)) < 0.15


@pytest.mark.parametrize("depth", [2, 8, 32])
def test_residual_stream_scale_stays_within_2x_over_depth(depth):
    c = tiny.get_config()
    c.model.depth = depth
    _, hidden = Decoder(c.model, nnx.Rngs(0))(_tokens(c, batch=4, length=64), return_hidden=True)
    std = np.asarray(hidden.std(axis=(1, 2, 3)))  # after each block
    assert std.max() / std.min() < 2.0, std


def test_unrolled_blocks_equal_scanned_blocks():
    c = tiny.get_config()
    tokens = _tokens(c)
    scanned = Decoder(c.model, nnx.Rngs(0))(tokens)
    c.model.scan_layers = False
    unrolled = Decoder(c.model, nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)


def test_remat_does_not_change_gradients():
    c = tiny.get_config()
    tokens = _tokens(c)

    def grads(remat):
        c.model.remat = remat
        model = Decoder(c.model, nnx.Rngs(0))
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens).mean()
        return nnx.grad(loss)(model)

    ref = grads("none")
    for policy in ("full", "save_matmuls"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, grads(policy))


def test_the_cpu_s_flattened_projections_give_the_accelerators_einsums_logits_and_gradients(monkeypatch):
    """model/dense.py: one 2-D matmul over batch x length on the CPU, the 3-D einsum on a TPU or GPU."""
    from heft.model import kernels

    c = tiny.get_config()
    c.model.use_bias, c.model.adapter_width = True, 8  # every projection, biases and adapters too
    tokens = _tokens(c)

    def logits_and_grads():
        model = Decoder(c.model, nnx.Rngs(0))
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens).mean()
        return model(tokens), nnx.grad(loss)(model)

    cpu = logits_and_grads()
    monkeypatch.setattr(kernels, "platform", lambda: "tpu")
    tpu = logits_and_grads()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), cpu, tpu)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_grouped_kv_heads_equal_repeated_full_heads(kv_heads):
    """GQA is MHA whose key/value heads are copies: build that MHA and compare logits."""
    c = tiny.get_config()
    c.model.kv_heads = kv_heads
    gqa = Decoder(c.model, nnx.Rngs(0))
    c.model.kv_heads = c.model.heads
    mha = Decoder(c.model, nnx.Rngs(0))
    group = c.model.heads // kv_heads
    for name in ("k", "v"):
        w = getattr(gqa.blocks.attention, name)[...]
        getattr(mha.blocks.attention, name)[...] = jnp.repeat(w, group, axis=2)
    for name in ("q", "o"):
        getattr(mha.blocks.attention, name)[...] = getattr(gqa.blocks.attention, name)[...]
    mha.embed[...], mha.readout[...] = gqa.embed[...], gqa.readout[...]
    tokens = _tokens(c)
    np.testing.assert_allclose(gqa(tokens), mha(tokens), atol=1e-5)


def test_gpt2_style_parts_run_and_stay_causal():
    c = gpt2_124m.get_config()
    m = c.model
    m.vocab, m.width, m.depth, m.heads, m.kv_heads, m.mlp_width, m.max_len = 512, 64, 2, 4, 4, 256, 64
    model = Decoder(m, nnx.Rngs(0))
    assert set(nnx.to_pure_dict(nnx.state(model)["blocks"]["attention_norm"])) == {"scale", "offset"}
    tokens = _tokens(c, length=16)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % m.vocab)
    np.testing.assert_array_equal(model(tokens)[:, :9], model(changed)[:, :9])


def test_document_mask_keeps_attention_inside_a_document():
    c = tiny.get_config()
    c.model.document_mask = True
    model = Decoder(c.model, nnx.Rngs(0))
    tokens = _tokens(c, batch=1, length=16)
    segments = jnp.array([[1] * 8 + [2] * 8])
    positions = jnp.array([list(range(8)) * 2])
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % c.model.vocab)  # inside document 1
    a = model(tokens, positions, segments)
    b = model(changed, positions, segments)
    np.testing.assert_array_equal(a[:, 8:], b[:, 8:])  # document 2 never saw it
    # and document 2 alone gives the same logits as when packed after document 1
    alone = model(tokens[:, 8:], positions[:, 8:], segments[:, 8:] * 0 + 1)
    np.testing.assert_allclose(a[:, 8:], alone, atol=1e-5)


def test_bfloat16_compute_keeps_float32_logits_close():
    c = tiny.get_config()
    tokens = _tokens(c)
    ref = Decoder(c.model, nnx.Rngs(0))(tokens)
    c.model.compute_dtype = "bfloat16"
    out = Decoder(c.model, nnx.Rngs(0))(tokens)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05


def test_compiled_program_does_not_grow_with_depth():
    """Blocks run under a scan: 32 layers compile to the same program as 2 (so, as fast)."""
    def hlo_lines(depth):
        c = tiny.get_config()
        c.model.depth = depth
        tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(c.model, nnx.Rngs(0))))
        forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
        return len(forward.lower(state, tokens).compile().as_text().splitlines())

    assert hlo_lines(32) <= 1.05 * hlo_lines(2)
