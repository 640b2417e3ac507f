"""What one training step of a model costs in work and memory, per family: FLOPs and the activations
the backward pass keeps. `heft size` (train/size.py) reads them through heft.model.build's `Family.cost`,
beside the parameter counts it takes from the abstract model.

FLOPs: every non-embedding weight a token uses (and the readout, tied or not) is one multiply-add per
token forward and two backward (6 per weight and token), and attention's scores and mixing add
12 * layers * length * heads * head_dim per token. A mixture of experts counts its active
parameters: a token meets top_k of the experts, as MaxText and the MoE papers count them.
"""

from heft.model import checks


def activation_bytes_per_token(m, seq_len: int) -> float:
    """Estimated bytes the backward pass keeps per token, over all layers, by remat policy.

    Counts the tensors each block saves for its gradient: with no remat, norm inputs and outputs,
    q/k/v, the float32 attention logits and probabilities (XLA attention keeps [heads, length] per
    query), the MLP's pre- and post-activation; `save_matmuls` keeps the matmul outputs only;
    `full` keeps each block's input; `auto` is estimated as `none`, the most it may keep. An
    estimate, good to ~30%; `heft plan` measures the real one.
    """
    c = 2 if m.compute_dtype == "bfloat16" else 4
    D, F, H, K, Dh = m.width, m.mlp_width, m.heads, m.kv_heads, checks.head_dim(m)
    gated = 2 if m.activation in ("swiglu", "geglu") else 1
    if checks.sparse(m):  # each token's top_k experts (dropless; capacity pads to capacity_factor x that)
        F = m.moe.top_k * checks.expert_width(m) * max(1.0, m.moe.capacity_factor)
    if m.remat == "full":
        per_layer = 4 * D
    elif m.remat == "save_matmuls":
        per_layer = c * ((H + 2 * K) * Dh + D + gated * F + D) + 4 * D
    else:
        per_layer = 4 * 4 * D + c * ((H + 2 * K) * Dh + H * Dh + (gated + 1) * F) + 2 * 4 * H * seq_len
    return m.depth * per_layer + 2 * 4 * m.vocab  # plus float32 logits and their gradient


def decoder(m, components: dict, lengths: dict, batch: int) -> dict:
    """A decoder's step over `batch` rows of lengths["inputs"] tokens: {"active_params", ("experts",
    "top_k",) "activations" (bytes), "flops_per_token", "flops_per_step"}. `components`: parameters
    per component (train/size.py's names)."""
    seq_len = lengths["inputs"]
    total = sum(components.values())
    embedding = components.get("embedding", 0) + components.get("positions", 0)
    # A token meets top_k of the experts: the others' weights are parameters but not its work.
    idle = components.get("experts", 0) * (m.moe.experts - m.moe.top_k) // m.moe.experts if checks.sparse(m) else 0
    active = total - idle
    matmul_params = active - embedding + m.vocab * m.width * m.tied_embeddings
    attn = 12 * m.depth * seq_len * m.heads * checks.head_dim(m)
    return {
        "active_params": active,  # what one token uses: = total_params for a dense model
        **({"experts": m.moe.experts, "top_k": m.moe.top_k} if checks.sparse(m) else {}),
        "activations": activation_bytes_per_token(m, seq_len) * batch * seq_len,
        "flops_per_token": 6 * matmul_params + attn,
        "flops_per_step": (6 * matmul_params + attn) * batch * seq_len,
    }


def encoder_decoder(m, components: dict, lengths: dict, batch: int) -> dict:
    """An encoder-decoder's step: the encoder runs over lengths["encoder_inputs"] tokens a row, the
    decoder over lengths["inputs"] (data/rows.py), and its cross-attention's keys and values over the
    encoder's. Per-token figures are per input token (what the loop counts as a step's tokens)."""
    S, T = lengths["encoder_inputs"], lengths["inputs"]
    Le, Ld, H, K, Dh, D = checks.encoder_depth(m), m.depth, m.heads, m.kv_heads, checks.head_dim(m), m.width
    encoder = components["encoder attention"] + components["encoder mlp"]
    cross_kv = 2 * Ld * D * K * Dh  # applied to the inputs, once per input token
    decoder = (components["decoder attention"] + components["decoder cross_attention"] - cross_kv
               + components["decoder mlp"] + components["readout"])
    # 6 FLOPs per weight and token (forward and backward), and the attention scores and mixing.
    row = 6 * (encoder * S + cross_kv * S + decoder * T) + 12 * H * Dh * (Le * S * S + Ld * (T * T + T * S))
    stack = m.copy_and_resolve_references()
    stack.depth = Le
    activations = (activation_bytes_per_token(stack, S) - 2 * 4 * m.vocab) * S  # the encoder has no logits
    stack.depth = Ld
    activations += activation_bytes_per_token(stack, T) * T  # (cross-attention's few tensors not counted)
    return {"target_len": T, "activations": activations * batch, "flops_per_token": row / S,
            "flops_per_step": row * batch}
