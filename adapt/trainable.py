"""What a fine-tune trains, for each method, and the whole model's parameters it makes with its base.

The trainable weights are a nested dict beside the frozen base's (both in `init_params`' form):

    full     the base's own weights, but those `finetune.freeze` matches; block weights from
             layer `finetune.freeze_layers` on (the first layers stay in the base)
    lora     {"a", "b"} under each targeted projection's path (lora.py)
    adapter  the adapters the model grows (model.adapter_width): blocks.{attention,mlp}_adapter
    prefix   the model's prefix_keys / prefix_values [layers, prefix, kv_heads, head_dim]; with
             `finetune.prefix_mlp`, instead an MLP that makes them (prefix_mlp.*), kept for training
    prompt   the model's prompt [prefix, embed]

`params(run, trainable, base)` is the model's parameter dict for `build.bind(run.model, ...)`:
the base's, with the trained weights put in (or folded in, for LoRA). Under jit it is the step's
view of the model; merged once, it is what `heft merge` saves. Only the trainable dict gets
gradients and optimizer state; the base is read, never written.

Inits, each chosen so that training starts where the base is, or near it: LoRA's B and the
adapters' up-projections are zero (step 0 is the base, exactly); a prompt starts as the embeddings
of `prefix` random tokens, a prefix as the keys and values the base computes for such tokens
(prompt tuning's and prefix tuning's "real token" inits).
"""

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from heft.adapt import lora
from heft.adapt.config import base_view
from heft.model import build, checks
from heft.model.checks import ConfigError
from heft.train import rules

PREFIX_MLP = "prefix_mlp"


def flat(tree: dict) -> dict[tuple, object]:
    return traverse_util.flatten_dict(tree)


def nested(items: dict[tuple, object]) -> dict:
    return traverse_util.unflatten_dict(items)


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def model_names(m) -> dict[tuple, tuple]:
    """{parameter path: its logical axis names} of the model for config `m` (abstract: nothing allocated)."""
    return {path: rules.names_of(var) for path, var in nnx.to_flat_state(build.abstract(m)[1])}


def _full_paths(run, paths: list[tuple]) -> list[tuple]:
    """The base's parameters that full fine-tuning trains (all but `finetune.freeze`'s matches)."""
    f = run.finetune
    if not f.freeze:
        return list(paths)
    frozen = [p for p in paths if re.search(f.freeze, dotted(p))]
    if not frozen:
        raise ConfigError(f"finetune.freeze={f.freeze!r} matches no parameter path; paths read like "
                          f"{', '.join(dotted(p) for p in paths[:4])}")
    if len(frozen) == len(paths):
        raise ConfigError(f"finetune.freeze={f.freeze!r} freezes every parameter; narrow it, or use another method")
    return [p for p in paths if p not in frozen]


def _layered(path: tuple) -> bool:
    return "blocks" in path  # a decoder's blocks.*, an encoder-decoder's {encoder,decoder}.blocks.*


def _hook_paths(run) -> list[tuple]:
    """The parameters the method's model hook adds (adapters, prefix, prompt)."""
    base = set(model_names(base_view(run).model))
    return [p for p in model_names(run.model) if p not in base]


def _sample_tokens(key, run, n: int):
    """`n` random token ids past the special ones (pad, unk, bos, eos)."""
    return jax.random.randint(key, (n,), 4, run.model.vocab)


def _prefix_of_tokens(run, base: dict, tokens):
    """The keys and values the base computes for `tokens` [p], each [depth, p, kv_heads, head_dim]."""
    m = base_view(run).model
    cache = build.init_cache(m, 1, len(tokens), jnp.dtype(m.param_dtype))
    _, (keys, values, _) = build.bind(m, base)(tokens[None], jnp.arange(len(tokens))[None], cache=cache)
    return keys[:, 0].astype(m.param_dtype), values[:, 0].astype(m.param_dtype)


def init(run, base: dict, seed: int) -> dict:
    """The trainable weights at step 0, given the base's parameters (arrays, or abstract under eval_shape)."""
    f, m = run.finetune, run.model
    key = jax.random.key(seed)
    base_flat = flat(base)
    if f.method == "full":
        k = f.freeze_layers
        return nested({p: jnp.array(base_flat[p][k:] if k and _layered(p) else base_flat[p], copy=True)
                       for p in _full_paths(run, list(base_flat))})
    if f.method == "lora":
        chosen = lora.targets(f, list(base_flat))
        keys = jax.random.split(key, len(chosen))
        return nested({p: lora.init_pair(kk, p, base_flat[p], f.lora_rank) for p, kk in zip(chosen, keys)})
    if f.method == "prefix" and f.prefix_mlp:
        return {PREFIX_MLP: _init_prefix_mlp(run, base, key)}
    # adapter, prefix, prompt: the hook's parameters as the model initializes them (under jit the
    # rest of the model's init is never computed), then the real-token inits.
    hooks = _hook_paths(run)
    out = {p: v for p, v in flat(build.init_params(m, seed)).items() if p in hooks}
    if f.method == "prompt":
        out[("prompt",)] = base["embed"][_sample_tokens(key, run, f.prompt_length)].astype(m.param_dtype)
    if f.method == "prefix":
        tokens = _sample_tokens(key, run, f.prefix_length)
        out[("prefix_keys",)], out[("prefix_values",)] = _prefix_of_tokens(run, base, tokens)
    return nested(out)


def _init_prefix_mlp(run, base: dict, key) -> dict:
    """Li and Liang's reparametrisation: prefix = MLP(embeddings of `prefix_length` random tokens)."""
    f, m = run.finetune, run.model
    D, h, L, K, Dh = m.width, f.prefix_mlp, m.depth, m.kv_heads, checks.head_dim(m)
    k_tokens, k_hidden, k_out = jax.random.split(key, 3)
    dtype = jnp.dtype(m.param_dtype)
    return {
        "embed": base["embed"][_sample_tokens(k_tokens, run, f.prefix_length)].astype(dtype),
        "hidden": (jax.random.normal(k_hidden, (D, h)) / math.sqrt(D)).astype(dtype),
        "hidden_bias": jnp.zeros((h,), dtype),
        "out": (jax.random.normal(k_out, (h, L, 2, K, Dh)) / math.sqrt(h)).astype(dtype),
        "out_bias": jnp.zeros((L, 2, K, Dh), dtype),
    }


def _prefix_from_mlp(mlp: dict) -> tuple:
    """(prefix_keys, prefix_values) [layers, prefix, kv_heads, head_dim] from the reparametrising MLP."""
    hidden = jnp.tanh(mlp["embed"] @ mlp["hidden"] + mlp["hidden_bias"])  # [prefix, hidden]
    kv = jnp.einsum("ph,hlskd->lspkd", hidden, mlp["out"]) + mlp["out_bias"][:, :, None]
    return kv[:, 0], kv[:, 1]


def names(run) -> dict[tuple, tuple]:
    """{trainable path: logical axis names}, for the sharding rules."""
    f = run.finetune
    if f.method == "full":
        base = model_names(run.model)
        return {p: base[p] for p in _full_paths(run, list(base))}
    if f.method == "lora":
        base = model_names(run.model)
        out = {}
        for p in lora.targets(f, list(base)):
            out[p + ("a",)], out[p + ("b",)] = lora.pair_names(p, base[p])
        return out
    if f.method == "prefix" and f.prefix_mlp:
        kv = ("layers", None, "kv_heads", "head_dim")
        return {(PREFIX_MLP, "embed"): ("prefix", "embed"), (PREFIX_MLP, "hidden"): ("embed", "adapter"),
                (PREFIX_MLP, "hidden_bias"): ("adapter",), (PREFIX_MLP, "out"): ("adapter",) + kv,
                (PREFIX_MLP, "out_bias"): kv}
    hooks = model_names(run.model)
    return {p: hooks[p] for p in _hook_paths(run)}


def params(run, trainable: dict, base: dict, step=None) -> dict:
    """The whole model's parameters (`build.bind(run.model, ...)`'s form) from the frozen base and
    the trained weights. `step` (training only) seeds LoRA's dropout."""
    f = run.finetune
    out = flat(base)
    if f.method == "full":
        k = f.freeze_layers
        for p, w in flat(trainable).items():
            out[p] = jnp.concatenate([out[p][:k], w]) if k and _layered(p) else w
    elif f.method == "lora":
        weights = flat(trainable)
        scale = f.lora_alpha / f.lora_rank
        for i, p in enumerate(dict.fromkeys(q[:-1] for q in weights)):  # each target once, in order
            pair = {"a": weights[p + ("a",)], "b": weights[p + ("b",)]}
            keep = None
            if f.lora_dropout and step is not None:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.train.seed), step), i)
                keep = lora.dropout_mask(key, p, out[p], f.lora_dropout)
            out[p] = lora.apply(p, out[p], pair, scale, keep)
    elif f.method == "prefix" and f.prefix_mlp:
        keys, values = _prefix_from_mlp(trainable[PREFIX_MLP])
        out[("prefix_keys",)], out[("prefix_values",)] = keys, values
    else:
        out.update(flat(trainable))
    return nested(out)


def abstract(run) -> dict:
    """The trainable weights as ShapeDtypeStructs (nested dict), from the abstract base: nothing allocated."""
    base = build.abstract_params(base_view(run).model)
    return jax.eval_shape(lambda b: init(run, b, 0), base)


def count(tree: dict) -> int:
    """How many weights a (possibly abstract) tree holds."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
