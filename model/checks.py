"""Errors a user can make in `config.model`, raised before anything is built or compiled."""

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
POSITIONS = ("rope", "learned", "relative")  # relative: the encoder_decoder's (T5's bias)
DTYPES = ("float32", "bfloat16")
REMAT = ("auto", "none", "full", "save_matmuls")
ATTENTIONS = ("auto", "xla", "flash")  # model/kernels.py
INITS = ("scaled_normal", "mup")
ROPE_SCALINGS = ("none", "llama3")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "silu")
HOOKS = ("adapter_width", "prefix_length", "prompt_length")
MLPS = ("dense", "moe")  # moe: a mixture of experts in every block (model/moe.py, the model.moe fields)
FAMILIES = ("decoder", "encoder_decoder")


class ConfigError(ValueError):
    """A config field has a value heft cannot build; the message names the field and the fix."""


def _one_of(m, field: str, allowed: tuple[str, ...]) -> None:
    value = m[field]
    if value not in allowed:
        raise ConfigError(f"model.{field}={value!r} is unknown; choose one of {', '.join(allowed)}")


def hook(m, name: str) -> int:
    """A fine-tuning hook's size (`adapter_width`, `prefix_length`, `prompt_length`; heft.adapt sets
    them): 0, off, unless set, and in configs saved before the hooks existed."""
    return m.get(name, 0) or 0


def family(m) -> str:
    """`model.family`: decoder, or encoder_decoder (T5); decoder in configs saved before the field existed."""
    return m.get("family", "decoder")


def encoder_depth(m) -> int:
    """The encoder's blocks (encoder_decoder): `model.encoder_depth` if given, else depth."""
    return m.get("encoder_depth") or m.depth


def sparse(m) -> bool:
    """Whether the blocks hold a mixture of experts (`model.mlp=moe`); dense in configs saved before the field existed."""
    return m.get("mlp", "dense") == "moe"


def expert_width(m) -> int:
    """Each expert's hidden width: `model.moe.expert_width` if given, else model.mlp_width."""
    return m.moe.expert_width or m.mlp_width


def head_dim(m) -> int:
    """The per-head width: `model.head_dim` if given, else width // heads."""
    return m.head_dim if m.head_dim else m.width // m.heads


# Sizes that must be positive integers.
SIZES = ("vocab", "width", "depth", "heads", "kv_heads", "mlp_width", "max_len", "rope_original_max_len")
# Scales that must be positive numbers: (field, what it is). NaN fails too.
SCALES = (("norm_eps", "added to the variance in norms"), ("rope_theta", "RoPE's base frequency"),
          ("init_scale", "the multiplier of every matrix's init std"),
          ("embed_init_std", "the embeddings' init std"),
          ("rope_scaling_factor", "llama3 RoPE's stretch"), ("rope_low_freq_factor", "llama3 RoPE's low cut"),
          ("rope_high_freq_factor", "llama3 RoPE's high cut"))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_model(m) -> None:
    """Raises ConfigError for the first problem in model config `m`."""
    for field in SIZES:
        if not _positive_int(m[field]):
            raise ConfigError(f"model.{field}={m[field]!r} must be a positive integer")
    if m.head_dim is not None and not _positive_int(m.head_dim):
        raise ConfigError(f"model.head_dim={m.head_dim!r} must be a positive integer, or None for width // heads")
    for field, meaning in SCALES:
        if not isinstance(m[field], (int, float)) or not m[field] > 0:
            raise ConfigError(f"model.{field}={m[field]!r} must be > 0 ({meaning})")
    if m.rope_scaling == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor} (llama3 RoPE blends between them)")
    if not m.head_dim and m.width % m.heads:
        raise ConfigError(
            f"model.width={m.width} is not divisible by model.heads={m.heads}; "
            "pick a width that is, or set model.head_dim"
        )
    if m.heads % m.kv_heads:
        raise ConfigError(
            f"model.heads={m.heads} is not divisible by model.kv_heads={m.kv_heads}; "
            "kv_heads must divide heads (= heads for MHA, 1 for MQA)"
        )
    if m.positions == "rope" and head_dim(m) % 2:
        raise ConfigError(f"head_dim={head_dim(m)} is odd; RoPE rotates pairs, so pick an even head_dim")
    _one_of(m, "norm", NORMS)
    _one_of(m, "activation", ACTIVATIONS)
    _one_of(m, "positions", POSITIONS)
    _one_of(m, "param_dtype", DTYPES)
    _one_of(m, "compute_dtype", DTYPES)
    _one_of(m, "remat", REMAT)
    if m.get("attention", "auto") not in ATTENTIONS:
        raise ConfigError(f"model.attention={m.attention!r} is unknown; choose one of {', '.join(ATTENTIONS)}")
    _one_of(m, "rope_scaling", ROPE_SCALINGS)
    if m.get("mlp", "dense") not in MLPS:
        raise ConfigError(f"model.mlp={m.mlp!r} is unknown; choose one of {', '.join(MLPS)}")
    if "moe" in m:  # the fields are checked with the feature off too (configs saved before it have none)
        _check_moe(m)
    for field in HOOKS:
        value = hook(m, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"model.{field}={value!r} must be an integer >= 0 (0: off; heft finetune sets it)")
    if hook(m, "adapter_width") and m.adapter_activation not in ADAPTER_ACTIVATIONS:
        raise ConfigError(f"model.adapter_activation={m.adapter_activation!r} is unknown; choose one of "
                          f"{', '.join(ADAPTER_ACTIVATIONS)}")
    _one_of(m, "init", INITS)
    for field in ("relative_buckets", "relative_max_distance"):
        if field in m and not _positive_int(m[field]):
            raise ConfigError(f"model.{field}={m[field]!r} must be a positive integer")
    start = m.get("decoder_start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < m.vocab:
        raise ConfigError(f"model.decoder_start={start!r} must be a token id in 0..{m.vocab - 1} "
                          "(T5's: the pad id, 0)")
    if family(m) not in FAMILIES:
        raise ConfigError(f"model.family={family(m)!r} is unknown; choose one of {', '.join(FAMILIES)}")
    if family(m) == "encoder_decoder":
        _check_encoder_decoder(m)
    elif m.positions == "relative":
        raise ConfigError("model.positions='relative' is T5's bucketed bias, which only model.family=encoder_decoder "
                          "has; decoders take rope or learned")
    # Checked whether or not they are in use, so a typo waits for no later switch to surface.
    if not _positive_int(m.get("mup_base_width", 1)):
        raise ConfigError(f"model.mup_base_width={m.mup_base_width!r} must be a positive integer (the width at "
                          "which μP's learning rate was tuned)")


def _check_encoder_decoder(m) -> None:
    """The fields an encoder-decoder (model/encoder_decoder.py) adds or constrains."""
    if m.positions != "relative":
        raise ConfigError(f"model.positions={m.positions!r} but model.family=encoder_decoder places tokens by T5's "
                          "relative bias; set model.positions=relative")
    if m.tied_embeddings:
        raise ConfigError("model.tied_embeddings=True is not supported with model.family=encoder_decoder (T5 v1.1 "
                          "reads out with its own matrix); set model.tied_embeddings=false")
    if m.get("encoder_depth") is not None and not _positive_int(m.encoder_depth):
        raise ConfigError(f"model.encoder_depth={m.encoder_depth!r} must be a positive integer, or None for depth")
    # The encoder's buckets are halved by direction, and half of each half counts exact distances:
    # the log-spaced rest spans exact .. max_distance, so max_distance must lie beyond the exact ones.
    if m.relative_buckets < 4 or m.relative_buckets % 2:
        raise ConfigError(f"model.relative_buckets={m.relative_buckets} must be an even number >= 4 (T5: 32)")
    if m.relative_max_distance <= m.relative_buckets // 2:
        raise ConfigError(f"model.relative_max_distance={m.relative_max_distance} must exceed "
                          f"model.relative_buckets // 2 = {m.relative_buckets // 2}, the distances counted exactly; "
                          "raise it (T5: 128)")
    for field in HOOKS:
        if hook(m, field):
            raise ConfigError(f"model.{field}={hook(m, field)} is a decoder's fine-tuning piece; an encoder_decoder "
                              "fine-tunes with finetune.method=full or lora")


def _check_moe(m) -> None:
    """The `model.moe` fields (whatever model.mlp is), and what a mixture of experts rules out."""
    e = m.moe
    for field in ("experts", "top_k"):
        if not _positive_int(e[field]):
            raise ConfigError(f"model.moe.{field}={e[field]!r} must be a positive integer")
    if e.top_k > e.experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} exceeds model.moe.experts={e.experts}: a token cannot choose more "
                          "experts than there are; lower top_k or add experts")
    if e.expert_width is not None and not _positive_int(e.expert_width):
        raise ConfigError(f"model.moe.expert_width={e.expert_width!r} must be a positive integer, or None for "
                          "model.mlp_width")
    if not isinstance(e.capacity_factor, (int, float)) or not e.capacity_factor >= 0:
        raise ConfigError(f"model.moe.capacity_factor={e.capacity_factor!r} must be >= 0 (0: dropless; e.g. 1.25: "
                          "each expert takes at most 1.25 times its even share of a sequence's tokens)")
    for field in ("balance_loss_weight", "z_loss_weight"):
        if not isinstance(e[field], (int, float)) or not e[field] >= 0:
            raise ConfigError(f"model.moe.{field}={e[field]!r} must be >= 0 (0 leaves that router loss out)")
    if not sparse(m):
        return
    if m.use_bias:
        raise ConfigError("model.use_bias=True is not supported with model.mlp=moe (the experts have no biases, as "
                          "in Mixtral); set model.use_bias=false")
    if m.get("family", "decoder") != "decoder":
        raise ConfigError(f"model.mlp=moe is a decoder's; model.family={m.family!r} takes model.mlp=dense")
