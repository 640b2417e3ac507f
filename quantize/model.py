"""The quantized model: qwix's post-training quantization of a heft model (built through
heft.model.build), its parameters and their shardings.

qwix intercepts the decoder's matmuls (`jnp.einsum`, and `jnp.asarray` of their weights) while it
runs once: each weight a rule matches is replaced by `{array: {qvalue, scale}}` (integers and
float scales). Quantizing runs that pass on the real weights, inside the layer scan, so each
layer's scales are its own; restoring builds the same structure abstractly (`abstract`) and fills
it with stored values. Either way the model that comes out is called like the float one.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import build
from heft.model.checks import ConfigError
from heft.quantize import rules
from heft.train import rules as mesh_rules
from heft.train import sharding

SAMPLE_SHAPE = (1, 1)  # the tokens qwix's one pass runs on: any will do, the weights are what it converts


def qwix():
    """The qwix module, or a one-line error saying how to install it."""
    try:
        import qwix as q
    except ImportError:
        raise ConfigError('quantization needs qwix: pip install "heft[quantize]"') from None
    return q


def _sample():
    return jnp.zeros(SAMPLE_SHAPE, jnp.int32)


def quantize_module(config, model: nnx.Module):
    """`model` with its matched weights converted to integers and scales (qwix PTQ); not in place."""
    q = qwix()
    return q.quantize_model(model, q.PtqProvider(rules.qwix_rules(config)), _sample())


@functools.cache
def _abstract(config_json: str):
    from heft.train.checkpoint import config_from_json

    config = config_from_json(config_json)
    return nnx.split(nnx.eval_shape(lambda: quantize_module(config, build.create(config.model))))


def abstract(config):
    """(graphdef, abstract state) of the quantized model: shapes, dtypes and logical axis names only."""
    from heft.train.checkpoint import config_to_json

    rules.check(config)
    return _abstract(config_to_json(config))


def abstract_params(config) -> dict:
    """The quantized parameters as a nested dict of ShapeDtypeStructs (what `quantize` returns)."""
    return nnx.to_pure_dict(abstract(config)[1])


def shardings(config, mesh) -> dict:
    """NamedShardings of the quantized parameters: each axis by the rules table, like the float
    weight it came from, except where its size does not divide its mesh axes (a scale's few
    groups, a packed last axis): that axis is then whole on every device."""
    return nnx.to_pure_dict(mesh_rules.shardings(abstract(config)[1], mesh, config, fit=True))


def quantize(config, params: dict, mesh) -> dict:
    """The float `params` (a nested dict, as checkpoints hold them) quantized by `config.quantize`,
    placed in `shardings(config, mesh)`: a nested dict whose quantized weights are
    {"array": {"qvalue": int8 or int4 [like the weight], "scale": float [the weight's shape with
    each contraction axis reduced to its number of groups, or 1]}}."""
    out = shardings(config, mesh)

    @functools.partial(jax.jit, out_shardings=out)
    def run(params):
        return nnx.to_pure_dict(nnx.state(quantize_module(config, build.bind(config.model, params))))

    with sharding.activated(mesh, config):
        return run(params)


def bind(config, qparams: dict):
    """The quantized model holding `qparams`; called like the float one (cheap under jit)."""
    graphdef, state = abstract(config)
    state = jax.tree.map(lambda x: x, state)  # a copy: the cached abstract state stays abstract
    nnx.replace_by_pure_dict(state, qparams)
    return nnx.merge(graphdef, state)


def binder(config):
    """`(model config, params) -> model` for this checkpoint's config: the float decoder's `bind`, or
    the quantized one's when the config says its parameters are integers."""
    if not rules.is_quantized(config):
        return build.bind
    return lambda m, params: bind(config, params)
