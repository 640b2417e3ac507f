"""The Llama family (Llama 1-3.x, and anything saved as LlamaForCausalLM): config.json <-> heft
config, and every tensor's name, shape and layout.

torch Linear weights are [out, in]; heft keeps [in, ...] with heads split out, e.g. q_proj
[heads * head_dim, embed] <-> q [embed, heads, head_dim]. Hub checkpoints already use the
half-rotation RoPE layout heft uses, so no rows are permuted.
"""

from heft.configs import base
from heft.convert.errors import ConvertError
from heft.convert.hf_folder import FLAG, NUMBER, SIZE, TEXT, obj, optional
from heft.convert.mapping import one, transposed
from heft.model.checks import head_dim

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
# hidden_act of the gate <-> heft's gated activation (heft's gelu is the tanh approximation).
ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
TO_HF_ACTIVATION = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# config.json's fields this family reads, and what each must hold (checked in hf_folder.check_fields
# before heft_config reads them).
ROPE = obj({"rope_type": optional(TEXT), "type": optional(TEXT), "rope_theta": optional(NUMBER),
            "factor": optional(NUMBER), "low_freq_factor": optional(NUMBER), "high_freq_factor": optional(NUMBER),
            "original_max_position_embeddings": optional(SIZE)})
FIELDS = {"vocab_size": SIZE, "hidden_size": SIZE, "num_hidden_layers": SIZE, "num_attention_heads": SIZE,
          "intermediate_size": SIZE, "num_key_value_heads": optional(SIZE), "head_dim": optional(SIZE),
          "max_position_embeddings": optional(SIZE), "rms_norm_eps": optional(NUMBER), "hidden_act": optional(TEXT),
          "attention_bias": optional(FLAG), "mlp_bias": optional(FLAG), "tie_word_embeddings": optional(FLAG),
          "rope_theta": optional(NUMBER), "rope_parameters": ROPE, "rope_scaling": ROPE}
# Counts of repeated tensors, checked against the stored names before the tensor table is built:
# (config.json fields that may give it, its heft size, the pattern whose group numbers the stored ones).
COUNTS = ((("num_hidden_layers",), lambda m: m.depth, r"^model\.layers\.(\d{1,9})\."),)


def heft_config(hf: dict):
    """The heft config (base's fields) of a Llama config.json."""
    c = base.get_config()
    c.name = "llama_from_hf"
    c.data.document_start = "bos"  # Llama's sentencepiece tokenizer leads text with BOS
    m = c.model
    m.vocab = hf["vocab_size"]
    m.width = hf["hidden_size"]
    m.depth = hf["num_hidden_layers"]
    m.heads = hf["num_attention_heads"]
    m.kv_heads = hf.get("num_key_value_heads") or m.heads
    if hf.get("head_dim") and hf["head_dim"] != m.width // m.heads:
        m.head_dim = hf["head_dim"]
    m.mlp_width = hf["intermediate_size"]
    m.max_len = hf.get("max_position_embeddings", 2048)
    m.norm = "rmsnorm"
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConvertError(f"config.json has hidden_act={act!r}; heft imports Llama models with one of "
                           f"{', '.join(ACTIVATIONS)}")
    m.activation = ACTIVATIONS[act]
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ConvertError(f"config.json has attention_bias={attention_bias} but mlp_bias={mlp_bias}; heft's "
                           "model.use_bias puts biases on every projection or none, so both must be equal")
    m.use_bias = attention_bias
    m.tied_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.positions = "rope"
    _set_rope(m, hf)
    return c


def _set_rope(m, hf: dict) -> None:
    # transformers 5 writes rope_parameters (theta inside); older files rope_theta and rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return
    if kind != "llama3":
        raise ConvertError(f"config.json has RoPE scaling {kind!r}; heft supports none or 'llama3' "
                           "(add it to model/positions.py first)")
    missing = [k for k in LLAMA3_KEYS if k not in rope]
    if missing:
        raise ConvertError(f"config.json's llama3 rope scaling lacks {', '.join(missing)}; add them")
    m.rope_scaling = "llama3"
    m.rope_scaling_factor = float(rope["factor"])
    m.rope_low_freq_factor = float(rope["low_freq_factor"])
    m.rope_high_freq_factor = float(rope["high_freq_factor"])
    m.rope_original_max_len = int(rope["original_max_position_embeddings"])


def unfit(m) -> list[str]:
    """Why the heft model config `m` cannot be saved as a Llama (empty when it can)."""
    wrong = [f"model.{f}={m[f]!r} (Llama: {v})" for f, v in
             (("norm", "rmsnorm"), ("positions", "rope")) if m[f] != v]
    if m.activation not in TO_HF_ACTIVATION:
        wrong.append(f"model.activation={m.activation!r} (Llama: swiglu or geglu)")
    return wrong


def hf_config(m, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for heft model config `m`, in the form both transformers 4 and 5 read."""
    rope_scaling = None
    if m.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                        "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                        "original_max_position_embeddings": m.rope_original_max_len}
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab, "hidden_size": m.width, "intermediate_size": m.mlp_width,
        "num_hidden_layers": m.depth, "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
        "head_dim": head_dim(m), "hidden_act": TO_HF_ACTIVATION[m.activation],
        "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": rope_scaling,
        "attention_bias": m.use_bias, "mlp_bias": m.use_bias, "tie_word_embeddings": m.tied_embeddings,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
        "initializer_range": 0.02, "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
    }


def ignored(name: str, m) -> bool:
    """Stored tensors that hold no weights heft needs."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed from theta
        return True
    return m.tied_embeddings and name == "lm_head.weight"  # transformers ties it to the embedding too


def tensors(m, stored=()) -> list:
    """Every tensor of a LlamaForCausalLM for config `m`, in the order transformers saves them."""
    D, H, K, Dh, F, V = m.width, m.heads, m.kv_heads, head_dim(m), m.mlp_width, m.vocab
    T = dict(to_heft=lambda w: w.T, to_hf=lambda x: x.T)
    out = [one("model.embed_tokens.weight", (V, D), "embed")]
    for i in range(m.depth):
        p, a, f = f"model.layers.{i}.", "blocks.attention.", "blocks.mlp."
        out += [
            one(p + "input_layernorm.weight", (D,), "blocks.attention_norm.scale", i),
            one(p + "self_attn.q_proj.weight", (H * Dh, D), a + "q", i, *transposed((H, Dh))),
            one(p + "self_attn.k_proj.weight", (K * Dh, D), a + "k", i, *transposed((K, Dh))),
            one(p + "self_attn.v_proj.weight", (K * Dh, D), a + "v", i, *transposed((K, Dh))),
            one(p + "self_attn.o_proj.weight", (D, H * Dh), a + "o", i,
                to_heft=lambda w: w.T.reshape(H, Dh, D), to_hf=lambda x: x.reshape(H * Dh, D).T),
            one(p + "post_attention_layernorm.weight", (D,), "blocks.mlp_norm.scale", i),
            one(p + "mlp.gate_proj.weight", (F, D), f + "gate", i, **T),
            one(p + "mlp.up_proj.weight", (F, D), f + "up", i, **T),
            one(p + "mlp.down_proj.weight", (D, F), f + "down", i, **T),
        ]
        if m.use_bias:
            heads = dict(to_heft=lambda b: b.reshape(-1, Dh), to_hf=lambda x: x.reshape(-1))
            out += [
                one(p + "self_attn.q_proj.bias", (H * Dh,), a + "q_bias", i, **heads),
                one(p + "self_attn.k_proj.bias", (K * Dh,), a + "k_bias", i, **heads),
                one(p + "self_attn.v_proj.bias", (K * Dh,), a + "v_bias", i, **heads),
                one(p + "self_attn.o_proj.bias", (D,), a + "o_bias", i),
                one(p + "mlp.gate_proj.bias", (F,), f + "gate_bias", i),
                one(p + "mlp.up_proj.bias", (F,), f + "up_bias", i),
                one(p + "mlp.down_proj.bias", (D,), f + "down_bias", i),
            ]
    out.append(one("model.norm.weight", (D,), "final_norm.scale"))
    if not m.tied_embeddings:
        out.append(one("lm_head.weight", (V, D), "readout", **T))
    return out
