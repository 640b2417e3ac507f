"""LoRA (Hu et al., 2021) as a reparametrisation: W_eff = W + (alpha / r) * A @ B.

A projection's weight W has input axes and output axes ([embed] -> [heads, head_dim] for q, k, v;
[heads, head_dim] -> [embed] for o; ...), and blocks stack them on a leading [layers] axis. Targets
are matched by the projection's name alone, so in an encoder-decoder `q|k|v|o` takes the encoder's
self-attention and the decoder's self- and cross-attention alike. Its
LoRA pair is A [layers, *inputs, rank] and B [layers, rank, *outputs]: r * (d_in + d_out) weights
per layer. The effective weight is computed inside the jitted step from the frozen W and the
trainable A, B, so the model itself has no LoRA code and a merged model is just W_eff.

Folding the product into W costs one W-sized temporary per targeted weight in the step (all layers
at once, under the layer scan) rather than the low-rank activations of an unfolded branch; what
that costs is measured in bench/RESULTS.md. B starts at zero, so step 0 computes exactly the base.

Dropout cannot act on the branch's input once the branch is folded into W; `lora_dropout` instead
drops rows of A (input features of the branch) with one mask per step, layer and target.
"""

import math
import re

import jax
import jax.numpy as jnp

from heft.adapt.config import PROJECTIONS
from heft.model.checks import ConfigError

# How many leading axes of each projection's weight (after [layers]) are its inputs.
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "readout": 1}


def targets(f, paths: list[tuple]) -> list[tuple]:
    """The parameter paths of the projections `finetune.lora_targets` names (full match on the name)."""
    pattern = re.compile(f.lora_targets)
    present = [p for p in paths if p[-1] in PROJECTIONS]
    chosen = [p for p in present if pattern.fullmatch(p[-1])]
    experts = [p for p in chosen if "moe" in p]  # [layers, experts, ...]: no LoRA pair is laid out for them
    if experts:
        raise ConfigError(f"finetune.lora_targets={f.lora_targets!r} takes a mixture of experts' expert weights "
                          f"({'.'.join(experts[0])}), which LoRA does not adapt; target the attention (e.g. 'q|k|v|o')")
    if not chosen:
        names = sorted({p[-1] for p in present}, key=PROJECTIONS.index)
        raise ConfigError(f"finetune.lora_targets={f.lora_targets!r} matches no projection of this model; "
                          f"choose among {', '.join(names)} (e.g. 'q|v')")
    return chosen


def _split(path: tuple, shape: tuple) -> tuple[tuple, tuple, tuple]:
    """(leading, input, output) dimensions of a projection's weight."""
    lead = 1 if "blocks" in path else 0  # stacked: blocks.*, or an encoder-decoder's {encoder,decoder}.blocks.*
    n_in = INPUT_AXES[path[-1]]
    return shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]


def pair_shapes(path: tuple, shape: tuple, rank: int) -> tuple[tuple, tuple]:
    """The shapes of A and B for the weight at `path`."""
    lead, ins, outs = _split(path, shape)
    return lead + ins + (rank,), lead + (rank,) + outs


def pair_names(path: tuple, names: tuple) -> tuple[tuple, tuple]:
    """The logical axis names of A and B, from the weight's."""
    lead, ins, outs = _split(path, names)
    return lead + ins + ("lora_rank",), lead + ("lora_rank",) + outs


def init_pair(key, path: tuple, w, rank: int) -> dict:
    """{"a": A, "b": B} for the weight `w` at `path`: A fan-in-scaled normal, B zero."""
    a_shape, b_shape = pair_shapes(path, w.shape, rank)
    _, ins, _ = _split(path, w.shape)
    a = jax.random.normal(key, a_shape, jnp.float32) / math.sqrt(math.prod(ins))
    return {"a": a.astype(w.dtype), "b": jnp.zeros(b_shape, w.dtype)}


def delta(path: tuple, w, pair: dict, scale: float, keep=None):
    """(alpha / r) * A @ B, shaped as `w`, in float32. `keep`: a [*lead, *inputs] mask that drops rows
    of A (dropout, already divided by the keep probability), or None."""
    lead, ins, outs = _split(path, w.shape)
    a = pair["a"].astype(jnp.float32)
    if keep is not None:
        a = a * keep[..., None]
    a = a.reshape(lead + (math.prod(ins), a.shape[-1]))
    b = pair["b"].astype(jnp.float32).reshape(lead + (pair["b"].shape[len(lead)], math.prod(outs)))
    return (scale * jnp.matmul(a, b)).reshape(w.shape)


def apply(path: tuple, w, pair: dict, scale: float, keep=None):
    """W + (alpha / r) * A @ B in W's dtype: exactly W while B is zero."""
    return (w.astype(jnp.float32) + delta(path, w, pair, scale, keep)).astype(w.dtype)


def dropout_mask(key, path: tuple, w, rate: float):
    """A [*lead, *inputs] keep mask for `apply`, scaled by 1 / (1 - rate)."""
    lead, ins, _ = _split(path, w.shape)
    keep = jax.random.bernoulli(key, 1.0 - rate, lead + ins)
    return keep.astype(jnp.float32) / (1.0 - rate)
