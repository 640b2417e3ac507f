"""GPT-2 (GPT2LMHeadModel): config.json <-> heft config, and every tensor's name, shape and layout.

GPT-2 stores its projections as Conv1D weights, already [in, out] like heft, and fuses the query,
key and value projections into one c_attn [embed, 3 * embed] (and bias [3 * embed]), which
splits into heft's q, k, v [embed, heads, head_dim].
"""

from heft.configs import base
from heft.convert.errors import ConvertError
from heft.convert.hf_folder import FLAG, NUMBER, SIZE, TEXT, optional
from heft.convert.mapping import Tensor, one, split_columns, split_vector
from heft.model.checks import head_dim

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
# heft's gelu is jax.nn.gelu's tanh approximation: HF's gelu_new (GPT-2's own) and gelu_pytorch_tanh.
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
TO_HF_ACTIVATION = {"gelu": "gelu_new", "relu": "relu"}
# Fields that change the computation in ways heft's decoder does not: (name, value heft needs).
REQUIRED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False))
PREFIX = "transformer."  # transformers saves it; the original hub files of gpt2 omit it
# config.json's fields this family reads, and what each must hold (as llama.py's).
FIELDS = {"vocab_size": SIZE, "n_embd": SIZE, "n_layer": SIZE, "n_head": SIZE, "n_inner": optional(SIZE),
          "n_positions": optional(SIZE), "layer_norm_epsilon": optional(NUMBER),
          "activation_function": optional(TEXT), "tie_word_embeddings": optional(FLAG),
          **{field: optional(FLAG) for field, _ in REQUIRED}}
COUNTS = ((("n_layer",), lambda m: m.depth, r"^(?:transformer\.)?h\.(\d{1,9})\."),)


def heft_config(hf: dict):
    """The heft config (base's fields) of a GPT-2 config.json."""
    for field, value in REQUIRED:
        if hf.get(field, value) != value:
            raise ConvertError(f"config.json has {field}={hf[field]!r}; heft's decoder needs {value}")
    c = base.get_config()
    c.name = "gpt2_from_hf"
    m = c.model
    m.vocab = hf["vocab_size"]
    m.width = hf["n_embd"]
    m.depth = hf["n_layer"]
    m.heads = m.kv_heads = hf["n_head"]
    m.mlp_width = hf.get("n_inner") or 4 * m.width
    m.max_len = hf.get("n_positions", 1024)
    m.norm = "layernorm"
    m.norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ConvertError(f"config.json has activation_function={act!r}; heft imports GPT-2 models with one of "
                           f"{', '.join(ACTIVATIONS)} (heft's gelu is the tanh approximation)")
    m.activation = ACTIVATIONS[act]
    m.use_bias = True
    m.tied_embeddings = bool(hf.get("tie_word_embeddings", True))
    m.positions = "learned"
    m.embed_init_std = 0.02
    return c


def unfit(m) -> list[str]:
    """Why the heft model config `m` cannot be saved as a GPT-2 (empty when it can)."""
    wrong = [f"model.{f}={m[f]!r} (GPT-2: {v!r})" for f, v in
             (("norm", "layernorm"), ("positions", "learned"), ("use_bias", True), ("kv_heads", m.heads))
             if m[f] != v]
    if m.activation not in TO_HF_ACTIVATION:
        wrong.append(f"model.activation={m.activation!r} (GPT-2: gelu or relu)")
    if head_dim(m) * m.heads != m.width:
        wrong.append(f"head_dim={head_dim(m)} (GPT-2: width / heads = {m.width // m.heads})")
    return wrong


def hf_config(m, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for heft model config `m`."""
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab, "n_embd": m.width, "n_layer": m.depth, "n_head": m.heads,
        "n_inner": m.mlp_width, "n_positions": m.max_len,
        "layer_norm_epsilon": m.norm_eps, "activation_function": TO_HF_ACTIVATION[m.activation],
        "tie_word_embeddings": m.tied_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": dtype, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "initializer_range": 0.02, "use_cache": True,
    }


def ignored(name: str, m) -> bool:
    """Stored tensors that hold no weights: old causal-mask buffers, and a tied lm_head."""
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return True
    return m.tied_embeddings and name == "lm_head.weight"


def tensors(m, stored=()) -> list[Tensor]:
    """Every tensor of a GPT2LMHeadModel for config `m`. `stored`: the names in the files being
    imported, to match their prefix; exports use transformers' `transformer.` prefix."""
    D, H, Dh, F, V = m.width, m.heads, head_dim(m), m.mlp_width, m.vocab
    prefix = "" if stored and not any(n.startswith(PREFIX) for n in stored) else PREFIX
    a, f = "blocks.attention.", "blocks.mlp."
    out = [one(prefix + "wte.weight", (V, D), "embed"), one(prefix + "wpe.weight", (m.max_len, D), "position_embed")]
    for i in range(m.depth):
        p = f"{prefix}h.{i}."
        qkv, qkv_bias = split_columns((H, Dh), 3), split_vector((H, Dh), 3)
        out += [
            one(p + "ln_1.weight", (D,), "blocks.attention_norm.scale", i),
            one(p + "ln_1.bias", (D,), "blocks.attention_norm.offset", i),
            Tensor(p + "attn.c_attn.weight", (D, 3 * D), ((a + "q", i), (a + "k", i), (a + "v", i)), *qkv),
            Tensor(p + "attn.c_attn.bias", (3 * D,), ((a + "q_bias", i), (a + "k_bias", i), (a + "v_bias", i)),
                   *qkv_bias),
            one(p + "attn.c_proj.weight", (D, D), a + "o", i,
                to_heft=lambda w: w.reshape(H, Dh, D), to_hf=lambda x: x.reshape(H * Dh, D)),
            one(p + "attn.c_proj.bias", (D,), a + "o_bias", i),
            one(p + "ln_2.weight", (D,), "blocks.mlp_norm.scale", i),
            one(p + "ln_2.bias", (D,), "blocks.mlp_norm.offset", i),
            one(p + "mlp.c_fc.weight", (D, F), f + "up", i),
            one(p + "mlp.c_fc.bias", (F,), f + "up_bias", i),
            one(p + "mlp.c_proj.weight", (F, D), f + "down", i),
            one(p + "mlp.c_proj.bias", (D,), f + "down_bias", i),
        ]
    out += [one(prefix + "ln_f.weight", (D,), "final_norm.scale"), one(prefix + "ln_f.bias", (D,), "final_norm.offset")]
    if not m.tied_embeddings:
        out.append(one("lm_head.weight", (V, D), "readout", to_heft=lambda w: w.T, to_hf=lambda x: x.T))
    return out
