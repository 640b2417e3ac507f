"""Mixtral (MixtralForCausalLM): config.json <-> heft config, and every tensor's name, shape and layout.

Mixtral is a Llama whose MLP is a mixture of experts (heft's `model.mlp=moe`): attention, norms,
embedding, RoPE and readout are Llama's (llama.py reads and writes them), and each block's
`block_sparse_moe` holds a router `gate.weight` [experts, embed] and, per expert e, SwiGLU weights
`experts.e.w1` (gate) and `w3` (up) [expert_width, embed] and `w2` (down) [embed, expert_width], the
layout of the hub's files and of what transformers saves. heft stacks the experts: each of those
tensors fills one (layer, expert) slot of [depth, experts, ...] parameters.
"""

from heft.configs import base
from heft.convert import llama
from heft.convert.errors import ConvertError
from heft.convert.hf_folder import INDEX, NUMBER, SIZE, optional
from heft.convert.mapping import one

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
MLP = "moe"  # the kind of model.mlp this family holds (convert/hf.py matches it on export)
FIELDS = llama.FIELDS | {"num_local_experts": SIZE, "num_experts_per_tok": SIZE,
                         "router_aux_loss_coef": optional(NUMBER), "sliding_window": optional(INDEX)}
COUNTS = llama.COUNTS + ((("num_local_experts",), lambda m: m.moe.experts,
                          r"\.block_sparse_moe\.experts\.(\d{1,9})\."),)


def heft_config(hf: dict):
    """The heft config (base's fields) of a Mixtral config.json."""
    if hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise ConvertError(f"config.json has sliding_window={hf['sliding_window']}; heft attends to the whole "
                           "context, so it imports Mixtral models without a sliding window (sliding_window: null)")
    c = llama.heft_config({**hf, "mlp_bias": hf.get("attention_bias", False)})
    c.name = "mixtral_from_hf"
    m = c.model
    rope = hf.get("rope_parameters") or {}  # Mixtral's default base is 1e6, not Llama's 1e4
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6)))
    m.mlp = "moe"
    m.moe.experts = hf["num_local_experts"]
    m.moe.top_k = hf["num_experts_per_tok"]
    # Both normalise the load-balancing loss alike (model/moe.py): the coefficient carries over as it is.
    m.moe.balance_loss_weight = float(hf.get("router_aux_loss_coef", base.get_config().model.moe.balance_loss_weight))
    return c


def unfit(m) -> list[str]:
    """Why the heft model config `m` cannot be saved as a Mixtral (empty when it can)."""
    wrong = llama.unfit(m)  # Mixtral's attention, norms and gated activations are Llama's
    if m.rope_scaling != "none":
        wrong.append(f"model.rope_scaling={m.rope_scaling!r} (Mixtral: none)")
    return wrong


def hf_config(m, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for heft model config `m`."""
    out = llama.hf_config(m, dtype, bos_id, eos_id)
    for key in ("mlp_bias", "pretraining_tp", "rope_scaling"):
        out.pop(key)
    return out | {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "intermediate_size": m.moe.expert_width or m.mlp_width,
        "num_local_experts": m.moe.experts, "num_experts_per_tok": m.moe.top_k,
        "router_aux_loss_coef": m.moe.balance_loss_weight, "output_router_logits": False,
        "router_jitter_noise": 0.0, "sliding_window": None,
    }


def ignored(name: str, m) -> bool:
    return llama.ignored(name, m)


def tensors(m, stored=()) -> list:
    """Every tensor of a MixtralForCausalLM for config `m`: Llama's, with each block's MLP replaced by
    its router and experts."""
    D, E, F = m.width, m.moe.experts, m.moe.expert_width or m.mlp_width
    T = dict(to_heft=lambda w: w.T, to_hf=lambda x: x.T)
    out = []
    for t in llama.tensors(m, stored):
        if ".mlp." in t.hf:
            continue
        out.append(t)
        if t.hf.endswith("post_attention_layernorm.weight"):  # the block's MoE follows its norm
            i = t.heft[0][1]
            p, f = f"model.layers.{i}.block_sparse_moe.", "blocks.moe."
            out.append(one(p + "gate.weight", (E, D), f + "router", i, **T))
            for e in range(E):
                out += [one(f"{p}experts.{e}.w1.weight", (F, D), f + "gate", (i, e), **T),
                        one(f"{p}experts.{e}.w2.weight", (D, F), f + "down", (i, e), **T),
                        one(f"{p}experts.{e}.w3.weight", (F, D), f + "up", (i, e), **T)]
    return out
