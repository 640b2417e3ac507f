"""Dense projections: the trailing axes of activations contracted with the leading axes of a weight,
run as one 2-D matmul over the flattened batch and length axes.

Why flatten: for a [batch, length, embed] · [embed, out] einsum, XLA's CPU backend gives the
backward pass transposed copies of the [batch, length, out] gradient, which cost as much as the
matmuls themselves (bench/RESULTS.md: the bench shape's MLP stack under the layer scan ran at 72 GFLOP/s as
3-D einsums and 144 GFLOP/s as 2-D matmuls). The reshape only merges leading axes, so on TPU and
GPU it is free and a batch sharded over the mesh stays sharded the same way.

`jnp.einsum`, not `@`: qwix (heft.quantize) intercepts it to run quantized weights.
"""

import math

import jax.numpy as jnp

_IN, _OUT = "cdeg", "uvwxyz"


def project(x, w, inputs: int = 1, **einsum_kwargs):
    """x [*lead, *c] · w [*c, *out] -> [*lead, *out], c the last `inputs` axes of x.

    E.g. attention's query projection: x [batch, length, embed] · w [embed, heads, head_dim] ->
    [batch, length, heads, head_dim]; its output: y [batch, length, heads, head_dim] · w [heads,
    head_dim, embed] with inputs=2 -> [batch, length, embed].
    """
    lead, c = x.shape[: x.ndim - inputs], _IN[:inputs]
    o = _OUT[: w.ndim - inputs]
    y = jnp.einsum(f"n{c},{c}{o}->n{o}", x.reshape(math.prod(lead), *x.shape[x.ndim - inputs:]), w,
                   **einsum_kwargs)
    return y.reshape(*lead, *y.shape[1:])
