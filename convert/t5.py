"""T5 v1.1 (T5ForConditionalGeneration with its own lm_head): config.json <-> heft encoder-decoder
config (model/encoder_decoder.py), and every tensor's name, shape and layout.

Layer i of a stack is `{encoder,decoder}.block.{i}.layer.{j}`: j=0 the self-attention and its norm,
then (decoder only) j=1 the cross-attention ("EncDecAttention"), then the feed-forward
("DenseReluDense": wi_0 the gate, wi_1 the up-projection, wo the down; wi alone when not gated).
Each stack's relative position bias lives in its block 0's self-attention; `shared` is the one
embedding, which transformers also lists as encoder/decoder.embed_tokens. Linear weights are torch's
[out, in], heads split out on the heft side as in llama.py.

T5 v1.0 reads out with the embedding scaled by d_model**-0.5, which heft's encoder-decoder does not
do, so it is refused. transformers 5's T5Config forces tie_word_embeddings=True and says whether to
scale in `scale_decoder_outputs` (older files: scaled unless tie_word_embeddings is false), so a
model it saves holds no lm_head.weight: the shared embedding is then also the readout. heft exports
the hub's v1.1 layout, its own lm_head.weight with `"tie_word_embeddings": false`, which
transformers loads untied and unscaled.
"""

from heft.configs import base
from heft.convert.errors import ConvertError
from heft.convert.hf_folder import FLAG, INDEX, NUMBER, SIZE, TEXT, optional
from heft.convert.mapping import Tensor, one, transposed
from heft.model.checks import encoder_depth, family, head_dim

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
# (gated, transformers' dense_act_fn) <-> heft's activation; heft's gelu is the tanh approximation.
ACTIVATIONS = {(True, "gelu_new"): "geglu", (True, "gelu_pytorch_tanh"): "geglu", (True, "silu"): "swiglu",
               (False, "relu"): "relu", (False, "gelu_new"): "gelu", (False, "gelu_pytorch_tanh"): "gelu"}
TO_HF_ACTIVATION = {"geglu": "gated-gelu", "swiglu": "gated-silu", "relu": "relu", "gelu": "gelu_new"}
SENTINELS = 100  # T5's extra ids: <extra_id_i> is id 32099 - i above its 32,000 sentencepiece pieces
# Stored copies of `shared.weight` (older files), and a bias transformers never reads.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# config.json's fields this family reads, and what each must hold (as llama.py's).
FIELDS = {"vocab_size": SIZE, "d_model": SIZE, "num_heads": SIZE, "d_ff": SIZE, "num_layers": SIZE,
          "d_kv": optional(SIZE), "num_decoder_layers": optional(SIZE), "n_positions": optional(SIZE),
          "relative_attention_num_buckets": optional(SIZE), "relative_attention_max_distance": optional(SIZE),
          "decoder_start_token_id": optional(INDEX), "layer_norm_epsilon": optional(NUMBER),
          "feed_forward_proj": optional(TEXT), "tie_word_embeddings": optional(FLAG),
          "scale_decoder_outputs": optional(FLAG), "is_encoder_decoder": optional(FLAG)}
COUNTS = ((("num_layers",), encoder_depth, r"^encoder\.block\.(\d{1,9})\."),
          (("num_decoder_layers", "num_layers"), lambda m: m.depth, r"^decoder\.block\.(\d{1,9})\."))


def _activation(hf: dict) -> str:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated, act = parts[0] == "gated" and len(parts) == 2, parts[-1]
    if proj == "gated-gelu":  # transformers' own alias: T5 v1.1's gate is the tanh gelu
        act = "gelu_new"
    if (gated, act) not in ACTIVATIONS:
        raise ConvertError(f"config.json has feed_forward_proj={proj!r}; heft imports T5 with one of "
                           f"{', '.join(sorted(TO_HF_ACTIVATION.values()))} (heft's gelu is the tanh approximation)")
    return ACTIVATIONS[gated, act]


def _scaled(hf: dict) -> bool:
    """Whether the decoder's output is scaled by d_model**-0.5 before the readout (T5 v1.0), as
    transformers decides it: its own field if saved (transformers 5), else any tie_word_embeddings
    but false."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def heft_config(hf: dict):
    """The heft config (base's fields) of a T5 config.json."""
    if _scaled(hf):
        raise ConvertError("config.json describes T5 v1.0's readout (no \"tie_word_embeddings\": false, or "
                           "scale_decoder_outputs=true: the embedding scaled by d_model**-0.5); heft imports T5 v1.1, "
                           "whose readout is unscaled")
    if not hf.get("is_encoder_decoder", True):
        raise ConvertError("config.json has is_encoder_decoder=false; heft imports T5ForConditionalGeneration only")
    c = base.get_config()
    c.name = "t5_from_hf"
    c.data.sentinels = SENTINELS
    m = c.model
    m.family = "encoder_decoder"
    m.positions = "relative"
    m.vocab = hf["vocab_size"]
    m.width = hf["d_model"]
    m.heads = m.kv_heads = hf["num_heads"]
    if hf.get("d_kv") and hf["d_kv"] != m.width // m.heads:
        m.head_dim = hf["d_kv"]
    m.mlp_width = hf["d_ff"]
    m.depth = hf.get("num_decoder_layers") or hf["num_layers"]
    if hf["num_layers"] != m.depth:
        m.encoder_depth = hf["num_layers"]
    m.max_len = hf.get("n_positions", 512)
    m.relative_buckets = hf.get("relative_attention_num_buckets", 32)
    m.relative_max_distance = hf.get("relative_attention_max_distance", 128)
    m.decoder_start = hf.get("decoder_start_token_id", 0) or 0
    m.norm = "rmsnorm"
    m.norm_eps = float(hf.get("layer_norm_epsilon", 1e-6))
    m.activation = _activation(hf)
    m.use_bias = False
    m.tied_embeddings = False
    return c


def unfit(m) -> list[str]:
    """Why the heft model config `m` cannot be saved as a T5 v1.1 (empty when it can)."""
    if family(m) != "encoder_decoder":
        return [f"model.family={family(m)!r} (T5: 'encoder_decoder')"]
    wrong = [f"model.{f}={m[f]!r} (T5: {v!r})" for f, v in
             (("norm", "rmsnorm"), ("use_bias", False), ("kv_heads", m.heads), ("tied_embeddings", False))
             if m[f] != v]
    if m.activation not in TO_HF_ACTIVATION:
        wrong.append(f"model.activation={m.activation!r} (T5: {', '.join(TO_HF_ACTIVATION)})")
    return wrong


def hf_config(m, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for heft model config `m`: T5 v1.1's layout, untied and unscaled."""
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab, "d_model": m.width, "d_kv": head_dim(m), "d_ff": m.mlp_width,
        "num_layers": encoder_depth(m), "num_decoder_layers": m.depth, "num_heads": m.heads,
        "relative_attention_num_buckets": m.relative_buckets,
        "relative_attention_max_distance": m.relative_max_distance,
        "layer_norm_epsilon": m.norm_eps, "feed_forward_proj": TO_HF_ACTIVATION[m.activation],
        "tie_word_embeddings": False, "scale_decoder_outputs": False, "is_encoder_decoder": True,
        "n_positions": m.max_len,
        # T5 starts decoding with its pad id; heft's decoder starts with model.decoder_start.
        "decoder_start_token_id": m.decoder_start, "pad_token_id": m.decoder_start, "eos_token_id": eos_id,
        "dropout_rate": 0.0, "initializer_factor": 1.0, "torch_dtype": dtype, "use_cache": True,
    }


def ignored(name: str, m) -> bool:
    """Stored tensors that hold no weights heft needs: copies of the shared embedding, and a
    cross-attention bias that T5 never uses."""
    return name in TIED_COPIES or name in UNUSED


def _attention(prefix: str, path: str, i: int, m) -> list:
    """q, k, v, o of one attention: [heads * head_dim, embed] <-> [embed, heads, head_dim], and o back."""
    D, H, Dh = m.width, m.heads, head_dim(m)
    return [
        one(prefix + "q.weight", (H * Dh, D), path + "q", i, *transposed((H, Dh))),
        one(prefix + "k.weight", (H * Dh, D), path + "k", i, *transposed((H, Dh))),
        one(prefix + "v.weight", (H * Dh, D), path + "v", i, *transposed((H, Dh))),
        one(prefix + "o.weight", (D, H * Dh), path + "o", i,
            to_heft=lambda w: w.T.reshape(H, Dh, D), to_hf=lambda x: x.reshape(H * Dh, D).T),
    ]


def _mlp(prefix: str, path: str, i: int, m) -> list:
    D, F = m.width, m.mlp_width
    T = dict(to_heft=lambda w: w.T, to_hf=lambda x: x.T)
    if m.activation in ("geglu", "swiglu"):
        ins = [one(prefix + "wi_0.weight", (F, D), path + "gate", i, **T),
               one(prefix + "wi_1.weight", (F, D), path + "up", i, **T)]
    else:
        ins = [one(prefix + "wi.weight", (F, D), path + "up", i, **T)]
    return ins + [one(prefix + "wo.weight", (D, F), path + "down", i, **T)]


def tensors(m, stored=()) -> list:
    """Every tensor of a T5ForConditionalGeneration (v1.1) for config `m`."""
    D, V = m.width, m.vocab
    out = [one("shared.weight", (V, D), "embed")]
    for side, depth in (("encoder", encoder_depth(m)), ("decoder", m.depth)):
        blocks = f"{side}.blocks."
        for i in range(depth):
            layer = f"{side}.block.{i}.layer."
            out += _attention(layer + "0.SelfAttention.", blocks + "attention.", i, m)
            out.append(one(layer + "0.layer_norm.weight", (D,), blocks + "attention_norm.scale", i))
            ff = 1
            if side == "decoder":
                out += _attention(layer + "1.EncDecAttention.", blocks + "cross_attention.", i, m)
                out.append(one(layer + "1.layer_norm.weight", (D,), blocks + "cross_attention_norm.scale", i))
                ff = 2
            out += _mlp(f"{layer}{ff}.DenseReluDense.", blocks + "mlp.", i, m)
            out.append(one(f"{layer}{ff}.layer_norm.weight", (D,), blocks + "mlp_norm.scale", i))
        out.append(one(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       (m.relative_buckets, m.heads), f"{side}.relative_bias.table"))
        out.append(one(f"{side}.final_layer_norm.weight", (D,), f"{side}.final_norm.scale"))
    if stored and "lm_head.weight" not in stored:
        # transformers 5 saves T5 tied (tie_word_embeddings is forced true) but unscaled: the readout is
        # the shared embedding, read into heft's own readout, and exported untied.
        out[0] = Tensor("shared.weight", (V, D), (("embed", None), ("readout", None)), lambda w: (w, w.T),
                        lambda embed, readout: embed)
    else:
        out.append(one("lm_head.weight", (V, D), "readout", to_heft=lambda w: w.T, to_hf=lambda x: x.T))
    return out
