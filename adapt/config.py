"""The `finetune` config section: its checks, and the whole config a fine-tune runs under.

A fine-tune's model is its base's: `run_config` takes every model field from the base checkpoint's
config (a config file's own model fields would only be a guess at it), except the few that say how
to run rather than what the weights mean (RUNTIME_FIELDS), and switches on the model's hook for
the method (model.adapter_width, prefix_length or prompt_length). The rest (train, data, mesh,
checkpoint) is the fine-tune's own config. That run config is what every checkpoint of the
fine-tune records, so evaluating or merging it rebuilds the same model.
"""

import re

from heft.model.checks import ADAPTER_ACTIVATIONS, ConfigError

METHODS = ("full", "lora", "adapter", "prefix", "prompt")
# The projections LoRA can target, by the name of their weight in the model.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "readout")
# Model fields a fine-tune may set itself: how to run, not what the weights are.
RUNTIME_FIELDS = ("remat", "scan_layers", "compute_dtype")
# The model hook each method switches on; the finetune field of the same name sizes it.
HOOKS = {"adapter": "adapter_width", "prefix": "prefix_length", "prompt": "prompt_length"}
# finetune fields that decide what is trained and what it computes: a resume must keep them.
DEFINING_FIELDS = ("method", "freeze", "freeze_layers", "lora_rank", "lora_alpha", "lora_targets", "adapter_width",
                   "adapter_activation", "prefix_length", "prefix_mlp", "prompt_length")


def _count(f, field: str, least: int) -> None:
    value = f[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"finetune.{field}={value!r} must be an integer >= {least}")


def _regex(f, field: str) -> re.Pattern:
    try:
        return re.compile(f[field])
    except re.error as e:
        raise ConfigError(f"finetune.{field}={f[field]!r} is not a regular expression ({e}); fix it") from None


def check(config) -> None:
    """Raises ConfigError for the first problem in `config.finetune` that the config alone shows."""
    f = config.finetune
    if f.method not in METHODS:
        raise ConfigError(f"finetune.method={f.method!r} is unknown; choose one of {', '.join(METHODS)}")
    if f.method == "full":
        _regex(f, "freeze")
        _count(f, "freeze_layers", 0)
    if f.method == "lora":
        _count(f, "lora_rank", 1)
        if not isinstance(f.lora_alpha, (int, float)) or not f.lora_alpha > 0:
            raise ConfigError(f"finetune.lora_alpha={f.lora_alpha!r} must be > 0 (the update is alpha / rank * A @ B)")
        if not isinstance(f.lora_dropout, (int, float)) or not 0 <= f.lora_dropout < 1:
            raise ConfigError(f"finetune.lora_dropout={f.lora_dropout!r} must be in [0, 1)")
        _regex(f, "lora_targets")
    if f.method == "adapter":
        _count(f, "adapter_width", 1)
        if f.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise ConfigError(f"finetune.adapter_activation={f.adapter_activation!r} is unknown; choose one of "
                              f"{', '.join(ADAPTER_ACTIVATIONS)}")
    if f.method == "prefix":
        _count(f, "prefix_length", 1)
        _count(f, "prefix_mlp", 0)
    if f.method == "prompt":
        _count(f, "prompt_length", 1)


def run_config(config, base_config):
    """The config a fine-tune of a checkpoint saved with `base_config` runs under (module docstring)."""
    check(config)
    run = config.copy_and_resolve_references()
    base = base_config.model
    for field in base:
        if field in run.model and field not in RUNTIME_FIELDS:
            run.model[field] = base[field]
    run.data.document_start = base_config.get("data", {}).get("document_start", "eos")
    f = run.finetune
    if f.method in HOOKS and base.get("family", "decoder") == "encoder_decoder":
        raise ConfigError(f"finetune.method={f.method} is a decoder's; an encoder_decoder base (T5) fine-tunes with "
                          "finetune.method=full or lora (its targets in both stacks)")
    if f.method in HOOKS:
        hook = HOOKS[f.method]
        if run.model[hook]:
            raise ConfigError(f"the base already has model.{hook}={run.model[hook]}; fine-tune it with another "
                              "method, or fine-tune the model it was merged from")
        run.model[hook] = f[hook]
        if f.method == "adapter":
            run.model.adapter_activation = f.adapter_activation
    m = run.model
    if f.method == "prompt" and m.positions == "learned" and f.prompt_length + run.train.seq_len > m.max_len:
        raise ConfigError(f"finetune.prompt_length={f.prompt_length} + train.seq_len={run.train.seq_len} exceeds "
                          f"the base's model.max_len={m.max_len} (learned positions); shorten one of them")
    if f.method == "full" and f.freeze_layers >= m.depth:
        raise ConfigError(f"finetune.freeze_layers={f.freeze_layers} freezes every one of the base's {m.depth} blocks; "
                          "freeze fewer")
    return run


def base_view(run):
    """The run config with the method's hook off: the base's own model, as its checkpoint is read."""
    base = run.copy_and_resolve_references()
    if run.finetune.method in HOOKS:
        base.model[HOOKS[run.finetune.method]] = 0
    return base
