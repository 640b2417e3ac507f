"""RMSNorm and LayerNorm over the embed axis, with statistics in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from heft.model import init, precision


class Norm(nnx.Module):
    """`model.norm` over the last axis: rmsnorm (scale) or layernorm (scale and offset)."""

    def __init__(self, m, rngs: nnx.Rngs):
        self.kind, self.eps = m.norm, m.norm_eps
        self.scale = init.param(rngs, init.ones, (m.width,), ("embed",), m)
        if m.norm == "layernorm":
            self.offset = init.param(rngs, init.zeros, (m.width,), ("embed",), m)

    def __call__(self, x):
        """[..., embed] -> [..., embed] float32."""
        x = x.astype(precision.STATS)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(precision.STATS)
        if self.kind == "layernorm":
            x = x + self.offset[...].astype(precision.STATS)
        return x
