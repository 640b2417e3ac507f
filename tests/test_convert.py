"""Hugging Face interop, checked against transformers itself: imported models give transformers'
logits, exported ones load in transformers with heft's logits and greedy ids, and a round trip
changes no bit. Tiny random models are built here; nothing comes from the hub."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from heft.configs import base
from heft.convert import safetensors_io
from heft.convert.errors import ConvertError
from heft.convert.hf import export_hf, import_hf
from heft.convert.tokenizer import find as find_tokenizer
from heft.data import paths
from heft.model.decoder import Decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, NEW = 256, 48, 20
ATOL = 1e-4
# Scaled-up random weights (transformers' default std 0.02 gives near-zero logits that would hide errors).
HF_INIT = 0.2


def _tokens(batch=2, length=LENGTH, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _llama_hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, initializer_range=HF_INIT, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def _gpt2_hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                  initializer_range=HF_INIT, bos_token_id=None, eos_token_id=None)
    fields.update(overrides)
    return transformers.GPT2Config(**fields)


def _save_hf(model_class, hf_config, folder, seed=0, **save):
    torch.manual_seed(seed)
    model = model_class(hf_config).eval()
    model.save_pretrained(folder, safe_serialization=True, **save)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _model(config, params):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config.model, nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


def _heft_logits(config, params, tokens):
    return np.asarray(_model(config, params)(jnp.asarray(tokens)))


def _heft_greedy(config, params, prompt, new=NEW):
    """Greedy decoding by rerunning the full forward pass on a fixed-length buffer (causal, so the
    padding after position t never changes t's logits)."""
    forward = nnx.jit(lambda model, tokens: model(tokens))
    model = _model(config, params)
    buffer = np.zeros((prompt.shape[0], prompt.shape[1] + new), np.int32)
    buffer[:, : prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], buffer.shape[1]):
        buffer[:, t] = np.asarray(forward(model, jnp.asarray(buffer))[:, t - 1].argmax(-1))
    return buffer


def _hf_greedy(model, prompt, new=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out.numpy()


def _flat_numpy(params):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(params)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA, untied LlamaForCausalLM in one safetensors file, and its folder."""
    folder = str(tmp_path_factory.mktemp("llama"))
    return _save_hf(transformers.LlamaForCausalLM, _llama_hf_config(), folder), folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT2LMHeadModel saved as several shards with an index, and its folder."""
    folder = str(tmp_path_factory.mktemp("gpt2"))
    return _save_hf(transformers.GPT2LMHeadModel, _gpt2_hf_config(), folder, max_shard_size="100KB"), folder


def test_imported_llama_gives_transformers_logits(llama):
    model, folder = llama
    config, params = import_hf(folder)
    assert (config.model.heads, config.model.kv_heads, config.model.tied_embeddings) == (4, 2, False)
    tokens = _tokens()
    np.testing.assert_allclose(_heft_logits(config, params, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_imported_tied_llama_with_biases_and_wide_heads_gives_transformers_logits(tmp_path):
    hf_config = _llama_hf_config(head_dim=32, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    model = _save_hf(transformers.LlamaForCausalLM, hf_config, str(tmp_path))
    config, params = import_hf(str(tmp_path))
    assert (config.model.head_dim, config.model.tied_embeddings, config.model.use_bias) == (32, True, True)
    tokens = _tokens()
    np.testing.assert_allclose(_heft_logits(config, params, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_imported_sharded_gpt2_gives_transformers_logits(gpt2):
    model, folder = gpt2
    assert len(glob.glob(os.path.join(folder, "model-*.safetensors"))) > 1
    config, params = import_hf(folder)
    tokens = _tokens()
    np.testing.assert_allclose(_heft_logits(config, params, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_gpt2_in_the_hub_layout_imports_too(gpt2, tmp_path):
    """openai-community/gpt2's own file: no `transformer.` prefix, and causal-mask buffers."""
    model, folder = gpt2
    tensors = {}
    for file in glob.glob(os.path.join(folder, "model-*.safetensors")):
        tensors.update({k.removeprefix("transformer."): v for k, v in load_file(file).items()})
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    config, params = import_hf(str(tmp_path))
    tokens = _tokens()
    np.testing.assert_allclose(_heft_logits(config, params, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_llama3_rope_scaling_gives_transformers_logits(tmp_path):
    # Context 64 puts pairs below, inside and above the blended band of wavelengths [16, 64].
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = _save_hf(transformers.LlamaForCausalLM, _llama_hf_config(rope_parameters=rope), str(tmp_path))
    config, params = import_hf(str(tmp_path))
    assert config.model.rope_scaling == "llama3" and config.model.rope_original_max_len == 64
    tokens = _tokens(length=128)
    expected = _hf_logits(model, tokens)
    np.testing.assert_allclose(_heft_logits(config, params, tokens), expected, atol=ATOL, rtol=0)
    config.model.rope_scaling = "none"  # the test can tell: unscaled RoPE gives other logits
    assert np.abs(_heft_logits(config, params, tokens) - expected).max() > 100 * ATOL


def test_import_onto_a_mesh_places_every_parameter_in_its_shards(llama):
    from heft.train import rules, sharding

    _, folder = llama
    config, reference = import_hf(folder)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh = sharding.make_mesh(config)
    _, params = import_hf(folder, mesh=mesh)
    want = dict(nnx.to_flat_state(rules.shardings(params, mesh, config)))
    split = 0
    for path, var in nnx.to_flat_state(params):
        assert var[...].sharding.is_equivalent_to(want[path], var[...].ndim), path
        split += not var[...].sharding.is_fully_replicated
    assert split > 5
    jax.tree.map(np.testing.assert_array_equal, _flat_numpy(reference), _flat_numpy(params))


def test_import_can_keep_bfloat16_parameters(llama):
    _, folder = llama
    config, params = import_hf(folder, config_overrides={"model.param_dtype": "bfloat16"})
    assert config.model.param_dtype == "bfloat16"
    assert {v[...].dtype for _, v in nnx.to_flat_state(params)} == {jnp.dtype(jnp.bfloat16)}


def _heft_config(family, **model):
    c = base.get_config()
    m = c.model
    m.update(vocab=VOCAB, width=64, depth=2, heads=4, kv_heads=2, mlp_width=128, max_len=128)
    if family == "gpt2":
        m.update(kv_heads=4, norm="layernorm", activation="gelu", use_bias=True, tied_embeddings=True,
                 positions="learned", embed_init_std=0.02)
    m.update(model)
    return c


def _heft_params(config, seed=0):
    return nnx.state(Decoder(config.model, nnx.Rngs(seed)), nnx.Param)


EXPORTS = {
    "llama": ("llama", {}),
    "llama_tied_bias_geglu_llama3": ("llama", dict(tied_embeddings=True, use_bias=True, activation="geglu",
                                                   rope_scaling="llama3", rope_original_max_len=64)),
    "gpt2": ("gpt2", {}),
    "gpt2_untied": ("gpt2", dict(tied_embeddings=False)),
}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_exported_model_loads_in_transformers_with_same_logits_and_greedy_ids(name, tmp_path):
    family, fields = EXPORTS[name]
    config = _heft_config(family, **fields)
    params = _heft_params(config)
    files = export_hf(config, params, str(tmp_path), max_shard_bytes=100_000)
    assert safetensors_io.INDEX in files  # small shards: the sharded form with its index
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = _tokens()
    np.testing.assert_allclose(_hf_logits(model, tokens), _heft_logits(config, params, tokens), atol=ATOL, rtol=0)
    prompt = _tokens(length=8, seed=1)
    np.testing.assert_array_equal(_hf_greedy(model, prompt), _heft_greedy(config, params, prompt))


@pytest.mark.parametrize("name", list(EXPORTS))
def test_heft_to_hf_to_heft_round_trip_is_bit_identical(name, tmp_path):
    family, fields = EXPORTS[name]
    config = _heft_config(family, **fields)
    params = _heft_params(config)
    export_hf(config, params, str(tmp_path))
    back_config, back = import_hf(str(tmp_path))
    # Every model field comes back; embed_init_std is how heft initializes, which HF does not record.
    assert back_config.model.to_dict() == {**config.model.to_dict(), "embed_init_std": back_config.model.embed_init_std}
    before, after = _flat_numpy(params), _flat_numpy(back)
    assert before.keys() == after.keys()
    for path in before:
        assert before[path].dtype == after[path].dtype and before[path].tobytes() == after[path].tobytes(), path


def test_bfloat16_export_writes_bfloat16_tensors_transformers_reads(tmp_path):
    config = _heft_config("llama")
    params = _heft_params(config)
    export_hf(config, params, str(tmp_path), dtype="bfloat16")
    tensors = load_file(os.path.join(tmp_path, safetensors_io.SINGLE))
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.dtype == torch.bfloat16
    _, back = import_hf(str(tmp_path))  # bfloat16 tensors widen exactly into float32 parameters
    rounded = {k: v.astype(jnp.bfloat16).astype(np.float32) for k, v in _flat_numpy(params).items()}
    jax.tree.map(np.testing.assert_array_equal, rounded, _flat_numpy(back))


# A sentencepiece tokenizer travels with a Llama's weights.


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm

    import heft.model

    sources = sorted(glob.glob(os.path.join(os.path.dirname(heft.model.__file__), "*.py")))
    text = "\n".join(open(f).read() for f in sources)  # any text will do: heft's own model code
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=prefix,
                                   vocab_size=VOCAB, model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix + ".model"


def test_sentencepiece_tokenizer_is_imported_and_exported_with_the_weights(tmp_path, sentencepiece_model):
    import shutil

    import sentencepiece as spm

    original = str(tmp_path / "original")
    model = _save_hf(transformers.LlamaForCausalLM, _llama_hf_config(), original)
    shutil.copyfile(sentencepiece_model, os.path.join(original, "tokenizer.model"))
    tokenizer, note = find_tokenizer(paths.path(original))
    assert str(tokenizer) == os.path.join(original, "tokenizer.model") and note is None

    # The prompt as heft tokenizes it (sentencepiece, with BOS) continues as transformers continues it.
    config, params = import_hf(original)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    prompt = np.array([[sp.bos_id()] + sp.encode("def rope(x, positions, m):")])
    np.testing.assert_array_equal(_heft_greedy(config, params, prompt), _hf_greedy(model, prompt))

    exported = str(tmp_path / "exported")
    export_hf(config, params, exported, tokenizer_path=tokenizer)
    with open(os.path.join(exported, "tokenizer.model"), "rb") as a, open(tokenizer, "rb") as b:
        assert a.read() == b.read()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer("def rope(x, positions, m):").input_ids == prompt[0].tolist()
    assert json.load(open(os.path.join(exported, "config.json")))["bos_token_id"] == sp.bos_id()


def test_vocab_and_merges_without_tokenizer_json_are_left_behind_with_a_note(gpt2, tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    path, note = find_tokenizer(paths.path(tmp_path))
    assert path is None and "vocab.json and merges.txt" in note and "tokenizer.json" in note


# Errors name the problem and the fix.


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def test_unsupported_architecture_is_refused(llama, tmp_path):
    folder = _copy(llama[1], tmp_path)
    config = json.load(open(folder / "config.json"))
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(ConvertError, match=r"architectures=\['MistralForCausalLM'\].*supports LlamaForCausalLM"):
        import_hf(str(folder))


def test_missing_tensor_is_named(llama, tmp_path):
    folder = _copy(llama[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"has no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(str(folder))


def test_shape_mismatch_names_tensor_expected_and_got(llama, tmp_path):
    folder = _copy(llama[1], tmp_path)
    config = json.load(open(folder / "config.json"))
    config["intermediate_size"] = 96
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(ConvertError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128, 64\] "
                                           r"but config\.json implies \[96, 64\]"):
        import_hf(str(folder))


def test_unexpected_tensor_is_refused(llama, tmp_path):
    folder = _copy(llama[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"holds tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        import_hf(str(folder))


def test_quantized_tensor_is_refused(llama, tmp_path):
    folder = _copy(llama[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(64, np.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"tensor model\.norm\.weight has dtype I8.*dequantize"):
        import_hf(str(folder))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "model.ckpt"])
def test_pickled_weights_are_refused_unopened(llama, tmp_path, weights):
    (tmp_path / "config.json").write_text(open(os.path.join(llama[1], "config.json")).read())
    (tmp_path / weights).write_bytes(b"not opened")  # a real pickle would run code when loaded
    with pytest.raises(ConvertError, match=rf"pickled weights \({weights}\).*convert them to safetensors first"):
        import_hf(str(tmp_path))


def test_heft_model_without_hf_counterpart_is_refused_on_export(tmp_path):
    config = _heft_config("llama", positions="learned")
    with pytest.raises(ConvertError, match=r"no Hugging Face counterpart.*model\.positions='learned'"):
        export_hf(config, _heft_params(config), str(tmp_path))
