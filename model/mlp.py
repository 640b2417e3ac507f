"""The feed-forward network: relu / gelu, or the gated swiglu / geglu (Llama's is swiglu).

The dense MLP of every block, unless `model.mlp=moe` puts a mixture of experts (model/moe.py) in its place.
"""

import jax
from flax import nnx

from heft.model import dense, init, precision
from heft.model.axes import constrain

GATED = ("swiglu", "geglu")
# Each activation: the function on the up-projection (gated ones: on the gate, times the up-projection).
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu, "geglu": jax.nn.gelu}


class MLP(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        self.m = m
        D, F = m.width, m.mlp_width
        self.up = init.param(rngs, init.matrix(m, D), (D, F), ("embed", "mlp"), m)
        if m.activation in GATED:
            self.gate = init.param(rngs, init.matrix(m, D), (D, F), ("embed", "mlp"), m)
        self.down = init.param(rngs, init.matrix(m, F, residual=True), (F, D), ("mlp", "embed"), m)
        if m.use_bias:
            self.up_bias = init.param(rngs, init.zeros, (F,), ("mlp",), m)
            if m.activation in GATED:
                self.gate_bias = init.param(rngs, init.zeros, (F,), ("mlp",), m)
            self.down_bias = init.param(rngs, init.zeros, (D,), ("embed",), m)

    def _dense(self, x, name):
        y = dense.project(x, precision.compute(getattr(self, name)[...], self.m))
        if self.m.use_bias:
            y = y + precision.compute(getattr(self, name + "_bias")[...], self.m)
        return y

    def __call__(self, x):
        """[batch, length, embed] -> [batch, length, embed]."""
        act = ACTIVATIONS[self.m.activation]
        if self.m.activation in GATED:
            h = act(self._dense(x, "gate")) * self._dense(x, "up")
        else:
            h = act(self._dense(x, "up"))
        h = constrain(h, "batch", "length", "act_mlp")
        return constrain(self._dense(h, "down"), "batch", "length", "act_embed")
