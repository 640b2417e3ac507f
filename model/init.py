"""Scaled random initialization, in one place.

Every matrix is a truncated normal with std = init_scale / sqrt(fan_in). Projections that write into
the residual stream (attention output, MLP down) are further scaled by 1 / sqrt(2 * depth), so the
stream's variance stays bounded as depth grows. The readout (when untied) starts with std
init_scale / width so initial logits are near uniform. Embeddings use `embed_init_std`; norm scales
start at 1 and every bias and norm offset at 0.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# A truncated normal cut at 2 std has a smaller std than its parameter; this undoes that.
_TRUNC_STD = 0.87962566103423978


def _truncated_normal(std: float):
    def init(key, shape, dtype):
        return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * (std / _TRUNC_STD)

    return init


def param(rngs: nnx.Rngs, init, shape: tuple, names: tuple, m) -> nnx.Param:
    """A parameter of `shape` in the config's param dtype, carrying the logical axis `names`.

    Placement on devices is not the model's business: train/ jits the init with the shardings the
    rules table gives these names, so eager sharding is off.
    """
    assert len(shape) == len(names), (shape, names)
    value = init(rngs.params(), shape, jnp.dtype(m.param_dtype))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def matrix(m, fan_in: int, residual: bool = False):
    """Initializer of a weight with `fan_in` inputs; `residual` for outputs into the stream."""
    std = m.init_scale / math.sqrt(fan_in)
    if residual:
        std /= math.sqrt(2 * m.depth)
    return _truncated_normal(std)


def readout(m):
    return _truncated_normal(m.init_scale / m.width)


def embedding(m):
    return _truncated_normal(m.embed_init_std)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)
