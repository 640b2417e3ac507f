"""A bottleneck adapter (Houlsby et al., 2019): h + up(act(down(h))), for fine-tuning (heft.adapt).

A block holds two when `model.adapter_width` > 0: one on the attention's output and one on the
MLP's, each before the residual add. The up-projection and its bias start at zero, so a model with
fresh adapters computes exactly what the model without them computes.
"""

import jax
from flax import nnx

from heft.model import dense, init, precision

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


class Adapter(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        D, A = m.width, m.adapter_width
        self.down = init.param(rngs, init.matrix(m, D), (D, A), ("embed", "adapter"), m)
        self.down_bias = init.param(rngs, init.zeros, (A,), ("adapter",), m)
        self.up = init.param(rngs, init.zeros, (A, D), ("adapter", "embed"), m)
        self.up_bias = init.param(rngs, init.zeros, (D,), ("embed",), m)

    def __call__(self, h):
        """[batch, length, embed] -> [batch, length, embed], in h's dtype."""
        m = self.m
        z = dense.project(h, precision.compute(self.down[...], m)) + precision.compute(self.down_bias[...], m)
        z = ACTIVATIONS[m.adapter_activation](z)
        z = dense.project(z, precision.compute(self.up[...], m)) + precision.compute(self.up_bias[...], m)
        return h + z.astype(h.dtype)
