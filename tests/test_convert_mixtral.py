"""Mixtral interop against transformers itself: an imported MixtralForCausalLM gives transformers'
logits (to 1e-5 in float32) and greedy tokens, an exported heft MoE loads in transformers with heft's
logits and greedy tokens, and a round trip changes no bit. Tiny random models, nothing from the hub."""

import numpy as np
import pytest
from flax import nnx

from heft.configs import base
from heft.convert.errors import ConvertError
from heft.convert.hf import export_hf, import_hf
from heft.model.decoder import Decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import _heft_logits, _hf_logits, _model  # noqa: E402  (the same checks as the dense models')

VOCAB, LENGTH, NEW = 256, 40, 16
ATOL = 1e-5


def _tokens(batch=2, length=LENGTH, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _hf_model(folder, seed=0):
    """A GQA MixtralForCausalLM with 4 experts, 2 per token, saved as safetensors. Its random weights
    are transformers' own init (std 0.02), scaled so that routing and logits are far from uniform."""
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10.0 if "gate.weight" in name else 5.0)  # std 0.1; the router's 0.2 (varied choices)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _hf_greedy(model, prompt, new=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out.numpy()


def _heft_greedy(config, params, prompt, new=NEW):
    """heft's own decoding (eval/generate.py: the KV cache), greedy."""
    from heft.eval.generate import generate

    rows = generate(_model(config, params), [list(map(int, p)) for p in prompt], new, eos_id=None)
    return np.array([list(p) + list(r) for p, r in zip(prompt, rows)])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mixtral"))
    return _hf_model(folder), folder


def test_imported_mixtral_gives_transformers_logits_and_greedy_tokens(mixtral):
    model, folder = mixtral
    config, params = import_hf(folder)
    m = config.model
    assert (m.mlp, m.moe.experts, m.moe.top_k, m.moe.balance_loss_weight, m.rope_theta) == ("moe", 4, 2, 0.02, 1e6)
    tokens = _tokens()
    expected = _hf_logits(model, tokens)
    np.testing.assert_allclose(_heft_logits(config, params, tokens), expected, atol=ATOL, rtol=0)
    assert np.abs(expected).max() > 1.0  # the logits are not all near zero, so 1e-5 says something
    prompt = _tokens(length=8, seed=1)
    np.testing.assert_array_equal(_heft_greedy(config, params, prompt), _hf_greedy(model, prompt))


def _heft_moe_config(**moe):
    c = base.get_config()
    c.model.update(vocab=VOCAB, width=64, depth=2, heads=4, kv_heads=2, mlp_width=96, max_len=128, mlp="moe",
                   init_scale=2.0, rope_theta=1e6)
    c.model.moe.update(experts=4, top_k=2, **moe)
    return c


def test_exported_moe_loads_in_transformers_with_same_logits(tmp_path):
    config = _heft_moe_config()
    params = nnx.state(Decoder(config.model, nnx.Rngs(0)), nnx.Param)
    export_hf(config, params, str(tmp_path), max_shard_bytes=200_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    tokens = _tokens()
    np.testing.assert_allclose(_hf_logits(model, tokens), _heft_logits(config, params, tokens), atol=ATOL, rtol=0)


def test_moe_to_hf_to_heft_round_trip_is_bit_identical(tmp_path):
    config = _heft_moe_config(balance_loss_weight=0.02)
    params = nnx.state(Decoder(config.model, nnx.Rngs(0)), nnx.Param)
    export_hf(config, params, str(tmp_path))
    back_config, back = import_hf(str(tmp_path))
    assert back_config.model.to_dict() == {**config.model.to_dict(), "embed_init_std": back_config.model.embed_init_std,
                                           "init_scale": back_config.model.init_scale}
    before, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(back))
    assert before.keys() == after.keys()
    for path in before:
        assert np.asarray(before[path][...]).tobytes() == np.asarray(after[path][...]).tobytes(), path


def test_a_moe_is_not_exported_as_a_llama_nor_a_dense_model_as_a_mixtral(tmp_path):
    from heft.convert import hf, llama

    config = _heft_moe_config()
    config.model.activation = "gelu"  # no family has a gelu MoE
    params = nnx.state(Decoder(config.model, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ConvertError, match=r"not LlamaForCausalLM: .*model.mlp='moe' \(LlamaForCausalLM: dense\).*"
                                           r"not MixtralForCausalLM: model.activation='gelu'"):
        export_hf(config, params, str(tmp_path))
    config.model.update(mlp="dense", activation="swiglu")
    assert hf.family_for(config.model) is llama
