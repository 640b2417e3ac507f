"""The one door to a model: which class a config builds, its abstract form, its parameters, and one
forward pass per family.

heft has two families, named by `model.family`:
- `decoder`: Llama- and GPT-2-style decoders, dense or a mixture of experts (decoder.py);
- `encoder_decoder`: T5-style, a bidirectional encoder read by a causal decoder (encoder_decoder.py).

Each is registered once, as a `Family`: its class, how a batch (data/rows.py) runs through it, and
what a step of it costs (cost.py). Every stage outside `model/` builds and calls models through the
functions below, so no stage branches on the family it holds; a new family is one entry in
`FAMILIES` (and, to generate text, one in eval/text.py's table of decoding loops). Parameters travel
as nested dicts of arrays (what orbax saves and optax updates); `bind` turns them back into a
module, cheaply under jit.
"""

import dataclasses
import json
from collections.abc import Callable

import jax
from flax import nnx

from heft.model import checks, cost
from heft.model.decoder import Decoder, init_cache  # noqa: F401  (init_cache: the KV cache every family decodes with)
from heft.model.encoder_decoder import EncoderDecoder


def _decoder_forward(model, batch: dict):
    """A decoder over a batch of [batch, length] inputs, positions and segment ids."""
    logits, router = model(batch["inputs"], batch["positions"], batch["segment_ids"], return_router_losses=True)
    return logits, router or {}  # router: None for a dense model


def _encoder_decoder_forward(model, batch: dict):
    """The encoder reads `encoder_inputs` [batch, input_length]; the decoder writes `inputs` [batch, length]."""
    return model(batch["encoder_inputs"], batch["inputs"], batch["encoder_segment_ids"], batch["segment_ids"]), {}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: what it builds and how it runs."""

    name: str
    module: type  # the nnx.Module: `module(model config, rngs)`
    forward: Callable  # (model, batch) -> (logits [batch, length, vocab] float32, {name: aux loss})
    cost: Callable  # (config, parameters per component, row lengths, batch) -> work and memory (cost.py)


FAMILIES = {
    "decoder": Family("decoder", Decoder, _decoder_forward, cost.decoder),
    "encoder_decoder": Family("encoder_decoder", EncoderDecoder, _encoder_decoder_forward, cost.encoder_decoder),
}


def family(m) -> Family:
    """The family model config `m` builds (`model.family`; decoder for configs saved before it existed)."""
    name = checks.family(m)
    if name not in FAMILIES:
        raise checks.ConfigError(f"model.family={name!r} is unknown; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def create(m, seed: int = 0) -> nnx.Module:
    """A freshly initialized model for config `m` (allocated where it runs: under jit, in its shards)."""
    return family(m).module(m, nnx.Rngs(seed))


def abstract(m):
    """(graphdef, abstract state) of the model for config `m`: shapes only, nothing allocated.

    The one place the abstract model is built; every shape question (sizes, shardings, restores,
    conversion) starts here. Building it traces the whole model's init (~0.1 s for a tiny one, more
    for a deep one) and a run asks a dozen times, so it is kept per config; each caller gets its own
    Variables (`bind` fills them in).
    """
    key = (family(m).module, json.dumps(m.to_dict(), sort_keys=True, default=repr))
    if key not in _ABSTRACT:
        if len(_ABSTRACT) >= 16:
            _ABSTRACT.pop(next(iter(_ABSTRACT)))
        _ABSTRACT[key] = nnx.split(nnx.eval_shape(lambda: create(m)))
    graphdef, state = _ABSTRACT[key]
    return graphdef, jax.tree.map(lambda x: x, state)


_ABSTRACT: dict = {}  # (module, model config as JSON) -> (graphdef, abstract state)


def abstract_params(m) -> dict:
    """The parameters as a nested dict of ShapeDtypeStructs: `init_params`' form, nothing allocated."""
    return nnx.to_pure_dict(nnx.filter_state(abstract(m)[1], nnx.Param))


def init_params(m, seed: int) -> dict:
    """Freshly initialized parameters as a nested dict of arrays (the form train/ and orbax keep)."""
    return nnx.to_pure_dict(nnx.state(create(m, seed), nnx.Param))


def bind(m, params: dict) -> nnx.Module:
    """The model for config `m` holding `params` (a nested dict of arrays); cheap under jit."""
    graphdef, state = abstract(m)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(m, model, batch: dict):
    """`model` (built for config `m`: by `bind`, or a quantized one) over a batch of the rows its family
    reads: (logits [batch, length, vocab] float32, {name: float32 scalar}: a mixture of experts'
    router losses, each the mean over layers; empty for the rest)."""
    return family(m).forward(model, batch)
