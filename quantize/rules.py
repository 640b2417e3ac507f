"""Which weights are quantized, to what, in what groups: the `quantize` config section as qwix rules.

Weight-only quantization of every matmul weight of the blocks (attention q, k, v, o and the MLP's
up, gate, down) and of an untied readout. The token embedding is a lookup, not a matmul, and stays
in float (so does a tied readout, which is the embedding); so do norms, biases and fine-tuning's
adapters. Each weight gets one scale per output channel (`group_size=0`) or one per `group_size`
consecutive inputs along its innermost contraction axis (qwix's `tile_size`): embed for q, k, v, up,
gate and the readout, head_dim for o, mlp for down.
"""

from heft.model.checks import ConfigError, head_dim, sparse

WEIGHTS = ("none", "int8", "int4")
# qwix matches module paths joined by "/": the blocks' attention and MLP, and the decoder itself
# (path "") whose only matmul is the readout.
BLOCK_MODULES = "blocks/(attention|mlp)"
ROOT_MODULE = ""


def section(config):
    """The config's quantize section, or the defaults when an older config has none."""
    q = config.get("quantize")
    return {"weights": "none", "group_size": 0, "qat": False, **(dict(q) if q is not None else {})}


def is_quantized(config) -> bool:
    """Whether a checkpoint with this config holds integers and scales (heft quantize's output), not floats."""
    q = section(config)
    return q["weights"] != "none" and not q["qat"]


def contraction_widths(m) -> dict[str, int]:
    """The innermost contraction width of each quantized weight kind: what a group must divide."""
    return {"model.width": m.width, "head_dim": head_dim(m), "model.mlp_width": m.mlp_width}


def check(config) -> None:
    """Raises ConfigError for the first bad field of the quantize section, before any work."""
    check_section(section(config), config.model)


def check_section(q: dict, m) -> None:
    """`check` for a quantize section `q` against model config `m` (a fine-tune's is its base's)."""
    if q["weights"] not in WEIGHTS:
        raise ConfigError(f"quantize.weights={q['weights']!r} is unknown; choose one of {', '.join(WEIGHTS)}")
    if q["weights"] != "none" and sparse(m):  # the qwix rules above name the dense MLP, not the experts
        raise ConfigError(f"quantize.weights={q['weights']} with model.mlp=moe: heft does not quantize a mixture of "
                          "experts' expert weights; set quantize.weights=none")
    group = q["group_size"]
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise ConfigError(f"quantize.group_size={group!r} must be 0 (one scale per output channel) or a positive "
                          "number of inputs per scale")
    if group:
        for name, width in contraction_widths(m).items():
            if width % group:
                raise ConfigError(f"quantize.group_size={group} does not divide {name}={width}; pick a group size "
                                  f"that divides {name} (e.g. {_divisor_below(width, group)}), or 0 for one scale "
                                  "per output channel")


def _divisor_below(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def qwix_rules(config, qtype=None, m=None):
    """The qwix QuantizationRules for the config's weights (or `qtype`, a jnp integer dtype), for
    model config `m` (default: the config's own)."""
    import jax.numpy as jnp
    import qwix

    q = section(config)
    qtype = qtype if qtype is not None else {"int8": jnp.int8, "int4": jnp.int4}[q["weights"]]
    tile = q["group_size"] or None
    rules = [qwix.QuantizationRule(module_path=BLOCK_MODULES, weight_qtype=qtype, tile_size=tile)]
    if not (m or config.model).tied_embeddings:
        rules.append(qwix.QuantizationRule(module_path=ROOT_MODULE, weight_qtype=qtype, tile_size=tile))
    return rules


def describe(config) -> str:
    """e.g. "int4, groups of 32" or "int8, per channel"."""
    q = section(config)
    return f"{q['weights']}, " + (f"groups of {q['group_size']}" if q["group_size"] else "per channel")
