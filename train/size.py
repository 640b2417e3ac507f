"""What a config costs (`heft size`), from the abstract model: nothing is allocated.

Parameters per component, bytes in each storage dtype, training memory (params, grads, the
optimizer's state and an activation estimate) and training FLOPs per token. The work and the
activations are the family's own (model/cost.py, through heft.model.build); the parameters and
bytes are counted here from the abstract model. A mixture of experts (model.mlp=moe) also reports
its active parameters, those a token uses: FLOPs, and so MFU everywhere (`heft train`, `heft plan`),
count those.
"""

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from heft.data import rows
from heft.model import build, checks
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
    flat = traverse_util.flatten_dict(build.abstract_params(m))
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
    work = build.family(m).cost(m, components, rows.lengths(config, seq_len), batch)
    # What the optimizer's state costs is said in one place, next to the optimizer.
    pbytes = jnp.dtype(m.param_dtype).itemsize
    train_bytes = {
        "params": total * pbytes,
        "grads": total * pbytes,  # gradients take the parameters' dtype
        "optimizer": total * state_bytes_per_param(m.param_dtype),
        "activations": work["activations"],
    }
    train_bytes["total"] = sum(train_bytes.values())
    optional = lambda *keys: {k: work[k] for k in keys if k in work}  # what only some families report
    return {
        "name": config.name,
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": total - embedding,
        **optional("active_params"),  # what one token uses (a decoder's; = total_params when dense)
        "components": components,
        # Without quantized trees, int8 and int4 count every parameter at that width (an estimate).
        "bytes": {k: total * v for k, v in BYTES.items() if not quantized or k in ("fp32", "bf16")}
                 | {k: sum(bytes_by_dtype(t).values()) for k, t in (quantized or {}).items()},
        "bytes_by_dtype": {"fp32": {"float32": total * 4}, "bf16": {"bfloat16": total * 2}}
                          | {k: bytes_by_dtype(t) for k, t in (quantized or {}).items()},
        "batch": batch,
        "seq_len": seq_len,
        **optional("target_len"),  # an encoder-decoder's decoder rows
        "remat": m.remat,
        **optional("experts", "top_k"),  # a mixture of experts
        "training_bytes": train_bytes,
        "flops_per_token": work["flops_per_token"],
        "flops_per_step": work["flops_per_step"],
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
