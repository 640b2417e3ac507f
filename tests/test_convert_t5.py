"""T5 v1.1 (T5ForConditionalGeneration) in and out of heft, checked against transformers itself: an
imported model gives transformers' logits on padded inputs and its greedy output, an exported one
loads in transformers untied with heft's logits, and a round trip changes no bit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from heft.convert.errors import ConvertError
from heft.convert.hf import export_hf, import_hf
from heft.eval import seq2seq
from heft.model.build import bind, init_params
from heft.model.checks import head_dim

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, NEW = 256, 12
ATOL = 1e-5


def _hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.0)
    return transformers.T5Config(**{**fields, **overrides})


def _v1_1(folder, seed=0, **overrides):
    """A random T5 saved as the hub's v1.1 checkpoints are: its own lm_head.weight and
    "tie_word_embeddings": false (transformers 5 ties T5 when built in code, so both are added)."""
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(_hf_config(**overrides)).save_pretrained(folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["lm_head.weight"] = np.random.default_rng(seed).normal(0, 0.3, (VOCAB, 64)).astype(np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(folder, "config.json")))
    config.pop("scale_decoder_outputs")
    json.dump({**config, "tie_word_embeddings": False}, open(os.path.join(folder, "config.json"), "w"))
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    return model


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t5"))
    return _v1_1(folder), folder


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    inputs, targets = rng.integers(2, VOCAB, (2, 24)), rng.integers(2, VOCAB, (2, 10))
    mask = np.ones_like(inputs)
    mask[1, 15:] = 0  # the second input is 15 tokens, padded
    return inputs, mask, targets


def _hf_logits(model, inputs, mask, targets):
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(targets)).logits.numpy()


_forward = nnx.jit(lambda model, inputs, targets, mask: model(inputs, targets, mask))  # one compile per model


def _heft_logits(config, params, inputs, mask, targets):
    model = bind(config.model, nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    return np.asarray(_forward(model, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask)))


def test_imported_t5_gives_transformers_logits_on_padded_inputs(t5):
    model, folder = t5
    config, params = import_hf(folder)
    m = config.model
    assert (m.family, m.encoder_depth, m.depth, head_dim(m), m.activation) == ("encoder_decoder", 2, 3, 16, "geglu")
    inputs, mask, targets = _inputs()
    np.testing.assert_allclose(_heft_logits(config, params, inputs, mask, targets),
                               _hf_logits(model, inputs, mask, targets), atol=ATOL, rtol=0)


def test_imported_t5_writes_transformers_greedy_output(t5):
    model, folder = t5
    config, params = import_hf(folder)
    inputs, mask, _ = _inputs(seed=1)
    prompts = [row[m > 0].tolist() for row, m in zip(inputs, mask)]
    with torch.no_grad():  # (transformers 5.24's cache sizes itself by the encoder's depth: 2 of 3 layers; none here)
        want = model.generate(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask), do_sample=False,
                              max_new_tokens=NEW, min_new_tokens=NEW, use_cache=False).numpy()[:, 1:]  # after the start
    got = seq2seq.generate(bind(config.model, nnx.to_pure_dict(params)), prompts, NEW)
    assert got == want.tolist()


def test_a_model_transformers_5_saved_tied_and_unscaled_imports_too(tmp_path):
    torch.manual_seed(1)
    # (the tied readout is the embedding, std 1: logits of ~40 at the default init; at 0.3 those of the test above)
    model = transformers.T5ForConditionalGeneration(_hf_config(tie_word_embeddings=False, initializer_factor=0.3)).eval()
    assert not model.config.scale_decoder_outputs and model.lm_head.weight is model.shared.weight
    model.save_pretrained(str(tmp_path))
    config, params = import_hf(str(tmp_path))
    inputs, mask, targets = _inputs()
    np.testing.assert_allclose(_heft_logits(config, params, inputs, mask, targets),
                               _hf_logits(model, inputs, mask, targets), atol=ATOL, rtol=0)


def test_t5_v1_0_with_its_scaled_tied_readout_is_refused(t5, tmp_path):
    _, folder = t5
    config = json.load(open(os.path.join(folder, "config.json")))
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(os.path.join(folder, "model.safetensors"))
    with pytest.raises(ConvertError, match=r"T5 v1.0's readout .* heft imports T5 v1.1"):
        import_hf(str(tmp_path))


@pytest.fixture(scope="module")
def heft_t5():
    """(config, parameters) of a random heft encoder-decoder shaped as the T5 above."""
    from heft.configs import t5_tiny

    c = t5_tiny.get_config()
    c.model.update(vocab=VOCAB, width=64, depth=3, encoder_depth=2, heads=4, kv_heads=4, mlp_width=128,
                   relative_buckets=8, relative_max_distance=20, init_scale=2.0)  # livelier logits than at 1
    return c, jax.device_get(jax.jit(lambda: init_params(c.model, 0))())


def test_exported_t5_loads_untied_in_transformers_with_heft_logits(heft_t5, tmp_path):
    config, params = heft_t5
    export_hf(config, params, str(tmp_path))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr() and not model.config.scale_decoder_outputs
    inputs, mask, targets = _inputs()
    np.testing.assert_allclose(_hf_logits(model, inputs, mask, targets),
                               _heft_logits(config, params, inputs, mask, targets), atol=ATOL, rtol=0)


def test_heft_to_hf_to_heft_round_trip_is_bit_identical(heft_t5, tmp_path):
    config, params = heft_t5
    export_hf(config, params, str(tmp_path))
    back_config, back = import_hf(str(tmp_path))
    fields = ("family", "vocab", "width", "depth", "encoder_depth", "heads", "kv_heads", "mlp_width", "max_len",
              "activation", "norm", "norm_eps", "relative_buckets", "relative_max_distance", "decoder_start")
    assert {f: back_config.model[f] for f in fields} == {f: config.model[f] for f in fields}
    before = jax.tree_util.tree_flatten_with_path(params)[0]
    after = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(back))[0])
    assert len(before) == len(after)
    for path, x in before:
        assert np.asarray(after[path]).tobytes() == np.asarray(x).tobytes(), path
