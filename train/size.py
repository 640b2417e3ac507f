"""What a config costs (`heft size`), from the abstract model: nothing is allocated.

Parameters per component, bytes in each storage dtype, training memory (params, grads, the
optimizer's state and an activation estimate) and training FLOPs per token. A mixture of experts
(model.mlp=moe) also reports its active parameters, those a token uses (the router and top_k of the
experts besides everything dense): FLOPs, and so MFU everywhere (`heft train`, `heft plan`), count
those, as MaxText and the MoE papers do.
"""

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from heft.model import checks, decoder
from heft.train.optimizer import state_bytes_per_param

BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def bytes_by_dtype(tree) -> dict[str, float]:
    """Bytes of the arrays (or ShapeDtypeStructs) in `tree`, summed per dtype name, largest first;
    int4 counts half a byte per value (as heft stores it: two to a byte)."""
    out: dict[str, float] = {}
    for x in jax.tree.leaves(tree):
        name = jnp.dtype(x.dtype).name
        out[name] = out.get(name, 0) + math.prod(x.shape) * (0.5 if name == "int4" else jnp.dtype(x.dtype).itemsize)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def abstract_params(m) -> dict:
    """The model's parameters as ShapeDtypeStructs, keyed by dotted path: allocates nothing."""
    flat = traverse_util.flatten_dict(decoder.abstract_params(m))
    return {".".join(map(str, path)): x for path, x in flat.items()}


def _component(path: str) -> str:
    if path.startswith(("encoder.", "decoder.")):  # an encoder-decoder's stacks: "encoder attention", ...
        side, rest = path.split(".", 1)
        part = rest.split(".")[1] if rest.startswith("blocks.") else rest.split(".")[0]
        return "norms" if part.endswith("norm") else f"{side} {part}"
    if path.startswith("blocks.attention_norm") or path.startswith("blocks.mlp_norm") or path.startswith("final_norm"):
        return "norms"
    for name in ("embed", "position_embed", "readout"):
        if path == name:
            return {"embed": "embedding", "position_embed": "positions", "readout": "readout"}[name]
    if "." not in path:  # a fine-tune's prefix_keys, prefix_values, prompt
        return path
    if path.startswith("blocks.moe."):  # a mixture of experts: its router, and the experts themselves
        return "router" if path == "blocks.moe.router" else "experts"
    return path.split(".")[1]  # blocks.attention.* -> attention, blocks.mlp.* -> mlp


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


def report(config, batch: int | None = None, seq_len: int | None = None, quantized: dict | None = None) -> dict:
    """Everything `heft size` prints, as a dict of plain numbers.

    quantized: {label: abstract parameter tree} of quantized variants (heft.quantize builds them);
      their bytes replace the `bytes` entry of that label (else every parameter at that width) and
      `bytes_by_dtype` breaks them down (integers, scales, and what stays float).
    """
    m = config.model
    checks.check_model(m)
    batch = batch or config.train.batch_size
    seq_len = seq_len or config.train.seq_len
    params = abstract_params(m)
    components: dict[str, int] = {}
    for path, x in params.items():
        components[_component(path)] = components.get(_component(path), 0) + math.prod(x.shape)
    total = sum(components.values())
    embedding = components.get("embedding", 0) + components.get("positions", 0)
    # A token meets top_k of the experts: the others' weights are parameters but not its work.
    idle = components.get("experts", 0) * (m.moe.experts - m.moe.top_k) // m.moe.experts if checks.sparse(m) else 0
    active = total - idle
    # FLOPs: every non-embedding weight a token uses (and the readout, tied or not) is one multiply-add
    # per token forward and two backward; attention's scores and mixing add 12 * L * T * d per token.
    matmul_params = active - embedding + m.vocab * m.width * m.tied_embeddings
    attn = 12 * m.depth * seq_len * m.heads * checks.head_dim(m)
    if checks.family(m) == "encoder_decoder":
        return _encoder_decoder_report(config, batch, seq_len, components, total, embedding, quantized)
    # What the optimizer's state costs is said in one place, next to the optimizer.
    pbytes = jnp.dtype(m.param_dtype).itemsize
    train_bytes = {
        "params": total * pbytes,
        "grads": total * pbytes,  # gradients take the parameters' dtype
        "optimizer": total * state_bytes_per_param(m.param_dtype),
        "activations": activation_bytes_per_token(m, seq_len) * batch * seq_len,
    }
    train_bytes["total"] = sum(train_bytes.values())
    return {
        "name": config.name,
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": total - embedding,
        "active_params": active,  # what one token uses: = total_params for a dense model
        "components": components,
        # Without quantized trees, int8 and int4 count every parameter at that width (an estimate).
        "bytes": {k: total * v for k, v in BYTES.items() if not quantized or k in ("fp32", "bf16")}
                 | {k: sum(bytes_by_dtype(t).values()) for k, t in (quantized or {}).items()},
        "bytes_by_dtype": {"fp32": {"float32": total * 4}, "bf16": {"bfloat16": total * 2}}
                          | {k: bytes_by_dtype(t) for k, t in (quantized or {}).items()},
        "batch": batch,
        "seq_len": seq_len,
        "remat": m.remat,
        **({"experts": m.moe.experts, "top_k": m.moe.top_k} if checks.sparse(m) else {}),
        "training_bytes": train_bytes,
        "flops_per_token": 6 * matmul_params + attn,
        "flops_per_step": (6 * matmul_params + attn) * batch * seq_len,
    }


def _encoder_decoder_report(config, batch: int, seq_len: int, components: dict, total: int, embedding: int,
                            quantized: dict | None) -> dict:
    """`report` for an encoder-decoder: the encoder runs over seq_len input tokens a row, the decoder
    over the target length (data/seq2seq.py), and its cross-attention's keys and values over the
    inputs. Per-token figures are per input token (what the loop counts as a step's tokens)."""
    from heft.data import seq2seq

    m = config.model
    S, T = seq_len, seq2seq.row_lengths(config, seq_len)["targets"]
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
    pbytes = jnp.dtype(m.param_dtype).itemsize
    train_bytes = {"params": total * pbytes, "grads": total * pbytes,
                   "optimizer": total * state_bytes_per_param(m.param_dtype), "activations": activations * batch}
    train_bytes["total"] = sum(train_bytes.values())
    return {
        "name": config.name, "total_params": total, "embedding_params": embedding,
        "non_embedding_params": total - embedding, "components": components,
        "bytes": {k: total * v for k, v in BYTES.items() if not quantized or k in ("fp32", "bf16")}
                 | {k: sum(bytes_by_dtype(t).values()) for k, t in (quantized or {}).items()},
        "bytes_by_dtype": {"fp32": {"float32": total * 4}, "bf16": {"bfloat16": total * 2}}
                          | {k: bytes_by_dtype(t) for k, t in (quantized or {}).items()},
        "batch": batch, "seq_len": seq_len, "target_len": T, "remat": m.remat, "training_bytes": train_bytes,
        "flops_per_token": row / S, "flops_per_step": row * batch,
    }


def _human(n: float, unit: str = "") -> str:
    for step, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= step:
            return f"{n / step:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def table(r: dict) -> str:
    rows = [f"{r['name']}: {r['total_params']:,} parameters ({_human(r['total_params'])})",
            f"  embedding       {r['embedding_params']:>16,}  (lookups: token and position tables)",
            f"  non-embedding   {r['non_embedding_params']:>16,}  (matmuls, norms, readout)",
            "by component"]
    if r.get("active_params", r["total_params"]) != r["total_params"]:  # a mixture of experts
        rows.insert(3, f"  active per token{r['active_params']:>16,}  ({_human(r['active_params'])}: the router and "
                       f"{r['top_k']} of {r['experts']} experts; FLOPs count these)")
    rows += [f"  {k:<15} {v:>16,}" for k, v in sorted(r["components"].items())]
    rows.append("storage")
    for k, v in r["bytes"].items():
        parts = r.get("bytes_by_dtype", {}).get(k, {})
        detail = f"  ({', '.join(f'{d} {_gib(b)}' for d, b in parts.items())})" if len(parts) > 1 else ""
        rows.append(f"  {k:<15} {_gib(v):>16}{detail}")
    remat = r["remat"] + (" (estimated as none: the run chooses)" if r["remat"] == "auto" else "")
    rows.append(f"training memory at batch {r['batch']} x length {r['seq_len']}, remat={remat} "
                "(all devices together)")
    rows += [f"  {k:<15} {_gib(v):>16}" for k, v in r["training_bytes"].items()]
    rows.append(f"training FLOPs    {_human(r['flops_per_token'], 'FLOP')} per token"
                + (" (active parameters)" if "experts" in r else "") + ", "
                f"{_human(r['flops_per_step'], 'FLOP')} per step")
    return "\n".join(rows)
